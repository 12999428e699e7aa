package agent

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/doppelha/doppel/blockdev"
	"github.com/doppelha/doppel/daemon/api"
	"github.com/doppelha/doppel/daemon/ha"
	"github.com/doppelha/doppel/daemon/job"
	volsnap "github.com/doppelha/doppel/daemon/snapshot"
	"github.com/doppelha/doppel/netident"
	"github.com/prometheus/client_golang/prometheus"
)

// Snapshots (docs/snapshots.md): each job has a volsnap.Manager for its
// volume on this host. The side that is the job's target takes them, at a
// point of the replication stream (the data plane's AtPoint: no frame is
// applied meanwhile): on request, on the job's schedule, and before its
// copy turns inconsistent (a resync, a mirror, a reverse). A test failover
// serves a writable clone of the target's image (or of a snapshot) on an
// NBD export of its own while replication goes on. The source side only
// freezes its file system to mark a point (application-consistent
// snapshots).

// SnapshotsDir is where a job's snapshot catalog and schedule live.
func SnapshotsDir(stateDir, name string) string {
	return filepath.Join(stateDir, "jobs", name+".snapshots")
}

// pointTaker is what snapshots need of a data plane: the target's point
// (AtPoint, AtSeq) and the source's mark (a flush through the stream).
type pointTaker interface {
	AtPoint(f func(volsnap.Point) error) error
	AtSeq(ctx context.Context, stream, seq uint64, f func(volsnap.Point) error) error
	Mark(ctx context.Context) (stream, seq uint64, err error)
}

// jobSnapshots is one job's snapshots on this agent.
type jobSnapshots struct {
	r      *runner
	mgr    *volsnap.Manager // nil: mgrErr
	mgrErr error

	mu      sync.Mutex
	lastErr string
	test    *testFailover
	frozen  *frozen
	usage   map[string]volsnap.Usage
	usageAt time.Time
}

type testFailover struct {
	st     api.TestFailoverStatus
	file   *blockdev.File
	srv    *blockdev.Server
	cancel context.CancelFunc
	done   chan struct{}
	addr   *netident.Addr
}

type frozen struct {
	thaw  func() error
	timer *time.Timer
}

func openSnapshots(r *runner) *jobSnapshots {
	s := &jobSnapshots{r: r}
	s.mgr, s.mgrErr = volsnap.Open(volsnap.Config{Dir: SnapshotsDir(r.a.Config.StateDir, r.rec.Spec.Name),
		Volume: r.rec.Spec.VolumeOn(r.rec.Self), Job: r.rec.Spec.Name, Log: r.log})
	if s.mgrErr == nil {
		if _, err := s.mgr.Mechanism(); err != nil {
			r.log.Info("snapshots unavailable for this volume", "why", err)
		}
	}
	return s
}

// manager returns the manager with a usable mechanism, or why there is none.
func (s *jobSnapshots) manager() (*volsnap.Manager, error) {
	if s.mgrErr != nil {
		return nil, s.mgrErr
	}
	if _, err := s.mgr.Mechanism(); err != nil {
		return nil, err
	}
	return s.mgr, nil
}

func (s *jobSnapshots) points() (pointTaker, error) {
	s.r.mu.Lock()
	dp, err := s.r.dataPlane()
	s.r.mu.Unlock()
	if err != nil {
		return nil, err
	}
	pt, ok := dp.(pointTaker)
	if !ok {
		return nil, fmt.Errorf("%w: this data plane takes no snapshots", api.ErrNotWired)
	}
	return pt, nil
}

func stampName(prefix string, t time.Time) string {
	return prefix + "-" + t.UTC().Format("20060102-150405.000")
}

// take makes a snapshot at the target's current point (or at stream/seq
// when seq > 0).
func (s *jobSnapshots) take(ctx context.Context, name string, kind volsnap.Kind, stream, seq uint64) (volsnap.Snapshot, error) {
	mgr, err := s.manager()
	if err != nil {
		return volsnap.Snapshot{}, err
	}
	if name == "" {
		name = stampName("snap", time.Now())
	}
	if err := volsnap.ValidName(name); err != nil {
		return volsnap.Snapshot{}, err
	}
	if st := s.r.snap.Load().ha; st.Role != ha.RoleTarget {
		return volsnap.Snapshot{}, fmt.Errorf("%w: snapshots are taken on the job's target; %s is its %s", job.ErrInvalid, s.r.rec.Self, st.Role)
	}
	pt, err := s.points()
	if err != nil {
		return volsnap.Snapshot{}, err
	}
	var snap volsnap.Snapshot
	f := func(p volsnap.Point) error {
		var err error
		snap, err = mgr.Create(name, kind, p, "")
		return err
	}
	if seq > 0 {
		err = pt.AtSeq(ctx, stream, seq, f)
	} else {
		err = pt.AtPoint(f)
	}
	if err != nil {
		return volsnap.Snapshot{}, fmt.Errorf("snapshot %s of job %s: %w", name, s.r.rec.Spec.Name, err)
	}
	s.r.history.add(s.r.epoch.Load(), "snapshot", fmt.Sprintf("%s snapshot %s at sequence %d (%s, paused the apply stream %v)",
		kind, name, snap.Point.Seq, snap.Mechanism, snap.Took.Round(time.Microsecond)))
	s.prune()
	return snap, nil
}

// beforeInconsistent is the target's hook before its copy turns
// inconsistent: an automatic snapshot of the last consistent image, best
// effort (a failure is logged, kept in status and the job's events; the
// resync goes on, as it would without snapshots).
func (s *jobSnapshots) beforeInconsistent(p volsnap.Point, why string) error {
	mgr, err := s.manager()
	if err != nil {
		return nil // said once at open
	}
	if mgr.Schedule().AutoKeepOr() <= 0 {
		return nil
	}
	name := stampName("pre-resync", time.Now())
	snap, err := mgr.Create(name, volsnap.KindBeforeResync, p, why)
	if err != nil {
		s.failed(fmt.Sprintf("automatic snapshot before the resync: %v (the resync goes on: no consistent copy is kept meanwhile)", err))
		return nil
	}
	s.r.history.add(s.r.epoch.Load(), "snapshot", fmt.Sprintf("automatic snapshot %s at sequence %d before the copy turns inconsistent (%s), took %v",
		name, p.Seq, why, snap.Took.Round(time.Microsecond)))
	go s.prune()
	return nil
}

func (s *jobSnapshots) failed(msg string) {
	s.mu.Lock()
	s.lastErr = msg
	s.mu.Unlock()
	s.r.log.Error("snapshot failed", "err", msg)
	s.r.history.add(s.r.epoch.Load(), "snapshot", msg)
}

func (s *jobSnapshots) prune() {
	mgr, err := s.manager()
	if err != nil {
		return
	}
	gone, err := mgr.Prune(mgr.Schedule().AutoKeepOr())
	if err != nil {
		s.failed("prune snapshots: " + err.Error())
	}
	if len(gone) > 0 {
		s.r.history.add(s.r.epoch.Load(), "snapshot", "retention deleted "+strings.Join(gone, ", "))
	}
}

// scheduleLoop takes the scheduled snapshots while this side is the
// job's consistent target.
func (s *jobSnapshots) scheduleLoop(ctx context.Context) {
	t := time.NewTicker(5 * time.Second)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		s.tick(ctx, time.Now())
	}
}

// tick takes a scheduled snapshot when one is due.
func (s *jobSnapshots) tick(ctx context.Context, now time.Time) {
	mgr, err := s.manager()
	if err != nil {
		return
	}
	st := s.r.snap.Load().ha
	if st.Role != ha.RoleTarget || !st.Consistent {
		return
	}
	if !mgr.Schedule().Due(mgr.LastScheduled(), now) {
		return
	}
	if _, err := s.take(ctx, stampName("sched", now), volsnap.KindScheduled, 0, 0); err != nil {
		s.failed("scheduled snapshot: " + err.Error())
	}
}

// status is the snapshot part of the job's status.
func (s *jobSnapshots) status() *api.SnapshotStatus {
	out := &api.SnapshotStatus{}
	if s.mgrErr != nil {
		out.Unsupported = s.mgrErr.Error()
		return out
	}
	if m, err := s.mgr.Mechanism(); err != nil {
		out.Unsupported = err.Error()
	} else {
		out.Mechanism = m.Name()
	}
	list := s.mgr.List()
	out.Count = len(list)
	if len(list) > 0 {
		l := list[len(list)-1]
		out.Latest = &l
	}
	out.Schedule = s.mgr.Schedule()
	if out.Schedule.Every > 0 && s.r.snap.Load().ha.Role == ha.RoleTarget {
		if last := s.mgr.LastScheduled(); last.IsZero() {
			out.NextDue = time.Now().UTC()
		} else {
			out.NextDue = last.Add(out.Schedule.Every)
		}
	}
	s.mu.Lock()
	out.LastError = s.lastErr
	if s.test != nil {
		t := s.test.st
		out.TestFailover = &t
	}
	s.mu.Unlock()
	return out
}

// usageOf returns the space each snapshot holds, measured at most every
// 10 s (FIEMAP of a large image is not free).
func (s *jobSnapshots) usageOf(list []volsnap.Snapshot) map[string]volsnap.Usage {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.usage != nil && time.Since(s.usageAt) < 10*time.Second && len(s.usage) == len(list) {
		return s.usage
	}
	u := map[string]volsnap.Usage{}
	for _, x := range list {
		u[x.Name] = s.mgr.Usage(x)
	}
	s.usage, s.usageAt = u, time.Now()
	return u
}

func (s *jobSnapshots) list() api.SnapshotList {
	l := api.SnapshotList{Job: s.r.rec.Spec.Name, Snapshots: []api.SnapshotInfo{}}
	if s.mgrErr != nil {
		l.Unsupported = s.mgrErr.Error()
		return l
	}
	if m, err := s.mgr.Mechanism(); err != nil {
		l.Unsupported = err.Error()
	} else {
		l.Mechanism, l.Describe = m.Name(), m.Describe()
	}
	l.Schedule = s.mgr.Schedule()
	list := s.mgr.List()
	use := s.usageOf(list)
	now := time.Now()
	for _, x := range list {
		l.Snapshots = append(l.Snapshots, api.SnapshotInfo{Snapshot: x, Usage: use[x.Name], Age: now.Sub(x.Created)})
	}
	l.TestFailover = s.status().TestFailover
	return l
}

// startTest clones the target's image (or snapshot from) and serves it.
func (s *jobSnapshots) startTest(ctx context.Context, req api.TestFailoverRequest) (api.TestFailoverStatus, error) {
	mgr, err := s.manager()
	if err != nil {
		return api.TestFailoverStatus{}, err
	}
	spec := s.r.rec.Spec
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.test != nil {
		return api.TestFailoverStatus{}, fmt.Errorf("%w: a test failover of job %s runs already (%s): stop it first (doppel test-failover %s --stop)", job.ErrExists, spec.Name, s.test.st.Device, spec.Name)
	}
	if st := s.r.snap.Load().ha; st.Role != ha.RoleTarget {
		return api.TestFailoverStatus{}, fmt.Errorf("%w: a test failover runs on the job's target; %s is its %s", job.ErrInvalid, s.r.rec.Self, st.Role)
	}
	var addr *netident.Addr
	if req.TestIP != "" {
		a, err := s.testAddr(req.TestIP)
		if err != nil {
			return api.TestFailoverStatus{}, err
		}
		addr = &a
	}
	const cloneName = "test-failover"
	st := api.TestFailoverStatus{Export: spec.Name + "-test", Started: time.Now().UTC(), From: req.Snapshot}
	if req.Snapshot != "" {
		snap, err := mgr.Get(req.Snapshot)
		if err != nil {
			return api.TestFailoverStatus{}, err
		}
		st.Point = snap.Point
		st.Clone, err = mgr.Clone(req.Snapshot, cloneName)
		if err != nil {
			return api.TestFailoverStatus{}, err
		}
	} else {
		st.From = "live"
		pt, err := s.points()
		if err != nil {
			return api.TestFailoverStatus{}, err
		}
		err = pt.AtPoint(func(p volsnap.Point) error {
			st.Point = p
			var err error
			st.Clone, err = mgr.Clone("", cloneName)
			return err
		})
		if err != nil {
			return api.TestFailoverStatus{}, fmt.Errorf("test failover of job %s: %w", spec.Name, err)
		}
	}
	tf := &testFailover{st: st, addr: addr, done: make(chan struct{})}
	fail := func(err error) (api.TestFailoverStatus, error) {
		if tf.file != nil {
			tf.file.Close()
		}
		mgr.RemoveClone(st.Clone)
		return api.TestFailoverStatus{}, fmt.Errorf("test failover of job %s: %w", spec.Name, err)
	}
	b, err := blockdev.Open(st.Clone, 0)
	if err != nil {
		return fail(err)
	}
	tf.file, _ = b.(*blockdev.File)
	srv, err := blockdev.NewServer(s.r.log.With("export", st.Export), blockdev.Export{Name: st.Export, Description: "doppel test failover of job " + spec.Name, Backend: b})
	if err != nil {
		return fail(err)
	}
	tf.srv = srv
	var l net.Listener
	if addr != nil {
		if s.r.subs.NetIdent == nil {
			return fail(fmt.Errorf("%w: network identity (netident): no test IP", api.ErrNotWired))
		}
		if err := s.r.subs.NetIdent.Apply(ctx, []netident.Addr{*addr}); err != nil {
			return fail(fmt.Errorf("add the test IP: %w", err))
		}
		l, err = net.Listen("tcp", net.JoinHostPort(addr.Prefix.Addr().String(), "10809"))
		if err != nil {
			s.r.subs.NetIdent.Release(ctx, []netident.Addr{*addr})
			return fail(err)
		}
		st.TestIP = req.TestIP
		st.Device = "nbd://" + l.Addr().String() + "/" + st.Export
	} else {
		dir := s.runDir()
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return fail(err)
		}
		path := filepath.Join(dir, st.Export+".sock")
		os.Remove(path)
		l, err = blockdev.Listen("unix:" + path)
		if err != nil {
			return fail(err)
		}
		st.Device = "unix:" + path
	}
	tf.st = st
	sctx, cancel := context.WithCancel(context.Background())
	tf.cancel = cancel
	go func() {
		defer close(tf.done)
		if err := srv.Serve(sctx, l); err != nil && !errors.Is(err, context.Canceled) {
			s.r.log.Error("test failover export stopped", "err", err)
		}
	}()
	s.test = tf
	s.r.history.add(s.r.epoch.Load(), "snapshot", fmt.Sprintf("test failover: a clone of %s at sequence %d served on %s; replication goes on", st.From, st.Point.Seq, st.Device))
	s.r.log.Info("test failover started", "device", st.Device, "from", st.From, "seq", st.Point.Seq, "clone", st.Clone)
	return st, nil
}

// testAddr parses CIDR@IFACE and refuses the job's service IPs.
func (s *jobSnapshots) testAddr(v string) (netident.Addr, error) {
	ip, err := job.ParseServiceIP(v)
	if err != nil {
		return netident.Addr{}, err
	}
	p, err := netip.ParsePrefix(ip.Prefix)
	if err != nil {
		return netident.Addr{}, fmt.Errorf("%w: test IP %q: %v", job.ErrInvalid, v, err)
	}
	for _, sip := range s.r.rec.Spec.ServiceIPs {
		if sp, err := netip.ParsePrefix(sip.Prefix); err == nil && sp.Addr() == p.Addr() {
			return netident.Addr{}, fmt.Errorf("%w: %s is a service IP of job %s: a test failover never takes it (give an address of its own)", job.ErrInvalid, p.Addr(), s.r.rec.Spec.Name)
		}
	}
	return netident.Addr{Prefix: p, Iface: ip.Iface}, nil
}

func (s *jobSnapshots) runDir() string {
	if v, ok := s.r.subs.Volumes.(*NBDVolumes); ok && v.RunDir != "" {
		return v.RunDir
	}
	return filepath.Join(s.r.a.Config.StateDir, "run")
}

// stopTest stops the test failover and discards its clone.
func (s *jobSnapshots) stopTest(ctx context.Context) error {
	s.mu.Lock()
	tf := s.test
	s.test = nil
	s.mu.Unlock()
	if tf == nil {
		return fmt.Errorf("%w: no test failover of job %s runs here", job.ErrNotFound, s.r.rec.Spec.Name)
	}
	tf.cancel()
	<-tf.done
	var errs []error
	if tf.file != nil {
		errs = append(errs, tf.file.Close())
	}
	if p, ok := strings.CutPrefix(tf.st.Device, "unix:"); ok {
		os.Remove(p)
	}
	if tf.addr != nil && s.r.subs.NetIdent != nil {
		errs = append(errs, s.r.subs.NetIdent.Release(ctx, []netident.Addr{*tf.addr}))
	}
	if s.mgr != nil {
		errs = append(errs, s.mgr.RemoveClone(tf.st.Clone))
	}
	s.r.history.add(s.r.epoch.Load(), "snapshot", "test failover stopped: clone discarded")
	s.r.log.Info("test failover stopped", "clone", tf.st.Clone)
	return errors.Join(errs...)
}

func (s *jobSnapshots) close() {
	s.mu.Lock()
	running := s.test != nil
	fr := s.frozen
	s.frozen = nil
	s.mu.Unlock()
	if running {
		if err := s.stopTest(context.Background()); err != nil {
			s.r.log.Warn("stop the test failover", "err", err)
		}
	}
	if fr != nil {
		fr.timer.Stop()
		fr.thaw()
	}
}

// freeze runs on the source: freeze the file system, mark the point in
// the stream (a flush through it), keep frozen until thaw or the timeout.
func (s *jobSnapshots) freeze(ctx context.Context, req api.FreezeRequest) (api.FreezeResult, error) {
	if (req.Mount == "") == (req.Script == "") {
		return api.FreezeResult{}, fmt.Errorf("%w: give a mount point (fsfreeze) or a freeze script", job.ErrInvalid)
	}
	timeout := req.Timeout
	if timeout <= 0 {
		timeout = 10 * time.Second
	}
	if timeout > time.Minute {
		return api.FreezeResult{}, fmt.Errorf("%w: freeze timeout %v: at most 1m", job.ErrInvalid, timeout)
	}
	if st := s.r.snap.Load().ha; st.Role != ha.RoleSource {
		return api.FreezeResult{}, fmt.Errorf("%w: the freeze runs on the job's source; %s is its %s", job.ErrInvalid, s.r.rec.Self, st.Role)
	}
	pt, err := s.points()
	if err != nil {
		return api.FreezeResult{}, err
	}
	run := func(args ...string) error {
		var c *exec.Cmd
		if req.Mount != "" {
			c = exec.CommandContext(context.Background(), "fsfreeze", append(args, req.Mount)...)
		} else {
			c = exec.CommandContext(context.Background(), req.Script, args[0][1:])
		}
		out, err := c.CombinedOutput()
		if err != nil {
			return fmt.Errorf("%s: %w: %s", c, err, strings.TrimSpace(string(out)))
		}
		return nil
	}
	freezeArg, thawArg := "-f", "-u"
	if req.Script != "" {
		freezeArg, thawArg = "-freeze", "-thaw"
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.frozen != nil {
		return api.FreezeResult{}, fmt.Errorf("%w: job %s's source is frozen already", job.ErrExists, s.r.rec.Spec.Name)
	}
	if err := run(freezeArg); err != nil {
		return api.FreezeResult{}, fmt.Errorf("freeze: %w", err)
	}
	var once sync.Once
	var thawErr error
	thaw := func() error {
		once.Do(func() { thawErr = run(thawArg) })
		return thawErr
	}
	stream, seq, err := pt.Mark(ctx)
	if err != nil {
		thaw()
		return api.FreezeResult{}, fmt.Errorf("mark the point in the stream: %w (thawed)", err)
	}
	fr := &frozen{thaw: thaw}
	fr.timer = time.AfterFunc(timeout, func() {
		s.mu.Lock()
		if s.frozen == fr {
			s.frozen = nil
		}
		s.mu.Unlock()
		if err := thaw(); err != nil {
			s.r.log.Error("thaw after the freeze timeout", "err", err)
		}
		s.r.log.Warn("thawed after the freeze timeout", "timeout", timeout)
	})
	s.frozen = fr
	return api.FreezeResult{Stream: stream, Seq: seq, Until: time.Now().Add(timeout).UTC()}, nil
}

func (s *jobSnapshots) thaw() error {
	s.mu.Lock()
	fr := s.frozen
	s.frozen = nil
	s.mu.Unlock()
	if fr == nil {
		return nil // thawed on its own already
	}
	fr.timer.Stop()
	return fr.thaw()
}

// The api.SnapshotAgent methods.

func (a *Agent) snapshotsOf(name string) (*jobSnapshots, error) {
	r, err := a.runner(name)
	if err != nil {
		return nil, err
	}
	if r.snaps == nil {
		return nil, fmt.Errorf("%w: snapshots", api.ErrNotWired)
	}
	return r.snaps, nil
}

// Snapshots implements api.SnapshotAgent.
func (a *Agent) Snapshots(ctx context.Context, name string) (api.SnapshotList, error) {
	s, err := a.snapshotsOf(name)
	if err != nil {
		return api.SnapshotList{}, err
	}
	return s.list(), nil
}

// CreateSnapshot implements api.SnapshotAgent.
func (a *Agent) CreateSnapshot(ctx context.Context, name string, req api.SnapshotRequest) (api.SnapshotInfo, error) {
	s, err := a.snapshotsOf(name)
	if err != nil {
		return api.SnapshotInfo{}, err
	}
	if req.AtSeq > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, time.Minute)
		defer cancel()
	}
	snap, err := s.take(ctx, req.Name, volsnap.KindManual, req.AtStream, req.AtSeq)
	if err != nil {
		return api.SnapshotInfo{}, err
	}
	return api.SnapshotInfo{Snapshot: snap, Usage: s.mgr.Usage(snap)}, nil
}

// DeleteSnapshot implements api.SnapshotAgent.
func (a *Agent) DeleteSnapshot(ctx context.Context, name, snap string) error {
	s, err := a.snapshotsOf(name)
	if err != nil {
		return err
	}
	if s.mgrErr != nil {
		return s.mgrErr
	}
	if err := s.mgr.Delete(snap); err != nil {
		return err
	}
	s.r.history.add(s.r.epoch.Load(), "snapshot", "snapshot "+snap+" deleted")
	return nil
}

// SetSnapshotSchedule implements api.SnapshotAgent.
func (a *Agent) SetSnapshotSchedule(ctx context.Context, name string, sc volsnap.Schedule) error {
	s, err := a.snapshotsOf(name)
	if err != nil {
		return err
	}
	if s.mgrErr != nil {
		return s.mgrErr
	}
	if err := s.mgr.SetSchedule(sc); err != nil {
		return err
	}
	s.r.history.add(s.r.epoch.Load(), "snapshot", fmt.Sprintf("schedule: every %v, keep %d, daily %d, weekly %d, automatic %d", sc.Every, sc.Keep, sc.KeepDaily, sc.KeepWeekly, sc.AutoKeepOr()))
	return nil
}

// Freeze implements api.SnapshotAgent.
func (a *Agent) Freeze(ctx context.Context, name string, req api.FreezeRequest) (api.FreezeResult, error) {
	s, err := a.snapshotsOf(name)
	if err != nil {
		return api.FreezeResult{}, err
	}
	return s.freeze(ctx, req)
}

// Thaw implements api.SnapshotAgent.
func (a *Agent) Thaw(ctx context.Context, name string) error {
	s, err := a.snapshotsOf(name)
	if err != nil {
		return err
	}
	return s.thaw()
}

// StartTestFailover implements api.SnapshotAgent.
func (a *Agent) StartTestFailover(ctx context.Context, name string, req api.TestFailoverRequest) (api.TestFailoverStatus, error) {
	s, err := a.snapshotsOf(name)
	if err != nil {
		return api.TestFailoverStatus{}, err
	}
	return s.startTest(ctx, req)
}

// StopTestFailover implements api.SnapshotAgent.
func (a *Agent) StopTestFailover(ctx context.Context, name string) error {
	s, err := a.snapshotsOf(name)
	if err != nil {
		return err
	}
	return s.stopTest(ctx)
}

// snapshotCollector exports the jobs' snapshots as Prometheus metrics.
type snapshotCollector struct{ a *Agent }

var (
	descSnapCount = prometheus.NewDesc("doppel_snapshots", "Snapshots of the job's volume on this host.", []string{"job"}, nil)
	descSnapAge   = prometheus.NewDesc("doppel_snapshot_age_seconds", "Age of each snapshot.", []string{"job", "snapshot", "kind"}, nil)
	descSnapSeq   = prometheus.NewDesc("doppel_snapshot_sequence", "Replication sequence number each snapshot was taken at.", []string{"job", "snapshot"}, nil)
	descSnapAlloc = prometheus.NewDesc("doppel_snapshot_allocated_bytes", "Blocks allocated to each snapshot's image, shared ones included (what du reports; LVM: the thin snapshot's mapped data).", []string{"job", "snapshot"}, nil)
	descSnapExcl  = prometheus.NewDesc("doppel_snapshot_exclusive_bytes", "Bytes of each snapshot's extents shared with nothing else (FIEMAP without SHARED: what deleting it frees); absent when the mechanism cannot tell (LVM).", []string{"job", "snapshot"}, nil)
	descSnapTook  = prometheus.NewDesc("doppel_snapshot_took_seconds", "How long taking each snapshot paused the apply stream.", []string{"job", "snapshot"}, nil)
	descSnapTest  = prometheus.NewDesc("doppel_snapshot_test_failover", "1 while a test failover of the job runs on this host.", []string{"job"}, nil)
)

func (c snapshotCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descSnapCount, descSnapAge, descSnapSeq, descSnapAlloc, descSnapExcl, descSnapTook, descSnapTest} {
		ch <- d
	}
}

func (c snapshotCollector) Collect(ch chan<- prometheus.Metric) {
	c.a.mu.Lock()
	rs := make([]*runner, 0, len(c.a.jobs))
	for _, r := range c.a.jobs {
		rs = append(rs, r)
	}
	c.a.mu.Unlock()
	now := time.Now()
	for _, r := range rs {
		s := r.snaps
		if s == nil || s.mgrErr != nil {
			continue
		}
		n := r.rec.Spec.Name
		list := s.mgr.List()
		ch <- prometheus.MustNewConstMetric(descSnapCount, prometheus.GaugeValue, float64(len(list)), n)
		use := s.usageOf(list)
		for _, x := range list {
			ch <- prometheus.MustNewConstMetric(descSnapAge, prometheus.GaugeValue, now.Sub(x.Created).Seconds(), n, x.Name, string(x.Kind))
			ch <- prometheus.MustNewConstMetric(descSnapSeq, prometheus.GaugeValue, float64(x.Point.Seq), n, x.Name)
			ch <- prometheus.MustNewConstMetric(descSnapTook, prometheus.GaugeValue, x.Took.Seconds(), n, x.Name)
			if u := use[x.Name]; u.Allocated >= 0 {
				ch <- prometheus.MustNewConstMetric(descSnapAlloc, prometheus.GaugeValue, float64(u.Allocated), n, x.Name)
			}
			if u := use[x.Name]; u.Exclusive >= 0 {
				ch <- prometheus.MustNewConstMetric(descSnapExcl, prometheus.GaugeValue, float64(u.Exclusive), n, x.Name)
			}
		}
		tf := 0.0
		if st := s.status(); st.TestFailover != nil {
			tf = 1
		}
		ch <- prometheus.MustNewConstMetric(descSnapTest, prometheus.GaugeValue, tf, n)
	}
}

// rollbacker is what a failover to a snapshot needs of a data plane.
type rollbacker interface {
	RollbackTo(gen uint64, roll func(b blockdev.Backend, chunk int64, mark func([]int64) error) error) error
}

// rollback is the failover's ActRollback, on the stopped target: the
// volume's current data is kept as a snapshot of its own
// (before-failover-epoch-N, N the failover's epoch), then the volume is
// rolled back to snapshot name, the rewritten chunks marked dirty for the
// reverse. The job's state says the rollback is pending
// (ha.HardState.RollingBack) from before this runs until it returned
// nil: a rollback that fails or is interrupted is redone (on the
// operator's retry, or when the agent restarts), and the redo finds the
// kept snapshot already there: the half rolled-back volume is never
// taken for the newer data. The runner's lock is held (an action).
func (s *jobSnapshots) rollback(name string, dp DataPlane) error {
	mgr, err := s.manager()
	if err != nil {
		return err
	}
	target, err := mgr.Get(name)
	if err != nil {
		return err
	}
	rb, ok := dp.(rollbacker)
	if !ok {
		return fmt.Errorf("%w: this data plane cannot roll back", api.ErrNotWired)
	}
	epoch := s.r.epoch.Load()
	keep := fmt.Sprintf("before-failover-epoch-%d", epoch)
	kept, err := mgr.Get(keep)
	switch {
	case err == nil:
		s.r.log.Info("rollback redone: the newer data was kept before the first attempt", "snapshot", name, "kept", keep)
	case errors.Is(err, volsnap.ErrNotFound):
		kept, err = mgr.Create(keep, volsnap.KindBeforeRollback, volsnap.Point{}, fmt.Sprintf("the data the failover to %s (epoch %d) replaced", name, epoch))
		if err != nil {
			return fmt.Errorf("keep the newer data before the rollback to %s: %w", name, err)
		}
	default:
		return err
	}
	var changed []int64
	err = rb.RollbackTo(target.Point.Generation, func(b blockdev.Backend, chunk int64, mark func([]int64) error) error {
		var w io.WriterAt = b
		if s.r.a.rollbackWrites != nil {
			w = s.r.a.rollbackWrites(b)
		}
		var err error
		changed, err = mgr.Rollback(name, w, b, b.Size(), chunk, b.Sync, mark)
		return err
	})
	if err != nil {
		err = fmt.Errorf("%w (the newer data is in snapshot %s)", err, kept.Name)
		s.failed(err.Error())
		return err
	}
	s.r.history.add(epoch, "snapshot", fmt.Sprintf("rolled the volume back to snapshot %s (sequence %d, %s): %d chunks rewritten, marked for the reverse; the newer data is kept in snapshot %s",
		name, target.Point.Seq, target.Created.Format(time.RFC3339), len(changed), kept.Name))
	return nil
}
