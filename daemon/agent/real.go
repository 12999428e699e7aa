package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/doppelha/doppel/daemon/monitor"
	"github.com/doppelha/doppel/ebpf/heartbeat"
	"github.com/doppelha/doppel/netident"
)

// ProbeLiveness implements Liveness with the heartbeat probe (XDP, or its
// userspace fallback) and one heartbeat sender per job. Everything is per
// job: the probe counts (peer address, job) pairs with the job's keys, so
// two jobs between the same hosts never see each other's heartbeats, and
// unwatching one leaves the other's counters alone.
type ProbeLiveness struct {
	Log   *slog.Logger
	Probe heartbeat.Probe
	// Port is the peers' heartbeat port.
	Port uint16
	// Incarnation is this agent start's (NextIncarnation).
	Incarnation uint64

	mu       sync.Mutex
	jobs     map[string]*watched
	sessions map[string]*sessionActivity
}

type watched struct {
	id     heartbeat.JobID
	paths  map[string]PathAddrs
	sender *heartbeat.Sender
	cancel context.CancelFunc
	done   chan struct{}
}

// sessionActivity is the replication session's proof of the peer's life:
// the CLOCK_MONOTONIC time of the newest frame read from it, and a count.
type sessionActivity struct {
	last   atomic.Int64
	frames atomic.Uint64
}

func (a *sessionActivity) record() {
	a.last.Store(int64(heartbeat.Now()))
	a.frames.Add(1)
}

// SessionRecorder returns the function the job's replication sessions
// call for every frame they read (repl.Liveness.OnRecv): those frames
// count as the liveness of the job's session path.
func (p *ProbeLiveness) SessionRecorder(job string) func() {
	return p.session(job).record
}

func (p *ProbeLiveness) session(job string) *sessionActivity {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.sessions == nil {
		p.sessions = map[string]*sessionActivity{}
	}
	a, ok := p.sessions[job]
	if !ok {
		a = &sessionActivity{}
		p.sessions[job] = a
	}
	return a
}

// Watch implements Liveness.
func (p *ProbeLiveness) Watch(w LivenessWatch) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.jobs == nil {
		p.jobs = map[string]*watched{}
	}
	if _, ok := p.jobs[w.Job]; ok {
		return nil
	}
	sendKey, err := heartbeat.DeriveKey(w.Secret, w.Job, w.Self)
	if err != nil {
		return err
	}
	recvKey, err := heartbeat.DeriveKey(w.Secret, w.Job, w.Peer)
	if err != nil {
		return err
	}
	id := heartbeat.JobIDOf(w.Job)
	var watchedPeers []heartbeat.Peer
	undo := func() {
		for _, pr := range watchedPeers {
			p.Probe.Unwatch(pr)
		}
	}
	var dsts []heartbeat.Dest
	for name, pa := range w.Paths {
		pr := heartbeat.Peer{Addr: pa.Peer, Job: id}
		if err := p.Probe.Watch(pr, recvKey); err != nil {
			undo()
			return fmt.Errorf("probe: watch path %s of job %s: %w", name, w.Job, err)
		}
		watchedPeers = append(watchedPeers, pr)
		dsts = append(dsts, heartbeat.Dest{Local: pa.Local, Remote: netip.AddrPortFrom(pa.Peer, p.Port)})
	}
	log := p.Log.With("job", w.Job)
	cfg := heartbeat.SenderConfig{Job: id, Key: sendKey, Incarnation: max(p.Incarnation, 1), Epoch: w.Epoch, Dests: dsts}
	s, err := heartbeat.NewSender(cfg)
	if err != nil {
		// A local address not on this host (behind NAT, a name that
		// resolved elsewhere): the routes choose the source addresses.
		for i := range cfg.Dests {
			cfg.Dests[i].Local = netip.Addr{}
		}
		var err2 error
		if s, err2 = heartbeat.NewSender(cfg); err2 != nil {
			undo()
			return errors.Join(err, err2)
		}
		log.Warn("heartbeats leave from the routes' source addresses, not each path's own: the peer may not tell the paths apart", "err", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		// A real-time thread of its own, ended with the goroutine.
		lockRealtime(log, "heartbeat sender")
		var lastErr time.Time
		s.Run(ctx, w.Interval, 0, func(err error) {
			if time.Since(lastErr) > time.Minute { // a cut link fails every send
				log.Debug("heartbeat not sent", "err", err)
				lastErr = time.Now()
			}
		})
	}()
	p.jobs[w.Job] = &watched{id: id, paths: w.Paths, sender: s, cancel: cancel, done: done}
	return nil
}

// Unwatch implements Liveness: only this job's entries go.
func (p *ProbeLiveness) Unwatch(job string) {
	p.mu.Lock()
	w, ok := p.jobs[job]
	delete(p.jobs, job)
	delete(p.sessions, job)
	p.mu.Unlock()
	if !ok {
		return
	}
	w.cancel()
	<-w.done
	w.sender.Close()
	for _, pa := range w.paths {
		if err := p.Probe.Unwatch(heartbeat.Peer{Addr: pa.Peer, Job: w.id}); err != nil {
			p.Log.Warn("probe: unwatch", "job", job, "peer", pa.Peer, "err", err)
		}
	}
}

// SetEpoch implements Liveness.
func (p *ProbeLiveness) SetEpoch(job string, epoch uint64) {
	p.mu.Lock()
	w, ok := p.jobs[job]
	p.mu.Unlock()
	if ok {
		w.sender.SetEpoch(epoch)
	}
}

// Sample implements Liveness: the probe's facts about the path's peer
// address for this job, and on the session path the replication
// session's frames too.
func (p *ProbeLiveness) Sample(job, path string) (monitor.Sample, error) {
	p.mu.Lock()
	w, ok := p.jobs[job]
	sess := p.sessions[job]
	p.mu.Unlock()
	if !ok {
		return monitor.Sample{}, fmt.Errorf("probe: job %s not watched", job)
	}
	pa, ok := w.paths[path]
	if !ok {
		return monitor.Sample{}, fmt.Errorf("probe: job %s has no path %s", job, path)
	}
	st, err := p.Probe.Stats(heartbeat.Peer{Addr: pa.Peer, Job: w.id})
	if err != nil {
		return monitor.Sample{}, err
	}
	s := monitor.Sample{LastSeen: st.LastSeen, Packets: st.Heartbeats, PeerEpoch: st.Epoch}
	if pa.Session && sess != nil {
		s.LastSeen = max(s.LastSeen, time.Duration(sess.last.Load()))
		s.Packets += sess.frames.Load()
	}
	return s, nil
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
