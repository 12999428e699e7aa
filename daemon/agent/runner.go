package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/doppelha/doppel/blockdev"
	"github.com/doppelha/doppel/daemon/api"
	"github.com/doppelha/doppel/daemon/ha"
	"github.com/doppelha/doppel/daemon/job"
	"github.com/doppelha/doppel/netident"
)

type snapshot struct {
	ha       ha.Status
	actions  []string
	probeErr error
}

// runner drives one job's state machine: it ticks it every monitor
// interval, feeds it the probe's and the data plane's facts and the peer's
// messages, persists its hard state and performs its actions.
type runner struct {
	a    *Agent
	log  *slog.Logger
	subs Subsystems

	mu          sync.Mutex
	rec         job.Record
	node        *ha.Node
	claim       *claim // the job's volume, held while the job exists (nil: claimErr)
	claimErr    error
	dp          DataPlane
	dpErr       error // why dp is nil
	paths       map[string]netip.Addr
	pathNames   []string // monitored paths, in order
	det         detectorView
	lastPkts    map[string]uint64
	ticks       int   // ticks since start (announcements)
	probeErr    error // the probe could not be read: ticks suspended
	lastActions []string

	// identityRetry is when to take the service IPs again after taking
	// them failed (zero: nothing pending): a promoted side finds the
	// address still answered by the old source's host (its agent was
	// killed, the kernel still holds it) until that agent comes back
	// fenced and releases it.
	identityRetry time.Time

	// history is the job's decision log (doppel job events).
	history *eventLog
	// arb is the job's arbiter (nil: none); epoch the node's epoch as of
	// the last Ready (read by the data plane's handshakes).
	arb   *arbiterSide
	epoch atomic.Uint64

	// snaps are the job's snapshots and test failover on this host.
	snaps *jobSnapshots

	// snap is the status as of the last processed event, readable while
	// an action holds mu (a fence waiting on the volume, a script).
	snap atomic.Pointer[snapshot]

	// ctx lives as long as the runner: what outlives the operator's
	// request that started it (a drain) runs under it.
	ctx    context.Context
	events chan ha.Event   // from the data plane and async actions
	outbox chan ha.Message // to the peer, in order
	cancel context.CancelFunc
	done   chan struct{}
	// detDone is closed when the detector goroutine ended.
	detDone chan struct{}
}

// newRunner makes the runner of a job whose volume is held by cl (nil:
// it could not be, for the reason claimErr; the runner reports it and
// serves nothing).
func newRunner(a *Agent, rec job.Record, cl *claim, claimErr error) (*runner, error) {
	me, peer, ok := rec.Spec.Endpoints(rec.Self)
	if !ok {
		return nil, fmt.Errorf("job %s: this agent %q is neither its source nor its target", rec.Spec.Name, rec.Self)
	}
	r := &runner{
		a: a, subs: a.Subsystems, rec: rec, claim: cl, claimErr: claimErr,
		log:      a.Log.With("job", rec.Spec.Name, "self", me.Name),
		lastPkts: map[string]uint64{},
		events:   make(chan ha.Event, 64),
		outbox:   make(chan ha.Message, 64),
		done:     make(chan struct{}),
	}
	var err error
	r.paths, err = monitoredPaths(peer)
	if err != nil {
		return nil, fmt.Errorf("job %s: %w", rec.Spec.Name, err)
	}
	names := make([]string, 0, len(r.paths))
	for _, p := range []string{"repl", "app"} {
		if _, ok := r.paths[p]; ok {
			names = append(names, p)
		}
	}
	r.pathNames = names
	r.history = openEventLog(r.log, strings.TrimSuffix(a.Store.RecordPath(rec.Spec.Name), ".json")+".events")
	if rec.Spec.Arbiter != "" {
		if a.Subsystems.Arbiter == nil {
			return nil, fmt.Errorf("job %s needs an arbiter (%s), but this agent has none: set arbiter.endpoints in its config (or --arbiter-endpoints)", rec.Spec.Name, rec.Spec.Arbiter)
		}
		r.arb = newArbiterSide(r, a.Subsystems.Arbiter)
	}
	r.epoch.Store(rec.HA.Epoch)
	// The detector (detect: daemon/monitor over the probe's kernel
	// arrival timestamps, rise hysteresis) decides when the peer is down;
	// the state machine takes its verdicts. Without a probe there are
	// none.
	r.node, err = ha.NewNode(ha.Config{
		Job: rec.Spec.Name, Self: me.Name, Peer: peer.Name, Home: rec.Spec.Source.Name,
		Failover: rec.Spec.Failover, Paths: names, Missed: rec.Spec.Monitor.Missed,
		Arbiter: r.arb != nil,
	}, rec.HA)
	if err != nil {
		return nil, err
	}
	r.snap.Store(&snapshot{ha: r.node.Status()})
	r.snaps = openSnapshots(r)
	switch {
	case r.subs.DataPlane == nil:
		r.dpErr = fmt.Errorf("%w: the replication engine (daemon/repl) is not connected to the agent yet", api.ErrNotWired)
	case cl == nil:
		r.dpErr = fmt.Errorf("volume: %w", claimErr)
	default:
		r.dp, err = r.subs.DataPlane(rec, JobVolume{Backend: cl.file, Binding: cl.binding, BeforeInconsistent: r.snaps.beforeInconsistent}, r.fencing(), r.notify)
	}
	if err != nil {
		r.dpErr = fmt.Errorf("open data plane: %w", err)
		r.dp = nil
	}
	return r, nil
}

// monitoredPaths are the peer's addresses per path: "repl" (its
// replication address) and "app" (its control address, when different).
func monitoredPaths(peer job.Endpoint) (map[string]netip.Addr, error) {
	out := map[string]netip.Addr{}
	for name, hp := range map[string]string{"repl": peer.Repl, "app": peer.Control} {
		host, _, err := net.SplitHostPort(hp)
		if err != nil {
			return nil, fmt.Errorf("peer %s address %q: %w", peer.Name, hp, err)
		}
		addr, err := netip.ParseAddr(host)
		if err != nil {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			ips, lerr := net.DefaultResolver.LookupNetIP(ctx, "ip", host)
			cancel()
			if lerr != nil || len(ips) == 0 {
				return nil, fmt.Errorf("peer %s host %q: %v", peer.Name, host, lerr)
			}
			addr = ips[0]
		}
		out[name] = addr.Unmap()
	}
	if out["app"] == out["repl"] {
		delete(out, "app")
	}
	return out, nil
}

// fencing is what the data plane needs of the epoch and the arbiter.
func (r *runner) fencing() Fencing {
	f := Fencing{
		Epoch: r.epoch.Load,
		NewerEpoch: func(e uint64) {
			r.history.add(r.epoch.Load(), "peer", fmt.Sprintf("replication handshake: the peer knows epoch %d", e))
			r.notify(ha.Event{Type: ha.EvEpochSeen, Epoch: e})
		},
	}
	if r.arb != nil {
		f.Authority = r.arb
		// Without the target, a sync source records it out of sync and
		// continues once the session is declared dead.
		m := r.rec.Spec.Monitor
		f.SyncTimeout = m.Interval * time.Duration(m.Missed)
	}
	return f
}

// notifyWait is notify for an event that must not be dropped: it waits
// for room (or the runner's end).
func (r *runner) notifyWait(ev ha.Event) {
	select {
	case r.events <- ev:
	case <-r.ctx.Done():
	}
}

func (r *runner) notify(ev ha.Event) {
	select {
	case r.events <- ev:
	default:
		r.log.Error("state machine event dropped: queue full", "event", ev.Type)
	}
}

func (r *runner) start(ctx context.Context) {
	ctx, r.cancel = context.WithCancel(ctx)
	r.ctx = ctx
	if r.arb != nil {
		go r.arb.watch(ctx)
	}
	if r.subs.Liveness != nil {
		if err := r.subs.Liveness.Watch(r.livenessWatch()); err != nil {
			r.log.Error("probe: watch peer", "err", err)
		}
	}
	r.mu.Lock()
	r.stepLocked(ctx, ha.Event{Type: ha.EvStart})
	r.mu.Unlock()
	go r.sendLoop(ctx)
	go r.loop(ctx)
	go r.snaps.scheduleLoop(ctx)
	if r.subs.Liveness != nil {
		r.detDone = make(chan struct{})
		go r.detect(ctx)
	}
}

// stop stops the runner and releases what it serves (not the service IPs:
// deleting a job does not move addresses).
func (r *runner) stop() {
	r.cancel()
	<-r.done
	if r.detDone != nil {
		<-r.detDone
	}
	if r.subs.Liveness != nil {
		r.subs.Liveness.Unwatch(r.rec.Spec.Name)
	}
	if r.arb != nil {
		r.arb.close()
	}
	r.snaps.close()
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.subs.Volumes != nil {
		r.subs.Volumes.Stop(r.rec.Spec.Name)
	}
	if nv, ok := r.subs.Volumes.(*NBDVolumes); ok {
		if ad := nv.Unadopt(r.rec.Spec.Name); ad != nil {
			ad.close() // handed over by the previous agent, never served
		}
	}
	if r.dp != nil {
		r.dp.Close()
	}
	if err := r.claim.close(); err != nil {
		r.log.Warn("close volume", "err", err)
	}
}

func (r *runner) loop(ctx context.Context) {
	defer close(r.done)
	t := time.NewTicker(r.rec.Spec.Monitor.Interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case ev := <-r.events:
			r.mu.Lock()
			r.stepLocked(ctx, ev)
			r.mu.Unlock()
		case <-t.C:
			r.tick(ctx)
		}
	}
}

// tick feeds the probe's facts (a path whose packet count grew since the
// last tick was heard: path status, a restarted source's start grace) and
// advances the state machine by one interval; the down/up verdicts come
// from the detector goroutine (detect). Without a probe the state machine
// is not ticked at all: no failure is ever declared from silence that
// nobody measured.
func (r *runner) tick(ctx context.Context) {
	if r.subs.Liveness == nil {
		return
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	heard := map[string]bool{}
	for name := range r.paths {
		smp, err := r.subs.Liveness.Sample(r.rec.Spec.Name, name)
		n := smp.Packets
		if err != nil {
			// Silence that was not measured is not a failure: no tick.
			if r.probeErr == nil {
				r.log.Error("probe unavailable: failure detection suspended", "path", name, "err", err)
			}
			r.probeErr = err
			r.publish()
			return
		}
		heard[name] = n != r.lastPkts[name]
		r.lastPkts[name] = n
	}
	if r.probeErr != nil {
		r.log.Info("probe available again: failure detection resumed")
		r.probeErr = nil
	}
	for name, h := range heard {
		if h {
			r.node.Step(ha.Event{Type: ha.EvHeartbeat, Path: name})
		}
	}
	r.node.Tick()
	r.retryIdentity(ctx)
	// While the link is down, say who we are every ~2 s: the peer may
	// have missed a promotion (or this side may have).
	r.ticks++
	if every := max(int(2*time.Second/r.rec.Spec.Monitor.Interval), 1); r.ticks%every == 0 && !r.node.Status().LinkUp {
		r.node.Announce()
	}
	r.process(ctx)
	r.publish()
}

// identityRetryEvery is how often an active source that could not take
// its service IPs tries again.
const identityRetryEvery = 2 * time.Second

// retryIdentity takes the service IPs again when taking them failed and
// this side is still the active source (holding its lease, with an
// arbiter). Called with mu held.
func (r *runner) retryIdentity(ctx context.Context) {
	if r.identityRetry.IsZero() || time.Now().Before(r.identityRetry) {
		return
	}
	hs := r.node.HardState()
	if hs.Role != ha.RoleSource || hs.Superseded || hs.HandingOver {
		r.identityRetry = time.Time{}
		return
	}
	r.identityRetry = time.Now().Add(identityRetryEvery)
	if r.arb != nil && !r.arb.statusView().Holding {
		return
	}
	if err := r.do(ctx, ha.Action{Type: ha.ActApplyIdentity}); err != nil {
		r.log.Warn("service IPs still not taken", "err", err)
		return
	}
	r.identityRetry = time.Time{}
	r.log.Info("action done", "action", "apply-identity (retried)")
	r.history.add(hs.Epoch, "action", "service IPs taken on retry (the address is no longer answered elsewhere)")
}

// publish makes the current status readable without mu. Called with mu held.
func (r *runner) publish() {
	r.snap.Store(&snapshot{ha: r.node.Status(), actions: r.lastActions, probeErr: r.probeErr})
}

// step feeds one event and performs what follows; it returns the refusal
// of an operator command, the actions done and the errors of those that
// failed.
func (r *runner) step(ctx context.Context, ev ha.Event) ([]string, []error, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if err := r.node.Step(ev); err != nil {
		return nil, nil, err
	}
	acts, errs := r.process(ctx)
	return acts, errs, nil
}

func (r *runner) stepLocked(ctx context.Context, ev ha.Event) {
	if err := r.node.Step(ev); err != nil {
		r.log.Warn("state machine event", "event", ev.Type, "err", err)
	}
	r.process(ctx)
}

// process performs every pending Ready: persist, send, act, send what
// must follow the actions.
func (r *runner) process(ctx context.Context) (done []string, errs []error) {
	defer r.publish()
	for i := 0; r.node.HasReady() && i < 16; i++ {
		rd := r.node.Ready()
		var persistErr error
		if rd.MustPersist {
			r.rec.HA = rd.HardState
			if err := r.a.Store.Put(r.rec); err != nil {
				persistErr = err
				// Acting on a state that is not durable could repeat a
				// promotion after a crash: log loudly, keep going (the
				// state machine is still consistent in memory).
				r.log.Error("persist job state", "err", err)
				errs = append(errs, err)
			}
		}
		// The data plane's handshakes carry the epoch the actions below
		// act at (a promoted side starts its source with the new one).
		r.epoch.Store(rd.HardState.Epoch)
		r.queue(rd.Messages)
		if r.arb != nil {
			if rd.HardState.Superseded {
				// Held writes fail now, before the actions wait for them.
				r.arb.fence()
			}
			r.arb.reconcile(rd.HardState, false)
		}
		for _, a := range rd.Actions {
			var err error
			if a.Type == ha.ActRollback && persistErr != nil {
				// The volume is not touched unless the rollback-pending
				// marker is durable: a crash must not leave a half
				// rolled-back volume that a restart would serve.
				err = fmt.Errorf("not started: the rollback-pending marker is not durable: %w", persistErr)
			} else {
				err = r.do(ctx, a)
			}
			switch {
			case a.Type == ha.ActApplyIdentity && err != nil:
				r.identityRetry = time.Now().Add(identityRetryEvery)
			case a.Type == ha.ActApplyIdentity, a.Type == ha.ActReleaseIdentity:
				r.identityRetry = time.Time{}
			}
			desc := a.String()
			if err != nil {
				desc += " FAILED: " + err.Error()
				errs = append(errs, fmt.Errorf("%s: %w", a.Type, err))
				r.log.Error("action failed", "action", a.String(), "err", err)
				r.node.Step(ha.Event{Type: ha.EvActionFailed, Action: a.Type, Err: err.Error()})
			} else {
				r.log.Info("action done", "action", a.String())
				if a.Type == ha.ActRollback {
					// Complete and synced: the marker goes (persisted by
					// the next Ready), then the promotion.
					r.node.Step(ha.Event{Type: ha.EvRolledBack, Snapshot: a.Snapshot})
				}
			}
			done = append(done, desc)
		}
		r.queue(rd.AfterActions)
	}
	r.announceEpoch()
	hs := r.node.HardState()
	r.epoch.Store(hs.Epoch)
	if r.arb != nil {
		r.arb.reconcile(hs, true)
	}
	if prev, now := r.snap.Load().ha, r.node.Status(); prev.State != now.State || prev.Role != now.Role {
		msg := fmt.Sprintf("%s %s -> %s", now.Role, prev.State, now.State)
		if now.Reason != "" {
			msg += ": " + now.Reason
		}
		r.history.add(now.Epoch, "state", msg)
	}
	if len(done) > 0 {
		r.lastActions = done
	}
	return done, errs
}

// queue hands messages to sendLoop, in order.
func (r *runner) queue(msgs []ha.Message) {
	for _, m := range msgs {
		select {
		case r.outbox <- m:
		default:
			r.log.Error("peer message dropped: outbox full", "msg", m.String())
		}
	}
}

// sendLoop delivers the state machine's messages to the peer, in order.
// Hellos are repeated by the protocol and sent once; other messages (a
// promotion, a handover) are retried every second, up to 10 tries. A
// message being retried does not hold back the ones queued after it: a
// peer that was unreachable and comes back gets the fresh answers (the
// hello that fences a restarted old source within its start grace)
// without waiting for the retries of what it missed. Every message
// carries the sender's role and epoch, and the receiver acts on it only
// in the states it applies to, so a retried message overtaken by newer
// ones is harmless.
func (r *runner) sendLoop(ctx context.Context) {
	// A hello is tried once (the protocol repeats them: announce); a
	// role change is retried until delivered, backing off to 5 s, or
	// until a newer message of its kind replaces it: an old source that
	// comes back after a long partition still hears of the promotion.
	type outMsg struct {
		m     ha.Message
		tries int
		due   time.Time
	}
	var q []outMsg
	add := func(m ha.Message) {
		if m.Type != ha.MsgHello {
			keep := q[:0]
			for _, o := range q {
				if o.m.Type != m.Type {
					keep = append(keep, o)
				}
			}
			q = keep
		}
		q = append(q, outMsg{m: m})
	}
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	for {
		if len(q) == 0 {
			select {
			case <-ctx.Done():
				return
			case m := <-r.outbox:
				add(m)
			}
		}
	more:
		for {
			select {
			case m := <-r.outbox:
				add(m)
			default:
				break more
			}
		}
		if r.subs.Peers == nil {
			q = q[:0]
			continue
		}
		var next time.Time
		keep := q[:0]
		for _, o := range q {
			if now := time.Now(); o.due.After(now) {
				keep = append(keep, o)
				if next.IsZero() || o.due.Before(next) {
					next = o.due
				}
				continue
			}
			sctx, cancel := context.WithTimeout(ctx, 3*time.Second)
			err := r.subs.Peers.Send(sctx, r.rec.Spec, o.m)
			cancel()
			if err == nil || ctx.Err() != nil {
				continue
			}
			o.tries++
			r.log.Debug("peer message not delivered", "msg", o.m.String(), "tries", o.tries, "err", err)
			if o.m.Type != ha.MsgHello {
				o.due = time.Now().Add(min(time.Second<<min(o.tries-1, 3), 5*time.Second))
				keep = append(keep, o)
				if next.IsZero() || o.due.Before(next) {
					next = o.due
				}
			}
		}
		q = keep
		if len(q) == 0 {
			continue
		}
		timer.Reset(time.Until(next))
		select {
		case <-ctx.Done():
			return
		case m := <-r.outbox:
			add(m)
		case <-timer.C:
		}
	}
}

func (r *runner) dataPlane() (DataPlane, error) {
	if r.dp == nil {
		return nil, r.dpErr
	}
	return r.dp, nil
}

// serviceAddrs are the job's service addresses on this host: as given on
// the source, through the interface map on the target.
func (r *runner) serviceAddrs() ([]netident.Addr, error) {
	var out []netident.Addr
	for _, ip := range r.rec.Spec.ServiceIPs {
		p, err := netip.ParsePrefix(ip.Prefix)
		if err != nil {
			return nil, err
		}
		iface := ip.Iface
		if r.rec.Self == r.rec.Spec.Target.Name {
			if m, ok := r.rec.Spec.MapIface[iface]; ok {
				iface = m
			}
		}
		out = append(out, netident.Addr{Prefix: p, Iface: iface})
	}
	return out, nil
}

func (r *runner) do(ctx context.Context, a ha.Action) error {
	spec := r.rec.Spec
	switch a.Type {
	case ha.ActCampaign, ha.ActStopCampaign, ha.ActResign:
		if r.arb == nil {
			return fmt.Errorf("%s: job %s has no arbiter", a.Type, spec.Name)
		}
		switch a.Type {
		case ha.ActCampaign:
			r.arb.startCampaign(a.Epoch, a.Force, a.Why)
		case ha.ActStopCampaign:
			r.arb.stopCampaign()
		default:
			return r.arb.resign(ctx)
		}
		return nil
	case ha.ActServe:
		if r.subs.Volumes == nil {
			return fmt.Errorf("%w: volume serving (blockdev)", api.ErrNotWired)
		}
		if r.claim == nil {
			return fmt.Errorf("volume: %w", r.claimErr)
		}
		if r.dp == nil && r.subs.DataPlane != nil {
			// The replication engine is there but failed for this job:
			// writes would bypass it.
			return fmt.Errorf("not serving the volume unreplicated: %w", r.dpErr)
		}
		_, err := r.subs.Volumes.Serve(ctx, spec, r.claim.file, r.mutator())
		return err
	case ha.ActStopServe:
		if r.subs.Volumes == nil {
			return nil
		}
		return r.subs.Volumes.Stop(spec.Name)
	case ha.ActApplyIdentity, ha.ActReleaseIdentity:
		addrs, err := r.serviceAddrs()
		if err != nil || len(addrs) == 0 {
			return err
		}
		if r.subs.NetIdent == nil {
			return fmt.Errorf("%w: network identity (netident)", api.ErrNotWired)
		}
		if a.Type == ha.ActApplyIdentity {
			return r.subs.NetIdent.Apply(ctx, addrs)
		}
		return r.subs.NetIdent.Release(ctx, addrs)
	case ha.ActRunScript:
		path, ok := spec.Scripts[a.Hook]
		if !ok {
			return nil
		}
		if r.subs.Scripts == nil {
			return fmt.Errorf("%w: hook scripts", api.ErrNotWired)
		}
		addrs, _ := r.serviceAddrs()
		ips := make([]string, len(addrs))
		for i, ad := range addrs {
			ips[i] = ad.String()
		}
		device := ""
		if r.subs.Volumes != nil {
			device = r.subs.Volumes.Device(spec.Name)
		}
		return r.subs.Scripts.Run(ctx, a.Hook, path, ScriptEnv(spec, r.rec.Self, a.Hook, r.node.Status(), device, ips))
	case ha.ActRollback:
		dp, err := r.dataPlane()
		if err != nil {
			return err
		}
		return r.snaps.rollback(a.Snapshot, dp)
	case ha.ActQuiesce:
		dp, err := r.dataPlane()
		if err != nil {
			return err
		}
		go func() {
			// Not the command's context: the drain outlives the
			// operator's request.
			qctx, cancel := context.WithTimeout(r.ctx, 5*time.Minute)
			defer cancel()
			if err := dp.Quiesce(qctx); err != nil {
				if errors.Is(err, context.Canceled) && qctx.Err() == nil {
					return // ended by resume-writes: the state machine knows why
				}
				r.notify(ha.Event{Type: ha.EvActionFailed, Action: ha.ActQuiesce, Err: err.Error()})
				return
			}
			r.notify(ha.Event{Type: ha.EvDrained})
		}()
		return nil
	}
	dp, err := r.dataPlane()
	if err != nil {
		switch a.Type {
		case ha.ActStopSource, ha.ActStopTarget:
			return nil // nothing runs, nothing to stop
		}
		return err
	}
	switch a.Type {
	case ha.ActStartSource:
		return dp.StartSource(ctx)
	case ha.ActStopSource:
		return dp.StopSource()
	case ha.ActStartTarget:
		return dp.StartTarget(ctx)
	case ha.ActStopTarget:
		return dp.StopTarget(a.ApplyQueue)
	case ha.ActPromote:
		return dp.Promote(a.Epoch)
	case ha.ActPauseRepl:
		return dp.Pause()
	case ha.ActResumeWrites:
		return dp.ResumeWrites()
	case ha.ActResumeRepl:
		return dp.Resume()
	}
	return fmt.Errorf("unknown action %q", a.Type)
}

func (r *runner) mutator() blockdev.Mutator {
	if r.dp != nil {
		return r.dp.Mutator()
	}
	return nil
}

// status reports the job as this agent sees it.
func (r *runner) status() api.JobStatus {
	snap := r.snap.Load()
	hs := snap.ha
	st := api.JobStatus{
		Spec:    r.rec.Spec.Redacted(),
		Self:    r.rec.Self,
		HA:      hs,
		Actions: snap.actions,
		Updated: time.Now().UTC(),
	}
	if r.arb != nil {
		st.Arbiter = r.arb.statusView()
	}
	st.Snapshots = r.snaps.status()
	if r.dp != nil {
		st.Data = r.dp.Status()
	} else {
		st.Data = api.DataStatus{RPO: -1, Note: "replication engine not wired in this build: mirror progress, queue and RPO are unknown"}
		if r.dpErr != nil && !errors.Is(r.dpErr, api.ErrNotWired) {
			st.Data.Note = r.dpErr.Error()
		}
	}
	if r.subs.Volumes != nil {
		st.Data.Device = r.subs.Volumes.Device(r.rec.Spec.Name)
		st.Data.Users = r.subs.Volumes.InUse(r.rec.Spec.Name)
	}
	interval := r.rec.Spec.Monitor.Interval
	st.Probe = api.ProbeStatus{Interval: interval, Missed: r.rec.Spec.Monitor.Missed, TimeToFail: -1}
	if r.subs.Liveness != nil {
		st.Probe.Mode = r.subs.Liveness.Mode()
		st.Probe.Active = r.probeErrNow() == nil
		if err := r.probeErrNow(); err != nil {
			st.Probe.Mode += " (unavailable, failure detection suspended: " + err.Error() + ")"
		}
	} else {
		st.Probe.Mode = "none: probe not wired, failure detection off"
	}
	if hs.Role == ha.RoleTarget && hs.State != ha.StateSourceDown && r.probeErrNow() == nil {
		if ttf, ok := r.det.timeToFail(); ok {
			st.Probe.TimeToFail = ttf
		}
	}
	return st
}

// probeErrNow is the probe error as of the last tick.
func (r *runner) probeErrNow() error { return r.snap.Load().probeErr }
