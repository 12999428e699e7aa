package replstate

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"

	"github.com/doppelha/doppel/daemon/queue"
	"github.com/doppelha/doppel/daemon/repl"
	"github.com/doppelha/doppel/daemon/repl/wire"
)

// queueBacklog adapts the memory → disk queue (daemon/queue) to repl.Backlog.
// Push never waits: when memory and disk are full it fails with
// queue.ErrFull and the queue overflows: every later push fails too, so
// the target keeps a prefix of the history (consistent) while the source
// tracks every change in its bitmap, until the queue drains and the state
// layer starts a resync (reopen).
//
// Records durable on disk may stand in for the activity log (see
// Source.releaseQueued): once that happened up to sequence early, Release
// keeps records until the target holds them durably, not merely applied.
type queueBacklog struct {
	q        *queue.Queue
	overflow atomic.Bool

	relMu   sync.Mutex
	early   uint64        // highest sequence whose extents were released on the durable queue
	durable func() uint64 // the target's durable sequence (set before the engine runs)

	mu     sync.Mutex // the reader's position
	pos    uint64     // last sequence handed out by Next
	seeked bool
	acked  atomic.Uint64
}

func newQueueBacklog(q *queue.Queue) *queueBacklog { return &queueBacklog{q: q} }

// Push implements repl.Backlog.
func (s *queueBacklog) Push(_ context.Context, e repl.Entry) error {
	if s.overflow.Load() {
		return fmt.Errorf("overflowed, tracking in the bitmap: %w", queue.ErrFull)
	}
	// In memory the entry itself is kept (its payload is the NBD server's
	// buffer, no copy); only an entry that goes to disk is encoded.
	encode := func() ([]byte, error) { return wire.Append(nil, e.Frame, nil) }
	if err := s.q.PushValue(e.Seq, e.Size, e, encode, e.Done); err != nil {
		switch e.Frame.(type) {
		case *wire.MirrorData, *wire.MirrorHole, *wire.MirrorState, *wire.SumRequest:
			// A resync or mirror frame: the pass fails and is retried;
			// application writes keep flowing.
		default:
			s.overflow.Store(true)
		}
		return err
	}
	return nil
}

// Read implements repl.Backlog.
func (s *queueBacklog) Read(ctx context.Context, after uint64, max int) ([]repl.Entry, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if a := s.acked.Load(); after < a {
		return nil, fmt.Errorf("read after %d, acknowledged up to %d: %w", after, a, repl.ErrGone)
	}
	if !s.seeked || after != s.pos {
		if err := s.q.Seek(after); err != nil {
			return nil, err
		}
		s.pos, s.seeked = after, true
	}
	var out []repl.Entry
	for len(out) < max {
		r, ok, err := s.q.Next()
		if err != nil {
			return out, err
		}
		if !ok {
			break
		}
		e, err := s.entry(r)
		if err != nil {
			return out, err
		}
		out = append(out, e)
	}
	if len(out) == 0 {
		r, err := s.q.Wait(ctx)
		if err != nil {
			return nil, err
		}
		e, err := s.entry(r)
		if err != nil {
			return nil, err
		}
		out = append(out, e)
	}
	s.pos = out[len(out)-1].Seq
	return out, nil
}

func (s *queueBacklog) entry(r queue.Record) (repl.Entry, error) {
	if e, ok := r.Value.(repl.Entry); ok {
		e.Done = nil // the queue calls it
		return e, nil
	}
	f, err := wire.Decode(r.Data)
	if err != nil {
		return repl.Entry{}, fmt.Errorf("queued frame %d: %w", r.Seq, err)
	}
	sf, ok := f.(wire.Sequenced)
	if !ok {
		return repl.Entry{}, fmt.Errorf("queued frame %d: %v is not sequenced", r.Seq, f.Type())
	}
	return repl.Entry{Seq: r.Seq, Frame: sf, Size: int64(len(r.Data))}, nil
}

// Release implements repl.Backlog.
func (s *queueBacklog) Release(seq uint64) {
	s.relMu.Lock()
	defer s.relMu.Unlock()
	if s.early > 0 && s.durable != nil {
		if d := s.durable(); s.early > d {
			seq = min(seq, d)
		}
	}
	for {
		a := s.acked.Load()
		if seq <= a || s.acked.CompareAndSwap(a, seq) {
			break
		}
	}
	s.q.Ack(seq)
}

// stand records that every record up to d is durable in the queue: from
// now on Release keeps them until the target holds them durably, so they
// cover their changes. It returns the sequence the queue had released up
// to: the changes of records after it (up to d) may leave the activity
// log; the ones before stay covered there until the target's durable ack.
func (s *queueBacklog) stand(d uint64) (after uint64) {
	s.relMu.Lock()
	defer s.relMu.Unlock()
	s.early = max(s.early, d)
	return s.acked.Load()
}

// catchUp releases up to the applied sequence a (clamped as Release does)
// when records are kept for the target's durable point.
func (s *queueBacklog) catchUp(a uint64) {
	s.relMu.Lock()
	keep := s.early > 0
	s.relMu.Unlock()
	if keep {
		s.Release(a)
	}
}

// waitsFor reports whether records are kept until the target's durable
// point, which is at d.
func (s *queueBacklog) waitsFor(d uint64) bool {
	s.relMu.Lock()
	defer s.relMu.Unlock()
	return s.early > d
}

// keptAbove returns the highest sequence kept for the target's durable
// point when it is above d (0: none).
func (s *queueBacklog) keptAbove(d uint64) uint64 {
	s.relMu.Lock()
	defer s.relMu.Unlock()
	if s.early > d {
		return s.early
	}
	return 0
}

// records calls fn for every queued frame with after < seq <= upTo, in
// order (the sender re-seeks afterwards).
func (s *queueBacklog) records(after, upTo uint64, fn func(seq uint64, f wire.Frame, err error)) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.seeked = false
	if err := s.q.Seek(after); err != nil {
		return err
	}
	for {
		r, ok, err := s.q.Next()
		if err != nil {
			return err
		}
		if !ok || r.Seq > upTo {
			return nil
		}
		f, err := recordFrame(r)
		fn(r.Seq, f, err)
	}
}

// unkeep stops keeping records for the target's durable point (their
// changes are in the bitmap now), unless more were kept meanwhile.
func (s *queueBacklog) unkeep(early uint64) bool {
	s.relMu.Lock()
	defer s.relMu.Unlock()
	if s.early != early {
		return false
	}
	s.early = 0
	return true
}

// recordFrame is the frame of a queued record: the entry itself for one
// held in memory, else decoded.
func recordFrame(r queue.Record) (wire.Frame, error) {
	if e, ok := r.Value.(repl.Entry); ok {
		return e.Frame, nil
	}
	return wire.Decode(r.Data)
}

// Len implements repl.Backlog.
func (s *queueBacklog) Len() (int64, int) { return s.q.MemBytes() + s.q.DiskBytes(), s.q.Len() }
