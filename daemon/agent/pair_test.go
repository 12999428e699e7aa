package agent

import (
	"bytes"
	"context"
	"crypto/rand"
	"fmt"
	"log/slog"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/doppelha/doppel/blockdev/nbdclient"
	"github.com/doppelha/doppel/daemon/api"
	"github.com/doppelha/doppel/daemon/ha"
	"github.com/doppelha/doppel/daemon/job"
)

// pair is two real agents replicating one job ("web", home vm1) over
// loopback: real replication engines (daemon/repl), volumes served as NBD
// exports on Unix sockets, peer messages over the agents' HTTPS APIs. Only
// the probe is in memory (memLiveness), so a test decides who hears whom.
// model is what the volume must hold: every write the NBD server
// acknowledged, in order.
type pair struct {
	t       *testing.T
	root    string
	spec    job.Spec
	agents  map[string]*testAgent
	live    map[string]*memLiveness // what each agent hears of its peer
	repl    map[string]string       // replication listen addresses
	rate    int64                   // replication bytes per second (0: unlimited)
	modelMu sync.Mutex
	model   []byte
	log     *slog.Logger
	next    chan *testAgent // a successor agent, once it serves
	// extra adds to an agent's subsystems (an arbiter client).
	extra func(name string, subs *Subsystems)
	// configure sets an agent's test seams before it serves.
	configure func(name string, a *Agent)
}

const pairSize = 4 << 20

func newPair(t *testing.T, failover ha.FailoverMode) *pair {
	return newPairWith(t, failover, job.ModeSync, 0)
}

// newPairWith: replication mode and a replication rate limit (bytes per
// second, 0: none).
func newPairWith(t *testing.T, failover ha.FailoverMode, mode string, rate int64) *pair {
	t.Helper()
	return newPairIn(t, t.TempDir(), failover, mode, rate)
}

// newPairIn: the agents' state and volumes under root (a file system
// that takes snapshots, for one).
func newPairIn(t *testing.T, root string, failover ha.FailoverMode, mode string, rate int64, opts ...func(*job.Spec)) *pair {
	t.Helper()
	os.WriteFile(filepath.Join(root, "mountinfo"), nil, 0o644)
	p := &pair{t: t, root: root, agents: map[string]*testAgent{}, live: map[string]*memLiveness{},
		repl: map[string]string{"vm1": freePort(t), "vm2": freePort(t)}, log: pairLog(), rate: rate}
	for _, name := range []string{"vm1", "vm2"} {
		p.live[name] = &memLiveness{alive: map[string]bool{"web": true}, n: map[string]uint64{}}
		p.start(name, "127.0.0.1:0")
	}
	e1, e2 := endpoint("vm1", p.agents["vm1"]), endpoint("vm2", p.agents["vm2"])
	e1.Repl, e2.Repl = p.repl["vm1"], p.repl["vm2"]
	spec := testSpec(t, e1, e2)
	spec.Failover = failover
	spec.Mode = mode
	if rate > 0 {
		// A rate-limited session can be silent for longer than 3 × 50 ms
		// between frames: the replication keepalive timeout follows the
		// monitor settings.
		spec.Monitor = job.Monitor{Interval: 250 * time.Millisecond, Missed: 8}
	}
	// Each volume in a directory of its own: snapshots of a file volume
	// live next to it.
	spec.Volume, spec.TargetVolume = filepath.Join(root, "data1", "vol1.img"), filepath.Join(root, "data2", "vol2.img")
	for _, v := range []string{spec.Volume, spec.TargetVolume} {
		if err := os.MkdirAll(filepath.Dir(v), 0o700); err != nil {
			t.Fatal(err)
		}
	}
	for _, o := range opts {
		o(&spec)
	}
	p.model = make([]byte, pairSize)
	rand.Read(p.model[:1<<20])
	if err := os.WriteFile(spec.Volume, p.model, 0o600); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	spec.Size = 0
	if _, err := p.agents["vm1"].client.CreateJob(ctx, spec); err != nil {
		t.Fatal(err)
	}
	spec.Size = pairSize // the target's file is created
	if _, err := p.agents["vm2"].client.CreateJob(ctx, spec); err != nil {
		t.Fatal(err)
	}
	p.spec = spec
	p.waitProtected("vm1")
	return p
}

// start starts (or restarts, at the same control address) an agent.
func (p *pair) start(name, addr string) {
	subs, configure := p.subsystems(name)
	p.agents[name] = startAgentWith(p.t, filepath.Join(p.root, name), addr, subs, configure)
}

// subsystems are what an agent of the pair runs with.
func (p *pair) subsystems(name string) (Subsystems, func(*Agent)) {
	vols := &NBDVolumes{Log: p.log, RunDir: filepath.Join(p.root, name, "run")}
	subs := Subsystems{Liveness: p.live[name], Volumes: vols}
	if p.extra != nil {
		p.extra(name, &subs)
	}
	return subs, func(a *Agent) {
		planes := &ReplPlanes{Log: p.log, Cert: a.Credentials.Cert, ReplListen: p.repl[name], StateDir: filepath.Join(p.root, name), RateLimit: p.rate}
		a.Subsystems.DataPlane = planes.Open
		a.Subsystems.ReplListener = planes
		if p.configure != nil {
			p.configure(name, a)
		}
	}
}

func peerOf(name string) string {
	if name == "vm1" {
		return "vm2"
	}
	return "vm1"
}

func (p *pair) status(name string) api.JobStatus {
	st, err := p.agents[name].client.Job(context.Background(), "web")
	if err != nil {
		p.t.Fatalf("status on %s: %v", name, err)
	}
	return st
}

// waitFor polls until f holds, failing with the last statuses of both
// sides.
func (p *pair) waitFor(what string, f func() bool) {
	p.t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !f() {
		if time.Now().After(deadline) {
			var b strings.Builder
			for _, n := range []string{"vm1", "vm2"} {
				if a := p.agents[n]; a != nil && a.cancel != nil {
					st, err := a.client.Job(context.Background(), "web")
					fmt.Fprintf(&b, "\n  %s: %s %s epoch %d consistent %t link %t reason %q last error %q actions %v data %q (%v)",
						n, st.HA.Role, st.HA.State, st.HA.Epoch, st.HA.Consistent, st.HA.LinkUp, st.HA.Reason, st.HA.LastError, st.Actions, st.Data.Note, err)
				}
			}
			p.t.Fatalf("timed out waiting for %s:%s", what, b.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// waitProtected waits until src is the replicating source and its peer
// the consistent, replicating target.
func (p *pair) waitProtected(src string) {
	p.t.Helper()
	p.waitFor(src+" protected by "+peerOf(src), func() bool {
		s, t := p.status(src), p.status(peerOf(src))
		return s.HA.Role == ha.RoleSource && s.HA.State == ha.StateReplicating && strings.HasPrefix(s.Data.Device, "unix:") &&
			t.HA.Role == ha.RoleTarget && t.HA.State == ha.StateReplicating && t.HA.Consistent
	})
}

// nbd connects to the volume served on name.
func (p *pair) nbd(name string) *nbdclient.Client {
	p.t.Helper()
	dev := p.status(name).Data.Device
	path, ok := strings.CutPrefix(dev, "unix:")
	if !ok {
		p.t.Fatalf("%s serves no volume (device %q)", name, dev)
	}
	c, err := nbdclient.Dial("unix", path, "web")
	if err != nil {
		p.t.Fatalf("connect to %s's volume: %v", name, err)
	}
	return c
}

// write writes n random 4 KiB..64 KiB blocks at random offsets through
// name's served volume and flushes; every acknowledged write goes into
// the model.
func (p *pair) write(name string, n int) {
	p.t.Helper()
	p.writeIn(name, n, pairSize)
}

// blockWrite is one acknowledged write.
type blockWrite struct {
	off  int
	data []byte
}

// writeIn is write within the volume's first limit bytes; it returns
// the writes in the order they were acknowledged.
func (p *pair) writeIn(name string, n, limit int) []blockWrite {
	p.t.Helper()
	var done []blockWrite
	c := p.nbd(name)
	defer c.Close()
	for range n {
		l := 4096 * (1 + randN(16))
		off := 4096 * randN((limit-l)/4096)
		buf := make([]byte, l)
		rand.Read(buf)
		if _, err := c.WriteAt(buf, int64(off)); err != nil {
			p.t.Fatalf("write %d bytes at %d on %s: %v", l, off, name, err)
		}
		p.modelMu.Lock()
		copy(p.model[off:], buf)
		p.modelMu.Unlock()
		done = append(done, blockWrite{off: off, data: buf})
	}
	if err := c.Flush(); err != nil {
		p.t.Fatalf("flush on %s: %v", name, err)
	}
	c.Close()
	p.waitFor("the writer gone from "+name, func() bool { return len(p.status(name).Data.Users) == 0 })
	return done
}

// check reads the whole volume through name's served volume and compares
// it with the model: no acknowledged write lost.
func (p *pair) check(name string) {
	p.t.Helper()
	c := p.nbd(name)
	defer c.Close()
	got := make([]byte, pairSize)
	for off := 0; off < pairSize; off += 1 << 20 {
		if _, err := c.ReadAt(got[off:off+1<<20], int64(off)); err != nil {
			p.t.Fatalf("read %s at %d: %v", name, off, err)
		}
	}
	p.modelMu.Lock()
	defer p.modelMu.Unlock()
	if !bytes.Equal(got, p.model) {
		for i := range got {
			if got[i] != p.model[i] {
				p.t.Fatalf("%s's volume differs from the acknowledged writes at byte %d", name, i)
			}
		}
	}
}

// verify runs doppel verify on the active source src: 0 differences.
func (p *pair) verify(src string) {
	p.t.Helper()
	res, err := p.agents[src].client.Verify(context.Background(), "web")
	if err != nil || !res.Equal || res.Differing != 0 {
		p.t.Fatalf("verify on %s: %+v, %v", src, res, err)
	}
}

func (p *pair) command(name string, cmd ha.EventType, opts api.CommandOptions) api.JobStatus {
	p.t.Helper()
	st, err := p.agents[name].client.Command(context.Background(), "web", cmd, opts)
	if err != nil {
		p.t.Fatalf("%s on %s: %v (actions %v)", cmd, name, err, st.Actions)
	}
	return st
}

// commandWhen retries cmd while it is refused (a peer's hello still in
// flight), for a bounded time.
func (p *pair) commandWhen(name string, cmd ha.EventType, opts api.CommandOptions) api.JobStatus {
	p.t.Helper()
	var err error
	var st api.JobStatus
	for range 100 {
		st, err = p.agents[name].client.Command(context.Background(), "web", cmd, opts)
		if !api.IsKind(err, "refused") {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	if err != nil {
		p.t.Fatalf("%s on %s: %v (actions %v)", cmd, name, err, st.Actions)
	}
	return st
}

// writer writes through name's served volume until stop is closed or a
// write fails (the volume stopped being served there: a switchover); the
// acknowledged writes go into the model. done receives how many were
// acknowledged.
func (p *pair) writer(name string, stop <-chan struct{}) (done <-chan int) {
	c := p.nbd(name)
	ch := make(chan int, 1)
	go func() {
		defer c.Close()
		n := 0
		defer func() { ch <- n }()
		for {
			select {
			case <-stop:
				return
			default:
			}
			l := 4096 * (1 + randN(4))
			off := 4096 * randN((pairSize-l)/4096)
			buf := make([]byte, l)
			rand.Read(buf)
			if _, err := c.WriteAt(buf, int64(off)); err != nil {
				return
			}
			p.modelMu.Lock()
			copy(p.model[off:], buf)
			p.modelMu.Unlock()
			n++
		}
	}()
	return ch
}

func randN(n int) int {
	v, _ := rand.Int(rand.Reader, big.NewInt(int64(n)))
	return int(v.Int64())
}

// pairLog is the replication engines' logger: shown with -v.
func pairLog() *slog.Logger {
	if testing.Verbose() {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))
	}
	return slog.New(slog.DiscardHandler)
}
