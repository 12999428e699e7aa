package bitmap

import (
	"errors"
	"hash/crc32"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"
)

const mib = 1 << 20

func openPair(t testing.TB, dir string, size int64, opt LogOptions) (*Bitmap, *ActivityLog) {
	t.Helper()
	bm, err := Open(filepath.Join(dir, "bitmap"), size, 64<<10)
	if err != nil {
		t.Fatal(err)
	}
	al, err := OpenLog(filepath.Join(dir, "al"), bm, opt)
	if err != nil {
		t.Fatal(err)
	}
	return bm, al
}

// crashCopy copies the state files as a crash would leave them (whatever has
// reached the files), into a fresh directory.
func crashCopy(t *testing.T, from string) string {
	t.Helper()
	to := t.TempDir()
	for _, n := range []string{"bitmap", "al"} {
		src, err := os.Open(filepath.Join(from, n))
		if err != nil {
			t.Fatal(err)
		}
		dst, _ := os.Create(filepath.Join(to, n))
		if _, err := io.Copy(dst, src); err != nil {
			t.Fatal(err)
		}
		src.Close()
		dst.Close()
	}
	return to
}

func TestBeginSyncsOnlyForColdExtents(t *testing.T) {
	_, al := openPair(t, t.TempDir(), 256*mib, LogOptions{})
	defer al.Close()
	s0 := al.Syncs()
	if err := al.Begin(0, 4096); err != nil {
		t.Fatal(err)
	}
	al.End(0, 4096)
	if got := al.Syncs() - s0; got != 1 {
		t.Fatalf("cold write: %d syncs, want 1", got)
	}
	for i := range 100 {
		off := int64(i) * 4096 % (4 * mib)
		if err := al.Begin(off, 4096); err != nil {
			t.Fatal(err)
		}
		al.End(off, 4096)
	}
	if got := al.Syncs() - s0; got != 1 {
		t.Fatalf("hot writes: %d syncs in total, want 1", got)
	}
	// A write straddling two extents, one cold: one more sync.
	if err := al.Begin(4*mib-4096, 8192); err != nil {
		t.Fatal(err)
	}
	al.End(4*mib-4096, 8192)
	if got := al.Syncs() - s0; got != 2 {
		t.Fatalf("straddling write: %d syncs, want 2", got)
	}
	if al.HotExtents() != 2 {
		t.Fatalf("hot extents %d, want 2", al.HotExtents())
	}
	if err := al.Begin(0, 100*mib); err != nil {
		t.Fatalf("range over 25 extents with 64 slots should fit: %v", err)
	}
	al.End(0, 100*mib)
	if al.HotExtents() != 25 {
		t.Fatalf("hot extents %d, want 25", al.HotExtents())
	}
}

func TestBeginTooLarge(t *testing.T) {
	_, al := openPair(t, t.TempDir(), 256*mib, LogOptions{Slots: 4})
	defer al.Close()
	if err := al.Begin(0, 17*mib); !errors.Is(err, ErrTooLarge) {
		t.Fatalf("5 extents with 4 slots: %v", err)
	}
	if err := al.Begin(0, 16*mib); err != nil {
		t.Fatalf("4 extents with 4 slots: %v", err)
	}
}

func TestGroupCommit(t *testing.T) {
	_, al := openPair(t, t.TempDir(), 1024*mib, LogOptions{Slots: 256})
	defer al.Close()
	s0 := al.Syncs()
	const n = 64
	var wg sync.WaitGroup
	start := make(chan struct{})
	for i := range n {
		wg.Go(func() {
			<-start
			off := int64(i) * 4 * mib
			if err := al.Begin(off, 4096); err != nil {
				t.Error(err)
			}
			al.End(off, 4096)
		})
	}
	close(start)
	wg.Wait()
	syncs := al.Syncs() - s0
	t.Logf("%d concurrent cold Begins: %d syncs", n, syncs)
	if syncs >= n {
		t.Fatalf("%d concurrent cold Begins took %d syncs: no group commit", n, syncs)
	}
	if al.HotExtents() != n {
		t.Fatalf("hot %d, want %d", al.HotExtents(), n)
	}
}

func TestCrashReportsHotExtents(t *testing.T) {
	dir := t.TempDir()
	const size = 256 * mib
	bm, al := openPair(t, dir, size, LogOptions{Slots: 8})
	// Writes in flight at the crash, plus finished ones still hot.
	for _, off := range []int64{0, 9 * mib, 100 * mib} {
		if err := al.Begin(off, 4096); err != nil {
			t.Fatal(err)
		}
	}
	al.End(100*mib, 4096)
	// A disconnected write: bit set in memory only, extent hot.
	if err := al.Begin(200*mib, 4096); err != nil {
		t.Fatal(err)
	}
	bm.Set(200*mib, 4096)
	al.End(200*mib, 4096)

	crashed := crashCopy(t, dir)
	bm2, al2 := openPair(t, crashed, size, LogOptions{Slots: 8})
	defer al2.Close()
	hot := al2.Hot()
	want := map[int64]bool{0: true, 8 * mib: true, 100 * mib: true, 200 * mib: true}
	if len(hot) != len(want) {
		t.Fatalf("hot after crash: %v, want extents at %v", hot, want)
	}
	for _, x := range hot {
		if !want[x.Off] || x.Len != 4*mib {
			t.Fatalf("unexpected hot extent %+v", x)
		}
		if !bm2.IsDirty(x.Off, x.Len) || bm2.DirtyBytes() != 4*4*mib {
			t.Fatalf("hot extent %+v not folded into the bitmap (dirty %d)", x, bm2.DirtyBytes())
		}
	}
	// The fold is durable: a crash right after open still knows.
	crashed2 := crashCopy(t, crashed)
	bm3, al3 := openPair(t, crashed2, size, LogOptions{Slots: 8})
	defer al3.Close()
	if len(al3.Hot()) != 0 || bm3.DirtyBytes() != 4*4*mib {
		t.Fatalf("second open: hot %v, dirty %d", al3.Hot(), bm3.DirtyBytes())
	}
	al.Close()
	bm.Close()
}

func TestEvictionFlushesBitmapFirst(t *testing.T) {
	dir := t.TempDir()
	bm, al := openPair(t, dir, 256*mib, LogOptions{Slots: 2})
	defer al.Close()
	defer bm.Close()
	// Extent 0: a disconnected write, bit set in memory only.
	al.Begin(0, 4096)
	bm.Set(0, 4096)
	al.End(0, 4096)
	al.Begin(4*mib, 4096)
	al.End(4*mib, 4096)
	// Third extent evicts extent 0 (LRU).
	if err := al.Begin(8*mib, 4096); err != nil {
		t.Fatal(err)
	}
	al.End(8*mib, 4096)
	crashed := crashCopy(t, dir)
	b2, a2 := openPair(t, crashed, 256*mib, LogOptions{Slots: 2})
	defer a2.Close()
	for _, x := range a2.Hot() {
		if x.Off == 0 {
			t.Fatalf("extent 0 still hot after eviction: %v", a2.Hot())
		}
	}
	if !b2.IsDirty(0, 4096) {
		t.Fatal("bit of an evicted extent was not flushed before the eviction")
	}
	if b2.IsDirty(16*mib, 4096) {
		t.Fatal("unrelated chunk dirty")
	}
}

func TestBusySlotsWaitForEnd(t *testing.T) {
	_, al := openPair(t, t.TempDir(), 256*mib, LogOptions{Slots: 1})
	defer al.Close()
	if err := al.Begin(0, 4096); err != nil {
		t.Fatal(err)
	}
	done := make(chan error)
	go func() { done <- al.Begin(8*mib, 4096) }()
	select {
	case err := <-done:
		t.Fatalf("Begin on a second extent returned (%v) while the only slot is busy", err)
	case <-time.After(50 * time.Millisecond):
	}
	al.End(0, 4096)
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Begin did not proceed after End")
	}
}

func TestCleanEmptiesHotSet(t *testing.T) {
	dir := t.TempDir()
	bm, al := openPair(t, dir, 256*mib, LogOptions{})
	for i := range 10 {
		al.Begin(int64(i)*8*mib, 4096)
		al.End(int64(i)*8*mib, 4096)
	}
	al.Begin(200*mib, 1) // still in flight: must stay hot
	bm.Set(40*mib, 1)
	if err := al.Clean(); err != nil {
		t.Fatal(err)
	}
	crashed := crashCopy(t, dir)
	b2, a2 := openPair(t, crashed, 256*mib, LogOptions{})
	defer a2.Close()
	if h := a2.Hot(); len(h) != 1 || h[0].Off != 200*mib {
		t.Fatalf("hot after Clean: %v, want only the in-flight extent", h)
	}
	if !b2.IsDirty(40*mib, 1) || b2.DirtyBytes() != 64<<10+4*mib {
		t.Fatalf("bitmap after Clean: dirty %d", b2.DirtyBytes())
	}
	al.Close()
	bm.Close()
}

// TestTornLog damages the activity log at random points. Reopening must
// report a superset of the extents hot in the last transaction whose write
// completed before the damage, or the whole volume when nothing is readable.
func TestTornLog(t *testing.T) {
	r := rand.New(rand.NewPCG(9, 9))
	for iter := range 30 {
		dir := t.TempDir()
		bm, al := openPair(t, dir, 1024*mib, LogOptions{Slots: 16})
		hot := map[int64]bool{}
		for range 1 + r.IntN(15) {
			off := r.Int64N(256) * 4 * mib
			if err := al.Begin(off, 1); err != nil {
				t.Fatal(err)
			}
			hot[off] = true // no End: every extent stays hot
		}
		al.Close()
		bm.Close()
		p := filepath.Join(dir, "al")
		fi, _ := os.Stat(p)
		// Damage one 512-byte sector of the latest block, as a torn write
		// of a transaction that was never acknowledged would.
		f, _ := os.OpenFile(p, os.O_RDWR, 0)
		junk := make([]byte, 512)
		for i := range junk {
			junk[i] = byte(r.Uint32())
		}
		latest := int64((al.committed) % alRing)
		f.WriteAt(junk, latest*pageSize+r.Int64N(8)*512)
		f.Close()
		truncated := iter%3 == 0
		if truncated {
			os.Truncate(p, r.Int64N(fi.Size()))
		}
		b2, a2 := openPair(t, dir, 1024*mib, LogOptions{Slots: 16})
		if truncated && b2.DirtyBytes() != 1024*mib {
			t.Fatalf("iter %d: truncated log: dirty %d, want the whole volume", iter, b2.DirtyBytes())
		}
		got := map[int64]bool{}
		for _, x := range a2.Hot() {
			for o := x.Off; o < x.Off+x.Len; o += 4 * mib {
				got[o] = true
			}
		}
		// The last complete transaction is the one before the damaged block:
		// it lacks at most the last extent added.
		missing := 0
		for off := range hot {
			if !got[off] {
				missing++
			}
			if got[off] != b2.IsDirty(off, 1) && got[off] {
				t.Fatalf("iter %d: hot extent %d not folded into the bitmap", iter, off)
			}
		}
		if missing > 1 {
			t.Fatalf("iter %d: %d hot extents lost after damaging one block", iter, missing)
		}
		a2.Close()
		b2.Close()
	}
}

func FuzzDecodeTxn(f *testing.F) {
	b := make([]byte, pageSize)
	encodeTxn(b, 7, 22, []uint64{1, 5, 900})
	f.Add(append([]byte(nil), b...))
	encodeTxn(b, 1, 22, nil)
	f.Add(append([]byte(nil), b...))
	f.Fuzz(func(t *testing.T, data []byte) {
		if len(data) != pageSize {
			data = append(data, make([]byte, max(0, pageSize-len(data)))...)[:pageSize]
			binaryFix(data)
		}
		tx, err := decodeTxn(data)
		if err != nil {
			return
		}
		again := make([]byte, pageSize)
		encodeTxn(again, tx.seq, tx.shift, tx.extents)
		tx2, err := decodeTxn(again)
		if err != nil || tx2.seq != tx.seq || len(tx2.extents) != len(tx.extents) {
			t.Fatalf("re-encoded transaction differs: %v", err)
		}
	})
}

// binaryFix gives fuzzed blocks a valid checksum half of the time so the
// decoder's field checks are exercised, not only the CRC.
func binaryFix(b []byte) {
	if b[1]&1 == 0 {
		return
	}
	c := crc32.Checksum(b[:pageSize-4], castagnoli)
	b[pageSize-4], b[pageSize-3], b[pageSize-2], b[pageSize-1] = byte(c), byte(c>>8), byte(c>>16), byte(c>>24)
}

func BenchmarkBeginHot(b *testing.B) {
	_, al := openPair(b, b.TempDir(), 1<<30, LogOptions{})
	defer al.Close()
	al.Begin(0, 4096)
	al.End(0, 4096)
	b.SetBytes(4096)
	b.ReportAllocs()
	for b.Loop() {
		al.Begin(8192, 4096)
		al.End(8192, 4096)
	}
}

func BenchmarkBeginHotParallel(b *testing.B) {
	_, al := openPair(b, b.TempDir(), 1<<30, LogOptions{})
	defer al.Close()
	for i := range 16 {
		al.Begin(int64(i)*4*mib, 1)
		al.End(int64(i)*4*mib, 1)
	}
	b.SetBytes(4096)
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		r := rand.New(rand.NewPCG(rand.Uint64(), 3))
		for pb.Next() {
			off := r.Int64N(64*mib) &^ 4095
			al.Begin(off, 4096)
			al.End(off, 4096)
		}
	})
}

// BenchmarkBeginCold measures a write to a cold extent: one transaction and
// one fdatasync on the file system holding the test's temp dir.
func BenchmarkBeginCold(b *testing.B) {
	_, al := openPair(b, b.TempDir(), 1<<40, LogOptions{Slots: 8})
	defer al.Close()
	b.SetBytes(4096)
	b.ReportAllocs()
	i := int64(0)
	for b.Loop() {
		off := i * 4 * mib
		al.Begin(off, 4096)
		al.End(off, 4096)
		i++
	}
	b.ReportMetric(float64(al.Syncs())/float64(b.N), "syncs/op")
}
