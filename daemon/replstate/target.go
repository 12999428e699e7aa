package replstate

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"path/filepath"
	"sync"
	"time"

	"github.com/doppelha/doppel/blockdev"
	"github.com/doppelha/doppel/daemon/bitmap"
	"github.com/doppelha/doppel/daemon/generation"
	"github.com/doppelha/doppel/daemon/repl"
	"github.com/doppelha/doppel/daemon/snapshot"
	"github.com/doppelha/doppel/daemon/splitbrain"
	"github.com/prometheus/client_golang/prometheus"
)

// TargetConfig configures a Target.
type TargetConfig struct {
	Dir     string // state directory
	Backend blockdev.Backend
	// Discard "target" accepts a split-brain resolution against this side
	// (its divergent chunks are saved first).
	Discard string
	Log     *slog.Logger
	// Liveness is the sessions' keepalive, timeout and traffic report
	// (repl.Liveness).
	Liveness repl.Liveness
	// Binding ties the state to a job incarnation and a volume: state of
	// another is set aside, and this side holds no generation (its
	// content is unknown: the source mirrors it).
	Binding Binding
	// Epoch returns the newest failover epoch this side knows (nil: none):
	// a source with an older one is refused and told it (it fences
	// itself). NewerEpoch is called with a source's epoch above it.
	Epoch      func() uint64
	NewerEpoch func(epoch uint64)
	// BeforeInconsistent, when set, is called before this side's data
	// turns inconsistent while it is consistent (a resync, a mirror, a
	// reverse overwriting it), with no frame being applied and the
	// point its volume holds: DRBD's before-resync-target handler, where
	// the agent snapshots the last consistent image. An error refuses
	// the resync (the source retries).
	BeforeInconsistent func(p snapshot.Point, why string) error
}

// Target is the receiving side with persistent state.
type Target struct {
	cfg  TargetConfig
	log  *slog.Logger
	eng  *repl.Applier
	size int64

	mu      sync.Mutex // one handshake at a time; guards gen, bm
	gen     generation.State
	bm      *bitmap.Bitmap // this side's own dirty chunks (from when it was a source); opened at the first handshake
	refusal string
	saved   string
	aside   string
}

// ErrNotConsistent: the target's data is not a consistent image now
// (mid-mirror or mid-resync).
var ErrNotConsistent = errors.New("target data is not consistent (a mirror or resync is running or was interrupted)")

// OpenTarget opens the state under cfg.Dir for the volume.
func OpenTarget(cfg TargetConfig) (*Target, error) {
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	if cfg.Discard != "" && cfg.Discard != "target" {
		return nil, fmt.Errorf("discard %q: a target can only discard its own data (--discard-on target)", cfg.Discard)
	}
	aside, err := bind(cfg.Dir, cfg.Binding, cfg.Log)
	if err != nil {
		return nil, err
	}
	st, ok, err := loadGen(cfg.Dir)
	if err != nil {
		return nil, err
	}
	if ok && st.Side == generation.SideSource {
		st.Demote()
		if err := saveGen(cfg.Dir, st); err != nil {
			return nil, err
		}
	}
	t := &Target{cfg: cfg, log: cfg.Log, size: cfg.Backend.Size(), gen: st, aside: aside}
	// No snapshot is taken before a resync inside the stream (a queue
	// overflow, activity-log evictions resynced by bitmap): the target
	// cannot tell which writes it lacks, so there is no known consistent
	// point to keep.
	rc := repl.ApplierConfig{Backend: cfg.Backend, StatePath: filepath.Join(cfg.Dir, TargetFile), Log: cfg.Log, Liveness: cfg.Liveness}
	eng, err := repl.NewApplier(rc)
	if err != nil {
		return nil, err
	}
	t.eng = eng
	t.setGen(st)
	return t, nil
}

// setGen records the generation state. Called with mu held (or before
// the target is shared).
func (t *Target) setGen(st generation.State) {
	t.gen = st
}

// consistentLocked reports whether this side's data is a consistent
// image now (consistent). Called with mu held.
func (t *Target) consistentLocked() bool {
	es, _, _ := t.eng.Status()
	return consistent(t.gen, es)
}

// consistent is the one answer to "is the target's copy a consistent
// image": its generation says so (no resync or mirror the handshake
// began is pending) and so does its applier (no mirror or resync batch
// inside the stream began and did not end). Both are persisted
// (GenerationFile, TargetFile) and either alone can say inconsistent
// after a crash; the job record's flag (ha.HardState.Consistent) is
// derived from this one through TargetStatus.Consistent.
func consistent(gen generation.State, es repl.ApplierState) bool {
	return gen.Current != 0 && gen.Data == generation.Consistent && es.State == "consistent"
}

// AtPoint runs f with no frame being applied and no handshake changing
// the generation, with the point the volume holds: a snapshot there is
// a crash-consistent image of the source's history up to p.Seq. It
// fails with ErrNotConsistent when the data is not a consistent image.
//
// A resync batch inside the stream (the generation consistent, the
// engine between a batch's begin and end) is waited for, up to
// pointWait.
func (t *Target) AtPoint(f func(p snapshot.Point) error) error {
	deadline := time.Now().Add(pointWait)
	for {
		err := t.atPoint(f)
		if !errors.Is(err, errMidBatch) {
			return err
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%w: a resync inside the stream did not pause for %v", ErrNotConsistent, pointWait)
		}
		time.Sleep(time.Millisecond)
	}
}

// pointWait bounds AtPoint's wait for the end of a resync batch.
const pointWait = 10 * time.Second

var errMidBatch = errors.New("mid resync batch")

func (t *Target) atPoint(f func(p snapshot.Point) error) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.gen.Current == 0 || t.gen.Data != generation.Consistent {
		return ErrNotConsistent
	}
	g := t.gen.Current
	return t.eng.Quiesce(func(applied uint64) error {
		es, _, _ := t.eng.Status()
		if es.State != "consistent" {
			return errMidBatch
		}
		return f(snapshot.Point{Generation: g, Stream: es.StreamID, Seq: applied})
	})
}

// AtSeq is AtPoint once the target applied seq of stream (waiting for
// it until ctx ends), with the volume holding exactly the image at seq:
// no frame after it changed data. The source keeps its file system
// frozen meanwhile (an application-consistent snapshot).
func (t *Target) AtSeq(ctx context.Context, stream, seq uint64, f func(p snapshot.Point) error) error {
	for {
		es, _, _ := t.eng.Status()
		if es.StreamID != stream {
			return fmt.Errorf("the target follows stream %016x, the point is in %016x (the stream restarted): take the snapshot again", es.StreamID, stream)
		}
		if es.Applied >= seq {
			break
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("wait for sequence %d (applied %d): %w", seq, es.Applied, ctx.Err())
		case <-time.After(2 * time.Millisecond):
		}
	}
	return t.AtPoint(func(p snapshot.Point) error {
		if p.Stream != stream {
			return fmt.Errorf("the stream restarted before the point was reached")
		}
		if ld := t.eng.LastData(); ld > seq {
			return fmt.Errorf("data changed after the point (sequence %d > %d): the source was not frozen", ld, seq)
		}
		p.Seq = seq
		p.AppConsistent = true
		return f(p)
	})
}

// Collector returns a Prometheus collector for the applier's metrics.
func (t *Target) Collector() prometheus.Collector { return t.eng.Collector() }

// Close closes the engine and the bitmap.
func (t *Target) Close() error {
	err := t.eng.Close()
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.bm != nil {
		err = errors.Join(err, t.bm.Close())
	}
	return err
}

// Serve accepts sources on l until ctx is done.
func (t *Target) Serve(ctx context.Context, l net.Listener) error {
	return repl.ServeConns(ctx, l, t.log, t.ServeConn)
}

// ServeConn runs the state handshake (when the source starts with it) and
// then the engine on c.
func (t *Target) ServeConn(ctx context.Context, c net.Conn) error {
	c.SetDeadline(time.Now().Add(30 * time.Second))
	if tc, ok := c.(*tls.Conn); ok {
		if err := tc.HandshakeContext(ctx); err != nil {
			c.Close()
			return fmt.Errorf("TLS handshake: %w", err)
		}
	}
	var m [4]byte
	if _, err := io.ReadFull(c, m[:]); err != nil {
		c.Close()
		return fmt.Errorf("read hello: %w", err)
	}
	if m != metaMagic {
		// A source without a state dir: the engine reads its hello.
		return t.eng.ServeConn(ctx, &prefixConn{Conn: c, r: io.MultiReader(bytes.NewReader(m[:]), c)})
	}
	keep, err := t.handshake(c)
	if err != nil || !keep {
		c.Close()
		return err
	}
	c.SetDeadline(time.Time{})
	return t.eng.ServeConn(ctx, c)
}

// prefixConn replays bytes already read.
type prefixConn struct {
	net.Conn
	r io.Reader
}

func (p *prefixConn) Read(b []byte) (int, error) { return p.r.Read(b) }

// NetConn returns the wrapped connection (the engine sets socket options
// on the TCP connection under it).
func (p *prefixConn) NetConn() net.Conn { return p.Conn }

func (t *Target) handshake(c net.Conn) (keep bool, err error) {
	var h hello
	if err := readMsg(c, &h); err != nil {
		return false, fmt.Errorf("read state hello: %w", err)
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	rp := reply{Discard: t.cfg.Discard}
	fail := func(format string, a ...any) (bool, error) {
		rp.Error = fmt.Sprintf(format, a...)
		writeMsg(c, rp)
		return false, fmt.Errorf("%w: %s", ErrRefused, rp.Error)
	}
	if t.cfg.Epoch != nil {
		rp.Epoch = t.cfg.Epoch()
		switch {
		case h.Epoch > 0 && h.Epoch < rp.Epoch:
			return fail("superseded: this side knows epoch %d, the source is at %d (another side was promoted)", rp.Epoch, h.Epoch)
		case h.Epoch > rp.Epoch && t.cfg.NewerEpoch != nil:
			t.cfg.NewerEpoch(h.Epoch)
		}
	}
	if h.VolumeSize != t.size {
		return fail("source volume is %d bytes, target volume is %d", h.VolumeSize, t.size)
	}
	if mine := t.cfg.Binding.Owner.Job; h.Job != "" && mine != "" && h.Job != mine {
		return fail("source is job incarnation %s, this target belongs to %s: the job was created again on one side only (delete it on both and create it again)", h.Job, mine)
	}
	src, err := decodeGen(h.Gen)
	if err != nil {
		return fail("%v", err)
	}
	if t.bm == nil {
		if t.bm, err = openBitmap(t.cfg.Dir, t.size, h.ChunkSize); err != nil {
			return fail("%v", err)
		}
		// Extents still hot from when this side was a source (a crash)
		// are folded into the bitmap.
		al, err := bitmap.OpenLog(filepath.Join(t.cfg.Dir, LogFile), t.bm, bitmap.LogOptions{})
		if err != nil {
			return fail("open activity log: %v", err)
		}
		if err := errors.Join(al.Clean(), al.Close()); err != nil {
			return fail("activity log: %v", err)
		}
		// So are the changes a disk queue still holds from then.
		if err := foldQueues(filepath.Join(t.cfg.Dir, QueueDir), t.bm, t.log); err != nil {
			return fail("disk queue: %v", err)
		}
	} else if t.bm.ChunkSize() != h.ChunkSize {
		return fail("source chunk size %d, this side's bitmap has %d", h.ChunkSize, t.bm.ChunkSize())
	}
	es, _, _ := t.eng.Status()
	rp.Gen, rp.StreamID, rp.Applied, rp.Data = encodeGen(t.gen), es.StreamID, es.Applied, es.State
	if h.Notify {
		// The source finished a resync: this side durably holds its
		// generation's data.
		if t.gen.Current != src.Current && !src.Knows(t.gen.Current) && t.gen.Current != 0 {
			return fail("resync notice for generation %016x, unrelated to this side's %016x", src.Current, t.gen.Current)
		}
		st := t.gen.Clone()
		st.BeginResync(src)
		st.EndResync()
		if err := saveGen(t.cfg.Dir, st); err != nil {
			return fail("%v", err)
		}
		t.setGen(st)
		if err := t.eng.MarkConsistent(); err != nil {
			return fail("%v", err)
		}
		t.log.Info("resync complete: target consistent", "generation", fmt.Sprintf("%016x", st.Current))
		return false, writeMsg(c, rp)
	}
	if t.bm.DirtyChunks() > 0 {
		if rp.Bitmap, err = t.bm.MarshalBinary(); err != nil {
			return fail("%v", err)
		}
	}
	if err := writeMsg(c, rp); err != nil {
		return false, err
	}
	var cm commit
	if err := readMsg(c, &cm); err != nil {
		return false, fmt.Errorf("read state commit: %w", err)
	}
	if cm.Refused {
		t.refusal = fmt.Sprintf("%s: %s", cm.Outcome, cm.Reason)
		t.log.Error("replication refused", "outcome", cm.Outcome, "reason", cm.Reason, "local_dirty_bytes", t.bm.DirtyBytes())
		return false, fmt.Errorf("%w: %s", ErrRefused, t.refusal)
	}
	var d done
	st := t.gen.Clone()
	if cm.Discard {
		name := splitbrain.DefaultName(t.cfg.Dir, "repl", t.gen.Current)
		saved, err := splitbrain.Save(name, t.cfg.Backend, t.bm)
		if err != nil && !errors.Is(err, splitbrain.ErrExists) {
			d.Error = fmt.Sprintf("save divergent chunks: %v", err)
			writeMsg(c, d)
			return false, errors.New(d.Error)
		}
		d.Saved, t.saved = name, name
		t.log.Warn("split brain resolved against this side: divergent chunks saved", "path", name, "bytes", saved.Bytes)
	}
	switch {
	case cm.Adopt:
		st.BeginResync(src)
		st.EndResync()
	case cm.Full:
		// Keep no generation until the mirror completes.
	case cm.Resync:
		st.BeginResync(src)
	}
	if (cm.Full || cm.Resync) && t.cfg.BeforeInconsistent != nil && t.consistentLocked() {
		why := fmt.Sprintf("%s: %s", cm.Outcome, cm.Reason)
		if cm.Full {
			why = "full mirror: " + why
		}
		g := t.gen.Current
		err := t.eng.Quiesce(func(applied uint64) error {
			es, _, _ := t.eng.Status()
			return t.cfg.BeforeInconsistent(snapshot.Point{Generation: g, Stream: es.StreamID, Seq: applied}, why)
		})
		if err != nil {
			d.Error = fmt.Sprintf("before the resync: %v", err)
			writeMsg(c, d)
			return false, fmt.Errorf("%w: %s", ErrRefused, d.Error)
		}
	}
	if err := saveGen(t.cfg.Dir, st); err != nil {
		d.Error = err.Error()
		writeMsg(c, d)
		return false, err
	}
	t.setGen(st)
	if cm.Adopt {
		// The source says this side holds its generation's data: a
		// resync whose notice was lost is over.
		if err := t.eng.MarkConsistent(); err != nil {
			return false, err
		}
	}
	// The source holds our dirty chunks durably now.
	t.bm.ClearAll()
	if err := t.bm.Flush(); err != nil {
		return false, err
	}
	t.refusal = ""
	t.log.Info("state handshake", "decision", cm.Outcome, "reason", cm.Reason, "resync", cm.Resync, "generation", fmt.Sprintf("%016x", st.Current))
	return true, writeMsg(c, d)
}

// TargetStatus is the state layer's view of a target.
type TargetStatus struct {
	Generation uint64
	History    []uint64
	Data       string // generation data state
	Refusal    string // the last refusal, if any
	Saved      string // split-brain save of this side, if any
	DirtyBytes int64  // this side's own dirty bytes
	// SetAside is where state of another job or volume was moved at
	// open ("" when none was).
	SetAside string
	// The applier: the stream it follows, the last sequence it applied,
	// its own data state (consistent | inconsistent), the source
	// connected now ("" none) and the payload bytes it wrote since it
	// opened.
	Stream, Applied uint64
	ApplierState    string
	Peer            string
	AppliedBytes    int64
	// Consistent: the copy is a consistent image now, by the generation
	// and the applier together; Data and ApplierState are each one half.
	Consistent bool
}

// Status returns the target's state.
func (t *Target) Status() TargetStatus {
	es, _, peer := t.eng.Status()
	_, applied := t.eng.Received()
	t.mu.Lock()
	defer t.mu.Unlock()
	st := TargetStatus{Generation: t.gen.Current, History: t.gen.History, Data: t.gen.Data.String(), Refusal: t.refusal, Saved: t.saved, SetAside: t.aside,
		Stream: es.StreamID, Applied: es.Applied, ApplierState: es.State, Peer: peer, AppliedBytes: applied,
		Consistent: consistent(t.gen, es)}
	if t.bm != nil {
		st.DirtyBytes = t.bm.DirtyBytes()
	}
	return st
}

// RefuseOlder answers the state handshake on c for a side that is no
// longer a target, because it was promoted at epoch: any source is told the
// epoch and refused (an old source then fences itself). It reads the
// source's magic and hello first.
func RefuseOlder(c net.Conn, epoch uint64, why string) error {
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if tc, ok := c.(*tls.Conn); ok {
		if err := tc.Handshake(); err != nil {
			return fmt.Errorf("TLS handshake: %w", err)
		}
	}
	var m [4]byte
	if _, err := io.ReadFull(c, m[:]); err != nil {
		return fmt.Errorf("read hello: %w", err)
	}
	if m != metaMagic {
		return fmt.Errorf("%w: a source without state cannot be told the epoch", ErrRefused)
	}
	var h hello
	if err := readMsg(c, &h); err != nil {
		return fmt.Errorf("read state hello: %w", err)
	}
	if h.Epoch >= epoch {
		// A source at least as new (this side was superseded in turn and
		// is about to become its target): no answer, it retries.
		return fmt.Errorf("source at epoch %d, not older than %d: not refused, not served yet", h.Epoch, epoch)
	}
	rp := reply{Epoch: epoch, Error: fmt.Sprintf("superseded: %s (epoch %d; the source is at %d)", why, epoch, h.Epoch)}
	return errors.Join(writeMsg(c, rp), fmt.Errorf("%w: %s", ErrRefused, rp.Error))
}
