package ebpf

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
)

// xdpProbe is the XDP program attached to one or more interfaces; its maps
// hold the configured peers and their stats.
type xdpProbe struct {
	objs  probeObjects
	links []link.Link
	mode  Mode
	sink  *hbSocket // swallows heartbeats (no ICMP port unreachable); may be nil
}

// loadXDP loads the program with the configured ports, without attaching it.
func loadXDP(cfg Config) (*xdpProbe, error) {
	spec, err := loadProbe()
	if err != nil {
		return nil, err
	}
	if err := spec.Variables[probeVarHbPort].Set(cfg.HeartbeatPort); err != nil {
		return nil, fmt.Errorf("set heartbeat port: %w", err)
	}
	if err := spec.Variables[probeVarReplPort].Set(cfg.ReplicationPort); err != nil {
		return nil, fmt.Errorf("set replication port: %w", err)
	}
	p := &xdpProbe{}
	if err := spec.LoadAndAssign(&p.objs, nil); err != nil {
		return nil, fmt.Errorf("load XDP probe: %w", err)
	}
	return p, nil
}

func openXDP(cfg Config) (*xdpProbe, error) {
	p, err := loadXDP(cfg)
	if err != nil {
		return nil, err
	}
	p.mode = ModeXDPDriver
	for _, name := range cfg.Interfaces {
		mode, l, err := attach(p.objs.DoppelProbe, name, cfg.Mode)
		if err != nil {
			return nil, errors.Join(err, p.Close())
		}
		p.links = append(p.links, l)
		if mode == ModeXDPGeneric {
			p.mode = ModeXDPGeneric // report the weakest mode in use
		}
	}
	if s, err := listenHeartbeats(cfg.ListenAddr, cfg.HeartbeatPort); err == nil {
		p.sink = s
	} else {
		cfg.Logger.Debug("no heartbeat sink socket; the kernel may answer heartbeats with ICMP port unreachable", "err", err)
	}
	return p, nil
}

// attach attaches prog to the named interface in driver mode, else (unless
// a mode is forced) in generic mode.
func attach(prog *ebpf.Program, name string, want Mode) (Mode, link.Link, error) {
	ifc, err := net.InterfaceByName(name)
	if err != nil {
		return "", nil, fmt.Errorf("attach XDP probe: %w", err)
	}
	var derr error
	if want != ModeXDPGeneric {
		l, err := link.AttachXDP(link.XDPOptions{Program: prog, Interface: ifc.Index, Flags: link.XDPDriverMode})
		if err == nil {
			return ModeXDPDriver, l, nil
		}
		if want == ModeXDPDriver {
			return "", nil, fmt.Errorf("attach XDP probe to %s in driver mode: %w", name, err)
		}
		derr = err
	}
	l, err := link.AttachXDP(link.XDPOptions{Program: prog, Interface: ifc.Index, Flags: link.XDPGenericMode})
	if err != nil {
		return "", nil, fmt.Errorf("attach XDP probe to %s: %w", name, errors.Join(derr, err))
	}
	return ModeXDPGeneric, l, nil
}

func (p *xdpProbe) Mode() Mode { return p.mode }

func (p *xdpProbe) SetPeer(addr netip.Addr, token uint64) error {
	k := probePeerKey{Addr: peerKey(addr)}
	var tok [8]byte
	binary.BigEndian.PutUint64(tok[:], token) // the map holds the wire bytes
	// Stats first, so that the program never finds a config without stats.
	if err := p.objs.Stats.Update(&k, &probePeerStats{}, ebpf.UpdateNoExist); err != nil && !errors.Is(err, ebpf.ErrKeyExist) {
		return fmt.Errorf("add peer %s: %w", addr, err)
	}
	if err := p.objs.Peers.Update(&k, &probePeerConfig{Token: binary.NativeEndian.Uint64(tok[:])}, ebpf.UpdateAny); err != nil {
		return fmt.Errorf("add peer %s: %w", addr, err)
	}
	return nil
}

func (p *xdpProbe) RemovePeer(addr netip.Addr) error {
	k := probePeerKey{Addr: peerKey(addr)}
	if err := p.objs.Peers.Delete(&k); err != nil {
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return ErrUnknownPeer
		}
		return fmt.Errorf("remove peer %s: %w", addr, err)
	}
	if err := p.objs.Stats.Delete(&k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("remove peer %s: %w", addr, err)
	}
	return nil
}

func (p *xdpProbe) Stats(addr netip.Addr) (PeerStats, error) {
	if p.sink != nil {
		_ = p.sink.drain(func(netip.Addr, []byte, time.Duration) {})
	}
	var s probePeerStats
	if err := p.objs.Stats.Lookup(&probePeerKey{Addr: peerKey(addr)}, &s); err != nil {
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return PeerStats{}, ErrUnknownPeer
		}
		return PeerStats{}, fmt.Errorf("read peer %s: %w", addr, err)
	}
	return PeerStats{
		LastHeartbeat:      time.Duration(s.LastHeartbeatNs),
		Heartbeats:         s.Heartbeats,
		LastSeq:            s.LastSeq,
		Gaps:               s.Gaps,
		LastReplication:    time.Duration(s.LastReplNs),
		ReplicationPackets: s.ReplPackets,
		BadToken:           s.BadToken,
	}, nil
}

func (p *xdpProbe) Close() error {
	var errs []error
	for _, l := range p.links {
		errs = append(errs, l.Close())
	}
	if p.sink != nil {
		errs = append(errs, p.sink.Close())
	}
	errs = append(errs, p.objs.Close())
	return errors.Join(errs...)
}
