package agent

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/doppelha/doppel/daemon/api"
	"github.com/doppelha/doppel/daemon/arbiter"
	"github.com/doppelha/doppel/daemon/arbiter/etcdtest"
	"github.com/doppelha/doppel/daemon/ha"
	"github.com/doppelha/doppel/daemon/job"
)

// arbPair is a pair (two real agents, real replication over loopback)
// with a real etcd arbiter, where every path between the hosts and to
// etcd goes through a proxy a test can cut: each agent's control API and
// replication listener as its peer reaches them, and each agent's way to
// etcd. The probe is in memory (the pair's memLiveness).
type arbPair struct {
	*pair
	etcd  map[string]*etcdtest.Proxy // agent -> its way to etcd
	ctrl  map[string]*etcdtest.Proxy // agent's control API, as its peer reaches it
	replP map[string]*etcdtest.Proxy // agent's replication listener, as its peer reaches it
	clis  map[string]*arbiter.Client
}

const arbTTL = 2 * time.Second

func newArbPair(t *testing.T, mode string, suspend time.Duration) *arbPair {
	t.Helper()
	ep, _ := etcdtest.Start(t)
	root := t.TempDir()
	os.WriteFile(filepath.Join(root, "mountinfo"), nil, 0o644)
	ap := &arbPair{
		pair: &pair{t: t, root: root, agents: map[string]*testAgent{}, live: map[string]*memLiveness{},
			repl: map[string]string{"vm1": freePort(t), "vm2": freePort(t)}, log: pairLog()},
		etcd: map[string]*etcdtest.Proxy{}, ctrl: map[string]*etcdtest.Proxy{}, replP: map[string]*etcdtest.Proxy{},
		clis: map[string]*arbiter.Client{},
	}
	p := ap.pair
	for _, name := range []string{"vm1", "vm2"} {
		ap.etcd[name] = etcdtest.NewProxy(t, ep[len("http://"):])
		c, err := arbiter.Dial(arbiter.Config{Endpoints: []string{ap.etcd[name].URL()}, Prefix: "/t"})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		ap.clis[name] = c
		p.live[name] = &memLiveness{alive: map[string]bool{"web": true}, n: map[string]uint64{}}
		ap.start(name, "127.0.0.1:0")
		ap.ctrl[name] = etcdtest.NewProxy(t, p.agents[name].addr)
		ap.replP[name] = etcdtest.NewProxy(t, p.repl[name])
	}
	e1, e2 := endpoint("vm1", p.agents["vm1"]), endpoint("vm2", p.agents["vm2"])
	e1.Control, e2.Control = ap.ctrl["vm1"].Addr(), ap.ctrl["vm2"].Addr()
	e1.Repl, e2.Repl = ap.replP["vm1"].Addr(), ap.replP["vm2"].Addr()
	spec := testSpec(t, e1, e2)
	spec.Mode = mode
	// A 500 ms detector: sessions do not flap on a loaded test machine.
	spec.Monitor = job.Monitor{Interval: 100 * time.Millisecond, Missed: 5}
	spec.Arbiter, spec.LeaseTTL, spec.SuspendTimeout = job.ArbiterEtcd, arbTTL, suspend
	spec.Volume, spec.TargetVolume = filepath.Join(root, "vol1.img"), filepath.Join(root, "vol2.img")
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
	spec.Size = pairSize
	if _, err := p.agents["vm2"].client.CreateJob(ctx, spec); err != nil {
		t.Fatal(err)
	}
	p.spec = spec
	p.waitProtected("vm1")
	ap.waitHolding("vm1")
	return ap
}

func (ap *arbPair) start(name, addr string) {
	p := ap.pair
	vols := &NBDVolumes{Log: p.log, RunDir: filepath.Join(p.root, name, "run")}
	p.agents[name] = startAgentWith(p.t, filepath.Join(p.root, name), addr,
		Subsystems{Liveness: p.live[name], Volumes: vols, Arbiter: ap.clis[name]}, func(a *Agent) {
			planes := &ReplPlanes{Log: p.log, Cert: a.Credentials.Cert, ReplListen: p.repl[name], StateDir: filepath.Join(p.root, name)}
			a.Subsystems.DataPlane = planes.Open
			a.Subsystems.ReplListener = planes
		})
}

func (ap *arbPair) waitHolding(name string) {
	ap.t.Helper()
	ap.waitFor(name+" holding the lease", func() bool {
		st := ap.status(name)
		return st.Arbiter != nil && st.Arbiter.Holding
	})
}

// isolate cuts name off from its peer (both ways, every path) and, with
// etcdToo, from etcd.
func (ap *arbPair) isolate(name string, etcdToo bool) {
	for _, n := range []string{"vm1", "vm2"} {
		ap.ctrl[n].Cut()
		ap.replP[n].Cut()
		ap.live[n].set("web", false)
	}
	if etcdToo {
		ap.etcd[name].Cut()
	}
}

func (ap *arbPair) heal() {
	for _, n := range []string{"vm1", "vm2"} {
		ap.ctrl[n].Heal()
		ap.replP[n].Heal()
		ap.etcd[n].Heal()
		ap.live[n].set("web", true)
	}
}

// blockHistory is what a writer did to one 4 KiB block: the last value
// acknowledged, and the values written after it whose writes failed or
// were still in flight (the volume may hold any of them).
type blockHistory struct {
	acked [32]byte
	has   bool
	maybe [][32]byte
}

// histWriter writes random 4 KiB blocks through name's volume, one at a
// time, recording per block what was acknowledged; it stops at stop or at
// the first failed write, recording that one as maybe. lastAck is when the
// last acknowledged write returned, longest the longest acknowledged write.
type histWriter struct {
	mu      sync.Mutex
	blocks  map[int64]*blockHistory
	acks    int
	failed  error
	lastAck time.Time
	longest time.Duration
}

const histBlocks = 256 // 1 MiB of the volume, from its second MiB

func (ap *arbPair) histWriter(name string, stop <-chan struct{}) (*histWriter, <-chan struct{}) {
	h := &histWriter{blocks: map[int64]*blockHistory{}}
	c := ap.nbd(name)
	done := make(chan struct{})
	go func() {
		defer close(done)
		defer c.Close()
		for {
			select {
			case <-stop:
				return
			default:
			}
			blk := int64(randN(histBlocks))
			buf := make([]byte, 4096)
			rand.Read(buf)
			sum := sha256.Sum256(buf)
			h.mu.Lock()
			b := h.blocks[blk]
			if b == nil {
				b = &blockHistory{}
				h.blocks[blk] = b
			}
			b.maybe = append(b.maybe, sum) // in flight
			h.mu.Unlock()
			start := time.Now()
			_, err := c.WriteAt(buf, (1<<20)+blk*4096)
			h.mu.Lock()
			if err != nil {
				h.failed = err
				h.mu.Unlock()
				return
			}
			b.acked, b.has, b.maybe = sum, true, nil
			h.acks++
			h.lastAck = time.Now()
			h.longest = max(h.longest, h.lastAck.Sub(start))
			h.mu.Unlock()
		}
	}()
	return h, done
}

// checkOn reads every written block on name's volume: each must hold its
// last acknowledged value or one written after it (never acknowledged).
func (ap *arbPair) checkOn(name string, h *histWriter) {
	ap.t.Helper()
	c := ap.nbd(name)
	defer c.Close()
	h.mu.Lock()
	defer h.mu.Unlock()
	buf := make([]byte, 4096)
	lost := 0
	for blk, b := range h.blocks {
		if _, err := c.ReadAt(buf, (1<<20)+blk*4096); err != nil {
			ap.t.Fatalf("read block %d on %s: %v", blk, name, err)
		}
		got := sha256.Sum256(buf)
		ok := !b.has || got == b.acked
		for _, m := range b.maybe {
			ok = ok || got == m
		}
		if !ok {
			lost++
		}
	}
	if lost > 0 {
		ap.t.Fatalf("%s lacks %d acknowledged block writes (of %d blocks written, %d writes acknowledged)", name, lost, len(h.blocks), h.acks)
	}
}

// TestArbiterIsolatedSourceStopsAcknowledging: the source is cut off
// from its target and from etcd while an application writes (sync and
// async). It acknowledges nothing the target will not have (sync) and
// nothing after its lease deadline (both); the target promotes only after
// that lease expired; every write acknowledged on the source is on the
// promoted target (sync); held writes fail with EIO once the source learns
// it was superseded or the suspend timeout passes; when the partition
// heals the old source fences itself within seconds.
func TestArbiterIsolatedSourceStopsAcknowledging(t *testing.T) {
	for _, mode := range []string{job.ModeSync, job.ModeAsync} {
		t.Run(mode, func(t *testing.T) {
			ap := newArbPair(t, mode, 4*time.Second)
			stop := make(chan struct{})
			h, done := ap.histWriter("vm1", stop)
			time.Sleep(500 * time.Millisecond)
			cut := time.Now()
			ap.isolate("vm1", true)
			// vm2 detects vm1 down, waits for the lease, promotes.
			ap.waitFor("vm2 promoted", func() bool {
				st := ap.status("vm2")
				return st.HA.Role == ha.RoleSource && st.HA.Epoch == 2
			})
			promoted := time.Now()
			<-done // the writer stops at its first failed write
			close(stop)
			h.mu.Lock()
			lastAck, failed, acks := h.lastAck, h.failed, h.acks
			h.mu.Unlock()
			t.Logf("%s: %d writes acknowledged; cut at +0, last ack at %v, promoted at %v, writer failed with %v",
				mode, acks, lastAck.Sub(cut).Round(time.Millisecond), promoted.Sub(cut).Round(time.Millisecond), failed)
			if !errors.Is(failed, syscall.EIO) {
				t.Errorf("held write failed with %v, want EIO", failed)
			}
			if !lastAck.Before(promoted) {
				t.Errorf("vm1 acknowledged a write %v after vm2 was promoted", lastAck.Sub(promoted))
			}
			if lastAck.Sub(cut) > arbTTL {
				t.Errorf("vm1 acknowledged writes %v after it was cut off, beyond its lease TTL %v", lastAck.Sub(cut), arbTTL)
			}
			if mode == job.ModeSync {
				ap.checkOn("vm2", h)
			}
			// Heal: vm1 learns epoch 2 and stays fenced.
			healed := time.Now()
			ap.heal()
			ap.waitFor("vm1 fenced", func() bool {
				st := ap.status("vm1")
				return st.HA.State == ha.StateSuperseded && st.Data.Device == ""
			})
			t.Logf("%s: vm1 fenced %v after the heal", mode, time.Since(healed).Round(time.Millisecond))
			evs, err := ap.agents["vm2"].client.Events(context.Background(), "web")
			if err != nil || !hasEvent(evs, "promoted: the arbiter granted epoch 2") {
				t.Errorf("vm2's history lacks the promotion: %v %v", err, evs)
			}
		})
	}
}

func hasEvent(evs []api.Event, sub string) bool {
	for _, ev := range evs {
		if bytes.Contains([]byte(ev.Msg), []byte(sub)) {
			return true
		}
	}
	return false
}

// TestArbiterPartitionWithoutFailover: the hosts lose each other but both
// reach etcd. vm2 declares vm1 down and asks, the arbiter refuses while vm1
// holds its lease: no failover. A sync source records vm2 out of sync and
// goes on after the session timeout. After the heal vm2 resyncs, is
// recorded in sync again, and nothing was lost.
func TestArbiterPartitionWithoutFailover(t *testing.T) {
	ap := newArbPair(t, job.ModeSync, 30*time.Second)
	stop := make(chan struct{})
	h, done := ap.histWriter("vm1", stop)
	time.Sleep(300 * time.Millisecond)
	ap.isolate("vm1", false)
	ap.waitFor("vm2 campaigning", func() bool {
		st := ap.status("vm2")
		return st.Arbiter != nil && st.Arbiter.Campaign != ""
	})
	ap.waitFor("vm1 recorded vm2 out of sync", func() bool {
		st := ap.status("vm1")
		return st.Arbiter != nil && st.Arbiter.TargetOutOfSync
	})
	time.Sleep(2 * arbTTL) // longer than any lease: still no failover
	if st := ap.status("vm2"); st.HA.Role != ha.RoleTarget {
		t.Fatalf("vm2 took over while vm1 held its lease: %s %s", st.HA.Role, st.HA.State)
	}
	h.mu.Lock()
	acksDuring := h.acks
	h.mu.Unlock()
	ap.heal()
	ap.waitProtected("vm1")
	ap.waitFor("vm2 back in sync", func() bool {
		st := ap.status("vm1")
		return st.Arbiter != nil && !st.Arbiter.TargetOutOfSync
	})
	close(stop)
	<-done
	h.mu.Lock()
	t.Logf("acknowledged writes: %d by the partition's end, %d in all; longest write %v; writer error %v", acksDuring, h.acks, h.longest, h.failed)
	if h.failed != nil {
		t.Errorf("the writer failed: %v", h.failed)
	}
	h.mu.Unlock()
	ap.waitFor("vm2 caught up", func() bool { return ap.status("vm1").Data.DirtyBytes == 0 })
	ap.verify("vm1")
	ap.checkOn("vm1", h)
}

// TestArbiterEtcdLossHealthySyncPair: losing etcd does not stall a
// healthy sync pair (every write is acknowledged by the target); an async
// source holds writes from its lease deadline until etcd is back.
func TestArbiterEtcdLoss(t *testing.T) {
	for _, mode := range []string{job.ModeSync, job.ModeAsync} {
		t.Run(mode, func(t *testing.T) {
			ap := newArbPair(t, mode, 30*time.Second)
			stop := make(chan struct{})
			h, done := ap.histWriter("vm1", stop)
			time.Sleep(300 * time.Millisecond)
			ap.etcd["vm1"].Cut()
			ap.etcd["vm2"].Cut()
			time.Sleep(2 * arbTTL)
			ap.etcd["vm1"].Heal()
			ap.etcd["vm2"].Heal()
			ap.waitHolding("vm1")
			time.Sleep(300 * time.Millisecond)
			close(stop)
			<-done
			h.mu.Lock()
			defer h.mu.Unlock()
			t.Logf("%s: %d writes acknowledged, longest %v, error %v", mode, h.acks, h.longest, h.failed)
			if h.failed != nil {
				t.Fatalf("writer failed during the etcd outage: %v", h.failed)
			}
			if mode == job.ModeSync && h.longest > time.Second {
				t.Errorf("a sync write stalled %v during the etcd outage: the target acknowledged them", h.longest)
			}
			if mode == job.ModeAsync && h.longest < arbTTL/2 {
				t.Errorf("the longest async write took %v: an async source without its lease must hold writes", h.longest)
			}
			if st := ap.status("vm2"); st.HA.Role != ha.RoleTarget {
				t.Errorf("vm2 promoted during the etcd outage: %s", st.HA.State)
			}
		})
	}
}
