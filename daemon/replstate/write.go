package replstate

import (
	"context"
	"errors"

	"github.com/doppelha/doppel/blockdev"
	"github.com/doppelha/doppel/daemon/queue"
	"github.com/doppelha/doppel/daemon/repl"
	"github.com/doppelha/doppel/daemon/repl/wire"
)

// durableTracker forwards the engine's tracker calls to the bitmap
// tracker, releasing extents only once the target made a change durable
// (a target killed before its fsync keeps only what it synced).
type durableTracker Source

func (t *durableTracker) Mark(off, n int64) error { return t.trk.Mark(off, n) }

func (t *durableTracker) Sequenced(seq uint64, off, n int64) {
	t.trk.Sequenced(seq, off, n)
}

func (t *durableTracker) Acked(seq uint64) {
	if cur := t.cur.Load(); cur != nil {
		_, d := cur.Progress()
		seq = min(seq, d)
	}
	t.trk.Acked(seq)
}

// Apply implements blockdev.Mutator.
func (s *Source) Apply(ctx context.Context, m *blockdev.Mutation) error {
	s.swap.RLock()
	defer s.swap.RUnlock()
	cur := s.cur.Load()
	if !cur.Connected() && m.Op != blockdev.OpFlush {
		if err := s.bumpGeneration(); err != nil {
			return err
		}
	}
	actx := ctx
	if s.cfg.Mode == wire.ModeSync {
		s.tr.mu.Lock()
		tctx := s.tr.ctx
		s.tr.mu.Unlock()
		if !s.running.Load() {
			tctx = stopped // nobody ships: do not wait for the target
		}
		c, cancel := context.WithCancel(ctx)
		stop := context.AfterFunc(tctx, cancel)
		defer stop()
		defer cancel()
		actx = c
	}
	err := cur.Apply(actx, m)
	if err == nil {
		if s.cfg.Mode == wire.ModeSync || s.cfg.Authority == nil {
			return nil // sync: the target acknowledged it
		}
		return s.cfg.Authority.AckLocal(ctx)
	}
	if ctx.Err() != nil {
		return err
	}
	// The change is applied locally and held by the queue or the bitmap:
	// the target gets it later.
	if errors.Is(err, queue.ErrFull) || errors.Is(err, repl.ErrClosed) || errors.Is(err, context.Canceled) ||
		errors.Is(err, errRestream) || errors.Is(err, ErrRefused) {
		if err := s.bumpGeneration(); err != nil {
			return err
		}
		if m.Op == blockdev.OpFlush || m.FUA {
			if err := s.cfg.Backend.Sync(); err != nil {
				return err
			}
		}
		if s.cfg.Authority != nil {
			// The target is in sync again only once it acknowledged
			// this write too.
			for seq := cur.LastSeq(); ; {
				old := s.tr.resumeSeq.Load()
				if seq <= old || s.tr.resumeSeq.CompareAndSwap(old, seq) {
					break
				}
			}
			return s.cfg.Authority.AckLocal(ctx)
		}
		return nil
	}
	return err
}

// stopped is a cancelled context: sync writes of a source that does not
// run are tracked without waiting.
var stopped = func() context.Context {
	c, cancel := context.WithCancel(context.Background())
	cancel()
	return c
}()
