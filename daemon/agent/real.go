package agent

import (
	"context"
	"fmt"
	"log/slog"
	"net/netip"
	"sync"
	"time"

	"github.com/doppelha/doppel/daemon/monitor"
	"github.com/doppelha/doppel/ebpf"
	"github.com/doppelha/doppel/netident"
)

// ProbeLiveness implements Liveness with the ebpf probe (XDP, or its
// userspace fallback) and heartbeat senders: one sender per job, to every
// path's peer address.
type ProbeLiveness struct {
	Log   *slog.Logger
	Probe ebpf.Probe
	// Port is the peers' heartbeat port.
	Port uint16

	mu   sync.Mutex
	jobs map[string]*watched
}

type watched struct {
	paths  map[string]netip.Addr
	sender *ebpf.Sender
	cancel context.CancelFunc
}

// Watch implements Liveness.
func (p *ProbeLiveness) Watch(job string, paths map[string]netip.Addr, also []netip.Addr, token uint64, interval time.Duration) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.jobs == nil {
		p.jobs = map[string]*watched{}
	}
	if _, ok := p.jobs[job]; ok {
		return nil
	}
	var dsts []netip.AddrPort
	for _, a := range paths {
		if err := p.Probe.SetPeer(a, token); err != nil {
			return fmt.Errorf("probe: watch %s: %w", a, err)
		}
		dsts = append(dsts, netip.AddrPortFrom(a, p.Port))
	}
	for _, a := range also {
		dsts = append(dsts, netip.AddrPortFrom(a, p.Port))
	}
	hb := ebpf.Heartbeat{Token: token, Job: heartbeatJobID(job)}
	s, err := ebpf.NewSender(dsts, hb)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithCancel(context.Background())
	log := p.Log.With("job", job)
	go func() {
		// A real-time thread of its own, ended with the goroutine.
		lockRealtime(log, "heartbeat sender")
		s.Run(ctx, interval, 0, nil)
	}()
	p.jobs[job] = &watched{paths: paths, sender: s, cancel: cancel}
	return nil
}

// Unwatch implements Liveness.
func (p *ProbeLiveness) Unwatch(job string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	w, ok := p.jobs[job]
	if !ok {
		return
	}
	delete(p.jobs, job)
	w.cancel()
	w.sender.Close()
	for _, a := range w.paths {
		if !p.usedLocked(a) {
			p.Probe.RemovePeer(a)
		}
	}
}

func (p *ProbeLiveness) usedLocked(a netip.Addr) bool {
	for _, w := range p.jobs {
		for _, b := range w.paths {
			if a == b {
				return true
			}
		}
	}
	return false
}

// Sample implements Liveness.
func (p *ProbeLiveness) Sample(job, path string) (monitor.Sample, error) {
	p.mu.Lock()
	w, ok := p.jobs[job]
	p.mu.Unlock()
	if !ok {
		return monitor.Sample{}, fmt.Errorf("probe: job %s not watched", job)
	}
	a, ok := w.paths[path]
	if !ok {
		return monitor.Sample{}, fmt.Errorf("probe: job %s has no path %s", job, path)
	}
	st, err := p.Probe.Stats(a)
	if err != nil {
		return monitor.Sample{}, err
	}
	return monitor.Sample{LastSeen: st.LastSeen(), Packets: st.Packets()}, nil
}

// Mode implements Liveness.
func (p *ProbeLiveness) Mode() string { return string(p.Probe.Mode()) }

// NetIdentManager implements NetIdent with a netident.Manager.
type NetIdentManager struct{ M *netident.Manager }

// Apply implements NetIdent.
func (n NetIdentManager) Apply(ctx context.Context, addrs []netident.Addr) error {
	_, err := n.M.Apply(ctx, netident.Identity{Addrs: addrs}, netident.ApplyOptions{})
	return err
}

// Release implements NetIdent.
func (n NetIdentManager) Release(ctx context.Context, addrs []netident.Addr) error {
	_, err := n.M.Release(ctx, netident.Identity{Addrs: addrs})
	return err
}
