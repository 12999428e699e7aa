package arbiter

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sync"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// Margin is how long before its lease can expire a holder stops counting
// itself as holding: max(1 s, 30% of the TTL). It covers clock rate drift,
// scheduling delays and etcd's own slack (docs/safety.md).
func Margin(ttl time.Duration) time.Duration { return max(time.Second, ttl*3/10) }

// HolderEvent reports a change of a holder's standing.
type HolderEvent struct {
	// Held: the key is held and the deadline has not passed.
	Held bool
	// Epoch is the holder's epoch.
	Epoch uint64
	// Superseded > 0: the arbiter granted that newer epoch to another side;
	// the holder stopped and the source must fence itself.
	Superseded uint64
	// Err says why the key is not held (the last failure), nil when held.
	Err error
	// Deadline is when the holder stops counting itself as holding unless
	// a renewal succeeds first (monotonic).
	Deadline time.Time
}

// Holder is the source's side of a job's lease: it acquires the
// leadership key at its epoch and renews it every TTL/5, until stopped,
// resigned or superseded.
type Holder struct {
	c       *Client
	job     string
	self    string
	epoch   uint64
	ttl     time.Duration
	margin  time.Duration
	onEvent func(HolderEvent)

	ctx    context.Context
	cancel context.CancelFunc
	done   chan struct{}

	mu         sync.Mutex
	lease      clientv3.LeaseID
	leaderRev  int64
	renewed    time.Time // start of the last successful acquisition or renewal
	held       bool      // the last attempt found the key ours
	superseded uint64
	lastErr    error
	changed    chan struct{} // closed and replaced at every change
	reported   HolderEvent
}

func (c *Client) newHolder(job, self string, epoch uint64, ttl time.Duration, onEvent func(HolderEvent)) *Holder {
	if ttl < MinTTL {
		ttl = MinTTL
	}
	if onEvent == nil {
		onEvent = func(HolderEvent) {}
	}
	ctx, cancel := context.WithCancel(context.Background())
	return &Holder{c: c, job: job, self: self, epoch: epoch, ttl: ttl, margin: Margin(ttl), onEvent: onEvent,
		ctx: ctx, cancel: cancel, done: make(chan struct{}), changed: make(chan struct{})}
}

// Hold starts holding job's key as self at epoch: acquire (re-taking a key
// this side's previous process left on its lease), then renew. The holder
// reports every change of standing to onEvent (from its own goroutine).
func (c *Client) Hold(job, self string, epoch uint64, ttl time.Duration, onEvent func(HolderEvent)) *Holder {
	h := c.newHolder(job, self, epoch, ttl, onEvent)
	go h.run()
	return h
}

// start makes a holder that already holds the key (Promote) renew it.
func (h *Holder) start(lease clientv3.LeaseID, leaderRev int64, acquired time.Time) {
	h.mu.Lock()
	h.lease, h.leaderRev, h.renewed, h.held = lease, leaderRev, acquired, true
	h.mu.Unlock()
	go h.run()
}

// Epoch is the holder's epoch.
func (h *Holder) Epoch() uint64 { return h.epoch }

// TTL is the lease's time to live.
func (h *Holder) TTL() time.Duration { return h.ttl }

// Valid reports whether the holder counts itself as holding at now: the
// key was its own at the last renewal, started before now − (TTL − margin).
func (h *Holder) Valid(now time.Time) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.validLocked(now)
}

func (h *Holder) validLocked(now time.Time) bool {
	return h.held && h.superseded == 0 && now.Before(h.deadlineLocked())
}

func (h *Holder) deadlineLocked() time.Time {
	if h.renewed.IsZero() {
		return time.Time{}
	}
	return h.renewed.Add(h.ttl - h.margin)
}

// Status is the holder's standing now.
func (h *Holder) Status() HolderEvent {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.eventLocked(time.Now())
}

// LastRenewal is when the last successful renewal started (zero: never).
func (h *Holder) LastRenewal() time.Time {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.renewed
}

func (h *Holder) eventLocked(now time.Time) HolderEvent {
	ev := HolderEvent{Held: h.validLocked(now), Epoch: h.epoch, Superseded: h.superseded, Deadline: h.deadlineLocked()}
	if !ev.Held {
		ev.Err = h.lastErr
		if ev.Err == nil {
			ev.Err = ErrNotHeld
		}
		if h.held && !now.Before(ev.Deadline) {
			ev.Err = fmt.Errorf("%w: no successful renewal since %s (deadline passed): %v", ErrNotHeld, h.renewed.Format("15:04:05.000"), h.lastErr)
		}
	}
	return ev
}

// Wait returns nil as soon as the holder counts itself as holding,
// ErrSuperseded once it was superseded, or ctx's error.
func (h *Holder) Wait(ctx context.Context) error {
	for {
		h.mu.Lock()
		now := time.Now()
		if h.validLocked(now) {
			h.mu.Unlock()
			return nil
		}
		if h.superseded > 0 {
			h.mu.Unlock()
			return fmt.Errorf("%w: epoch %d", ErrSuperseded, h.superseded)
		}
		ch := h.changed
		h.mu.Unlock()
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-ch:
		}
	}
}

// Changed is closed at the next change of standing.
func (h *Holder) Changed() <-chan struct{} {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.changed
}

// Stop stops renewing; the key stays until its lease expires (a restarted
// agent takes it back). Idempotent.
func (h *Holder) Stop() {
	h.cancel()
	<-h.done
}

// Resign stops renewing and gives the key up now (a planned switchover
// after the drain), so the peer can be promoted without waiting for the
// lease. It never touches a key that is not this holder's.
func (h *Holder) Resign(ctx context.Context) error {
	h.Stop()
	h.mu.Lock()
	lease, rev := h.lease, h.leaderRev
	h.held = false
	h.lastErr = fmt.Errorf("%w: resigned", ErrNotHeld)
	h.notifyLocked()
	h.mu.Unlock()
	if rev == 0 {
		return nil
	}
	resp, err := h.c.cli.Txn(ctx).If(
		clientv3.Compare(clientv3.ModRevision(h.c.key(h.job, "leader")), "=", rev),
	).Then(clientv3.OpDelete(h.c.key(h.job, "leader"))).Commit()
	if err != nil {
		return fmt.Errorf("arbiter: resign job %s: %w", h.job, err)
	}
	if lease != 0 {
		h.c.cli.Revoke(ctx, lease)
	}
	if !resp.Succeeded {
		return fmt.Errorf("%w: the key of job %s was no longer %s's", ErrNotHeld, h.job, h.self)
	}
	return nil
}

// MarkSync records, under the key, whether target holds every write the
// source acknowledged (sync mode). It fails with ErrNotHeld when the key is
// not this holder's any more.
func (h *Holder) MarkSync(ctx context.Context, target string, inSync bool) error {
	h.mu.Lock()
	rev := h.leaderRev
	valid := h.validLocked(time.Now())
	h.mu.Unlock()
	if !valid {
		return fmt.Errorf("%w: cannot record %s's sync state", ErrNotHeld, target)
	}
	resp, err := h.c.cli.Txn(ctx).If(
		clientv3.Compare(clientv3.ModRevision(h.c.key(h.job, "leader")), "=", rev),
	).Then(clientv3.OpPut(h.c.key(h.job, "insync"), mustJSON(SyncRecord{Epoch: h.epoch, Target: target, InSync: inSync, At: time.Now().UTC()}))).Commit()
	if err != nil {
		return fmt.Errorf("arbiter: record %s in sync=%t: %w", target, inSync, err)
	}
	if !resp.Succeeded {
		return fmt.Errorf("%w: the key of job %s changed", ErrNotHeld, h.job)
	}
	return nil
}

func (h *Holder) notifyLocked() {
	close(h.changed)
	h.changed = make(chan struct{})
}

// report emits an event when the standing changed since the last one.
func (h *Holder) report() {
	h.mu.Lock()
	ev := h.eventLocked(time.Now())
	last := h.reported
	changed := ev.Held != last.Held || ev.Superseded != last.Superseded || (!ev.Held && errString(ev.Err) != errString(last.Err))
	if changed {
		h.reported = ev
		h.notifyLocked()
	}
	h.mu.Unlock()
	if changed {
		h.onEvent(ev)
	}
}

func errString(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}

func (h *Holder) run() {
	defer close(h.done)
	every := h.ttl / 5
	for {
		h.mu.Lock()
		held := h.held
		h.mu.Unlock()
		if held {
			h.renew(every)
		} else {
			h.acquire(every)
		}
		h.report()
		h.mu.Lock()
		sup := h.superseded
		wake := every
		if dl := h.deadlineLocked(); h.validLocked(time.Now()) && time.Until(dl) < wake {
			wake = max(time.Until(dl), time.Millisecond) // report the loss at the deadline
		}
		h.mu.Unlock()
		if sup > 0 {
			return
		}
		t := time.NewTimer(wake)
		select {
		case <-h.ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
		h.report()
	}
}

// renew keeps the lease alive and checks the key is still this holder's;
// only when both succeed does the deadline move (from the start of the
// attempt).
func (h *Holder) renew(timeout time.Duration) {
	ctx, cancel := context.WithTimeout(h.ctx, timeout)
	defer cancel()
	start := time.Now()
	h.mu.Lock()
	lease, rev := h.lease, h.leaderRev
	h.mu.Unlock()
	if _, err := h.c.cli.KeepAliveOnce(ctx, lease); err != nil {
		h.fail(err, errors.Is(err, rpctypes.ErrLeaseNotFound))
		return
	}
	resp, err := h.c.cli.Txn(ctx).If(
		clientv3.Compare(clientv3.ModRevision(h.c.key(h.job, "leader")), "=", rev),
	).Else(clientv3.OpGet(h.c.key(h.job, "epoch"))).Commit()
	if err != nil {
		h.fail(err, false)
		return
	}
	if !resp.Succeeded {
		h.checkEpoch(resp)
		h.fail(fmt.Errorf("%w: the leadership key of job %s is not %s's any more", ErrNotHeld, h.job, h.self), true)
		return
	}
	h.mu.Lock()
	h.renewed, h.lastErr = start, nil
	h.mu.Unlock()
}

// fail records a failed attempt; lost: the key or lease is gone for sure
// (acquire again), else the deadline decides.
func (h *Holder) fail(err error, lost bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.ctx.Err() != nil {
		return
	}
	h.lastErr = err
	if lost {
		h.held = false
		h.lease, h.leaderRev = 0, 0
	}
}

func (h *Holder) checkEpoch(resp *clientv3.TxnResponse) {
	for _, r := range resp.Responses {
		for _, kv := range r.GetResponseRange().Kvs {
			var rec EpochRecord
			if json.Unmarshal(kv.Value, &rec) == nil && rec.Epoch > h.epoch {
				h.mu.Lock()
				h.superseded = rec.Epoch
				h.lastErr = fmt.Errorf("%w: epoch %d granted to %s (%s)", ErrSuperseded, rec.Epoch, rec.Holder, rec.Reason)
				h.mu.Unlock()
			}
		}
	}
}

// acquire takes the key at this holder's epoch: when nobody holds it, or
// when this side's previous process left it on its lease. A newer epoch
// means superseded; an older one is raised to this side's (epochs only
// grow); the same epoch granted to the other side is refused.
func (h *Holder) acquire(timeout time.Duration) {
	ctx, cancel := context.WithTimeout(h.ctx, max(timeout, time.Second))
	defer cancel()
	v, err := h.c.View(ctx, h.job)
	if err != nil {
		h.fail(err, false)
		return
	}
	cur := v.CurrentEpoch()
	switch {
	case cur > h.epoch:
		h.mu.Lock()
		h.superseded = cur
		h.lastErr = fmt.Errorf("%w: epoch %d granted to %s (%s)", ErrSuperseded, cur, v.Epoch.Holder, v.Epoch.Reason)
		h.mu.Unlock()
		return
	case cur == h.epoch && v.Epoch.Holder != h.self:
		h.fail(fmt.Errorf("%w: epoch %d was granted to %s, not %s", ErrStaleEpoch, cur, v.Epoch.Holder, h.self), false)
		return
	case v.Leader != nil && v.Leader.Holder != h.self:
		h.fail(fmt.Errorf("%w: %s holds the key at epoch %d", ErrLeaderPresent, v.Leader.Holder, v.Leader.Epoch), false)
		return
	}
	h.mu.Lock()
	lease := h.lease
	h.mu.Unlock()
	if lease == 0 {
		g, err := h.c.cli.Grant(ctx, ttlSeconds(h.ttl))
		if err != nil {
			h.fail(fmt.Errorf("arbiter: grant a lease: %w", err), false)
			return
		}
		lease = g.ID
		h.mu.Lock()
		h.lease = lease
		h.mu.Unlock()
	}
	start := time.Now()
	cmps := []clientv3.Cmp{clientv3.Compare(clientv3.ModRevision(h.c.key(h.job, "epoch")), "=", v.epochRev)}
	if v.Leader == nil {
		cmps = append(cmps, clientv3.Compare(clientv3.CreateRevision(h.c.key(h.job, "leader")), "=", 0))
	} else {
		cmps = append(cmps, clientv3.Compare(clientv3.ModRevision(h.c.key(h.job, "leader")), "=", v.leaderRev))
	}
	ops := []clientv3.Op{clientv3.OpPut(h.c.key(h.job, "leader"), mustJSON(LeaderRecord{Holder: h.self, Epoch: h.epoch, Lease: int64(lease)}), clientv3.WithLease(lease))}
	if cur < h.epoch {
		reason := "created"
		if cur > 0 {
			reason = fmt.Sprintf("raised from %d by the source", cur)
		}
		ops = append(ops, clientv3.OpPut(h.c.key(h.job, "epoch"), mustJSON(EpochRecord{Epoch: h.epoch, Holder: h.self, At: time.Now().UTC(), Reason: reason})))
	}
	resp, err := h.c.cli.Txn(ctx).If(cmps...).Then(ops...).Commit()
	if err != nil {
		h.fail(err, errors.Is(err, rpctypes.ErrLeaseNotFound)) // a dead lease: grant a new one
		return
	}
	if !resp.Succeeded {
		h.fail(fmt.Errorf("%w: the records changed while %s acquired the key; retrying", ErrNotHeld, h.self), false)
		return
	}
	h.mu.Lock()
	h.held, h.leaderRev, h.renewed, h.lastErr = true, resp.Header.Revision, start, nil
	h.mu.Unlock()
}
