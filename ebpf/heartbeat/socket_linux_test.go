package heartbeat

import (
	"net"
	"net/netip"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestSocketArrivalTimestamps: the fallback socket reports when each
// datagram arrived (SO_TIMESTAMPNS, converted to CLOCK_MONOTONIC), not when
// it was read: a monitor that reads late must still see fresh arrivals.
func TestSocketArrivalTimestamps(t *testing.T) {
	s, err := listenHeartbeats(0)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	sa, err := unix.Getsockname(s.fd)
	if err != nil {
		t.Fatal(err)
	}
	c, err := net.DialUDP("udp", nil, &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: sa.(*unix.SockaddrInet6).Port})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	// The kernel turns receive timestamps on with a static key it may flip
	// from a work queue (net_enable_timestamp): a datagram arriving right
	// after the socket was set up can be stamped only when read. One
	// warm-up datagram, read and dropped, waits that out (a probe's socket
	// lives for the agent's life).
	if _, err := c.Write([]byte{0xff}); err != nil {
		t.Fatal(err)
	}
	time.Sleep(50 * time.Millisecond)
	s.drain(func(netip.Addr, []byte, time.Duration) {})
	type window struct{ from, to time.Duration }
	var sent []window
	for i := range 3 {
		from := Now()
		if _, err := c.Write([]byte{byte(i)}); err != nil {
			t.Fatal(err)
		}
		sent = append(sent, window{from, Now()})
		time.Sleep(50 * time.Millisecond)
	}
	time.Sleep(200 * time.Millisecond) // the reader is late
	var got []time.Duration
	if err := s.drain(func(src netip.Addr, b []byte, at time.Duration) {
		if src != netip.MustParseAddr("127.0.0.1") || len(b) != 1 || int(b[0]) != len(got) {
			t.Errorf("datagram %d from %s: %x", len(got), src, b)
		}
		got = append(got, at)
	}); err != nil {
		t.Fatal(err)
	}
	if len(got) != len(sent) {
		t.Fatalf("read %d datagrams, sent %d", len(got), len(sent))
	}
	for i, w := range sent {
		// Loopback delivers within the send call; allow 5 ms for a
		// realtime/monotonic conversion error.
		if got[i] < w.from-5*time.Millisecond || got[i] > w.to+5*time.Millisecond {
			t.Errorf("datagram %d: arrival %v, sent within [%v, %v] (read at about %v)", i, got[i], w.from, w.to, Now())
		}
	}
}
