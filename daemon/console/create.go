package console

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"time"

	"github.com/doppelha/doppel/daemon/api"
	"github.com/doppelha/doppel/daemon/client"
	"github.com/doppelha/doppel/daemon/ha"
	"github.com/doppelha/doppel/daemon/job"
	"github.com/doppelha/doppel/daemon/protection"
)

// CreateRequest is the new-job form: the flags of doppel job create.
type CreateRequest struct {
	Name         string `json:"name"`
	Source       string `json:"source"`
	Target       string `json:"target"`
	Volume       string `json:"volume"`
	TargetVolume string `json:"target_volume,omitempty"`
	// Size of a file volume to create when missing (e.g. 1G).
	Size string `json:"size,omitempty"`
	Mode string `json:"mode,omitempty"`
	// ServiceIPs: CIDR@IFACE each.
	ServiceIPs []string `json:"service_ips,omitempty"`
	// MapIface: SRCIFACE=TGTIFACE each.
	MapIface []string `json:"map_iface,omitempty"`
	// Monitor: interval=DURATION,missed=N.
	Monitor  string `json:"monitor,omitempty"`
	Failover string `json:"failover,omitempty"`
	// Scripts: HOOK=PATH each.
	Scripts        []string `json:"scripts,omitempty"`
	Arbiter        string   `json:"arbiter,omitempty"`
	LeaseTTL       string   `json:"lease_ttl,omitempty"`
	SuspendTimeout string   `json:"suspend_timeout,omitempty"`
	// DryRun runs the pre-flight only.
	DryRun bool `json:"dry_run,omitempty"`
}

// CreateResult is the answer to the form: every problem of both sides
// (nothing changed), or what was created.
type CreateResult struct {
	Created  bool            `json:"created"`
	Problems []ServerProblem `json:"problems,omitempty"`
	Notices  []string        `json:"notices,omitempty"`
	Warnings []string        `json:"warnings,omitempty"`
	Message  string          `json:"message,omitempty"`
}

// ServerProblem is one pre-flight problem and the side that has it.
type ServerProblem struct {
	Server  string `json:"server"`
	Check   string `json:"check"`
	Message string `json:"message"`
}

// specFromRequest turns the form into a job spec, without its endpoints.
func specFromRequest(req CreateRequest) (job.Spec, error) {
	spec := job.Spec{Name: strings.TrimSpace(req.Name), Volume: strings.TrimSpace(req.Volume), TargetVolume: strings.TrimSpace(req.TargetVolume),
		Mode: req.Mode, Failover: ha.FailoverMode(req.Failover), Arbiter: req.Arbiter}
	if err := job.ValidName("job", spec.Name); err != nil {
		return spec, err
	}
	if spec.Volume == "" {
		return spec, fmt.Errorf("%w: the volume (a block device or file on the source) is required", job.ErrInvalid)
	}
	if s := strings.TrimSpace(req.Size); s != "" {
		n, err := job.ParseSize(s)
		if err != nil {
			return spec, err
		}
		spec.Size = n
	}
	var err error
	if spec.ServiceIPs, err = job.ParseServiceIPs(nonEmpty(req.ServiceIPs)); err != nil {
		return spec, err
	}
	if spec.MapIface, err = job.ParseInterfaceMap("interface map", nonEmpty(req.MapIface)); err != nil {
		return spec, err
	}
	monitor := strings.TrimSpace(req.Monitor)
	if monitor == "" {
		monitor = "interval=250ms,missed=8"
	}
	m, err := job.ParseMonitor(monitor)
	if err != nil {
		return spec, err
	}
	spec.Monitor = m
	for _, f := range []struct {
		in  string
		out *time.Duration
		nm  string
	}{{req.LeaseTTL, &spec.LeaseTTL, "lease TTL"}, {req.SuspendTimeout, &spec.SuspendTimeout, "suspend timeout"}} {
		if s := strings.TrimSpace(f.in); s != "" {
			d, err := time.ParseDuration(s)
			if err != nil {
				return spec, fmt.Errorf("%w: %s %q: %v", job.ErrInvalid, f.nm, s, err)
			}
			*f.out = d
		}
	}
	if spec.Arbiter == "" && (spec.LeaseTTL != 0 || spec.SuspendTimeout != 0) {
		return spec, fmt.Errorf("%w: a lease TTL and a suspend timeout go with the etcd arbiter", job.ErrInvalid)
	}
	for _, s := range nonEmpty(req.Scripts) {
		hook, path, ok := strings.Cut(s, "=")
		if !ok {
			return spec, fmt.Errorf("%w: script %q: want HOOK=PATH", job.ErrInvalid, s)
		}
		if spec.Scripts == nil {
			spec.Scripts = map[ha.Hook]string{}
		}
		spec.Scripts[ha.Hook(strings.TrimSpace(hook))] = strings.TrimSpace(path)
	}
	spec.Secret = job.NewSecret()
	spec.UUID = job.NewUUID()
	return spec, nil
}

func nonEmpty(ss []string) []string {
	var out []string
	for _, s := range ss {
		if s = strings.TrimSpace(s); s != "" {
			out = append(out, s)
		}
	}
	return out
}

// createJob runs the new-job form with the client package, as doppel job
// create does: the endpoints of both servers, the pre-flight on both
// agents (every problem of both at once, nothing changed), the create on
// the target and then the source (a failure of the source's rolls the
// target's back), then a wait for the first replication handshake.
func (c *Console) createJob(w http.ResponseWriter, r *http.Request, s *session) error {
	var req CreateRequest
	if err := readJSON(r, &req); err != nil {
		return err
	}
	spec, err := specFromRequest(req)
	if err != nil {
		return errorf(http.StatusBadRequest, "invalid", "%v", err)
	}
	f, err := c.fleet()
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(r.Context(), 30*time.Second)
	defer cancel()
	var res CreateResult
	clients := map[string]*api.Client{}
	for _, side := range []struct {
		name string
		ep   *job.Endpoint
	}{{req.Source, &spec.Source}, {req.Target, &spec.Target}} {
		if side.name == "" {
			res.Problems = append(res.Problems, ServerProblem{Check: "spec", Message: "choose a source and a target server"})
			continue
		}
		ep, err := f.Endpoint(ctx, side.name)
		if err == nil {
			clients[side.name], err = f.Client(side.name)
		}
		if err != nil {
			res.Problems = append(res.Problems, ServerProblem{Server: side.name, Check: "agent", Message: err.Error()})
			continue
		}
		*side.ep = ep
	}
	if len(res.Problems) > 0 {
		writeJSON(w, http.StatusUnprocessableEntity, res)
		return nil
	}
	spec.Defaults()
	if err := spec.Validate(); err != nil {
		return errorf(http.StatusBadRequest, "invalid", "%v", err)
	}
	res.Warnings = client.Warnings(spec)
	src, tgt := clients[spec.Source.Name], clients[spec.Target.Name]
	notices, err := client.Preflight(ctx, &spec, src, tgt)
	for _, n := range notices {
		res.Notices = append(res.Notices, n.Server+": "+n.Message)
	}
	var pe *client.PreflightError
	switch {
	case errors.As(err, &pe):
		for _, p := range pe.Problems {
			res.Problems = append(res.Problems, ServerProblem{Server: p.Server, Check: p.Check, Message: p.Message})
		}
		writeJSON(w, http.StatusUnprocessableEntity, res)
		return nil
	case err != nil:
		return errorf(http.StatusBadGateway, "preflight", "%v", err)
	}
	if req.DryRun {
		res.Message = fmt.Sprintf("pre-flight passed on %s and %s: nothing was changed", spec.Source.Name, spec.Target.Name)
		writeJSON(w, http.StatusOK, res)
		return nil
	}
	if err := client.CreateBoth(ctx, spec, src, tgt); err != nil {
		c.record(s.who, spec.Name, "", "create failed: "+err.Error())
		return errorf(http.StatusBadGateway, "create", "%v", err)
	}
	res.Created = true
	res.Message = fmt.Sprintf("created job %s: %s:%s → %s:%s, %s, failover %s", spec.Name, spec.Source.Name, spec.Volume, spec.Target.Name, spec.VolumeOn(spec.Target.Name), spec.Mode, spec.Failover)
	c.record(s.who, spec.Name, "", res.Message)
	c.smp.wake(c.bg)
	st, err := client.WaitReplicating(r.Context(), spec.Name, src, tgt, handshakeWait)
	if err != nil {
		res.Message += "; " + err.Error()
	} else {
		res.Message += "; replication handshake done: " + string(st.HA.State)
		if st.Data.BytesRemaining > 0 {
			res.Message += fmt.Sprintf(" (%s to copy)", protection.BytesHuman(st.Data.BytesRemaining))
		}
	}
	writeJSON(w, http.StatusCreated, res)
	return nil
}

// handshakeWait bounds the wait for a new job's first handshake (the job
// stays, and connects by itself, when it is longer).
const handshakeWait = 15 * time.Second
