package heartbeat

import (
	"net/netip"
	"sync"
	"time"
)

// userspaceProbe is the fallback: heartbeats read from a UDP socket bound
// to every address, timestamped by the kernel on arrival (SO_TIMESTAMPNS),
// verified and counted with probe.c's rules (Stats.observe).
type userspaceProbe struct {
	mu    sync.Mutex
	sock  *hbSocket
	peers map[Peer]*userspacePeer
}

type userspacePeer struct {
	key   Key
	stats Stats
}

func openUserspace(cfg Config) (*userspaceProbe, error) {
	s, err := listenHeartbeats(cfg.Port)
	if err != nil {
		return nil, err
	}
	return &userspaceProbe{sock: s, peers: map[Peer]*userspacePeer{}}, nil
}

func (p *userspaceProbe) Mode() Mode { return ModeUserspace }

func (p *userspaceProbe) Watch(pr Peer, key Key) error {
	pr.Addr = pr.Addr.Unmap()
	p.mu.Lock()
	defer p.mu.Unlock()
	if err := p.drainLocked(); err != nil { // queued heartbeats are judged by the old key
		return err
	}
	if e, ok := p.peers[pr]; ok {
		e.key = key
		return nil
	}
	p.peers[pr] = &userspacePeer{key: key}
	return nil
}

func (p *userspaceProbe) Unwatch(pr Peer) error {
	pr.Addr = pr.Addr.Unmap()
	p.mu.Lock()
	defer p.mu.Unlock()
	if _, ok := p.peers[pr]; !ok {
		return ErrUnknownPeer
	}
	delete(p.peers, pr)
	return nil
}

func (p *userspaceProbe) Stats(pr Peer) (Stats, error) {
	pr.Addr = pr.Addr.Unmap()
	p.mu.Lock()
	defer p.mu.Unlock()
	if err := p.drainLocked(); err != nil {
		return Stats{}, err
	}
	e, ok := p.peers[pr]
	if !ok {
		return Stats{}, ErrUnknownPeer
	}
	return e.stats, nil
}

// drainLocked applies every queued heartbeat.
func (p *userspaceProbe) drainLocked() error {
	return p.sock.drain(func(src netip.Addr, b []byte, at time.Duration) { p.receiveLocked(src, b, at) })
}

// receiveLocked applies one datagram from src, with probe.c's rules:
// only a well-formed heartbeat for a watched (src, job) is looked at; a
// wrong MAC counts as such, a good one is counted if it is new.
func (p *userspaceProbe) receiveLocked(src netip.Addr, b []byte, at time.Duration) {
	var pkt Packet
	if pkt.UnmarshalBinary(b) != nil {
		return
	}
	e, ok := p.peers[Peer{Addr: src.Unmap(), Job: pkt.Job}]
	if !ok {
		return
	}
	if !pkt.Verify(e.key) {
		e.stats.BadMAC++
		return
	}
	e.stats.observe(&pkt, at)
}

func (p *userspaceProbe) Close() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.sock.Close()
}
