package agent

import (
	"io"
	"log/slog"
	"net/netip"
	"testing"
	"time"

	"github.com/doppelha/doppel/daemon/monitor"
	"github.com/doppelha/doppel/ebpf/heartbeat"
)

// probeLivenessPair is two agents' real liveness on loopback: each with a
// userspace probe listening on its own port and sending to the other's.
func probeLivenessPair(t *testing.T) (live1, live2 *ProbeLiveness) {
	t.Helper()
	p1, p2 := freeUDPPort(t), freeUDPPort(t)
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	open := func(listen, peer uint16, inc uint64) *ProbeLiveness {
		pr, err := heartbeat.Open(heartbeat.Config{Mode: heartbeat.ModeUserspace, Port: listen, Logger: log})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { pr.Close() })
		return &ProbeLiveness{Log: log, Probe: pr, Port: peer, Incarnation: inc}
	}
	return open(p1, p2, 1000), open(p2, p1, 2000)
}

// TestLivenessJobsIndependent: two jobs between the same two hosts, with
// real probes. Each job's liveness is its own heartbeats': unwatching a
// job on both sides leaves the other counting; a job whose peer stops
// sending its heartbeats (deleted on that side only) goes silent while
// its sibling, same addresses, keeps counting. (With one heartbeat token
// per peer address, the sibling's heartbeats were rejected, or the
// silent job lived on its sibling's heartbeats.)
func TestLivenessJobsIndependent(t *testing.T) {
	live1, live2 := probeLivenessPair(t)
	lo := netip.MustParseAddr("127.0.0.1")
	interval := 20 * time.Millisecond
	watch := func(l *ProbeLiveness, job, self, peer string) {
		t.Helper()
		err := l.Watch(LivenessWatch{Job: job, Self: self, Peer: peer, Secret: "secret of " + job, Interval: interval,
			Paths: map[string]PathAddrs{"repl": {Local: lo, Peer: lo}}})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { l.Unwatch(job) })
	}
	for _, j := range []string{"alpha", "beta", "gamma"} {
		watch(live1, j, "vm1", "vm2")
		watch(live2, j, "vm2", "vm1")
	}
	sample := func(l *ProbeLiveness, job string) monitor.Sample {
		t.Helper()
		s, err := l.Sample(job, "repl")
		if err != nil {
			t.Fatalf("sample %s: %v", job, err)
		}
		return s
	}
	counting := func(l *ProbeLiveness, job string) bool {
		a := sample(l, job)
		time.Sleep(5 * interval)
		b := sample(l, job)
		return b.Packets >= a.Packets+2 && b.LastSeen > a.LastSeen
	}
	waitFor(t, "every job counted both ways", func() bool {
		for _, j := range []string{"alpha", "beta", "gamma"} {
			if sample(live1, j).Packets < 3 || sample(live2, j).Packets < 3 {
				return false
			}
		}
		return true
	})
	// gamma deleted on both sides: the others keep counting.
	live2.Unwatch("gamma")
	live1.Unwatch("gamma")
	for _, j := range []string{"alpha", "beta"} {
		if !counting(live2, j) || !counting(live1, j) {
			t.Fatalf("%s stopped counting when gamma was deleted", j)
		}
	}
	// alpha (the oldest) deleted on vm1 only: vm2 no longer hears alpha,
	// and still hears beta.
	live1.Unwatch("alpha")
	time.Sleep(3 * interval)
	if counting(live2, "alpha") {
		t.Fatal("vm2 still counts alpha heartbeats after vm1 stopped sending them: another job's heartbeats keep it alive")
	}
	if !counting(live2, "beta") {
		t.Fatal("vm2 stopped counting beta when vm1 deleted alpha")
	}
}

// TestLivenessPerJobEpochAndKeys: each job's heartbeats carry its own
// epoch (SetEpoch) to the peer's sample, and a job watched with another
// secret on one side never counts the other side's heartbeats.
func TestLivenessPerJobEpochAndKeys(t *testing.T) {
	live1, live2 := probeLivenessPair(t)
	lo := netip.MustParseAddr("127.0.0.1")
	w := func(job, self, peer, secret string) LivenessWatch {
		return LivenessWatch{Job: job, Self: self, Peer: peer, Secret: secret, Interval: 20 * time.Millisecond, Epoch: 1,
			Paths: map[string]PathAddrs{"repl": {Local: lo, Peer: lo, Session: true}}}
	}
	for _, x := range []struct {
		l *ProbeLiveness
		w LivenessWatch
	}{
		{live1, w("web", "vm1", "vm2", "s1")}, {live2, w("web", "vm2", "vm1", "s1")},
		{live1, w("db", "vm1", "vm2", "s2")}, {live2, w("db", "vm2", "vm1", "other secret")},
	} {
		if err := x.l.Watch(x.w); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { x.l.Unwatch(x.w.Job) })
	}
	live1.SetEpoch("web", 7)
	waitFor(t, "vm2 reads epoch 7 in web's heartbeats", func() bool {
		s, err := live2.Sample("web", "repl")
		return err == nil && s.PeerEpoch == 7
	})
	if s, _ := live1.Sample("web", "repl"); s.PeerEpoch != 1 || s.Packets == 0 {
		t.Fatalf("vm1's sample of web: %+v, want vm2's heartbeats at epoch 1", s)
	}
	// db: the two sides disagree on the secret, so neither counts the
	// other's heartbeats (they are bad MACs).
	for _, l := range []*ProbeLiveness{live1, live2} {
		if s, _ := l.Sample("db", "repl"); s.Packets != 0 || s.LastSeen != 0 {
			t.Fatalf("db counted heartbeats under the wrong key: %+v", s)
		}
	}
	// The session path also counts the replication session's frames.
	rec := live2.SessionRecorder("db")
	rec()
	rec()
	if s, _ := live2.Sample("db", "repl"); s.Packets != 2 || s.LastSeen == 0 {
		t.Fatalf("db's session frames not in its sample: %+v", s)
	}
}
