package replstate

import (
	"bytes"
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/doppelha/doppel/daemon/snapshot"
)

// TestBeforeInconsistent: a target about to be resynced calls the hook
// once, while consistent and with no frame applied, with the point its
// volume holds (the image is the one from before the partition); an
// interrupted resync does not call it again (the copy is not consistent)
// and AtPoint refuses until the resync completed.
func TestBeforeInconsistent(t *testing.T) {
	const size = 16 << 20
	dir := t.TempDir()
	aFile, bFile := filepath.Join(dir, "a.img"), filepath.Join(dir, "b.img")
	rng := rand.New(rand.NewPCG(7, 7))
	p := &pair{t: t, nw: &memNet{up: true}, size: size}
	var (
		mu     sync.Mutex
		calls  []snapshot.Point
		images [][]byte
	)
	p.startTargetWith(TargetConfig{Dir: filepath.Join(dir, "b"), BeforeInconsistent: func(pt snapshot.Point, why string) error {
		img, err := os.ReadFile(bFile)
		mu.Lock()
		defer mu.Unlock()
		calls = append(calls, pt)
		images = append(images, img)
		t.Logf("before inconsistent at %+v: %s", pt, why)
		return err
	}}, bFile)
	cfg := SourceConfig{Dir: filepath.Join(dir, "a"), MemQueue: 1 << 20, DiskQueue: -1, ResyncRate: 1}
	p.startSource(cfg, aFile)
	p.converge(20 * time.Second)
	for off := int64(0); off < 4<<20; off += 64 << 10 {
		p.write(off, randBytes(rng, 64<<10))
	}
	p.converge(20 * time.Second)
	mu.Lock()
	first := len(calls) // the initial full mirror of a fresh target: nothing consistent to keep
	mu.Unlock()
	if first != 0 {
		t.Fatalf("hook called %d times for the mirror of a fresh target", first)
	}
	var at snapshot.Point
	if err := p.tgt.AtPoint(func(pt snapshot.Point) error { at = pt; return nil }); err != nil {
		t.Fatal(err)
	}
	before, _ := os.ReadFile(bFile)
	p.nw.set(false)
	for off := int64(0); off < 12<<20; off += 1 << 20 {
		p.write(off, randBytes(rng, 1<<20))
	}
	p.nw.set(true)
	// (ResyncDone still holds the last in-stream pass's count: wait for
	// the target to have turned inconsistent, then for progress.)
	for deadline := time.Now().Add(30 * time.Second); p.tgt.Status().Data == "consistent" || !p.src.Status().ResyncActive; {
		if time.Now().After(deadline) {
			t.Fatalf("resync does not start: %+v", p.src.Status())
		}
		time.Sleep(5 * time.Millisecond)
	}
	p.nw.set(false)
	time.Sleep(200 * time.Millisecond)
	if err := p.tgt.AtPoint(func(snapshot.Point) error { return nil }); !errors.Is(err, ErrNotConsistent) {
		es, _, _ := p.tgt.eng.Status()
		t.Fatalf("AtPoint mid-resync: %v (target %+v, engine %+v, source %+v)", err, p.tgt.Status(), es, p.src.Status())
	}
	p.nw.set(true)
	p.converge(60 * time.Second)
	mu.Lock()
	defer mu.Unlock()
	if len(calls) != 1 {
		t.Fatalf("hook called %d times, want once (before the first resync handshake)", len(calls))
	}
	if calls[0].Seq != at.Seq || calls[0].Generation != at.Generation || calls[0].Stream != at.Stream {
		t.Fatalf("hook point %+v, the target held %+v", calls[0], at)
	}
	if !bytes.Equal(images[0], before) {
		t.Fatal("the volume had changed when the hook ran")
	}
	if err := p.tgt.AtPoint(func(snapshot.Point) error { return nil }); err != nil {
		t.Fatalf("AtPoint after the resync: %v", err)
	}
}

// TestBeforeInconsistentRefuses: a hook that fails refuses the resync
// (the target stays consistent, with its data; the source says why and
// stops, as at any refusal); once it succeeds, the resync goes through.
func TestBeforeInconsistentRefuses(t *testing.T) {
	const size = 8 << 20
	dir := t.TempDir()
	aFile, bFile := filepath.Join(dir, "a.img"), filepath.Join(dir, "b.img")
	rng := rand.New(rand.NewPCG(8, 8))
	p := &pair{t: t, nw: &memNet{up: true}, size: size}
	var mu sync.Mutex
	fail := true
	p.startTargetWith(TargetConfig{Dir: filepath.Join(dir, "b"), BeforeInconsistent: func(snapshot.Point, string) error {
		mu.Lock()
		defer mu.Unlock()
		if fail {
			return errors.New("no space for the snapshot")
		}
		return nil
	}}, bFile)
	cfg := SourceConfig{Dir: filepath.Join(dir, "a"), MemQueue: 1 << 20, DiskQueue: -1}
	p.startSource(cfg, aFile)
	p.converge(20 * time.Second)
	p.nw.set(false)
	for off := int64(0); off < 4<<20; off += 1 << 20 {
		p.write(off, randBytes(rng, 1<<20))
	}
	before, _ := os.ReadFile(bFile)
	p.nw.set(true)
	time.Sleep(time.Second)
	if st := p.tgt.Status(); st.Data != "consistent" {
		t.Fatalf("target %s after a refused resync", st.Data)
	}
	if now, _ := os.ReadFile(bFile); !bytes.Equal(now, before) {
		t.Fatal("the target was written although the resync was refused")
	}
	if st := p.src.Status(); !strings.Contains(st.Refusal, "no space for the snapshot") {
		t.Fatalf("the source does not say why: %+v", st)
	}
	mu.Lock()
	fail = false
	mu.Unlock()
	// A refused source stops (like any refusal): restarted, it goes
	// through.
	p.stopSource()
	p.startSource(cfg, aFile)
	p.converge(60 * time.Second)
	p.stopSource()
	p.stopTarget()
	sameFiles(t, aFile, bFile)
}
