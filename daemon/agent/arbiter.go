package agent

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/doppelha/doppel/daemon/api"
	"github.com/doppelha/doppel/daemon/arbiter"
	"github.com/doppelha/doppel/daemon/ha"
	"github.com/doppelha/doppel/daemon/job"
)

// arbiterSide is a job's arbiter on this agent (docs/safety.md): the
// lease holder while this side is the active source, the campaign while it
// asks to be promoted, the watch of the epoch record, and the gate that
// decides whether a write the target has not acknowledged may be
// acknowledged (replstate.Authority).
type arbiterSide struct {
	r       *runner
	c       *arbiter.Client
	ttl     time.Duration
	suspend time.Duration // < 0: hold forever
	sync    bool
	peer    string

	mu       sync.Mutex
	holder   *arbiter.Holder
	pending  *arbiter.Holder // won by a campaign, not yet this side's role
	campaign context.CancelFunc
	status   string // what a campaign waits for
	lastErr  string
	changed  chan struct{} // closed and replaced when holder changes
	fenced   atomic.Bool
	closed   atomic.Bool // the runner stopped: nothing will be acknowledged

	marks syncMarks // the target's in-sync record (sync mode)
}

func newArbiterSide(r *runner, c *arbiter.Client) *arbiterSide {
	spec := r.rec.Spec
	_, peer, _ := spec.Endpoints(r.rec.Self)
	ttl := spec.LeaseTTL
	if ttl == 0 {
		ttl = job.DefaultLeaseTTL
	}
	a := &arbiterSide{r: r, c: c, ttl: ttl, suspend: spec.SuspendTimeout, sync: spec.Mode != job.ModeAsync,
		peer: peer.Name, changed: make(chan struct{})}
	a.marks = syncMarks{record: a.recordSync, note: a.noteSync, report: func(err error) { a.setErr(err.Error()) }, every: 200 * time.Millisecond}
	return a
}

// recordSync records under this side's lease whether the target holds
// every acknowledged write.
func (a *arbiterSide) recordSync(ctx context.Context, inSync bool) error {
	a.mu.Lock()
	h := a.holder
	a.mu.Unlock()
	if h == nil || !h.Valid(time.Now()) {
		return errNoLease
	}
	d := 5 * time.Second
	if !inSync {
		d = 2 * time.Second // a write waits for it
	}
	ctx, cancel := context.WithTimeout(ctx, d)
	defer cancel()
	return h.MarkSync(ctx, a.peer, inSync)
}

func (a *arbiterSide) noteSync(inSync bool) {
	if inSync {
		a.r.history.add(a.r.epoch.Load(), "arbiter", fmt.Sprintf("recorded %s in sync: it holds every acknowledged write", a.peer))
		return
	}
	a.r.history.add(a.r.epoch.Load(), "arbiter", fmt.Sprintf("recorded %s out of sync: this source continues without it (it cannot be promoted automatically until resynced)", a.peer))
}

// reconcile makes the holder follow the node's hard state: held at the
// node's epoch while it is the active source, not otherwise. Called with
// the runner's lock held for every Ready: before its actions with release
// false (a new source holds its key before it serves and runs its hooks,
// whose writes need it), after them with release true (a demoted source
// resigns in its actions first).
func (a *arbiterSide) reconcile(hs ha.HardState, release bool) {
	a.fenced.Store(hs.Superseded)
	want := hs.Role == ha.RoleSource && !hs.Superseded && !hs.HandingOver
	a.mu.Lock()
	var stop []*arbiter.Holder
	switch {
	case want && a.holder != nil && a.holder.Epoch() == hs.Epoch:
	case want && a.pending != nil && a.pending.Epoch() == hs.Epoch:
		if a.holder != nil {
			stop = append(stop, a.holder)
		}
		a.holder, a.pending = a.pending, nil
		a.broadcastLocked()
	case want:
		if a.holder != nil {
			stop = append(stop, a.holder)
		}
		a.holder = a.c.Hold(a.r.rec.Spec.Name, a.r.rec.Self, hs.Epoch, a.ttl, a.onHolder)
		a.r.history.add(hs.Epoch, "arbiter", fmt.Sprintf("holding the leadership key at epoch %d (lease TTL %v): acquiring", hs.Epoch, a.ttl))
		a.broadcastLocked()
	case a.holder != nil && release:
		stop = append(stop, a.holder)
		a.holder = nil
		a.broadcastLocked()
	}
	if release && !want && a.pending != nil && a.campaign == nil {
		stop = append(stop, a.pending)
		a.pending = nil
	}
	a.mu.Unlock()
	for _, h := range stop {
		go h.Stop() // its goroutine reports through notify: never wait under the runner's lock
	}
}

// fence makes held writes fail at once: this side was superseded.
func (a *arbiterSide) fence() {
	a.fenced.Store(true)
	a.mu.Lock()
	a.broadcastLocked()
	a.mu.Unlock()
}

func (a *arbiterSide) broadcastLocked() {
	close(a.changed)
	a.changed = make(chan struct{})
}

// onHolder takes a holder's change of standing (from its goroutine).
func (a *arbiterSide) onHolder(ev arbiter.HolderEvent) {
	switch {
	case ev.Superseded > 0:
		a.r.history.add(ev.Epoch, "arbiter", fmt.Sprintf("superseded: the arbiter granted epoch %d to another side; fencing", ev.Superseded))
		a.r.notify(ha.Event{Type: ha.EvEpochSeen, Epoch: ev.Superseded})
	case ev.Held:
		a.setErr("")
		a.r.history.add(ev.Epoch, "arbiter", fmt.Sprintf("lease held at epoch %d: writes may be acknowledged until %s without a renewal", ev.Epoch, ev.Deadline.Format("15:04:05.000")))
	default:
		a.setErr(errString(ev.Err))
		a.r.history.add(ev.Epoch, "arbiter", fmt.Sprintf("lease NOT held at epoch %d: writes the target does not acknowledge are held (%v)", ev.Epoch, ev.Err))
	}
	a.mu.Lock()
	a.broadcastLocked()
	a.mu.Unlock()
	a.r.notify(ha.Event{Type: ha.EvLease, Held: ev.Held, Err: errString(ev.Err)})
}

func errString(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}

func (a *arbiterSide) setErr(s string) {
	a.mu.Lock()
	a.lastErr = s
	a.mu.Unlock()
}

// watch reports every epoch the arbiter grants above this side's.
func (a *arbiterSide) watch(ctx context.Context) {
	a.c.WatchEpoch(ctx, a.r.rec.Spec.Name, func(rec arbiter.EpochRecord) {
		if rec.Epoch > a.r.epoch.Load() && rec.Holder != a.r.rec.Self {
			a.r.history.add(a.r.epoch.Load(), "arbiter", fmt.Sprintf("the arbiter granted epoch %d to %s (%s)", rec.Epoch, rec.Holder, rec.Reason))
			a.r.notify(ha.Event{Type: ha.EvEpochSeen, Epoch: rec.Epoch})
		}
	})
}

// startCampaign asks the arbiter for epoch (the state machine's
// ActCampaign) until it is granted, refused for good, or stopped; each
// answer goes to the state machine (ha.EvPromotion).
func (a *arbiterSide) startCampaign(epoch uint64, force bool, why string) {
	a.mu.Lock()
	if a.campaign != nil {
		a.campaign()
	}
	ctx, cancel := context.WithCancel(a.r.ctx)
	a.campaign = cancel
	a.mu.Unlock()
	spec := a.r.rec.Spec
	req := arbiter.PromoteRequest{Job: spec.Name, Self: a.r.rec.Self, Peer: a.peer, Epoch: epoch - 1,
		RequireInSync: a.sync && !force, TTL: a.ttl, Reason: why}
	a.r.history.add(epoch-1, "arbiter", fmt.Sprintf("campaign for epoch %d (forced %t, in sync required %t)", epoch, force, req.RequireInSync))
	retry := max(spec.Monitor.Interval, 200*time.Millisecond)
	go func() {
		defer func() {
			a.mu.Lock()
			if a.campaign != nil && ctx.Err() == nil {
				a.campaign = nil
			}
			a.status = ""
			a.mu.Unlock()
			cancel()
		}()
		last := ""
		for {
			var h *arbiter.Holder
			var got uint64
			var err error
			if force {
				a.setStatus("forced takeover: revoking the old source's lease and waiting one TTL (" + a.ttl.String() + ")")
				h, got, err = a.c.ForceTakeover(ctx, req, a.onHolder)
			} else {
				h, got, err = a.c.Promote(ctx, req, a.onHolder)
			}
			if err == nil {
				a.mu.Lock()
				a.pending = h
				a.campaign = nil
				a.mu.Unlock()
				a.r.history.add(got, "arbiter", fmt.Sprintf("promoted: the arbiter granted epoch %d to %s", got, a.r.rec.Self))
				a.r.notifyWait(ha.Event{Type: ha.EvPromotion, Epoch: got})
				return
			}
			if ctx.Err() != nil {
				return
			}
			final := errors.Is(err, arbiter.ErrStaleEpoch) || errors.Is(err, arbiter.ErrOutOfSync) || force
			if msg := err.Error(); msg != last {
				last = msg
				verb := "refused for now"
				if final {
					verb = "refused"
				}
				a.r.history.add(epoch-1, "arbiter", fmt.Sprintf("campaign for epoch %d %s: %v", epoch, verb, err))
			}
			a.setStatus(err.Error())
			a.r.notifyWait(ha.Event{Type: ha.EvPromotion, Err: err.Error(), Final: final})
			if final {
				return
			}
			select {
			case <-ctx.Done():
				return
			case <-time.After(retry):
			}
		}
	}()
}

func (a *arbiterSide) setStatus(s string) {
	a.mu.Lock()
	a.status = s
	a.mu.Unlock()
}

// stopCampaign stops asking (the source came back).
func (a *arbiterSide) stopCampaign() {
	a.mu.Lock()
	if a.campaign != nil {
		a.campaign()
		a.campaign = nil
	}
	a.mu.Unlock()
	a.r.history.add(a.r.epoch.Load(), "arbiter", "campaign stopped: the source is heard again")
}

// resign gives the key up (a drained switchover source).
func (a *arbiterSide) resign(ctx context.Context) error {
	a.mu.Lock()
	h := a.holder
	a.holder = nil
	a.broadcastLocked()
	a.mu.Unlock()
	if h == nil {
		return nil
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	err := h.Resign(ctx)
	a.r.history.add(h.Epoch(), "arbiter", fmt.Sprintf("resigned the leadership key at epoch %d (handing over): %v", h.Epoch(), errOrOK(err)))
	return err
}

func errOrOK(err error) string {
	if err == nil {
		return "ok"
	}
	return err.Error()
}

// close stops everything (the runner stops): the key stays on its lease,
// so a restarted agent takes it back.
func (a *arbiterSide) close() {
	a.closed.Store(true)
	a.mu.Lock()
	hs := []*arbiter.Holder{a.holder, a.pending}
	a.holder, a.pending = nil, nil
	if a.campaign != nil {
		a.campaign()
		a.campaign = nil
	}
	a.broadcastLocked()
	a.mu.Unlock()
	for _, h := range hs {
		if h != nil {
			h.Stop()
		}
	}
}

// AckLocal implements replstate.Authority: a write the target has not
// acknowledged is acknowledged only while this source holds its lease and,
// in sync mode, once the arbiter records the target out of sync. It waits
// up to the job's suspend timeout, then fails with EIO; at once when this
// side was superseded.
func (a *arbiterSide) AckLocal(ctx context.Context) error {
	if a.suspend >= 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, a.suspendOrDefault())
		defer cancel()
	}
	for {
		if a.fenced.Load() {
			return fmt.Errorf("%w: %s was superseded: this write was never acknowledged", syscall.EIO, a.r.rec.Self)
		}
		if a.closed.Load() {
			return fmt.Errorf("%w: job %s stopped on %s before this write could be acknowledged", syscall.EIO, a.r.rec.Spec.Name, a.r.rec.Self)
		}
		a.mu.Lock()
		h, ch := a.holder, a.changed
		a.mu.Unlock()
		var hch <-chan struct{}
		if h != nil {
			if h.Valid(time.Now()) {
				if !a.sync || a.marks.outOfSync() {
					return nil
				}
				if err := a.marks.markOut(ctx); err == nil {
					a.marks.watch(a.r.ctx)
					return nil
				} else if !errors.Is(err, errNoLease) {
					a.setErr(err.Error())
				}
			}
			hch = h.Changed()
		}
		select {
		case <-ctx.Done():
			if errors.Is(ctx.Err(), context.DeadlineExceeded) {
				return fmt.Errorf("%w: write held %v without the lease or the target (suspend timeout): never acknowledged", syscall.EIO, a.suspendOrDefault())
			}
			return ctx.Err()
		case <-ch:
		case <-hch:
		case <-time.After(100 * time.Millisecond):
		}
	}
}

func (a *arbiterSide) suspendOrDefault() time.Duration {
	if a.suspend == 0 {
		return job.DefaultSuspendTimeout
	}
	return a.suspend
}

// TargetInSync implements replstate.Authority: the target holds every
// acknowledged write again; recorded (retried until the lease is held)
// while holds still says so.
func (a *arbiterSide) TargetInSync(holds func() bool) {
	if !a.sync {
		return
	}
	a.marks.targetInSync(a.r.ctx, holds)
}

// status is the arbiter part of the job's status.
func (a *arbiterSide) statusView() *api.ArbiterStatus {
	a.mu.Lock()
	h, campaign, lastErr := a.holder, a.status, a.lastErr
	a.mu.Unlock()
	st := &api.ArbiterStatus{Endpoints: a.c.Endpoints(), TTL: a.ttl, LeaseAge: -1, Campaign: campaign, Error: lastErr,
		TargetOutOfSync: a.sync && a.marks.out.Load()}
	if h != nil {
		st.Holding = h.Valid(time.Now())
		if last := h.LastRenewal(); !last.IsZero() {
			st.LeaseAge = time.Since(last)
		}
	}
	return st
}
