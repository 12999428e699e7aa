// Package agent is the doppel agent (doppel agent): one struct that owns
// the daemon's subsystems, in the style of tailscale's tsd.System. It loads
// the jobs from the state directory, runs one failover state machine
// (daemon/ha) per job, serves the control API (daemon/api) and maps the
// state machine's actions onto the subsystems through small interfaces
// (seams.go): the data plane (replication), volume serving (blockdev),
// network identity (netident), the liveness probe (ebpf + monitor), peer
// messages and hook scripts. A subsystem left nil is "not wired": the
// actions that need it fail with api.ErrNotWired and status says so; the
// agent never pretends.
package agent

import (
	"context"
	"crypto/subtle"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/doppelha/doppel/daemon/api"
	"github.com/doppelha/doppel/daemon/ha"
	"github.com/doppelha/doppel/daemon/job"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
)

// Config is the agent's configuration (flags or /etc/doppel/agent.yaml).
type Config struct {
	StateDir      string `yaml:"state_dir"`      // default /var/lib/doppel
	ControlListen string `yaml:"control_listen"` // default :6320
	ReplListen    string `yaml:"repl_listen"`    // default :6325
	HeartbeatPort int    `yaml:"heartbeat_port"` // default 6326
	// ProbeMode is auto, xdp-driver, xdp-generic or userspace; ProbeIfaces
	// are the interfaces the XDP probe attaches to (none: the interface of
	// the route to each peer address).
	ProbeMode   string   `yaml:"probe_mode"`
	ProbeIfaces []string `yaml:"probe_interfaces"`
	// MetricsListen, if set, serves /metrics in plain HTTP without a
	// token on this address (the control port serves them with the API
	// token).
	MetricsListen string `yaml:"metrics_listen"`
	// MountInfo is where mounts are read from (default /proc/self/mountinfo).
	// Arbiter is how this agent reaches the etcd arbiter of the jobs
	// created with --arbiter etcd (docs/arbiter.md).
	Arbiter   ArbiterConfig `yaml:"arbiter"`
	MountInfo string        `yaml:"-"`
	Version   string        `yaml:"-"`
	// Successor starts the agent that takes over at a restart, given the
	// socket to talk to this one on (SuccessorCommand); nil: no restart.
	Successor func(sock *os.File) (Successor, error) `yaml:"-"`
}

// ArbiterConfig is the agent's etcd client configuration.
type ArbiterConfig struct {
	Endpoints []string `yaml:"endpoints"` // e.g. https://10.0.0.5:2379
	CA        string   `yaml:"ca"`        // CA file of the etcd servers' certificates (TLS)
	Cert      string   `yaml:"cert"`      // client certificate file (etcd client-cert-auth)
	Key       string   `yaml:"key"`       // its key file
	Prefix    string   `yaml:"prefix"`    // key prefix (default /doppel)
}

// Defaults fills unset fields.
func (c *Config) Defaults() {
	if c.StateDir == "" {
		c.StateDir = "/var/lib/doppel"
	}
	if c.ControlListen == "" {
		c.ControlListen = fmt.Sprintf(":%d", api.DefaultPort)
	}
	if c.ReplListen == "" {
		c.ReplListen = ":6325"
	}
	if c.HeartbeatPort == 0 {
		c.HeartbeatPort = 6326
	}
	if c.ProbeMode == "" {
		c.ProbeMode = "auto"
	}
	if c.MountInfo == "" {
		c.MountInfo = "/proc/self/mountinfo"
	}
}

// Agent owns every subsystem of a running doppel agent.
type Agent struct {
	Log      *slog.Logger
	Config   Config
	Hostname string
	// Credentials is the agent's certificate and API token.
	Credentials *api.Credentials
	// Store persists job records under StateDir/jobs.
	Store *job.Store
	// Metrics is the registry served on /metrics.
	Metrics *prometheus.Registry
	// API is the control API server.
	API *api.Server
	// Subsystems are the effects the state machines drive.
	Subsystems Subsystems

	ctx     context.Context // set by Serve; runners live as long as it
	control string          // the control listener's address

	mu   sync.Mutex
	jobs map[string]*runner
	// createMu serialises creates (volume claims, stale state).
	createMu      sync.Mutex
	replListenErr error // the replication listener could not open at start

	stopc    chan struct{} // closed to stop Serve (StopAgent, Shutdown)
	stopOnce sync.Once
	waitMu   sync.Mutex
	waiting  bool // a stop waits for the volumes to be released

	// Restart (restart.go).
	controlL   net.Listener
	handover   *handedState // from the predecessor, adopted by Serve
	restartMu  sync.Mutex
	restarting atomic.Bool
	handedOver atomic.Bool
	ackTimeout time.Duration // tests: successorAck
	// rollbackWrites wraps the writes of a rollback to a snapshot
	// (tests: a failing writer).
	rollbackWrites func(io.WriterAt) io.WriterAt
	// BeforeHandover releases what the successor must open itself (the
	// heartbeat probe's socket); AfterFailedHandover takes it back when
	// the successor failed. OnServing runs once Serve resumed the jobs
	// and is about to serve the API (a successor acknowledges its
	// predecessor there).
	BeforeHandover      func()
	AfterFailedHandover func() error
	OnServing           func()
}

// New creates an agent: it loads (creating at first start) its credentials
// and opens the job store. Subsystems left nil are reported as not wired.
func New(log *slog.Logger, cfg Config, subs Subsystems) (*Agent, error) {
	cfg.Defaults()
	if err := os.MkdirAll(cfg.StateDir, 0o700); err != nil {
		return nil, fmt.Errorf("state dir: %w", err)
	}
	host, _ := os.Hostname()
	id, created, err := api.LoadOrCreateCredentials(cfg.StateDir, host)
	if err != nil {
		return nil, err
	}
	for _, f := range created {
		log.Info("created", "file", f)
	}
	store, err := job.OpenStore(cfg.StateDir)
	if err != nil {
		return nil, err
	}
	if subs.Peers == nil {
		subs.Peers = peerClient{}
	}
	if subs.Scripts == nil {
		subs.Scripts = &Scripts{Log: log}
	}
	a := &Agent{
		Log: log, Config: cfg, Hostname: host, Credentials: id, Store: store,
		Metrics: prometheus.NewRegistry(), Subsystems: subs, jobs: map[string]*runner{},
		stopc: make(chan struct{}),
	}
	a.Metrics.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}), jobCollector{a}, snapshotCollector{a})
	a.API, err = api.NewServer(log, id, a, a.Metrics)
	if err != nil {
		return nil, err
	}
	return a, nil
}

// Run listens on the control address and serves until ctx is cancelled.
func (a *Agent) Run(ctx context.Context) error {
	l, err := net.Listen("tcp", a.Config.ControlListen)
	if err != nil {
		return fmt.Errorf("listen on control address: %w", err)
	}
	if a.Config.MetricsListen != "" {
		ml, err := net.Listen("tcp", a.Config.MetricsListen)
		if err != nil {
			l.Close()
			return fmt.Errorf("listen on metrics address: %w", err)
		}
		mctx, cancel := context.WithCancel(ctx)
		done := make(chan struct{})
		defer func() { cancel(); <-done }()
		go func() {
			defer close(done)
			if err := a.API.ServeMetrics(mctx, ml); err != nil {
				a.Log.Error("metrics listener", "addr", a.Config.MetricsListen, "err", err)
			}
		}()
		a.Log.Info("metrics without token", "listen", ml.Addr().String())
	}
	return a.Serve(ctx, l)
}

// Serve resumes the stored jobs and serves the control API on l until ctx
// is cancelled or a stop is requested (StopAgent, Shutdown); then it stops
// the jobs' runners and returns nil.
func (a *Agent) Serve(ctx context.Context, l net.Listener) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() {
		select {
		case <-a.stopc:
			cancel()
		case <-ctx.Done():
		}
	}()
	a.ctx = ctx
	a.control = l.Addr().String()
	a.mu.Lock()
	a.controlL = l
	a.mu.Unlock()
	if rl := a.Subsystems.ReplListener; rl != nil {
		if err := rl.Listen(); err != nil {
			a.replListenErr = err
			a.Log.Error("replication listener: peers cannot connect to this agent's target jobs until it opens (it is tried again with each)", "addr", a.Config.ReplListen, "err", err)
		}
		defer rl.Close()
	}
	st := a.handover
	a.handover = nil
	if err := a.resumeAll(st); err != nil {
		l.Close()
		return err
	}
	a.mu.Lock()
	njobs := len(a.jobs)
	a.mu.Unlock()
	a.Log.Info("agent ready", "control", a.control, "fingerprint", a.Credentials.Fingerprint, "jobs", njobs, "state_dir", a.Config.StateDir,
		"adopted", st != nil)
	if a.OnServing != nil {
		a.OnServing()
	}
	err := a.API.Serve(ctx, l)
	a.mu.Lock()
	runners := a.jobs
	a.jobs = map[string]*runner{}
	a.mu.Unlock()
	for _, r := range runners {
		r.stop()
	}
	return err
}

// resumeJob starts a stored job: it claims its volume (a record written
// by a doppel without job UUIDs or volume bindings is given them, and
// its replication state adopted, once) and starts its runner. A volume
// that cannot be claimed leaves the job in status with the reason.
func (a *Agent) resumeJob(rec job.Record) error {
	legacy := rec.Spec.UUID == ""
	if legacy {
		rec.Spec.UUID = job.IncarnationOf(rec.Spec.Secret)
	}
	cl, err := a.openClaim(&rec, legacy)
	if err != nil {
		a.Log.Error("job volume unavailable: the job serves and replicates nothing until it is", "job", rec.Spec.Name, "err", err)
	} else if legacy || cl.rebound {
		if cl.note != "" {
			// Another volume: whatever the record says of the old one's
			// data, this one's is unknown until a mirror completes.
			rec.HA.Consistent = false
		}
		if perr := a.Store.Put(rec); perr != nil {
			cl.close()
			return perr
		}
	}
	return a.startJob(rec, cl, err)
}

func (a *Agent) startJob(rec job.Record, cl *claim, claimErr error) error {
	r, err := newRunner(a, rec, cl, claimErr)
	if err != nil {
		cl.close()
		return err
	}
	a.mu.Lock()
	a.jobs[rec.Spec.Name] = r
	a.mu.Unlock()
	r.start(a.ctx)
	return nil
}

func (a *Agent) runner(name string) (*runner, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	r, ok := a.jobs[name]
	if !ok {
		return nil, fmt.Errorf("%w: no job %q on this agent", job.ErrNotFound, name)
	}
	return r, nil
}

// Info implements api.Agent.
func (a *Agent) Info() api.Info {
	subs := map[string]string{}
	note := func(name string, wired bool, why string) {
		if wired {
			subs[name] = "ok"
		} else {
			subs[name] = "not wired: " + why
		}
	}
	note("replication", a.Subsystems.DataPlane != nil, "daemon/repl is not connected to the agent yet")
	note("volumes", a.Subsystems.Volumes != nil, "no volume server")
	if a.replListenErr != nil {
		subs["replication"] = "listener: " + a.replListenErr.Error()
	}
	note("netident", a.Subsystems.NetIdent != nil, "service IPs cannot move")
	note("probe", a.Subsystems.Liveness != nil, "failure detection off")
	if a.Subsystems.Liveness != nil {
		subs["probe"] = "ok: " + a.Subsystems.Liveness.Mode()
	}
	return api.Info{
		Hostname: a.Hostname, Version: a.Config.Version, Fingerprint: a.Credentials.Fingerprint,
		Control: a.control, Repl: a.Config.ReplListen, HeartbeatPort: a.Config.HeartbeatPort,
		Subsystems: subs,
	}
}

// Jobs implements api.Agent.
func (a *Agent) Jobs(ctx context.Context) ([]api.JobStatus, error) {
	a.mu.Lock()
	rs := make([]*runner, 0, len(a.jobs))
	for _, r := range a.jobs {
		rs = append(rs, r)
	}
	a.mu.Unlock()
	out := make([]api.JobStatus, 0, len(rs))
	for _, r := range rs {
		out = append(out, r.status())
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Spec.Name < out[j].Spec.Name })
	return out, nil
}

// Job implements api.Agent.
func (a *Agent) Job(ctx context.Context, name string) (api.JobStatus, error) {
	r, err := a.runner(name)
	if err != nil {
		return api.JobStatus{}, err
	}
	return r.status(), nil
}

// CreateJob implements api.Agent: it validates the spec, finds which
// side of the job this agent is (by its certificate's fingerprint), checks
// the volume, sets aside replication state an earlier job of the same
// name left, claims and binds the volume, stores the job and starts it.
// Nothing is left behind when it fails.
func (a *Agent) CreateJob(ctx context.Context, spec job.Spec) (api.JobStatus, error) {
	if a.restarting.Load() {
		return api.JobStatus{}, fmt.Errorf("%w: retry in a moment", api.ErrRestarting)
	}
	spec.Defaults()
	if spec.UUID == "" {
		spec.UUID = job.IncarnationOf(spec.Secret)
	}
	if err := spec.Validate(); err != nil {
		return api.JobStatus{}, err
	}
	var self string
	switch a.Credentials.Fingerprint {
	case spec.Source.Fingerprint:
		self = spec.Source.Name
	case spec.Target.Fingerprint:
		self = spec.Target.Name
	default:
		return api.JobStatus{}, fmt.Errorf("%w %q: this agent (%s) is neither its source %s nor its target %s (fingerprints differ: was the server re-added?)", job.ErrInvalid, spec.Name, a.Credentials.Fingerprint, spec.Source.Name, spec.Target.Name)
	}
	a.createMu.Lock()
	defer a.createMu.Unlock()
	// Every check of the pre-flight but the peer's reachability (the
	// orchestrator's pre-flight checks that, from both sides): the job
	// is new here, the volume exists or can be created, is not mounted,
	// not another job's or program's, large enough, the hook scripts run.
	if pre := a.preflight(ctx, spec, false); len(pre.Problems) > 0 {
		return api.JobStatus{}, fmt.Errorf("job %s: %w", spec.Name, errPreflight(pre))
	}
	// Replication state an earlier job of this name left is never this
	// job's: set it aside before anything opens it.
	if dir, ok := staleState(a.Config.StateDir, spec.Name); ok {
		aside, err := a.archive(spec.Name, "stale", dir)
		if err != nil {
			return api.JobStatus{}, fmt.Errorf("set aside the replication state an earlier job %s left: %w", spec.Name, err)
		}
		a.Log.Warn("replication state of an earlier job of the same name set aside: not used", "job", spec.Name, "moved_to", aside)
	}
	cfg := ha.Config{Self: self, Home: spec.Source.Name}
	rec := job.Record{Spec: spec, Self: self, HA: ha.Initial(cfg), Created: time.Now().UTC()}
	cl, err := a.openClaim(&rec, false)
	if err != nil {
		return api.JobStatus{}, fmt.Errorf("job %s on %s: %w", spec.Name, self, err)
	}
	rec.CreatedVolume = cl.created
	if err := a.Store.Create(rec); err != nil {
		cl.undo()
		return api.JobStatus{}, err
	}
	if err := a.startJob(rec, cl, nil); err != nil {
		a.Store.Delete(spec.Name)
		cl.undo()
		return api.JobStatus{}, err
	}
	a.Log.Info("job created", "job", spec.Name, "uuid", spec.UUID, "self", self, "role", rec.HA.Role, "volume", spec.VolumeOn(self),
		"volume_uuid", rec.Volume.UUID, "device", rec.Volume.Device, "mode", spec.Mode, "failover", spec.Failover)
	return a.Job(ctx, spec.Name)
}

// DeleteJob implements api.Agent: it stops the job and forgets it,
// removing its replication state (or, with KeepState, archiving it with
// the job's record). Split-brain saves are always archived, never
// removed. The volume's data and any service IP stay as they are.
func (a *Agent) DeleteJob(ctx context.Context, name string, opts api.DeleteOptions) (api.DeleteResult, error) {
	if a.restarting.Load() {
		return api.DeleteResult{}, fmt.Errorf("%w: retry in a moment", api.ErrRestarting)
	}
	r, err := a.runner(name)
	if err != nil {
		return api.DeleteResult{}, err
	}
	if users := a.inUse(name); len(users) > 0 {
		if !opts.Force {
			return api.DeleteResult{}, fmt.Errorf("%w: job %s's volume is in use on %s: %s. Stop the application (unmount) first, or delete with --force: the application loses its disk",
				api.ErrInUse, name, r.rec.Self, strings.Join(users, "; "))
		}
		a.Log.Warn("deleting a job whose volume is in use (forced): its users lose their disk", "job", name, "users", users)
	}
	a.mu.Lock()
	if a.jobs[name] != r {
		a.mu.Unlock()
		return api.DeleteResult{}, fmt.Errorf("%w: %s (deleted meanwhile)", job.ErrNotFound, name)
	}
	delete(a.jobs, name)
	a.mu.Unlock()
	r.stop()
	res := api.DeleteResult{Job: name}
	if opts.Undo && r.rec.CreatedVolume {
		// A create rolled back: the file it made goes too.
		path := r.rec.Spec.VolumeOn(r.rec.Self)
		if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return res, fmt.Errorf("delete job %s: remove the volume file its create made: %w", name, err)
		}
		res.Removed = append(res.Removed, path)
	}
	dir := job.ReplStateDir(a.Config.StateDir, name)
	events := strings.TrimSuffix(a.Store.RecordPath(name), ".json") + ".events"
	var keep []string
	snapDir := SnapshotsDir(a.Config.StateDir, name)
	if opts.KeepState {
		// The snapshots stay too: their images where they are, their
		// catalog archived with the state.
		keep = append(keep, dir)
		if _, err := os.Stat(snapDir); err == nil {
			keep = append(keep, snapDir)
		}
	} else if r.snaps != nil && r.snaps.mgr != nil {
		if err := r.snaps.mgr.RemoveAll(); err != nil {
			return res, fmt.Errorf("delete job %s: remove its snapshots: %w (the job is stopped; its record is kept)", name, err)
		}
		res.Removed = append(res.Removed, snapDir)
	}
	if saves, _ := filepath.Glob(filepath.Join(dir, "splitbrain-*")); !opts.KeepState && len(saves) > 0 {
		keep = append(keep, saves...)
	}
	if len(keep) > 0 {
		if opts.KeepState {
			keep = append(keep, a.Store.RecordPath(name))
			if _, err := os.Stat(events); err == nil {
				keep = append(keep, events)
			}
		}
		res.Archived, err = a.archiveAll(name, "deleted", keep)
		if err != nil {
			return res, fmt.Errorf("delete job %s: archive its state: %w (the job is stopped; its record is kept)", name, err)
		}
	}
	if _, err := os.Stat(dir); err == nil {
		if err := os.RemoveAll(dir); err != nil {
			return res, fmt.Errorf("delete job %s: remove its replication state %s: %w", name, dir, err)
		}
		res.Removed = append(res.Removed, dir)
	}
	if err := os.Remove(events); err == nil {
		res.Removed = append(res.Removed, events)
	}
	if r.rec.Spec.Arbiter != "" && a.Subsystems.Arbiter != nil {
		// The records go with the job; the peer's delete (or a lease
		// still running) may keep them a moment: not an error.
		dctx, cancel := context.WithTimeout(ctx, 3*time.Second)
		if err := a.Subsystems.Arbiter.DeleteJob(dctx, name); err != nil {
			a.Log.Info("arbiter records of the job kept", "job", name, "why", err)
		}
		cancel()
	}
	if err := a.Store.Delete(name); err != nil && !errors.Is(err, job.ErrNotFound) {
		return res, err
	}
	a.Log.Info("job deleted", "job", name, "archived", res.Archived, "removed", res.Removed)
	return res, nil
}

// inUse says who uses job name's served volume on this host.
func (a *Agent) inUse(name string) []string {
	if a.Subsystems.Volumes == nil {
		return nil
	}
	return a.Subsystems.Volumes.InUse(name)
}

// RestartAgent implements api.Agent (Restart).
func (a *Agent) RestartAgent(ctx context.Context) (api.RestartResult, error) {
	pid, err := a.Restart(ctx)
	if err != nil {
		return api.RestartResult{}, err
	}
	return api.RestartResult{PID: pid, Message: fmt.Sprintf("the agent restarted: now pid %d", pid)}, nil
}

// Command implements api.Agent: an operator command stepped into the
// job's state machine. A refusal changes nothing (409); when the command is
// accepted but an action it needs fails (for example a subsystem not wired
// in), the error says what was done and what failed.
func (a *Agent) Command(ctx context.Context, name string, cmd ha.EventType, opts api.CommandOptions) (api.JobStatus, error) {
	if a.restarting.Load() {
		return api.JobStatus{}, fmt.Errorf("%w: retry in a moment", api.ErrRestarting)
	}
	r, err := a.runner(name)
	if err != nil {
		return api.JobStatus{}, err
	}
	if opts.Snapshot != "" {
		if cmd != ha.CmdFailover {
			return api.JobStatus{}, fmt.Errorf("%w: --snapshot is for a failover, not %s", job.ErrInvalid, cmd)
		}
		mgr, err := r.snaps.manager()
		if err != nil {
			return api.JobStatus{}, fmt.Errorf("failover of %s to snapshot %s: %w", name, opts.Snapshot, err)
		}
		if _, err := mgr.Get(opts.Snapshot); err != nil {
			return api.JobStatus{}, fmt.Errorf("failover of %s to snapshot %s on %s: %w", name, opts.Snapshot, r.rec.Self, err)
		}
	}
	a.Log.Info("operator command", "job", name, "command", cmd, "force", opts.Force, "discard_queue", opts.DiscardQueue, "snapshot", opts.Snapshot)
	r.history.add(r.epoch.Load(), "command", fmt.Sprintf("operator: %s (force %t, discard queue %t, snapshot %q)", cmd, opts.Force, opts.DiscardQueue, opts.Snapshot))
	done, errs, err := r.step(ctx, ha.Event{Type: cmd, Force: opts.Force, DiscardQueue: opts.DiscardQueue, Snapshot: opts.Snapshot})
	if err != nil {
		r.history.add(r.epoch.Load(), "command", fmt.Sprintf("operator: %s refused: %v", cmd, err))
		return api.JobStatus{}, err
	}
	if cmd == ha.CmdFailover && r.arb != nil {
		if err := a.awaitPromotion(ctx, r); err != nil {
			return r.status(), err
		}
	}
	st := r.status()
	st.Actions = done
	if len(errs) > 0 {
		return st, fmt.Errorf("%s of job %s: now %s (epoch %d), but %d of %d actions failed: %w", cmd, name, st.HA.State, st.HA.Epoch, len(errs), len(done), errors.Join(errs...))
	}
	return st, nil
}

// Events implements api.Agent.
func (a *Agent) Events(ctx context.Context, name string) ([]api.Event, error) {
	r, err := a.runner(name)
	if err != nil {
		return nil, err
	}
	return r.history.list(), nil
}

// awaitPromotion waits for the arbiter's answer to an operator's
// failover (a forced one waits one lease TTL); a refusal is the
// command's refusal.
func (a *Agent) awaitPromotion(ctx context.Context, r *runner) error {
	bound := r.arb.ttl + 15*time.Second
	ctx, cancel := context.WithTimeout(ctx, bound)
	defer cancel()
	for {
		st := r.snap.Load().ha
		switch {
		case st.State != ha.StatePromoting && st.Role == ha.RoleSource:
			return nil
		case st.State != ha.StatePromoting:
			return &ha.RefusedError{Command: ha.CmdFailover, Err: ha.ErrSourceAlive, Reason: st.LastError}
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("failover of job %s: the arbiter has not answered within %v (%s); the promotion goes on in the background: see doppel job status", r.rec.Spec.Name, bound, st.Reason)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// Verify implements api.Agent.
func (a *Agent) Verify(ctx context.Context, name string) (api.VerifyResult, error) {
	r, err := a.runner(name)
	if err != nil {
		return api.VerifyResult{}, err
	}
	r.mu.Lock()
	dp, err := r.dataPlane()
	r.mu.Unlock()
	if err != nil {
		return api.VerifyResult{}, fmt.Errorf("verify %s: %w", name, err)
	}
	return dp.Verify(ctx)
}

// PeerSecret implements api.Agent.
func (a *Agent) PeerSecret(name string) (string, error) {
	r, err := a.runner(name)
	if err != nil {
		return "", err
	}
	return r.rec.Spec.Secret, nil
}

// PeerMessage implements api.Agent.
func (a *Agent) PeerMessage(ctx context.Context, name string, m ha.Message) error {
	r, err := a.runner(name)
	if err != nil {
		return err
	}
	_, peer, _ := r.rec.Spec.Endpoints(r.rec.Self)
	if subtle.ConstantTimeCompare([]byte(m.From), []byte(peer.Name)) != 1 {
		return fmt.Errorf("%w: message from %q, the peer of job %s is %s", job.ErrInvalid, m.From, name, peer.Name)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	r.stepLocked(ctx, ha.Event{Type: ha.EvMessage, Msg: &m})
	return nil
}

// jobCollector exports every job's status as Prometheus metrics.
type jobCollector struct{ a *Agent }

var (
	descState      = prometheus.NewDesc("doppel_job_state", "1 for the job's current state on this agent.", []string{"job", "state", "role"}, nil)
	descEpoch      = prometheus.NewDesc("doppel_job_epoch", "Generation epoch (promotions so far).", []string{"job"}, nil)
	descConsistent = prometheus.NewDesc("doppel_job_target_consistent", "1 when the target's copy is consistent.", []string{"job"}, nil)
	descRemaining  = prometheus.NewDesc("doppel_job_sync_remaining_bytes", "Bytes left to mirror or resync.", []string{"job"}, nil)
	descQueue      = prometheus.NewDesc("doppel_job_queue_bytes", "Replication queue bytes.", []string{"job", "where"}, nil)
	descRPO        = prometheus.NewDesc("doppel_job_rpo_seconds", "Estimated age of the oldest write the target does not hold yet (source side; sampled every 100 ms).", []string{"job"}, nil)
	descTTF        = prometheus.NewDesc("doppel_job_time_to_fail_seconds", "Countdown to declaring the source failed (-1: not counting).", []string{"job"}, nil)
	descPathUp     = prometheus.NewDesc("doppel_job_path_up", "1 when the peer is heard on the path.", []string{"job", "path"}, nil)
	descDirty      = prometheus.NewDesc("doppel_job_dirty_bytes", "This side's dirty bitmap bytes (what a resync would send or ask for).", []string{"job"}, nil)
	descHot        = prometheus.NewDesc("doppel_job_hot_extents", "Activity-log extents hot on this source (a crash adds them to the dirty bytes).", []string{"job"}, nil)
	descChanged    = prometheus.NewDesc("doppel_job_changed_bytes", "Bytes of the chunks written on this side while it was not replicating.", []string{"job"}, nil)
	descApplied    = prometheus.NewDesc("doppel_job_applied_bytes", "Target: payload bytes applied since this side became the target.", []string{"job"}, nil)
)

func (c jobCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descState, descEpoch, descConsistent, descRemaining, descQueue, descRPO, descTTF, descPathUp,
		descDirty, descHot, descChanged, descApplied} {
		ch <- d
	}
}

func (c jobCollector) Collect(ch chan<- prometheus.Metric) {
	jobs, _ := c.a.Jobs(context.Background())
	b2f := func(b bool) float64 {
		if b {
			return 1
		}
		return 0
	}
	for _, j := range jobs {
		n := j.Spec.Name
		ch <- prometheus.MustNewConstMetric(descState, prometheus.GaugeValue, 1, n, string(j.HA.State), string(j.HA.Role))
		ch <- prometheus.MustNewConstMetric(descEpoch, prometheus.GaugeValue, float64(j.HA.Epoch), n)
		ch <- prometheus.MustNewConstMetric(descConsistent, prometheus.GaugeValue, b2f(j.HA.Consistent), n)
		ttf := j.Probe.TimeToFail.Seconds()
		if j.Probe.TimeToFail < 0 {
			ttf = -1
		}
		ch <- prometheus.MustNewConstMetric(descTTF, prometheus.GaugeValue, ttf, n)
		for _, p := range j.HA.Paths {
			ch <- prometheus.MustNewConstMetric(descPathUp, prometheus.GaugeValue, b2f(p.Up), n, p.Name)
		}
		if j.Data.Known {
			ch <- prometheus.MustNewConstMetric(descRemaining, prometheus.GaugeValue, float64(j.Data.BytesRemaining), n)
			ch <- prometheus.MustNewConstMetric(descQueue, prometheus.GaugeValue, float64(j.Data.QueueMemory), n, "memory")
			ch <- prometheus.MustNewConstMetric(descQueue, prometheus.GaugeValue, float64(j.Data.QueueDisk), n, "disk")
			if j.Data.RPO >= 0 {
				ch <- prometheus.MustNewConstMetric(descRPO, prometheus.GaugeValue, j.Data.RPO.Seconds(), n)
			}
			if j.Data.DirtyBytes >= 0 {
				ch <- prometheus.MustNewConstMetric(descDirty, prometheus.GaugeValue, float64(j.Data.DirtyBytes), n)
			}
			ch <- prometheus.MustNewConstMetric(descHot, prometheus.GaugeValue, float64(j.Data.HotExtents), n)
			ch <- prometheus.MustNewConstMetric(descChanged, prometheus.GaugeValue, float64(j.Data.ChangedBytes), n)
			if j.HA.Role == ha.RoleTarget {
				ch <- prometheus.MustNewConstMetric(descApplied, prometheus.GaugeValue, float64(j.Data.AppliedBytes), n)
			}
		}
	}
}
