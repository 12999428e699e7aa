package agent

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"sync/atomic"
	"testing"
	"time"

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

// TestInterruptedResyncFailoverToPreResync: the target is away long
// enough that the source tracks its writes in the bitmap; when it comes
// back, it takes its automatic before-resync snapshot and turns
// inconsistent; the resync (rate-limited so that it has a middle) is cut
// halfway by killing the source's agent. A plain failover of the
// inconsistent target is refused and points at --snapshot; the failover
// to the automatic snapshot promotes exactly what the source held before
// the outage (every write acknowledged until then, compared byte for
// byte and by checksum); the target serves it and takes writes; the old
// source comes back fenced, the reverse resyncs changed chunks only and
// verify finds 0 differing chunks, and so does the failback, after
// which the home holds the snapshot's data plus the writes made on the
// target. Root: the volumes are on XFS (reflink snapshots).
func TestInterruptedResyncFailoverToPreResync(t *testing.T) {
	if testing.Short() {
		t.Skip("two agents on XFS: slow tier")
	}
	root := fstest.Mount(t, "xfs")
	// A small queue (4 MiB in memory, none on disk), so that the outage
	// overflows it into the bitmap, and a rate limit, so that the resync
	// has a middle: both set as the job's options.
	p := newPairIn(t, root, ha.FailoverManual, job.ModeAsync, 0, func(s *job.Spec) {
		s.QueueMemory, s.QueueDisk, s.RateLimit = job.MinQueue, -1, 256<<10
		s.Monitor = job.Monitor{Interval: 250 * time.Millisecond, Missed: 8}
	})
	ctx := context.Background()
	addr1, addr2 := p.agents["vm1"].addr, p.agents["vm2"].addr

	p.write("vm1", 40)
	p.waitProtected("vm1")
	// Async and rate-limited: the target lags; the outage starts once it
	// holds every write.
	p.waitFor("vm2 holds every write", func() bool {
		d := p.status("vm1").Data
		return d.QueueMemory == 0 && d.QueueDisk == 0 && d.DirtyBytes == 0 && d.RPO == 0
	})
	p.verify("vm1")
	p.modelMu.Lock()
	beforeOutage := bytes.Clone(p.model)
	p.modelMu.Unlock()
	sum := func(b []byte) string { return fmt.Sprintf("%x", sha256.Sum256(b)) }
	t.Logf("before the outage: sha256 %s", sum(beforeOutage))
	list := func(name string) []api.SnapshotInfo {
		t.Helper()
		l, err := p.agents[name].client.Snapshots(ctx, "web")
		if err != nil {
			t.Fatal(err)
		}
		return l.Snapshots
	}
	seen := map[string]bool{}
	for _, s := range list("vm2") {
		seen[s.Name] = true
	}

	// The target goes away; the source writes on, tracked in its bitmap.
	p.agents["vm2"].stop()
	outage := p.writeIn("vm1", 250, pairSize/2)
	dirty := p.status("vm1").Data.DirtyBytes
	if dirty == 0 {
		t.Fatal("the outage's writes fit in the queue: nothing to resync")
	}
	p.modelMu.Lock()
	afterOutage := bytes.Clone(p.model)
	p.modelMu.Unlock()
	if bytes.Equal(beforeOutage, afterOutage) {
		t.Fatal("no write during the outage")
	}

	// It comes back: automatic snapshot, inconsistent, resync under way.
	p.start("vm2", addr2)
	p.waitFor("vm2 resyncing, inconsistent", func() bool {
		st, src := p.status("vm2"), p.status("vm1")
		return !st.HA.Consistent && src.Data.DirtyBytes > 0 && src.Data.DirtyBytes < dirty
	})
	pre := ""
	for _, s := range list("vm2") {
		if s.Kind == "before-resync" && !seen[s.Name] {
			pre = s.Name
		}
	}
	if pre == "" {
		t.Fatalf("no automatic before-resync snapshot taken when vm2 came back: %+v", list("vm2"))
	}
	t.Logf("resync cut with %d of %d dirty bytes left; automatic snapshot %s", p.status("vm1").Data.DirtyBytes, dirty, pre)

	// The resync is cut: the source's agent is killed.
	p.agents["vm1"].stop()
	p.live["vm2"].set("web", false)
	p.waitFor("vm2 sees its source down", func() bool { return p.status("vm2").HA.State == ha.StateSourceDown })
	if st := p.status("vm2"); st.HA.Consistent {
		t.Fatal("vm2 is consistent after a resync cut halfway")
	}
	_, err := p.agents["vm2"].client.Command(ctx, "web", ha.CmdFailover, api.CommandOptions{})
	if !api.IsKind(err, "refused") || !strings.Contains(err.Error(), "inconsistent") || !strings.Contains(err.Error(), "--snapshot S") {
		t.Fatalf("plain failover of the inconsistent target: %v", err)
	}
	if st := p.status("vm2"); st.HA.Role != ha.RoleTarget || st.Data.Device != "" {
		t.Fatalf("the refused failover moved vm2: %s %s %q", st.HA.Role, st.HA.State, st.Data.Device)
	}
	p.command("vm2", ha.CmdFailover, api.CommandOptions{Snapshot: pre})
	p.waitFor("vm2 serves the pre-resync point", func() bool {
		st := p.status("vm2")
		return st.HA.Role == ha.RoleSource && st.HA.State == ha.StateFailedOver && strings.HasPrefix(st.Data.Device, "unix:")
	})
	c := p.nbd("vm2")
	got := make([]byte, pairSize)
	for off := 0; off < pairSize; off += 1 << 20 {
		if _, err := c.ReadAt(got[off:off+1<<20], int64(off)); err != nil {
			t.Fatal(err)
		}
	}
	c.Close()
	p.waitFor("the reader gone from vm2", func() bool { return len(p.status("vm2").Data.Users) == 0 })
	// The snapshot is the target's image when it came back: what the
	// source held before the outage (its checksum). The search over the
	// prefixes of the outage's writes says what the image is otherwise.
	at := bytes.Clone(beforeOutage)
	k := -1
	for i := 0; i <= len(outage); i++ {
		if bytes.Equal(got, at) {
			k = i
			break
		}
		if i < len(outage) {
			copy(at[outage[i].off:], outage[i].data)
		}
	}
	if k < 0 {
		const ck = 64 << 10
		for c := 0; c < pairSize/ck; c++ {
			g := got[c*ck : (c+1)*ck]
			b, a := bytes.Equal(g, beforeOutage[c*ck:(c+1)*ck]), bytes.Equal(g, afterOutage[c*ck:(c+1)*ck])
			if !b || !a {
				t.Logf("chunk %d: before %t after %t", c, b, a)
			}
		}
		t.Fatalf("vm2 serves sha256 %s: no point of the source's history (before the outage %s, after it %s, nor any prefix of the %d writes between)",
			sum(got), sum(beforeOutage), sum(afterOutage), len(outage))
	}
	t.Logf("vm2 serves sha256 %s: the source's content before the outage plus the first %d of the %d writes made during it (before the outage: %s)", sum(got), k, len(outage), sum(beforeOutage))
	if k != 0 {
		// The snapshot is taken when the target comes back, before it
		// applies anything: the queue overflowed, so every write of the
		// outage is resynced, none replayed first.
		t.Fatalf("vm2 serves the source's content before the outage plus %d of its writes, want none: not the snapshot's point", k)
	}
	p.modelMu.Lock()
	p.model = bytes.Clone(got)
	p.modelMu.Unlock()
	p.writeIn("vm2", 20, pairSize/2)

	// The old source comes back fenced; the reverse and the failback.
	p.start("vm1", addr1)
	p.live["vm2"].set("web", true)
	p.waitFor("vm1 back and fenced", func() bool { return p.status("vm1").HA.State == ha.StateSuperseded })
	p.commandWhen("vm2", ha.CmdReverse, api.CommandOptions{})
	p.waitProtected("vm2")
	p.verify("vm2")
	if n := p.status("vm1").Data.AppliedBytes; n <= 0 || n >= pairSize {
		t.Fatalf("the reverse applied %d bytes on vm1, want changed chunks only (0 < n < %d)", n, pairSize)
	} else {
		t.Logf("the reverse applied %d of %d bytes on vm1", n, pairSize)
	}
	p.check("vm2")
	p.commandWhen("vm2", ha.CmdFailback, api.CommandOptions{})
	p.waitProtected("vm1")
	p.verify("vm1")
	p.check("vm1")
}
