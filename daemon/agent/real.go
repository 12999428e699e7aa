package agent

import (
	"context"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
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
	// watchers lists, per peer address, the jobs watching it, oldest
	// first. The probe holds one heartbeat token per address: the oldest
	// job's. Every job sends its own heartbeats, and the peer sends those
	// of every job it has, so the oldest job's keep the address alive for
	// all of them; a new job does not change the token (its peer may not
	// send its heartbeats yet), and when the token's job goes the next
	// oldest's takes over (delete the target side first: the source keeps
	// sending the old job's heartbeats until its own delete).
	watchers map[netip.Addr][]string
}

type watched struct {
	paths  map[string]netip.Addr
	token  uint64
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
	if p.watchers == nil {
		p.watchers = map[netip.Addr][]string{}
	}
	var dsts []netip.AddrPort
	for _, a := range paths {
		if len(p.watchers[a]) == 0 {
			if err := p.Probe.SetPeer(a, token); err != nil {
				return fmt.Errorf("probe: watch %s: %w", a, err)
			}
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
	p.jobs[job] = &watched{paths: paths, token: token, sender: s, cancel: cancel}
	for _, a := range uniqueAddrs(paths) {
		p.watchers[a] = append(p.watchers[a], job)
	}
	return nil
}

func uniqueAddrs(paths map[string]netip.Addr) []netip.Addr {
	var out []netip.Addr
	for _, a := range paths {
		if !slices.Contains(out, a) {
			out = append(out, a)
		}
	}
	return out
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
	for _, a := range uniqueAddrs(w.paths) {
		js := p.watchers[a]
		i := slices.Index(js, job)
		if i < 0 {
			continue
		}
		js = slices.Delete(js, i, i+1)
		switch {
		case len(js) == 0:
			delete(p.watchers, a)
			p.Probe.RemovePeer(a)
		case i == 0:
			// The token's job went: the next oldest job's heartbeats
			// keep the address alive.
			p.watchers[a] = js
			if err := p.Probe.SetPeer(a, p.jobs[js[0]].token); err != nil {
				p.Log.Error("probe: heartbeat token of the remaining jobs", "peer", a, "job", js[0], "err", err)
			}
		default:
			p.watchers[a] = js
		}
	}
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
