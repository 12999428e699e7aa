package ebpf

import (
	"errors"
	"net/netip"
	"sync"
	"time"
)

// userspaceProbe is the fallback: heartbeats read from a UDP socket,
// timestamped by the kernel on arrival (SO_TIMESTAMPNS). It cannot see
// replication traffic.
type userspaceProbe struct {
	mu    sync.Mutex
	sock  *hbSocket
	peers map[[16]byte]*userspacePeer
}

type userspacePeer struct {
	token uint64
	stats PeerStats
}

func openUserspace(cfg Config) (*userspaceProbe, error) {
	s, err := listenHeartbeats(cfg.ListenAddr, cfg.HeartbeatPort)
	if err != nil {
		return nil, err
	}
	return &userspaceProbe{sock: s, peers: map[[16]byte]*userspacePeer{}}, nil
}

func (p *userspaceProbe) Mode() Mode { return ModeUserspace }

func (p *userspaceProbe) SetPeer(addr netip.Addr, token uint64) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if err := p.drainLocked(); err != nil { // old heartbeats are judged by the old token
		return err
	}
	k := peerKey(addr)
	if pp, ok := p.peers[k]; ok {
		pp.token = token
		return nil
	}
	p.peers[k] = &userspacePeer{token: token}
	return nil
}

func (p *userspaceProbe) RemovePeer(addr netip.Addr) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	k := peerKey(addr)
	if _, ok := p.peers[k]; !ok {
		return ErrUnknownPeer
	}
	delete(p.peers, k)
	return nil
}

func (p *userspaceProbe) Stats(addr netip.Addr) (PeerStats, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if err := p.drainLocked(); err != nil {
		return PeerStats{}, err
	}
	pp, ok := p.peers[peerKey(addr)]
	if !ok {
		return PeerStats{}, ErrUnknownPeer
	}
	return pp.stats, nil
}

// drainLocked applies every queued heartbeat, with the rules of probe.c.
func (p *userspaceProbe) drainLocked() error {
	return p.sock.drain(func(src netip.Addr, b []byte, at time.Duration) {
		pp, ok := p.peers[peerKey(src)]
		if !ok {
			return
		}
		var h Heartbeat
		if h.UnmarshalBinary(b) != nil {
			return
		}
		pp.stats.observe(h, pp.token, at)
	})
}

// observe applies one well-formed heartbeat from the peer (probe.c's rules).
func (s *PeerStats) observe(h Heartbeat, token uint64, at time.Duration) {
	if h.Token != token {
		s.BadToken++
		return
	}
	if s.Heartbeats > 0 && h.Seq > s.LastSeq+1 {
		s.Gaps += h.Seq - s.LastSeq - 1
	}
	if s.Heartbeats == 0 || h.Seq > s.LastSeq {
		s.LastSeq = h.Seq
	}
	s.LastHeartbeat = max(s.LastHeartbeat, at)
	s.Heartbeats++
}

func (p *userspaceProbe) Close() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	return errors.Join(p.sock.Close())
}
