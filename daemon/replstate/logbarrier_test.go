package replstate

import (
	"path/filepath"
	"testing"
	"time"

	"github.com/doppelha/doppel/daemon/bitmap"
	"github.com/doppelha/doppel/daemon/repl/wire"
)

// TestLogBarrierAtHalfTheLog: the source sends a durability barrier for
// the activity log only once half of the log's slots are hot, and the log
// it counts is the one it has (256 slots by default, not a stale 64):
// writes left hot in 40 extents (more than half of 64, less than half of
// 256) bring no barrier, 140 do.
func TestLogBarrierAtHalfTheLog(t *testing.T) {
	const extents = 160
	ext := int64(bitmap.DefaultExtentSize)
	dir := t.TempDir()
	p := &pair{t: t, nw: &memNet{up: true}, size: extents * ext}
	p.startTarget(filepath.Join(dir, "b"), filepath.Join(dir, "b.img"), "")
	p.startSource(SourceConfig{Dir: filepath.Join(dir, "a"), Mode: wire.ModeSync}, filepath.Join(dir, "a.img"))
	defer p.stopTarget()
	defer p.stopSource()
	p.converge(20 * time.Second)
	if got := p.src.al.Slots(); got != bitmap.DefaultSlots {
		t.Fatalf("log slots %d, want the default %d", got, bitmap.DefaultSlots)
	}
	durable := func() uint64 { _, d := p.src.engine().Progress(); return d }
	hotWrites := func(from, to int) {
		for i := from; i < to; i++ {
			p.write(int64(i)*ext, []byte("hot"))
		}
	}
	hotWrites(0, 40)
	d0, last := durable(), p.src.engine().LastSeq()
	// watch looks every 50 ms and sends a log barrier at most every
	// 100 ms: 400 ms would see several.
	time.Sleep(400 * time.Millisecond)
	if hot := p.src.Status().HotExtents; hot < 40 {
		t.Fatalf("%d extents hot after writes in 40", hot)
	}
	if d := durable(); d >= last {
		t.Fatalf("durable point moved from %d to %d (writes up to %d) with 40 of %d slots hot: a barrier before half the log", d0, d, last, bitmap.DefaultSlots)
	}
	hotWrites(40, 140)
	last = p.src.engine().LastSeq()
	deadline := time.Now().Add(5 * time.Second)
	for durable() < last {
		if time.Now().After(deadline) {
			t.Fatalf("durable point %d, writes up to %d: no barrier with 140 of %d slots hot", durable(), last, bitmap.DefaultSlots)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
