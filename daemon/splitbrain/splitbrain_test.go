package splitbrain

import (
	"bytes"
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"

	"github.com/doppelha/doppel/daemon/bitmap"
	"golang.org/x/sys/unix"
)

// dataRegions lists the allocated regions of a file with SEEK_DATA/SEEK_HOLE.
func dataRegions(t *testing.T, path string) []Range {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	fi, _ := f.Stat()
	var out []Range
	for off := int64(0); off < fi.Size(); {
		d, err := unix.Seek(int(f.Fd()), off, unix.SEEK_DATA)
		if err != nil {
			break // ENXIO: no data after off
		}
		h, err := unix.Seek(int(f.Fd()), d, unix.SEEK_HOLE)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, Range{d, h - d})
		off = h
	}
	return out
}

func TestSaveHoldsExactlyTheDivergentChunks(t *testing.T) {
	for _, chunk := range []int64{4096, 64 << 10} {
		dir := t.TempDir()
		const size = 16<<20 + 12288 // short last chunk at 64 KiB
		vol := make([]byte, size)
		r := rand.New(rand.NewPCG(uint64(chunk), 1))
		for i := range vol {
			vol[i] = byte(r.Uint32() | 1) // never zero: holes must not look like data
		}
		bm, _ := bitmap.New(size, chunk)
		for range 40 {
			bm.Set(r.Int64N(size), r.Int64N(3*chunk))
		}
		bm.Set(size-1, 1)     // the short last chunk
		bm.Set(0, 3<<20+4096) // a run longer than one copy buffer
		p := filepath.Join(dir, "save.img")
		s, err := Save(p, bytes.NewReader(vol), bm)
		if err != nil {
			t.Fatal(err)
		}
		if s.Bytes != bm.DirtyBytes() {
			t.Fatalf("saved %d bytes, bitmap has %d dirty", s.Bytes, bm.DirtyBytes())
		}
		got := dataRegions(t, p)
		if len(got) != len(s.Ranges) {
			t.Fatalf("chunk %d: file has %d data regions, want %d: %v vs %v", chunk, len(got), len(s.Ranges), got, s.Ranges)
		}
		for i := range got {
			if got[i] != s.Ranges[i] {
				t.Fatalf("chunk %d: data region %v, want %v", chunk, got[i], s.Ranges[i])
			}
		}
		saved, _ := os.ReadFile(p)
		if int64(len(saved)) != size {
			t.Fatalf("save is %d bytes, want %d", len(saved), size)
		}
		for c := uint64(0); c < bm.Chunks(); c++ {
			off, n := bm.ChunkRange(c)
			want := make([]byte, n)
			if bm.IsDirty(off, n) {
				want = vol[off : off+n]
			}
			if !bytes.Equal(saved[off:off+n], want) {
				t.Fatalf("chunk %d content differs (dirty %v)", c, bm.IsDirty(off, n))
			}
		}
		sz, ranges, err := Load(p)
		if err != nil || sz != size || len(ranges) != len(s.Ranges) {
			t.Fatalf("load: %v %d %d", err, sz, len(ranges))
		}
		for i := range ranges {
			if ranges[i] != s.Ranges[i] {
				t.Fatalf("sidecar range %v, want %v", ranges[i], s.Ranges[i])
			}
		}
		if _, err := Save(p, bytes.NewReader(vol), bm); !errors.Is(err, ErrExists) {
			t.Fatalf("second save over the first: %v", err)
		}
	}
}

func TestSaveFailsOnShortSource(t *testing.T) {
	dir := t.TempDir()
	bm, _ := bitmap.New(1<<20, 4096)
	bm.Set(1<<20-4096, 4096)
	p := filepath.Join(dir, "save.img")
	if _, err := Save(p, bytes.NewReader(make([]byte, 1<<19)), bm); err == nil {
		t.Fatal("save from a short source succeeded")
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 0 {
		t.Fatalf("failed save left files: %v", ents)
	}
}

func TestEmptySave(t *testing.T) {
	bm, _ := bitmap.New(1<<20, 4096)
	p := filepath.Join(t.TempDir(), "save.img")
	s, err := Save(p, bytes.NewReader(nil), bm)
	if err != nil || s.Bytes != 0 || len(dataRegions(t, p)) != 0 {
		t.Fatalf("empty save: %+v %v", s, err)
	}
	if _, r, err := Load(p); err != nil || len(r) != 0 {
		t.Fatalf("load empty: %v %v", r, err)
	}
}

func FuzzParseRanges(f *testing.F) {
	f.Add(EncodeRanges(1<<20, 4096, []Range{{0, 4096}, {8192, 4096}}))
	f.Add(EncodeRanges(1<<20, 4096, nil))
	f.Add([]byte(header + " size=1 chunk=1 ranges=1\n0 1\n"))
	f.Fuzz(func(t *testing.T, b []byte) {
		size, ranges, err := ParseRanges(b)
		if err != nil {
			return
		}
		end := int64(0)
		for _, r := range ranges {
			if r.Off < end || r.Len <= 0 || r.Off+r.Len > size {
				t.Fatalf("accepted bad range %v (size %d)", r, size)
			}
			end = r.Off + r.Len
		}
		_, again, err := ParseRanges(EncodeRanges(size, 4096, ranges))
		if err != nil || len(again) != len(ranges) {
			t.Fatalf("re-encoded ranges do not parse: %v", err)
		}
	})
}
