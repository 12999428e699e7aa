package agent

import (
	"context"
	"crypto/rand"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/doppelha/doppel/blockdev/nbdclient"
	"github.com/doppelha/doppel/daemon/ha"
	"github.com/doppelha/doppel/daemon/job"
	"github.com/doppelha/doppel/ebpf/heartbeat"
)

// TestDeleteLeavesSiblingAlone: two jobs between the same two agents,
// with the real heartbeat probe (userspace mode, on 127.0.0.1 and
// 127.0.0.2). Deleting one job must not touch the other: its target must
// not see its source go silent, fail over and fence it, taking the
// application's disk away. (The probe kept one heartbeat token per peer
// address, the last job's: once that job was deleted, the sibling's
// heartbeats were all rejected, and 2 s later the sibling failed over.)
func TestDeleteLeavesSiblingAlone(t *testing.T) {
	for _, deleted := range []string{"beta", "alpha"} {
		t.Run("delete "+deleted, func(t *testing.T) { testDeleteLeavesSibling(t, deleted) })
	}
}

func testDeleteLeavesSibling(t *testing.T, deleted string) {
	root := t.TempDir()
	os.WriteFile(filepath.Join(root, "mountinfo"), nil, 0o644)
	log := slog.New(slog.DiscardHandler)
	if testing.Verbose() {
		log = slog.New(slog.NewTextHandler(os.Stderr, nil))
	}
	// Each agent's probe listens on every address (as the agent's does),
	// on a port of its own, and sends to the other's.
	hbPorts := map[string]uint16{"vm1": freeUDPPort(t), "vm2": freeUDPPort(t)}
	peerOf := map[string]string{"vm1": "vm2", "vm2": "vm1"}
	hosts := map[string]string{"vm1": "127.0.0.1", "vm2": "127.0.0.2"}
	agents := map[string]*testAgent{}
	lives := map[string]*ProbeLiveness{}
	repl := map[string]string{}
	for _, name := range []string{"vm1", "vm2"} {
		host := hosts[name]
		l, err := net.Listen("tcp", host+":0")
		if err != nil {
			t.Skipf("loopback address %s: %v", host, err)
		}
		repl[name] = l.Addr().String()
		l.Close()
		probe, err := heartbeat.Open(heartbeat.Config{Mode: heartbeat.ModeUserspace, Port: hbPorts[name], Logger: log})
		if err != nil {
			t.Fatalf("userspace probe on %s: %v", host, err)
		}
		t.Cleanup(func() { probe.Close() })
		live := &ProbeLiveness{Log: log.With("agent", name), Probe: probe, Port: hbPorts[peerOf[name]], Incarnation: 1}
		lives[name] = live
		vols := &NBDVolumes{Log: log, RunDir: filepath.Join(root, name, "run")}
		agents[name] = startAgentWith(t, filepath.Join(root, name), host+":0", Subsystems{Liveness: live, Volumes: vols}, func(a *Agent) {
			planes := &ReplPlanes{Log: log.With("agent", name), Cert: a.Credentials.Cert, ReplListen: repl[name], StateDir: filepath.Join(root, name),
				SessionRecorder: live.SessionRecorder}
			a.Subsystems.DataPlane = planes.Open
			a.Subsystems.ReplListener = planes
		})
	}
	ctx := context.Background()
	e1, e2 := endpoint("vm1", agents["vm1"]), endpoint("vm2", agents["vm2"])
	e1.Repl, e2.Repl = repl["vm1"], repl["vm2"]
	specs := map[string]job.Spec{}
	for _, name := range []string{"alpha", "beta"} { // alpha first: the older job
		s := testSpec(t, e1, e2)
		s.Name = name
		s.Monitor = job.Monitor{Interval: 50 * time.Millisecond, Missed: 4}
		s.Volume, s.TargetVolume = filepath.Join(root, name+"1.img"), filepath.Join(root, name+"2.img")
		s.Size = 1 << 20
		for _, n := range []string{"vm2", "vm1"} {
			if _, err := agents[n].client.CreateJob(ctx, s); err != nil {
				t.Fatalf("create %s on %s: %v", name, n, err)
			}
		}
		specs[name] = s
	}
	status := func(n, j string) (st struct {
		role   ha.Role
		state  ha.State
		device string
		cons   bool
	}) {
		js, err := agents[n].client.Job(ctx, j)
		if err != nil {
			t.Fatalf("%s on %s: %v", j, n, err)
		}
		st.role, st.state, st.device, st.cons = js.HA.Role, js.HA.State, js.Data.Device, js.HA.Consistent
		return st
	}
	for _, j := range []string{"alpha", "beta"} {
		waitFor(t, j+" replicating", func() bool {
			s, tg := status("vm1", j), status("vm2", j)
			return s.state == ha.StateReplicating && strings.HasPrefix(s.device, "unix:") && tg.state == ha.StateReplicating && tg.cons
		})
		// Both ends count the replication session's frames for the job's
		// repl path (acks on the source, frames and keepalives on the
		// target).
		for n, l := range lives {
			waitFor(t, j+" session frames counted on "+n, func() bool { return l.session(j).frames.Load() > 0 })
		}
	}
	sibling := "alpha"
	if deleted == "alpha" {
		sibling = "beta"
	}
	// The application of the sibling has its disk open.
	path, _ := strings.CutPrefix(status("vm1", sibling).device, "unix:")
	app, err := nbdclient.Dial("unix", path, sibling)
	if err != nil {
		t.Fatal(err)
	}
	defer app.Close()
	// Delete as the CLI does: the target, then the source.
	for _, n := range []string{"vm2", "vm1"} {
		if err := agents[n].client.DeleteJob(ctx, deleted); err != nil {
			t.Fatalf("delete %s on %s: %v", deleted, n, err)
		}
	}
	// Well past the detection time (50 ms × 4), the sibling still
	// replicates and its application still writes.
	buf := make([]byte, 4096)
	for i := range 30 {
		time.Sleep(50 * time.Millisecond)
		rand.Read(buf)
		errc := make(chan error, 1)
		go func() { _, err := app.WriteAt(buf, int64(i)*4096); errc <- err }()
		select {
		case err := <-errc:
			if err != nil {
				t.Fatalf("the sibling's application lost its disk %v after the delete: %v", time.Duration(i+1)*50*time.Millisecond, err)
			}
		case <-time.After(5 * time.Second):
			s, tg := status("vm1", sibling), status("vm2", sibling)
			app.Close()
			t.Fatalf("the sibling's application's write hangs %v after the delete (vm1 %s %s, vm2 %s %s)", time.Duration(i+1)*50*time.Millisecond, s.role, s.state, tg.role, tg.state)
		}
	}
	s, tg := status("vm1", sibling), status("vm2", sibling)
	if s.role != ha.RoleSource || s.state != ha.StateReplicating || tg.role != ha.RoleTarget || tg.state != ha.StateReplicating {
		t.Fatalf("after deleting %s, sibling %s: vm1 %s %s, vm2 %s %s", deleted, sibling, s.role, s.state, tg.role, tg.state)
	}
	// The source first: its last flush then still finds its target.
	app.Close()
	agents["vm1"].stop()
	agents["vm2"].stop()
}

func freeUDPPort(t *testing.T) uint16 {
	c, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	return uint16(c.LocalAddr().(*net.UDPAddr).Port)
}
