package repl

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"runtime"
	"strings"
	"time"

	"golang.org/x/time/rate"

	"github.com/doppelha/doppel/daemon/repl/wire"
	"github.com/doppelha/doppel/daemon/tlspin"
)

// handshakeTimeout bounds the TLS handshake and the Hello/Welcome exchange.
const handshakeTimeout = 15 * time.Second

// FatalError is a session failure that reconnecting cannot fix (the peer
// refused us, or the stream cannot be resumed). Run returns it.
type FatalError struct{ Err error }

func (e *FatalError) Error() string { return e.Err.Error() }
func (e *FatalError) Unwrap() error { return e.Err }

func fatalf(format string, a ...any) error { return &FatalError{Err: fmt.Errorf(format, a...)} }

// Run connects to the target and streams the queue to it until ctx is
// done, reconnecting with backoff after a lost connection (the target
// resumes from its applied sequence). It returns nil when ctx is done and
// a *FatalError when the target refuses the source or the stream cannot be
// resumed; waiters then fail with that error.
//
// All connection handling of the source lives here and in session.
func (s *Stream) Run(ctx context.Context) error {
	if s.cfg.Dial == nil {
		return errors.New("replication source: no Dial")
	}
	backoff := 100 * time.Millisecond
	for {
		conn, err := s.cfg.Dial(ctx)
		if errors.Is(err, tlspin.ErrNotPinned) {
			err = &FatalError{Err: fmt.Errorf("target refused: %w", err)}
		}
		if err == nil {
			start := time.Now()
			err = s.session(ctx, conn)
			if time.Since(start) > 10*time.Second {
				backoff = 100 * time.Millisecond
			}
		}
		if ctx.Err() != nil {
			return nil
		}
		var fatal *FatalError
		if errors.As(err, &fatal) {
			s.log.Error("replication stopped", "err", err)
			s.fail(err)
			return err
		}
		s.log.Warn("replication link down; reconnecting", "err", err, "in", backoff)
		select {
		case <-time.After(backoff):
		case <-ctx.Done():
			return nil
		}
		backoff = min(backoff*2, 5*time.Second)
	}
}

// session runs one connection: handshake, then a sender and a receiver
// until either fails.
func (s *Stream) session(ctx context.Context, conn net.Conn) error {
	defer conn.Close()
	peer := conn.RemoteAddr().String()
	live := s.cfg.Liveness
	if err := setUserTimeout(conn, live.Timeout); err != nil {
		s.log.Debug("replication link without TCP_USER_TIMEOUT", "err", err)
	}
	conn.SetDeadline(time.Now().Add(handshakeTimeout))
	if tc, ok := conn.(*tls.Conn); ok {
		if err := tc.HandshakeContext(ctx); err != nil {
			return fatalf("TLS handshake with target %s: %w", peer, err)
		}
	}
	hello := &wire.Hello{MinVersion: wire.MinVersion, MaxVersion: wire.MaxVersion, Mode: s.cfg.Mode,
		StreamID: s.streamID, VolumeSize: uint64(s.size), ChunkSize: uint32(s.chunk)}
	s.ackMu.Lock()
	hello.BaseSeq = s.acked
	s.ackMu.Unlock()
	b, err := wire.Encode(hello)
	if err != nil {
		return err
	}
	if _, err := conn.Write(b); err != nil {
		return fmt.Errorf("send hello to %s: %w", peer, err)
	}
	r := wire.NewReader(conn)
	f, err := r.Read()
	if err != nil {
		if strings.Contains(err.Error(), "remote error: tls:") {
			return fatalf("target %s refused this source's certificate (is its fingerprint pinned there?): %w", peer, err)
		}
		if errors.Is(err, wire.ErrMalformed) {
			return fatalf("target %s: bad welcome: %w", peer, err)
		}
		return fmt.Errorf("read welcome from %s: %w", peer, err)
	}
	var w *wire.Welcome
	switch f := f.(type) {
	case *wire.Welcome:
		w = f
	case *wire.Error:
		return fatalf("target %s refused the connection: %s", peer, f.Message)
	default:
		return fatalf("target %s: expected welcome, got %v", peer, f.Type())
	}
	if w.Version < wire.MinVersion || w.Version > wire.MaxVersion {
		return fatalf("target %s chose protocol version %d, outside %d-%d", peer, w.Version, wire.MinVersion, wire.MaxVersion)
	}
	if w.VolumeSize != uint64(s.size) {
		return fatalf("target %s volume is %d bytes, source is %d", peer, w.VolumeSize, s.size)
	}
	from := hello.BaseSeq
	if w.StreamID == s.streamID {
		from = w.Applied
	} else if hello.BaseSeq > 0 {
		return fatalf("target %s has no record of this replication stream (it was replaced or lost its state): restart the source with a mirror", peer)
	}
	if from < hello.BaseSeq {
		return fatalf("target %s applied up to %d but the source already released up to %d (target lost acknowledged writes): a resync is needed", peer, from, hello.BaseSeq)
	}
	conn.SetDeadline(time.Time{})
	s.onAck(from, 0)
	s.st.connects.Add(1)
	s.setConnected(true, w.State)
	defer s.setConnected(false, 0)
	// A version 2 target sends keepalives when idle: its silence for
	// the timeout is a dead session.
	kept := w.Version >= wire.KeepaliveVersion
	dl := &readDeadline{conn: conn}
	if kept {
		dl.timeout = live.Timeout
	}
	s.log.Info("replicating", "target", peer, "mode", s.cfg.Mode, "version", w.Version, "resume_after", from,
		"target_state", stateName(w.State), "compression", s.cfg.Codec.String(), "keepalive_timeout", dl.timeout)

	sctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	go func() {
		cancel(s.receive(sctx, r, dl))
	}()
	unblocked := make(chan struct{})
	go func() {
		<-sctx.Done()
		conn.SetDeadline(time.Now()) // unblock the sender's and receiver's I/O
		close(unblocked)
	}()
	out := &sessionOut{bw: bufio.NewWriterSize(conn, 1<<20)}
	kaDone := make(chan struct{})
	go func() {
		defer close(kaDone)
		if kept {
			if err := keepalive(sctx, out, live.Interval); err != nil {
				cancel(err)
			}
		}
	}()
	err = s.send(sctx, conn, out, from)
	cancel(err)
	<-unblocked
	<-kaDone
	if ctx.Err() != nil { // clean stop: tell the target
		if b, e := wire.Encode(&wire.Bye{Reason: "source stopping"}); e == nil {
			conn.SetWriteDeadline(time.Now().Add(time.Second))
			conn.Write(b)
		}
	}
	if cause := context.Cause(sctx); cause != nil && !errors.Is(cause, context.Canceled) {
		err = cause
	}
	s.failSums()
	return err
}

// send writes queued frames after seq `from` until ctx is done.
func (s *Stream) send(ctx context.Context, conn net.Conn, out *sessionOut, from uint64) error {
	bw := out.bw
	var lim *rate.Limiter
	if s.cfg.RateLimit > 0 {
		lim = rate.NewLimiter(rate.Limit(s.cfg.RateLimit), burstFor(s.cfg.RateLimit))
	}
	buf := make([]byte, 0, 64<<10)
	// In async mode nobody waits for the target, so a small batch lingers
	// (once, asyncLinger) for more frames before it goes out: fewer, larger
	// socket writes, target wake-ups and acknowledgements per write, for at
	// most asyncLinger more replication lag.
	linger := s.cfg.Mode == wire.ModeAsync
	var batch int64 // bytes written since the last flush
	lingered := false
	for {
		ents, err := s.queue.Read(ctx, from, 512)
		if err != nil {
			if errors.Is(err, ErrGone) {
				return &FatalError{Err: fmt.Errorf("resume replication after %d: %w", from, err)}
			}
			return err
		}
		for _, e := range ents {
			var tail []byte
			buf, tail, err = wire.AppendParts(buf[:0], e.Frame, s.cfg.Codec)
			if err != nil {
				return fmt.Errorf("encode frame %d: %w", e.Seq, err)
			}
			size := len(buf) + len(tail)
			if lim != nil {
				for n := size; n > 0; {
					k := min(n, lim.Burst())
					if err := lim.WaitN(ctx, k); err != nil {
						return err
					}
					n -= k
				}
			}
			if err := s.writeFrame(conn, out, buf, tail); err != nil {
				return fmt.Errorf("send frame %d: %w", e.Seq, err)
			}
			batch += int64(size)
			k, payload := frameKind(e.Frame)
			s.st.sentBytes[k].Add(int64(size))
			s.st.payloadBytes[k].Add(payload)
			s.st.sentFrames.Add(1)
			from = e.Seq
		}
		if len(ents) < 64 {
			// Let writers that are about to queue a frame do so, and send
			// them in the same segment (cheap batching under load).
			runtime.Gosched()
			if more, _ := s.queue.Read(noWait, from, 1); len(more) > 0 {
				continue
			}
			if linger && !lingered && batch < lingerBytes {
				lingered = true
				select {
				case <-time.After(asyncLinger):
				case <-ctx.Done():
					return ctx.Err()
				}
				if more, _ := s.queue.Read(noWait, from, 1); len(more) > 0 {
					continue
				}
			}
		}
		out.mu.Lock()
		err = bw.Flush()
		out.mu.Unlock()
		if err != nil {
			return fmt.Errorf("send: %w", err)
		}
		batch, lingered = 0, false
		s.st.sentSeq.Store(from)
	}
}

// writeFrame writes one encoded frame (buf, then its payload tail) while
// holding the session's writer, so that a keepalive never splits it.
func (s *Stream) writeFrame(conn net.Conn, out *sessionOut, buf, tail []byte) error {
	out.mu.Lock()
	defer out.mu.Unlock()
	out.n.Add(1)
	if len(tail) >= 32<<10 {
		// A large payload goes straight from the frame to the socket
		// (writev of header and payload), not through the buffer.
		if err := out.bw.Flush(); err != nil {
			return err
		}
		bufs := net.Buffers{buf, tail}
		_, err := bufs.WriteTo(conn)
		return err
	}
	if _, err := out.bw.Write(buf); err != nil {
		return err
	}
	_, err := out.bw.Write(tail)
	return err
}

// Async batching: a batch below lingerBytes waits once, asyncLinger, for
// more frames before it is flushed.
const (
	asyncLinger = 500 * time.Microsecond
	lingerBytes = 256 << 10
)

// noWait is a done context: a Read with it returns only what is queued.
var noWait = func() context.Context {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	return ctx
}()

// burstFor is the limiter burst: a tenth of a second of traffic, at least
// 64 KiB, so the limit holds over short intervals too.
func burstFor(limit int64) int { return int(max(limit/10, 64<<10)) }

// frameKind classifies a frame for the metrics.
func frameKind(f wire.Sequenced) (kind int, payload int64) {
	switch f := f.(type) {
	case *wire.Write:
		return KindWrite, int64(len(f.Data))
	case *wire.MirrorData:
		return purposeKind(f.Purpose), int64(len(f.Data))
	case *wire.MirrorHole:
		return purposeKind(f.Purpose), 0
	case *wire.MirrorState:
		return purposeKind(f.Purpose), 0
	case *wire.SumRequest:
		return purposeKind(f.Purpose), 0
	}
	return KindWrite, 0
}

func purposeKind(p wire.Purpose) int {
	switch p {
	case wire.PurposeResync:
		return KindResync
	case wire.PurposeVerify:
		return KindVerify
	}
	return KindMirror
}

// receive reads the target's frames until the connection fails, or
// nothing arrived for the keepalive timeout (dl).
func (s *Stream) receive(ctx context.Context, r *wire.Reader, dl *readDeadline) error {
	for {
		dl.refresh()
		if ctx.Err() != nil {
			return nil
		}
		n := r.N
		f, err := r.Read()
		s.st.recvBytes.Add(r.N - n)
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			if errors.Is(err, io.EOF) {
				return errors.New("target closed the connection")
			}
			if err = dl.silent(err, "target"); errors.Is(err, ErrSilent) {
				return err
			}
			if errors.Is(err, wire.ErrMalformed) {
				return fatalf("target sent a malformed frame: %w", err)
			}
			return fmt.Errorf("receive: %w", err)
		}
		s.cfg.Liveness.recv()
		switch f := f.(type) {
		case *wire.Ack:
			s.onAck(f.Applied, f.Durable)
		case *wire.SumReply:
			box, ok := s.sums.Load(f.Seq)
			if !ok {
				if f.Seq > s.LastSeq() {
					return fatalf("target sent a checksum reply for %d, which was never requested", f.Seq)
				}
				continue // a request abandoned after a lost connection, replayed
			}
			select {
			case box.(chan *wire.SumReply) <- f:
			default: // the requester was already failed by a lost session
			}
		case *wire.Error:
			if f.Code == wire.CodeIO {
				return fatalf("target failed: %s", f.Message)
			}
			return fmt.Errorf("target error %d: %s", f.Code, f.Message)
		case *wire.Bye:
			return fmt.Errorf("target said bye: %s", f.Reason)
		case *wire.Keepalive:
		default:
			return fatalf("target sent an unexpected %v frame", f.Type())
		}
	}
}

// sumBox is the mailbox of the checksum reply for seq (created when the
// request was sequenced).
func (s *Stream) sumBox(seq uint64) chan *wire.SumReply {
	ch, _ := s.sums.LoadOrStore(seq, make(chan *wire.SumReply, 1))
	return ch.(chan *wire.SumReply)
}

// failSums wakes every pending checksum request after a lost session.
func (s *Stream) failSums() {
	s.sums.Range(func(k, v any) bool {
		select {
		case v.(chan *wire.SumReply) <- nil:
		default:
		}
		return true
	})
}
