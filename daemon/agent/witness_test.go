package agent

import (
	"context"
	"crypto/rand"
	"errors"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/doppelha/doppel/daemon/ha"
	"github.com/doppelha/doppel/ebpf/heartbeat"
)

func TestWitnessProtocol(t *testing.T) {
	q := witnessQuery{Job: heartbeatJobID("web"), Token: 0xdeadbeef01020304,
		Addrs: []netip.Addr{netip.MustParseAddr("192.168.0.11"), netip.MustParseAddr("fd00::11")}}
	got, err := parseWitnessQuery(q.String())
	if err != nil || got.String() != q.String() {
		t.Fatalf("round trip: %q -> %+v, %v", q.String(), got, err)
	}
	var w Witness
	if a := w.answer(q, time.Second); a != "NEVER\n" {
		t.Fatalf("unknown source: %q", a)
	}
	w.record(witnessKey{q.Job, q.Addrs[1]}, time.Second)
	w.record(witnessKey{heartbeatJobID("db"), q.Addrs[0]}, 2*time.Second) // another job: not counted
	if a := w.answer(q, 1500*time.Millisecond); a != "HEARD 500\n" {
		t.Fatalf("answer %q, want HEARD 500", a)
	}
	for in, want := range map[string]time.Duration{"HEARD 500\n": 500 * time.Millisecond, "NEVER\n": -1} {
		s, heard, err := parseWitnessReply(in)
		if err != nil || heard != (want >= 0) || (heard && s != want) {
			t.Fatalf("%q: %v %v %v", in, s, heard, err)
		}
	}
	if _, _, err := parseWitnessReply("ERR no\n"); err == nil || !strings.Contains(err.Error(), "no") {
		t.Fatalf("ERR reply: %v", err)
	}
	// Bounded memory.
	for i := range maxWitnessEntries + 10 {
		w.record(witnessKey{job: [16]byte{byte(i), byte(i >> 8)}}, time.Duration(i))
	}
	if len(w.seen) > maxWitnessEntries {
		t.Fatalf("%d entries", len(w.seen))
	}
}

func FuzzWitnessQuery(f *testing.F) {
	q := witnessQuery{Job: heartbeatJobID("web"), Token: 7, Addrs: []netip.Addr{netip.MustParseAddr("10.0.0.1")}}
	f.Add(q.String())
	f.Add("DOPPEL-WITNESS 1 00 00 1.2.3.4\n")
	f.Add("DOPPEL-WITNESS 1 " + strings.Repeat("a", 32) + " ffffffffffffffff ::1,::2\n")
	f.Add("HEARD 12\n")
	f.Add("NEVER\n")
	f.Fuzz(func(t *testing.T, in string) {
		if q, err := parseWitnessQuery(in); err == nil {
			if _, err := parseWitnessQuery(q.String()); err != nil {
				t.Fatalf("%q parsed, its re-encoding %q does not: %v", in, q.String(), err)
			}
		} else if !errors.Is(err, errWitness) {
			t.Fatalf("error %v does not wrap errWitness", err)
		}
		parseWitnessReply(in)
	})
}

// startWitness runs a witness on loopback: heartbeats on a UDP port, queries
// on a TCP port.
func startWitness(t *testing.T) (hb netip.AddrPort, query string) {
	w := &Witness{Log: slog.New(slog.DiscardHandler)}
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{}, 2)
	go func() { w.ServeHeartbeats(ctx, pc); done <- struct{}{} }()
	go func() { w.ServeQueries(ctx, l); done <- struct{}{} }()
	t.Cleanup(func() { cancel(); <-done; <-done })
	return netip.MustParseAddrPort(pc.LocalAddr().String()), l.Addr().String()
}

// TestWitnessVoteAgents: two agents replicate in auto mode with a witness.
// The target stops hearing its source while the witness still does (a
// partition between source and target): no failover, status says why.
// Once the witness loses the source too, the target fails over.
func TestWitnessVoteAgents(t *testing.T) {
	if testing.Short() {
		t.Skip("short: replicates")
	}
	root := t.TempDir()
	os.WriteFile(filepath.Join(root, "mountinfo"), nil, 0o644)
	live2 := &memLiveness{alive: map[string]bool{"web": true}, n: map[string]uint64{}}
	log := slog.New(slog.DiscardHandler)
	start := func(name string, live Liveness, repl string) *testAgent {
		vols := &NBDVolumes{Log: log, RunDir: filepath.Join(root, name, "run")}
		return startAgentWith(t, filepath.Join(root, name), "127.0.0.1:0", Subsystems{Liveness: live, Volumes: vols}, func(a *Agent) {
			planes := &ReplPlanes{Log: log, Cert: a.Identity.Cert, ReplListen: repl, StateDir: filepath.Join(root, name)}
			a.Subsystems.DataPlane = planes.Open
		})
	}
	r1, r2 := freePort(t), freePort(t)
	a1 := start("vm1", &memLiveness{alive: map[string]bool{"web": true}, n: map[string]uint64{}}, r1)
	a2 := start("vm2", live2, r2)
	hbAddr, queryAddr := startWitness(t)
	ctx := context.Background()
	e1, e2 := endpoint("vm1", a1), endpoint("vm2", a2)
	e1.Repl, e2.Repl = r1, r2
	spec := testSpec(t, e1, e2)
	spec.Witness = queryAddr
	spec.Volume = filepath.Join(root, "vol1.img")
	spec.TargetVolume = filepath.Join(root, "vol2.img")
	data := make([]byte, 256<<10)
	rand.Read(data)
	os.WriteFile(spec.Volume, append(data, make([]byte, int(spec.Size)-len(data))...), 0o600)
	spec.Size = 0
	if _, err := a1.client.CreateJob(ctx, spec); err != nil {
		t.Fatal(err)
	}
	spec.Size = 4 << 20
	if _, err := a2.client.CreateJob(ctx, spec); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "replicating", func() bool {
		st, _ := a2.client.Job(ctx, "web")
		return st.HA.State == ha.StateReplicating && st.HA.Consistent
	})
	// The source's heartbeats to the witness (memLiveness sends none).
	key, err := heartbeat.DeriveKey(spec.Secret, "web", "vm1")
	if err != nil {
		t.Fatal(err)
	}
	s, err := heartbeat.NewSender(heartbeat.SenderConfig{Job: heartbeat.JobIDOf("web"), Key: key, Incarnation: 1, Dests: []heartbeat.Dest{{Remote: hbAddr}}})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	hctx, stopHB := context.WithCancel(ctx)
	hbDone := make(chan struct{})
	go func() { s.Run(hctx, spec.Monitor.Interval, 0, nil); close(hbDone) }()
	defer func() { stopHB(); <-hbDone }()

	live2.set("web", false) // partition: the target no longer hears its source
	waitFor(t, "source-down held by the witness", func() bool {
		st, _ := a2.client.Job(ctx, "web")
		return st.HA.State == ha.StateSourceDown && strings.Contains(st.HA.Reason, "witness heard it")
	})
	time.Sleep(time.Second)
	if st, _ := a2.client.Job(ctx, "web"); st.HA.State != ha.StateSourceDown || st.HA.Role != ha.RoleTarget {
		t.Fatalf("failed over while the witness hears the source: %s %s %q", st.HA.Role, st.HA.State, st.HA.Reason)
	}
	// The source dies: the witness loses it too.
	a1.stop()
	stopHB()
	<-hbDone
	gone := time.Now()
	waitFor(t, "failover once the witness lost the source", func() bool {
		st, _ := a2.client.Job(ctx, "web")
		return st.HA.State == ha.StateFailedOver
	})
	timeout := spec.Monitor.Interval * time.Duration(spec.Monitor.Missed)
	took := time.Since(gone)
	t.Logf("failed over %v after the witness stopped hearing the source (timeout %v, re-asked every 500 ms)", took.Round(time.Millisecond), timeout)
	if took < timeout-spec.Monitor.Interval {
		t.Fatalf("failed over %v after the source's last heartbeat to the witness: before the timeout %v", took, timeout)
	}
}
