package replstate

import (
	"context"
	"errors"
	"time"

	"github.com/doppelha/doppel/daemon/queue"
	"github.com/doppelha/doppel/daemon/repl"
)

// syncer runs the full mirror or the bitmap resyncs while connected.
func (s *Source) syncer(ctx context.Context, cur *repl.Stream) {
	t := time.NewTicker(50 * time.Millisecond)
	defer t.Stop()
	var lastNotify time.Time
	for {
		select {
		case <-ctx.Done():
			return
		case <-s.hs.connected:
		case <-t.C:
		}
		if !cur.Connected() {
			continue
		}
		if q := s.q.Load(); q.overflow.Load() {
			if q.q.Len() > 0 {
				continue // let the queue drain first: the target stays a prefix
			}
			q.overflow.Store(false)
			s.log.Info("queue drained after an overflow: resyncing the bitmap")
		}
		if s.rsy.needFull.Load() {
			s.log.Info("full mirror to a new target", "kind", s.cfg.Mirror)
			s.rsy.active.Store(true)
			// The mirror sends everything as it is from now on; changes
			// dropped meanwhile set their bits again. (MirrorNone: the
			// operator vouches the copies are equal; the bitmap stays.)
			if s.cfg.Mirror != repl.MirrorNone {
				s.bm.ClearAll()
				s.bm.Flush()
			}
			res, err := cur.Mirror(ctx, s.cfg.Mirror)
			s.rsy.active.Store(false)
			if err != nil {
				if ctx.Err() == nil {
					s.log.Warn("mirror interrupted", "err", err)
				}
				continue
			}
			s.rsy.sent.Add(res.Sent)
			s.rsy.needFull.Store(false)
			if s.bm.DirtyChunks() == 0 {
				s.notify(ctx)
			}
			continue
		}
		if s.bm.DirtyChunks() == 0 {
			// A pass that ended while changes were missing left the target
			// inconsistent: nothing is missing now.
			if err := cur.EndResync(ctx); err != nil && ctx.Err() == nil {
				s.log.Warn("end of resync", "err", err)
			}
			// A write accepted while this session's state handshake ran
			// (before the engine was connected) started a generation the
			// target was not told of; its data streams in order, nothing
			// is dirty, so no resync will tell it: do as a finished resync
			// does, at most once a second. Without this the source stays
			// "not synced" on a healthy link until the next reconnect.
			if !s.hs.synced.Load() && time.Since(lastNotify) >= time.Second {
				lastNotify = time.Now()
				s.log.Info("the generation moved during the state handshake: telling the target")
				s.notify(ctx)
			}
			continue
		}
		if err := s.resyncPass(ctx, cur); err != nil {
			if ctx.Err() == nil {
				s.log.Warn("resync interrupted (it resumes where it stopped)", "err", err)
			}
			continue
		}
		if s.bm.DirtyChunks() == 0 {
			s.notify(ctx)
		}
	}
}

// resyncPass sends every dirty chunk in disk order, in batches; a batch's
// chunks are hot in the activity log (so a crash resends them) and clean
// in the bitmap once the target holds them durably.
func (s *Source) resyncPass(ctx context.Context, cur *repl.Stream) error {
	total := s.bm.DirtyBytes()
	s.rsy.total.Store(total)
	s.rsy.scheduled.Add(total)
	s.rsy.done.Store(0)
	s.rsy.active.Store(true)
	defer s.rsy.active.Store(false)
	s.rsy.passes.Add(1)
	start := time.Now()
	var sent int64
	// A batch's ranges are hot together: it spans at most half the
	// activity log's slots, so marking it never waits on itself.
	slots := s.al.Slots()
	span := max(1, int64(slots)/2-1) * s.al.ExtentSize()
	// A batch fits in a quarter of the queue (resync frames must not
	// overflow it) and waits for half of it to be free.
	qcap := s.queueCap()
	maxBatch := max(s.cfg.ChunkSize, min(int64(resyncBatch), qcap/4/s.cfg.ChunkSize*s.cfg.ChunkSize))
	for off := int64(0); off < s.size; {
		var batch []repl.Range
		var n int64
		end := off
		first := int64(-1)
		for o, l := range s.bm.Runs(off, min(s.al.ExtentSize(), maxBatch)) {
			if first < 0 {
				first = o
			}
			if o+l-first > span && len(batch) > 0 {
				break
			}
			batch = append(batch, repl.Range{Offset: o, Length: l})
			n += l
			end = o + l
			if n >= maxBatch || len(batch) >= 64 {
				break
			}
		}
		if len(batch) == 0 {
			break
		}
		if err := s.waitQueueRoom(ctx, cur, qcap/2); err != nil {
			return err
		}
		marked := 0
		var err error
		for _, r := range batch {
			if err = s.trk.Mark(r.Offset, r.Length); err != nil {
				break
			}
			marked++
		}
		if err == nil {
			for _, r := range batch {
				s.bm.Clear(r.Offset, r.Length)
			}
			if err = s.rsy.lim.Wait(ctx, int(n)); err == nil {
				var res repl.MirrorResult
				res, err = cur.Resync(ctx, batch)
				sent += res.Sent
				s.rsy.sent.Add(res.Sent)
			}
		}
		if err != nil {
			for _, r := range batch[:marked] {
				s.bm.Set(r.Offset, r.Length)
			}
		}
		ferr := s.bm.Flush()
		for _, r := range batch[:marked] {
			if s.al.Fits(r.Offset, r.Length) {
				s.al.End(r.Offset, r.Length)
			}
		}
		if err != nil {
			return err
		}
		if ferr != nil {
			return ferr
		}
		// Idle extents are on the target or in the bitmap: cold again, so
		// a crash resends only what is in flight.
		if err := s.al.Clean(); err != nil {
			return err
		}
		s.rsy.done.Add(n)
		off = end
	}
	s.log.Info("resync pass done", "dirty_bytes", total, "sent", sent, "took", time.Since(start).Round(time.Millisecond))
	return nil
}

func (s *Source) queueCap() int64 {
	m, d := s.cfg.MemQueue, s.cfg.DiskQueue
	if m <= 0 {
		m = queue.DefaultMemLimit
	}
	if d == 0 {
		d = queue.DefaultDiskLimit
	}
	return m + max(d, 0)
}

// waitQueueRoom waits until the queue holds at most n bytes.
func (s *Source) waitQueueRoom(ctx context.Context, cur *repl.Stream, n int64) error {
	for {
		q := s.q.Load()
		if b, _ := q.Len(); b <= n {
			return nil
		}
		if !cur.Connected() {
			return errors.New("target disconnected")
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(10 * time.Millisecond):
		}
	}
}
