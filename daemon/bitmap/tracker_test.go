package bitmap

import (
	"math/rand/v2"
	"runtime"
	"testing"
	"time"
)

func TestTrackerConnected(t *testing.T) {
	bm, al := openPair(t, t.TempDir(), 256*mib, LogOptions{})
	defer al.Close()
	tr := NewTracker(bm, al)
	s0 := al.Syncs()
	for i := range 100 {
		off := int64(i%8) * 4096
		if err := tr.Mark(off, 4096); err != nil {
			t.Fatal(err)
		}
		tr.Sequenced(uint64(i+1), off, 4096)
	}
	tr.Acked(100)
	if bm.DirtyBytes() != 0 || tr.Pending() != 0 || al.Syncs()-s0 != 1 {
		t.Fatalf("dirty %d pending %d syncs %d", bm.DirtyBytes(), tr.Pending(), al.Syncs()-s0)
	}
	// Not queued: straight to the bitmap.
	tr.Mark(8*mib, 4096)
	tr.Sequenced(0, 8*mib, 4096)
	if !bm.IsDirty(8*mib, 1) || bm.DirtyChunks() != 1 {
		t.Fatal("unqueued change not in the bitmap")
	}
}

func TestTrackerNeverWaitsForThePeer(t *testing.T) {
	bm, al := openPair(t, t.TempDir(), 1024*mib, LogOptions{Slots: 4})
	defer al.Close()
	tr := NewTracker(bm, al)
	done := make(chan struct{})
	go func() {
		defer close(done)
		// The peer never acknowledges: 40 queued changes in 40 extents.
		for i := range 40 {
			off := int64(i) * 4 * mib
			if err := tr.Mark(off, 4096); err != nil {
				t.Error(err)
				return
			}
			tr.Sequenced(uint64(i+1), off, 4096)
		}
	}()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("Mark blocked waiting for acknowledgements")
	}
	if tr.Pending() > 4 || bm.DirtyChunks() < 36 {
		t.Fatalf("pending %d, dirty chunks %d: old changes not spilled to the bitmap", tr.Pending(), bm.DirtyChunks())
	}
}

// TestTrackerCrashCoverage crashes at random points and checks the promise:
// every change not acknowledged by the peer is dirty after reopening.
func TestTrackerCrashCoverage(t *testing.T) {
	r := rand.New(rand.NewPCG(11, 12))
	for iter := range 15 {
		dir := t.TempDir()
		bm, al := openPair(t, dir, 1024*mib, LogOptions{Slots: 1 + r.IntN(8)})
		tr := NewTracker(bm, al)
		type change struct {
			seq    uint64
			off, n int64
		}
		var unacked []change
		seq := uint64(0)
		for range 200 {
			switch r.IntN(6) {
			case 0:
				if len(unacked) > 0 {
					k := r.IntN(len(unacked))
					tr.Acked(unacked[k].seq)
					unacked = unacked[k+1:]
				}
			default:
				off, n := r.Int64N(1024*mib-1<<20), 1+r.Int64N(256<<10)
				if err := tr.Mark(off, n); err != nil {
					t.Fatal(err)
				}
				seq++
				if r.IntN(5) == 0 {
					tr.Sequenced(0, off, n)
				} else {
					tr.Sequenced(seq, off, n)
				}
				unacked = append(unacked, change{seq, off, n})
			}
		}
		crashed := crashCopy(t, dir)
		b2, a2 := openPair(t, crashed, 1024*mib, LogOptions{Slots: 8})
		for _, c := range unacked {
			for o := c.off; o < c.off+c.n; o += 64 << 10 {
				if !b2.IsDirty(o, 1) {
					t.Fatalf("iter %d: unacknowledged change %d at %d not dirty after crash", iter, c.seq, o)
				}
			}
		}
		a2.Close()
		b2.Close()
		al.Close()
		bm.Close()
	}
}

func TestTrackerHugeRange(t *testing.T) {
	dir := t.TempDir()
	bm, al := openPair(t, dir, 1024*mib, LogOptions{Slots: 4})
	defer al.Close()
	tr := NewTracker(bm, al)
	// A whole-device discard spans 256 extents; the log has 4 slots.
	if err := tr.Mark(0, 1024*mib); err != nil {
		t.Fatalf("huge range: %v", err)
	}
	tr.Sequenced(1, 0, 1024*mib)
	tr.Acked(1)
	if al.HotExtents() != 0 || bm.DirtyBytes() != 1024*mib {
		t.Fatalf("hot %d dirty %d", al.HotExtents(), bm.DirtyBytes())
	}
	// Durable without Close: a crash keeps it.
	b2, a2 := openPair(t, crashCopy(t, dir), 1024*mib, LogOptions{Slots: 4})
	defer a2.Close()
	if b2.DirtyBytes() != 1024*mib {
		t.Fatalf("after crash: dirty %d", b2.DirtyBytes())
	}
	// Normal writes still take the log and leave no refs behind.
	tr.Mark(4096, 4096)
	tr.Sequenced(2, 4096, 4096)
	tr.Acked(2)
	if tr.Pending() != 0 {
		t.Fatal("pending after ack")
	}
}

func TestBitmapMemoryIsBounded(t *testing.T) {
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	bm, _ := New(1<<40, 64<<10) // 1 TiB at 64 KiB: 16 Mi bits = 2 MiB
	r := rand.New(rand.NewPCG(1, 1))
	for range 200000 {
		bm.Set(r.Int64N(1<<40), 4096)
	}
	runtime.ReadMemStats(&after)
	if grew := after.TotalAlloc - before.TotalAlloc; grew > 2<<20+64<<10 {
		t.Fatalf("1 TiB bitmap plus 200k writes allocated %d bytes, want ~2 MiB", grew)
	}
	runtime.KeepAlive(bm)
}

// TestTrackerCovered: changes covered elsewhere (after < seq <= upTo)
// leave the log; the others stay until acknowledged.
func TestTrackerCovered(t *testing.T) {
	bm, al := openPair(t, t.TempDir(), 256*mib, LogOptions{})
	defer al.Close()
	tr := NewTracker(bm, al)
	for i := range 10 {
		off := int64(i) * 4 * mib // one extent each
		if err := tr.Mark(off, 4096); err != nil {
			t.Fatal(err)
		}
		tr.Sequenced(uint64(i+1), off, 4096)
	}
	tr.Covered(3, 7)
	if err := al.Clean(); err != nil {
		t.Fatal(err)
	}
	if tr.Pending() != 6 || al.HotExtents() != 6 {
		t.Fatalf("pending %d, hot %d: want 6 and 6 (seqs 1-3 and 8-10)", tr.Pending(), al.HotExtents())
	}
	for _, e := range al.Hot() {
		if i := e.Off / (4 * mib); i >= 3 && i < 7 {
			t.Fatalf("covered change %d still hot", i+1)
		}
	}
	tr.Acked(10)
	if err := al.Clean(); err != nil {
		t.Fatal(err)
	}
	if tr.Pending() != 0 || al.HotExtents() != 0 || bm.DirtyBytes() != 0 {
		t.Fatalf("after the ack: pending %d hot %d dirty %d", tr.Pending(), al.HotExtents(), bm.DirtyBytes())
	}
}
