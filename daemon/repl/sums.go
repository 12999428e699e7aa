package repl

import (
	"bytes"
	"errors"
	"io"
	"os"
	"sync"

	"github.com/zeebo/xxh3"
	"golang.org/x/sys/unix"

	"github.com/doppelha/doppel/blockdev"
	"github.com/doppelha/doppel/daemon/repl/wire"
)

// extents finds allocated ranges of a backend (SEEK_DATA / SEEK_HOLE on a
// sparse file). Without that knowledge everything is data.
type extents interface {
	// nextData returns the first offset ≥ off that may hold data, or end.
	nextData(off, end int64) int64
	// nextHole returns the first offset ≥ off that is a hole, or end.
	nextHole(off, end int64) int64
	Close() error
}

type allData struct{}

func (allData) nextData(off, _ int64) int64 { return off }
func (allData) nextHole(_, end int64) int64 { return end }
func (allData) Close() error                { return nil }

type seekExtents struct{ f *os.File }

func (e seekExtents) seek(off, end int64, whence int) int64 {
	if off >= end {
		return end
	}
	n, err := unix.Seek(int(e.f.Fd()), off, whence)
	if errors.Is(err, unix.ENXIO) {
		if whence == unix.SEEK_DATA {
			return end // no data after off
		}
		return end
	}
	if err != nil || n < off {
		if whence == unix.SEEK_DATA {
			return off // unknown: treat as data
		}
		return end
	}
	return min(n, end)
}

func (e seekExtents) nextData(off, end int64) int64 { return e.seek(off, end, unix.SEEK_DATA) }
func (e seekExtents) nextHole(off, end int64) int64 { return e.seek(off, end, unix.SEEK_HOLE) }
func (e seekExtents) Close() error                  { return e.f.Close() }

// newExtents opens a read-only descriptor on a file-backed backend (one
// with a Path method, like *blockdev.File) for SEEK_DATA / SEEK_HOLE.
func newExtents(b blockdev.Backend) extents {
	p, ok := b.(interface{ Path() string })
	if !ok {
		return allData{}
	}
	f, err := os.Open(p.Path())
	if err != nil {
		return allData{}
	}
	if fi, err := f.Stat(); err != nil || !fi.Mode().IsRegular() {
		f.Close()
		return allData{}
	}
	return seekExtents{f}
}

var zeroChunk [1 << 20]byte

// isZero reports whether b holds only zero bytes.
func isZero(b []byte) bool {
	for len(b) > 0 {
		n := min(len(b), len(zeroChunk))
		if !bytes.Equal(b[:n], zeroChunk[:n]) {
			return false
		}
		b = b[n:]
	}
	return true
}

func sumOf(b []byte) wire.Sum {
	h := xxh3.Hash128(b)
	var s wire.Sum
	for i := range 8 {
		s[i] = byte(h.Hi >> (56 - 8*i))
		s[8+i] = byte(h.Lo >> (56 - 8*i))
	}
	return s
}

var zeroSums sync.Map // length → wire.Sum

// zeroSum is the checksum of n zero bytes.
func zeroSum(n int64) wire.Sum {
	if v, ok := zeroSums.Load(n); ok {
		return v.(wire.Sum)
	}
	s := sumOf(make([]byte, n))
	zeroSums.Store(n, s)
	return s
}

// readFull reads len(p) bytes at off (a short read at the end of the
// volume is an error: callers never read past it).
func readFull(b blockdev.Backend, p []byte, off int64) error {
	n, err := b.ReadAt(p, off)
	if n == len(p) {
		return nil
	}
	if err == nil || err == io.EOF {
		err = io.ErrUnexpectedEOF
	}
	return err
}

// chunkSums returns the checksums of count chunks starting at off (the
// last chunk clipped at size). Chunks lying in holes are not read.
func chunkSums(b blockdev.Backend, ext extents, off, chunk int64, count int, size int64) ([]wire.Sum, error) {
	sums := make([]wire.Sum, 0, count)
	var buf []byte
	for i := 0; i < count && off < size; i++ {
		n := min(chunk, size-off)
		if ext.nextData(off, off+n) >= off+n {
			sums = append(sums, zeroSum(n))
		} else {
			if buf == nil {
				buf = make([]byte, chunk)
			}
			if err := readFull(b, buf[:n], off); err != nil {
				return nil, err
			}
			sums = append(sums, sumOf(buf[:n]))
		}
		off += n
	}
	return sums, nil
}
