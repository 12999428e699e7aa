package bitmap

import (
	"bytes"
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"testing"
)

// model is the reference: one bool per chunk.
type model struct {
	size, chunk int64
	bits        []bool
}

func newModel(size, chunk int64) *model {
	return &model{size, chunk, make([]bool, (size+chunk-1)/chunk)}
}

func (m *model) set(off, n int64) {
	if n <= 0 || off >= m.size {
		return
	}
	end := min(off+n, m.size)
	for c := max(off, 0) / m.chunk; c*m.chunk < end; c++ {
		m.bits[c] = true
	}
}

func (m *model) clear(off, n int64) {
	if n <= 0 {
		return
	}
	end := min(off+n, m.size)
	for c := range m.bits {
		s := int64(c) * m.chunk
		e := min(s+m.chunk, m.size)
		if s >= off && e <= end {
			m.bits[c] = false
		}
	}
}

func (m *model) dirtyBytes() (n int64) {
	for c, d := range m.bits {
		if d {
			s := int64(c) * m.chunk
			n += min(s+m.chunk, m.size) - s
		}
	}
	return n
}

func check(t *testing.T, b *Bitmap, m *model) {
	t.Helper()
	var want uint64
	for c, d := range m.bits {
		off, n := b.ChunkRange(uint64(c))
		if got := b.IsDirty(off, n); got != d {
			t.Fatalf("chunk %d: dirty %v, want %v", c, got, d)
		}
		if d {
			want++
		}
	}
	if got := b.DirtyChunks(); got != want {
		t.Fatalf("DirtyChunks %d, want %d", got, want)
	}
	if got, want := b.DirtyBytes(), m.dirtyBytes(); got != want {
		t.Fatalf("DirtyBytes %d, want %d", got, want)
	}
	// NextDirty walks exactly the dirty chunks in order.
	var walked []int64
	for off := int64(0); ; {
		o, n, ok := b.NextDirty(off)
		if !ok {
			break
		}
		walked = append(walked, o/m.chunk)
		off = o + n
	}
	var wantWalk []int64
	for c, d := range m.bits {
		if d {
			wantWalk = append(wantWalk, int64(c))
		}
	}
	if len(walked) != len(wantWalk) {
		t.Fatalf("NextDirty walked %d chunks, want %d", len(walked), len(wantWalk))
	}
	for i := range walked {
		if walked[i] != wantWalk[i] {
			t.Fatalf("NextDirty step %d: chunk %d, want %d", i, walked[i], wantWalk[i])
		}
	}
	// Runs covers the same bytes, in order, without overlap.
	var runBytes, last int64 = 0, -1
	for off, n := range b.Runs(0, 3*m.chunk) {
		if off <= last || n <= 0 || n > 3*m.chunk || off+n > m.size {
			t.Fatalf("bad run %d+%d after %d", off, n, last)
		}
		if !b.IsDirty(off, n) || !m.bits[off/m.chunk] || !m.bits[(off+n-1)/m.chunk] {
			t.Fatalf("run %d+%d not dirty", off, n)
		}
		runBytes += n
		last = off + n - 1
	}
	if runBytes != m.dirtyBytes() {
		t.Fatalf("Runs cover %d bytes, want %d", runBytes, m.dirtyBytes())
	}
}

func TestRandomOpsMatchModel(t *testing.T) {
	for _, geo := range []struct{ size, chunk int64 }{
		{1 << 20, 4096},
		{64<<20 + 12345, 64 << 10}, // short last chunk
		{200 * 4096 * 64, 4096},    // several on-disk pages
		{4096, 4096},
		{100, 4096},
	} {
		b, err := New(geo.size, geo.chunk)
		if err != nil {
			t.Fatal(err)
		}
		m := newModel(geo.size, geo.chunk)
		r := rand.New(rand.NewPCG(uint64(geo.size), 7))
		for i := range 3000 {
			off := r.Int64N(geo.size+geo.chunk) - geo.chunk/2
			n := r.Int64N(8*geo.chunk) + r.Int64N(2)*r.Int64N(geo.size)
			switch r.IntN(10) {
			case 0:
				b.Clear(off, n)
				m.clear(off, n)
			case 1, 2, 3:
				b.Clear(off, n)
				m.clear(off, n)
			default:
				b.Set(off, n)
				m.set(off, n)
			}
			if i%500 == 0 {
				check(t, b, m)
			}
		}
		check(t, b, m)
		b.SetAll()
		m.set(0, geo.size)
		check(t, b, m)
		b.ClearAll()
		m.clear(0, geo.size)
		check(t, b, m)
	}
}

func TestClearPartialChunkStaysDirty(t *testing.T) {
	b, _ := New(1<<20, 64<<10)
	b.Set(0, 1)
	b.Clear(0, 64<<10-1)
	if !b.IsDirty(0, 1) {
		t.Fatal("a partly covered chunk was cleared")
	}
	b.Clear(0, 64<<10)
	if b.IsDirty(0, 1) {
		t.Fatal("a fully covered chunk stayed dirty")
	}
}

func TestGeometry(t *testing.T) {
	for _, c := range []int64{0, 2048, 4096 + 1, 128 << 10, 3 << 12} {
		if _, err := New(1<<20, c); !errors.Is(err, ErrGeometry) {
			t.Errorf("chunk %d: err %v, want ErrGeometry", c, err)
		}
	}
	if _, err := New(0, 4096); !errors.Is(err, ErrGeometry) {
		t.Errorf("size 0: err %v", err)
	}
	a, _ := New(1<<20, 4096)
	b, _ := New(1<<20, 8192)
	if err := a.Union(b); !errors.Is(err, ErrGeometry) {
		t.Errorf("union of different chunks: %v", err)
	}
}

func TestUnion(t *testing.T) {
	a, _ := New(10<<20, 4096)
	b, _ := New(10<<20, 4096)
	a.Set(0, 4096)
	a.Set(5<<20, 3*4096)
	b.Set(5<<20+4096, 5*4096)
	b.Set(9<<20, 1)
	if err := a.Union(b); err != nil {
		t.Fatal(err)
	}
	m := newModel(10<<20, 4096)
	m.set(0, 4096)
	m.set(5<<20, 3*4096)
	m.set(5<<20+4096, 5*4096)
	m.set(9<<20, 1)
	check(t, a, m)
	if b.DirtyChunks() != 6 {
		t.Fatalf("union changed its argument: %d", b.DirtyChunks())
	}
}

func TestConcurrentSetClear(t *testing.T) {
	b, _ := New(256<<20, 4096)
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Go(func() {
			// Each goroutine owns interleaved chunks; bits sharing a word race.
			for i := int64(g); i < 65536; i += 8 {
				b.Set(i*4096, 4096)
				if i%3 == 0 {
					b.Clear(i*4096, 4096)
				}
			}
		})
	}
	wg.Wait()
	m := newModel(256<<20, 4096)
	for i := int64(0); i < 65536; i++ {
		if i%3 != 0 {
			m.set(i*4096, 4096)
		}
	}
	check(t, b, m)
}

func TestWireRoundTrip(t *testing.T) {
	b, _ := New(1<<30+4096*3, 4096)
	r := rand.New(rand.NewPCG(1, 2))
	for range 500 {
		b.Set(r.Int64N(b.Size()), r.Int64N(1<<20))
	}
	b.Set(b.Size()-1, 1)
	data, err := b.MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	c, err := Decode(data, b.Size(), 4096)
	if err != nil {
		t.Fatal(err)
	}
	d1, _ := c.MarshalBinary()
	if !bytes.Equal(data, d1) || c.DirtyBytes() != b.DirtyBytes() {
		t.Fatal("decode∘encode is not the identity")
	}
	if _, err := Decode(data, b.Size(), 8192); !errors.Is(err, ErrGeometry) {
		t.Fatalf("wrong geometry: %v", err)
	}
	data[len(data)/2] ^= 1
	if _, err := Decode(data, b.Size(), 4096); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("flipped bit: %v", err)
	}
	empty, _ := New(1<<40, 4096)
	e, _ := empty.MarshalBinary()
	if len(e) > 64 {
		t.Fatalf("clean 1 TiB bitmap encodes in %d bytes", len(e))
	}
}

func FuzzDecode(f *testing.F) {
	b, _ := New(1<<20, 4096)
	e0, _ := b.MarshalBinary()
	b.Set(4096*70, 4096*3)
	b.Set(1<<20-1, 1)
	e1, _ := b.MarshalBinary()
	f.Add(e0)
	f.Add(e1)
	f.Add([]byte("DOPPELBW"))
	f.Fuzz(func(t *testing.T, data []byte) {
		bm, err := Decode(data, 1<<20, 4096)
		if err != nil {
			return
		}
		again, _ := bm.MarshalBinary()
		if !bytes.Equal(again, data) {
			t.Fatalf("accepted input does not re-encode identically")
		}
	})
}

func FuzzParseHeader(f *testing.F) {
	b, _ := New(1<<30, 65536)
	f.Add(b.header())
	f.Add(make([]byte, 64))
	f.Fuzz(func(t *testing.T, h []byte) {
		size, chunk, err := ParseHeader(h)
		if err != nil {
			return
		}
		nb, err := New(size, chunk)
		if err != nil {
			t.Fatalf("header accepted an invalid geometry: %v", err)
		}
		if !bytes.Equal(nb.header()[:headerSize], h[:headerSize]) {
			t.Fatal("accepted header does not re-encode identically")
		}
	})
}

func TestPersistRoundTrip(t *testing.T) {
	p := filepath.Join(t.TempDir(), "bitmap")
	const size, chunk = 300 << 20, 4096 // 76800 bits: 3 pages
	b, err := Open(p, size, chunk)
	if err != nil {
		t.Fatal(err)
	}
	m := newModel(size, chunk)
	r := rand.New(rand.NewPCG(3, 4))
	for range 200 {
		off, n := r.Int64N(size), r.Int64N(1<<20)
		b.Set(off, n)
		m.set(off, n)
	}
	b.Clear(0, 64<<20)
	m.clear(0, 64<<20)
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	b, err = Open(p, size, chunk)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	if b.Recovered() != 0 {
		t.Fatalf("recovered %d pages from a clean file", b.Recovered())
	}
	check(t, b, m)

	if _, err := Open(p, size, 8192); !errors.Is(err, ErrGeometry) {
		t.Fatalf("reopen with another chunk: %v", err)
	}
	if _, err := Open(p, size+4096, chunk); !errors.Is(err, ErrGeometry) {
		t.Fatalf("reopen with another size: %v", err)
	}
}

func TestFlushWritesOnlyChangedPages(t *testing.T) {
	p := filepath.Join(t.TempDir(), "bitmap")
	const size, chunk = 4 * bitsPerPage * 4096, 4096 // 4 pages
	b, err := Open(p, size, chunk)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	if err := b.Flush(); err != nil {
		t.Fatal(err)
	}
	// Damage page 2 behind the bitmap's back; dirty a bit in page 0 only.
	f, _ := os.OpenFile(p, os.O_RDWR, 0)
	if _, err := f.WriteAt(bytes.Repeat([]byte{0xAB}, 100), 3*pageSize+10); err != nil {
		t.Fatal(err)
	}
	f.Close()
	b.Set(0, 1)
	if err := b.Flush(); err != nil {
		t.Fatal(err)
	}
	// A second Flush with nothing new writes nothing (no fdatasync either).
	if err := b.Flush(); err != nil {
		t.Fatal(err)
	}
	c, err := Open(p, size, chunk)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if c.Recovered() != 1 {
		t.Fatalf("recovered %d pages, want 1 (page 2 must not have been rewritten)", c.Recovered())
	}
	if !c.IsDirty(0, 1) {
		t.Fatal("bit in page 0 not persisted")
	}
	if got, want := c.DirtyChunks(), uint64(1+bitsPerPage); got != want {
		t.Fatalf("dirty chunks %d, want %d (page 2 all dirty + 1)", got, want)
	}
}

// TestTornBitmap truncates or scribbles over the file at random points and
// checks that reopening never loses a dirty bit and never accepts a broken
// header.
func TestTornBitmap(t *testing.T) {
	dir := t.TempDir()
	const size, chunk = 3 * bitsPerPage * 4096, 4096
	r := rand.New(rand.NewPCG(5, 6))
	for iter := range 40 {
		p := filepath.Join(dir, "bm")
		os.Remove(p)
		b, err := Open(p, size, chunk)
		if err != nil {
			t.Fatal(err)
		}
		m := newModel(size, chunk)
		for range 50 {
			off, n := r.Int64N(size), r.Int64N(256<<10)
			b.Set(off, n)
			m.set(off, n)
		}
		if err := b.Close(); err != nil {
			t.Fatal(err)
		}
		fi, _ := os.Stat(p)
		cut := r.Int64N(fi.Size())
		if iter%2 == 0 {
			if err := os.Truncate(p, cut); err != nil {
				t.Fatal(err)
			}
		} else {
			f, _ := os.OpenFile(p, os.O_RDWR, 0)
			junk := make([]byte, 512)
			for i := range junk {
				junk[i] = byte(r.Uint32())
			}
			f.WriteAt(junk, cut&^511)
			f.Close()
		}
		c, err := Open(p, size, chunk)
		if cut < headerSize {
			if !errors.Is(err, ErrCorrupt) {
				t.Fatalf("iter %d: header damaged at %d, open err %v", iter, cut, err)
			}
			continue
		}
		if err != nil {
			t.Fatalf("iter %d: cut at %d: %v", iter, cut, err)
		}
		for i, d := range m.bits {
			if d && !c.IsDirty(int64(i)*chunk, 1) {
				t.Fatalf("iter %d: chunk %d lost its dirty bit after damage at %d", iter, i, cut)
			}
		}
		if cut < fi.Size() && cut >= pageSize && c.Recovered() == 0 {
			t.Fatalf("iter %d: damage at %d not detected", iter, cut)
		}
		c.Close()
		// The recovered pages were rewritten: a second open is clean.
		d, err := Open(p, size, chunk)
		if err != nil || d.Recovered() != 0 {
			t.Fatalf("iter %d: second open: recovered %d, err %v", iter, d.Recovered(), err)
		}
		d.Close()
	}
}

func BenchmarkSet(b *testing.B) {
	bm, _ := New(1<<40, 64<<10)
	r := rand.New(rand.NewPCG(1, 1))
	offs := make([]int64, 4096)
	for i := range offs {
		offs[i] = r.Int64N(1<<40) &^ 4095
	}
	b.SetBytes(4096)
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		bm.Set(offs[i%len(offs)], 4096)
		i++
	}
}

func BenchmarkSetParallel(b *testing.B) {
	p := filepath.Join(b.TempDir(), "bm")
	bm, err := Open(p, 64<<30, 4096)
	if err != nil {
		b.Fatal(err)
	}
	defer bm.Close()
	b.SetBytes(4096)
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		r := rand.New(rand.NewPCG(rand.Uint64(), 1))
		for pb.Next() {
			bm.Set(r.Int64N(64<<30), 4096)
		}
	})
}
