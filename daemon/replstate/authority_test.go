package replstate

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/doppelha/doppel/blockdev"
	"github.com/doppelha/doppel/daemon/repl/wire"
)

// gate is a test Authority: acknowledgements without the target wait
// until it is opened, or fail once it is closed for good.
type gate struct {
	mu      sync.Mutex
	open    bool
	failErr error
	changed chan struct{}
	asked   atomic.Int64 // AckLocal calls
	inSync  atomic.Int64 // TargetInSync calls
}

func newGate(open bool) *gate { return &gate{open: open, changed: make(chan struct{})} }

func (g *gate) set(open bool, failErr error) {
	g.mu.Lock()
	g.open, g.failErr = open, failErr
	close(g.changed)
	g.changed = make(chan struct{})
	g.mu.Unlock()
}

func (g *gate) AckLocal(ctx context.Context) error {
	g.asked.Add(1)
	for {
		g.mu.Lock()
		open, ferr, ch := g.open, g.failErr, g.changed
		g.mu.Unlock()
		switch {
		case ferr != nil:
			return ferr
		case open:
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-ch:
		}
	}
}

func (g *gate) TargetInSync(func() bool) { g.inSync.Add(1) }

// applyAsync runs one write and returns its result on a channel.
func applyAsync(s *Source, off int64, data []byte) chan error {
	done := make(chan error, 1)
	go func() {
		done <- s.Apply(context.Background(), &blockdev.Mutation{Op: blockdev.OpWrite, Offset: off, Length: int64(len(data)), Data: data})
	}()
	return done
}

// TestAuthorityHoldsAcks: async mode, every acknowledgement waits for the
// authority (the lease); sync mode, writes the target acknowledged do not
// ask it, writes tracked without the target do, and wait while it says no.
// Without the gate an isolated source would acknowledge them: this test
// fails if Apply returns before the authority allows it.
func TestAuthorityHoldsAcks(t *testing.T) {
	const size = 4 << 20
	for _, mode := range []wire.Mode{wire.ModeAsync, wire.ModeSync} {
		t.Run(mode.String(), func(t *testing.T) {
			dir := t.TempDir()
			aFile, bFile := filepath.Join(dir, "a.img"), filepath.Join(dir, "b.img")
			rng := rand.New(rand.NewPCG(7, uint64(mode)))
			g := newGate(true)
			p := &pair{t: t, nw: &memNet{up: true}, size: size}
			p.startTarget(filepath.Join(dir, "b"), bFile, "")
			p.startSource(SourceConfig{Dir: filepath.Join(dir, "a"), Mode: mode, SyncTimeout: 200 * time.Millisecond, Authority: g}, aFile)
			p.converge(20 * time.Second)
			if mode == wire.ModeSync {
				deadline := time.Now().Add(5 * time.Second)
				for g.inSync.Load() == 0 {
					if time.Now().After(deadline) {
						t.Fatal("the target converged but the authority was never told it is in sync")
					}
					time.Sleep(10 * time.Millisecond)
				}
			} else if g.inSync.Load() != 0 {
				t.Fatal("an async source told the authority its target is in sync")
			}
			before := g.asked.Load()
			p.write(0, randBytes(rng, 4096))
			asked := g.asked.Load() - before
			if mode == wire.ModeSync && asked != 0 {
				t.Fatalf("a sync write the target acknowledged asked the authority %d times", asked)
			}
			if mode == wire.ModeAsync && asked != 1 {
				t.Fatalf("an async write asked the authority %d times, want 1", asked)
			}
			// Cut the target off and close the gate: no acknowledgement.
			p.nw.set(false)
			g.set(false, nil)
			done := applyAsync(p.src, 65536, randBytes(rng, 4096))
			select {
			case err := <-done:
				t.Fatalf("write acknowledged (err %v) without the target and without the authority", err)
			case <-time.After(time.Second):
			}
			// The lease comes back: it completes.
			g.set(true, nil)
			select {
			case err := <-done:
				if err != nil {
					t.Fatal(err)
				}
			case <-time.After(10 * time.Second):
				t.Fatal("write still held after the authority allowed it")
			}
			// Superseded: held writes fail with EIO.
			g.set(false, nil)
			done = applyAsync(p.src, 131072, randBytes(rng, 4096))
			time.Sleep(300 * time.Millisecond)
			g.set(false, fmt.Errorf("%w: superseded by epoch 2", syscall.EIO))
			select {
			case err := <-done:
				if !errors.Is(err, syscall.EIO) {
					t.Fatalf("held write after superseded: %v, want EIO", err)
				}
			case <-time.After(10 * time.Second):
				t.Fatal("held write never failed")
			}
			p.stopSource()
			p.stopTarget()
		})
	}
}

// TestEpochFencing: a target that knows a newer epoch refuses an old
// source and tells it the epoch; a source with a newer epoch makes the
// target learn it.
func TestEpochFencing(t *testing.T) {
	const size = 1 << 20
	dir := t.TempDir()
	aFile, bFile := filepath.Join(dir, "a.img"), filepath.Join(dir, "b.img")
	var tgtEpoch atomic.Uint64
	tgtEpoch.Store(2)
	var learned atomic.Uint64
	p := &pair{t: t, nw: &memNet{up: true}, size: size}
	p.startTargetWith(TargetConfig{Dir: filepath.Join(dir, "b"), Epoch: tgtEpoch.Load, NewerEpoch: learned.Store}, bFile)
	superseded := make(chan uint64, 1)
	p.startSource(SourceConfig{Dir: filepath.Join(dir, "a"), Mode: wire.ModeAsync,
		Epoch: func() uint64 { return 1 }, Superseded: func(e uint64) { superseded <- e }}, aFile)
	select {
	case e := <-superseded:
		if e != 2 {
			t.Fatalf("superseded by %d, want 2", e)
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("old source never learned it was superseded: %+v", p.src.Status())
	}
	err := <-p.srcErr
	if !errors.Is(err, ErrSuperseded) {
		t.Fatalf("Run returned %v, want ErrSuperseded", err)
	}
	p.src.Close()
	// A source at a newer epoch (after a failback): the target learns it.
	p.startSource(SourceConfig{Dir: filepath.Join(dir, "a2"), Mode: wire.ModeAsync, Epoch: func() uint64 { return 3 }}, aFile)
	deadline := time.Now().Add(10 * time.Second)
	for learned.Load() != 3 {
		if time.Now().After(deadline) {
			t.Fatalf("target learned epoch %d, want 3", learned.Load())
		}
		time.Sleep(20 * time.Millisecond)
	}
	p.stopSource()
	p.stopTarget()
}

// TestRefuseOlder: a promoted side answers an older source with its epoch
// (the source fences itself), and a newer one with nothing it would take
// for a refusal (it retries).
func TestRefuseOlder(t *testing.T) {
	const size = 1 << 20
	dir := t.TempDir()
	nw := &memNet{up: true}
	l := nw.listen()
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go RefuseOlder(c, 5, "vm2 was promoted")
		}
	}()
	p := &pair{t: t, nw: nw, size: size}
	superseded := make(chan uint64, 1)
	p.startSource(SourceConfig{Dir: filepath.Join(dir, "old"), Mode: wire.ModeAsync,
		Epoch: func() uint64 { return 4 }, Superseded: func(e uint64) { superseded <- e }}, filepath.Join(dir, "a.img"))
	select {
	case e := <-superseded:
		if e != 5 {
			t.Fatalf("told epoch %d, want 5", e)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the older source was never told it was superseded")
	}
	if err := <-p.srcErr; !errors.Is(err, ErrSuperseded) {
		t.Fatalf("older source stopped with %v", err)
	}
	p.src.Close()
	// A newer source is not refused: it keeps trying.
	p.startSource(SourceConfig{Dir: filepath.Join(dir, "new"), Mode: wire.ModeAsync, Epoch: func() uint64 { return 6 }}, filepath.Join(dir, "b.img"))
	select {
	case err := <-p.srcErr:
		t.Fatalf("newer source stopped: %v", err)
	case <-time.After(time.Second):
	}
	if st := p.src.Status(); st.Refusal != "" {
		t.Fatalf("newer source refused: %s", st.Refusal)
	}
	p.stopSource()
}
