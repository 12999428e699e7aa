package heartbeat

import (
	"errors"
	"fmt"
	"net/netip"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// hbSocket is a non-blocking UDP socket on the heartbeat port with kernel
// receive timestamps (SO_TIMESTAMPNS). It is never read by a goroutine of
// its own: drain reads what is queued, so a caller that drains before
// looking at the counters sees every heartbeat that arrived, even after the
// process was stopped for a while.
type hbSocket struct {
	fd  int
	buf []byte
	oob []byte
}

// listenHeartbeats binds port on every address, IPv4 and IPv6: heartbeats
// arrive on every path's address (binding only one, say the replication
// address, would leave the other paths silent).
func listenHeartbeats(port uint16) (*hbSocket, error) {
	fd, err := unix.Socket(unix.AF_INET6, unix.SOCK_DGRAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, unix.IPPROTO_UDP)
	if err != nil {
		return nil, fmt.Errorf("open heartbeat socket: %w", err)
	}
	s := &hbSocket{fd: fd, buf: make([]byte, 2048), oob: make([]byte, unix.CmsgSpace(16)*2)}
	for _, o := range []struct{ level, opt, v int }{
		{unix.IPPROTO_IPV6, unix.IPV6_V6ONLY, 0},
		{unix.SOL_SOCKET, unix.SO_TIMESTAMPNS, 1},
		{unix.SOL_SOCKET, unix.SO_RCVBUF, 1 << 20},
		{unix.SOL_SOCKET, unix.SO_REUSEADDR, 1},
	} {
		if err := unix.SetsockoptInt(fd, o.level, o.opt, o.v); err != nil {
			unix.Close(fd)
			return nil, fmt.Errorf("set heartbeat socket option %d: %w", o.opt, err)
		}
	}
	sa := &unix.SockaddrInet6{Port: int(port)}
	if err := unix.Bind(fd, sa); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("bind heartbeat socket to port %d: %w", port, err)
	}
	return s, nil
}

// drain reads every queued datagram and calls f with its source address,
// payload (valid during the call) and kernel arrival time converted to
// CLOCK_MONOTONIC. SO_TIMESTAMPNS stamps with CLOCK_REALTIME; each packet
// is converted with the realtime-monotonic offset read right after it was
// received (exact unless the wall clock is stepped between arrival and
// read), and never placed after that read.
func (s *hbSocket) drain(f func(src netip.Addr, payload []byte, at time.Duration)) error {
	for {
		n, oobn, _, from, err := unix.Recvmsg(s.fd, s.buf, s.oob, unix.MSG_DONTWAIT)
		if errors.Is(err, unix.EAGAIN) {
			return nil
		}
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return fmt.Errorf("read heartbeat socket: %w", err)
		}
		var rt, mono unix.Timespec
		_ = unix.ClockGettime(unix.CLOCK_REALTIME, &rt)
		_ = unix.ClockGettime(unix.CLOCK_MONOTONIC, &mono)
		sa, ok := from.(*unix.SockaddrInet6)
		if !ok {
			continue
		}
		now := time.Duration(mono.Nano())
		at := now
		if msgs, err := unix.ParseSocketControlMessage(s.oob[:oobn]); err == nil {
			for _, m := range msgs {
				if m.Header.Level == unix.SOL_SOCKET && m.Header.Type == unix.SCM_TIMESTAMPNS && len(m.Data) >= 16 {
					ts := *(*unix.Timespec)(unsafe.Pointer(&m.Data[0])) // host layout, aligned by the cmsg format
					at = min(time.Duration(ts.Nano()-rt.Nano())+now, now)
				}
			}
		}
		f(netip.AddrFrom16(sa.Addr).Unmap(), s.buf[:n], at)
	}
}

func (s *hbSocket) Close() error { return unix.Close(s.fd) }
