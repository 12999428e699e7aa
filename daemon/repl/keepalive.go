package repl

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/doppelha/doppel/daemon/repl/wire"
)

// A replication session has its own failure detection, bounded by the
// job's monitor settings (interval × missed), so that a blackholed link is
// noticed in seconds rather than when TCP gives up (minutes):
//
//   - each side sends a wire.Keepalive when it has written nothing for a
//     keepalive tick (protocol version 2; a goroutine of its own, so that a
//     target busy applying a long fsync still proves itself alive);
//   - each side declares the session down when nothing at all (a frame, an
//     acknowledgement, a keepalive) arrived from the peer for Timeout (to
//     within Timeout/16): the read deadline of the session, refreshed as
//     frames arrive;
//   - TCP_USER_TIMEOUT = Timeout: data the peer's TCP has not acknowledged
//     for that long aborts the connection, also with a version 1 peer.

// Session liveness defaults: the monitor's 250 ms × 8.
const (
	DefaultKeepalive = 250 * time.Millisecond
	DefaultTimeout   = 2 * time.Second
)

// ErrSilent reports a session whose peer sent nothing for the timeout.
var ErrSilent = errors.New("replication peer silent")

// Liveness configures a session's keepalive and silence timeout, and
// reports the traffic read from it.
type Liveness struct {
	// Interval is how long a side may send nothing before it sends a
	// keepalive (0: DefaultKeepalive). It is capped at Timeout/4.
	Interval time.Duration
	// Timeout is how long a peer may send nothing before the session is
	// dropped, and the connection's TCP_USER_TIMEOUT (0: DefaultTimeout).
	Timeout time.Duration
	// OnRecv, if set, is called after every frame read from an
	// established, authenticated session (acknowledgements and keepalives
	// included): the replication path's proof that the peer is alive.
	OnRecv func()
}

func (l Liveness) withDefaults() Liveness {
	if l.Interval <= 0 {
		l.Interval = DefaultKeepalive
	}
	if l.Timeout <= 0 {
		l.Timeout = DefaultTimeout
	}
	l.Interval = min(l.Interval, l.Timeout/4)
	return l
}

func (l Liveness) recv() {
	if l.OnRecv != nil {
		l.OnRecv()
	}
}

// sessionOut is a session's outgoing stream, shared by the side's frames
// and its keepalive loop. Writers hold mu for a whole frame (and for the
// flush), so frames never interleave; each write bumps n.
type sessionOut struct {
	mu sync.Mutex
	bw *bufio.Writer
	n  atomic.Uint64
}

// keepalive sends a wire.Keepalive on out every tick during which nothing
// else was written, until ctx is done (nil) or a write fails.
func keepalive(ctx context.Context, out *sessionOut, tick time.Duration) error {
	t := time.NewTicker(tick)
	defer t.Stop()
	last := out.n.Load()
	var seq uint64
	var buf []byte
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
		if n := out.n.Load(); n != last {
			last = n
			continue
		}
		seq++
		buf, _ = wire.Append(buf[:0], &wire.Keepalive{Seq: seq}, nil)
		out.mu.Lock()
		_, err := out.bw.Write(buf)
		if err == nil {
			err = out.bw.Flush()
		}
		out.mu.Unlock()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("send keepalive: %w", err)
		}
		last = out.n.Add(1)
	}
}

// readDeadline keeps a connection's read deadline at most timeout ahead of
// the last read, and at least 15/16 of it (SetReadDeadline is not free: it
// is called at most every timeout/16 of reading, not for every frame).
type readDeadline struct {
	conn    net.Conn
	timeout time.Duration // 0: no deadline
	until   time.Time
}

// refresh moves the deadline before a read. The caller checks its context
// afterwards: a cancellation that set the deadline to now must not be
// overwritten unnoticed.
func (d *readDeadline) refresh() {
	if d.timeout <= 0 {
		return
	}
	now := time.Now()
	if d.until.Sub(now) > d.timeout-d.timeout/16 {
		return
	}
	d.until = now.Add(d.timeout)
	d.conn.SetReadDeadline(d.until)
}

// silent maps a read error caused by the deadline to ErrSilent.
func (d *readDeadline) silent(err error, peer string) error {
	var ne net.Error
	if d.timeout > 0 && errors.As(err, &ne) && ne.Timeout() {
		return fmt.Errorf("%w: nothing from the %s for %v (keepalive timeout)", ErrSilent, peer, d.timeout)
	}
	return err
}

// setUserTimeout sets TCP_USER_TIMEOUT on the TCP connection under c (TLS
// and prefix wrappers are unwrapped through their NetConn method).
func setUserTimeout(c net.Conn, d time.Duration) error {
	for range 8 {
		switch x := c.(type) {
		case *net.TCPConn:
			raw, err := x.SyscallConn()
			if err != nil {
				return err
			}
			var serr error
			err = raw.Control(func(fd uintptr) {
				serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_TCP, unix.TCP_USER_TIMEOUT, int(d.Milliseconds()))
			})
			if err == nil {
				err = serr
			}
			if err != nil {
				return fmt.Errorf("set TCP_USER_TIMEOUT: %w", err)
			}
			return nil
		case interface{ NetConn() net.Conn }:
			c = x.NetConn()
		default:
			return fmt.Errorf("set TCP_USER_TIMEOUT: %T is not a TCP connection", c)
		}
	}
	return errors.New("set TCP_USER_TIMEOUT: connection wrapped too deep")
}
