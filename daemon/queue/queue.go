// Package queue is the asynchronous replication queue: records (encoded
// writes) wait here, in order, until the peer acknowledges them.
//
// Records go to a bounded memory queue first (default 128 MiB). When it is
// full they spill to a segmented disk queue in a directory of the state dir
// (default 2048 MiB, 64 MiB segment files, each record length-prefixed and
// CRC32C-protected). Order is FIFO across both: once records spill, new ones
// keep going to disk until the disk backlog has been acknowledged, so the
// queue is always "memory part, then disk part". When both are full, Push
// returns ErrFull at once: it never blocks.
//
// The contract with the replication engine: a write whose Push returns
// ErrFull is not queued; the engine marks its chunks in the dirty bitmap and
// switches to bitmap-only tracking (no write is lost, the application is not
// blocked), then resyncs those chunks once the link catches up. The memory
// part does not survive a crash (the bitmap and activity log cover it); the
// disk part does: Open replays unacknowledged disk records in order, drops a
// torn tail, and Recovery reports what was dropped. Replay is at least once:
// acknowledgements are not persisted, so the peer must skip records whose
// sequence it has already applied.
//
// SyncTail makes the disk part durable without delaying pushes and reports
// up to which sequence every unacknowledged record survives a crash (the
// replication source then lets the disk queue stand in for its activity
// log). A full segment is fdatasync'd before the next one starts.
//
// Consumers ship with Next (each record handed out once, in order), remove
// with Ack(seq) when the peer confirms, and Rewind after a reconnect to hand
// out every unacknowledged record again. Peek/Pop serve simple consumers.
package queue

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"

	"github.com/doppelha/doppel/daemon/statefile"
	"golang.org/x/sys/unix"
)

// Defaults.
const (
	DefaultMemLimit    = 128 << 20
	DefaultDiskLimit   = 2048 << 20
	DefaultSegmentSize = 64 << 20
	DefaultMaxRecord   = 32<<20 + 4096
)

// Overhead is the bytes accounted per record on top of its data, in memory
// and on disk (the record header).
const Overhead = recordHeader

const (
	recordHeader  = 16 // u32 length, u32 crc32c(seq || data), u64 seq
	segmentHeader = 16 // magic, u32 version, u32 reserved
	segMagic      = "DPQSEG\x00\x01"
	segVersion    = 1
	segSuffix     = ".seg"
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// Errors returned by the queue.
var (
	ErrFull     = errors.New("replication queue full")
	ErrClosed   = errors.New("replication queue closed")
	ErrOrder    = errors.New("record sequence not increasing")
	ErrTooLarge = errors.New("record larger than the queue accepts")
	ErrCorrupt  = errors.New("queue record corrupt")
)

// Options sizes a Queue. Zero values take the defaults.
type Options struct {
	MemLimit    int64 // bytes of records (data + Overhead) held in memory
	DiskLimit   int64 // bytes of segment files; negative: no disk queue
	SegmentSize int64 // a segment is closed once it reaches this size
	MaxRecord   int   // largest accepted record data
}

// Record is one queued item, identified by its sequence number.
type Record struct {
	Seq  uint64
	Data []byte
	// Value is what PushValue was given, for a record it kept in memory
	// (Data is nil then); nil for a record pushed as bytes and for every
	// record read from disk.
	Value any
}

// memRecord is a record of the memory part.
type memRecord struct {
	Record
	size    int64  // bytes accounted: data (or PushValue's size) + Overhead
	release func() // PushValue's, called once the record is acknowledged
}

// Recovery describes what Open found in the directory.
type Recovery struct {
	Records      int   // unacknowledged records replayed from disk
	Segments     int   // segment files kept
	DroppedBytes int64 // bytes dropped: torn tail, corrupt records, and what followed them
}

// Queue is a FIFO of records bounded in memory and on disk. It is safe for
// concurrent use; Next/Wait are meant for a single consumer.
type Queue struct {
	opt Options
	dir string

	mu       sync.Mutex
	closed   bool
	lastSeq  uint64
	mem      []memRecord // unacknowledged memory records, oldest first
	memShip  int         // index in mem of the next record to hand out
	memBytes int64

	segs      []*segment // unacknowledged disk segments, oldest first
	nextID    uint64
	w         *os.File // append handle of the last segment, nil when closed
	diskBytes int64
	diskCount int     // unacknowledged disk records
	ship      diskPos // next disk record to hand out
	rec       Recovery
	ready     chan struct{}
}

type segment struct {
	id        uint64
	path      string
	f         *os.File // read handle, opened lazily
	size      int64
	count     int // records in the file
	lastSeq   uint64
	ackOff    int64 // offset of the first unacknowledged record
	ackCount  int   // acknowledged records
	writeable bool  // the segment being appended to
}

type diskPos struct {
	id  uint64
	off int64
}

// Open opens (creating it if needed) the queue whose disk part lives in dir,
// replaying the unacknowledged records found there.
func Open(dir string, opt Options) (*Queue, error) {
	if opt.MemLimit == 0 {
		opt.MemLimit = DefaultMemLimit
	}
	if opt.DiskLimit == 0 {
		opt.DiskLimit = DefaultDiskLimit
	}
	if opt.SegmentSize == 0 {
		opt.SegmentSize = DefaultSegmentSize
	}
	if opt.MaxRecord == 0 {
		opt.MaxRecord = DefaultMaxRecord
	}
	if opt.MemLimit < 0 || opt.SegmentSize < 0 || opt.MaxRecord < 0 {
		return nil, fmt.Errorf("queue options: negative limit %+v", opt)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("create queue dir: %w", err)
	}
	q := &Queue{opt: opt, dir: dir, nextID: 1, ready: make(chan struct{}, 1)}
	if err := q.load(); err != nil {
		q.closeFiles()
		return nil, err
	}
	return q, nil
}

func segName(id uint64) string { return fmt.Sprintf("%016x%s", id, segSuffix) }

// load scans the segment files in order, keeping the valid prefix.
func (q *Queue) load() error {
	ents, err := os.ReadDir(q.dir)
	if err != nil {
		return fmt.Errorf("read queue dir: %w", err)
	}
	var ids []uint64
	for _, e := range ents {
		name := e.Name()
		if !strings.HasSuffix(name, segSuffix) {
			continue
		}
		id, err := strconv.ParseUint(strings.TrimSuffix(name, segSuffix), 16, 64)
		if err != nil {
			continue
		}
		ids = append(ids, id)
	}
	slices.Sort(ids)
	broken := false
	for _, id := range ids {
		q.nextID = id + 1
		path := filepath.Join(q.dir, segName(id))
		if broken {
			fi, _ := os.Stat(path)
			if fi != nil {
				q.rec.DroppedBytes += fi.Size()
			}
			if err := os.Remove(path); err != nil {
				return fmt.Errorf("drop queue segment: %w", err)
			}
			continue
		}
		s, dropped, err := q.scan(id, path)
		if err != nil {
			return err
		}
		q.rec.DroppedBytes += dropped
		if dropped > 0 {
			broken = true // never replay across a gap
		}
		if s == nil {
			continue
		}
		q.segs = append(q.segs, s)
		q.diskBytes += s.size
		q.diskCount += s.count
		q.lastSeq = s.lastSeq
	}
	q.rec.Records = q.diskCount
	q.rec.Segments = len(q.segs)
	if len(q.segs) > 0 {
		q.ship = diskPos{q.segs[0].id, segmentHeader}
	}
	return nil
}

// scan validates one segment, truncating it after its last good record.
// It returns nil when the segment holds no record (and removes it).
func (q *Queue) scan(id uint64, path string) (*segment, int64, error) {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return nil, 0, fmt.Errorf("open queue segment: %w", err)
	}
	fi, err := f.Stat()
	if err != nil {
		_ = f.Close()
		return nil, 0, fmt.Errorf("stat queue segment: %w", err)
	}
	s := &segment{id: id, path: path, f: f, size: segmentHeader}
	hdr := make([]byte, segmentHeader)
	if _, err := f.ReadAt(hdr, 0); err != nil || checkSegmentHeader(hdr) != nil {
		_ = f.Close()
		return nil, fi.Size(), os.Remove(path)
	}
	off := int64(segmentHeader)
	for off < fi.Size() {
		r, n, err := readRecord(f, off, q.opt.MaxRecord)
		if err != nil || (s.count > 0 && r.Seq <= s.lastSeq) || (q.lastSeq != 0 && r.Seq <= q.lastSeq) {
			break
		}
		s.count++
		s.lastSeq = r.Seq
		off += n
	}
	dropped := fi.Size() - off
	if dropped > 0 {
		if err := f.Truncate(off); err != nil {
			_ = f.Close()
			return nil, 0, fmt.Errorf("truncate torn queue segment: %w", err)
		}
	}
	s.size = off
	s.ackOff = segmentHeader
	if s.count == 0 {
		_ = f.Close()
		return nil, dropped, os.Remove(path)
	}
	return s, dropped, nil
}

func checkSegmentHeader(h []byte) error {
	if len(h) < segmentHeader || string(h[:8]) != segMagic || binary.LittleEndian.Uint32(h[8:]) != segVersion {
		return fmt.Errorf("%w: bad segment header", ErrCorrupt)
	}
	return nil
}

// EncodeRecord appends the on-disk form of r to b.
func EncodeRecord(b []byte, r Record) []byte {
	var h [recordHeader]byte
	binary.LittleEndian.PutUint32(h[0:], uint32(len(r.Data)))
	binary.LittleEndian.PutUint64(h[8:], r.Seq)
	c := crc32.Update(0, castagnoli, h[8:16])
	c = crc32.Update(c, castagnoli, r.Data)
	binary.LittleEndian.PutUint32(h[4:], c)
	b = append(b, h[:]...)
	return append(b, r.Data...)
}

// DecodeRecord parses one record at the start of b, returning it (Data
// aliases b) and its encoded length. Records with data over maxData bytes
// are refused.
func DecodeRecord(b []byte, maxData int) (Record, int, error) {
	if len(b) < recordHeader {
		return Record{}, 0, fmt.Errorf("%w: short header", ErrCorrupt)
	}
	n := binary.LittleEndian.Uint32(b[0:])
	if int64(n) > int64(maxData) {
		return Record{}, 0, fmt.Errorf("%w: length %d over %d", ErrCorrupt, n, maxData)
	}
	if uint64(len(b)-recordHeader) < uint64(n) {
		return Record{}, 0, fmt.Errorf("%w: truncated data", ErrCorrupt)
	}
	data := b[recordHeader : recordHeader+int(n)]
	c := crc32.Update(0, castagnoli, b[8:16])
	if crc32.Update(c, castagnoli, data) != binary.LittleEndian.Uint32(b[4:]) {
		return Record{}, 0, fmt.Errorf("%w: checksum mismatch", ErrCorrupt)
	}
	return Record{Seq: binary.LittleEndian.Uint64(b[8:]), Data: data}, recordHeader + int(n), nil
}

// readRecord reads and verifies the record at off.
func readRecord(f *os.File, off int64, maxData int) (Record, int64, error) {
	var h [recordHeader]byte
	if _, err := f.ReadAt(h[:], off); err != nil {
		return Record{}, 0, fmt.Errorf("%w: %w", ErrCorrupt, err)
	}
	n := binary.LittleEndian.Uint32(h[0:])
	if int64(n) > int64(maxData) {
		return Record{}, 0, fmt.Errorf("%w: length %d over %d", ErrCorrupt, n, maxData)
	}
	b := make([]byte, recordHeader+int(n))
	copy(b, h[:])
	if _, err := f.ReadAt(b[recordHeader:], off+recordHeader); err != nil {
		if errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		return Record{}, 0, fmt.Errorf("%w: %w", ErrCorrupt, err)
	}
	r, k, err := DecodeRecord(b, maxData)
	return r, int64(k), err
}

// Push appends a record. seq must be greater than every sequence pushed
// before. The data is copied. Push never blocks on the consumer: when neither
// memory nor disk has room it returns ErrFull and the record is not queued.
func (q *Queue) Push(seq uint64, data []byte) error {
	return q.push(seq, int64(len(data)), nil, func() ([]byte, error) { return data, nil }, nil)
}

// PushValue is Push of a record its producer holds as v (size bytes of
// data): while it fits in memory the queue keeps v itself, neither encoded
// nor copied, hands it out as Record.Value and calls release (when set) once
// it is acknowledged. Only a record that goes to disk is encoded (encode is
// then called once, under the queue's lock) and release is called as soon as
// it is written. A record not queued (an error) is not released.
func (q *Queue) PushValue(seq uint64, size int64, v any, encode func() ([]byte, error), release func()) error {
	if v == nil {
		return errors.New("queue: PushValue of a nil value")
	}
	return q.push(seq, size, v, encode, release)
}

// push queues a record of size data bytes: v in memory when set (else a
// copy of encode's bytes), the bytes of encode on disk.
func (q *Queue) push(seq uint64, n int64, v any, encode func() ([]byte, error), release func()) error {
	if n > int64(q.opt.MaxRecord) {
		return fmt.Errorf("%w: %d bytes, limit %d", ErrTooLarge, n, q.opt.MaxRecord)
	}
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.closed {
		return ErrClosed
	}
	if seq <= q.lastSeq {
		return fmt.Errorf("%w: %d after %d", ErrOrder, seq, q.lastSeq)
	}
	size := n + Overhead
	switch {
	case len(q.segs) == 0 && q.memBytes+size <= q.opt.MemLimit:
		r := memRecord{Record: Record{Seq: seq, Value: v}, size: size, release: release}
		if v == nil {
			data, err := encode()
			if err != nil {
				return err
			}
			r.Data = append([]byte(nil), data...)
		}
		q.mem = append(q.mem, r)
		q.memBytes += size
	case q.opt.DiskLimit > 0 && q.diskBytes+size+q.segmentCost(size) <= q.opt.DiskLimit:
		data, err := encode()
		if err != nil {
			return err
		}
		if len(data) > q.opt.MaxRecord {
			return fmt.Errorf("%w: %d bytes, limit %d", ErrTooLarge, len(data), q.opt.MaxRecord)
		}
		size = int64(len(data)) + Overhead
		if q.diskBytes+size+q.segmentCost(size) > q.opt.DiskLimit {
			return fmt.Errorf("%w: %d bytes in memory, %d on disk", ErrFull, q.memBytes, q.diskBytes)
		}
		if err := q.appendDisk(Record{Seq: seq, Data: data}, size); err != nil {
			return err
		}
		if release != nil {
			release()
		}
	default:
		return fmt.Errorf("%w: %d bytes in memory, %d on disk", ErrFull, q.memBytes, q.diskBytes)
	}
	q.lastSeq = seq
	select {
	case q.ready <- struct{}{}:
	default:
	}
	return nil
}

// needSegment reports whether a record of size bytes needs a new segment.
func (q *Queue) needSegment(size int64) bool {
	last := len(q.segs) - 1
	return q.w == nil || last < 0 || !q.segs[last].writeable || q.segs[last].size+size > q.opt.SegmentSize && q.segs[last].count > 0
}

func (q *Queue) segmentCost(size int64) int64 {
	if q.needSegment(size) {
		return segmentHeader
	}
	return 0
}

func (q *Queue) appendDisk(r Record, size int64) error {
	if q.needSegment(size) {
		if err := q.newSegment(); err != nil {
			return err
		}
	}
	s := q.segs[len(q.segs)-1]
	buf := EncodeRecord(make([]byte, 0, size), r)
	if _, err := q.w.WriteAt(buf, s.size); err != nil {
		// Cut off whatever part was written; the record is not queued.
		_ = q.w.Truncate(s.size)
		return fmt.Errorf("write queue segment: %w", err)
	}
	s.size += size
	s.count++
	s.lastSeq = r.Seq
	q.diskBytes += size
	q.diskCount++
	return nil
}

func (q *Queue) newSegment() error {
	if q.w != nil {
		// A full segment is made durable before the next one starts (one
		// fdatasync per segment), so that SyncTail need only sync the last.
		if err := unix.Fdatasync(int(q.w.Fd())); err != nil {
			return fmt.Errorf("fdatasync queue segment: %w", err)
		}
		q.segs[len(q.segs)-1].writeable = false
		_ = q.w.Close()
		q.w = nil
	}
	id := q.nextID
	path := filepath.Join(q.dir, segName(id))
	w, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return fmt.Errorf("create queue segment: %w", err)
	}
	h := make([]byte, segmentHeader)
	copy(h, segMagic)
	binary.LittleEndian.PutUint32(h[8:], segVersion)
	if _, err := w.WriteAt(h, 0); err != nil {
		_ = w.Close()
		_ = os.Remove(path)
		return fmt.Errorf("write queue segment header: %w", err)
	}
	q.nextID++
	q.w = w
	s := &segment{id: id, path: path, size: segmentHeader, ackOff: segmentHeader, writeable: true}
	if len(q.segs) == 0 {
		q.ship = diskPos{id, segmentHeader}
	}
	q.segs = append(q.segs, s)
	q.diskBytes += segmentHeader
	return nil
}

// Next hands out the next record not handed out yet (since Open or the last
// Rewind), in order, without removing it. ok is false when there is none.
func (q *Queue) Next() (Record, bool, error) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.closed {
		return Record{}, false, ErrClosed
	}
	if q.memShip < len(q.mem) {
		r := q.mem[q.memShip].Record
		q.memShip++
		return r, true, nil
	}
	r, at, n, ok, err := q.readDisk(q.ship)
	if ok {
		q.ship = diskPos{at.id, at.off + n}
	}
	return r, ok, err
}

// readDisk reads the disk record at p (clamped to the oldest unacknowledged
// one), following into the next segment when p is at a segment's end. It
// returns the record, where it was read, and its encoded length.
func (q *Queue) readDisk(p diskPos) (Record, diskPos, int64, bool, error) {
	for i, s := range q.segs {
		if s.id < p.id {
			continue
		}
		if s.id > p.id || p.off < s.ackOff {
			p = diskPos{s.id, s.ackOff}
		}
		if p.off >= s.size {
			if i+1 < len(q.segs) {
				p = diskPos{q.segs[i+1].id, 0}
				continue
			}
			return Record{}, p, 0, false, nil
		}
		if s.f == nil {
			f, err := os.Open(s.path)
			if err != nil {
				return Record{}, p, 0, false, fmt.Errorf("open queue segment: %w", err)
			}
			s.f = f
		}
		r, n, err := readRecord(s.f, p.off, q.opt.MaxRecord)
		if err != nil {
			return Record{}, p, 0, false, fmt.Errorf("read queue segment %s at %d: %w", filepath.Base(s.path), p.off, err)
		}
		return r, p, n, true, nil
	}
	return Record{}, p, 0, false, nil
}

// Wait is Next that blocks until a record is available or ctx is done.
func (q *Queue) Wait(ctx context.Context) (Record, error) {
	for {
		r, ok, err := q.Next()
		if err != nil || ok {
			return r, err
		}
		select {
		case <-q.ready:
		case <-ctx.Done():
			return Record{}, ctx.Err()
		}
	}
}

// Rewind makes Next hand out every unacknowledged record again, oldest
// first (after a reconnect).
func (q *Queue) Rewind() {
	q.mu.Lock()
	defer q.mu.Unlock()
	q.memShip = 0
	if len(q.segs) > 0 {
		q.ship = diskPos{q.segs[0].id, q.segs[0].ackOff}
	}
}

// Seek makes Next hand out, from now on, the unacknowledged records with a
// sequence greater than after (a reconnect where the peer reports the last
// sequence it applied).
func (q *Queue) Seek(after uint64) error {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.closed {
		return ErrClosed
	}
	q.memShip, _ = slices.BinarySearchFunc(q.mem, after+1, func(r memRecord, seq uint64) int {
		switch {
		case r.Seq < seq:
			return -1
		case r.Seq > seq:
			return 1
		}
		return 0
	})
	if len(q.segs) == 0 {
		return nil
	}
	p := diskPos{q.segs[0].id, q.segs[0].ackOff}
	for {
		r, at, n, ok, err := q.readDisk(p)
		if err != nil {
			return err
		}
		if !ok || r.Seq > after {
			q.ship = at
			return nil
		}
		p = diskPos{at.id, at.off + n}
	}
}

// Peek returns the oldest unacknowledged record without removing it.
func (q *Queue) Peek() (Record, bool, error) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.closed {
		return Record{}, false, ErrClosed
	}
	if len(q.mem) > 0 {
		return q.mem[0].Record, true, nil
	}
	if len(q.segs) == 0 {
		return Record{}, false, nil
	}
	r, _, _, ok, err := q.readDisk(diskPos{q.segs[0].id, q.segs[0].ackOff})
	return r, ok, err
}

// Pop removes and returns the oldest unacknowledged record.
func (q *Queue) Pop() (Record, bool, error) {
	r, ok, err := q.Peek()
	if ok && err == nil {
		err = q.Ack(r.Seq)
	}
	return r, ok, err
}

// Ack removes every record with a sequence <= seq. Disk segments are
// deleted once all their records are acknowledged.
func (q *Queue) Ack(seq uint64) error {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.closed {
		return ErrClosed
	}
	i := 0
	for i < len(q.mem) && q.mem[i].Seq <= seq {
		q.memBytes -= q.mem[i].size
		if q.mem[i].release != nil {
			q.mem[i].release()
		}
		q.mem[i] = memRecord{}
		i++
	}
	if i > 0 {
		q.mem = q.mem[i:]
		q.memShip = max(q.memShip-i, 0)
		if len(q.mem) == 0 {
			q.mem = nil // let the backing array go
		}
	}
	for len(q.segs) > 0 {
		s := q.segs[0]
		if s.lastSeq <= seq && (!s.writeable || s.count > 0) {
			if err := q.dropSegment(s); err != nil {
				return err
			}
			continue
		}
		// Partly acknowledged: advance over the acknowledged records.
		for s.ackCount < s.count {
			if s.f == nil {
				f, err := os.Open(s.path)
				if err != nil {
					return fmt.Errorf("open queue segment: %w", err)
				}
				s.f = f
			}
			var h [recordHeader]byte
			if _, err := s.f.ReadAt(h[:], s.ackOff); err != nil {
				return fmt.Errorf("read queue segment: %w", err)
			}
			if binary.LittleEndian.Uint64(h[8:]) > seq {
				break
			}
			s.ackOff += recordHeader + int64(binary.LittleEndian.Uint32(h[0:]))
			s.ackCount++
			q.diskCount--
		}
		break
	}
	return nil
}

func (q *Queue) dropSegment(s *segment) error {
	if s.writeable && q.w != nil {
		_ = q.w.Close()
		q.w = nil
	}
	if s.f != nil {
		_ = s.f.Close()
	}
	if err := os.Remove(s.path); err != nil {
		return fmt.Errorf("remove queue segment: %w", err)
	}
	q.diskBytes -= s.size
	q.diskCount -= s.count - s.ackCount
	q.segs = q.segs[1:]
	if len(q.segs) == 0 {
		q.segs = nil
	}
	return nil
}

// Len is the number of unacknowledged records.
func (q *Queue) Len() int {
	q.mu.Lock()
	defer q.mu.Unlock()
	return len(q.mem) + q.diskCount
}

// MemBytes is the memory held by unacknowledged records (data + Overhead).
func (q *Queue) MemBytes() int64 {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.memBytes
}

// DiskBytes is the size of the segment files on disk.
func (q *Queue) DiskBytes() int64 {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.diskBytes
}

// LastSeq is the highest sequence ever pushed (or replayed at Open).
func (q *Queue) LastSeq() uint64 {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.lastSeq
}

// Recovery reports what Open replayed and dropped.
func (q *Queue) Recovery() Recovery { return q.rec }

// Sync makes the disk part durable (fdatasync of the segment being written
// and of the directory). The queue never needs it for correctness; it bounds
// what a crash can lose from the disk part.
func (q *Queue) Sync() error {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.w != nil {
		if err := unix.Fdatasync(int(q.w.Fd())); err != nil {
			return fmt.Errorf("fdatasync queue segment: %w", err)
		}
	}
	return statefile.SyncDir(q.dir)
}

// SyncTail makes every record pushed so far durable and returns the highest
// sequence d such that every unacknowledged record with a sequence <= d
// survives a crash: the last sequence pushed when the memory part held no
// record, else 0 (memory records are older than disk ones and do not
// survive). Unlike Sync it does not hold the queue's lock while syncing,
// so pushes are not delayed.
func (q *Queue) SyncTail() (uint64, error) {
	q.mu.Lock()
	if q.closed {
		q.mu.Unlock()
		return 0, ErrClosed
	}
	last, memEmpty := q.lastSeq, len(q.mem) == 0
	fd := -1
	if q.w != nil {
		var err error
		if fd, err = unix.Dup(int(q.w.Fd())); err != nil {
			q.mu.Unlock()
			return 0, fmt.Errorf("dup queue segment: %w", err)
		}
	}
	q.mu.Unlock()
	if fd >= 0 {
		err := unix.Fdatasync(fd)
		unix.Close(fd)
		if err != nil {
			return 0, fmt.Errorf("fdatasync queue segment: %w", err)
		}
	}
	if err := statefile.SyncDir(q.dir); err != nil {
		return 0, err
	}
	if !memEmpty {
		return 0, nil
	}
	return last, nil
}

// Close releases the files. Unacknowledged disk records stay for the next
// Open; memory records are dropped.
func (q *Queue) Close() error {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.closed {
		return nil
	}
	q.closed = true
	return q.closeFiles()
}

func (q *Queue) closeFiles() error {
	var errs []error
	if q.w != nil {
		errs = append(errs, q.w.Close())
		q.w = nil
	}
	for _, s := range q.segs {
		if s.f != nil {
			errs = append(errs, s.f.Close())
			s.f = nil
		}
	}
	return errors.Join(errs...)
}
