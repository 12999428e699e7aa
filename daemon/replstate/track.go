package replstate

import (
	"context"
	"errors"
	"time"

	"github.com/doppelha/doppel/daemon/queue"
	"github.com/doppelha/doppel/daemon/repl"
	"github.com/doppelha/doppel/daemon/repl/wire"
)

// watch enters and leaves tracking mode (every 50 ms) and keeps house
// meanwhile: it lets the activity log forget what the disk queue holds
// durably, sends durability barriers so kept records drain, cools idle
// extents, and tells the authority when the target is in sync again.
func (s *Source) watch(ctx context.Context) {
	t := time.NewTicker(50 * time.Millisecond)
	defer t.Stop()
	var lastClean, lastRelease, lastBarrier, lastLogBarrier int64
	slots := s.al.Slots()
	inSync := false // as last told to the authority
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		cur := s.cur.Load()
		up := cur.Connected()
		now := time.Now().UnixNano()
		if now-lastRelease > int64(200*time.Millisecond) {
			lastRelease = now
			if err := s.releaseQueued(); err != nil && !errors.Is(err, queue.ErrClosed) {
				s.log.Warn("disk queue sync", "err", err)
			}
		}
		// Records kept until durable on the target are released as the
		// target's durable point moves (acks may have stopped).
		a, d := cur.Progress()
		q := s.q.Load()
		if a > 0 {
			q.catchUp(a)
		}
		// The target's durable point moves only at a flush (or FUA): while
		// records wait for it, send a barrier at most once a second, so
		// the queue drains without the application's flushes.
		if q.waitsFor(d) {
			if s.pressured(q) {
				if err := s.unkeepQueued(d); err != nil && !errors.Is(err, queue.ErrClosed) {
					s.log.Warn("queue under pressure", "err", err)
				}
			} else if up && now-lastBarrier > int64(time.Second) {
				lastBarrier = now
				go s.barrier(ctx)
			}
		}
		// Extents stay hot until the target made their changes durable;
		// without the application's flushes the activity log would fill
		// and spill them into the bitmap (a resync of whole extents the
		// target already holds). Past half full, a barrier makes them
		// durable instead, at most every 100 ms.
		if up && s.trk.Pending() > 0 && s.al.HotExtents() >= slots/2 && now-lastLogBarrier > int64(100*time.Millisecond) {
			lastLogBarrier = now
			go s.barrier(ctx)
		}
		if up && now-lastClean > int64(2*time.Second) {
			// Idle extents are on the target (durably) or in the bitmap:
			// cool them, so a crash resends only recent writes.
			lastClean = now
			if s.trk.Pending() == 0 && s.al.HotExtents() > 0 {
				if err := s.al.Clean(); err != nil {
					s.log.Warn("activity log", "err", err)
				}
			}
		}
		switch {
		case up:
			s.tr.downAt.Store(0)
			if s.tr.on.Swap(false) {
				s.tr.resumeSeq.Store(cur.LastSeq())
				s.tr.mu.Lock()
				s.tr.ctx, s.tr.end = context.WithCancel(context.Background())
				s.tr.mu.Unlock()
				s.log.Info("target back: leaving tracking mode")
			}
		case s.tr.downAt.Load() == 0:
			s.tr.downAt.Store(now)
		case !s.tr.on.Load() && time.Duration(now-s.tr.downAt.Load()) >= s.trackAfter():
			s.tr.on.Store(true)
			s.tr.mu.Lock()
			s.tr.end()
			s.tr.mu.Unlock()
			s.log.Warn("target unreachable: continuing in tracking mode (changes recorded for a resync)",
				"after", s.trackAfter())
		}
		inSync = s.authorityInSync(cur, up, inSync)
	}
}

// authorityInSync reports to the authority (sync mode) each time the
// target again holds every write this source acknowledged: connected, not
// tracking, nothing dirty, no resync or mirror to run, and everything
// written before tracking ended acknowledged (later writes wait for the
// target).
func (s *Source) authorityInSync(cur *repl.Stream, up bool, was bool) bool {
	if s.cfg.Authority == nil || s.cfg.Mode != wire.ModeSync {
		return false
	}
	now := up && s.targetHolds(cur)
	if now && !was {
		s.cfg.Authority.TargetInSync(s.targetHoldsAcked)
	}
	return now
}

// targetHolds: the target holds every write acknowledged so far on cur
// (see authorityInSync).
func (s *Source) targetHolds(cur *repl.Stream) bool {
	acked, _ := cur.Progress()
	return cur.Connected() && !s.tr.on.Load() && s.bm.DirtyChunks() == 0 && !s.rsy.active.Load() &&
		!s.rsy.needFull.Load() && acked >= s.tr.resumeSeq.Load() && s.hs.refusal.Load() == nil
}

// targetHoldsAcked is targetHolds on the current stream, for the
// authority (Authority.TargetInSync).
func (s *Source) targetHoldsAcked() bool {
	cur := s.cur.Load()
	return cur != nil && s.targetHolds(cur)
}

func (s *Source) trackAfter() time.Duration {
	if s.cfg.Mode == wire.ModeSync {
		return s.cfg.SyncTimeout
	}
	return 0
}
