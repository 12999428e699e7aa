// Package arbiter is doppel's arbitration on etcd (docs/safety.md): per job,
// the epoch record (the fencing token, only ever growing), the leadership
// key the source holds on a lease, and the in-sync record of a sync target.
// Every change is one etcd transaction guarded by the revisions read just
// before, so two agents can never both be granted an epoch, and a target is
// promoted only when no source holds the lease.
//
// A Holder is the source's side: it acquires the key, renews it (a lease
// keep-alive and a check that the key is still its own), and answers, on
// the monotonic clock, whether the source may still acknowledge writes the
// target has not acknowledged: until the start of its last successful
// renewal plus TTL minus a margin. Promote, ForceTakeover and View are the
// target's and the operator's side.
package arbiter

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"path"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
)

// Defaults (docs/safety.md, "Timings").
const (
	DefaultPrefix      = "/doppel"
	DefaultTTL         = 5 * time.Second
	MinTTL             = 2 * time.Second
	DefaultDialTimeout = 2 * time.Second
)

// Refusals of Promote and of acquiring the key. Each is wrapped with the
// reason in the operator's words.
var (
	// ErrLeaderPresent: a source holds the leadership key on a live lease.
	ErrLeaderPresent = errors.New("the source holds the lease")
	// ErrStaleEpoch: the arbiter's epoch is not the one this side knows:
	// someone else was promoted (or this side is behind).
	ErrStaleEpoch = errors.New("the epoch moved on")
	// ErrOutOfSync: a sync target the source marked as missing writes.
	ErrOutOfSync = errors.New("the target is out of sync")
	// ErrSuperseded: a holder found a newer epoch: it must fence itself.
	ErrSuperseded = errors.New("superseded by a newer epoch")
	// ErrNotHeld: the holder does not hold the key (lease lost, never
	// acquired, resigned).
	ErrNotHeld = errors.New("the lease is not held")
)

// Config is how an agent reaches the arbiter.
type Config struct {
	Endpoints   []string
	TLS         *tls.Config // nil: plaintext
	Prefix      string      // key prefix (DefaultPrefix)
	DialTimeout time.Duration
	Log         *slog.Logger
}

// Client talks to the etcd cluster. It is safe for concurrent use; jobs
// share one.
type Client struct {
	cfg Config
	cli *clientv3.Client
	log *slog.Logger
}

// Dial connects to the etcd endpoints (lazily: an unreachable cluster is
// not an error here, every operation has its own timeout).
func Dial(cfg Config) (*Client, error) {
	if len(cfg.Endpoints) == 0 {
		return nil, errors.New("arbiter: no etcd endpoint")
	}
	if cfg.Prefix == "" {
		cfg.Prefix = DefaultPrefix
	}
	if cfg.DialTimeout == 0 {
		cfg.DialTimeout = DefaultDialTimeout
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	cli, err := clientv3.New(clientv3.Config{
		Endpoints:            cfg.Endpoints,
		DialTimeout:          cfg.DialTimeout,
		DialKeepAliveTime:    time.Second,
		DialKeepAliveTimeout: time.Second,
		TLS:                  cfg.TLS,
		Logger:               zap.NewNop(),
	})
	if err != nil {
		return nil, fmt.Errorf("arbiter: connect to %v: %w", cfg.Endpoints, err)
	}
	return &Client{cfg: cfg, cli: cli, log: cfg.Log}, nil
}

// Close closes the connection to etcd.
func (c *Client) Close() error { return c.cli.Close() }

// Endpoints are the etcd endpoints.
func (c *Client) Endpoints() []string { return c.cfg.Endpoints }

func (c *Client) key(job, name string) string { return path.Join(c.cfg.Prefix, "jobs", job, name) }

// EpochRecord is the value of PREFIX/jobs/JOB/epoch: the last epoch
// granted, to whom, when and why. It only ever grows.
type EpochRecord struct {
	Epoch  uint64    `json:"epoch"`
	Holder string    `json:"holder"`
	At     time.Time `json:"at"`
	Reason string    `json:"reason,omitempty"`
	Forced bool      `json:"forced,omitempty"`
}

// LeaderRecord is the value of PREFIX/jobs/JOB/leader, attached to the
// holder's lease: while it exists nobody else can be promoted.
type LeaderRecord struct {
	Holder string `json:"holder"`
	Epoch  uint64 `json:"epoch"`
	Lease  int64  `json:"lease"`
}

// SyncRecord is the value of PREFIX/jobs/JOB/insync (sync mode): whether
// the target holds every write the source acknowledged, written by the
// holder under its key.
type SyncRecord struct {
	Epoch  uint64    `json:"epoch"`
	Target string    `json:"target"`
	InSync bool      `json:"in_sync"`
	At     time.Time `json:"at"`
}

// View is what the arbiter holds for a job, read in one transaction.
type View struct {
	Epoch     *EpochRecord  `json:"epoch,omitempty"` // nil: no epoch granted yet
	Leader    *LeaderRecord `json:"leader,omitempty"`
	Sync      *SyncRecord   `json:"insync,omitempty"`
	LeaseTTL  int64         `json:"lease_ttl_seconds,omitempty"` // the leader's lease: seconds left (-1 unknown)
	Revision  int64         `json:"revision"`
	epochRev  int64
	leaderRev int64
	syncRev   int64
}

// View reads the job's records.
func (c *Client) View(ctx context.Context, job string) (View, error) {
	var v View
	resp, err := c.cli.Txn(ctx).Then(
		clientv3.OpGet(c.key(job, "epoch")),
		clientv3.OpGet(c.key(job, "leader")),
		clientv3.OpGet(c.key(job, "insync")),
	).Commit()
	if err != nil {
		return v, fmt.Errorf("arbiter: read job %s: %w", job, err)
	}
	v.Revision = resp.Header.Revision
	for i, r := range resp.Responses {
		kvs := r.GetResponseRange().Kvs
		if len(kvs) == 0 {
			continue
		}
		kv := kvs[0]
		switch i {
		case 0:
			v.Epoch, v.epochRev = new(EpochRecord), kv.ModRevision
			err = json.Unmarshal(kv.Value, v.Epoch)
		case 1:
			v.Leader, v.leaderRev = new(LeaderRecord), kv.ModRevision
			err = json.Unmarshal(kv.Value, v.Leader)
		case 2:
			v.Sync, v.syncRev = new(SyncRecord), kv.ModRevision
			err = json.Unmarshal(kv.Value, v.Sync)
		}
		if err != nil {
			return v, fmt.Errorf("arbiter: job %s: malformed record %s: %w", job, kv.Key, err)
		}
	}
	v.LeaseTTL = -1
	if v.Leader != nil {
		if ttl, err := c.cli.TimeToLive(ctx, clientv3.LeaseID(v.Leader.Lease)); err == nil {
			v.LeaseTTL = ttl.TTL
		}
	}
	return v, nil
}

// CurrentEpoch is the epoch granted so far (0: none).
func (v View) CurrentEpoch() uint64 {
	if v.Epoch == nil {
		return 0
	}
	return v.Epoch.Epoch
}

func mustJSON(v any) string {
	b, err := json.Marshal(v)
	if err != nil {
		panic(err) // plain structs of strings and numbers
	}
	return string(b)
}

// ttlSeconds rounds a TTL up to etcd's whole seconds.
func ttlSeconds(d time.Duration) int64 { return int64((d + time.Second - 1) / time.Second) }

// PromoteRequest asks for the next epoch.
type PromoteRequest struct {
	Job  string
	Self string // the target being promoted
	Peer string // the old source (the new target)
	// Epoch is the epoch this side replicated under: the arbiter's must be
	// the same (0 when the arbiter never granted one).
	Epoch uint64
	// RequireInSync: sync mode, the arbiter must record this side as in sync.
	RequireInSync bool
	TTL           time.Duration
	Reason        string
}

// Promote is the target's transaction: it succeeds only if no source holds
// the key, the epoch is still req.Epoch and (sync mode) this side is in
// sync; it writes epoch+1, takes the key on a new lease and returns the
// Holder that renews it.
func (c *Client) Promote(ctx context.Context, req PromoteRequest, onEvent func(HolderEvent)) (*Holder, uint64, error) {
	v, err := c.View(ctx, req.Job)
	if err != nil {
		return nil, 0, err
	}
	if err := checkPromotable(v, req); err != nil {
		return nil, 0, err
	}
	epoch := v.CurrentEpoch() + 1
	lease, err := c.cli.Grant(ctx, ttlSeconds(req.TTL))
	if err != nil {
		return nil, 0, fmt.Errorf("arbiter: grant a lease: %w", err)
	}
	cmps := []clientv3.Cmp{
		clientv3.Compare(clientv3.CreateRevision(c.key(req.Job, "leader")), "=", 0),
		clientv3.Compare(clientv3.ModRevision(c.key(req.Job, "epoch")), "=", v.epochRev),
	}
	if req.RequireInSync {
		cmps = append(cmps, clientv3.Compare(clientv3.ModRevision(c.key(req.Job, "insync")), "=", v.syncRev))
	}
	now := time.Now().UTC()
	leader := LeaderRecord{Holder: req.Self, Epoch: epoch, Lease: int64(lease.ID)}
	start := time.Now()
	resp, err := c.cli.Txn(ctx).If(cmps...).Then(
		clientv3.OpPut(c.key(req.Job, "epoch"), mustJSON(EpochRecord{Epoch: epoch, Holder: req.Self, At: now, Reason: req.Reason})),
		clientv3.OpPut(c.key(req.Job, "leader"), mustJSON(leader), clientv3.WithLease(lease.ID)),
		clientv3.OpPut(c.key(req.Job, "insync"), mustJSON(SyncRecord{Epoch: epoch, Target: req.Peer, At: now})),
	).Commit()
	if err != nil {
		c.cli.Revoke(context.Background(), lease.ID)
		return nil, 0, fmt.Errorf("arbiter: promote %s: %w", req.Self, err)
	}
	if !resp.Succeeded {
		c.cli.Revoke(context.Background(), lease.ID)
		// Something changed between the read and the transaction: say what.
		if v2, err := c.View(ctx, req.Job); err == nil {
			if err := checkPromotable(v2, req); err != nil {
				return nil, 0, err
			}
		}
		return nil, 0, fmt.Errorf("%w: the records changed while %s was being promoted; try again", ErrStaleEpoch, req.Self)
	}
	h := c.newHolder(req.Job, req.Self, epoch, req.TTL, onEvent)
	h.start(lease.ID, resp.Header.Revision, start)
	return h, epoch, nil
}

func checkPromotable(v View, req PromoteRequest) error {
	switch {
	case v.Leader != nil:
		left := ""
		if v.LeaseTTL >= 0 {
			left = fmt.Sprintf(", its lease expires in %ds unless renewed", v.LeaseTTL)
		}
		return fmt.Errorf("%w: %s holds the leadership key at epoch %d%s", ErrLeaderPresent, v.Leader.Holder, v.Leader.Epoch, left)
	case v.CurrentEpoch() != req.Epoch:
		holder := ""
		if v.Epoch != nil {
			holder = " (granted to " + v.Epoch.Holder + ")"
		}
		return fmt.Errorf("%w: the arbiter is at epoch %d%s, %s replicated under epoch %d", ErrStaleEpoch, v.CurrentEpoch(), holder, req.Self, req.Epoch)
	case req.RequireInSync && (v.Sync == nil || !v.Sync.InSync || v.Sync.Target != req.Self || v.Sync.Epoch != req.Epoch):
		why := "the source never recorded it in sync"
		if v.Sync != nil && v.Sync.Target == req.Self && !v.Sync.InSync {
			why = fmt.Sprintf("the source recorded it out of sync at %s (it continued without it)", v.Sync.At.Format(time.RFC3339))
		}
		return fmt.Errorf("%w: %s may miss acknowledged writes: %s", ErrOutOfSync, req.Self, why)
	}
	return nil
}

// ForceTakeover is doppel failover --force with an arbiter: it moves the
// epoch to req.Epoch+1 for req.Self and deletes the leadership key in one
// transaction (the old source can neither renew nor re-acquire), revokes
// the old lease, waits one full TTL on the monotonic clock (the old
// source's own deadline passes before that), then takes the key. The
// in-sync record is ignored: the operator accepted to lose what the target
// may lack.
func (c *Client) ForceTakeover(ctx context.Context, req PromoteRequest, onEvent func(HolderEvent)) (*Holder, uint64, error) {
	v, err := c.View(ctx, req.Job)
	if err != nil {
		return nil, 0, err
	}
	if v.CurrentEpoch() != req.Epoch {
		return nil, 0, fmt.Errorf("%w: the arbiter is at epoch %d, %s replicated under epoch %d: another side was promoted", ErrStaleEpoch, v.CurrentEpoch(), req.Self, req.Epoch)
	}
	epoch := req.Epoch + 1
	now := time.Now().UTC()
	resp, err := c.cli.Txn(ctx).If(
		clientv3.Compare(clientv3.ModRevision(c.key(req.Job, "epoch")), "=", v.epochRev),
	).Then(
		clientv3.OpPut(c.key(req.Job, "epoch"), mustJSON(EpochRecord{Epoch: epoch, Holder: req.Self, At: now, Reason: req.Reason, Forced: true})),
		clientv3.OpDelete(c.key(req.Job, "leader")),
		clientv3.OpPut(c.key(req.Job, "insync"), mustJSON(SyncRecord{Epoch: epoch, Target: req.Peer, At: now})),
	).Commit()
	if err != nil {
		return nil, 0, fmt.Errorf("arbiter: forced takeover: %w", err)
	}
	if !resp.Succeeded {
		return nil, 0, fmt.Errorf("%w: the epoch changed during the forced takeover", ErrStaleEpoch)
	}
	fenced := time.Now()
	if v.Leader != nil {
		c.cli.Revoke(ctx, clientv3.LeaseID(v.Leader.Lease)) // best effort: the key is gone anyway
	}
	c.log.Warn("forced takeover: epoch moved, waiting one lease TTL for the old source to stop", "job", req.Job, "epoch", epoch, "ttl", req.TTL)
	t := time.NewTimer(req.TTL - time.Since(fenced))
	select {
	case <-ctx.Done():
		t.Stop()
		return nil, 0, fmt.Errorf("arbiter: forced takeover at epoch %d interrupted before the old lease ran out (run it again): %w", epoch, ctx.Err())
	case <-t.C:
	}
	lease, err := c.cli.Grant(ctx, ttlSeconds(req.TTL))
	if err != nil {
		return nil, 0, fmt.Errorf("arbiter: grant a lease: %w", err)
	}
	start := time.Now()
	resp, err = c.cli.Txn(ctx).If(
		clientv3.Compare(clientv3.ModRevision(c.key(req.Job, "epoch")), "=", resp.Header.Revision),
		clientv3.Compare(clientv3.CreateRevision(c.key(req.Job, "leader")), "=", 0),
	).Then(
		clientv3.OpPut(c.key(req.Job, "leader"), mustJSON(LeaderRecord{Holder: req.Self, Epoch: epoch, Lease: int64(lease.ID)}), clientv3.WithLease(lease.ID)),
	).Commit()
	if err != nil || !resp.Succeeded {
		c.cli.Revoke(context.Background(), lease.ID)
		if err == nil {
			err = fmt.Errorf("%w: the records changed during the forced takeover", ErrStaleEpoch)
		}
		return nil, 0, fmt.Errorf("arbiter: take the key at epoch %d: %w", epoch, err)
	}
	h := c.newHolder(req.Job, req.Self, epoch, req.TTL, onEvent)
	h.start(lease.ID, resp.Header.Revision, start)
	return h, epoch, nil
}

// WatchEpoch calls fn with every epoch record written for job until ctx
// ends (a watch; it resumes after errors).
func (c *Client) WatchEpoch(ctx context.Context, job string, fn func(EpochRecord)) {
	key := c.key(job, "epoch")
	for ctx.Err() == nil {
		wch := c.cli.Watch(clientv3.WithRequireLeader(ctx), key)
		for resp := range wch {
			for _, ev := range resp.Events {
				if ev.Type != clientv3.EventTypePut {
					continue
				}
				var rec EpochRecord
				if json.Unmarshal(ev.Kv.Value, &rec) == nil {
					fn(rec)
				}
			}
		}
		select {
		case <-ctx.Done():
		case <-time.After(500 * time.Millisecond):
		}
	}
}

// DeleteJob removes the job's records (job delete), unless a live lease
// holds the key.
func (c *Client) DeleteJob(ctx context.Context, job string) error {
	resp, err := c.cli.Txn(ctx).If(
		clientv3.Compare(clientv3.CreateRevision(c.key(job, "leader")), "=", 0),
	).Then(clientv3.OpDelete(c.key(job, "")+"/", clientv3.WithPrefix())).Commit()
	if err != nil {
		return fmt.Errorf("arbiter: delete job %s: %w", job, err)
	}
	if !resp.Succeeded {
		return fmt.Errorf("%w: job %s's key is still held", ErrLeaderPresent, job)
	}
	return nil
}
