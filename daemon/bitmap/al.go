package bitmap

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"math/bits"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"sync/atomic"

	"github.com/doppelha/doppel/daemon/statefile"
	"golang.org/x/sys/unix"
)

// Activity log defaults and limits.
const (
	DefaultExtentSize = 4 << 20
	DefaultSlots      = 256
	MaxSlots          = (pageSize - alHeader - 4) / 8

	alRing    = 8 // transaction blocks in the on-disk ring
	alHeader  = 32
	alMagic   = 0x444c4c41 // "ALLD"
	alVersion = 1
)

// ErrTooLarge is returned by Begin for a range spanning more extents than the
// log has slots.
var ErrTooLarge = errors.New("range spans more extents than the activity log holds")

// LogOptions configures an ActivityLog.
type LogOptions struct {
	// ExtentSize is the size of one hot extent: a power of two, at least the
	// bitmap's chunk size. Default 4 MiB.
	ExtentSize int64
	// Slots is how many extents may be hot at once (1..MaxSlots). Default 64.
	// A crash resyncs at most Slots × ExtentSize bytes beyond the bitmap.
	Slots int
}

// Extent is a byte range of the volume.
type Extent struct {
	Off, Len int64
}

// ActivityLog records the extents of the volume that may hold writes not yet
// reflected in the persistent bitmap. It is safe for concurrent use.
//
// The contract with the caller (the replication engine):
//
//	Begin(off, n)   before writing [off, off+n) locally; returns once every
//	                extent touched is recorded hot on disk.
//	...write, replicate, or Set the bitmap if it cannot be replicated...
//	End(off, n)     once the write is on the peer or its chunks are Set in the
//	                bitmap; until then the extent cannot leave the log.
//
// An extent leaves the log (least recently used first, only when a slot is
// needed) after the bitmap has been flushed, so a bit set in memory is
// durable before the extent covering it stops being hot.
type ActivityLog struct {
	bm    *Bitmap
	f     *os.File
	shift uint
	slots int

	mu         sync.Mutex
	cond       *sync.Cond
	entries    map[uint64]*alEntry
	tick       uint64
	assembling uint64 // sequence of the next transaction
	committed  uint64 // last durable transaction
	writing    bool
	evicted    bool // an extent left since the last transaction: flush bitmap first
	err        error
	closed     bool

	hot   []Extent
	syncs atomic.Uint64
	block []byte
}

type alEntry struct {
	refs int
	used uint64
	seq  uint64 // transaction that makes it durable
}

// OpenLog opens (or creates) the activity log at path for the volume tracked
// by bm. If the log holds hot extents from a previous run (a crash, or a stop
// without Clean), they are marked dirty in bm, bm is flushed, and Hot returns
// them; then the log starts empty. If no transaction in an existing log is
// readable, the whole bitmap is marked dirty (the safe answer) and Hot
// returns the whole volume.
func OpenLog(path string, bm *Bitmap, opt LogOptions) (*ActivityLog, error) {
	if opt.ExtentSize == 0 {
		opt.ExtentSize = DefaultExtentSize
	}
	if opt.Slots == 0 {
		opt.Slots = DefaultSlots
	}
	if opt.ExtentSize < bm.chunk || opt.ExtentSize&(opt.ExtentSize-1) != 0 || opt.ExtentSize > 1<<40 {
		return nil, fmt.Errorf("activity log extent %d: want a power of two >= chunk %d", opt.ExtentSize, bm.chunk)
	}
	if opt.Slots < 1 || opt.Slots > MaxSlots {
		return nil, fmt.Errorf("activity log slots %d: want 1..%d", opt.Slots, MaxSlots)
	}
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("open activity log: %w", err)
	}
	l := &ActivityLog{
		bm:      bm,
		f:       f,
		shift:   uint(bits.TrailingZeros64(uint64(opt.ExtentSize))),
		slots:   opt.Slots,
		entries: map[uint64]*alEntry{},
		block:   make([]byte, pageSize),
	}
	l.cond = sync.NewCond(&l.mu)
	if err := l.recover(); err != nil {
		_ = f.Close()
		return nil, err
	}
	return l, nil
}

// recover folds the last durable transaction into the bitmap and writes an
// empty transaction after it.
func (l *ActivityLog) recover() error {
	fi, err := l.f.Stat()
	if err != nil {
		return fmt.Errorf("stat activity log: %w", err)
	}
	var best *alTxn
	for i := range alRing {
		n, err := l.f.ReadAt(l.block, int64(i)*pageSize)
		if err != nil && !errors.Is(err, io.EOF) {
			return fmt.Errorf("read activity log: %w", err)
		}
		if n != pageSize {
			continue
		}
		t, err := decodeTxn(l.block)
		if err != nil {
			continue
		}
		if best == nil || t.seq > best.seq {
			best = &t
		}
	}
	if fi.Size() > 0 && fi.Size() != alRing*pageSize {
		best = nil // the ring is always full length: a short file lost blocks
	}
	switch {
	case best != nil:
		for _, e := range best.extents {
			off := int64(e) << best.shift
			if off >= l.bm.size || off < 0 {
				continue
			}
			x := Extent{off, min(int64(1)<<best.shift, l.bm.size-off)}
			l.hot = append(l.hot, x)
			l.bm.Set(x.Off, x.Len)
		}
		l.assembling = best.seq + 1
	case fi.Size() > 0:
		// A log existed but nothing in it is readable (or the file was cut
		// short): assume the worst.
		l.hot = []Extent{{0, l.bm.size}}
		l.bm.SetAll()
		l.assembling = 1
	default:
		l.assembling = 1
	}
	if err := l.bm.Flush(); err != nil {
		return err
	}
	if fi.Size() != alRing*pageSize {
		// Lay out the whole ring so that a later short file means damage.
		if _, err := l.f.WriteAt(make([]byte, alRing*pageSize), 0); err != nil {
			return fmt.Errorf("initialize activity log: %w", err)
		}
	}
	// Start the new run with an empty, durable transaction.
	seq := l.assembling
	l.assembling++
	if err := l.write(seq, nil); err != nil {
		return err
	}
	l.committed = seq
	if fi.Size() == 0 {
		return statefile.SyncDir(filepath.Dir(l.f.Name()))
	}
	return nil
}

type alTxn struct {
	seq     uint64
	shift   uint
	extents []uint64
}

// encodeTxn renders a transaction block: magic, version, slot count, extent
// shift, sequence, then the extent numbers, then a CRC32C of the block.
func encodeTxn(b []byte, seq uint64, shift uint, extents []uint64) {
	clear(b)
	binary.LittleEndian.PutUint32(b[0:], alMagic)
	binary.LittleEndian.PutUint32(b[4:], alVersion)
	binary.LittleEndian.PutUint32(b[8:], uint32(len(extents)))
	binary.LittleEndian.PutUint32(b[12:], uint32(shift))
	binary.LittleEndian.PutUint64(b[16:], seq)
	for i, e := range extents {
		binary.LittleEndian.PutUint64(b[alHeader+8*i:], e)
	}
	binary.LittleEndian.PutUint32(b[pageSize-4:], crc32.Checksum(b[:pageSize-4], castagnoli))
}

func decodeTxn(b []byte) (alTxn, error) {
	if len(b) != pageSize {
		return alTxn{}, fmt.Errorf("%w: activity log block is %d bytes", ErrCorrupt, len(b))
	}
	if binary.LittleEndian.Uint32(b[pageSize-4:]) != crc32.Checksum(b[:pageSize-4], castagnoli) {
		return alTxn{}, fmt.Errorf("%w: activity log block checksum", ErrCorrupt)
	}
	if binary.LittleEndian.Uint32(b[0:]) != alMagic || binary.LittleEndian.Uint32(b[4:]) != alVersion {
		return alTxn{}, fmt.Errorf("%w: activity log block magic or version", ErrCorrupt)
	}
	n := binary.LittleEndian.Uint32(b[8:])
	shift := binary.LittleEndian.Uint32(b[12:])
	if n > MaxSlots || shift < 12 || shift > 40 {
		return alTxn{}, fmt.Errorf("%w: activity log block has %d extents, shift %d", ErrCorrupt, n, shift)
	}
	t := alTxn{seq: binary.LittleEndian.Uint64(b[16:]), shift: uint(shift), extents: make([]uint64, n)}
	for i := range t.extents {
		t.extents[i] = binary.LittleEndian.Uint64(b[alHeader+8*i:])
	}
	return t, nil
}

// write makes transaction seq durable. Called without l.mu held (by the one
// committer) or during open.
func (l *ActivityLog) write(seq uint64, extents []uint64) error {
	encodeTxn(l.block, seq, l.shift, extents)
	if _, err := l.f.WriteAt(l.block, int64(seq%alRing)*pageSize); err != nil {
		return fmt.Errorf("write activity log: %w", err)
	}
	if err := unix.Fdatasync(int(l.f.Fd())); err != nil {
		return fmt.Errorf("fdatasync activity log: %w", err)
	}
	l.syncs.Add(1)
	return nil
}

// Hot returns the extents found hot when the log was opened: writes there may
// not have reached the peer. They are already marked dirty in the bitmap.
func (l *ActivityLog) Hot() []Extent { return append([]Extent(nil), l.hot...) }

// Syncs is the number of transactions written (each one fdatasync).
func (l *ActivityLog) Syncs() uint64 { return l.syncs.Load() }

// ExtentSize is the size of one hot extent.
func (l *ActivityLog) ExtentSize() int64 { return 1 << l.shift }

// Slots is the number of extents the log holds hot at most.
func (l *ActivityLog) Slots() int { return l.slots }

// HotExtents is the number of extents currently hot.
func (l *ActivityLog) HotExtents() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.entries)
}

func (l *ActivityLog) extents(off, n int64) (first, last uint64, ok bool) {
	if n <= 0 || off < 0 || off >= l.bm.size {
		return 0, 0, false
	}
	end := min(off+n, l.bm.size)
	return uint64(off) >> l.shift, uint64(end-1) >> l.shift, true
}

// Fits reports whether [off, off+n) spans no more extents than the log has
// slots (Begin returns ErrTooLarge otherwise).
func (l *ActivityLog) Fits(off, n int64) bool {
	first, last, ok := l.extents(off, n)
	return !ok || last-first+1 <= uint64(l.slots)
}

// Begin returns once every extent touched by [off, off+n) is durably hot. A
// range entirely in hot extents costs no I/O; otherwise one transaction
// (one fdatasync) is written, shared with every concurrent Begin. Each
// successful Begin must be paired with an End for the same range.
func (l *ActivityLog) Begin(off, n int64) error {
	_, err := l.begin(off, n, true)
	return err
}

// TryBegin is Begin that does not wait for a slot: it returns false (and
// takes nothing) when every slot is held by a Begin not yet Ended. The caller
// can then release extents (e.g. by marking queued writes in the bitmap and
// calling End) and retry.
func (l *ActivityLog) TryBegin(off, n int64) (bool, error) {
	return l.begin(off, n, false)
}

func (l *ActivityLog) begin(off, n int64, wait bool) (bool, error) {
	first, last, ok := l.extents(off, n)
	if !ok {
		return true, nil
	}
	if last-first+1 > uint64(l.slots) {
		return false, fmt.Errorf("%w: %d extents, %d slots", ErrTooLarge, last-first+1, l.slots)
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	var need uint64
	for {
		if l.closed {
			return false, ErrClosed
		}
		if l.err != nil {
			return false, l.err
		}
		var ok bool
		if need, ok = l.acquire(first, last); ok {
			break
		}
		if !wait {
			return false, nil
		}
		l.cond.Wait() // every slot busy: wait for an End
	}
	if err := l.waitCommitted(need); err != nil {
		l.release(first, last)
		return false, err
	}
	return true, nil
}

// acquire takes a reference on each extent in [first, last], making room by
// evicting idle extents. It returns the transaction that must be durable.
func (l *ActivityLog) acquire(first, last uint64) (uint64, bool) {
	var need uint64
	l.tick++
	for e := first; e <= last; e++ {
		en := l.entries[e]
		if en == nil {
			if len(l.entries) >= l.slots && !l.evict(first, last) {
				if e > first {
					l.release(first, e-1)
				}
				return 0, false
			}
			en = &alEntry{seq: l.assembling}
			l.entries[e] = en
		}
		en.refs++
		en.used = l.tick
		need = max(need, en.seq)
	}
	return need, true
}

// evict drops the least recently used idle extent outside [first, last].
func (l *ActivityLog) evict(first, last uint64) bool {
	var victim uint64
	var best *alEntry
	for e, en := range l.entries {
		if en.refs > 0 || (e >= first && e <= last) {
			continue
		}
		if best == nil || en.used < best.used {
			victim, best = e, en
		}
	}
	if best == nil {
		return false
	}
	delete(l.entries, victim)
	l.evicted = true
	return true
}

func (l *ActivityLog) release(first, last uint64) {
	wake := false
	for e := first; e <= last; e++ {
		if en := l.entries[e]; en != nil && en.refs > 0 {
			en.refs--
			wake = wake || en.refs == 0
		}
	}
	if wake {
		l.cond.Broadcast()
	}
}

// waitCommitted blocks (l.mu held) until transaction need is durable, writing
// it if no one else is.
func (l *ActivityLog) waitCommitted(need uint64) error {
	for l.committed < need {
		if l.err != nil {
			return l.err
		}
		if l.writing {
			l.cond.Wait()
			continue
		}
		l.commitLocked()
	}
	return nil
}

// commitLocked writes the next transaction holding every current entry. It
// drops l.mu during the I/O.
func (l *ActivityLog) commitLocked() {
	l.writing = true
	seq := l.assembling
	l.assembling++
	exts := make([]uint64, 0, len(l.entries))
	for e := range l.entries {
		exts = append(exts, e)
	}
	sort.Slice(exts, func(i, j int) bool { return exts[i] < exts[j] })
	flush := l.evicted
	l.evicted = false
	l.mu.Unlock()
	var err error
	if flush {
		err = l.bm.Flush()
	}
	if err == nil {
		err = l.write(seq, exts)
	}
	l.mu.Lock()
	l.writing = false
	if err != nil {
		l.err = err
	} else {
		l.committed = seq
	}
	l.cond.Broadcast()
}

// End releases a range taken by Begin. Its extents stay hot until a slot is
// needed.
func (l *ActivityLog) End(off, n int64) {
	first, last, ok := l.extents(off, n)
	if !ok {
		return
	}
	l.mu.Lock()
	l.release(first, last)
	l.mu.Unlock()
}

// Clean flushes the bitmap and records that no idle extent is hot: call it
// when everything written so far is on the peer or marked in the bitmap (a
// clean shutdown, the end of a resync), so that the next open resyncs
// nothing beyond the bitmap. Extents with a Begin not yet Ended stay hot.
func (l *ActivityLog) Clean() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return ErrClosed
	}
	for e, en := range l.entries {
		if en.refs == 0 {
			delete(l.entries, e)
		}
	}
	l.evicted = true
	for l.writing {
		l.cond.Wait()
	}
	if l.err != nil {
		return l.err
	}
	l.commitLocked()
	return l.err
}

// Close closes the log file. It does not Clean: extents still hot are
// reported by the next OpenLog.
func (l *ActivityLog) Close() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return nil
	}
	l.closed = true
	for l.writing {
		l.cond.Wait()
	}
	l.cond.Broadcast()
	return l.f.Close()
}
