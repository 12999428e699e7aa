package repl

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/doppelha/doppel/blockdev"
	"github.com/doppelha/doppel/daemon/repl/wire"
	"github.com/doppelha/doppel/daemon/statefile"
)

// ApplierConfig configures an [Applier].
type ApplierConfig struct {
	// Backend receives the replicated data.
	Backend blockdev.Backend
	// StatePath is where the target persists its stream, last durable
	// sequence and data state (JSON, written atomically); "" keeps them
	// in memory only.
	StatePath string
	// Log receives structured logs; nil discards them.
	Log *slog.Logger
	// Liveness bounds how long a silent session goes unnoticed, and
	// reports the source's frames (keepalive.go).
	Liveness Liveness
	// BeforeMirror, when set, is called before a mirror or resync begins
	// on a consistent target (the frame that makes it inconsistent), with
	// no frame being applied and the last applied sequence: the moment to
	// snapshot the last consistent image. An error stops the session
	// (the mirror does not start).
	BeforeMirror func(applied uint64, purpose wire.Purpose) error
}

// ApplierState is what a target persists.
type ApplierState struct {
	StreamID   uint64 `json:"stream_id"`
	Applied    uint64 `json:"applied_seq"` // durable when persisted
	State      string `json:"data_state"`  // consistent | inconsistent
	VolumeSize int64  `json:"volume_size"`
}

// Applier is the target side of replication: it accepts one source at a
// time and applies its frames in sequence order.
type Applier struct {
	cfg  ApplierConfig
	log  *slog.Logger
	b    blockdev.Backend
	size int64
	ext  extents

	applyMu   sync.Mutex // held while a frame is applied (Quiesce)
	mu        sync.Mutex
	stream    uint64
	applied   uint64
	durable   uint64
	lastData  uint64 // the last applied sequence that changed data
	state     uint8
	persisted time.Time
	peer      string
	cancelCur context.CancelFunc // the current session
	curDone   chan struct{}

	sessMu sync.Mutex // one session at a time

	tst applierStats
}

type applierStats struct {
	recvBytes    atomic.Int64
	frames       atomic.Int64
	appliedBytes atomic.Int64
	sessions     atomic.Int64
	refused      atomic.Int64
}

// NewApplier returns an applier, loading its persisted state when present.
func NewApplier(cfg ApplierConfig) (*Applier, error) {
	if cfg.Backend == nil {
		return nil, errors.New("replication target: no backend")
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	cfg.Liveness = cfg.Liveness.withDefaults()
	t := &Applier{cfg: cfg, log: cfg.Log, b: cfg.Backend, size: cfg.Backend.Size(), ext: newExtents(cfg.Backend),
		state: wire.StateConsistent}
	if cfg.StatePath != "" {
		data, err := os.ReadFile(cfg.StatePath)
		switch {
		case err == nil:
			var st ApplierState
			if err := json.Unmarshal(data, &st); err != nil {
				return nil, fmt.Errorf("replication target: state %s: %w", cfg.StatePath, err)
			}
			if st.VolumeSize != t.size {
				return nil, fmt.Errorf("replication target: state %s is for a %d-byte volume, this one has %d", cfg.StatePath, st.VolumeSize, t.size)
			}
			// What changed data last is not persisted: as late as
			// possible.
			t.stream, t.applied, t.durable, t.lastData = st.StreamID, st.Applied, st.Applied, st.Applied
			if st.State == "inconsistent" {
				t.state = wire.StateInconsistent
			}
		case errors.Is(err, os.ErrNotExist):
		default:
			return nil, fmt.Errorf("replication target: %w", err)
		}
	}
	return t, nil
}

// Status returns the target's state.
func (t *Applier) Status() (st ApplierState, durable uint64, peer string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	return ApplierState{StreamID: t.stream, Applied: t.applied, State: stateName(t.state), VolumeSize: t.size}, t.durable, t.peer
}

// Quiesce runs f while no frame is being applied, with the last applied
// sequence: the backend then holds exactly the source's history up to it.
func (t *Applier) Quiesce(f func(applied uint64) error) error {
	t.applyMu.Lock()
	defer t.applyMu.Unlock()
	t.mu.Lock()
	a := t.applied
	t.mu.Unlock()
	return f(a)
}

// MarkConsistent records that the data is a consistent image again (the
// source says the target holds its generation: a resync notice, an
// adopting handshake), in case an interrupted resync left it inconsistent.
func (t *Applier) MarkConsistent() error {
	t.applyMu.Lock()
	defer t.applyMu.Unlock()
	t.mu.Lock()
	was := t.state
	t.state = wire.StateConsistent
	t.mu.Unlock()
	if was == wire.StateConsistent {
		return nil
	}
	t.log.Info("resync complete: target data consistent")
	return t.persist(true)
}

// LastData is the sequence of the last applied frame that changed the
// volume's data (0 when none in this stream): the image at any sequence
// from it to Status's applied is the same.
func (t *Applier) LastData() uint64 {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.lastData
}

// Close syncs the backend and persists the state.
func (t *Applier) Close() error {
	t.applyMu.Lock()
	defer t.applyMu.Unlock()
	err := t.b.Sync()
	if err == nil {
		t.mu.Lock()
		t.durable = t.applied
		t.mu.Unlock()
		err = t.persist(true)
	}
	return errors.Join(err, t.ext.Close())
}

// persist writes the state file (temp, fsync, rename, fsync dir). Unless
// force, it writes at most once a second: a lagging durable sequence only
// makes a resume after a target crash more conservative.
func (t *Applier) persist(force bool) error {
	if t.cfg.StatePath == "" {
		return nil
	}
	t.mu.Lock()
	if !force && time.Since(t.persisted) < time.Second {
		t.mu.Unlock()
		return nil
	}
	st := ApplierState{StreamID: t.stream, Applied: t.durable, State: stateName(t.state), VolumeSize: t.size}
	t.persisted = time.Now()
	t.mu.Unlock()
	data, err := json.MarshalIndent(st, "", "  ")
	if err != nil {
		return err
	}
	return statefile.Write(t.cfg.StatePath, append(data, '\n'), 0o600)
}

// Serve accepts sources on l until ctx is done. A newly authenticated
// source replaces the current one (a reconnect after a partition finds the
// old session half dead).
func (t *Applier) Serve(ctx context.Context, l net.Listener) error {
	return ServeConns(ctx, l, t.log, t.ServeConn)
}

// ServeConns accepts connections on l until ctx is done, runs serve on each
// in a goroutine of its own, logs the sessions that end in an error, and
// returns once every session has ended. Targets with more around the engine
// (replstate) serve with it too.
func ServeConns(ctx context.Context, l net.Listener, log *slog.Logger, serve func(context.Context, net.Conn) error) error {
	go func() {
		<-ctx.Done()
		l.Close()
	}()
	var wg sync.WaitGroup
	defer wg.Wait()
	for {
		c, err := l.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			return fmt.Errorf("accept: %w", err)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := serve(ctx, c); err != nil && ctx.Err() == nil {
				log.Warn("replication session ended", "peer", c.RemoteAddr().String(), "err", err)
			}
		}()
	}
}

// refuse logs why a peer was refused and tells it (best effort).
func (t *Applier) refuse(c net.Conn, code uint16, msg string, err error) error {
	t.tst.refused.Add(1)
	t.log.Error("refused replication peer", "peer", c.RemoteAddr().String(), "reason", msg, "err", err)
	if code != 0 {
		if b, e := wire.Encode(&wire.Error{Code: code, Message: truncate(msg, wire.MaxText)}); e == nil {
			c.SetWriteDeadline(time.Now().Add(time.Second))
			if _, werr := c.Write(b); werr == nil {
				lingerClose(c)
			}
		}
	}
	if err != nil {
		return fmt.Errorf("%s: %w", msg, err)
	}
	return errors.New(msg)
}

// lingerClose lets a refusal reach the peer before the caller closes c:
// closing a socket that still holds unread input makes the kernel send a
// reset, which can discard the error frame before the peer reads it. So
// half-close, then drain what the peer sent (bounded in time and bytes).
func lingerClose(c net.Conn) {
	if cw, ok := c.(interface{ CloseWrite() error }); ok {
		cw.CloseWrite()
	}
	c.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
	io.Copy(io.Discard, io.LimitReader(c, 4<<20))
}

func truncate(s string, n int) string {
	if len(s) > n {
		return s[:n]
	}
	return s
}

// ServeConn runs one source connection: handshake, then apply frames
// until it ends.
func (t *Applier) ServeConn(ctx context.Context, c net.Conn) error {
	defer c.Close()
	peer := c.RemoteAddr().String()
	if err := setUserTimeout(c, t.cfg.Liveness.Timeout); err != nil {
		t.log.Debug("replication link without TCP_USER_TIMEOUT", "err", err)
	}
	c.SetDeadline(time.Now().Add(handshakeTimeout))
	if tc, ok := c.(*tls.Conn); ok {
		if err := tc.HandshakeContext(ctx); err != nil {
			return t.refuse(c, 0, "TLS handshake failed", err)
		}
	}
	r := wire.NewReader(c)
	f, err := r.Read()
	if err != nil {
		return t.refuse(c, wire.CodeProtocol, "not a doppel replication source (bad hello)", err)
	}
	h, ok := f.(*wire.Hello)
	if !ok {
		return t.refuse(c, wire.CodeProtocol, fmt.Sprintf("expected hello, got %v", f.Type()), nil)
	}
	v := min(h.MaxVersion, wire.MaxVersion)
	if v < max(h.MinVersion, wire.MinVersion) {
		return t.refuse(c, wire.CodeVersion, fmt.Sprintf("protocol version %d-%d not supported (this target speaks %d-%d)",
			h.MinVersion, h.MaxVersion, wire.MinVersion, wire.MaxVersion), nil)
	}
	if h.VolumeSize != uint64(t.size) {
		return t.refuse(c, wire.CodeVolume, fmt.Sprintf("source volume is %d bytes, target volume is %d", h.VolumeSize, t.size), nil)
	}
	t.mu.Lock()
	known := t.stream
	t.mu.Unlock()
	if h.StreamID != known && h.BaseSeq != 0 {
		// The source released frames some other target acknowledged: this
		// one cannot continue its stream (and keeps its own record).
		return t.refuse(c, wire.CodeStream, fmt.Sprintf("this target has no record of stream %016x (it follows %016x): restart the source with a mirror", h.StreamID, known), nil)
	}

	// Replace the current session, if any.
	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	t.mu.Lock()
	if t.cancelCur != nil {
		t.log.Info("new source connection replaces the current one", "old", t.peer, "new", peer)
		t.cancelCur()
	}
	t.mu.Unlock()
	t.sessMu.Lock()
	defer t.sessMu.Unlock()
	done := make(chan struct{})
	defer close(done)
	t.mu.Lock()
	t.cancelCur, t.peer, t.curDone = cancel, peer, done
	w := &wire.Welcome{Version: v, StreamID: t.stream, Applied: t.applied, VolumeSize: uint64(t.size), State: t.state}
	newStream := h.StreamID != t.stream
	if newStream {
		t.stream, t.applied, t.durable, t.lastData = h.StreamID, h.BaseSeq, h.BaseSeq, 0
	}
	t.mu.Unlock()
	defer func() {
		t.mu.Lock()
		if t.curDone == done {
			t.cancelCur, t.peer, t.curDone = nil, "", nil
		}
		t.mu.Unlock()
	}()
	if newStream {
		if err := t.persist(true); err != nil {
			return t.refuse(c, wire.CodeIO, "persist target state", err)
		}
	}
	b, _ := wire.Encode(w)
	if _, err := c.Write(b); err != nil {
		return fmt.Errorf("send welcome: %w", err)
	}
	c.SetDeadline(time.Time{})
	t.tst.sessions.Add(1)
	t.log.Info("source connected", "peer", peer, "mode", h.Mode, "version", v, "stream", fmt.Sprintf("%016x", h.StreamID),
		"new_stream", newStream, "applied", w.Applied, "data_state", stateName(w.State))
	return t.session(sctx, c, r, v >= wire.KeepaliveVersion)
}

// session applies frames from r and acknowledges them on c. One
// goroutine reads, applies and answers: the socket buffer pipelines the
// network, and an acknowledgement is written whenever no further frame is
// already buffered (so acks coalesce under load and are immediate when
// idle). With kept (protocol version 2) a second goroutine sends
// keepalives while nothing else is written, and a source silent for the
// keepalive timeout ends the session.
func (t *Applier) session(ctx context.Context, c net.Conn, r *wire.Reader, kept bool) error {
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	go func() {
		<-ctx.Done()
		c.SetDeadline(time.Now())
	}()
	live := t.cfg.Liveness
	out := &sessionOut{bw: bufio.NewWriterSize(c, 64<<10)}
	dl := &readDeadline{conn: c}
	if kept {
		dl.timeout = live.Timeout
		kaDone := make(chan struct{})
		defer func() { cancel(nil); <-kaDone }()
		go func() {
			defer close(kaDone)
			if err := keepalive(ctx, out, live.Interval); err != nil {
				cancel(err)
			}
		}()
	}
	var buf []byte
	// send and flush hold the writer the keepalive loop shares.
	send := func(f wire.Frame) error {
		var err error
		if buf, err = wire.Append(buf[:0], f, nil); err != nil {
			return err
		}
		out.mu.Lock()
		defer out.mu.Unlock()
		out.n.Add(1)
		_, err = out.bw.Write(buf)
		return err
	}
	flush := func() error {
		out.mu.Lock()
		defer out.mu.Unlock()
		return out.bw.Flush()
	}
	t.mu.Lock()
	next := t.applied + 1
	t.mu.Unlock()
	var lastAck uint64
	r.Reuse = true // every frame is applied before the next is read
	for {
		// Acknowledge when nothing more is read ahead, and also every
		// ackEvery frames of a long run, so that sync writers behind the
		// first of a batch do not all wait for its last.
		t.mu.Lock()
		a, d := t.applied, t.durable
		t.mu.Unlock()
		if r.Buffered() == 0 || a-lastAck >= ackEvery {
			if a != lastAck {
				lastAck = a
				if err := send(&wire.Ack{Applied: a, Durable: d}); err != nil {
					return fmt.Errorf("send ack: %w", err)
				}
			}
			if err := flush(); err != nil {
				return fmt.Errorf("send ack: %w", err)
			}
		}
		dl.refresh()
		if ctx.Err() != nil {
			return context.Cause(ctx)
		}
		n := r.N
		f, err := r.Read()
		t.tst.recvBytes.Add(r.N - n)
		if err != nil {
			if ctx.Err() != nil {
				return context.Cause(ctx)
			}
			if errors.Is(err, io.EOF) {
				return errors.New("source closed the connection")
			}
			if err = dl.silent(err, "source"); errors.Is(err, ErrSilent) {
				return err
			}
			if errors.Is(err, wire.ErrMalformed) {
				return t.refuse(c, wire.CodeProtocol, "malformed frame from source", err)
			}
			return err
		}
		live.recv()
		switch f := f.(type) {
		case *wire.Bye:
			t.log.Info("source said bye", "reason", f.Reason)
			return nil
		case *wire.Keepalive:
		case wire.Sequenced:
			if f.Sequence() != next {
				return t.refuse(c, wire.CodeStream, fmt.Sprintf("frame %d out of order (want %d)", f.Sequence(), next), nil)
			}
			if err := t.check(f); err != nil {
				return t.refuse(c, wire.CodeProtocol, "invalid frame", err)
			}
			next++
			t.tst.frames.Add(1)
			reply, err := t.apply(f)
			if err != nil {
				t.log.Error("apply failed: replication stopped", "seq", f.Sequence(), "frame", f.Type(), "err", err)
				send(&wire.Error{Code: wire.CodeIO, Message: truncate(err.Error(), wire.MaxText)})
				flush()
				return err
			}
			if reply != nil {
				if err := send(reply); err != nil {
					return fmt.Errorf("send %v: %w", reply.Type(), err)
				}
			}
		default:
			return t.refuse(c, wire.CodeProtocol, fmt.Sprintf("unexpected %v frame from source", f.Type()), nil)
		}
	}
}

// ackEvery is how many applied frames may go unacknowledged while more
// are read ahead.
const ackEvery = 8

// check validates a frame's range before it is queued for application.
func (t *Applier) check(f wire.Sequenced) error {
	var off, n uint64
	switch f := f.(type) {
	case *wire.Write:
		off, n = f.Offset, uint64(len(f.Data))
	case *wire.Trim:
		off, n = f.Offset, f.Length
	case *wire.Zeroes:
		off, n = f.Offset, f.Length
	case *wire.MirrorData:
		off, n = f.Offset, uint64(len(f.Data))
	case *wire.MirrorHole:
		off, n = f.Offset, f.Length
	case *wire.SumRequest:
		off = f.Offset
		if off%uint64(f.ChunkSize) != 0 || off >= uint64(t.size) && f.Count > 0 {
			return fmt.Errorf("checksum request at %d (chunk %d) outside the %d-byte volume", off, f.ChunkSize, t.size)
		}
		return nil
	}
	if off > uint64(t.size) || n > uint64(t.size)-off {
		return fmt.Errorf("%v [%d,+%d) outside the %d-byte volume", f.Type(), off, n, t.size)
	}
	return nil
}

// apply applies one frame; it returns a reply to send, if any.
func (t *Applier) apply(f wire.Sequenced) (wire.Frame, error) {
	t.applyMu.Lock()
	defer t.applyMu.Unlock()
	var (
		err     error
		durable bool
		reply   wire.Frame
		persist bool
	)
	switch f := f.(type) {
	case *wire.Write:
		_, err = t.b.WriteAt(f.Data, int64(f.Offset))
		t.tst.appliedBytes.Add(int64(len(f.Data)))
		durable = f.FUA
	case *wire.Trim:
		err = blockdev.ApplyTo(t.b, &blockdev.Mutation{Op: blockdev.OpTrim, Offset: int64(f.Offset), Length: int64(f.Length)})
		durable = f.FUA
	case *wire.Zeroes:
		err = blockdev.ApplyTo(t.b, &blockdev.Mutation{Op: blockdev.OpWriteZeroes, Offset: int64(f.Offset), Length: int64(f.Length), NoHole: f.NoHole})
		durable = f.FUA
	case *wire.Flush:
		durable = true
	case *wire.MirrorData:
		_, err = t.b.WriteAt(f.Data, int64(f.Offset))
		t.tst.appliedBytes.Add(int64(len(f.Data)))
	case *wire.MirrorHole:
		err = blockdev.ApplyTo(t.b, &blockdev.Mutation{Op: blockdev.OpTrim, Offset: int64(f.Offset), Length: int64(f.Length)})
	case *wire.MirrorState:
		if f.Phase == wire.PhaseBegin && t.cfg.BeforeMirror != nil {
			t.mu.Lock()
			consistent, applied := t.state == wire.StateConsistent, t.applied
			t.mu.Unlock()
			if consistent {
				if err := t.cfg.BeforeMirror(applied, f.Purpose); err != nil {
					return nil, fmt.Errorf("before %v: %w", f.Purpose, err)
				}
			}
		}
		if f.Phase == wire.PhaseBegin {
			t.mu.Lock()
			t.state = wire.StateInconsistent
			t.mu.Unlock()
			persist = true
			t.log.Info("mirror started: target data inconsistent until it ends", "purpose", f.Purpose, "bytes", f.Total)
		} else {
			durable = true
		}
	case *wire.SumRequest:
		var sums []wire.Sum
		sums, err = chunkSums(t.b, t.ext, int64(f.Offset), int64(f.ChunkSize), int(f.Count), t.size)
		reply = &wire.SumReply{Seq: f.Seq, Offset: f.Offset, ChunkSize: f.ChunkSize, Sums: sums}
	}
	if err == nil && durable {
		err = t.b.Sync()
	}
	if err != nil {
		return nil, fmt.Errorf("apply %v %d: %w", f.Type(), f.Sequence(), err)
	}
	// Persist before publishing the new applied sequence, so that the
	// ack of a barrier or of the end of a mirror follows its record.
	t.mu.Lock()
	if durable {
		t.durable = f.Sequence()
	}
	if ms, ok := f.(*wire.MirrorState); ok && ms.Phase == wire.PhaseEnd {
		t.state = wire.StateConsistent
		persist = true
		t.log.Info("mirror ended: target data consistent", "purpose", ms.Purpose)
	}
	t.mu.Unlock()
	if persist || durable {
		if err := t.persist(persist); err != nil {
			return nil, err
		}
	}
	t.mu.Lock()
	t.applied = f.Sequence()
	switch f.(type) {
	case *wire.Write, *wire.Trim, *wire.Zeroes, *wire.MirrorData, *wire.MirrorHole:
		t.lastData = f.Sequence()
	}
	t.mu.Unlock()
	return reply, nil
}
