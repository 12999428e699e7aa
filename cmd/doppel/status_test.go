package main

import (
	"bytes"
	"encoding/json"
	"flag"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/doppelha/doppel/daemon/agent"
	"github.com/doppelha/doppel/daemon/api"
	"github.com/doppelha/doppel/daemon/client"
	"github.com/doppelha/doppel/daemon/ha"
	"github.com/doppelha/doppel/daemon/job"
	"github.com/doppelha/doppel/daemon/monitor"
	"github.com/doppelha/doppel/daemon/protection"
	"github.com/doppelha/doppel/ebpf/heartbeat"
)

var update = flag.Bool("update", false, "rewrite testdata/*.golden with the actual output")

// golden compares got with testdata/NAME.golden (-update rewrites it).
func golden(t *testing.T, name, got string) {
	t.Helper()
	path := filepath.Join("testdata", name+".golden")
	if *update {
		os.MkdirAll("testdata", 0o755)
		if err := os.WriteFile(path, []byte(got), 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (run go test -update to create it)", err)
	}
	if got != string(want) {
		t.Errorf("%s differs (go test -update rewrites it):\n--- got\n%s\n--- want\n%s", path, got, want)
	}
}

func statusOf(server string, role ha.Role, state ha.State, epoch uint64) *api.JobStatus {
	spec := job.Spec{Name: "web", Source: job.Endpoint{Name: "vm1"}, Target: job.Endpoint{Name: "vm2"}, Volume: "/dev/vdb", TargetVolume: "/dev/vdc",
		Mode: "sync", Failover: ha.FailoverAuto, ServiceIPs: []job.ServiceIP{{Prefix: "172.17.22.187/24", Iface: "eth0"}}}
	st := &api.JobStatus{Spec: spec, Self: server,
		HA: ha.Status{Role: role, State: state, Epoch: epoch, Consistent: true, LinkUp: true,
			Paths: []ha.PathStatus{{Name: "repl", Up: true}, {Name: "app", Up: true}}},
		Probe: api.ProbeStatus{Mode: "xdp-generic", Interval: 250 * time.Millisecond, Missed: 8, TimeToFail: -1, Active: true},
		Data:  api.DataStatus{Known: true, RPO: -1}}
	if role == ha.RoleSource {
		st.Data.RPO = 0
		st.Data.Device = "/dev/nbd0"
	}
	return st
}

// TestRenderStatus: golden renders of job status. After a reverse or a
// switchover the header, the direction and the order of the sides follow
// the real roles (vm2 serves, vm1 receives), not the job's creation.
func TestRenderStatus(t *testing.T) {
	at := time.Date(2026, 1, 1, 12, 0, 0, 0, time.UTC)
	render := func(views []client.Side, rates syncRates) string {
		var b bytes.Buffer
		renderStatus(&b, client.Assess(views), views, rates, at, false)
		return b.String()
	}
	// A mirror in progress, with the rate --watch measured.
	src := statusOf("vm1", ha.RoleSource, ha.StateMirroring, 1)
	src.Data.SyncTotal, src.Data.SyncDone, src.Data.BytesRemaining = 4<<30, 1<<30, 3<<30
	tgt := statusOf("vm2", ha.RoleTarget, ha.StateMirroring, 1)
	tgt.HA.Consistent = false
	golden(t, "status_mirroring", render([]client.Side{{Server: "vm1", Status: src}, {Server: "vm2", Status: tgt}},
		syncRates{"vm1": {rate: 100 << 20}}))

	// Protected the other way after a reverse and resync: vm2 -> vm1.
	vm1 := statusOf("vm1", ha.RoleTarget, ha.StateReplicating, 2)
	vm2 := statusOf("vm2", ha.RoleSource, ha.StateReplicating, 2)
	out := render([]client.Side{{Server: "vm1", Status: vm1}, {Server: "vm2", Status: vm2}}, nil)
	if !strings.Contains(out, "job web  vm2:/dev/vdc -> vm1:/dev/vdb") {
		t.Errorf("after a reverse the header shows the creation direction:\n%s", out)
	}
	golden(t, "status_reversed", out)

	// Failed over, the old source back and fenced; the target unreachable
	// variant has no advice (no command would succeed).
	old := statusOf("vm1", ha.RoleSource, ha.StateSuperseded, 1)
	old.HA.Reason, old.Data.Device = "superseded by vm2, run doppel reverse", ""
	fo := statusOf("vm2", ha.RoleSource, ha.StateFailedOver, 2)
	fo.HA.LinkUp = false
	golden(t, "status_failed_over", render([]client.Side{{Server: "vm1", Status: old}, {Server: "vm2", Status: fo}}, nil))
	out = render([]client.Side{{Server: "vm1", Err: "dial tcp 10.0.0.1:6320: connect: connection refused"}, {Server: "vm2", Status: fo}}, nil)
	if strings.Contains(out, "next:") {
		t.Errorf("advice printed although no command would succeed:\n%s", out)
	}
}

// TestWatchRedraw: on a terminal --watch redraws in place (cursor home,
// every line cleared to its end, the rest of the screen cleared) instead
// of clearing the screen (flicker); elsewhere frames follow each other.
func TestWatchRedraw(t *testing.T) {
	var b bytes.Buffer
	var s watchScreen
	s.draw(&b, []byte("a\nbb\n"), true)
	s.draw(&b, []byte("c\n"), true)
	if got, want := b.String(), "\033[Ha\033[K\nbb\033[K\n\033[J\033[Hc\033[K\n\033[J"; got != want {
		t.Errorf("tty frames %q, want %q", got, want)
	}
	b.Reset()
	s = watchScreen{}
	s.draw(&b, []byte("a\n"), false)
	s.draw(&b, []byte("b\n"), false)
	if got := b.String(); got != "a\n\nb\n" {
		t.Errorf("non-tty frames %q", got)
	}
	r := syncRates{}
	mk := func(done int64) []client.Side {
		st := statusOf("vm1", ha.RoleSource, ha.StateMirroring, 1)
		st.Data.SyncTotal, st.Data.SyncDone = 1<<30, done
		return []client.Side{{Server: "vm1", Status: st}}
	}
	t0 := time.Unix(0, 0)
	r.observe(mk(0), t0)
	r.observe(mk(100<<20), t0.Add(time.Second))
	if got := r["vm1"].rate; got != 100<<20 {
		t.Errorf("rate %v, want 100 MiB/s", got)
	}
}

// liveAlways is a probe that always hears the peer.
type liveAlways struct {
	mu sync.Mutex
	n  uint64
}

func (l *liveAlways) Watch(agent.LivenessWatch) error { return nil }
func (l *liveAlways) Unwatch(string)                  {}
func (l *liveAlways) SetEpoch(string, uint64)         {}
func (l *liveAlways) Sample(string, string) (monitor.Sample, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.n++
	return monitor.Sample{LastSeen: heartbeat.Now(), Packets: l.n}, nil
}
func (l *liveAlways) Mode() string { return "test" }

// blackhole accepts connections and never answers: a hung server.
func blackhole(t *testing.T) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var conns []net.Conn
	t.Cleanup(func() {
		l.Close()
		mu.Lock()
		for _, c := range conns {
			c.Close()
		}
		mu.Unlock()
	})
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
		}
	}()
	return l.Addr().String()
}

// repoint makes the CLI's config send server's requests to addr.
func repoint(t *testing.T, server, addr string) {
	t.Helper()
	cfg, err := loadConfig()
	if err != nil {
		t.Fatal(err)
	}
	s, err := cfg.Server(server)
	if err != nil {
		t.Fatal(err)
	}
	s.Addr = addr
	cfg.Put(s)
	if err := cfg.Save(); err != nil {
		t.Fatal(err)
	}
}

// TestJobStatusHeadlineAndExitCodes runs job status and job list against
// two agents replicating for real: the headline, the exit code (0
// protected, 1 degraded, 2 not protected, 3 unreachable, 64 usage), the
// real direction after a switchover in the header, job list and --json,
// and a hung server costing about --timeout (2 s), not 5 s per server.
func TestJobStatusHeadlineAndExitCodes(t *testing.T) {
	root, agents := startLab(t, map[string]bool{"vm1": true, "vm2": true})
	for _, la := range agents {
		la.a.Subsystems.Liveness = &liveAlways{}
	}
	vol := filepath.Join(root, "vol.img")
	var out bytes.Buffer
	if err := runWith(&out, "doppel", "job", "create", "web", "--source", "vm1", "--target", "vm2", "--volume", vol, "--target-volume", filepath.Join(root, "vol2.img"), "--size", "4M", "--failover", "auto", "--monitor", "interval=100ms,missed=5"); err != nil {
		t.Fatalf("create: %v\n%s", err, out.String())
	}
	status := func(args ...string) (string, int, time.Duration) {
		t.Helper()
		start := time.Now()
		err := runWith(&out, append([]string{"doppel", "job", "status", "web"}, args...)...)
		return out.String(), exitCode(err), time.Since(start)
	}
	waitHeadline := func(want protection.Level) string {
		t.Helper()
		deadline := time.Now().Add(20 * time.Second)
		for {
			o, code, _ := status()
			if strings.HasPrefix(o, "web  "+string(want)+"  ") && code == want.ExitCode() {
				return o
			}
			if time.Now().After(deadline) {
				t.Fatalf("no %s (exit %d) after 20 s; last (exit %d):\n%s", want, want.ExitCode(), code, o)
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	o := waitHeadline(protection.Protected)
	for _, want := range []string{"if vm1 died now: lose 0 B / 0s of writes, vm2 takes over in ~500ms (automatic)", "job web  vm1:"} {
		if !strings.Contains(o, want) {
			t.Errorf("status lacks %q:\n%s", want, o)
		}
	}
	if strings.Contains(o, "next:") {
		t.Errorf("advice on a protected job at home:\n%s", o)
	}

	// Paused: not protected, and the one command that helps.
	if err := runWith(&out, "doppel", "job", "pause", "web"); err != nil {
		t.Fatal(err)
	}
	o = waitHeadline(protection.NotProtected)
	if !strings.Contains(o, "next: doppel job resume web") {
		t.Errorf("paused status without the resume advice:\n%s", o)
	}
	if err := runWith(&out, "doppel", "job", "resume", "web"); err != nil {
		t.Fatal(err)
	}
	waitHeadline(protection.Protected)

	// Switchover: the real direction everywhere.
	if err := runWith(&out, "doppel", "switchover", "web"); err != nil {
		t.Fatalf("switchover: %v\n%s", err, out.String())
	}
	o = waitHeadline(protection.Protected)
	if !strings.Contains(o, "job web  vm2:") || !strings.Contains(o, "-> vm1:") || !strings.Contains(o, "next: doppel failback web") {
		t.Errorf("after the switchover the status does not show vm2 -> vm1 with the failback advice:\n%s", o)
	}
	o, _, _ = status("--json")
	var js struct {
		Headline string        `json:"headline"`
		Source   string        `json:"source"`
		Target   string        `json:"target"`
		ExitCode int           `json:"exit_code"`
		Sides    []client.Side `json:"sides"`
	}
	if err := json.Unmarshal([]byte(o), &js); err != nil || js.Headline != "PROTECTED" || js.Source != "vm2" || js.Target != "vm1" || len(js.Sides) != 2 {
		t.Errorf("--json: %+v, %v\n%s", js, err, o)
	}
	if err := runWith(&out, "doppel", "job", "list"); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out.String(), "vm2 -> vm1") || strings.Contains(out.String(), "vm1 -> vm2") {
		t.Errorf("job list does not show the real direction:\n%s", out.String())
	}

	// The target's agent hangs: degraded, answered within about --timeout.
	repoint(t, "vm1", blackhole(t))
	o, code, took := status()
	if code != 1 || !strings.HasPrefix(o, "web  DEGRADED  vm1's agent does not answer") {
		t.Errorf("one side hung: exit %d:\n%s", code, o)
	}
	if took > 4*time.Second {
		t.Errorf("job status took %v with one server hung (timeout 2 s)", took)
	}
	start := time.Now()
	if err := runWith(&out, "doppel", "job", "list"); exitCode(err) != 1 || !strings.Contains(out.String(), "DEGRADED") {
		t.Errorf("job list with vm1 hung: %v\n%s", err, out.String())
	}
	if took := time.Since(start); took > 4*time.Second {
		t.Errorf("job list took %v with one server hung", took)
	}
	// Both hang: unreachable, exit 3, bounded by --timeout.
	repoint(t, "vm2", blackhole(t))
	o, code, took = status("--timeout", "500ms")
	if code != 3 || !strings.HasPrefix(o, "web  UNREACHABLE") || took > 3*time.Second {
		t.Errorf("both hung: exit %d after %v:\n%s", code, took, o)
	}
	if _, code, _ := status("--bogus"); code != exitUsage {
		t.Errorf("unknown flag: exit %d, want %d", code, exitUsage)
	}
}
