package agent

import (
	"context"
	"net/netip"
	"time"

	"github.com/doppelha/doppel/blockdev"
	"github.com/doppelha/doppel/daemon/api"
	"github.com/doppelha/doppel/daemon/arbiter"
	"github.com/doppelha/doppel/daemon/ha"
	"github.com/doppelha/doppel/daemon/job"
	"github.com/doppelha/doppel/daemon/monitor"
	"github.com/doppelha/doppel/daemon/replstate"
	volsnap "github.com/doppelha/doppel/daemon/snapshot"
	"github.com/doppelha/doppel/netident"
)

// The agent reaches every effect through the small interfaces below, so the
// state machine's actions map one-to-one onto them and each can be replaced
// in tests. A nil field of Subsystems means "not wired in this build": the
// actions that need it fail with api.ErrNotWired and status says so.

// DataPlane is the data side of one job on this agent: the replication
// engine (daemon/repl) with its bitmap, queue and generations. It reports
// link and sync facts to the state machine through the notify function its
// factory received (ha.EvLinkUp, EvLinkDown, EvResync, EvSynced).
type DataPlane interface {
	// StartSource connects to the peer and ships writes, mirroring or
	// resyncing (dirty chunks only) as the generations require.
	StartSource(ctx context.Context) error
	StopSource() error
	// StartTarget accepts the peer's stream and applies it.
	StartTarget(ctx context.Context) error
	// StopTarget stops applying; applyQueue first applies what is queued.
	StopTarget(applyQueue bool) error
	// Promote starts a new generation at epoch (failover, failback).
	Promote(epoch uint64) error
	Pause() error
	Resume() error
	// Quiesce holds application writes and returns when every
	// acknowledged write is on the peer (switchover, failback).
	Quiesce(ctx context.Context) error
	// ResumeWrites ends a quiesce without a switchover: held writes go on.
	ResumeWrites() error
	// Mutator is the write path of the served volume (nil: direct).
	Mutator() blockdev.Mutator
	Status() api.DataStatus
	Verify(ctx context.Context) (api.VerifyResult, error)
	Close() error
}

// DataPlaneFactory opens the data plane of a job on this agent. vol is the
// job's volume, opened once and exclusively for as long as the job exists
// on this agent: the data plane uses it and never closes it.
type DataPlaneFactory func(rec job.Record, vol JobVolume, fence Fencing, notify func(ha.Event)) (DataPlane, error)

// Fencing is what a data plane needs of the job's epoch and arbiter
// (docs/safety.md): the epoch travels in every replication handshake, a
// newer one learned there is reported, and the authority decides whether
// a write the target has not acknowledged may be acknowledged.
type Fencing struct {
	// Epoch returns the job's current epoch on this agent.
	Epoch func() uint64
	// NewerEpoch reports an epoch above Epoch learned in a handshake (a
	// source that sees it fences itself).
	NewerEpoch func(epoch uint64)
	// Authority is the arbiter's gate (nil: no arbiter).
	Authority replstate.Authority
	// SyncTimeout: sync mode, how long writes wait for an absent target
	// before the source continues without it (0: replstate's default).
	SyncTimeout time.Duration
}

// JobVolume is a job's volume as its data plane sees it.
type JobVolume struct {
	Backend blockdev.Backend
	// Binding ties the job's replication state to this job incarnation
	// and this volume (state of another is set aside).
	Binding replstate.Binding
	// BeforeInconsistent is called on the target before its copy turns
	// inconsistent (replstate.TargetConfig.BeforeInconsistent): the
	// automatic snapshot. Nil: none.
	BeforeInconsistent func(p volsnap.Point, why string) error
}

// Volumes serves a job's volume to local applications.
type Volumes interface {
	// Serve exports the job's volume b (the job keeps it open: Stop does
	// not close it) with writes going through m (nil: direct) and returns
	// where applications find it (/dev/nbdN or unix:PATH).
	Serve(ctx context.Context, spec job.Spec, b blockdev.Backend, m blockdev.Mutator) (device string, err error)
	// Stop stops serving the job's volume (no-op when not served).
	Stop(job string) error
	// Device returns where the job's volume is served, "" when it is not.
	Device(job string) string
	// InUse says who uses the job's served volume (NBD clients, mounts,
	// processes holding /dev/nbdN open); empty when nobody does or it is
	// not served.
	InUse(job string) []string
}

// NetIdent takes and releases service addresses (netident).
type NetIdent interface {
	Apply(ctx context.Context, addrs []netident.Addr) error
	Release(ctx context.Context, addrs []netident.Addr) error
}

// Liveness is the probe side of failure detection: it sends a job's
// authenticated heartbeats to the peer on every path and timestamps and
// counts the peer's, per job and path (deleting or changing one job never
// changes what another sees). The policy (down after interval × missed of
// silence on every path, up again after rise packets) is daemon/monitor's.
type Liveness interface {
	// Watch starts the job's heartbeats to, and the counting of, its peer
	// on every path. Watching a watched job changes nothing.
	Watch(w LivenessWatch) error
	// Unwatch stops them and forgets the job's counters.
	Unwatch(job string)
	// SetEpoch changes the epoch the job's heartbeats announce (the
	// fencing token; the peer reads it in its samples' PeerEpoch).
	SetEpoch(job string, epoch uint64)
	// Sample is what the probe knows about a path: the arrival time of
	// the peer's newest authenticated packet on CLOCK_MONOTONIC
	// (heartbeat.Now's clock; zero: never), the cumulative count, and the
	// epoch the peer's newest heartbeat announced.
	Sample(job, path string) (monitor.Sample, error)
	// Mode is the probe mode in use (xdp-generic, userspace...).
	Mode() string
}

// LivenessWatch is what Liveness.Watch needs of a job.
type LivenessWatch struct {
	Job string
	// Self and Peer name the two endpoints: each direction has its own
	// heartbeat key, derived from Secret.
	Self, Peer string
	Secret     string
	// Paths are the monitored paths by name (repl, app).
	Paths    map[string]PathAddrs
	Interval time.Duration
	// Epoch is announced until SetEpoch changes it.
	Epoch uint64
}

// PathAddrs are one path's addresses: this host's (heartbeats leave from
// it, so the peer recognises the path; invalid: the route's choice) and
// the peer's. Session marks the path the replication session runs on: its
// authenticated frames count as that path's liveness too.
type PathAddrs struct {
	Local, Peer netip.Addr
	Session     bool
}

// Peers delivers state-machine messages to the peer agent of a job.
type Peers interface {
	Send(ctx context.Context, spec job.Spec, m ha.Message) error
}

// Listener is a listener the agent opens when it starts serving and
// closes when it stops (the replication listener: ReplPlanes).
type Listener interface {
	Listen() error
	Close() error
}

// Subsystems are the parts the agent drives. Nil means not wired.
type Subsystems struct {
	DataPlane DataPlaneFactory
	// ReplListener, when set, is open while the agent serves.
	ReplListener Listener
	Volumes      Volumes
	NetIdent     NetIdent
	Liveness     Liveness
	Peers        Peers
	Scripts      *Scripts
	// Arbiter is the agent's etcd arbiter (nil: none configured); jobs
	// created with --arbiter etcd need it.
	Arbiter *arbiter.Client
}

// peerClient delivers messages over the peer's control API, pinning its
// certificate and authenticating with the job's secret.
type peerClient struct{}

func (peerClient) Send(ctx context.Context, spec job.Spec, m ha.Message) error {
	var ep job.Endpoint
	switch m.To {
	case spec.Source.Name:
		ep = spec.Source
	case spec.Target.Name:
		ep = spec.Target
	default:
		return api.ErrNotWired
	}
	c, err := api.NewClient(ep.Control, spec.Secret, ep.Fingerprint)
	if err != nil {
		return err
	}
	return c.PeerMessage(ctx, spec.Name, m)
}
