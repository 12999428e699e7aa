package ebpf

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"time"
)

// Sender sends heartbeats to the peer on every monitored path. Its socket
// is unconnected, so an ICMP error from one path never stops the others.
type Sender struct {
	conn *net.UDPConn
	dsts []netip.AddrPort

	mu sync.Mutex
	hb Heartbeat // Seq is the last sequence number sent
	// Sent counts heartbeats written, Errors failed writes (a cut link
	// gives ENETUNREACH or similar; that is not fatal).
	sent, errs uint64
}

// NewSender opens a UDP socket for heartbeats to dsts, carrying hb's token,
// generation and job; sequence numbers start at hb.Seq+1.
func NewSender(dsts []netip.AddrPort, hb Heartbeat) (*Sender, error) {
	if len(dsts) == 0 {
		return nil, errors.New("heartbeat sender: no destination")
	}
	c, err := net.ListenUDP("udp", nil)
	if err != nil {
		return nil, fmt.Errorf("open heartbeat sender: %w", err)
	}
	return &Sender{conn: c, dsts: dsts, hb: hb}, nil
}

// SetToken changes the token of the following heartbeats (new connection).
func (s *Sender) SetToken(token uint64) {
	s.mu.Lock()
	s.hb.Token = token
	s.mu.Unlock()
}

// SetGeneration changes the generation of the following heartbeats.
func (s *Sender) SetGeneration(g uint64) {
	s.mu.Lock()
	s.hb.Generation = g
	s.mu.Unlock()
}

// Send sends the next heartbeat (one sequence number) to every destination.
func (s *Sender) Send() error {
	s.mu.Lock()
	s.hb.Seq++
	b, _ := s.hb.MarshalBinary()
	s.mu.Unlock()
	var errs []error
	for _, d := range s.dsts {
		_, err := s.conn.WriteToUDPAddrPort(b, d)
		s.mu.Lock()
		if err != nil {
			s.errs++
			errs = append(errs, fmt.Errorf("send heartbeat to %s: %w", d, err))
		} else {
			s.sent++
		}
		s.mu.Unlock()
	}
	return errors.Join(errs...)
}

// Counts returns the sequence number last sent and how many writes
// succeeded and failed.
func (s *Sender) Counts() (seq, sent, failed uint64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.hb.Seq, s.sent, s.errs
}

// Run sends a heartbeat now and then every interval until ctx is done or,
// when count > 0, count heartbeats have been sent, calling onErr (if not nil)
// for failed sends. It returns nil when ctx is cancelled or count is reached.
func (s *Sender) Run(ctx context.Context, interval time.Duration, count int, onErr func(error)) error {
	t := time.NewTicker(interval)
	defer t.Stop()
	for n := 1; ; n++ {
		if err := s.Send(); err != nil && onErr != nil {
			onErr(err)
		}
		if count > 0 && n >= count {
			return nil
		}
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
	}
}

// Close closes the socket.
func (s *Sender) Close() error { return s.conn.Close() }
