package replstate

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"github.com/doppelha/doppel/blockdev"
	"github.com/doppelha/doppel/daemon/bitmap"
	"github.com/doppelha/doppel/daemon/queue"
	"github.com/doppelha/doppel/daemon/repl"
	"github.com/doppelha/doppel/daemon/repl/wire"
	"github.com/doppelha/doppel/daemon/statefile"
)

func (s *Source) queueOptions() queue.Options {
	return queue.Options{MemLimit: s.cfg.MemQueue, DiskLimit: s.cfg.DiskQueue, MaxRecord: wire.MaxData + 4096}
}

// openStream resumes the stream whose disk queue survived a restart: the
// engine continues it (same stream ID, next sequence) and replays the
// queued records after the target's applied sequence; the handshake
// restarts the stream from the bitmap if the target cannot continue it.
// A queue that cannot be resumed (empty, several, an older layout) is
// folded into the bitmap and a new stream starts.
func (s *Source) openStream() error {
	root := filepath.Join(s.cfg.Dir, QueueDir)
	ents, err := os.ReadDir(root)
	if err != nil && !os.IsNotExist(err) {
		return err
	}
	var streams []string
	other := false
	for _, e := range ents {
		if id, err := strconv.ParseUint(e.Name(), 16, 64); e.IsDir() && len(e.Name()) == 16 && err == nil && id != 0 {
			streams = append(streams, e.Name())
		} else {
			other = true
		}
	}
	if len(streams) == 1 && !other {
		id, _ := strconv.ParseUint(streams[0], 16, 64)
		qq, err := queue.Open(filepath.Join(root, streams[0]), s.queueOptions())
		if err != nil {
			return fmt.Errorf("open queue: %w", err)
		}
		first, ok, err := qq.Peek()
		if err == nil && ok {
			s.atOpen.queue = qq.DiskBytes()
			rp := &repl.ResumePoint{StreamID: id, LastSeq: qq.LastSeq(), AckedSeq: first.Seq - 1}
			s.log.Info("restart: resuming the replication stream from the disk queue", "stream", streams[0],
				"from_seq", first.Seq, "to_seq", rp.LastSeq, "records", qq.Len(), "bytes", s.atOpen.queue)
			if err := s.startStream(qq, rp); err != nil {
				return err
			}
			// Its records may be all that covers their changes: they stay
			// until the target holds them durably.
			s.q.Load().stand(rp.LastSeq)
			return nil
		}
		if err := qq.Close(); err != nil {
			return err
		}
	}
	// Nothing to resume: what the queues hold goes to the bitmap.
	if err := foldQueues(root, s.bm, s.log); err != nil {
		return err
	}
	return s.newStream()
}

// foldQueues marks in bm, durably, the ranges of every record the disk
// queues under root hold (stream directories, or segments of an older
// layout), then removes them. A side that will not resume a stream (a
// source starting a new one, a demoted source now a target) calls it: the
// records may be all that covers those changes (see releaseQueued).
func foldQueues(root string, bm *bitmap.Bitmap, log *slog.Logger) error {
	ents, err := os.ReadDir(root)
	if os.IsNotExist(err) {
		return nil
	}
	if err != nil {
		return err
	}
	var dirs []string
	oldLayout := false
	for _, e := range ents {
		if e.IsDir() {
			dirs = append(dirs, filepath.Join(root, e.Name()))
		} else {
			oldLayout = true
		}
	}
	if oldLayout {
		dirs = append(dirs, root) // segments of an older layout
	}
	for _, d := range dirs {
		qq, err := queue.Open(d, queue.Options{MaxRecord: wire.MaxData + 4096})
		if err != nil {
			return fmt.Errorf("open queue %s: %w", d, err)
		}
		if err := errors.Join(foldRecords(qq, bm, log), qq.Close()); err != nil {
			return err
		}
	}
	if err := os.RemoveAll(root); err != nil {
		return err
	}
	return statefile.SyncDir(filepath.Dir(root))
}

// newStream (re)creates the engine on a fresh stream and an empty queue.
// The caller holds swap exclusively (or nothing runs yet) and has folded
// what the old queue held into the bitmap.
func (s *Source) newStream() error {
	if s.qq != nil {
		s.qq.Close()
		s.qq = nil
	}
	root := filepath.Join(s.cfg.Dir, QueueDir)
	if err := os.RemoveAll(root); err != nil {
		return err
	}
	var b [8]byte
	if _, err := rand.Read(b[:]); err != nil {
		return err
	}
	id := binary.BigEndian.Uint64(b[:]) | 1
	qdir := filepath.Join(root, fmt.Sprintf("%016x", id))
	if err := os.MkdirAll(qdir, 0o700); err != nil {
		return err
	}
	// The old queue's removal is durable before the new stream's records.
	if err := errors.Join(statefile.SyncDir(root), statefile.SyncDir(s.cfg.Dir)); err != nil {
		return err
	}
	qq, err := queue.Open(qdir, s.queueOptions())
	if err != nil {
		return fmt.Errorf("open queue: %w", err)
	}
	return s.startStream(qq, &repl.ResumePoint{StreamID: id})
}

// startStream creates the engine on qq, continuing the stream at rp.
func (s *Source) startStream(qq *queue.Queue, rp *repl.ResumePoint) error {
	q := newQueueBacklog(qq)
	src, err := repl.NewStream(repl.StreamConfig{Backend: s.cfg.Backend, Mode: s.cfg.Mode, ChunkSize: s.cfg.ChunkSize,
		Backlog: q, Tracker: (*durableTracker)(s), Dial: s.dial, Codec: s.cfg.Codec, RateLimit: s.cfg.RateLimit, Log: s.log,
		Liveness: s.cfg.Liveness, Resume: rp,
		// A pass that ends with changes still in the bitmap (dropped from
		// the stream, or spilled) leaves the target inconsistent.
		Incomplete: func() bool { return s.bm.DirtyChunks() > 0 }})
	if err != nil {
		qq.Close()
		return err
	}
	q.durable = func() uint64 { _, d := src.Progress(); return d }
	s.qq = qq
	s.q.Store(q)
	s.retired.mu.Lock()
	if old := s.cur.Load(); old != nil {
		s.retired.sum.AddCounters(old.Stats())
	}
	s.cur.Store(src)
	s.retired.mu.Unlock()
	return nil
}

// foldRecords marks the ranges of every record qq holds in bm, durably:
// the queue is about to be dropped, and its records may be all that covers
// those changes (see releaseQueued).
func foldRecords(qq *queue.Queue, bm *bitmap.Bitmap, log *slog.Logger) error {
	qq.Rewind()
	n := 0
	for {
		r, ok, err := qq.Next()
		if err != nil {
			return fmt.Errorf("fold queue into the bitmap: %w", err)
		}
		if !ok {
			break
		}
		f, err := recordFrame(r)
		if err != nil {
			// Unreadable (it passed its checksum): resync everything.
			log.Warn("queued frame unreadable: marking the whole volume dirty", "seq", r.Seq, "err", err)
			bm.SetAll()
			break
		}
		setFrame(bm, f)
		n++
	}
	if n > 0 {
		log.Info("queued changes moved to the bitmap", "records", n)
	}
	return bm.Flush()
}

// barrier sends a flush through the stream (it syncs the local volume too).
func (s *Source) barrier(ctx context.Context) {
	s.swap.RLock()
	defer s.swap.RUnlock()
	bctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if err := s.cur.Load().Apply(bctx, &blockdev.Mutation{Op: blockdev.OpFlush}); err != nil && ctx.Err() == nil {
		s.log.Debug("durability barrier", "err", err)
	}
}

// setFrame marks the range a frame changes in bm.
func setFrame(bm *bitmap.Bitmap, f wire.Frame) {
	switch f := f.(type) {
	case *wire.Write:
		bm.Set(int64(f.Offset), int64(len(f.Data)))
	case *wire.Trim:
		bm.Set(int64(f.Offset), int64(f.Length))
	case *wire.Zeroes:
		bm.Set(int64(f.Offset), int64(f.Length))
	case *wire.MirrorData:
		bm.Set(int64(f.Offset), int64(len(f.Data)))
	case *wire.MirrorHole:
		bm.Set(int64(f.Offset), int64(f.Length))
	}
}

// pressured reports whether the queue overflowed: then no flush enters it
// (not even a barrier that does not fit: its failed push is an overflow
// too), so the target's durable point would never move and records kept
// for it would stop the queue from draining.
func (s *Source) pressured(q *queueBacklog) bool { return q.overflow.Load() }

// unkeepQueued moves the changes of the records kept for the target's
// durable point (above d) to the bitmap, durably, so that the queue
// releases them when the target applies them and drains.
func (s *Source) unkeepQueued(d uint64) error {
	s.swap.RLock()
	defer s.swap.RUnlock()
	q := s.q.Load()
	early := q.keptAbove(d)
	if early == 0 {
		return nil
	}
	var all bool
	err := q.records(d, early, func(seq uint64, f wire.Frame, err error) {
		if err != nil {
			all = true
			return
		}
		setFrame(s.bm, f)
	})
	if err != nil {
		return err
	}
	if all {
		s.bm.SetAll()
	}
	if err := s.bm.Flush(); err != nil {
		return err
	}
	if q.unkeep(early) {
		s.log.Info("queue under pressure: changes waiting for the target's durable point moved to the bitmap", "up_to_seq", early)
	}
	return nil
}

// releaseQueued lets the activity log forget the changes whose frames are
// durable in the disk queue: the queue covers them now (it keeps them until
// the target holds them durably; a restart replays them, or folds them
// into the bitmap). Without it, a restart after a long backlog would
// resync every extent the backlog touched instead of replaying it.
func (s *Source) releaseQueued() error {
	s.swap.RLock()
	defer s.swap.RUnlock()
	return s.releaseQueuedLocked()
}

// releaseQueuedLocked is releaseQueued with swap held.
func (s *Source) releaseQueuedLocked() error {
	q := s.q.Load()
	if q.q.DiskBytes() == 0 || s.pressured(q) {
		return nil
	}
	d, err := q.q.SyncTail()
	if err != nil || d == 0 {
		return err
	}
	if after := q.stand(d); after < d {
		s.trk.Covered(after, d)
	}
	return s.al.Clean()
}
