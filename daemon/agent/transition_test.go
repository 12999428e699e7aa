package agent

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/doppelha/doppel/blockdev"

	"github.com/doppelha/doppel/daemon/api"
	"github.com/doppelha/doppel/daemon/ha"
	"github.com/doppelha/doppel/daemon/job"
)

// TestPromotedAfterFailbackAcceptsWrites: a failback quiesces the source
// that hands the role back; when that host is later promoted again (here
// by a forced failover), its volume must take writes. The quiesce used to
// outlive the handover, so every write of the promoted host failed (EIO).
func TestPromotedAfterFailbackAcceptsWrites(t *testing.T) {
	p := newPair(t, ha.FailoverManual)
	p.write("vm1", 32)
	p.command("vm2", ha.CmdFailover, api.CommandOptions{Force: true})
	p.waitFor("vm1 fenced", func() bool { return p.status("vm1").HA.State == ha.StateSuperseded })
	p.write("vm2", 32)
	p.commandWhen("vm2", ha.CmdReverse, api.CommandOptions{})
	p.waitProtected("vm2")
	p.write("vm2", 32)
	p.command("vm2", ha.CmdFailback, api.CommandOptions{})
	p.waitProtected("vm1") // vm2 was quiesced, handed over, is the target
	p.write("vm1", 32)
	p.verify("vm1")
	p.command("vm2", ha.CmdFailover, api.CommandOptions{Force: true})
	p.waitFor("vm2 serving", func() bool { return p.status("vm2").Data.Device != "" })
	p.write("vm2", 32)
	p.check("vm2")
}

// TestTransitionSequence drives one job through every role change, in both
// directions, with two real agents: failover (the source killed, then
// forced with the source alive), reverse, failback, switchover. Before and
// after every step it writes through the active source's served volume;
// after every step both sides' persisted flags must be those of their role
// (no quiesce, failed-over, superseded, paused, alone or handing-over left
// behind), the epoch must have grown, the active source's volume must hold
// every acknowledged write, and doppel verify must find 0 differences.
// During each planned step a writer keeps writing to the old source until
// its volume stops being served there: writes held by the quiesce are
// never acknowledged, every acknowledged one is on the new source.
func TestTransitionSequence(t *testing.T) {
	p := newPair(t, ha.FailoverManual)
	src := "vm1" // the active source
	epoch := p.status(src).HA.Epoch
	settle := func(step string) {
		t.Helper()
		p.waitProtected(src)
		st := p.status(src)
		if st.HA.Epoch <= epoch {
			t.Fatalf("%s: epoch %d, was %d before", step, st.HA.Epoch, epoch)
		}
		epoch = st.HA.Epoch
		p.checkFlags(src)
		p.check(src)
		p.write(src, 16)
		p.verify(src)
		p.check(src)
		t.Logf("%-15s %s source, epoch %d", step, src, epoch)
	}
	failoverKill := func() {
		tgt := peerOf(src)
		addr := p.agents[src].addr
		p.agents[src].stop() // the source dies: agent gone, heartbeats stop
		p.live[tgt].set("web", false)
		p.waitFor(tgt+" source-down", func() bool { return p.status(tgt).HA.State == ha.StateSourceDown })
		p.command(tgt, ha.CmdFailover, api.CommandOptions{})
		p.waitFor(tgt+" serving", func() bool { return p.status(tgt).Data.Device != "" })
		p.check(tgt) // sync mode: every acknowledged write survived the failover
		p.write(tgt, 16)
		p.live[tgt].set("web", true)
		p.start(src, addr)
		p.waitFor(src+" fenced", func() bool { return p.status(src).HA.State == ha.StateSuperseded })
		// It heard the new source before its start grace ran out: it
		// never served alone (which the reason would call split brain).
		if r := p.status(src).HA.Reason; strings.Contains(r, "split brain") {
			t.Fatalf("the restarted old source %s served alone: %s", src, r)
		}
		src = tgt
	}
	failoverForce := func() {
		tgt := peerOf(src)
		p.command(tgt, ha.CmdFailover, api.CommandOptions{Force: true})
		p.waitFor(src+" fenced", func() bool { return p.status(src).HA.State == ha.StateSuperseded })
		p.check(tgt)
		p.write(tgt, 16)
		src = tgt
	}
	reverse := func() {
		p.commandWhen(src, ha.CmdReverse, api.CommandOptions{})
		// reverse keeps the epoch: the failover gave the new one.
		epoch--
		settle("reverse")
	}
	planned := func(cmd ha.EventType) func() {
		return func() {
			stop := make(chan struct{})
			acked := p.writer(src, stop)
			time.Sleep(20 * time.Millisecond)
			p.command(src, cmd, api.CommandOptions{})
			src = peerOf(src)
			p.waitProtected(src)
			close(stop)
			if n := <-acked; n == 0 {
				t.Fatalf("%s: the writer got no write acknowledged before the switchover", cmd)
			}
			settle(string(cmd))
		}
	}
	steps := []struct {
		name string
		do   func()
	}{
		{"failover", failoverKill}, {"reverse", reverse}, {"failback", planned(ha.CmdFailback)},
		{"switchover", planned(ha.CmdSwitchover)}, {"switchover", planned(ha.CmdSwitchover)},
		{"failover", failoverForce}, {"reverse", reverse}, {"failback", planned(ha.CmdFailback)},
		{"switchover", planned(ha.CmdSwitchover)},
		{"failover", failoverKill}, {"reverse", reverse}, {"switchover", planned(ha.CmdSwitchover)},
		{"failback", planned(ha.CmdFailback)}, {"switchover", planned(ha.CmdSwitchover)},
		{"switchover", planned(ha.CmdSwitchover)},
	}
	start := time.Now()
	for _, s := range steps {
		p.write(src, 16)
		s.do()
		if s.name == "failover" {
			t.Logf("%-15s %s serves, epoch %d", s.name, src, p.status(src).HA.Epoch)
		}
	}
	if src != "vm1" {
		t.Fatalf("the sequence ends on %s, want home vm1", src)
	}
	t.Logf("%d transitions in %v", len(steps), time.Since(start).Round(time.Millisecond))
}

// checkFlags: both sides' persisted states are exactly those of their
// roles in a protected job.
func (p *pair) checkFlags(src string) {
	p.t.Helper()
	for _, name := range []string{src, peerOf(src)} {
		rec, err := p.agents[name].a.Store.Get("web")
		if err != nil {
			p.t.Fatal(err)
		}
		want := ha.HardState{Role: ha.RoleTarget, Epoch: rec.HA.Epoch, Consistent: true}
		if name == src {
			want.Role = ha.RoleSource
		}
		if rec.HA != want {
			p.t.Fatalf("%s persisted %v, want %v", name, rec.HA, want)
		}
	}
}

// TestAsyncSwitchoverDrains: in async mode a write is acknowledged before
// the target has it; a switchover must still lose none. With the target's
// link slowed (a rate limit on the source), each switchover starts with
// writes queued, holds new ones, drains the queue, and only then swaps.
func TestAsyncSwitchoverDrains(t *testing.T) {
	p := newPairWith(t, ha.FailoverManual, job.ModeAsync, 4<<20)
	src := "vm1"
	for i, cmd := range []ha.EventType{ha.CmdSwitchover, ha.CmdFailback, ha.CmdSwitchover, ha.CmdSwitchover} {
		p.write(src, 64)
		stop := make(chan struct{})
		acked := p.writer(src, stop)
		time.Sleep(20 * time.Millisecond)
		p.command(src, cmd, api.CommandOptions{})
		src = peerOf(src)
		p.waitProtected(src)
		close(stop)
		n := <-acked
		if d := p.status(src).Data; d.QueueMemory+d.QueueDisk > 0 {
			t.Logf("queue %d bytes", d.QueueMemory+d.QueueDisk)
		}
		p.checkFlags(src)
		p.check(src)
		p.verify(src)
		t.Logf("%d: %s to %s, %d writes acknowledged during it", i, cmd, src, n)
	}
}

// TestQuiesceHoldsWrites: a quiesce holds writes instead of failing them.
// A quiesce that ends without a switchover (ResumeWrites) lets them go on;
// one that ends with the source closed (the switchover happened) fails
// them without writing anything here; a source opened later takes writes.
func TestQuiesceHoldsWrites(t *testing.T) {
	root := t.TempDir()
	tgtListen := freePort(t)
	src := newPlaneSide(t, root, "vm1", freePort(t))
	tgt := newPlaneSide(t, root, "vm2", tgtListen)
	proxy := newStallProxy(t, tgtListen)
	spec := job.Spec{Name: "db", Mode: job.ModeAsync, Size: 4 << 20,
		Volume: filepath.Join(root, "vol1.img"), TargetVolume: filepath.Join(root, "vol2.img"),
		Source: job.Endpoint{Name: "vm1", Repl: src.planes.ReplListen, Fingerprint: src.fp},
		Target: job.Endpoint{Name: "vm2", Repl: proxy.addr(), Fingerprint: tgt.fp}}
	dt := tgt.open(t, spec, "vm2")
	if err := dt.StartTarget(context.Background()); err != nil {
		t.Fatal(err)
	}
	ds := src.open(t, spec, "vm1")
	m := ds.Mutator()
	if err := ds.StartSource(context.Background()); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "source synced", func() bool {
		s, _ := ds.source()
		st := s.Status()
		return st.Synced && st.Connected && !st.ResyncActive
	})
	apply := func(off int64, b []byte) chan error {
		ch := make(chan error, 1)
		go func() {
			ch <- m.Apply(context.Background(), &blockdev.Mutation{Op: blockdev.OpWrite, Offset: off, Length: int64(len(b)), Data: b})
		}()
		return ch
	}
	pending := func(ch chan error, what string) {
		t.Helper()
		select {
		case err := <-ch:
			t.Fatalf("%s: the write returned (%v) while writes are held", what, err)
		case <-time.After(200 * time.Millisecond):
		}
	}
	// Queued writes the stalled target does not have: the drain waits.
	proxy.stalled.Store(true)
	for i := range 4 {
		writeAt(t, m, int64(i)<<16, 64<<10)
	}
	drain := make(chan error, 1)
	go func() { drain <- ds.Quiesce(context.Background()) }()
	waitFor(t, "writes held", func() bool { return ds.held() != nil })
	held := apply(1<<20, bytes.Repeat([]byte{1}, 4096))
	pending(held, "quiesced, target stalled")
	// No switchover after all: the held write goes on, the drain ends.
	if err := ds.ResumeWrites(); err != nil {
		t.Fatal(err)
	}
	if err := <-held; err != nil {
		t.Fatalf("held write after resume: %v", err)
	}
	if err := <-drain; !errors.Is(err, context.Canceled) {
		t.Fatalf("drain after resume: %v, want canceled", err)
	}
	// Again, and this time the target catches up: the drain completes
	// with every acknowledged write on the target.
	go func() { drain <- ds.Quiesce(context.Background()) }()
	waitFor(t, "writes held", func() bool { return ds.held() != nil })
	held = apply(2<<20, bytes.Repeat([]byte{2}, 4096))
	pending(held, "quiesced again")
	proxy.stalled.Store(false)
	if err := <-drain; err != nil {
		t.Fatalf("drain: %v", err)
	}
	want, _ := os.ReadFile(spec.Volume)
	got, _ := os.ReadFile(spec.TargetVolume)
	if !bytes.Equal(want[:1<<20+4096], got[:1<<20+4096]) {
		t.Fatal("drained, but the target lacks acknowledged writes")
	}
	pending(held, "drained")
	// The switchover happens: the source closes, the held write fails
	// and was never written here.
	if err := ds.StopSource(); err != nil {
		t.Fatal(err)
	}
	if err := <-held; err == nil {
		t.Fatal("a write held across the switchover was acknowledged")
	}
	if b, _ := os.ReadFile(spec.Volume); b[2<<20] == 2 {
		t.Fatal("a write held across the switchover reached the volume")
	}
	// Promoted again later: a new source takes writes.
	m = ds.Mutator()
	if err := <-apply(3<<20, bytes.Repeat([]byte{3}, 4096)); err != nil {
		t.Fatalf("write after a new source opened: %v", err)
	}
}
