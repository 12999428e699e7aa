package heartbeat

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"runtime"
	"sync"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
)

// xdpProbe is the XDP program attached to one or more interfaces; its maps
// hold the watched peers' keys and stats.
type xdpProbe struct {
	objs probeObjects
	want Mode           // the mode asked for (ModeAuto, driver or generic)
	ns   netns.NsHandle // the namespace interfaces are looked up and attached in
	sink *hbSocket      // swallows heartbeats (no ICMP port unreachable); may be nil
	// route: no configured interface, attach to each peer's route.
	route bool

	mu    sync.Mutex
	links map[string]attached // by interface name
}

type attached struct {
	l    link.Link
	mode Mode
}

// loadXDP loads the program for cfg's port, without attaching it.
func loadXDP(cfg Config) (*xdpProbe, error) {
	spec, err := loadProbe()
	if err != nil {
		return nil, err
	}
	if err := spec.Variables[probeVarHbPort].Set(cfg.Port); err != nil {
		return nil, fmt.Errorf("set heartbeat port: %w", err)
	}
	p := &xdpProbe{want: cfg.Mode, links: map[string]attached{}, ns: -1}
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
	if p.ns, err = netns.Get(); err != nil {
		return nil, errors.Join(fmt.Errorf("probe: current network namespace: %w", err), p.Close())
	}
	p.route = len(cfg.Interfaces) == 0
	for _, name := range cfg.Interfaces {
		if err := p.attach(name); err != nil {
			return nil, errors.Join(err, p.Close())
		}
	}
	if s, err := listenHeartbeats(cfg.Port); err == nil {
		p.sink = s
	} else {
		cfg.Logger.Debug("no heartbeat sink socket; the kernel may answer heartbeats with ICMP port unreachable", "err", err)
	}
	return p, nil
}

// attach attaches the program to the named interface (once) in driver
// mode, else (unless a mode is forced) in generic mode.
func (p *xdpProbe) attach(name string) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if _, ok := p.links[name]; ok {
		return nil
	}
	ifc, err := net.InterfaceByName(name)
	if err != nil {
		return fmt.Errorf("attach XDP probe: %w", err)
	}
	var derr error
	if p.want != ModeXDPGeneric {
		l, err := link.AttachXDP(link.XDPOptions{Program: p.objs.DoppelProbe, Interface: ifc.Index, Flags: link.XDPDriverMode})
		if err == nil {
			p.links[name] = attached{l, ModeXDPDriver}
			return nil
		}
		if p.want == ModeXDPDriver {
			return fmt.Errorf("attach XDP probe to %s in driver mode: %w", name, err)
		}
		derr = err
	}
	l, err := link.AttachXDP(link.XDPOptions{Program: p.objs.DoppelProbe, Interface: ifc.Index, Flags: link.XDPGenericMode})
	if err != nil {
		return fmt.Errorf("attach XDP probe to %s: %w", name, errors.Join(derr, err))
	}
	p.links[name] = attached{l, ModeXDPGeneric}
	return nil
}

// attachRoute attaches the program to the interface of the route to a,
// in the probe's network namespace.
func (p *xdpProbe) attachRoute(a netip.Addr) error {
	return inNamespace(p.ns, func() error {
		routes, err := netlink.RouteGet(a.AsSlice())
		if err != nil {
			return fmt.Errorf("probe: route to %s: %w", a, err)
		}
		if len(routes) == 0 {
			return fmt.Errorf("probe: no route to %s", a)
		}
		l, err := netlink.LinkByIndex(routes[0].LinkIndex)
		if err != nil {
			return fmt.Errorf("probe: interface of the route to %s: %w", a, err)
		}
		return p.attach(l.Attrs().Name)
	})
}

// inNamespace runs f on an OS thread in namespace ns (the calling thread
// when it is there already).
func inNamespace(ns netns.NsHandle, f func() error) error {
	if cur, err := netns.Get(); err == nil {
		same := cur.Equal(ns)
		cur.Close()
		if same {
			return f()
		}
	}
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // not unlocked if restoring fails: the thread dies with the goroutine
		orig, err := netns.Get()
		if err != nil {
			errc <- err
			return
		}
		defer orig.Close()
		if err := netns.Set(ns); err != nil {
			errc <- fmt.Errorf("enter the probe's network namespace: %w", err)
			return
		}
		ferr := f()
		if err := netns.Set(orig); err != nil {
			errc <- errors.Join(ferr, fmt.Errorf("leave the probe's network namespace: %w", err))
			return
		}
		runtime.UnlockOSThread()
		errc <- ferr
	}()
	return <-errc
}

// Mode is the weakest mode attached (ModeXDP while attached nowhere).
func (p *xdpProbe) Mode() Mode {
	p.mu.Lock()
	defer p.mu.Unlock()
	if len(p.links) == 0 {
		return ModeXDP
	}
	for _, a := range p.links {
		if a.mode == ModeXDPGeneric {
			return ModeXDPGeneric
		}
	}
	return ModeXDPDriver
}

func (p *xdpProbe) mapKey(pr Peer) probePeerKey {
	return probePeerKey{Addr: key16(pr.Addr), Job: pr.Job}
}

func (p *xdpProbe) Watch(pr Peer, key Key) error {
	if p.route {
		if err := p.attachRoute(pr.Addr); err != nil {
			return err
		}
	}
	k := p.mapKey(pr)
	k0, k1 := key.halves()
	// Stats first, so that the program never finds a key without stats.
	if err := p.objs.Stats.Update(&k, &probePeerStats{}, ebpf.UpdateNoExist); err != nil && !errors.Is(err, ebpf.ErrKeyExist) {
		return fmt.Errorf("watch %s: %w", pr, err)
	}
	if err := p.objs.Keys.Update(&k, &probePeerConfig{K0: k0, K1: k1}, ebpf.UpdateAny); err != nil {
		return fmt.Errorf("watch %s: %w", pr, err)
	}
	return nil
}

func (p *xdpProbe) Unwatch(pr Peer) error {
	k := p.mapKey(pr)
	if err := p.objs.Keys.Delete(&k); err != nil {
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return ErrUnknownPeer
		}
		return fmt.Errorf("unwatch %s: %w", pr, err)
	}
	if err := p.objs.Stats.Delete(&k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("unwatch %s: %w", pr, err)
	}
	return nil
}

func (p *xdpProbe) Stats(pr Peer) (Stats, error) {
	if p.sink != nil {
		_ = p.sink.drain(func(netip.Addr, []byte, time.Duration) {})
	}
	k := p.mapKey(pr)
	var s probePeerStats
	if err := p.objs.Stats.LookupWithFlags(&k, &s, ebpf.LookupLock); err != nil {
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return Stats{}, ErrUnknownPeer
		}
		return Stats{}, fmt.Errorf("read %s: %w", pr, err)
	}
	return Stats{
		LastSeen:    time.Duration(s.LastNs),
		Heartbeats:  s.Heartbeats,
		Incarnation: s.Incarnation,
		Seq:         s.Seq,
		Epoch:       s.Epoch,
		Gaps:        s.Gaps,
		Replays:     s.Replays,
		BadMAC:      s.BadMac,
	}, nil
}

func (p *xdpProbe) Close() error {
	var errs []error
	p.mu.Lock()
	for _, a := range p.links {
		errs = append(errs, a.l.Close())
	}
	p.links = map[string]attached{}
	p.mu.Unlock()
	if p.sink != nil {
		errs = append(errs, p.sink.Close())
	}
	if p.ns >= 0 {
		errs = append(errs, p.ns.Close())
	}
	errs = append(errs, p.objs.Close())
	return errors.Join(errs...)
}
