package main

import (
	"context"
	"crypto/rand"
	"fmt"
	"math/big"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/doppelha/doppel/blockdev/nbdclient"
	"github.com/doppelha/doppel/daemon/api"
	"github.com/doppelha/doppel/daemon/client"
	"github.com/doppelha/doppel/daemon/ha"
)

// agentProc is a doppel agent run as a process (this test binary run as
// doppel, see childEnv), on its own loopback address.
type agentProc struct {
	name, host, dir, control string
	cmd                      *exec.Cmd
	log                      string
	client                   *api.Client
	exited                   chan error
}

func startAgentProc(t *testing.T, root, name, host string, hb int) *agentProc {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	ap := &agentProc{name: name, host: host, dir: filepath.Join(root, name), control: freeAddrOn(t, host), exited: make(chan error, 1)}
	ap.log = filepath.Join(root, name+".log")
	f, err := os.Create(ap.log)
	if err != nil {
		t.Fatal(err)
	}
	ap.cmd = exec.Command(exe, "doppel", "agent", "--state-dir", ap.dir, "--control-listen", ap.control,
		"--repl-listen", freeAddrOn(t, host), "--heartbeat-port", fmt.Sprint(hb), "--probe-mode", "userspace")
	ap.cmd.Env = append(os.Environ(), childEnv+"=1")
	ap.cmd.Stdout, ap.cmd.Stderr = f, f
	if err := ap.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	f.Close()
	go func() { ap.exited <- ap.cmd.Wait() }()
	t.Cleanup(func() {
		ap.cmd.Process.Kill()
		if t.Failed() {
			b, _ := os.ReadFile(ap.log)
			t.Logf("%s log:\n%s", name, tail(string(b), 6000))
		}
	})
	deadline := time.Now().Add(20 * time.Second)
	for {
		token, terr := os.ReadFile(filepath.Join(ap.dir, "token"))
		fp, ferr := api.FetchFingerprint(context.Background(), ap.control)
		if terr == nil && ferr == nil {
			if ap.client, err = api.NewClient(ap.control, strings.TrimSpace(string(token)), fp); err != nil {
				t.Fatal(err)
			}
			if _, err := ap.client.Info(context.Background()); err == nil {
				return ap
			}
		}
		if time.Now().After(deadline) {
			b, _ := os.ReadFile(ap.log)
			t.Fatalf("agent %s did not come up: %v %v\n%s", name, terr, ferr, b)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func freeAddrOn(t *testing.T, host string) string {
	l, err := net.Listen("tcp", host+":0")
	if err != nil {
		t.Skipf("loopback address %s: %v", host, err)
	}
	defer l.Close()
	return l.Addr().String()
}

// procLab is two agent processes (vm1 on 127.0.0.1, vm2 on 127.0.0.2)
// with a job web replicating vm1's 64 MiB volume to vm2, created by the
// CLI.
func procLab(t *testing.T) map[string]*agentProc {
	t.Helper()
	if testing.Short() {
		t.Skip("agent processes: slow tier")
	}
	root := t.TempDir()
	hb := int(freeUDPPortOn(t))
	agents := map[string]*agentProc{
		"vm1": startAgentProc(t, root, "vm1", "127.0.0.1", hb),
		"vm2": startAgentProc(t, root, "vm2", "127.0.0.2", hb),
	}
	cfg, err := client.LoadConfig(filepath.Join(root, "cli.json"))
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range []string{"vm1", "vm2"} {
		ap := agents[n]
		token, _ := os.ReadFile(filepath.Join(ap.dir, "token"))
		fp, _ := api.FetchFingerprint(context.Background(), ap.control)
		cfg.Put(client.Server{Name: n, Addr: ap.control, Fingerprint: fp, Token: strings.TrimSpace(string(token))})
	}
	if err := cfg.Save(); err != nil {
		t.Fatal(err)
	}
	t.Setenv("DOPPEL_CONFIG", cfg.Path())
	if err := run(context.Background(), []string{"doppel", "job", "create", "web", "--source", "vm1", "--target", "vm2",
		"--volume", filepath.Join(root, "vol1.img"), "--target-volume", filepath.Join(root, "vol2.img"), "--size", "64M",
		"--monitor", "interval=250ms,missed=8"}); err != nil {
		t.Fatalf("create: %v", err)
	}
	waitJob(t, agents, func(s, tg api.JobStatus) bool { return protected(s, tg) })
	return agents
}

func freeUDPPortOn(t *testing.T) uint16 {
	c, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	return uint16(c.LocalAddr().(*net.UDPAddr).Port)
}

func protected(s, tg api.JobStatus) bool {
	return s.HA.Role == ha.RoleSource && s.HA.State == ha.StateReplicating && strings.HasPrefix(s.Data.Device, "unix:") &&
		tg.HA.Role == ha.RoleTarget && tg.HA.State == ha.StateReplicating && tg.HA.Consistent
}

func waitJob(t *testing.T, agents map[string]*agentProc, f func(s, tg api.JobStatus) bool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		s, err1 := agents["vm1"].client.Job(context.Background(), "web")
		tg, err2 := agents["vm2"].client.Job(context.Background(), "web")
		if err1 == nil && err2 == nil && f(s, tg) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("timed out: vm1 %s %s (%v), vm2 %s %s consistent %t (%v)", s.HA.Role, s.HA.State, err1, tg.HA.Role, tg.HA.State, tg.HA.Consistent, err2)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// loadWriter writes 4 KiB random blocks at random offsets through the
// job's export as fast as they are acknowledged, keeping the longest
// wait for one and the first error.
type loadWriter struct {
	c       *nbdclient.Client
	stop    chan struct{}
	done    chan struct{}
	mu      sync.Mutex
	longest time.Duration
	writes  int
	err     error
}

func startLoad(t *testing.T, ap *agentProc) *loadWriter {
	t.Helper()
	st, err := ap.client.Job(context.Background(), "web")
	if err != nil {
		t.Fatal(err)
	}
	path, _ := strings.CutPrefix(st.Data.Device, "unix:")
	c, err := nbdclient.Dial("unix", path, "web")
	if err != nil {
		t.Fatal(err)
	}
	w := &loadWriter{c: c, stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(w.done)
		buf := make([]byte, 4096)
		blocks := big.NewInt(int64(c.Export.Size / 4096))
		for {
			select {
			case <-w.stop:
				return
			default:
			}
			rand.Read(buf)
			n, _ := rand.Int(rand.Reader, blocks)
			start := time.Now()
			_, err := c.WriteAt(buf, n.Int64()*4096)
			d := time.Since(start)
			w.mu.Lock()
			w.longest = max(w.longest, d)
			if err == nil {
				w.writes++
			} else {
				w.err = err
			}
			w.mu.Unlock()
			if err != nil {
				return
			}
		}
	}()
	return w
}

func (w *loadWriter) finish() (int, time.Duration, error) {
	close(w.stop)
	<-w.done
	w.mu.Lock()
	defer w.mu.Unlock()
	if err := w.c.Flush(); err != nil && w.err == nil {
		w.err = err
	}
	w.c.Close()
	return w.writes, w.longest, w.err
}

// TestAgentRestartUnderLoad: the agent processes restart (doppel agent
// restart: a new process takes the volume, the export's socket and the
// connected client over SCM_RIGHTS) while a client writes through the
// source's export as fast as it can. The client sees no error; afterwards
// the job replicates and doppel verify finds no difference. The source
// restarts twice, the target once.
func TestAgentRestartUnderLoad(t *testing.T) {
	agents := procLab(t)
	ctx := context.Background()
	var pids []int
	t.Cleanup(func() {
		for _, pid := range pids {
			syscall.Kill(pid, syscall.SIGKILL)
		}
	})
	for i, name := range []string{"vm1", "vm2", "vm1"} {
		w := startLoad(t, agents["vm1"])
		time.Sleep(time.Second)
		ap := agents[name]
		oldPid := ap.cmd.Process.Pid
		if i == 2 {
			oldPid = pids[0]
		}
		start := time.Now()
		res, err := ap.client.RestartAgent(ctx)
		if err != nil {
			t.Fatalf("restart %s: %v", name, err)
		}
		took := time.Since(start)
		pids = append(pids, res.PID)
		if res.PID == oldPid {
			t.Fatalf("restart %s: the same process (%d) serves", name, res.PID)
		}
		if i < 2 {
			select {
			case err := <-ap.exited:
				if err != nil {
					t.Fatalf("%s: the old agent exited with %v", name, err)
				}
			case <-time.After(10 * time.Second):
				t.Fatalf("%s: the old agent did not exit", name)
			}
		}
		time.Sleep(time.Second)
		writes, longest, err := w.finish()
		if err != nil {
			t.Fatalf("restart of %s under load: the application got an error: %v", name, err)
		}
		t.Logf("restart of %s (pid %d -> %d) took %v; %d writes of 4 KiB meanwhile, the longest waited %v",
			name, oldPid, res.PID, took.Round(time.Millisecond), writes, longest.Round(time.Millisecond))
		waitJob(t, agents, func(s, tg api.JobStatus) bool { return protected(s, tg) })
		v, err := agents["vm1"].client.Verify(ctx, "web")
		if err != nil || !v.Equal || v.Differing != 0 {
			t.Fatalf("verify after restarting %s: %+v, %v", name, v, err)
		}
	}
}

// TestAgentSIGTERMWaitsForUsers: SIGTERM to an agent process whose
// volume has a client keeps it serving (the client writes on); it exits
// once the client disconnects. A second SIGTERM stops it at once.
func TestAgentSIGTERMWaitsForUsers(t *testing.T) {
	agents := procLab(t)
	w := startLoad(t, agents["vm1"])
	vm1 := agents["vm1"]
	vm1.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-vm1.exited:
		t.Fatalf("the agent exited (%v) while its volume was in use", err)
	case <-time.After(1500 * time.Millisecond):
	}
	if _, _, err := w.finish(); err != nil {
		t.Fatalf("the client lost its disk to a SIGTERM: %v", err)
	}
	select {
	case err := <-vm1.exited:
		if err != nil {
			t.Fatalf("exit: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the agent did not stop once its volume was released")
	}
	b, _ := os.ReadFile(vm1.log)
	if !strings.Contains(string(b), "refusing to stop while volumes are in use") {
		t.Errorf("the log does not say why the stop waited:\n%s", tail(string(b), 3000))
	}
	// vm2, the target, serves nothing: SIGTERM stops it at once.
	agents["vm2"].cmd.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-agents["vm2"].exited:
		if err != nil {
			t.Fatalf("vm2 exit: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("an agent with nothing in use did not stop on SIGTERM")
	}
}

// TestAgentSecondSIGTERMForces: a second SIGTERM stops an agent whose
// volume is in use; the client loses its connection.
func TestAgentSecondSIGTERMForces(t *testing.T) {
	agents := procLab(t)
	w := startLoad(t, agents["vm1"])
	vm1 := agents["vm1"]
	vm1.cmd.Process.Signal(syscall.SIGTERM)
	time.Sleep(500 * time.Millisecond)
	vm1.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-vm1.exited:
	case <-time.After(15 * time.Second):
		t.Fatal("a second SIGTERM did not stop the agent")
	}
	if _, _, err := w.finish(); err == nil {
		t.Fatal("the client still writes to a stopped agent's volume")
	}
}

// TestDeleteAndStopRefusedWhileInUse: through the CLI, job delete and
// agent stop are refused while a client uses the source's export, naming
// it, and change nothing on either host; once the client is gone both go
// through.
func TestDeleteAndStopRefusedWhileInUse(t *testing.T) {
	agents := procLab(t)
	ctx := context.Background()
	w := startLoad(t, agents["vm1"])
	err := run(ctx, []string{"doppel", "job", "delete", "web"})
	if err == nil || !strings.Contains(err.Error(), "not deleted (nothing was changed): its volume is in use (vm1: NBD client pid ") {
		t.Fatalf("delete while in use: %v", err)
	}
	err = run(ctx, []string{"doppel", "agent", "stop", "--server", "vm1"})
	if err == nil || !strings.Contains(err.Error(), "job web: NBD client pid ") {
		t.Fatalf("agent stop while in use: %v", err)
	}
	for _, n := range []string{"vm1", "vm2"} {
		if _, err := agents[n].client.Job(ctx, "web"); err != nil {
			t.Fatalf("%s lost the job to a refused delete: %v", n, err)
		}
	}
	if _, _, err := w.finish(); err != nil {
		t.Fatalf("the client lost its disk: %v", err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		err = run(ctx, []string{"doppel", "job", "delete", "web"})
		if err == nil || time.Now().After(deadline) {
			break
		}
		time.Sleep(100 * time.Millisecond) // the server notices the disconnect
	}
	if err != nil {
		t.Fatalf("delete once the client is gone: %v", err)
	}
	if err := run(ctx, []string{"doppel", "agent", "stop", "--server", "vm1"}); err != nil {
		t.Fatalf("agent stop: %v", err)
	}
	select {
	case err := <-agents["vm1"].exited:
		if err != nil {
			t.Fatalf("exit: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the agent did not stop")
	}
}
