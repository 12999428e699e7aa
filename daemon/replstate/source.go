package replstate

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/doppelha/doppel/blockdev"
	"github.com/doppelha/doppel/daemon/bitmap"
	"github.com/doppelha/doppel/daemon/generation"
	"github.com/doppelha/doppel/daemon/queue"
	"github.com/doppelha/doppel/daemon/repl"
	"github.com/doppelha/doppel/daemon/repl/wire"
	"github.com/doppelha/doppel/daemon/resync"
	"github.com/doppelha/doppel/daemon/statefile"
	"github.com/doppelha/doppel/daemon/tlspin"
	"github.com/prometheus/client_golang/prometheus"
)

// Defaults.
const (
	DefaultSyncTimeout = 10 * time.Second
	resyncBatch        = 2 << 20 // bytes per resync pass (one durable step: what an interruption resends at most)
)

// Errors.
var (
	// ErrRefused: the state handshake refused replication (split brain,
	// unrelated data, no good copy, a newer peer). The message says why.
	ErrRefused = errors.New("replication refused")
	// errRestream: the stream cannot be resumed; restart it from the bitmap.
	errRestream = errors.New("replication stream cannot be resumed")
)

// SourceConfig configures a Source.
type SourceConfig struct {
	Dir       string           // state directory
	Backend   blockdev.Backend // the protected volume
	Mode      wire.Mode
	ChunkSize int64 // bitmap/resync chunk (≤ 64 KiB); 0: repl.DefaultChunkSize
	// MemQueue and DiskQueue bound the queue (0: defaults; DiskQueue < 0:
	// no disk queue).
	MemQueue, DiskQueue int64
	// Dial connects to the target (see repl.StreamConfig.Dial).
	Dial      func(ctx context.Context) (net.Conn, error)
	Codec     *wire.Codec
	RateLimit int64 // link bytes/s (0: unlimited)
	// ResyncRate caps resync traffic in bytes/s (0: unlimited); it never
	// throttles below resync.DefaultFloor.
	ResyncRate int64
	// SyncTimeout: sync mode, how long writes wait for an absent target
	// before the source continues in tracking mode (0: DefaultSyncTimeout).
	SyncTimeout time.Duration
	// Discard "target" resolves a split brain against the target.
	Discard string
	// Mirror is the kind of the full copy a fresh target gets.
	Mirror repl.MirrorKind
	// Force promotes a side whose data is inconsistent.
	Force bool
	// Log receives structured logs; nil discards them.
	Log *slog.Logger
	// Liveness is the sessions' keepalive, timeout and traffic report
	// (repl.Liveness).
	Liveness repl.Liveness
	// LogOptions sizes the activity log.
	LogOptions bitmap.LogOptions
	// Binding ties the state to a job incarnation and a volume: state of
	// another is set aside and this side starts without it.
	Binding Binding
	// Epoch returns this side's failover epoch, sent in every state hello
	// (nil: none). A target that knows a newer one refuses replication and
	// names it: Superseded is then called with it, and Run returns
	// ErrSuperseded.
	Epoch      func() uint64
	Superseded func(epoch uint64)
	// Authority, when set, decides whether a write the target has not
	// acknowledged may be acknowledged (docs/safety.md): every write in
	// async mode, and in sync mode the writes tracked without the target.
	// Nil: always (no arbiter).
	Authority Authority
}

// Authority is the arbiter's say on acknowledging writes the target has
// not acknowledged (docs/safety.md, "Who may acknowledge a write").
type Authority interface {
	// AckLocal returns nil once such a write may be acknowledged: the
	// source holds its lease and, in sync mode, the arbiter records the
	// target as out of sync (AckLocal records it first, under the lease).
	// It waits while that is not possible, and fails with an error
	// wrapping syscall.EIO when this side was superseded or after the
	// suspend bound. The write is on the local disk either way: failing
	// only means it was never acknowledged.
	AckLocal(ctx context.Context) error
	// TargetInSync reports that the target holds every acknowledged write
	// again (sync mode: the stream is connected and the resync is done).
	TargetInSync()
}

// ErrSuperseded: the target knows a newer epoch than this source's.
var ErrSuperseded = errors.New("superseded by a newer epoch")

// Source is the replicating side with persistent state: a blockdev.Mutator.
type Source struct {
	cfg  SourceConfig
	log  *slog.Logger
	size int64

	bm  *bitmap.Bitmap
	al  *bitmap.ActivityLog
	trk *bitmap.Tracker
	lim *resync.Limiter

	genMu sync.Mutex
	gen   generation.State
	// shared is the generation the peer may hold: the last one sent to it
	// in a state hello (it may have adopted it, whatever became of the
	// connection), or the persisted current one when its state said so; 0
	// when unknown to the peer. A write the peer will not see in order must
	// be made under a generation other than shared (bumpGeneration).
	shared  uint64
	peerGen atomic.Uint64
	// hook, when set (tests), is called at the named points of the state
	// handshake: "snapshot" (the hello's generation was taken), "committed"
	// (the target accepted, the engine is not connected yet).
	hook func(point string)

	swap sync.RWMutex // held shared by Apply, exclusively to replace cur
	cur  atomic.Pointer[repl.Stream]
	q    atomic.Pointer[queueBacklog]
	qq   *queue.Queue

	trackMu  sync.Mutex
	trackCtx context.Context // cancelled while in tracking mode (sync writes stop waiting)
	trackEnd context.CancelFunc
	tracking atomic.Bool
	// resumeSeq: the target is in sync (for the authority) only once it
	// acknowledged up to here (the last write acknowledged without it).
	resumeSeq atomic.Uint64
	running   atomic.Bool  // Run is active: without it, every write is tracked
	downAt    atomic.Int64 // unix nanos the link went down (0: up)

	connected chan struct{} // a handshake committed (buffered 1)
	needFull  atomic.Bool
	refusal   atomic.Pointer[string]
	decision  atomic.Pointer[string]

	resyncTotal, resyncDone, resyncSent atomic.Int64
	resyncScheduled                     atomic.Int64
	synced                              atomic.Bool // the target holds this generation, consistent
	resyncActive                        atomic.Bool
	resyncPasses                        atomic.Int64
	hotAtOpen                           int
	dirtyAtOpen                         int64
	queueAtOpen                         int64 // disk queue bytes resumed at open
	setAside                            string
}

// OpenSource opens the state under cfg.Dir (creating it) for the volume.
func OpenSource(cfg SourceConfig) (*Source, error) {
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	if cfg.ChunkSize == 0 {
		cfg.ChunkSize = repl.DefaultChunkSize
	}
	if cfg.SyncTimeout == 0 {
		cfg.SyncTimeout = DefaultSyncTimeout
	}
	if cfg.Discard != "" && cfg.Discard != "target" {
		return nil, fmt.Errorf("discard %q: the source's data is overwritten only when it runs as the target: "+
			"restart this side as the target with --discard-on target, and the peer as the source", cfg.Discard)
	}
	s := &Source{cfg: cfg, log: cfg.Log, size: cfg.Backend.Size(), connected: make(chan struct{}, 1),
		lim: resync.NewLimiter(cfg.ResyncRate, resync.DefaultFloor)}
	var err error
	if s.setAside, err = bind(cfg.Dir, cfg.Binding, s.log); err != nil {
		return nil, err
	}
	if s.bm, err = openBitmap(cfg.Dir, s.size, cfg.ChunkSize); err != nil {
		return nil, err
	}
	if s.al, err = bitmap.OpenLog(filepath.Join(cfg.Dir, LogFile), s.bm, cfg.LogOptions); err != nil {
		s.bm.Close()
		return nil, fmt.Errorf("open activity log: %w", err)
	}
	s.hotAtOpen = len(s.al.Hot())
	s.trk = bitmap.NewTracker(s.bm, s.al)
	// The durable queue of the last stream is resumed (or folded into the
	// bitmap when it cannot be).
	if err := s.openStream(); err != nil {
		s.closeFiles()
		return nil, err
	}
	s.dirtyAtOpen = s.bm.DirtyBytes()
	st, ok, err := loadGen(cfg.Dir)
	if err != nil {
		s.closeFiles()
		return nil, err
	}
	prev := st.Current
	switch {
	case !ok || st.Current == 0:
		st = generation.NewSource()
		s.log.Info("new replication state: this side holds the reference copy", "generation", fmt.Sprintf("%016x", st.Current))
	case st.Side == generation.SideTarget:
		if err := st.Promote(generation.NewID(), cfg.Force); err != nil {
			s.closeFiles()
			return nil, fmt.Errorf("promote %s to source: %w (force to use it anyway)", cfg.Dir, err)
		}
		s.log.Warn("promoted: this side was a target, it now writes in a new generation", "generation", fmt.Sprintf("%016x", st.Current))
	}
	_, uerr := os.Stat(filepath.Join(cfg.Dir, UnsharedFile))
	unshared := uerr == nil
	if ok && !unshared && (s.hotAtOpen > 0 || s.dirtyAtOpen > 0 || s.queueAtOpen > 0) {
		// Changes the target may lack: a new generation, so that a
		// promotion of the target meanwhile is seen as split brain.
		st.NewGeneration(generation.NewID())
	}
	if err := saveGen(cfg.Dir, st); err != nil {
		s.closeFiles()
		return nil, err
	}
	if st.Current != prev && prev != 0 {
		unshared = true
		if err := s.markUnshared(true); err != nil {
			s.closeFiles()
			return nil, err
		}
	}
	s.gen = st
	if !unshared {
		s.shared = st.Current
	}
	s.trackCtx, s.trackEnd = context.WithCancel(context.Background())
	if s.hotAtOpen > 0 || s.dirtyAtOpen > 0 || s.queueAtOpen > 0 {
		s.log.Info("restart: changes the target may lack", "dirty_bytes", s.dirtyAtOpen, "hot_extents", s.hotAtOpen,
			"queued_bytes", s.queueAtOpen)
	}
	return s, nil
}

func (s *Source) closeFiles() error {
	var err error
	if s.qq != nil {
		err = s.qq.Close()
	}
	return errors.Join(err, s.al.Close(), s.bm.Close())
}

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
			s.queueAtOpen = qq.DiskBytes()
			rp := &repl.ResumePoint{StreamID: id, LastSeq: qq.LastSeq(), AckedSeq: first.Seq - 1}
			s.log.Info("restart: resuming the replication stream from the disk queue", "stream", streams[0],
				"from_seq", first.Seq, "to_seq", rp.LastSeq, "records", qq.Len(), "bytes", s.queueAtOpen)
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
	s.cur.Store(src)
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
		f, err := wire.Decode(r.Data)
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

// engine returns the current replication engine (it changes when the
// stream restarts).
func (s *Source) engine() *repl.Stream { return s.cur.Load() }

// Connected reports whether a replication session with the target is
// established.
func (s *Source) Connected() bool { return s.engine().Connected() }

// WaitAcked waits until the target acknowledged every write sequenced so
// far (or ctx ends, or the stream fails).
func (s *Source) WaitAcked(ctx context.Context) error { return s.engine().WaitAcked(ctx) }

// Drain returns once the target holds every acknowledged write: each
// sequenced write acknowledged, connected, synced, not tracking, no
// resync running, nothing dirty, nothing queued. The caller holds new
// writes back meanwhile. It fails with ctx's error, saying what was left.
func (s *Source) Drain(ctx context.Context) error {
	t := time.NewTicker(20 * time.Millisecond)
	defer t.Stop()
	for {
		if err := s.WaitAcked(ctx); err != nil {
			return err
		}
		rs := s.Status()
		if rs.Connected && rs.Synced && !rs.Tracking && !rs.ResyncActive && rs.DirtyBytes == 0 && rs.QueueMemBytes+rs.QueueDiskBytes == 0 {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%w (target %s, %d bytes dirty, queue %d bytes)", ctx.Err(), rs.State, rs.DirtyBytes, rs.QueueMemBytes+rs.QueueDiskBytes)
		case <-t.C:
		}
	}
}

// Verify compares the volume with the target's, chunk by chunk, in the
// stream (exact while the application writes); it repairs nothing.
func (s *Source) Verify(ctx context.Context) (repl.MirrorResult, error) {
	return s.engine().Verify(ctx, false)
}

// Mark sends a flush through the stream (durable here and, in sync mode,
// applied on the target when it returns) and returns the stream and the
// last sequence issued: the target holds the image of this moment once
// it applied that sequence.
func (s *Source) Mark(ctx context.Context) (stream, seq uint64, err error) {
	if err := s.Apply(ctx, &blockdev.Mutation{Op: blockdev.OpFlush}); err != nil {
		return 0, 0, err
	}
	eng := s.engine()
	return eng.StreamID(), eng.LastSeq(), nil
}

// FailWaiters closes the engine only: writes waiting for the target stop
// waiting (their changes are tracked), and the state files stay open for
// the final Close.
func (s *Source) FailWaiters() { s.engine().Close() }

// EngineCollector returns a Prometheus collector of the current engine's
// metrics (the engine is replaced when the stream restarts).
func (s *Source) EngineCollector() prometheus.Collector { return engineCollector{s} }

type engineCollector struct{ s *Source }

func (e engineCollector) Describe(ch chan<- *prometheus.Desc) { prometheus.DescribeByCollect(e, ch) }
func (e engineCollector) Collect(ch chan<- prometheus.Metric) { e.s.engine().Collector().Collect(ch) }

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
		s.trackMu.Lock()
		tctx := s.trackCtx
		s.trackMu.Unlock()
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
				old := s.resumeSeq.Load()
				if seq <= old || s.resumeSeq.CompareAndSwap(old, seq) {
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

// bumpGeneration is called before a write the target may not see in
// order (not connected, tracking, closing with dirty chunks): when the peer
// may hold the current generation, it starts a new one (DRBD's new current
// UUID), so a promotion of the target meanwhile is detected as split brain
// and the write is never silently overwritten. When the current generation
// is already unknown to the peer, the write joins it (one new generation
// per outage, so the peer's stays in the bounded history).
func (s *Source) bumpGeneration() error {
	s.genMu.Lock()
	defer s.genMu.Unlock()
	if s.gen.Current != s.shared {
		return nil
	}
	st := s.gen.Clone()
	st.NewGeneration(generation.NewID())
	// The generation first, then the marker: a crash between them leaves
	// a generation taken for shared (another one at the next restart),
	// never a shared one taken for unshared.
	if err := saveGen(s.cfg.Dir, st); err != nil {
		return err
	}
	if err := s.markUnshared(true); err != nil {
		return err
	}
	s.gen = st
	s.synced.Store(false)
	s.log.Info("writing without the target: new generation", "generation", fmt.Sprintf("%016x", st.Current))
	return nil
}

// markUnshared records durably whether the current generation is unknown
// to the peer (so a restart during a long outage does not start yet another
// one and push the peer's generation out of the bounded history).
func (s *Source) markUnshared(on bool) error {
	p := filepath.Join(s.cfg.Dir, UnsharedFile)
	if !on {
		if err := os.Remove(p); err != nil {
			if os.IsNotExist(err) {
				return nil
			}
			return err
		}
		return statefile.SyncDir(s.cfg.Dir)
	}
	return statefile.Write(p, nil, 0o600)
}

// share records that the peer may hold local, the current generation (it
// is about to be sent in a state hello), durably before it is sent. The
// caller holds genMu.
func (s *Source) share(local generation.State) error {
	if s.shared == local.Current {
		return nil
	}
	if err := s.markUnshared(false); err != nil {
		return err
	}
	s.shared = local.Current
	return nil
}

// Run replicates until ctx is done: connect, decide, resync, stream;
// restart the stream from the bitmap when it cannot be resumed. It
// returns an error wrapping ErrRefused when the handshake refuses.
func (s *Source) Run(ctx context.Context) error {
	if s.running.Swap(true) {
		return errors.New("replication source: Run is already active")
	}
	s.trackMu.Lock()
	if s.trackCtx.Err() != nil && !s.tracking.Load() {
		// Ended by the previous Run's exit.
		s.trackCtx, s.trackEnd = context.WithCancel(context.Background())
	}
	s.trackMu.Unlock()
	defer func() {
		s.running.Store(false)
		// Nobody ships any more: sync writes waiting for the target stop
		// waiting (their changes are tracked for the next start), as the
		// writes that arrive from now on do. Close would otherwise wait
		// for them, and they for an acknowledgement nobody sends.
		s.trackMu.Lock()
		s.trackEnd()
		s.trackMu.Unlock()
	}()
	go s.watch(ctx)
	for {
		cur := s.cur.Load()
		rctx, stop := context.WithCancel(ctx)
		errc := make(chan error, 1)
		go func() { errc <- cur.Run(rctx) }()
		wdone := make(chan struct{})
		go func() { defer close(wdone); s.syncer(rctx, cur) }()
		var err error
		select {
		case err = <-errc:
		case <-ctx.Done():
			err = <-errc
		}
		stop()
		<-wdone
		if ctx.Err() != nil {
			return nil
		}
		if errors.Is(err, errRestream) {
			s.log.Warn("replication stream cannot be resumed: restarting it from the dirty bitmap")
			if err := s.restream(cur); err != nil {
				return err
			}
			continue
		}
		if err == nil {
			err = errors.New("replication stopped")
		}
		return err
	}
}

// restream replaces the engine with a new stream; every change the old
// one did not deliver durably is moved to the bitmap.
func (s *Source) restream(old *repl.Stream) error {
	old.Close() // sync waiters return; their changes are tracked
	s.swap.Lock()
	defer s.swap.Unlock()
	s.trk.Disconnected()
	if q := s.q.Load(); q != nil && q.overflow.Load() {
		s.log.Info("queue overflow: changes since are in the bitmap")
	}
	if err := foldRecords(s.qq, s.bm, s.log); err != nil {
		return err
	}
	return s.newStream()
}

// watch enters and leaves tracking mode.
func (s *Source) watch(ctx context.Context) {
	t := time.NewTicker(50 * time.Millisecond)
	defer t.Stop()
	var lastClean, lastRelease, lastBarrier, lastLogBarrier int64
	slots := s.cfg.LogOptions.Slots
	if slots == 0 {
		slots = 64
	}
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
			s.downAt.Store(0)
			if s.tracking.Swap(false) {
				s.resumeSeq.Store(cur.LastSeq())
				s.trackMu.Lock()
				s.trackCtx, s.trackEnd = context.WithCancel(context.Background())
				s.trackMu.Unlock()
				s.log.Info("target back: leaving tracking mode")
			}
		case s.downAt.Load() == 0:
			s.downAt.Store(now)
		case !s.tracking.Load() && time.Duration(now-s.downAt.Load()) >= s.trackAfter():
			s.tracking.Store(true)
			s.trackMu.Lock()
			s.trackEnd()
			s.trackMu.Unlock()
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
	acked, _ := cur.Progress()
	now := up && cur.Connected() && !s.tracking.Load() && s.bm.DirtyChunks() == 0 && !s.resyncActive.Load() &&
		!s.needFull.Load() && acked >= s.resumeSeq.Load() && s.refusal.Load() == nil
	if now && !was {
		s.cfg.Authority.TargetInSync()
	}
	return now
}

func (s *Source) trackAfter() time.Duration {
	if s.cfg.Mode == wire.ModeSync {
		return s.cfg.SyncTimeout
	}
	return 0
}

// dial connects and runs the state handshake (repl.Stream calls it for
// every connection).
func (s *Source) dial(ctx context.Context) (net.Conn, error) {
	conn, err := s.cfg.Dial(ctx)
	if err != nil {
		return nil, err
	}
	dec, err := s.handshake(ctx, conn, false)
	if err != nil {
		conn.Close()
		return nil, err
	}
	_ = dec
	select {
	case s.connected <- struct{}{}:
	default:
	}
	return conn, nil
}

// handshake runs the state handshake on conn. notify only tells the target
// that a resync completed.
func (s *Source) handshake(ctx context.Context, conn net.Conn, notify bool) (generation.Decision, error) {
	var dec generation.Decision
	conn.SetDeadline(time.Now().Add(30 * time.Second))
	defer conn.SetDeadline(time.Time{})
	if tc, ok := conn.(*tls.Conn); ok {
		if err := tc.HandshakeContext(ctx); err != nil {
			if errors.Is(err, tlspin.ErrNotPinned) {
				return dec, &repl.FatalError{Err: err}
			}
			return dec, fmt.Errorf("TLS handshake: %w", err)
		}
	}
	cur := s.cur.Load()
	applied, _ := cur.Progress()
	s.genMu.Lock()
	local := s.gen.Clone()
	err := s.share(local)
	s.genMu.Unlock()
	if err != nil {
		return dec, err
	}
	s.at("snapshot")
	if _, err := conn.Write(metaMagic[:]); err != nil {
		return dec, err
	}
	h := hello{VolumeSize: s.size, ChunkSize: s.cfg.ChunkSize, Gen: encodeGen(local), StreamID: cur.StreamID(),
		Acked: applied, Discard: s.cfg.Discard, Notify: notify, Job: s.cfg.Binding.Owner.Job, Epoch: s.epoch()}
	if err := writeMsg(conn, h); err != nil {
		return dec, fmt.Errorf("send state hello: %w", err)
	}
	var rp reply
	if err := readMsg(conn, &rp); err != nil {
		if errors.Is(err, ErrMalformed) {
			return dec, &repl.FatalError{Err: fmt.Errorf("target: %w", err)}
		}
		return dec, fmt.Errorf("read state reply: %w", err)
	}
	if mine := s.epoch(); mine > 0 && rp.Epoch > mine {
		// The target knows a newer epoch: another side was promoted.
		if s.cfg.Superseded != nil {
			s.cfg.Superseded(rp.Epoch)
		}
		return dec, s.refuse(fmt.Errorf("%w: %w: the target knows epoch %d, this source is at %d", ErrRefused, ErrSuperseded, rp.Epoch, mine))
	}
	if rp.Error != "" {
		return dec, s.refuse(fmt.Errorf("%w by the target: %s", ErrRefused, rp.Error))
	}
	if notify {
		s.genMu.Lock()
		s.synced.Store(s.gen.Current == local.Current)
		s.genMu.Unlock()
		return dec, nil
	}
	peer, err := decodeGen(rp.Gen)
	if err != nil {
		return dec, &repl.FatalError{Err: err}
	}
	s.peerGen.Store(peer.Current)
	dec = generation.Decide(local, peer)
	discard := s.cfg.Discard == "target" || rp.Discard == "target"
	c := commit{Outcome: dec.Outcome.String(), Reason: dec.Reason, Gen: encodeGen(local)}
	switch dec.Outcome {
	case generation.InSync, generation.ResyncToPeer:
	case generation.SplitBrain:
		if !discard {
			c.Refused = true
		}
		c.Discard = discard
	case generation.ResyncFromPeer:
		c.Refused = true
		dec.Reason += ": the peer is newer (it was promoted); run this side as the target"
		c.Reason = dec.Reason
	default:
		c.Refused = true
	}
	if c.Refused {
		writeMsg(conn, c)
		msg := fmt.Sprintf("%s: %s", dec.Outcome, dec.Reason)
		if dec.Outcome == generation.SplitBrain {
			msg += fmt.Sprintf("; local %d dirty bytes since the split, target %s; resolve with --discard-on target (the target's divergent chunks are saved first), "+
				"or keep the target's data with --discard-on source (it prints the commands that swap the roles)",
				s.bm.DirtyBytes(), peerDirty(rp.Bitmap, s.size, s.cfg.ChunkSize))
		}
		return dec, s.refuse(fmt.Errorf("%w: %s", ErrRefused, msg))
	}
	// The peer's dirty chunks become ours (durably) before the target
	// forgets them.
	if len(rp.Bitmap) > 0 {
		pb, err := bitmap.Decode(rp.Bitmap, s.size, s.cfg.ChunkSize)
		if err != nil {
			return dec, &repl.FatalError{Err: fmt.Errorf("target bitmap: %w", err)}
		}
		if err := s.bm.Union(pb); err != nil {
			return dec, &repl.FatalError{Err: err}
		}
		if err := s.bm.Flush(); err != nil {
			return dec, err
		}
	}
	if (rp.StreamID == cur.StreamID() && (rp.Applied < applied || rp.Applied > cur.LastSeq())) || (rp.StreamID != cur.StreamID() && applied > 0) {
		// The target lost what it had not synced, or the stream (or is
		// past it): the queue, folded into the bitmap, plus the extents
		// still hot cover it.
		return dec, &repl.FatalError{Err: fmt.Errorf("target at stream %016x seq %d, source at %016x seq %d: %w",
			rp.StreamID, rp.Applied, cur.StreamID(), applied, errRestream)}
	}
	full := dec.Full
	if full {
		s.needFull.Store(true)
	}
	resyncing := full || s.bm.DirtyChunks() > 0 || s.needFull.Load()
	c.Resync = resyncing
	c.Full = s.needFull.Load()
	c.Adopt = !resyncing
	s.synced.Store(false)
	if err := writeMsg(conn, c); err != nil {
		return dec, fmt.Errorf("send state commit: %w", err)
	}
	var d done
	if err := readMsg(conn, &d); err != nil {
		return dec, fmt.Errorf("read state commit reply: %w", err)
	}
	if d.Error != "" {
		return dec, s.refuse(fmt.Errorf("%w by the target: %s", ErrRefused, d.Error))
	}
	if d.Saved != "" {
		s.log.Warn("split brain resolved against the target: its divergent chunks were saved there", "path", d.Saved)
	}
	str := dec.Outcome.String() + ": " + dec.Reason
	s.decision.Store(&str)
	if c.Adopt {
		s.genMu.Lock()
		s.synced.Store(s.gen.Current == local.Current)
		s.genMu.Unlock()
	}
	s.at("committed")
	s.log.Info("state handshake", "decision", dec.Outcome, "reason", dec.Reason, "dirty_bytes", s.bm.DirtyBytes(), "full", full)
	return dec, nil
}

// epoch is this side's failover epoch (0: unknown).
func (s *Source) epoch() uint64 {
	if s.cfg.Epoch == nil {
		return 0
	}
	return s.cfg.Epoch()
}

func (s *Source) at(point string) {
	if s.hook != nil {
		s.hook(point)
	}
}

func peerDirty(b []byte, size, chunk int64) string {
	pb, err := bitmap.Decode(b, size, chunk)
	if err != nil || len(b) == 0 {
		return "unknown"
	}
	return fmt.Sprintf("%d dirty bytes", pb.DirtyBytes())
}

func (s *Source) refuse(err error) error {
	msg := err.Error()
	s.refusal.Store(&msg)
	s.log.Error("replication refused", "reason", msg)
	return &repl.FatalError{Err: err}
}

// syncer runs the full mirror or the bitmap resyncs while connected.
func (s *Source) syncer(ctx context.Context, cur *repl.Stream) {
	t := time.NewTicker(50 * time.Millisecond)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-s.connected:
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
		if s.needFull.Load() {
			s.log.Info("full mirror to a new target", "kind", s.cfg.Mirror)
			s.resyncActive.Store(true)
			// The mirror sends everything as it is from now on; changes
			// dropped meanwhile set their bits again. (MirrorNone: the
			// operator vouches the copies are equal; the bitmap stays.)
			if s.cfg.Mirror != repl.MirrorNone {
				s.bm.ClearAll()
				s.bm.Flush()
			}
			res, err := cur.Mirror(ctx, s.cfg.Mirror)
			s.resyncActive.Store(false)
			if err != nil {
				if ctx.Err() == nil {
					s.log.Warn("mirror interrupted", "err", err)
				}
				continue
			}
			s.resyncSent.Add(res.Sent)
			s.needFull.Store(false)
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
	s.resyncTotal.Store(total)
	s.resyncScheduled.Add(total)
	s.resyncDone.Store(0)
	s.resyncActive.Store(true)
	defer s.resyncActive.Store(false)
	s.resyncPasses.Add(1)
	start := time.Now()
	var sent int64
	// A batch's ranges are hot together: it spans at most half the
	// activity log's slots, so marking it never waits on itself.
	slots := s.cfg.LogOptions.Slots
	if slots == 0 {
		slots = 64
	}
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
			if err = s.lim.Wait(ctx, int(n)); err == nil {
				var res repl.MirrorResult
				res, err = cur.Resync(ctx, batch)
				sent += res.Sent
				s.resyncSent.Add(res.Sent)
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
		s.resyncDone.Add(n)
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

// notify tells the target that the resync is complete: it takes this
// side's generation and is consistent again.
func (s *Source) notify(ctx context.Context) {
	conn, err := s.cfg.Dial(ctx)
	if err != nil {
		s.log.Warn("notify target of the finished resync", "err", err)
		return
	}
	defer conn.Close()
	if _, err := s.handshake(ctx, conn, true); err != nil {
		s.log.Warn("notify target of the finished resync", "err", err)
		return
	}
	s.al.Clean()
}

// Close stops the engine and closes the state files (a clean stop: hot
// extents whose changes the target holds are released).
func (s *Source) Close() error {
	s.swap.Lock()
	defer s.swap.Unlock()
	cur := s.cur.Load()
	var errs []error
	_, d := cur.Progress()
	// Changes durable in the disk queue stay there for the next start;
	// what the target does not hold durably otherwise goes to the bitmap.
	errs = append(errs, s.releaseQueuedLocked())
	s.trk.Acked(d)
	s.trk.Disconnected()
	if s.bm.DirtyChunks() > 0 || s.qq.Len() > 0 {
		errs = append(errs, s.bumpGeneration())
	}
	errs = append(errs, cur.Close(), s.qq.Close(), s.al.Clean(), s.al.Close(), s.bm.Close())
	return errors.Join(errs...)
}
