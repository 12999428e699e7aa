package agent

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/doppelha/doppel/daemon/api"
	"github.com/doppelha/doppel/daemon/ha"
	"github.com/doppelha/doppel/daemon/job"
	"github.com/doppelha/doppel/daemon/monitor"
	"github.com/doppelha/doppel/ebpf/heartbeat"
)

// testAgent is an agent serving on loopback for a test.
type testAgent struct {
	t      *testing.T
	a      *Agent
	dir    string
	addr   string
	cancel context.CancelFunc
	done   chan error
	client *api.Client
	subs   Subsystems
}

func startAgent(t *testing.T, dir string, subs Subsystems) *testAgent {
	t.Helper()
	return startAgentAt(t, dir, "127.0.0.1:0", subs)
}

// startAgentAt starts an agent listening on addr (an agent that restarts
// keeps its address: its peer's job spec names it).
func startAgentAt(t *testing.T, dir, addr string, subs Subsystems) *testAgent {
	t.Helper()
	return startAgentWith(t, dir, addr, subs, nil)
}

// startAgentWith calls configure (if any) on the agent before it serves.
func startAgentWith(t *testing.T, dir, addr string, subs Subsystems, configure func(*Agent)) *testAgent {
	t.Helper()
	l, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	return startAgentOn(t, dir, l, subs, configure)
}

// startAgentOn serves an agent on l (a listener handed over by a
// restarting agent, for one).
func startAgentOn(t *testing.T, dir string, l net.Listener, subs Subsystems, configure func(*Agent)) *testAgent {
	t.Helper()
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	if testing.Verbose() {
		log = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug})).With("agent", filepath.Base(dir))
	}
	a, err := New(log, Config{StateDir: dir, MountInfo: filepath.Join(dir, "..", "mountinfo")}, subs)
	if err != nil {
		l.Close()
		t.Fatal(err)
	}
	if configure != nil {
		configure(a)
	}
	ctx, cancel := context.WithCancel(context.Background())
	ta := &testAgent{t: t, a: a, dir: dir, addr: l.Addr().String(), cancel: cancel, done: make(chan error, 1), subs: subs}
	go func() { ta.done <- a.Serve(ctx, l) }()
	ta.client, err = api.NewClient(ta.addr, a.Credentials.Token, a.Credentials.Fingerprint)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(ta.stop)
	return ta
}

func (ta *testAgent) stop() {
	if ta.cancel == nil {
		return
	}
	ta.cancel()
	ta.cancel = nil
	if err := <-ta.done; err != nil {
		ta.t.Errorf("agent stopped with %v", err)
	}
}

func newSecret() string {
	b := make([]byte, 32)
	rand.Read(b)
	return hex.EncodeToString(b)
}

func endpoint(name string, ta *testAgent) job.Endpoint {
	return job.Endpoint{Name: name, Control: ta.addr, Repl: "127.0.0.1:6325", Fingerprint: ta.a.Credentials.Fingerprint}
}

func testSpec(t *testing.T, src, tgt job.Endpoint) job.Spec {
	s := job.Spec{
		Name: "web", Source: src, Target: tgt,
		Volume:   filepath.Join(t.TempDir(), "vol.img"),
		Size:     4 << 20,
		Monitor:  job.Monitor{Interval: 50 * time.Millisecond, Missed: 3},
		Failover: ha.FailoverAuto,
		Secret:   newSecret(),
	}
	s.Defaults()
	return s
}

func TestIdentityCreatedOnceWithModes(t *testing.T) {
	root := t.TempDir()
	os.WriteFile(filepath.Join(root, "mountinfo"), nil, 0o644)
	dir := filepath.Join(root, "a")
	ta := startAgent(t, dir, Subsystems{})
	fp, token := ta.a.Credentials.Fingerprint, ta.a.Credentials.Token
	for path, want := range map[string]os.FileMode{"token": 0o600, "tls/key.pem": 0o600} {
		fi, err := os.Stat(filepath.Join(dir, path))
		if err != nil || fi.Mode().Perm() != want {
			t.Errorf("%s: %v mode %v, want %v", path, err, fi.Mode().Perm(), want)
		}
	}
	ta.stop()
	tb := startAgent(t, dir, Subsystems{})
	if tb.a.Credentials.Fingerprint != fp || tb.a.Credentials.Token != token {
		t.Fatal("restart created a new identity: clients' pins and tokens would break")
	}
	// A token readable by others is refused at start.
	tb.stop()
	os.Chmod(filepath.Join(dir, "token"), 0o644)
	if _, err := New(slog.New(slog.DiscardHandler), Config{StateDir: dir}, Subsystems{}); err == nil || !strings.Contains(err.Error(), "chmod 600") {
		t.Fatalf("world-readable token accepted: %v", err)
	}
}

func TestAPIErrorsAndPersistence(t *testing.T) {
	root := t.TempDir()
	os.WriteFile(filepath.Join(root, "mountinfo"), nil, 0o644)
	ta := startAgent(t, filepath.Join(root, "a"), Subsystems{})
	ctx := context.Background()
	other := job.Endpoint{Name: "vm2", Control: "127.0.0.1:1", Repl: "127.0.0.1:6325", Fingerprint: "sha256:" + strings.Repeat("b", 64)}
	spec := testSpec(t, endpoint("vm1", ta), other)

	// Wrong token: 401, and nothing changed.
	bad, _ := api.NewClient(ta.addr, "not-the-token-at-all", ta.a.Credentials.Fingerprint)
	_, err := bad.CreateJob(ctx, spec)
	var ae *api.Error
	if !errors.As(err, &ae) || ae.Status != http.StatusUnauthorized {
		t.Fatalf("create with wrong token: %v, want 401", err)
	}
	if jobs, err := ta.client.Jobs(ctx); err != nil || len(jobs) != 0 {
		t.Fatalf("after a 401, jobs = %v, %v; want none", jobs, err)
	}
	if recs, _ := ta.a.Store.List(); len(recs) != 0 {
		t.Fatalf("after a 401 the store holds %d jobs", len(recs))
	}

	// Wrong pin: the client refuses the agent.
	pinned, _ := api.NewClient(ta.addr, ta.a.Credentials.Token, "sha256:"+strings.Repeat("0", 64))
	if _, err := pinned.Info(ctx); !errors.Is(err, api.ErrFingerprintMismatch) {
		t.Fatalf("wrong fingerprint: %v, want ErrFingerprintMismatch", err)
	}
	if fp, err := api.FetchFingerprint(ctx, ta.addr); err != nil || fp != ta.a.Credentials.Fingerprint {
		t.Fatalf("FetchFingerprint = %q, %v", fp, err)
	}

	// Unknown job: 404 naming it.
	if _, err := ta.client.Job(ctx, "nosuchjob"); !api.IsKind(err, "not_found") || !strings.Contains(err.Error(), "nosuchjob") {
		t.Fatalf("unknown job: %v", err)
	}
	if _, err := ta.client.Command(ctx, "nosuchjob", ha.CmdFailover, api.CommandOptions{}); !api.IsKind(err, "not_found") {
		t.Fatalf("failover of unknown job: %v", err)
	}

	// A missing device is refused with the reason.
	missing := spec
	missing.Volume, missing.Size = "/dev/doppel-no-such-disk", 0
	if _, err := ta.client.CreateJob(ctx, missing); !api.IsKind(err, "invalid") || !strings.Contains(err.Error(), "does not exist") {
		t.Fatalf("missing volume: %v", err)
	}
	// Bad input is refused before anything is stored.
	invalid := spec
	invalid.Mode = "eventually"
	if _, err := ta.client.CreateJob(ctx, invalid); !api.IsKind(err, "invalid") || !strings.Contains(err.Error(), "sync or async") {
		t.Fatalf("bad mode: %v", err)
	}
	// A job naming neither this agent is refused.
	foreign := spec
	foreign.Source.Fingerprint = "sha256:" + strings.Repeat("c", 64)
	if _, err := ta.client.CreateJob(ctx, foreign); !api.IsKind(err, "invalid") || !strings.Contains(err.Error(), "neither its source") {
		t.Fatalf("foreign job: %v", err)
	}

	st, err := ta.client.CreateJob(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	if st.Self != "vm1" || st.HA.Role != ha.RoleSource || st.Spec.Secret != "" {
		t.Fatalf("created: self %s role %s secret shown %t", st.Self, st.HA.Role, st.Spec.Secret != "")
	}
	if _, err := ta.client.CreateJob(ctx, spec); !api.IsKind(err, "exists") {
		t.Fatalf("second create: %v", err)
	}
	// A command the state refuses is a 409 with the reason.
	if _, err := ta.client.Command(ctx, "web", ha.CmdFailover, api.CommandOptions{}); !api.IsKind(err, "refused") || !strings.Contains(err.Error(), "is the source") {
		t.Fatalf("failover on the source: %v", err)
	}
	// Verify needs the replication engine: a clear 501, not a fake result.
	if _, err := ta.client.Verify(ctx, "web"); !api.IsKind(err, "not_wired") {
		t.Fatalf("verify: %v", err)
	}
	// /metrics carries the job.
	if b := scrape(t, ta); !strings.Contains(b, `doppel_job_state{job="web"`) {
		t.Errorf("/metrics lacks the job: %.300s", b)
	}

	// Restart: the job is still there with its state.
	ta.stop()
	tb := startAgent(t, filepath.Join(root, "a"), Subsystems{})
	got, err := tb.client.Job(ctx, "web")
	if err != nil || got.HA.Role != ha.RoleSource || got.Spec.Volume != spec.Volume {
		t.Fatalf("after restart: %+v, %v", got.HA, err)
	}
	if err := tb.client.DeleteJob(ctx, "web"); err != nil {
		t.Fatal(err)
	}
	if _, err := tb.client.Job(ctx, "web"); !api.IsKind(err, "not_found") {
		t.Fatalf("deleted job: %v", err)
	}
}

// memLiveness is an in-memory probe: a job's peer is heard on every path
// while the test says it is alive.
type memLiveness struct {
	mu    sync.Mutex
	alive map[string]bool
	n     map[string]uint64
	seen  map[string]time.Duration // newest packet, CLOCK_MONOTONIC
	err   error                    // the probe cannot be read
}

func (m *memLiveness) Watch(LivenessWatch) error     { return nil }
func (m *memLiveness) Unwatch(string)                {}
func (m *memLiveness) SetEpoch(job string, e uint64) {}
func (m *memLiveness) Sample(job, path string) (monitor.Sample, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.err != nil {
		return monitor.Sample{}, m.err
	}
	if m.alive[job] {
		m.n[job+path]++
		if m.seen == nil {
			m.seen = map[string]time.Duration{}
		}
		m.seen[job+path] = heartbeat.Now()
	}
	return monitor.Sample{LastSeen: m.seen[job+path], Packets: m.n[job+path]}, nil
}
func (m *memLiveness) Mode() string { return "memory" }
func (m *memLiveness) set(job string, alive bool) {
	m.mu.Lock()
	m.alive[job] = alive
	m.mu.Unlock()
}

func waitFor(t *testing.T, what string, f func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !f() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestTwoAgentsFailoverAndFence runs two agents on loopback exchanging
// state-machine messages over their real HTTPS APIs. The replication engine
// is not wired: the target never becomes consistent, so a failover is
// refused unless forced, and the forced one says which actions could not be
// done. The old source, restarted, is fenced.
func TestTwoAgentsFailoverAndFence(t *testing.T) {
	root := t.TempDir()
	os.WriteFile(filepath.Join(root, "mountinfo"), nil, 0o644)
	live1 := &memLiveness{alive: map[string]bool{"web": true}, n: map[string]uint64{}}
	live2 := &memLiveness{alive: map[string]bool{"web": true}, n: map[string]uint64{}}
	vols1 := &NBDVolumes{Log: slog.New(slog.DiscardHandler), RunDir: filepath.Join(root, "run1")}
	vols2 := &NBDVolumes{Log: slog.New(slog.DiscardHandler), RunDir: filepath.Join(root, "run2")}
	a1 := startAgent(t, filepath.Join(root, "vm1"), Subsystems{Liveness: live1, Volumes: vols1})
	a2 := startAgent(t, filepath.Join(root, "vm2"), Subsystems{Liveness: live2, Volumes: vols2})
	ctx := context.Background()
	spec := testSpec(t, endpoint("vm1", a1), endpoint("vm2", a2))
	spec.Volume = filepath.Join(root, "vol1.img") // both agents share the tempdir: distinct files
	s1 := spec
	s2 := spec
	s2.Volume = filepath.Join(root, "vol2.img")
	if _, err := a1.client.CreateJob(ctx, s1); err != nil {
		t.Fatal(err)
	}
	if _, err := a2.client.CreateJob(ctx, s2); err != nil {
		t.Fatal(err)
	}
	// The source hears its target and serves the volume on a Unix socket.
	waitFor(t, "vm1 serving", func() bool {
		st, _ := a1.client.Job(ctx, "web")
		return strings.HasPrefix(st.Data.Device, "unix:")
	})
	st1, _ := a1.client.Job(ctx, "web")
	if !strings.Contains(strings.Join(st1.Actions, ";"), "start-source FAILED") || st1.HA.LastError == "" {
		t.Errorf("source status hides the unwired replication: actions %v last error %q", st1.Actions, st1.HA.LastError)
	}
	if st1.Data.Known {
		t.Error("data status claims known numbers without a replication engine")
	}

	// vm1 dies: agent stopped, its heartbeats stop.
	a1.stop()
	live2.set("web", false)
	waitFor(t, "vm2 source-down", func() bool {
		st, _ := a2.client.Job(ctx, "web")
		return st.HA.State == ha.StateSourceDown
	})
	st2, _ := a2.client.Job(ctx, "web")
	if !strings.Contains(st2.HA.Reason, "inconsistent") {
		t.Errorf("reason %q does not say why there was no automatic failover", st2.HA.Reason)
	}
	if _, err := a2.client.Command(ctx, "web", ha.CmdFailover, api.CommandOptions{}); !api.IsKind(err, "refused") || !strings.Contains(err.Error(), "inconsistent") {
		t.Fatalf("failover of inconsistent target: %v", err)
	}
	if got, _ := a2.client.Job(ctx, "web"); got.HA.Role != ha.RoleTarget {
		t.Fatal("refused failover changed the role")
	}
	// Forced: the state machine fails over; promote needs the engine, so
	// the command says so (501) while the volume is served and the state
	// is failed-over.
	_, err := a2.client.Command(ctx, "web", ha.CmdFailover, api.CommandOptions{Force: true})
	if !api.IsKind(err, "not_wired") || !strings.Contains(err.Error(), "promote") {
		t.Fatalf("forced failover: %v, want a not_wired error naming promote", err)
	}
	st2, _ = a2.client.Job(ctx, "web")
	if st2.HA.State != ha.StateFailedOver || st2.HA.Epoch != 2 || !strings.HasPrefix(st2.Data.Device, "unix:") {
		t.Fatalf("after forced failover: state %s epoch %d device %q", st2.HA.State, st2.HA.Epoch, st2.Data.Device)
	}
	if _, err := a2.client.Command(ctx, "web", ha.CmdFailover, api.CommandOptions{Force: true}); !api.IsKind(err, "refused") || !strings.Contains(err.Error(), "already failed over") {
		t.Fatalf("second failover: %v", err)
	}

	// vm1 returns: fenced, not serving.
	live2.set("web", true)
	b1 := startAgentAt(t, filepath.Join(root, "vm1"), a1.addr, Subsystems{Liveness: live1, Volumes: vols1})
	waitFor(t, "vm1 superseded", func() bool {
		st, _ := b1.client.Job(ctx, "web")
		return st.HA.State == ha.StateSuperseded
	})
	st1, _ = b1.client.Job(ctx, "web")
	if st1.Data.Device != "" || !strings.Contains(st1.HA.Reason, "run doppel reverse") {
		t.Fatalf("fenced vm1: device %q reason %q", st1.Data.Device, st1.HA.Reason)
	}
	// Peer messages need the job's secret.
	c, _ := api.NewClient(a2.addr, "wrong-secret-wrong-secret", a2.a.Credentials.Fingerprint)
	if err := c.PeerMessage(ctx, "web", ha.Message{Type: ha.MsgPromoted, From: "vm1", To: "vm2", Role: ha.RoleSource, Epoch: 99}); !api.IsKind(err, "unauthorized") {
		t.Fatalf("peer message with a wrong secret: %v", err)
	}
	fmt.Fprint(io.Discard, st1)
}

func freePort(t *testing.T) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// TestManualFailoverWithReplication: two agents replicate for real over
// loopback (daemon/repl). In manual mode a silent source only produces
// source-down: nothing moves until the operator's failover, after which the
// target serves the data written on the source.
func TestManualFailoverWithReplication(t *testing.T) {
	root := t.TempDir()
	os.WriteFile(filepath.Join(root, "mountinfo"), nil, 0o644)
	live2 := &memLiveness{alive: map[string]bool{"web": true}, n: map[string]uint64{}}
	log := slog.New(slog.DiscardHandler)
	start := func(name string, live Liveness, repl string) *testAgent {
		vols := &NBDVolumes{Log: log, RunDir: filepath.Join(root, name, "run")}
		return startAgentWith(t, filepath.Join(root, name), "127.0.0.1:0", Subsystems{Liveness: live, Volumes: vols}, func(a *Agent) {
			planes := &ReplPlanes{Log: log, Cert: a.Credentials.Cert, ReplListen: repl, StateDir: filepath.Join(root, name)}
			a.Subsystems.DataPlane = planes.Open
		})
	}
	r1, r2 := freePort(t), freePort(t)
	a1 := start("vm1", &memLiveness{alive: map[string]bool{"web": true}, n: map[string]uint64{}}, r1)
	a2 := start("vm2", live2, r2)
	ctx := context.Background()
	e1, e2 := endpoint("vm1", a1), endpoint("vm2", a2)
	e1.Repl, e2.Repl = r1, r2
	spec := testSpec(t, e1, e2)
	spec.Failover = ha.FailoverManual
	spec.Volume = filepath.Join(root, "vol1.img")
	spec.TargetVolume = filepath.Join(root, "vol2.img")
	data := make([]byte, 1<<20)
	rand.Read(data)
	os.WriteFile(spec.Volume, append(data, make([]byte, int(spec.Size)-len(data))...), 0o600)
	spec.Size = 0
	if _, err := a1.client.CreateJob(ctx, spec); err != nil {
		t.Fatal(err)
	}
	spec.Size = 4 << 20 // the target's file is created
	if _, err := a2.client.CreateJob(ctx, spec); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "replicating", func() bool {
		st, _ := a2.client.Job(ctx, "web")
		return st.HA.State == ha.StateReplicating && st.HA.Consistent
	})
	got, _ := os.ReadFile(spec.TargetVolume)
	if len(got) < len(data) || string(got[:len(data)]) != string(data) {
		t.Fatal("mirror did not copy the source's data to the target")
	}
	res, err := a1.client.Verify(ctx, "web")
	if err != nil || !res.Equal {
		t.Fatalf("verify: %+v %v", res, err)
	}
	// The source's metrics carry the RPO estimate (sync, connected: 0)
	// and its dirty bytes; the target's, what it applied (the mirror).
	m1, m2 := scrape(t, a1), scrape(t, a2)
	for _, want := range []string{`doppel_job_rpo_seconds{job="web"} 0`, `doppel_job_dirty_bytes{job="web"} 0`, `doppel_job_time_to_fail_seconds{job="web"} -1`} {
		if !strings.Contains(m1, want+"\n") {
			t.Errorf("source /metrics lacks %s", want)
		}
	}
	if !strings.Contains(m2, `doppel_job_applied_bytes{job="web"} 1.048576e+06`) {
		t.Errorf("target /metrics lacks the applied bytes of the 1 MiB mirror:\n%s", grepLines(m2, "doppel_job_"))
	}

	// The source goes silent: manual mode only reports it.
	a1.stop()
	live2.set("web", false)
	waitFor(t, "source-down", func() bool {
		st, _ := a2.client.Job(ctx, "web")
		return st.HA.State == ha.StateSourceDown
	})
	time.Sleep(5 * spec.Monitor.Interval)
	st, _ := a2.client.Job(ctx, "web")
	if st.HA.Role != ha.RoleTarget || st.Data.Device != "" || !strings.Contains(st.HA.Reason, "run doppel failover") {
		t.Fatalf("manual mode moved by itself: role %s device %q reason %q", st.HA.Role, st.Data.Device, st.HA.Reason)
	}
	st, err = a2.client.Command(ctx, "web", ha.CmdFailover, api.CommandOptions{})
	if err != nil {
		t.Fatalf("manual failover: %v", err)
	}
	if st.HA.State != ha.StateFailedOver || !strings.HasPrefix(st.Data.Device, "unix:") {
		t.Fatalf("after failover: %s, device %q", st.HA.State, st.Data.Device)
	}
}

// TestRestartMidMirrorResumes: the source agent is killed in the middle of
// the first mirror (rate-limited so that there is a middle) and restarted:
// the job resumes and only the chunks not yet on the target are sent again.
func TestRestartMidMirrorResumes(t *testing.T) {
	if testing.Short() {
		t.Skip("a few seconds of rate-limited mirror")
	}
	root := t.TempDir()
	os.WriteFile(filepath.Join(root, "mountinfo"), nil, 0o644)
	log := slog.New(slog.DiscardHandler)
	alive := func() *memLiveness { return &memLiveness{alive: map[string]bool{"web": true}, n: map[string]uint64{}} }
	start := func(name, addr, repl string, rate int64) *testAgent {
		vols := &NBDVolumes{Log: log, RunDir: filepath.Join(root, name, "run")}
		return startAgentWith(t, filepath.Join(root, name), addr, Subsystems{Liveness: alive(), Volumes: vols}, func(a *Agent) {
			planes := &ReplPlanes{Log: log, Cert: a.Credentials.Cert, ReplListen: repl, StateDir: filepath.Join(root, name), RateLimit: rate}
			a.Subsystems.DataPlane = planes.Open
		})
	}
	const size = 16 << 20
	r1, r2 := freePort(t), freePort(t)
	a1 := start("vm1", "127.0.0.1:0", r1, 6<<20) // 6 MiB/s: the mirror takes ~2.7 s
	a2 := start("vm2", "127.0.0.1:0", r2, 0)
	ctx := context.Background()
	e1, e2 := endpoint("vm1", a1), endpoint("vm2", a2)
	e1.Repl, e2.Repl = r1, r2
	spec := testSpec(t, e1, e2)
	spec.Volume, spec.TargetVolume = filepath.Join(root, "vol1.img"), filepath.Join(root, "vol2.img")
	data := make([]byte, size)
	rand.Read(data)
	os.WriteFile(spec.Volume, data, 0o600)
	spec.Size = 0
	if _, err := a1.client.CreateJob(ctx, spec); err != nil {
		t.Fatal(err)
	}
	spec.Size = size
	if _, err := a2.client.CreateJob(ctx, spec); err != nil {
		t.Fatal(err)
	}
	var sent int64
	waitFor(t, "a third of the mirror", func() bool {
		st, _ := a1.client.Job(ctx, "web")
		sent = st.Data.MirrorSent
		return sent > size/3
	})
	if st, _ := a2.client.Job(ctx, "web"); st.HA.Consistent {
		t.Fatal("the mirror finished before the kill: no middle to test")
	}
	addr := a1.addr
	a1.stop()
	b1 := start("vm1", addr, r1, 0)
	waitFor(t, "resumed and consistent", func() bool {
		st, _ := a2.client.Job(ctx, "web")
		return st.HA.State == ha.StateReplicating && st.HA.Consistent
	})
	st, _ := b1.client.Job(ctx, "web")
	t.Logf("before the kill: %d bytes sent; after the restart: %d of %d", sent, st.Data.MirrorSent, size)
	if st.Data.MirrorSent >= size-sent/2 {
		t.Errorf("after the restart %d bytes were sent again: a full remirror (%d bytes were already there)", st.Data.MirrorSent, sent)
	}
	got, _ := os.ReadFile(spec.TargetVolume)
	if string(got) != string(data) {
		t.Fatal("target differs from the source after the resumed mirror")
	}
}

// TestProbeErrorSuspendsDetection: silence nobody measured is not a
// failure. With its probe unreadable, the target never declares its source
// down, and status says detection is suspended.
func TestProbeErrorSuspendsDetection(t *testing.T) {
	root := t.TempDir()
	os.WriteFile(filepath.Join(root, "mountinfo"), nil, 0o644)
	live2 := &memLiveness{alive: map[string]bool{}, n: map[string]uint64{}, err: errors.New("probe map gone")}
	a1 := startAgent(t, filepath.Join(root, "vm1"), Subsystems{})
	a2 := startAgent(t, filepath.Join(root, "vm2"), Subsystems{Liveness: live2})
	ctx := context.Background()
	spec := testSpec(t, endpoint("vm1", a1), endpoint("vm2", a2))
	spec.Volume = filepath.Join(root, "vol.img")
	if _, err := a2.client.CreateJob(ctx, spec); err != nil {
		t.Fatal(err)
	}
	time.Sleep(10 * spec.Monitor.Interval)
	st, _ := a2.client.Job(ctx, "web")
	if st.HA.State == ha.StateSourceDown || st.HA.Role != ha.RoleTarget {
		t.Fatalf("unmeasured silence declared a failure: %s %s", st.HA.Role, st.HA.State)
	}
	if !strings.Contains(st.Probe.Mode, "suspended") {
		t.Fatalf("probe mode %q does not say detection is suspended", st.Probe.Mode)
	}
}

// scrape returns an agent's /metrics.
func scrape(t *testing.T, ta *testAgent) string {
	t.Helper()
	// The agent's self-signed certificate has no IP SAN: the test skips
	// the chain check (the API client pins the fingerprint instead).
	cfg := &tls.Config{InsecureSkipVerify: true}
	req, _ := http.NewRequest("GET", "https://"+ta.addr+"/metrics", nil)
	req.Header.Set("Authorization", "Bearer "+ta.a.Credentials.Token) // /metrics needs the API token
	resp, err := (&http.Client{Transport: &http.Transport{TLSClientConfig: cfg}}).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return string(b)
}

func grepLines(s, sub string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, sub) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

// TestMetricsListen: with metrics_listen the agent serves /metrics in
// plain HTTP without a token there; the control port still wants it.
func TestMetricsListen(t *testing.T) {
	root := t.TempDir()
	os.WriteFile(filepath.Join(root, "mountinfo"), nil, 0o644)
	free, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	maddr := free.Addr().String()
	free.Close()
	a, err := New(slog.New(slog.DiscardHandler), Config{StateDir: filepath.Join(root, "vm1"), ControlListen: "127.0.0.1:0",
		MetricsListen: maddr, MountInfo: filepath.Join(root, "mountinfo")}, Subsystems{})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	defer func() { cancel(); <-done }()
	var resp *http.Response
	waitFor(t, "metrics listener", func() bool {
		resp, err = http.Get("http://" + maddr + "/metrics")
		return err == nil
	})
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || !strings.Contains(string(b), "go_goroutines") {
		t.Fatalf("metrics listener: %d %.200s", resp.StatusCode, b)
	}
}
