package client

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"time"

	"github.com/doppelha/doppel/daemon/api"
	"github.com/doppelha/doppel/daemon/ha"
	"github.com/doppelha/doppel/daemon/job"
)

// Creating a job: Endpoint for each side, spec.Defaults and Validate,
// Warnings to show, Preflight on both agents (nothing changes when it
// fails), CreateBoth (target first, rolled back when the source fails),
// WaitReplicating for the first replication handshake.

// Endpoint describes the named server as a job endpoint: its control
// address, its replication address (the replication listener's host, or
// the control host when it listens on every address) and its pinned
// fingerprint.
func (f *Fleet) Endpoint(ctx context.Context, name string) (job.Endpoint, error) {
	s, err := f.cfg.Server(name)
	if err != nil {
		return job.Endpoint{}, err
	}
	cl, err := f.Client(name)
	if err != nil {
		return job.Endpoint{}, err
	}
	info, err := cl.Info(ctx)
	if err != nil {
		return job.Endpoint{}, fmt.Errorf("server %s: %w", name, err)
	}
	chost, _, _ := net.SplitHostPort(s.Addr)
	rhost, rport, err := net.SplitHostPort(info.Repl)
	if err != nil {
		return job.Endpoint{}, fmt.Errorf("server %s reports replication address %q: %w", name, info.Repl, err)
	}
	if a, err := netip.ParseAddr(rhost); rhost == "" || (err == nil && a.IsUnspecified()) {
		rhost = chost
	}
	return job.Endpoint{Name: name, Control: s.Addr, Repl: net.JoinHostPort(rhost, rport), Fingerprint: s.Fingerprint}, nil
}

// Warnings are what an operator should hear about spec before it is
// created (it is valid, but risky).
func Warnings(spec job.Spec) []string {
	var w []string
	if spec.Failover == ha.FailoverAuto && spec.Arbiter == "" {
		w = append(w, fmt.Sprintf("--failover auto without --arbiter: a partition between %s and %s (not a failure of %s) makes %s take over while %s keeps serving: split brain, writes of one side missing on the other. Use --arbiter etcd (docs/safety.md).",
			spec.Source.Name, spec.Target.Name, spec.Source.Name, spec.Target.Name, spec.Source.Name))
	}
	return w
}

// Notice is something a server said that changes nothing but is worth
// showing.
type Notice struct {
	Server  string
	Message string
}

// Problem is one server's reason not to create a job.
type Problem struct {
	Server string
	api.Problem
}

// PreflightError lists every problem of both sides: the job was not
// created and nothing changed.
type PreflightError struct {
	Job      string
	Problems []Problem
}

func (e *PreflightError) Error() string {
	lines := make([]string, len(e.Problems))
	for i, p := range e.Problems {
		lines[i] = fmt.Sprintf("  %-8s %s", p.Server, p.Problem)
	}
	return fmt.Sprintf("job %s not created: %d problem(s), nothing was changed:\n%s", e.Job, len(e.Problems), strings.Join(lines, "\n"))
}

// Preflight runs the pre-flight of spec on both agents, sizes the job (the
// source volume's size is what is replicated; a target file to be created
// gets that size when spec.Size is 0) and reports every problem of both
// sides at once, as a *PreflightError. It returns the agents' notices.
func Preflight(ctx context.Context, spec *job.Spec, src, tgt *api.Client) ([]Notice, error) {
	var problems []Problem
	add := func(server string, p api.Problem) { problems = append(problems, Problem{Server: server, Problem: p}) }
	sp, err := src.Preflight(ctx, *spec)
	if err != nil {
		add(spec.Source.Name, api.Problem{Check: "agent", Message: err.Error()})
	}
	if spec.Size == 0 && sp.Volume.Exists && sp.Volume.Size > 0 {
		spec.Size = sp.Volume.Size // a missing target file is made this size
	}
	tp, err := tgt.Preflight(ctx, *spec)
	if err != nil {
		add(spec.Target.Name, api.Problem{Check: "agent", Message: err.Error()})
	}
	both := []struct {
		server string
		pf     api.Preflight
	}{{spec.Source.Name, sp}, {spec.Target.Name, tp}}
	for _, p := range both {
		for _, pr := range p.pf.Problems {
			add(p.server, pr)
		}
	}
	if s, t := sp.Volume.Size, tp.Volume.Size; s > 0 && t > 0 && t < s {
		add(spec.Target.Name, api.Problem{Check: "size", Message: fmt.Sprintf("the target volume %s is %d bytes, smaller than the source volume %s (%d bytes)", tp.Volume.Path, t, sp.Volume.Path, s)})
	}
	if len(problems) > 0 {
		return nil, &PreflightError{Job: spec.Name, Problems: problems}
	}
	spec.VolumeSize = sp.Volume.Size
	var notices []Notice
	for _, p := range both {
		for _, n := range p.pf.Notices {
			notices = append(notices, Notice{Server: p.server, Message: n})
		}
	}
	if t := tp.Volume.Size; t > spec.VolumeSize {
		notices = append(notices, Notice{Server: tp.Server, Message: fmt.Sprintf("the target volume is %d bytes larger than the source: its last %d bytes are not used", t-spec.VolumeSize, t-spec.VolumeSize)})
	}
	return notices, nil
}

// CreateBoth creates the job on the target first (it then waits for its
// source) and on the source last; when the source's create fails, the
// target's is rolled back (its record, state and a volume file it made).
func CreateBoth(ctx context.Context, spec job.Spec, src, tgt *api.Client) error {
	name := spec.Name
	if _, err := tgt.CreateJob(ctx, spec); err != nil {
		return fmt.Errorf("create job %s on target %s (nothing was changed on the source %s): %w", name, spec.Target.Name, spec.Source.Name, err)
	}
	if _, err := src.CreateJob(ctx, spec); err != nil {
		err = fmt.Errorf("create job %s on source %s: %w", name, spec.Source.Name, err)
		if _, derr := tgt.DeleteJobWith(ctx, name, api.DeleteOptions{Undo: true, Force: true}); derr != nil {
			return fmt.Errorf("%w; rolling back the target %s failed too: %v (delete it there: doppel job delete %s --server %s)", err, spec.Target.Name, derr, name, spec.Target.Name)
		}
		return fmt.Errorf("%w (rolled back on the target %s: nothing was left)", err, spec.Target.Name)
	}
	return nil
}

// WaitReplicating waits, at most d, for job name's first replication
// handshake (the source connected to its target; the job counts as
// protected only then) and returns the source's status. When it does not
// happen, the error says what each side reports.
func WaitReplicating(ctx context.Context, name string, src, tgt *api.Client, d time.Duration) (api.JobStatus, error) {
	deadline := time.Now().Add(d)
	var st, tst api.JobStatus
	var serr, terr error
	for {
		qctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		st, serr = src.Job(qctx, name)
		cancel()
		if serr == nil && st.HA.LinkUp {
			return st, nil
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			break
		}
		select {
		case <-ctx.Done():
		case <-time.After(200 * time.Millisecond):
		}
	}
	qctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	tst, terr = tgt.Job(qctx, name)
	cancel()
	var why []string
	for _, v := range []struct {
		st  api.JobStatus
		err error
	}{{st, serr}, {tst, terr}} {
		switch {
		case v.err != nil:
			why = append(why, v.err.Error())
		default:
			msg := fmt.Sprintf("%s: %s %s", v.st.Self, v.st.HA.Role, v.st.HA.State)
			for _, s := range []string{v.st.HA.Reason, v.st.HA.LastError, v.st.Data.Note} {
				if s != "" {
					msg += "; " + s
				}
			}
			why = append(why, msg)
		}
	}
	return st, fmt.Errorf("job %s created, but it is not replicating: no replication handshake within %v (%s). The job stays and connects by itself once the cause is fixed; or remove it: doppel job delete %s",
		name, d, strings.Join(why, " | "), name)
}
