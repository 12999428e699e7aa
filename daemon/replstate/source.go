package replstate

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
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
	// holds checks it again, from any goroutine: the authority calls it
	// when it records the target in sync, so a write acknowledged without
	// the target meanwhile is never covered by that record.
	TargetInSync(holds func() bool)
}

// ErrSuperseded: the target knows a newer epoch than this source's.
var ErrSuperseded = errors.New("superseded by a newer epoch")

// Source is the replicating side with persistent state: a blockdev.Mutator.
type Source struct {
	cfg  SourceConfig
	log  *slog.Logger
	size int64

	// Dirty tracking (write.go): the bitmap, the activity log of hot
	// extents, and the tracker that ties them to the engine's sequences.
	bm  *bitmap.Bitmap
	al  *bitmap.ActivityLog
	trk *bitmap.Tracker

	gens genState    // generations and what the peer may hold (handshake.go)
	hs   handshakes  // the outcome of the state handshakes (handshake.go)
	tr   tracking    // tracking mode: the target absent (track.go)
	rsy  resyncState // resyncs and mirrors (resync.go)

	// The stream (stream.go): the engine, its backlog on the memory →
	// disk queue; swap is held shared by Apply, exclusively to replace
	// the engine.
	swap    sync.RWMutex
	cur     atomic.Pointer[repl.Stream]
	retired retiredTraffic // counters of the engines cur replaced (metrics)
	q       atomic.Pointer[queueBacklog]
	qq      *queue.Queue
	running atomic.Bool // Run is active: without it, every write is tracked

	atOpen openFacts
}

// genState is the generation state of a source (handshake.go).
type genState struct {
	mu    sync.Mutex
	state generation.State
	// shared is the generation the peer may hold: the last one sent to it
	// in a state hello (it may have adopted it, whatever became of the
	// connection), or the persisted current one when its state said so; 0
	// when unknown to the peer. A write the peer will not see in order must
	// be made under a generation other than shared (bumpGeneration).
	shared uint64
	peer   atomic.Uint64 // the peer's current generation, as last seen
}

// handshakes is what the state handshakes decided.
type handshakes struct {
	connected chan struct{} // a handshake committed (buffered 1)
	refusal   atomic.Pointer[string]
	decision  atomic.Pointer[string]
	synced    atomic.Bool // the target holds this generation, consistent
	// hook, when set (tests), is called at the named points of the state
	// handshake: "snapshot" (the hello's generation was taken), "committed"
	// (the target accepted, the engine is not connected yet).
	hook func(point string)
}

// tracking is tracking mode: the target is absent and changes are
// recorded for a later resync instead of waiting for it (track.go).
type tracking struct {
	mu  sync.Mutex
	ctx context.Context // cancelled while in tracking mode (sync writes stop waiting)
	end context.CancelFunc
	on  atomic.Bool
	// resumeSeq: the target is in sync (for the authority) only once it
	// acknowledged up to here (the last write acknowledged without it).
	resumeSeq atomic.Uint64
	downAt    atomic.Int64 // unix nanos the link went down (0: up)
}

// resyncState is the resyncs' and mirrors' pacing and progress
// (resync.go).
type resyncState struct {
	lim               *resync.Limiter
	needFull          atomic.Bool // a full mirror is due (the target holds no generation)
	active            atomic.Bool
	total, done, sent atomic.Int64
	scheduled, passes atomic.Int64
}

// openFacts are what OpenSource found.
type openFacts struct {
	hot      int   // hot extents (a crash)
	dirty    int64 // dirty bytes, the hot extents folded in
	queue    int64 // disk queue bytes resumed
	setAside string
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
	s := &Source{cfg: cfg, log: cfg.Log, size: cfg.Backend.Size()}
	s.hs.connected = make(chan struct{}, 1)
	s.rsy.lim = resync.NewLimiter(cfg.ResyncRate, resync.DefaultFloor)
	var err error
	if s.atOpen.setAside, err = bind(cfg.Dir, cfg.Binding, s.log); err != nil {
		return nil, err
	}
	if s.bm, err = openBitmap(cfg.Dir, s.size, cfg.ChunkSize); err != nil {
		return nil, err
	}
	if s.al, err = bitmap.OpenLog(filepath.Join(cfg.Dir, LogFile), s.bm, cfg.LogOptions); err != nil {
		s.bm.Close()
		return nil, fmt.Errorf("open activity log: %w", err)
	}
	s.atOpen.hot = len(s.al.Hot())
	s.trk = bitmap.NewTracker(s.bm, s.al)
	// The durable queue of the last stream is resumed (or folded into the
	// bitmap when it cannot be).
	if err := s.openStream(); err != nil {
		s.closeFiles()
		return nil, err
	}
	s.atOpen.dirty = s.bm.DirtyBytes()
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
	if ok && !unshared && (s.atOpen.hot > 0 || s.atOpen.dirty > 0 || s.atOpen.queue > 0) {
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
	s.gens.state = st
	if !unshared {
		s.gens.shared = st.Current
	}
	s.tr.ctx, s.tr.end = context.WithCancel(context.Background())
	if s.atOpen.hot > 0 || s.atOpen.dirty > 0 || s.atOpen.queue > 0 {
		s.log.Info("restart: changes the target may lack", "dirty_bytes", s.atOpen.dirty, "hot_extents", s.atOpen.hot,
			"queued_bytes", s.atOpen.queue)
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

// EngineCollector returns a Prometheus collector of the engine's metrics:
// the current engine's, with its counters continuing those of the engines
// it replaced (a new one starts when the stream restarts), so that they
// grow for the life of the Source.
func (s *Source) EngineCollector() prometheus.Collector {
	return repl.NewStreamCollector(s.streamStats)
}

// retiredTraffic sums the counters of the engines a Source replaced.
type retiredTraffic struct {
	mu  sync.Mutex // also held while the engine is replaced
	sum repl.StreamStats
}

// streamStats is the current engine's StreamStats, its counters
// including those of the engines it replaced.
func (s *Source) streamStats() repl.StreamStats {
	s.retired.mu.Lock()
	defer s.retired.mu.Unlock()
	st := s.engine().Stats()
	st.AddCounters(s.retired.sum)
	return st
}

// Run replicates until ctx is done: connect, decide, resync, stream;
// restart the stream from the bitmap when it cannot be resumed. It
// returns an error wrapping ErrRefused when the handshake refuses.
func (s *Source) Run(ctx context.Context) error {
	if s.running.Swap(true) {
		return errors.New("replication source: Run is already active")
	}
	s.tr.mu.Lock()
	if s.tr.ctx.Err() != nil && !s.tr.on.Load() {
		// Ended by the previous Run's exit.
		s.tr.ctx, s.tr.end = context.WithCancel(context.Background())
	}
	s.tr.mu.Unlock()
	defer func() {
		s.running.Store(false)
		// Nobody ships any more: sync writes waiting for the target stop
		// waiting (their changes are tracked for the next start), as the
		// writes that arrive from now on do. Close would otherwise wait
		// for them, and they for an acknowledgement nobody sends.
		s.tr.mu.Lock()
		s.tr.end()
		s.tr.mu.Unlock()
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
