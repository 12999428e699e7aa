package heartbeat

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"time"
)

// Dest is one path a Sender sends on: the peer's address and port, and
// the local address the heartbeats leave from (the peer watches this host
// by that address; invalid: whatever the route chooses).
type Dest struct {
	Local  netip.Addr
	Remote netip.AddrPort
}

// SenderConfig configures a Sender.
type SenderConfig struct {
	Job JobID
	// Key is this side's sending key for the job (DeriveKey with this
	// host as the sender).
	Key Key
	// Incarnation is this sender's, from 1; it must grow at every start of
	// the agent (the receiver counts only heartbeats above the last
	// (incarnation, sequence) it counted).
	Incarnation uint64
	// Epoch is the epoch announced until SetEpoch changes it.
	Epoch uint64
	Dests []Dest
}

// Sender sends a job's heartbeats to the peer on every path. Its sockets
// are unconnected, so an ICMP error from one path never stops the others.
type Sender struct {
	dsts  []Dest
	conns map[netip.Addr]*net.UDPConn // by local address (invalid: unbound)

	mu  sync.Mutex
	pkt Packet // Seq is the last sequence number sent
	key Key
	// sent counts heartbeats written, errs failed writes (a cut link
	// gives ENETUNREACH or similar; that is not fatal).
	sent, errs uint64
}

// NewSender opens the sockets for cfg's destinations: one per distinct
// local address, bound to it. Sequence numbers start at 1.
func NewSender(cfg SenderConfig) (*Sender, error) {
	if len(cfg.Dests) == 0 {
		return nil, errors.New("heartbeat sender: no destination")
	}
	if cfg.Incarnation == 0 {
		return nil, errors.New("heartbeat sender: incarnation 0")
	}
	s := &Sender{dsts: cfg.Dests, conns: map[netip.Addr]*net.UDPConn{}, key: cfg.Key,
		pkt: Packet{Job: cfg.Job, Incarnation: cfg.Incarnation, Epoch: cfg.Epoch}}
	for _, d := range cfg.Dests {
		local := d.Local.Unmap()
		if _, ok := s.conns[local]; ok {
			continue
		}
		var la *net.UDPAddr
		if local.IsValid() {
			la = net.UDPAddrFromAddrPort(netip.AddrPortFrom(local, 0))
		}
		c, err := net.ListenUDP("udp", la)
		if err != nil {
			s.Close()
			return nil, fmt.Errorf("open heartbeat sender on %v: %w", la, err)
		}
		s.conns[local] = c
	}
	return s, nil
}

// SetEpoch changes the epoch of the following heartbeats.
func (s *Sender) SetEpoch(e uint64) {
	s.mu.Lock()
	s.pkt.Epoch = e
	s.mu.Unlock()
}

// Send sends the next heartbeat (one sequence number) to every destination.
func (s *Sender) Send() error {
	s.mu.Lock()
	s.pkt.Seq++
	s.pkt.Sign(s.key)
	b, _ := s.pkt.MarshalBinary()
	s.mu.Unlock()
	var errs []error
	for _, d := range s.dsts {
		_, err := s.conns[d.Local.Unmap()].WriteToUDPAddrPort(b, d.Remote)
		s.mu.Lock()
		if err != nil {
			s.errs++
			errs = append(errs, fmt.Errorf("send heartbeat to %s: %w", d.Remote, err))
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
	return s.pkt.Seq, s.sent, s.errs
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

// Close closes the sockets.
func (s *Sender) Close() error {
	var errs []error
	for _, c := range s.conns {
		errs = append(errs, c.Close())
	}
	return errors.Join(errs...)
}
