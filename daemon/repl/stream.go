package repl

import (
	"container/heap"
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"net"
	"sync"
	"sync/atomic"
	"syscall"

	"github.com/doppelha/doppel/blockdev"
	"github.com/doppelha/doppel/daemon/repl/wire"
)

// DefaultChunkSize is the mirror / checksum chunk.
const DefaultChunkSize = 64 << 10

// Errors reported by the source.
var (
	ErrClosed = errors.New("replication source closed")
)

// StreamConfig configures a [Stream].
type StreamConfig struct {
	// Backend is the protected volume: the local half of every mutation.
	Backend blockdev.Backend
	// Mode is wire.ModeSync or wire.ModeAsync.
	Mode wire.Mode
	// ChunkSize is the mirror and checksum chunk (power of two, ≥ 4 KiB);
	// 0 means DefaultChunkSize.
	ChunkSize int64
	// Backlog holds sequenced frames until the target acknowledges them;
	// nil means NewMemBacklog(DefaultBacklogBytes).
	Backlog Backlog
	// Tracker records ranges not yet on the target; nil tracks nothing.
	Tracker Tracker
	// Dial connects to the target; TLS, if any, is the dialer's business
	// (see [ClientTLS]). Run calls it again after a lost connection.
	Dial func(ctx context.Context) (net.Conn, error)
	// Codec compresses Write and MirrorData payloads; nil sends them raw.
	Codec *wire.Codec
	// RateLimit caps the bytes per second written to the target; 0 means
	// unlimited.
	RateLimit int64
	// Log receives structured logs; nil discards them.
	Log *slog.Logger
	// Incomplete, when set, reports that the target still lacks changes
	// that are not in the stream (the caller's dirty bitmap): the end of a
	// mirror or resync pass then leaves the target inconsistent, and a
	// later pass (EndResync once nothing is missing) makes it consistent.
	// Without it, the end of every pass does.
	Incomplete func() bool
	// Liveness bounds how long a silent session goes unnoticed, and
	// reports the target's frames (keepalive.go).
	Liveness Liveness
	// Resume continues an existing stream (a restarted source whose
	// persistent Backlog still holds the unacknowledged frames); nil starts
	// a new stream with a random ID at sequence 1.
	Resume *ResumePoint
}

// ResumePoint is where a restarted source continues its stream.
type ResumePoint struct {
	StreamID uint64 // the stream's ID (non-zero)
	LastSeq  uint64 // last sequence assigned before the restart
	AckedSeq uint64 // the target applied everything up to here; Backlog holds AckedSeq+1..LastSeq
}

// Stream is the source side of replication: a [blockdev.Mutator] that
// applies each mutation locally, sequences it, and ships it to the target.
type Stream struct {
	cfg     StreamConfig
	log     *slog.Logger
	b       blockdev.Backend
	size    int64
	chunk   int64
	queue   Backlog
	tracker Tracker
	ext     extents

	streamID uint64
	life     context.Context // cancelled by Close
	stop     context.CancelFunc

	locks rangeLock

	seqMu sync.Mutex
	last  uint64 // last sequence assigned

	ackMu   sync.Mutex
	acked   uint64 // target applied every sequence ≤ acked
	durable uint64
	ackCh   chan struct{} // closed and replaced when acked moves or the state changes
	waiters ackWaiters    // waitAck callers, woken only when their sequence is acknowledged
	failed  error         // set when Run gives up: waiters fail with it
	conn    bool          // a session is established
	tstate  uint8         // target data state as last known (0: unknown)

	sums sync.Map // seq → chan *wire.SumReply

	st stats
}

// stats are the source's counters (read by Stats and the collector).
type stats struct {
	sentBytes    [kinds]atomic.Int64 // wire bytes by kind
	payloadBytes [kinds]atomic.Int64 // data bytes (writes, mirror chunks) by kind
	sentFrames   atomic.Int64
	recvBytes    atomic.Int64
	sentSeq      atomic.Uint64
	mirrorDone   atomic.Int64
	mirrorTotal  atomic.Int64
	mirrorActive atomic.Bool
	connects     atomic.Int64
}

// Traffic kinds for metrics.
const (
	KindWrite = iota
	KindMirror
	KindResync
	KindVerify
	kinds
)

var kindNames = [kinds]string{"write", "mirror", "resync", "verify"}

// NewStream returns a stream for cfg. Call Run to connect it.
func NewStream(cfg StreamConfig) (*Stream, error) {
	if cfg.Backend == nil {
		return nil, errors.New("replication source: no backend")
	}
	if cfg.Mode != wire.ModeSync && cfg.Mode != wire.ModeAsync {
		return nil, fmt.Errorf("replication source: unknown mode %v", cfg.Mode)
	}
	if cfg.ChunkSize == 0 {
		cfg.ChunkSize = DefaultChunkSize
	}
	if c := cfg.ChunkSize; c < 4096 || c > 1<<24 || c&(c-1) != 0 {
		return nil, fmt.Errorf("replication source: chunk size %d is not a power of two in 4 KiB..16 MiB", c)
	}
	if cfg.Backlog == nil {
		cfg.Backlog = NewMemBacklog(DefaultBacklogBytes)
	}
	if cfg.Tracker == nil {
		cfg.Tracker = nopTracker{}
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	cfg.Liveness = cfg.Liveness.withDefaults()
	var id [8]byte
	if _, err := rand.Read(id[:]); err != nil {
		return nil, err
	}
	s := &Stream{
		cfg: cfg, log: cfg.Log, b: cfg.Backend, size: cfg.Backend.Size(), chunk: cfg.ChunkSize,
		queue: cfg.Backlog, tracker: cfg.Tracker, ext: newExtents(cfg.Backend),
		streamID: binary.BigEndian.Uint64(id[:]) | 1, ackCh: make(chan struct{}),
	}
	if r := cfg.Resume; r != nil {
		if r.StreamID == 0 || r.AckedSeq > r.LastSeq {
			return nil, fmt.Errorf("replication source: bad resume point %+v", *r)
		}
		s.streamID, s.last, s.acked, s.durable = r.StreamID, r.LastSeq, r.AckedSeq, r.AckedSeq
	}
	s.life, s.stop = context.WithCancel(context.Background())
	return s, nil
}

// StreamID identifies this source's sequence stream (persist it with the
// queue to resume after a restart).
func (s *Stream) StreamID() uint64 { return s.streamID }

// Mode returns the replication mode.
func (s *Stream) Mode() wire.Mode { return s.cfg.Mode }

// Close stops the source: waiters fail with ErrClosed. It does not close
// the backend.
func (s *Stream) Close() error {
	s.stop()
	s.fail(ErrClosed)
	return s.ext.Close()
}

// Apply implements [blockdev.Mutator]: the local write, then the frame in
// the replication stream, then (sync mode, or a durable request) the wait
// for the target.
func (s *Stream) Apply(ctx context.Context, m *blockdev.Mutation) error {
	if m.Op == blockdev.OpFlush {
		seq, err := s.push(&wire.Flush{})
		if err != nil {
			return err
		}
		if err := s.b.Sync(); err != nil {
			return err
		}
		if s.cfg.Mode == wire.ModeSync {
			return s.waitAck(ctx, seq)
		}
		return nil
	}
	if m.Offset < 0 || m.Length < 0 || m.Offset+m.Length > s.size {
		return fmt.Errorf("%v [%d,+%d) beyond volume of %d bytes: %w", m.Op, m.Offset, m.Length, s.size, syscall.EINVAL)
	}
	unlock := s.locks.lock(m.Offset, m.Length)
	if err := s.tracker.Mark(m.Offset, m.Length); err != nil {
		unlock()
		return fmt.Errorf("track %v: %w", m.Op, err)
	}
	// Queue first, then write locally: the sender ships the frame while
	// the local write runs (DRBD submits both at once), so in sync mode the
	// local write is off the critical path. The range stays locked across
	// both, so overlapping requests and mirror reads still see them in
	// sequence order.
	fs, done := mutationFrames(m)
	// The frames and the local write share the NBD server's buffer, and the
	// target may acknowledge the frames before the local write has read
	// it: the buffer goes back to the server's pool only once both are
	// done with it.
	done, localDone := shareRelease(done)
	seq, err := s.pushDone(done, fs...)
	lerr := blockdev.ApplyTo(s.b, m)
	localDone()
	if lerr != nil {
		// The local disk failed the change (the target may get it): the
		// range is undefined here, so it stays dirty (a resync copies
		// whatever the source holds) and the client gets the error.
		s.tracker.Sequenced(0, m.Offset, m.Length) // every Mark gets its Sequenced
		unlock()
		if err == nil {
			s.log.Error("local write failed after the change was queued for the target; range left dirty", "op", m.Op, "offset", m.Offset, "length", m.Length, "err", lerr)
		}
		return lerr
	}
	if err != nil {
		// As before the reordering: applied locally, not queued (a wrapper
		// such as replstate keeps it in its bitmap and may still succeed).
		s.tracker.Sequenced(0, m.Offset, m.Length)
		unlock()
		s.log.Error("mutation applied locally but not queued for the target", "op", m.Op, "offset", m.Offset, "length", m.Length, "err", err)
		return err
	}
	s.tracker.Sequenced(seq, m.Offset, m.Length)
	unlock()
	if m.FUA {
		if err := s.b.Sync(); err != nil {
			return err
		}
	}
	if s.cfg.Mode == wire.ModeSync {
		return s.waitAck(ctx, seq)
	}
	return nil
}

// shareRelease splits release between two users of one buffer: it runs
// once both returned functions have been called. A nil release stays nil
// for the queue (nothing to give back) and a no-op for the local side.
func shareRelease(release func()) (queue, local func()) {
	if release == nil {
		return nil, func() {}
	}
	var left atomic.Int32
	left.Store(2)
	once := func() {
		if left.Add(-1) == 0 {
			release()
		}
	}
	return once, once
}

// mutationFrames converts m into wire frames; writes larger than
// wire.MaxData are split. A write's frames share its data, retained from the
// NBD server without a copy when it lends its buffer: done releases it.
func mutationFrames(m *blockdev.Mutation) (fs []wire.Sequenced, done func()) {
	off := uint64(m.Offset)
	switch m.Op {
	case blockdev.OpWrite:
		data, release := m.Retain()
		for {
			n := min(len(data), wire.MaxData)
			fs = append(fs, &wire.Write{Offset: off, FUA: m.FUA && n == len(data), Data: data[:n:n]})
			data, off = data[n:], off+uint64(n)
			if len(data) == 0 {
				return fs, release
			}
		}
	case blockdev.OpTrim:
		return []wire.Sequenced{&wire.Trim{Offset: off, Length: uint64(m.Length), FUA: m.FUA}}, nil
	default: // OpWriteZeroes
		return []wire.Sequenced{&wire.Zeroes{Offset: off, Length: uint64(m.Length), FUA: m.FUA, NoHole: m.NoHole}}, nil
	}
}

func setSeq(f wire.Sequenced, seq uint64) {
	switch f := f.(type) {
	case *wire.Write:
		f.Seq = seq
	case *wire.Trim:
		f.Seq = seq
	case *wire.Zeroes:
		f.Seq = seq
	case *wire.Flush:
		f.Seq = seq
	case *wire.MirrorData:
		f.Seq = seq
	case *wire.MirrorHole:
		f.Seq = seq
	case *wire.MirrorState:
		f.Seq = seq
	case *wire.SumRequest:
		f.Seq = seq
	default:
		panic(fmt.Sprintf("repl: cannot sequence %T", f))
	}
}

func entrySize(f wire.Sequenced) int64 {
	switch f := f.(type) {
	case *wire.Write:
		return int64(len(f.Data)) + 64
	case *wire.MirrorData:
		return int64(len(f.Data)) + 64
	}
	return 64
}

// push sequences fs (consecutively) and queues them; it returns the last
// sequence.
func (s *Stream) push(fs ...wire.Sequenced) (uint64, error) { return s.pushDone(nil, fs...) }

// pushDone is push with the queue's release callback of the last frame
// (see Entry.Done); done is dropped when not every frame was queued.
func (s *Stream) pushDone(done func(), fs ...wire.Sequenced) (uint64, error) {
	s.seqMu.Lock()
	defer s.seqMu.Unlock()
	if err := s.life.Err(); err != nil {
		return 0, ErrClosed
	}
	for i, f := range fs {
		seq := s.last + 1
		setSeq(f, seq)
		if _, ok := f.(*wire.SumRequest); ok {
			s.sums.Store(seq, make(chan *wire.SumReply, 1)) // before the reply can come
		}
		e := Entry{Seq: seq, Frame: f, Size: entrySize(f)}
		if i == len(fs)-1 {
			e.Done = done
		}
		if err := s.queue.Push(s.life, e); err != nil {
			return 0, fmt.Errorf("queue frame %d: %w", seq, err)
		}
		s.last = seq
	}
	return s.last, nil
}

// LastSeq is the last sequence assigned.
func (s *Stream) LastSeq() uint64 {
	s.seqMu.Lock()
	defer s.seqMu.Unlock()
	return s.last
}

func (s *Stream) signalLocked() {
	close(s.ackCh)
	s.ackCh = make(chan struct{})
}

// onAck records the target's progress.
func (s *Stream) onAck(applied, durable uint64) {
	s.ackMu.Lock()
	moved := applied > s.acked
	if moved {
		s.acked = applied
	}
	if durable > s.durable {
		s.durable = durable
	}
	if moved {
		s.signalLocked()
		s.waiters.wake(applied)
	}
	s.ackMu.Unlock()
	if moved {
		s.queue.Release(applied)
		s.tracker.Acked(applied)
	}
}

func (s *Stream) setConnected(up bool, tstate uint8) {
	s.ackMu.Lock()
	s.conn = up
	if tstate != 0 {
		s.tstate = tstate
	}
	s.signalLocked()
	s.ackMu.Unlock()
}

func (s *Stream) setTargetState(st uint8) {
	s.ackMu.Lock()
	s.tstate = st
	s.ackMu.Unlock()
}

func (s *Stream) fail(err error) {
	s.ackMu.Lock()
	if s.failed == nil {
		s.failed = err
	}
	s.signalLocked()
	s.waiters.wake(math.MaxUint64)
	s.ackMu.Unlock()
}

// waitAck waits until the target applied seq. Each waiter has its own
// wake-up, sent when the target acknowledged its sequence (or the source
// failed): an ack does not wake every request in flight.
func (s *Stream) waitAck(ctx context.Context, seq uint64) error {
	var ch chan struct{}
	for {
		s.ackMu.Lock()
		acked, failed := s.acked, s.failed
		if acked < seq && failed == nil {
			if ch == nil {
				ch = make(chan struct{}, 1)
			}
			heap.Push(&s.waiters, ackWaiter{seq: seq, ch: ch})
		}
		s.ackMu.Unlock()
		if acked >= seq {
			return nil
		}
		if failed != nil {
			return fmt.Errorf("wait for target to apply %d: %w", seq, failed)
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return ctx.Err() // the entry stays until acked or failed (ch is buffered)
		}
	}
}

// ackWaiter is a waitAck caller.
type ackWaiter struct {
	seq uint64
	ch  chan struct{} // buffered (1): wake never blocks
}

// ackWaiters is a min-heap of waiters by sequence (under Source.ackMu).
type ackWaiters []ackWaiter

func (h ackWaiters) Len() int           { return len(h) }
func (h ackWaiters) Less(i, j int) bool { return h[i].seq < h[j].seq }
func (h ackWaiters) Swap(i, j int)      { h[i], h[j] = h[j], h[i] }
func (h *ackWaiters) Push(x any)        { *h = append(*h, x.(ackWaiter)) }
func (h *ackWaiters) Pop() any {
	old := *h
	w := old[len(old)-1]
	old[len(old)-1] = ackWaiter{}
	*h = old[:len(old)-1]
	return w
}

// wake wakes the waiters of every sequence up to seq.
func (h *ackWaiters) wake(seq uint64) {
	for len(*h) > 0 && (*h)[0].seq <= seq {
		w := heap.Pop(h).(ackWaiter)
		select {
		case w.ch <- struct{}{}:
		default:
		}
	}
}

// WaitAcked waits until the target applied everything sequenced so far
// (a drain, e.g. before a clean shutdown).
func (s *Stream) WaitAcked(ctx context.Context) error { return s.waitAck(ctx, s.LastSeq()) }

// waitConnected waits until a session is established.
func (s *Stream) waitConnected(ctx context.Context) error {
	for {
		s.ackMu.Lock()
		conn, failed, ch := s.conn, s.failed, s.ackCh
		s.ackMu.Unlock()
		if conn {
			return nil
		}
		if failed != nil {
			return failed
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// waitQueueBelow waits until the queue holds at most n bytes.
func (s *Stream) waitQueueBelow(ctx context.Context, n int64) error {
	for {
		s.ackMu.Lock()
		failed, ch := s.failed, s.ackCh
		s.ackMu.Unlock()
		if b, _ := s.queue.Len(); b <= n {
			return nil
		}
		if failed != nil {
			return failed
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// StreamStats is a snapshot of a stream's state and counters.
type StreamStats struct {
	Mode         string
	Connected    bool
	LastSeq      uint64           // last sequence assigned
	SentSeq      uint64           // last sequence written to the connection
	AckedSeq     uint64           // target applied everything up to here
	DurableSeq   uint64           // ... and fsynced up to here
	QueueBytes   int64            // bytes waiting for an ack
	QueueEntries int              // frames waiting for an ack
	SentBytes    map[string]int64 // wire bytes by kind (write, mirror, resync, verify)
	PayloadBytes map[string]int64 // data bytes by kind
	SentFrames   int64
	RecvBytes    int64
	MirrorActive bool
	MirrorDone   int64 // bytes of the volume scanned by the current/last mirror
	MirrorTotal  int64
	TargetState  string // consistent, inconsistent, unknown
	Connects     int64
}

// AddCounters adds o's counters (SentBytes, PayloadBytes, SentFrames,
// RecvBytes, Connects) to st's: an owner that replaces its Stream keeps
// them growing across streams.
func (st *StreamStats) AddCounters(o StreamStats) {
	if st.SentBytes == nil {
		st.SentBytes = map[string]int64{}
	}
	if st.PayloadBytes == nil {
		st.PayloadBytes = map[string]int64{}
	}
	for k, v := range o.SentBytes {
		st.SentBytes[k] += v
	}
	for k, v := range o.PayloadBytes {
		st.PayloadBytes[k] += v
	}
	st.SentFrames += o.SentFrames
	st.RecvBytes += o.RecvBytes
	st.Connects += o.Connects
}

// Stats returns a snapshot.
func (s *Stream) Stats() StreamStats {
	st := StreamStats{Mode: s.cfg.Mode.String(), LastSeq: s.LastSeq(), SentSeq: s.st.sentSeq.Load(),
		SentBytes: map[string]int64{}, PayloadBytes: map[string]int64{},
		SentFrames: s.st.sentFrames.Load(), RecvBytes: s.st.recvBytes.Load(),
		MirrorActive: s.st.mirrorActive.Load(), MirrorDone: s.st.mirrorDone.Load(),
		MirrorTotal: s.st.mirrorTotal.Load(), Connects: s.st.connects.Load()}
	s.ackMu.Lock()
	st.Connected, st.AckedSeq, st.DurableSeq, st.TargetState = s.conn, s.acked, s.durable, stateName(s.tstate)
	s.ackMu.Unlock()
	st.QueueBytes, st.QueueEntries = s.queue.Len()
	for k := range kinds {
		st.SentBytes[kindNames[k]] = s.st.sentBytes[k].Load()
		st.PayloadBytes[kindNames[k]] = s.st.payloadBytes[k].Load()
	}
	return st
}

func stateName(st uint8) string {
	switch st {
	case wire.StateConsistent:
		return "consistent"
	case wire.StateInconsistent:
		return "inconsistent"
	}
	return "unknown"
}
