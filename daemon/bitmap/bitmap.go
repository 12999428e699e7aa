// Package bitmap tracks which chunks of a replicated volume may differ from
// the peer: a persistent dirty bitmap plus an activity log of hot extents.
//
// The [Bitmap] holds one bit per chunk (4 KiB..64 KiB, a power of two). Set
// and Clear are lock-free; memory is volume/chunk/8 bytes and never grows with
// the write rate. A persistent bitmap writes back only the 4 KiB pages that
// changed (pwrite + fdatasync), each page carrying its own CRC32C, so that a
// page torn by a crash is detected on open and conservatively marked all
// dirty: a crash can make doppel resync more, never less.
//
// The [ActivityLog] bounds what a crash can leave unrecorded: before a write
// touches an extent (default 4 MiB) that extent is recorded hot on disk. A
// write to an extent that is already hot pays nothing; a write to a cold
// extent pays one fdatasync, shared by every concurrent Begin (group commit).
// On open after a crash, the hot extents of the last durable transaction are
// folded into the bitmap, so dirty + hot is what a resync must cover.
package bitmap

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"iter"
	"math/bits"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"

	"github.com/doppelha/doppel/daemon/statefile"
	"golang.org/x/sys/unix"
)

// Chunk sizes.
const (
	MinChunk     = 4 << 10
	MaxChunk     = 64 << 10
	DefaultChunk = 64 << 10
)

const (
	pageSize     = 4096
	wordsPerPage = 511 // 4088 bytes of bits, then page index and CRC32C
	bitsPerPage  = wordsPerPage * 64
	headerSize   = 64
	fileVersion  = 1
	fileMagic    = "DOPPELBM"
	wireMagic    = "DOPPELBW"
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// Errors returned by this package.
var (
	ErrGeometry = errors.New("bitmap geometry mismatch")
	ErrCorrupt  = errors.New("bitmap corrupt")
	ErrClosed   = errors.New("bitmap closed")
)

// Bitmap is a dirty-chunk bitmap for a volume of a fixed size. All methods are
// safe for concurrent use.
type Bitmap struct {
	size  int64
	chunk int64
	shift uint
	nbits uint64
	words []atomic.Uint64
	count atomic.Int64 // set bits

	// Persistence; nil file for an in-memory bitmap.
	mu        sync.Mutex // serializes Flush and Close
	f         *os.File
	path      string
	pageDirty []atomic.Uint64 // one bit per on-disk page
	recovered int
	page      []byte
}

// CheckGeometry reports whether size and chunk describe a valid bitmap.
func CheckGeometry(size, chunk int64) error {
	if chunk < MinChunk || chunk > MaxChunk || chunk&(chunk-1) != 0 {
		return fmt.Errorf("%w: chunk %d is not a power of two in [%d, %d]", ErrGeometry, chunk, MinChunk, MaxChunk)
	}
	if size <= 0 {
		return fmt.Errorf("%w: volume size %d", ErrGeometry, size)
	}
	return nil
}

// New returns an in-memory bitmap (all clean) for size bytes in chunks of
// chunk bytes.
func New(size, chunk int64) (*Bitmap, error) {
	if err := CheckGeometry(size, chunk); err != nil {
		return nil, err
	}
	nbits := uint64((size + chunk - 1) / chunk)
	return &Bitmap{
		size:  size,
		chunk: chunk,
		shift: uint(bits.TrailingZeros64(uint64(chunk))),
		nbits: nbits,
		words: make([]atomic.Uint64, (nbits+63)/64),
	}, nil
}

// Open opens the persistent bitmap at path, creating it (all clean) when it
// does not exist. An existing file must have the same geometry, or Open
// returns ErrGeometry: a bitmap for another volume size or chunk size is never
// silently reinterpreted. Pages whose checksum fails (torn by a crash) are
// marked entirely dirty and rewritten; Recovered reports how many.
func Open(path string, size, chunk int64) (*Bitmap, error) {
	b, err := New(size, chunk)
	if err != nil {
		return nil, err
	}
	b.path = path
	b.pageDirty = make([]atomic.Uint64, (b.pages()+63)/64)
	b.page = make([]byte, pageSize)
	if _, err := os.Stat(path); errors.Is(err, os.ErrNotExist) {
		if err := b.create(path); err != nil {
			return nil, err
		}
	}
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return nil, fmt.Errorf("open bitmap: %w", err)
	}
	b.f = f
	if err := b.load(); err != nil {
		_ = f.Close()
		return nil, err
	}
	if b.recovered > 0 {
		if err := b.Flush(); err != nil {
			_ = f.Close()
			return nil, err
		}
	}
	return b, nil
}

func (b *Bitmap) pages() int { return int((uint64(len(b.words)) + wordsPerPage - 1) / wordsPerPage) }

func (b *Bitmap) header() []byte {
	h := make([]byte, pageSize)
	copy(h, fileMagic)
	binary.LittleEndian.PutUint32(h[8:], fileVersion)
	binary.LittleEndian.PutUint32(h[12:], uint32(b.chunk))
	binary.LittleEndian.PutUint64(h[16:], uint64(b.size))
	binary.LittleEndian.PutUint64(h[24:], b.nbits)
	binary.LittleEndian.PutUint32(h[32:], pageSize)
	binary.LittleEndian.PutUint32(h[headerSize-4:], crc32.Checksum(h[:headerSize-4], castagnoli))
	return h
}

// ParseHeader decodes a bitmap file header and returns the volume size and
// chunk size it describes.
func ParseHeader(h []byte) (size, chunk int64, err error) {
	if len(h) < headerSize {
		return 0, 0, fmt.Errorf("%w: header is %d bytes", ErrCorrupt, len(h))
	}
	if string(h[:8]) != fileMagic {
		return 0, 0, fmt.Errorf("%w: bad magic %q", ErrCorrupt, h[:8])
	}
	if got, want := binary.LittleEndian.Uint32(h[headerSize-4:]), crc32.Checksum(h[:headerSize-4], castagnoli); got != want {
		return 0, 0, fmt.Errorf("%w: header checksum %08x, want %08x", ErrCorrupt, got, want)
	}
	if v := binary.LittleEndian.Uint32(h[8:]); v != fileVersion {
		return 0, 0, fmt.Errorf("%w: unsupported version %d", ErrCorrupt, v)
	}
	chunk = int64(binary.LittleEndian.Uint32(h[12:]))
	size = int64(binary.LittleEndian.Uint64(h[16:]))
	if err := CheckGeometry(size, chunk); err != nil {
		return 0, 0, fmt.Errorf("%w: %w", ErrCorrupt, err)
	}
	if nbits := binary.LittleEndian.Uint64(h[24:]); nbits != uint64((size+chunk-1)/chunk) {
		return 0, 0, fmt.Errorf("%w: %d bits for size %d chunk %d", ErrCorrupt, nbits, size, chunk)
	}
	if ps := binary.LittleEndian.Uint32(h[32:]); ps != pageSize {
		return 0, 0, fmt.Errorf("%w: page size %d", ErrCorrupt, ps)
	}
	return size, chunk, nil
}

// create writes a fresh all-clean bitmap file atomically.
func (b *Bitmap) create(path string) error {
	buf := make([]byte, 0, pageSize*(1+b.pages()))
	buf = append(buf, b.header()...)
	for p := range b.pages() {
		buf = append(buf, b.encodePage(p)...)
	}
	if err := statefile.Write(path, buf, 0o600); err != nil {
		return fmt.Errorf("create bitmap: %w", err)
	}
	return nil
}

// encodePage renders page p into b.page (or a new buffer when b.page is nil).
func (b *Bitmap) encodePage(p int) []byte {
	pg := b.page
	if pg == nil {
		pg = make([]byte, pageSize)
	}
	clear(pg)
	base := p * wordsPerPage
	for i := 0; i < wordsPerPage && base+i < len(b.words); i++ {
		binary.LittleEndian.PutUint64(pg[i*8:], b.words[base+i].Load())
	}
	binary.LittleEndian.PutUint32(pg[pageSize-8:], uint32(p))
	binary.LittleEndian.PutUint32(pg[pageSize-4:], crc32.Checksum(pg[:pageSize-4], castagnoli))
	return pg
}

func (b *Bitmap) load() error {
	h := make([]byte, headerSize)
	if _, err := b.f.ReadAt(h, 0); err != nil {
		return fmt.Errorf("read bitmap header: %w: %w", ErrCorrupt, err)
	}
	size, chunk, err := ParseHeader(h)
	if err != nil {
		return err
	}
	if size != b.size || chunk != b.chunk {
		return fmt.Errorf("%w: %s holds size %d chunk %d, want size %d chunk %d", ErrGeometry, b.path, size, chunk, b.size, b.chunk)
	}
	pg := make([]byte, pageSize)
	for p := range b.pages() {
		n, err := b.f.ReadAt(pg, int64(1+p)*pageSize)
		if err != nil && !errors.Is(err, io.EOF) {
			return fmt.Errorf("read bitmap page %d: %w", p, err)
		}
		base := p * wordsPerPage
		if n != pageSize || binary.LittleEndian.Uint32(pg[pageSize-8:]) != uint32(p) ||
			binary.LittleEndian.Uint32(pg[pageSize-4:]) != crc32.Checksum(pg[:pageSize-4], castagnoli) {
			// Torn or missing page: everything it covers may be dirty.
			b.recovered++
			first := uint64(base) * 64
			last := min(first+bitsPerPage, b.nbits) - 1
			b.setBits(first, last)
			continue
		}
		for i := 0; i < wordsPerPage && base+i < len(b.words); i++ {
			w := binary.LittleEndian.Uint64(pg[i*8:])
			if base+i == len(b.words)-1 {
				w &= b.lastWordMask()
			}
			b.words[base+i].Store(w)
			b.count.Add(int64(bits.OnesCount64(w)))
		}
	}
	return nil
}

func (b *Bitmap) lastWordMask() uint64 {
	if r := b.nbits % 64; r != 0 {
		return 1<<r - 1
	}
	return ^uint64(0)
}

// Size is the volume size in bytes.
func (b *Bitmap) Size() int64 { return b.size }

// ChunkSize is the number of bytes one bit covers.
func (b *Bitmap) ChunkSize() int64 { return b.chunk }

// Chunks is the number of bits.
func (b *Bitmap) Chunks() uint64 { return b.nbits }

// Recovered is the number of on-disk pages found torn or missing at Open and
// marked all dirty.
func (b *Bitmap) Recovered() int { return b.recovered }

// Path is the file behind a persistent bitmap, "" for an in-memory one.
func (b *Bitmap) Path() string { return b.path }

// span returns the chunks touched by [off, off+n), clamped to the volume.
func (b *Bitmap) span(off, n int64) (first, last uint64, ok bool) {
	if n <= 0 || off >= b.size || off+n <= 0 {
		return 0, 0, false
	}
	end := min(off+n, b.size)
	off = max(off, 0)
	return uint64(off) >> b.shift, uint64(end-1) >> b.shift, true
}

// Set marks every chunk touched by [off, off+n) dirty. Ranges outside the
// volume are clipped.
func (b *Bitmap) Set(off, n int64) {
	if first, last, ok := b.span(off, n); ok {
		b.setBits(first, last)
	}
}

// SetAll marks the whole volume dirty (full resync).
func (b *Bitmap) SetAll() { b.setBits(0, b.nbits-1) }

// Clear marks clean every chunk lying entirely inside [off, off+n); a chunk
// only partly covered stays as it is. The last, short chunk of the volume
// counts as covered when the range reaches the end of the volume.
func (b *Bitmap) Clear(off, n int64) {
	if n <= 0 {
		return
	}
	end := min(off+n, b.size)
	off = max(off, 0)
	if end <= off {
		return
	}
	first := (uint64(off) + uint64(b.chunk) - 1) >> b.shift
	var stop uint64 // exclusive
	if end == b.size {
		stop = b.nbits
	} else {
		stop = uint64(end) >> b.shift
	}
	if first >= stop {
		return
	}
	b.clearBits(first, stop-1)
}

// ClearAll marks the whole volume clean.
func (b *Bitmap) ClearAll() { b.clearBits(0, b.nbits-1) }

func wordMask(w, first, last uint64) uint64 {
	lo, hi := w*64, w*64+63
	m := ^uint64(0)
	if first > lo {
		m &= ^uint64(0) << (first - lo)
	}
	if last < hi {
		m &= ^uint64(0) >> (hi - last)
	}
	return m
}

func (b *Bitmap) setBits(first, last uint64) {
	for w := first / 64; w <= last/64; w++ {
		m := wordMask(w, first, last)
		if b.words[w].Load()&m == m {
			continue
		}
		old := b.words[w].Or(m)
		if added := m &^ old; added != 0 {
			b.count.Add(int64(bits.OnesCount64(added)))
			b.markPage(w)
		}
	}
}

func (b *Bitmap) clearBits(first, last uint64) {
	for w := first / 64; w <= last/64; w++ {
		m := wordMask(w, first, last)
		if b.words[w].Load()&m == 0 {
			continue
		}
		old := b.words[w].And(^m)
		if removed := m & old; removed != 0 {
			b.count.Add(-int64(bits.OnesCount64(removed)))
			b.markPage(w)
		}
	}
}

func (b *Bitmap) markPage(word uint64) {
	if b.pageDirty == nil {
		return
	}
	p := word / wordsPerPage
	pw, bit := &b.pageDirty[p/64], uint64(1)<<(p%64)
	if pw.Load()&bit == 0 {
		pw.Or(bit)
	}
}

// IsDirty reports whether any chunk touched by [off, off+n) is dirty.
func (b *Bitmap) IsDirty(off, n int64) bool {
	first, last, ok := b.span(off, n)
	if !ok {
		return false
	}
	for w := first / 64; w <= last/64; w++ {
		if b.words[w].Load()&wordMask(w, first, last) != 0 {
			return true
		}
	}
	return false
}

// DirtyChunks is the number of dirty chunks.
func (b *Bitmap) DirtyChunks() uint64 { return uint64(b.count.Load()) }

// DirtyBytes is the number of volume bytes in dirty chunks (the last chunk
// counts only its real length).
func (b *Bitmap) DirtyBytes() int64 {
	n := b.count.Load() * b.chunk
	if tail := b.size % b.chunk; tail != 0 && b.bit(b.nbits-1) {
		n -= b.chunk - tail
	}
	return n
}

func (b *Bitmap) bit(i uint64) bool { return b.words[i/64].Load()&(1<<(i%64)) != 0 }

// ChunkRange returns the byte range of chunk i (the last one may be short).
func (b *Bitmap) ChunkRange(i uint64) (off, n int64) {
	off = int64(i) << b.shift
	return off, min(b.chunk, b.size-off)
}

// nextBit returns the first set bit at index >= from.
func (b *Bitmap) nextBit(from uint64) (uint64, bool) {
	if from >= b.nbits {
		return 0, false
	}
	w := from / 64
	v := b.words[w].Load() & (^uint64(0) << (from % 64))
	for {
		if v != 0 {
			i := w*64 + uint64(bits.TrailingZeros64(v))
			return i, i < b.nbits
		}
		w++
		if w >= uint64(len(b.words)) {
			return 0, false
		}
		v = b.words[w].Load()
	}
}

// nextClear returns the first clear bit at index >= from, or nbits.
func (b *Bitmap) nextClear(from uint64) uint64 {
	for i := from; i < b.nbits; {
		w := i / 64
		v := ^b.words[w].Load() & (^uint64(0) << (i % 64))
		if v != 0 {
			return min(w*64+uint64(bits.TrailingZeros64(v)), b.nbits)
		}
		i = (w + 1) * 64
	}
	return b.nbits
}

// NextDirty returns the first dirty chunk at or after the chunk holding byte
// offset from, as a byte range, in disk order: iterate with from = off + n.
func (b *Bitmap) NextDirty(from int64) (off, n int64, ok bool) {
	if from >= b.size {
		return 0, 0, false
	}
	i, ok := b.nextBit(uint64(max(from, 0)) >> b.shift)
	if !ok {
		return 0, 0, false
	}
	off, n = b.ChunkRange(i)
	return off, n, true
}

// Runs yields the runs of contiguous dirty chunks, in disk order, starting
// with the chunk that holds byte offset from, as (offset, length) byte ranges
// of at most maxLen bytes each (maxLen <= 0: unbounded). Bits changed during
// the iteration may or may not be seen.
func (b *Bitmap) Runs(from, maxLen int64) iter.Seq2[int64, int64] {
	return func(yield func(int64, int64) bool) {
		if from >= b.size {
			return
		}
		i := uint64(max(from, 0)) >> b.shift
		maxChunks := uint64(1<<63 - 1)
		if maxLen > 0 {
			maxChunks = max(uint64(maxLen)>>b.shift, 1)
		}
		for {
			start, ok := b.nextBit(i)
			if !ok {
				return
			}
			end := b.nextClear(start)
			for s := start; s < end; s += maxChunks {
				e := min(s+maxChunks, end)
				off := int64(s) << b.shift
				if !yield(off, min(int64(e)<<b.shift, b.size)-off) {
					return
				}
			}
			i = end
		}
	}
}

// Union marks dirty every chunk that is dirty in o. Both bitmaps must have
// the same geometry. Reverse protection resyncs the union of both sides'
// bitmaps.
func (b *Bitmap) Union(o *Bitmap) error {
	if o.size != b.size || o.chunk != b.chunk {
		return fmt.Errorf("%w: union of size %d chunk %d with size %d chunk %d", ErrGeometry, b.size, b.chunk, o.size, o.chunk)
	}
	for w := range o.words {
		m := o.words[w].Load()
		if m == 0 || b.words[w].Load()&m == m {
			continue
		}
		old := b.words[w].Or(m)
		if added := m &^ old; added != 0 {
			b.count.Add(int64(bits.OnesCount64(added)))
			b.markPage(uint64(w))
		}
	}
	return nil
}

// Clone returns an in-memory copy of b.
func (b *Bitmap) Clone() *Bitmap {
	c, _ := New(b.size, b.chunk)
	_ = c.Union(b)
	return c
}

// Flush writes every page changed since the last Flush with pwrite, then
// fdatasyncs the file. It is a no-op for an in-memory bitmap or when nothing
// changed.
func (b *Bitmap) Flush() error {
	if b.pageDirty == nil {
		return nil
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.f == nil {
		return ErrClosed
	}
	wrote := false
	for i := range b.pageDirty {
		v := b.pageDirty[i].Swap(0)
		for v != 0 {
			p := i*64 + bits.TrailingZeros64(v)
			v &= v - 1
			if _, err := b.f.WriteAt(b.encodePage(p), int64(1+p)*pageSize); err != nil {
				// Keep the unwritten pages dirty for the next attempt.
				b.pageDirty[i].Or(v | 1<<(p%64))
				return fmt.Errorf("write bitmap page %d: %w", p, err)
			}
			wrote = true
		}
	}
	if !wrote {
		return nil
	}
	if err := unix.Fdatasync(int(b.f.Fd())); err != nil {
		return fmt.Errorf("fdatasync %s: %w", filepath.Base(b.path), err)
	}
	return nil
}

// Close flushes a persistent bitmap and closes its file.
func (b *Bitmap) Close() error {
	if b.pageDirty == nil {
		return nil
	}
	err := b.Flush()
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.f == nil {
		return err
	}
	err = errors.Join(err, b.f.Close())
	b.f = nil
	return err
}

// MarshalBinary encodes the bitmap for the wire: a header with the geometry,
// then the non-zero words as (uvarint word-index delta, little-endian word)
// pairs, then a CRC32C of everything before it. A clean bitmap of any size
// encodes in a few dozen bytes.
func (b *Bitmap) MarshalBinary() ([]byte, error) {
	out := make([]byte, 0, 64)
	out = append(out, wireMagic...)
	out = binary.LittleEndian.AppendUint32(out, fileVersion)
	out = binary.LittleEndian.AppendUint32(out, uint32(b.chunk))
	out = binary.LittleEndian.AppendUint64(out, uint64(b.size))
	var nz uint64
	for w := range b.words {
		if b.words[w].Load() != 0 {
			nz++
		}
	}
	out = binary.AppendUvarint(out, nz)
	prev := uint64(0)
	for w := range b.words {
		v := b.words[w].Load()
		if v == 0 {
			continue
		}
		out = binary.AppendUvarint(out, uint64(w)-prev)
		out = binary.LittleEndian.AppendUint64(out, v)
		prev = uint64(w)
	}
	return binary.LittleEndian.AppendUint32(out, crc32.Checksum(out, castagnoli)), nil
}

// Decode parses the output of MarshalBinary into a new in-memory bitmap,
// which must describe a volume of size bytes in chunks of chunk bytes (the
// peer's bitmap must match ours), or Decode returns ErrGeometry. It never
// panics on malformed input and allocates only what that geometry needs.
func Decode(data []byte, size, chunk int64) (*Bitmap, error) {
	if err := CheckGeometry(size, chunk); err != nil {
		return nil, err
	}
	if len(data) < 8+4+4+8+1+4 {
		return nil, fmt.Errorf("%w: %d bytes", ErrCorrupt, len(data))
	}
	body, sum := data[:len(data)-4], binary.LittleEndian.Uint32(data[len(data)-4:])
	if string(body[:8]) != wireMagic {
		return nil, fmt.Errorf("%w: bad magic", ErrCorrupt)
	}
	if crc32.Checksum(body, castagnoli) != sum {
		return nil, fmt.Errorf("%w: checksum mismatch", ErrCorrupt)
	}
	if v := binary.LittleEndian.Uint32(body[8:]); v != fileVersion {
		return nil, fmt.Errorf("%w: unsupported version %d", ErrCorrupt, v)
	}
	if c, s := int64(binary.LittleEndian.Uint32(body[12:])), int64(binary.LittleEndian.Uint64(body[16:])); c != chunk || s != size {
		return nil, fmt.Errorf("%w: peer bitmap has size %d chunk %d, want size %d chunk %d", ErrGeometry, s, c, size, chunk)
	}
	b, err := New(size, chunk)
	if err != nil {
		return nil, err
	}
	rest := body[24:]
	nz, k := binary.Uvarint(rest)
	if k <= 0 || nz > uint64(len(b.words)) {
		return nil, fmt.Errorf("%w: bad word count", ErrCorrupt)
	}
	rest = rest[k:]
	w := uint64(0)
	for i := uint64(0); i < nz; i++ {
		d, k := binary.Uvarint(rest)
		if k <= 0 || len(rest) < k+8 {
			return nil, fmt.Errorf("%w: truncated word %d", ErrCorrupt, i)
		}
		if (i > 0 && d == 0) || d >= uint64(len(b.words)) || w+d >= uint64(len(b.words)) {
			return nil, fmt.Errorf("%w: word index out of order or range", ErrCorrupt)
		}
		w += d
		v := binary.LittleEndian.Uint64(rest[k:])
		if v == 0 || (w == uint64(len(b.words)-1) && v&^b.lastWordMask() != 0) {
			return nil, fmt.Errorf("%w: bad word %d", ErrCorrupt, w)
		}
		b.words[w].Store(v)
		b.count.Add(int64(bits.OnesCount64(v)))
		rest = rest[k+8:]
	}
	if len(rest) != 0 {
		return nil, fmt.Errorf("%w: %d trailing bytes", ErrCorrupt, len(rest))
	}
	return b, nil
}
