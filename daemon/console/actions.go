package console

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/doppelha/doppel/daemon/api"
	"github.com/doppelha/doppel/daemon/client"
	"github.com/doppelha/doppel/daemon/ha"
	"github.com/doppelha/doppel/daemon/job"
	"github.com/doppelha/doppel/daemon/protection"
)

// liveReports asks the servers about the job now (the client package's
// Fleet.FindJob: in parallel, each bounded); a side that does not answer
// carries its last report.
func (c *Console) liveReports(ctx context.Context, name string) ([]sideReport, error) {
	if err := job.ValidName("job", name); err != nil {
		return nil, errorf(http.StatusBadRequest, "invalid", "%v", err)
	}
	f, err := c.fleet()
	if err != nil {
		return nil, err
	}
	sides, err := f.FindJob(ctx, name)
	if err != nil {
		return nil, errorf(http.StatusNotFound, "not_found", "%v", err)
	}
	reps := make([]sideReport, len(sides))
	for i, sd := range sides {
		reps[i].Side = sd
		if sd.Status == nil {
			reps[i].Last, reps[i].LastAt = c.smp.lastOf(name, sd.Server)
		}
	}
	return reps, nil
}

func parseActionOptions(r *http.Request) ActionOptions {
	q := r.URL.Query()
	b := func(k string) bool { v, _ := strconv.ParseBool(q.Get(k)); return v }
	return ActionOptions{Force: b("force"), DiscardQueue: b("discard_queue"), KeepState: b("keep_state"),
		Name: q.Get("name"), Mount: q.Get("mount"), Snapshot: q.Get("snapshot"), TestIP: q.Get("test_ip")}
}

// plan answers what an action would do now (the confirmation's text).
func (c *Console) plan(w http.ResponseWriter, r *http.Request, s *session) error {
	name, action := r.PathValue("name"), r.PathValue("action")
	if !slices.Contains(knownActions, action) {
		return errorf(http.StatusNotFound, "not_found", "unknown action %q", action)
	}
	reps, err := c.liveReports(r.Context(), name)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, planAction(name, action, reps, parseActionOptions(r), time.Now()))
	return nil
}

// ActionResult is the answer to an action.
type ActionResult struct {
	Job    string `json:"job"`
	Action string `json:"action"`
	Server string `json:"server"`
	// Message says what happened, in one line.
	Message string `json:"message"`
	// Steps the agent took (its state machine's actions).
	Steps []string `json:"steps,omitempty"`
}

// act runs an action, once the operator confirmed its plan, on the side
// that must act: the client package picks it as for the CLI.
func (c *Console) act(w http.ResponseWriter, r *http.Request, s *session) error {
	name, action := r.PathValue("name"), r.PathValue("action")
	if !slices.Contains(knownActions, action) {
		return errorf(http.StatusNotFound, "not_found", "unknown action %q", action)
	}
	if err := job.ValidName("job", name); err != nil {
		return errorf(http.StatusBadRequest, "invalid", "%v", err)
	}
	var opts ActionOptions
	if r.ContentLength != 0 {
		if err := readJSON(r, &opts); err != nil {
			return err
		}
	}
	f, err := c.fleet()
	if err != nil {
		return err
	}
	defer c.smp.wake(c.bg)
	what := action
	if opts.Force {
		what += " (forced)"
	}
	if opts.DiscardQueue {
		what += " (discard queue)"
	}
	switch action {
	case "delete":
		return c.deleteJob(w, r, s, f, name, opts)
	case "verify":
		server, cl, err := f.Pick(r.Context(), name, pickerOf(action))
		if err != nil {
			c.record(s.who, name, "", "verify refused: "+err.Error())
			return errorf(http.StatusConflict, "refused", "verify %s: %v", name, err)
		}
		c.record(s.who, name, server, "verify started")
		go func() {
			ctx, cancel := context.WithTimeout(c.bg, 6*time.Hour)
			defer cancel()
			v, err := cl.Verify(ctx, name)
			switch {
			case err != nil:
				c.record(s.who, name, server, "verify failed: "+err.Error())
			case v.Equal:
				c.record(s.who, name, server, fmt.Sprintf("verify: %d chunks, %s compared, source and target are identical", v.Chunks, protection.BytesHuman(v.Bytes)))
			default:
				c.record(s.who, name, server, fmt.Sprintf("verify: %d chunks, %s compared, %d DIFFER", v.Chunks, protection.BytesHuman(v.Bytes), v.Differing))
			}
		}()
		writeJSON(w, http.StatusAccepted, ActionResult{Job: name, Action: action, Server: server,
			Message: fmt.Sprintf("verify of %s started on %s: the result appears in the job's events", name, server)})
		return nil
	case "snapshot", "test-failover", "stop-test-failover", "delete-snapshot":
		return c.snapshotAction(w, r, s, f, name, action, opts)
	}
	copts := api.CommandOptions{Force: opts.Force, DiscardQueue: opts.DiscardQueue}
	if action == "failover" && opts.Snapshot != "" {
		copts.Snapshot = opts.Snapshot
		what += " to snapshot " + opts.Snapshot
	}
	server, st, err := f.Command(r.Context(), name, ha.EventType(action), copts, pickerOf(action))
	res := ActionResult{Job: name, Action: action, Server: server, Steps: st.Actions}
	if err != nil {
		c.record(s.who, name, server, what+" refused: "+err.Error())
		var ae *api.Error
		if errors.As(err, &ae) {
			return err
		}
		return errorf(http.StatusConflict, "refused", "%v", err)
	}
	res.Message = fmt.Sprintf("%s %s on %s: now %s %s (epoch %d)", action, name, server, st.HA.Role, st.HA.State, st.HA.Epoch)
	if st.HA.Reason != "" {
		res.Message += ": " + st.HA.Reason
	}
	c.record(s.who, name, server, fmt.Sprintf("%s: now %s %s (epoch %d)", what, st.HA.Role, st.HA.State, st.HA.Epoch))
	if action == "switchover" || action == "failback" {
		go c.followSwitchover(f, s.who, name, ha.EventType(action), server)
	}
	writeJSON(w, http.StatusOK, res)
	return nil
}

// switchoverWait bounds how long a switchover is followed.
const switchoverWait = 2 * time.Minute

// followSwitchover follows a switchover away from from (the client
// package's WaitSwitchover) and records how it ended.
func (c *Console) followSwitchover(f *client.Fleet, who, name string, cmd ha.EventType, from string) {
	ctx, cancel := context.WithTimeout(c.bg, switchoverWait)
	defer cancel()
	side, err := f.WaitSwitchover(ctx, name, cmd, from)
	switch {
	case err == nil:
		c.record(who, name, side.Server, fmt.Sprintf("%s done: %s is the source (epoch %d), %s the standby", cmd, side.Server, side.Status.HA.Epoch, from))
		c.smp.wake(c.bg)
	case errors.Is(err, context.DeadlineExceeded):
		c.record(who, name, from, fmt.Sprintf("%s not complete after %v: see the job's state", cmd, switchoverWait))
	case c.bg.Err() == nil:
		c.record(who, name, from, fmt.Sprintf("%s did not happen: %v", cmd, err))
	}
}

// deleteJob deletes the job on both sides in the safe order (the client
// package's Fleet.Delete: the target first; nowhere while the volume is
// in use, unless forced).
func (c *Console) deleteJob(w http.ResponseWriter, r *http.Request, s *session, f *client.Fleet, name string, opts ActionOptions) error {
	var done []string
	err := f.Delete(r.Context(), name, api.DeleteOptions{KeepState: opts.KeepState, Force: opts.Force}, func(server string, res api.DeleteResult) {
		msg := "deleted on " + server
		if res.Archived != "" {
			msg += " (kept in " + res.Archived + ")"
		}
		done = append(done, msg)
	})
	msg := strings.Join(done, "; ")
	if err != nil {
		if msg == "" {
			msg = "nothing deleted"
		}
		c.record(s.who, name, "", fmt.Sprintf("delete: %s; %v", msg, err))
		return errorf(http.StatusConflict, "refused", "delete %s: %s; %v", name, msg, err)
	}
	c.record(s.who, name, "", "delete: "+msg)
	writeJSON(w, http.StatusOK, ActionResult{Job: name, Action: "delete", Message: msg})
	return nil
}

// snapshotAction takes or deletes a snapshot, or starts or stops a test
// failover, on the job's target.
func (c *Console) snapshotAction(w http.ResponseWriter, r *http.Request, s *session, f *client.Fleet, name, action string, opts ActionOptions) error {
	ctx, cancel := context.WithTimeout(r.Context(), client.CommandTimeout)
	defer cancel()
	res := ActionResult{Job: name, Action: action}
	var err error
	switch action {
	case "snapshot":
		var freeze *api.FreezeRequest
		if opts.Mount != "" {
			freeze = &api.FreezeRequest{Mount: opts.Mount}
		}
		var info api.SnapshotInfo
		res.Server, info, err = f.Snapshot(ctx, name, api.SnapshotRequest{Name: opts.Name}, freeze)
		if err == nil {
			kind := "crash-consistent"
			if info.Point.AppConsistent {
				kind = "application-consistent"
			}
			res.Message = fmt.Sprintf("snapshot %s taken on %s at sequence %d (%s, %s, took %v)", info.Name, res.Server, info.Point.Seq, kind, info.Mechanism, info.Took.Round(time.Millisecond))
		}
	default:
		var cl *api.Client
		res.Server, cl, err = f.Pick(ctx, name, client.Target)
		if err != nil {
			break
		}
		switch action {
		case "test-failover":
			var st api.TestFailoverStatus
			if st, err = cl.StartTestFailover(ctx, name, api.TestFailoverRequest{Snapshot: opts.Snapshot, TestIP: opts.TestIP}); err == nil {
				from := st.From
				if from == "" {
					from = "the consistent image"
				}
				res.Message = fmt.Sprintf("test failover on %s: a clone of %s served at %s", res.Server, from, st.Device)
			}
		case "stop-test-failover":
			if err = cl.StopTestFailover(ctx, name); err == nil {
				res.Message = fmt.Sprintf("test failover on %s stopped, its clone discarded", res.Server)
			}
		case "delete-snapshot":
			if err = cl.DeleteSnapshot(ctx, name, opts.Snapshot); err == nil {
				res.Message = fmt.Sprintf("snapshot %s deleted on %s", opts.Snapshot, res.Server)
			}
		}
	}
	if err != nil {
		c.record(s.who, name, res.Server, action+" failed: "+err.Error())
		var ae *api.Error
		if errors.As(err, &ae) {
			return err
		}
		return errorf(http.StatusConflict, "refused", "%s %s: %v", action, name, err)
	}
	c.record(s.who, name, res.Server, res.Message)
	writeJSON(w, http.StatusOK, res)
	return nil
}

// snapshots lists the job's snapshots on its target.
func (c *Console) snapshots(w http.ResponseWriter, r *http.Request, s *session) error {
	name := r.PathValue("name")
	f, err := c.fleet()
	if err != nil {
		return err
	}
	// The fleet bounds each server's answer to FindJob; the list gets its
	// own bound: a dead source uses up the whole of the first (one side
	// down is when the snapshots matter).
	server, cl, err := f.Pick(r.Context(), name, client.Target)
	if err != nil {
		return errorf(http.StatusConflict, "no_target", "%v", err)
	}
	ctx, cancel := context.WithTimeout(r.Context(), queryTimeout)
	defer cancel()
	l, err := cl.Snapshots(ctx, name)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, map[string]any{"server": server, "list": l})
	return nil
}
