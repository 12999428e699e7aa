package main

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/doppelha/doppel/daemon/agent"
	"github.com/doppelha/doppel/daemon/api"
	"github.com/doppelha/doppel/daemon/client"
	"github.com/doppelha/doppel/daemon/ha"
	"github.com/doppelha/doppel/daemon/job"
	"github.com/urfave/cli/v2"
)

// labAgent is an agent run in the test process, on loopback.
type labAgent struct {
	name, dir, addr, repl string
	a                     *agent.Agent
	client                *api.Client
}

// startLab starts two agents, vm1 and vm2, and points the CLI's config
// at them. replicate: wire the replication engine into each (named).
func startLab(t *testing.T, replicate map[string]bool) (root string, agents map[string]*labAgent) {
	t.Helper()
	root = t.TempDir()
	agents = map[string]*labAgent{}
	cfg, err := client.LoadConfig(filepath.Join(root, "cli.json"))
	if err != nil {
		t.Fatal(err)
	}
	log := slog.New(slog.DiscardHandler)
	if testing.Verbose() {
		log = slog.New(slog.NewTextHandler(os.Stderr, nil))
	}
	for _, name := range []string{"vm1", "vm2"} {
		la := &labAgent{name: name, dir: filepath.Join(root, name), repl: freeAddr(t)}
		a, err := agent.New(log.With("agent", name), agent.Config{StateDir: la.dir, ReplListen: la.repl}, agent.Subsystems{
			Volumes: &agent.NBDVolumes{Log: log, RunDir: filepath.Join(la.dir, "run")},
		})
		if err != nil {
			t.Fatal(err)
		}
		if replicate[name] {
			planes := &agent.ReplPlanes{Log: log, Cert: a.Credentials.Cert, ReplListen: la.repl, StateDir: la.dir}
			a.Subsystems.DataPlane = planes.Open
			a.Subsystems.ReplListener = planes
		} else {
			// Listening, but no engine: peers reach it, nothing replicates.
			l, err := net.Listen("tcp", la.repl)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { l.Close() })
		}
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { done <- a.Serve(ctx, l) }()
		t.Cleanup(func() { cancel(); <-done })
		la.a, la.addr = a, l.Addr().String()
		if la.client, err = api.NewClient(la.addr, a.Credentials.Token, a.Credentials.Fingerprint); err != nil {
			t.Fatal(err)
		}
		cfg.Put(client.Server{Name: name, Addr: la.addr, Fingerprint: a.Credentials.Fingerprint, Token: a.Credentials.Token})
		agents[name] = la
	}
	if err := cfg.Save(); err != nil {
		t.Fatal(err)
	}
	t.Setenv("DOPPEL_CONFIG", cfg.Path())
	return root, agents
}

func freeAddr(t *testing.T) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

func exitCode(err error) int {
	var ec cli.ExitCoder
	if errors.As(err, &ec) {
		return ec.ExitCode()
	}
	if err != nil {
		return 1
	}
	return 0
}

func jobsOn(t *testing.T, la *labAgent) int {
	jobs, err := la.client.Jobs(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return len(jobs)
}

// TestJobCreatePreflight: a create with problems on both hosts (the
// source volume's directory missing, a target smaller than the source, a
// hook script that exists nowhere) reports every one of them at once,
// exits non-zero and changes nothing on either host. Fixed, the same
// create sets aside the replication state an earlier job left, creates
// the missing target file at the source's size and exits 0 only once the
// job replicates.
func TestJobCreatePreflight(t *testing.T) {
	root, agents := startLab(t, map[string]bool{"vm1": true, "vm2": true})
	srcDir := filepath.Join(root, "data")
	srcVol, tgtVol := filepath.Join(srcDir, "vol.img"), filepath.Join(root, "tgt.img")
	os.WriteFile(tgtVol, make([]byte, 1<<20), 0o600)
	// An earlier job "web" left replication state on vm2 (a bitmap of
	// another geometry).
	stale := job.ReplStateDir(agents["vm2"].dir, "web")
	os.MkdirAll(stale, 0o700)
	os.WriteFile(filepath.Join(stale, "bitmap"), []byte("an older job's bitmap"), 0o600)
	args := []string{"doppel", "job", "create", "web", "--source", "vm1", "--target", "vm2",
		"--volume", srcVol, "--target-volume", tgtVol, "--size", "4M", "--script", "post-failover=/nonexistent.sh"}
	err := run(context.Background(), args)
	if exitCode(err) == 0 {
		t.Fatal("create with problems succeeded")
	}
	msg := err.Error()
	for _, want := range []string{
		"4 problem(s), nothing was changed",
		"vm1      volume: " + srcVol + " cannot be created: its directory " + srcDir + " does not exist",
		"vm1      script: post-failover script /nonexistent.sh: does not exist",
		"vm2      script: post-failover script /nonexistent.sh: does not exist",
		"vm2      size: the target volume " + tgtVol + " is 1048576 bytes, smaller than the source volume " + srcVol + " (4194304 bytes)",
	} {
		if !strings.Contains(msg, want) {
			t.Errorf("the report lacks %q:\n%s", want, msg)
		}
	}
	for _, la := range agents {
		if n := jobsOn(t, la); n != 0 {
			t.Errorf("%s has %d jobs after a refused create", la.name, n)
		}
	}
	if _, err := os.Stat(filepath.Join(stale, "bitmap")); err != nil {
		t.Errorf("the refused create touched the stale state: %v", err)
	}
	if _, err := os.Stat(srcDir); !os.IsNotExist(err) {
		t.Errorf("the refused create made %s: %v", srcDir, err)
	}

	// Fixed: the directory exists, no script, the target file is missing
	// (created at the source's size).
	os.MkdirAll(srcDir, 0o700)
	os.Remove(tgtVol)
	args = []string{"doppel", "job", "create", "web", "--source", "vm1", "--target", "vm2",
		"--volume", srcVol, "--target-volume", tgtVol, "--size", "4M", "--wait", "20s"}
	if err := run(context.Background(), args); err != nil {
		t.Fatalf("create: %v", err)
	}
	st, err := agents["vm1"].client.Job(context.Background(), "web")
	if err != nil || !st.HA.LinkUp || (st.HA.State != ha.StateMirroring && st.HA.State != ha.StateReplicating) {
		t.Fatalf("create returned 0 for a job that does not replicate: %+v, %v", st.HA, err)
	}
	if st.Spec.UUID == "" || st.Spec.VolumeSize != 4<<20 {
		t.Errorf("spec uuid %q volume size %d", st.Spec.UUID, st.Spec.VolumeSize)
	}
	if fi, err := os.Stat(tgtVol); err != nil || fi.Size() != 4<<20 {
		t.Errorf("target volume: %v (%v)", fi, err)
	}
	if aside, _ := filepath.Glob(filepath.Join(job.ArchiveDir(agents["vm2"].dir), "web.repl.stale-*")); len(aside) != 1 {
		t.Errorf("the earlier job's state was not set aside: %v", aside)
	}
	// A second create of the same job is refused by the pre-flight.
	if err := run(context.Background(), args); exitCode(err) == 0 || !strings.Contains(err.Error(), "job: a job web exists on vm1 already") {
		t.Errorf("second create: %v", err)
	}
}

// TestJobCreateRollsBack: when the source's create fails after the
// target's succeeded, the target's is rolled back: no job, no state, no
// volume file left.
func TestJobCreateRollsBack(t *testing.T) {
	root, agents := startLab(t, map[string]bool{"vm1": true, "vm2": true})
	spec := job.Spec{Name: "web", Volume: filepath.Join(root, "src.img"), TargetVolume: filepath.Join(root, "tgt.img"), Size: 1 << 20,
		Secret: strings.Repeat("ab", 32), UUID: job.NewUUID(), VolumeSize: 1 << 20}
	os.WriteFile(spec.Volume, make([]byte, 1<<20), 0o600)
	for _, la := range agents {
		ep := job.Endpoint{Name: la.name, Control: la.addr, Repl: la.repl, Fingerprint: la.a.Credentials.Fingerprint}
		if la.name == "vm1" {
			spec.Source = ep
		} else {
			spec.Target = ep
		}
	}
	spec.Defaults()
	// The source's create fails: it is refused a spec that does not name
	// its certificate (a server re-added meanwhile).
	spec.Source.Fingerprint = "sha256:" + strings.Repeat("0", 64)
	err := client.CreateBoth(context.Background(), spec, agents["vm1"].client, agents["vm2"].client)
	if err == nil || !strings.Contains(err.Error(), "rolled back on the target vm2") {
		t.Fatalf("createBoth: %v", err)
	}
	if n := jobsOn(t, agents["vm2"]); n != 0 {
		t.Fatalf("the target kept %d jobs", n)
	}
	if _, err := os.Stat(spec.TargetVolume); !os.IsNotExist(err) {
		t.Errorf("the target volume file its create made is still there: %v", err)
	}
	if _, err := os.Stat(job.ReplStateDir(agents["vm2"].dir, "web")); !os.IsNotExist(err) {
		t.Errorf("the target's replication state is still there: %v", err)
	}
}

// TestJobCreateWaitsForHandshake: a job whose replication never connects
// (here: the source runs no replication engine) is created, but the
// command says it is not replicating and exits non-zero.
func TestJobCreateWaitsForHandshake(t *testing.T) {
	root, _ := startLab(t, map[string]bool{"vm2": true})
	vol := filepath.Join(root, "src.img")
	os.WriteFile(vol, make([]byte, 1<<20), 0o600)
	start := time.Now()
	err := run(context.Background(), []string{"doppel", "job", "create", "web", "--source", "vm1", "--target", "vm2",
		"--volume", vol, "--target-volume", filepath.Join(root, "tgt.img"), "--wait", "1s"})
	if exitCode(err) == 0 || !strings.Contains(err.Error(), "not replicating: no replication handshake within 1s") {
		t.Fatalf("create of a job that cannot replicate: %v", err)
	}
	if d := time.Since(start); d > 20*time.Second {
		t.Errorf("the wait took %v", d)
	}
	io.Discard.Write(nil)
}
