package agent

import (
	"bytes"
	"context"
	"errors"
	"io"
	"os"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/doppelha/doppel/daemon/api"
	"github.com/doppelha/doppel/daemon/ha"
	"github.com/doppelha/doppel/daemon/job"
	"github.com/doppelha/doppel/daemon/snapshot/fstest"
)

// failAfter fails every write after the first n (n < 0: never).
type failAfter struct {
	w io.WriterAt
	n *atomic.Int64
}

func (f failAfter) WriteAt(p []byte, off int64) (int, error) {
	if f.n.Load() >= 0 && f.n.Add(-1) < 0 {
		return 0, errors.New("injected write error")
	}
	return f.w.WriteAt(p, off)
}

// TestRollbackFailsNotServed: a failover to a snapshot whose rollback
// fails halfway (a write error after one chunk) neither promotes nor
// serves the half rolled-back volume: the job says rolling-back with the
// snapshot and what to do, a plain failover is refused, a retry that
// fails again changes nothing; the agent, restarted (the marker is in
// the job's state), redoes the rollback, promotes and serves a volume
// byte-identical to the snapshot; the newer data is in the kept
// snapshot. Root: the target's volume is on XFS (reflink snapshots).
func TestRollbackFailsNotServed(t *testing.T) {
	if testing.Short() {
		t.Skip("two agents on XFS: slow tier")
	}
	root := fstest.Mount(t, "xfs")
	var left atomic.Int64
	left.Store(-1)
	p := newPairIn(t, root, ha.FailoverManual, job.ModeSync, 0)
	p.configure = func(name string, a *Agent) {
		if name == "vm2" {
			a.rollbackWrites = func(w io.WriterAt) io.WriterAt { return failAfter{w: w, n: &left} }
		}
	}
	// The seam is read when the rollback runs: restart vm2 to wire it.
	addr2 := p.agents["vm2"].addr
	p.agents["vm2"].stop()
	p.start("vm2", addr2)
	p.waitProtected("vm1")
	ctx := context.Background()

	p.write("vm1", 30)
	if _, err := p.agents["vm2"].client.CreateSnapshot(ctx, "web", api.SnapshotRequest{Name: "s1"}); err != nil {
		t.Fatal(err)
	}
	p.modelMu.Lock()
	atSnap := bytes.Clone(p.model)
	p.modelMu.Unlock()
	p.write("vm1", 60)
	p.modelMu.Lock()
	newer := bytes.Clone(p.model)
	p.modelMu.Unlock()
	if bytes.Equal(atSnap, newer) {
		t.Fatal("no write after the snapshot")
	}

	p.agents["vm1"].stop()
	p.live["vm2"].set("web", false)
	p.waitFor("vm2 sees its source down", func() bool { return p.status("vm2").HA.State == ha.StateSourceDown })
	left.Store(1)
	st, err := p.agents["vm2"].client.Command(ctx, "web", ha.CmdFailover, api.CommandOptions{Snapshot: "s1"})
	t.Logf("failover --snapshot s1 with a write error after one chunk: %v (actions %v)", err, st.Actions)
	notServed := func(when string) {
		t.Helper()
		st := p.status("vm2")
		if st.HA.State != ha.StateRollingBack || st.Data.Device != "" ||
			!strings.Contains(st.HA.Reason, "snapshot s1") || !strings.Contains(st.HA.Reason, "doppel failover web --snapshot s1") {
			t.Fatalf("%s: state %s device %q reason %q: want rolling-back, not served, with what to do", when, st.HA.State, st.Data.Device, st.HA.Reason)
		}
		for _, a := range st.Actions {
			if strings.HasPrefix(a, "promote") || strings.HasPrefix(a, "serve") {
				t.Fatalf("%s: %s done", when, a)
			}
		}
	}
	notServed("after the failed rollback")
	vol, err := os.ReadFile(p.spec.TargetVolume)
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Equal(vol[:pairSize], atSnap) || bytes.Equal(vol[:pairSize], newer) {
		t.Fatal("the failed rollback did not stop halfway: the volume is whole")
	}
	if _, err := p.agents["vm2"].client.Command(ctx, "web", ha.CmdFailover, api.CommandOptions{Force: true}); !api.IsKind(err, "refused") || !strings.Contains(err.Error(), "--snapshot s1") {
		t.Fatalf("a plain failover with the rollback pending: %v", err)
	}
	left.Store(0)
	p.agents["vm2"].client.Command(ctx, "web", ha.CmdFailover, api.CommandOptions{Snapshot: "s1"})
	notServed("after a retry that failed again")
	evs, _ := p.agents["vm2"].client.Events(ctx, "web")
	t.Logf("vm2 events: %v", evs)

	// Restart vm2: the marker is in the job's state; the rollback is
	// redone (the write error is gone), then promoted and served.
	left.Store(-1)
	p.agents["vm2"].stop()
	if rec := readRecord(t, p, "vm2"); rec.HA.RollingBack != "s1" {
		t.Fatalf("vm2's persisted state %s: no pending rollback", rec.HA)
	}
	p.start("vm2", addr2)
	p.waitFor("vm2 serves the rolled back volume", func() bool {
		st := p.status("vm2")
		return st.HA.Role == ha.RoleSource && st.HA.State == ha.StateFailedOver && strings.HasPrefix(st.Data.Device, "unix:")
	})
	if rec := readRecord(t, p, "vm2"); rec.HA.RollingBack != "" {
		t.Fatalf("vm2's persisted state %s: the marker outlived the rollback", rec.HA)
	}
	p.modelMu.Lock()
	p.model = atSnap
	p.modelMu.Unlock()
	p.check("vm2")
	l, err := p.agents["vm2"].client.Snapshots(ctx, "web")
	if err != nil {
		t.Fatal(err)
	}
	kept := ""
	for _, s := range l.Snapshots {
		if s.Kind == "before-rollback" {
			if kept != "" {
				t.Fatalf("more than one before-rollback snapshot (a retry kept the half rolled-back volume): %+v", l.Snapshots)
			}
			kept = s.Location
		}
	}
	img, err := os.ReadFile(kept)
	if err != nil || !bytes.Equal(img[:pairSize], newer) {
		t.Fatalf("the kept snapshot %q does not hold the newer data (%v)", kept, err)
	}
}

// readRecord reads name's persisted record of job web.
func readRecord(t *testing.T, p *pair, name string) job.Record {
	t.Helper()
	s, err := job.OpenStore(p.agents[name].dir)
	if err != nil {
		t.Fatal(err)
	}
	rec, err := s.Get("web")
	if err != nil {
		t.Fatal(err)
	}
	return rec
}
