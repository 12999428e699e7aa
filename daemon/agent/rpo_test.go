package agent

import (
	"context"
	"crypto/rand"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/doppelha/doppel/blockdev"
	"github.com/doppelha/doppel/daemon/api"
	"github.com/doppelha/doppel/daemon/ha"
	"github.com/doppelha/doppel/daemon/job"
	"github.com/doppelha/doppel/daemon/repl"
	"github.com/doppelha/doppel/daemon/replstate"
)

func TestRPOEstimator(t *testing.T) {
	t0 := time.Unix(1000, 0)
	at := func(ms int) time.Time { return t0.Add(time.Duration(ms) * time.Millisecond) }
	var e rpoEstimator
	in := rpoInput{Stream: 1, Connected: true}
	check := func(ms int, in rpoInput, want time.Duration) {
		t.Helper()
		if got := e.observe(at(ms), in); got != want {
			t.Fatalf("at %d ms %+v: RPO %v, want %v", ms, in, got, want)
		}
	}
	// Async: everything applied: 0.
	in.Last, in.Applied = 10, 10
	check(0, in, 0)
	// Writes 11..20 not applied, seen at 100 ms; 21..30 at 200 ms.
	in.Last = 20
	check(100, in, 0)
	in.Last = 30
	check(200, in, 100*time.Millisecond)
	check(1100, in, time.Second)
	// The target applies up to 20: the oldest unapplied was seen at 200.
	in.Applied = 20
	check(1200, in, time.Second)
	in.Applied = 30
	check(1300, in, 0)
	// Sync and connected: acknowledged writes are on the target.
	s := in
	s.Sync, s.Last = true, 40
	check(1400, s, 0)
	// The link drops: writes are tracked in the bitmap from 1500 on.
	s.Connected, s.AtRisk, s.Dirty, s.Applied = false, true, 0, 40
	check(1500, s, 0) // nothing written since
	s.Dirty = 4096
	check(1600, s, 0)
	check(2600, s, time.Second)
	// Reconnected, resync running: still at risk.
	s.Connected = true
	check(3600, s, 2*time.Second)
	s.AtRisk, s.Dirty = false, 0
	check(3700, s, 0)
	// Sync, not connected: queued writes acknowledged locally count.
	s.Connected, s.AtRisk, s.Last = false, true, 45
	check(3800, s, 0)
	check(4300, s, 500*time.Millisecond)
	// Async: a stream dropped with unapplied writes keeps their date.
	in = rpoInput{Stream: 1, Last: 50, Applied: 40, Connected: true}
	e = rpoEstimator{}
	check(4000, in, 0)
	in = rpoInput{Stream: 2, Last: 0, Applied: 0, AtRisk: true, Dirty: 8192}
	check(4500, in, 500*time.Millisecond)
	// Bounded memory: many samples, the oldest is kept.
	e = rpoEstimator{}
	in = rpoInput{Stream: 1, Connected: true}
	for i := range 3 * maxRPOSamples {
		in.Last = uint64(i + 1)
		e.observe(at(5000+i), in)
	}
	if len(e.samples) > maxRPOSamples {
		t.Fatalf("%d samples kept", len(e.samples))
	}
	check(5000+3*maxRPOSamples, in, time.Duration(3*maxRPOSamples)*time.Millisecond)
}

// stallProxy forwards TCP connections to addr; while stalled it forwards
// nothing in either direction (the connection stays up).
type stallProxy struct {
	l       net.Listener
	stalled atomic.Bool
	mu      sync.Mutex
	conns   []net.Conn
}

func newStallProxy(t *testing.T, addr string) *stallProxy {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &stallProxy{l: l}
	t.Cleanup(func() {
		l.Close()
		p.mu.Lock()
		for _, c := range p.conns {
			c.Close()
		}
		p.mu.Unlock()
	})
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			u, err := net.Dial("tcp", addr)
			if err != nil {
				c.Close()
				continue
			}
			p.mu.Lock()
			p.conns = append(p.conns, c, u)
			p.mu.Unlock()
			go p.copy(u, c)
			go p.copy(c, u)
		}
	}()
	return p
}

func (p *stallProxy) copy(dst, src net.Conn) {
	defer dst.Close()
	defer src.Close()
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		for p.stalled.Load() {
			time.Sleep(5 * time.Millisecond)
		}
		if n > 0 {
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

func (p *stallProxy) addr() string { return p.l.Addr().String() }

// planeSide is one agent's data plane of a job, without the agent.
type planeSide struct {
	planes *ReplPlanes
	fp     string
	dir    string
}

func newPlaneSide(t *testing.T, root, name, replListen string) *planeSide {
	dir := filepath.Join(root, name)
	cert, fp, err := repl.LoadOrCreateCert(filepath.Join(dir, "tls"))
	if err != nil {
		t.Fatal(err)
	}
	log := slog.New(slog.DiscardHandler)
	if testing.Verbose() {
		log = slog.New(slog.NewTextHandler(os.Stderr, nil)).With("agent", name)
	}
	return &planeSide{planes: &ReplPlanes{Log: log, Cert: cert, ReplListen: replListen, StateDir: dir}, fp: fp, dir: dir}
}

func (ps *planeSide) open(t *testing.T, spec job.Spec, self string) *replPlane {
	t.Helper()
	b, err := blockdev.OpenExclusive(spec.VolumeOn(self), spec.Size)
	if err != nil {
		t.Fatal(err)
	}
	dp, err := ps.planes.Open(job.Record{Spec: spec, Self: self}, JobVolume{Backend: b}, Fencing{}, func(ha.Event) {})
	if err != nil {
		b.Close()
		t.Fatal(err)
	}
	t.Cleanup(func() { dp.Close(); b.Close() })
	return dp.(*replPlane)
}

func writeAt(t *testing.T, m blockdev.Mutator, off int64, n int) {
	t.Helper()
	b := make([]byte, n)
	rand.Read(b)
	if err := m.Apply(context.Background(), &blockdev.Mutation{Op: blockdev.OpWrite, Offset: off, Length: int64(n), Data: b}); err != nil {
		t.Fatalf("write at %d: %v", off, err)
	}
}

// TestRPOAsyncStalledTarget: in async mode, with the target stalled (the
// connection up, nothing flowing), the RPO estimate grows with the age of
// the oldest unapplied write; once the target catches up it is back to 0.
func TestRPOAsyncStalledTarget(t *testing.T) {
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
	writeAt(t, m, 0, 64<<10)
	waitFor(t, "RPO 0 with the target following", func() bool { return ds.Status().RPO == 0 })

	proxy.stalled.Store(true)
	stalledAt := time.Now()
	for i := range 8 {
		writeAt(t, m, int64(i+1)<<16, 64<<10)
	}
	time.Sleep(time.Second)
	r1 := ds.Status().RPO
	time.Sleep(500 * time.Millisecond)
	r2 := ds.Status().RPO
	elapsed := time.Since(stalledAt)
	t.Logf("stalled: RPO %v after ~1 s, %v after ~1.5 s (stall began %v ago)", r1, r2, elapsed)
	if r1 < 800*time.Millisecond || r2 < r1+400*time.Millisecond || r2 > elapsed+50*time.Millisecond {
		t.Fatalf("RPO while stalled: %v then %v (stalled %v ago): want ≈1 s then ≈1.5 s", r1, r2, elapsed)
	}
	proxy.stalled.Store(false)
	resumed := time.Now()
	waitFor(t, "RPO back to 0 after catch-up", func() bool { return ds.Status().RPO == 0 })
	t.Logf("RPO back to 0 %v after the stall ended", time.Since(resumed).Round(time.Millisecond))
}

// TestSourceDataQueueParts: the status's queue memory and disk are the
// two parts of the source's queue, not the memory figure counting the
// disk part again (the backlog holds both).
func TestSourceDataQueueParts(t *testing.T) {
	var st api.DataStatus
	sourceData(&st, replstate.Status{QueueMemBytes: 128 << 20, QueueDiskBytes: 64 << 20, BacklogBytes: 192 << 20, BacklogEntries: 3})
	if st.QueueMemory != 128<<20 || st.QueueDisk != 64<<20 {
		t.Fatalf("queue memory %d, disk %d; want 128 MiB and 64 MiB", st.QueueMemory, st.QueueDisk)
	}
	if st.Note != "3 writes not yet acknowledged by the target" {
		t.Fatalf("note %q", st.Note)
	}
}
