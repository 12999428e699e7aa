package agent

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strings"
	"sync"
	"time"

	"github.com/doppelha/doppel/blockdev"
	"github.com/doppelha/doppel/daemon/api"
	"github.com/doppelha/doppel/daemon/ha"
	"github.com/doppelha/doppel/daemon/job"
	"github.com/doppelha/doppel/daemon/repl"
	"github.com/doppelha/doppel/daemon/repl/wire"
	"github.com/doppelha/doppel/daemon/replstate"
	volsnap "github.com/doppelha/doppel/daemon/snapshot"
	"github.com/doppelha/doppel/daemon/tlspin"
)

// ReplPlanes makes DataPlanes backed by the replication engine
// (daemon/repl): the source is the served volume's Mutator and ships to the
// peer's replication address; the target listens on the agent's
// replication address. Both authenticate with the agent's certificate and
// pin the peer's (the fingerprints pinned at doppel server add).
//
// Each side keeps its persistent replication state (daemon/replstate: dirty
// bitmap and activity log, queue, generations) under
// StateDir/jobs/NAME.repl: a reverse or a restart resyncs the union of both
// sides' dirty bitmaps; a fresh target gets a checksum-diff mirror. The
// demoted side accepts a split-brain resolution against itself (the
// failover fenced it), saving its divergent chunks first.
//
// One replication listener serves every target job of the agent
// (repl.Mux): the source names its job in a route preamble after the TLS
// handshake, and the mux checks that the connecting certificate is the
// one that job pins before its target reads a byte. The listener opens
// with the first target job and closes with the last.
type ReplPlanes struct {
	Log        *slog.Logger
	Cert       tls.Certificate
	ReplListen string
	StateDir   string
	// RateLimit caps replication bytes per second (0: unlimited).
	RateLimit int64
	// SessionRecorder, if set, returns what a job's replication sessions
	// call for every frame they read: the session path's liveness
	// (ProbeLiveness.SessionRecorder).
	SessionRecorder func(job string) func()

	mu        sync.Mutex
	mux       *repl.Mux
	muxCancel context.CancelFunc // the listener's
	muxDone   chan struct{}
	always    bool // Listen: open while the agent runs, not only with target jobs
}

// Listen opens the replication listener now and keeps it open until
// Close, with or without target jobs: a peer's pre-flight can check that
// this agent is reachable before the job exists, and a port taken by
// another program is found at start, not at the first create.
func (p *ReplPlanes) Listen() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.mux == nil {
		p.mux = repl.NewMux(p.Cert, p.Log)
	}
	p.always = true
	return p.listenLocked()
}

// Close closes the listener opened by Listen once no target job uses it.
func (p *ReplPlanes) Close() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.always = false
	if p.mux != nil && p.mux.Routes() == 0 {
		p.stopLocked()
	}
	return nil
}

// listenLocked opens the listener unless it is open. Called with mu held.
func (p *ReplPlanes) listenLocked() error {
	if p.muxCancel != nil {
		return nil
	}
	l, err := net.Listen("tcp", p.ReplListen)
	if err != nil {
		return fmt.Errorf("listen for replication: %w", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	p.muxCancel, p.muxDone = cancel, done
	mux := p.mux
	go func() {
		defer close(done)
		if err := mux.Serve(ctx, l); err != nil && ctx.Err() == nil {
			p.Log.Error("replication listener", "addr", p.ReplListen, "err", err)
		}
	}()
	return nil
}

// stopLocked closes the listener. Called with mu held.
func (p *ReplPlanes) stopLocked() {
	if p.muxCancel != nil {
		p.muxCancel()
		<-p.muxDone
		p.muxCancel, p.muxDone = nil, nil
	}
}

// route makes the agent's replication listener hand job name's
// connections from the peer pinned by peerPin to serve, opening the
// listener if this is the first target job. remove undoes it (and closes
// the listener after the last job).
func (p *ReplPlanes) route(name, peerPin string, serve func(context.Context, net.Conn) error) (remove func(), err error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.mux == nil {
		p.mux = repl.NewMux(p.Cert, p.Log)
	}
	unroute, err := p.mux.Handle(name, peerPin, serve)
	if err != nil {
		return nil, err
	}
	if err := p.listenLocked(); err != nil {
		unroute()
		return nil, err
	}
	return func() {
		unroute()
		p.mu.Lock()
		defer p.mu.Unlock()
		if p.mux.Routes() == 0 && !p.always {
			p.stopLocked()
		}
	}, nil
}

// Open implements DataPlaneFactory.
func (p *ReplPlanes) Open(rec job.Record, vol JobVolume, fence Fencing, notify func(ha.Event)) (DataPlane, error) {
	_, peer, ok := rec.Spec.Endpoints(rec.Self)
	if !ok {
		return nil, fmt.Errorf("job %s: not a side of it", rec.Spec.Name)
	}
	if vol.Backend == nil {
		return nil, fmt.Errorf("job %s: no volume", rec.Spec.Name)
	}
	return &replPlane{p: p, rec: rec, vol: vol, fence: fence, peer: peer, notify: notify, log: p.Log.With("job", rec.Spec.Name)}, nil
}

type replPlane struct {
	p      *ReplPlanes
	rec    job.Record
	vol    JobVolume // the job's volume: used, never closed here
	fence  Fencing
	peer   job.Endpoint
	notify func(ha.Event)
	log    *slog.Logger

	mu        sync.Mutex
	src       *replstate.Source
	srcRun    context.CancelFunc
	srcDone   chan struct{}
	tgt       *replstate.Target
	tgtRemove func() // stops routing to the target, ends its sessions
	// oldRemove stops answering the old source's connections with the
	// epoch that superseded it (set after a promotion).
	oldRemove func()
	pollStop  context.CancelFunc

	rpo       rpoEstimator
	changed   chunkSet     // written while not replicating
	peeked    *int64       // dirty bytes of the closed state (peekDirty), cached while closed
	gate      sync.RWMutex // held shared by writes in flight
	holdMu    sync.Mutex
	hold      chan struct{}      // non-nil while writes are held (quiesce); closed when they may go on
	drainStop context.CancelFunc // cancels the drain of the current quiesce
	// lastLink, lastState: the facts last reported by the poll; linkGen
	// counts the roles started (which reset them). Under mu.
	lastLink  bool
	lastState string
	linkGen   uint64
}

func (d *replPlane) mode() wire.Mode {
	if d.rec.Spec.Mode == job.ModeAsync {
		return wire.ModeAsync
	}
	return wire.ModeSync
}

// liveness ties the replication session's keepalive to the job's
// monitor settings: a silent session is dropped after interval × missed,
// the bound of the failure detector.
func (d *replPlane) liveness() repl.Liveness {
	m := d.rec.Spec.Monitor
	l := repl.Liveness{Interval: m.Interval, Timeout: m.Interval * time.Duration(m.Missed)}
	if d.p.SessionRecorder != nil {
		l.OnRecv = d.p.SessionRecorder(d.rec.Spec.Name)
	}
	return l
}

func (d *replPlane) stateDir() string {
	return job.ReplStateDir(d.p.StateDir, d.rec.Spec.Name)
}

// source returns the job's replication source, creating it (and opening
// the volume) on first use.
func (d *replPlane) source() (*replstate.Source, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.src != nil {
		return d.src, nil
	}
	cfgTLS, err := tlspin.ClientConfig(&d.p.Cert, d.peer.Fingerprint)
	if err != nil {
		return nil, err
	}
	addr := d.peer.Repl
	dialer := &tls.Dialer{NetDialer: &net.Dialer{Timeout: 5 * time.Second}, Config: cfgTLS}
	name := d.rec.Spec.Name
	dial := func(ctx context.Context) (net.Conn, error) {
		c, err := dialer.DialContext(ctx, "tcp", addr)
		if err != nil {
			return nil, err
		}
		// The peer's listener serves all its target jobs: name ours.
		c.SetWriteDeadline(time.Now().Add(5 * time.Second))
		if err := repl.WriteRoute(c, name); err != nil {
			c.Close()
			return nil, err
		}
		c.SetWriteDeadline(time.Time{})
		return c, nil
	}
	// Force: the state machine decided this side serves (a failover to
	// an inconsistent copy is refused there unless forced).
	src, err := replstate.OpenSource(replstate.SourceConfig{Dir: d.stateDir(),
		Backend: d.vol.Backend, Mode: d.mode(), Log: d.log, RateLimit: d.rateLimit(), Mirror: repl.MirrorDiff, Force: true,
		MemQueue: d.rec.Spec.QueueMemory, DiskQueue: d.rec.Spec.QueueDisk,
		Dial: dial, Liveness: d.liveness(), Binding: d.vol.Binding,
		Epoch: d.fence.Epoch, Superseded: d.fence.NewerEpoch, Authority: d.fence.Authority, SyncTimeout: d.fence.SyncTimeout,
	})
	if err != nil {
		return nil, err
	}
	d.src, d.peeked = src, nil
	// A new source session takes writes: a quiesce belonged to the one
	// a switchover closed.
	d.releaseWrites()
	return src, nil
}

// Mutator implements DataPlane: writes go through the source (local write,
// then shipped), held while a quiesce lasts.
func (d *replPlane) Mutator() blockdev.Mutator {
	if _, err := d.source(); err != nil {
		d.log.Error("replication source", "err", err)
		return errMutator{err}
	}
	return gated{d}
}

type gated struct{ d *replPlane }

// Apply goes through the source whether it runs or not (a failed-over
// host before reverse, a paused job): not shipped, the write is tracked
// (queue, then bitmap) and the next start resyncs it. While a quiesce
// holds writes, Apply waits: it goes on when the quiesce ends without a
// switchover (ResumeWrites), and fails when the source it was held for is
// closed by the switchover (never acknowledged, never written here).
func (g gated) Apply(ctx context.Context, m *blockdev.Mutation) error {
	for {
		if h := g.d.held(); h != nil {
			select {
			case <-h:
				continue
			case <-ctx.Done():
				return ctx.Err()
			}
		}
		g.d.gate.RLock()
		if g.d.held() == nil {
			break
		}
		g.d.gate.RUnlock()
	}
	defer g.d.gate.RUnlock()
	g.d.mu.Lock()
	src, running := g.d.src, g.d.srcRun != nil
	g.d.mu.Unlock()
	if src == nil {
		return repl.ErrClosed
	}
	if !running && m.Op != blockdev.OpFlush {
		g.d.changed.add(m.Offset, m.Length)
	}
	return src.Apply(ctx, m)
}

type errMutator struct{ err error }

func (e errMutator) Apply(context.Context, *blockdev.Mutation) error { return e.err }

// StartSource implements DataPlane.
func (d *replPlane) StartSource(ctx context.Context) error {
	src, err := d.source()
	if err != nil {
		return err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.srcRun != nil {
		return nil
	}
	d.changed.reset()
	// The state handshake decides: nothing, the union of both dirty
	// bitmaps, or a diff mirror to a fresh target; synced is when the
	// target took this side's generation. Until then the job is not
	// replicating: said before the poll can report this session's link up.
	d.notify(ha.Event{Type: ha.EvResync})
	rctx, cancel := context.WithCancel(context.Background())
	d.srcRun = cancel
	done := make(chan struct{})
	d.srcDone = done
	go func() {
		defer close(done)
		if err := src.Run(rctx); err != nil {
			d.notify(ha.Event{Type: ha.EvActionFailed, Action: ha.ActStartSource, Err: err.Error()})
		}
	}()
	go func() {
		t := time.NewTicker(100 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-rctx.Done():
				return
			case <-done:
				return
			case <-t.C:
			}
			if st := src.Status(); st.Synced && st.Connected && !st.ResyncActive {
				d.log.Info("in sync", "resync_sent", st.ResyncSent, "decision", st.Decision)
				d.notify(ha.Event{Type: ha.EvSynced})
				return
			}
		}
	}()
	d.lastLink = false
	d.linkGen++
	d.startPoll()
	return nil
}

// StopSource implements DataPlane: shipping stops and the source is
// closed, so writes still waiting for the target's acknowledgement fail
// (the volume is about to stop being served here).
func (d *replPlane) StopSource() error {
	d.stopRun()
	d.waitRun()
	d.mu.Lock()
	src := d.src
	d.src = nil
	d.mu.Unlock()
	// The quiesce ends with the source it drained: the writes it held
	// find no source and fail (the volume is about to stop being served
	// here), and the next promotion of this host serves a writable volume.
	d.releaseWrites()
	if src == nil {
		return nil
	}
	return src.Close()
}

func (d *replPlane) stopRun() {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.srcRun != nil {
		d.srcRun()
		d.srcRun = nil
	}
}

// waitRun waits for the source's Run to return after stopRun.
func (d *replPlane) waitRun() {
	d.mu.Lock()
	done := d.srcDone
	d.srcDone = nil
	d.mu.Unlock()
	if done != nil {
		<-done
	}
}

// StartTarget implements DataPlane: the agent's replication listener
// routes this job's connections, from the pinned source only, to it.
func (d *replPlane) StartTarget(ctx context.Context) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.tgt != nil {
		return nil
	}
	if d.oldRemove != nil {
		d.oldRemove() // this side is a target again: the route is the target's
		d.oldRemove = nil
	}
	t, err := replstate.OpenTarget(replstate.TargetConfig{Dir: d.stateDir(), Backend: d.vol.Backend, Log: d.log, Discard: "target",
		Liveness: d.liveness(), Binding: d.vol.Binding, Epoch: d.fence.Epoch, NewerEpoch: d.fence.NewerEpoch,
		BeforeInconsistent: d.vol.BeforeInconsistent})
	if err != nil {
		return err
	}
	remove, err := d.p.route(d.rec.Spec.Name, d.peer.Fingerprint, t.ServeConn)
	if err != nil {
		t.Close()
		return err
	}
	d.tgt, d.tgtRemove, d.peeked = t, remove, nil
	d.lastLink, d.lastState = false, ""
	d.linkGen++
	if !t.Status().Consistent {
		// Whatever the job's record says (its state was set aside, a
		// resync was interrupted, by the handshake or inside the
		// stream): this copy is not consistent.
		d.lastState = "inconsistent"
		d.notify(ha.Event{Type: ha.EvResync})
	}
	d.startPoll()
	return nil
}

// StopTarget implements DataPlane. The target applies frames as they
// arrive, in order: there is no separate unapplied queue to apply or drop.
func (d *replPlane) StopTarget(applyQueue bool) error {
	d.mu.Lock()
	t, remove := d.tgt, d.tgtRemove
	d.tgt, d.tgtRemove = nil, nil
	d.mu.Unlock()
	if t == nil {
		return nil
	}
	remove()
	return t.Close()
}

// Promote implements DataPlane. The new epoch is persisted in the job
// record before this runs; the new generation is started when this side's
// source opens its state (it was a target: daemon/replstate promotes it).
// From now on the agent's replication listener answers the old source's
// connections with the epoch that superseded it, so it fences itself at
// its first contact.
func (d *replPlane) Promote(epoch uint64) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.oldRemove != nil {
		d.oldRemove()
		d.oldRemove = nil
	}
	why := fmt.Sprintf("%s was promoted", d.rec.Self)
	remove, err := d.p.route(d.rec.Spec.Name, d.peer.Fingerprint, func(_ context.Context, c net.Conn) error {
		err := replstate.RefuseOlder(c, epoch, why)
		d.log.Info("told the old source it was superseded", "epoch", epoch, "err", err)
		return nil
	})
	if err != nil {
		return fmt.Errorf("answer the old source on the replication listener: %w", err)
	}
	d.oldRemove = remove
	return nil
}

// Pause implements DataPlane: shipping stops; writes queue up to the
// queue's bounds (memory, then disk), then are tracked in the bitmap.
func (d *replPlane) Pause() error {
	d.stopRun()
	d.waitRun()
	return nil
}

// Resume implements DataPlane.
func (d *replPlane) Resume() error { return d.StartSource(context.Background()) }

// Quiesce implements DataPlane: later writes are held (not failed: the
// pre-failback script stops the application, and a switchover that does
// not happen lets them go on), the writes in flight finish, and it returns
// once the target holds every acknowledged write: each sequenced write
// acknowledged, connected, synced, nothing tracked in the bitmap for a
// later resync.
func (d *replPlane) Quiesce(ctx context.Context) error {
	d.holdMu.Lock()
	if d.hold == nil {
		d.hold = make(chan struct{})
	}
	ctx, cancel := context.WithCancel(ctx)
	d.drainStop = cancel
	d.holdMu.Unlock()
	defer cancel()
	d.gate.Lock() // wait for the writes in flight
	//lint:ignore SA2001 taking the lock once is the wait
	d.gate.Unlock()
	d.mu.Lock()
	src := d.src
	d.mu.Unlock()
	if src == nil {
		return errors.New("drain: no replication source on this host")
	}
	if err := src.Drain(ctx); err != nil {
		return fmt.Errorf("drain: %w", err)
	}
	return nil
}

// ResumeWrites implements DataPlane: the quiesce ends (its drain, if still
// running, is cancelled) and the held writes go on.
func (d *replPlane) ResumeWrites() error {
	d.releaseWrites()
	return nil
}

// held returns the channel held writes wait on, nil when writes flow.
func (d *replPlane) held() chan struct{} {
	d.holdMu.Lock()
	defer d.holdMu.Unlock()
	return d.hold
}

// releaseWrites ends a quiesce: its drain stops, held writes go on.
func (d *replPlane) releaseWrites() {
	d.holdMu.Lock()
	defer d.holdMu.Unlock()
	if d.drainStop != nil {
		d.drainStop()
		d.drainStop = nil
	}
	if d.hold != nil {
		close(d.hold)
		d.hold = nil
	}
}

// Flush makes the writes acknowledged so far durable here and, when the
// source replicates, on the target (a barrier through the stream), so
// that closing afterwards leaves nothing to resync. A restart calls it
// before it closes the data plane.
func (d *replPlane) Flush(ctx context.Context) error {
	d.mu.Lock()
	src, running := d.src, d.srcRun != nil
	d.mu.Unlock()
	if src == nil || !running {
		return nil
	}
	return src.Apply(ctx, &blockdev.Mutation{Op: blockdev.OpFlush})
}

// AtPoint runs f at the target's current consistent point (snapshots).
func (d *replPlane) AtPoint(f func(volsnap.Point) error) error {
	d.mu.Lock()
	tgt := d.tgt
	d.mu.Unlock()
	if tgt == nil {
		return fmt.Errorf("%w: job %s: this side applies no replication stream (not its target now)", job.ErrInvalid, d.rec.Spec.Name)
	}
	return tgt.AtPoint(f)
}

// AtSeq runs f exactly at sequence seq of stream, once the target
// applied it (an application-consistent snapshot).
func (d *replPlane) AtSeq(ctx context.Context, stream, seq uint64, f func(volsnap.Point) error) error {
	d.mu.Lock()
	tgt := d.tgt
	d.mu.Unlock()
	if tgt == nil {
		return fmt.Errorf("%w: job %s: this side applies no replication stream (not its target now)", job.ErrInvalid, d.rec.Spec.Name)
	}
	return tgt.AtSeq(ctx, stream, seq, f)
}

// Mark sends a flush through the stream (a barrier, durable here and, in
// sync mode, applied on the target when it returns) and returns the
// stream and the last sequence issued: the target holds the image of
// this moment once it applied it. The source must replicate.
func (d *replPlane) Mark(ctx context.Context) (uint64, uint64, error) {
	d.mu.Lock()
	src, running := d.src, d.srcRun != nil
	d.mu.Unlock()
	if src == nil || !running {
		return 0, 0, fmt.Errorf("%w: job %s does not replicate from this side now", job.ErrInvalid, d.rec.Spec.Name)
	}
	if rs := src.Status(); !rs.Connected || rs.Tracking {
		return 0, 0, fmt.Errorf("%w: job %s's target is not connected: the point would not reach it", job.ErrInvalid, d.rec.Spec.Name)
	}
	return src.Mark(ctx)
}

// Status implements DataPlane.
func (d *replPlane) Status() api.DataStatus {
	d.mu.Lock()
	src, tgt := d.src, d.tgt
	if src == nil && tgt == nil && d.peeked == nil {
		// Nothing open (a returned old source before reverse): what its
		// state holds, read from copies, once.
		n, err := replstate.PeekDirty(d.stateDir())
		if err != nil {
			d.log.Warn("read the replication state's dirty bytes", "err", err)
			n = -1
		}
		d.peeked = &n
	}
	peeked := d.peeked
	d.mu.Unlock()
	st := api.DataStatus{Known: true, RPO: -1}
	if src == nil && tgt == nil && peeked != nil {
		st.DirtyBytes = *peeked
	}
	if src != nil {
		rs := src.Status()
		sourceData(&st, rs)
		st.RPO = d.observeRPO(rs)
		st.ChangedBytes = d.changed.bytes()
	}
	if tgt != nil {
		rs := tgt.Status()
		st.Note = fmt.Sprintf("applied up to sequence %d from %s", rs.Applied, rs.Peer)
		if rs.Refusal != "" {
			st.Note = rs.Refusal
		}
		if src == nil {
			st.DirtyBytes = rs.DirtyBytes
		}
		st.AppliedBytes = rs.AppliedBytes
	}
	return st
}

// sourceData fills st with what the source's replication state rs says:
// queue (memory and disk apart), mirror or resync progress, dirty bytes,
// and a note on what the target has not acknowledged or why it refused.
func sourceData(st *api.DataStatus, rs replstate.Status) {
	st.QueueMemory, st.QueueDisk = rs.QueueMemBytes, rs.QueueDiskBytes
	st.MirrorSent = rs.ResyncSent
	if rs.ResyncActive && !rs.MirrorActive {
		st.SyncTotal, st.SyncDone = rs.ResyncTotal, rs.ResyncDone
		st.BytesRemaining = max(rs.ResyncTotal-rs.ResyncDone, 0)
	}
	if rs.MirrorActive {
		st.SyncTotal, st.SyncDone = rs.MirrorTotal, rs.MirrorDone
		st.BytesRemaining = max(rs.MirrorTotal-rs.MirrorDone, 0)
	}
	st.DirtyBytes, st.HotExtents = rs.DirtyBytes, rs.HotExtents
	if rs.BacklogEntries > 0 {
		st.Note = fmt.Sprintf("%d writes not yet acknowledged by the target", rs.BacklogEntries)
	}
	switch {
	case rs.Refusal != "":
		st.Note = rs.Refusal
	case rs.Tracking || rs.DirtyBytes > 0:
		st.Note = strings.TrimPrefix(fmt.Sprintf("%s; %d bytes dirty (tracked for the resync)", st.Note, rs.DirtyBytes), "; ")
	}
}

// observeRPO records the source's status rs in the RPO estimate (see
// rpoEstimator).
func (d *replPlane) observeRPO(rs replstate.Status) time.Duration {
	return d.rpo.observe(time.Now(), rpoInput{Stream: rs.Stream, Last: rs.LastSeq, Applied: rs.AckedSeq,
		Sync: d.mode() == wire.ModeSync, Connected: rs.Connected,
		AtRisk: rs.Tracking || !rs.Connected || rs.ResyncActive || !rs.Synced, Dirty: rs.DirtyBytes})
}

// Verify implements DataPlane.
func (d *replPlane) Verify(ctx context.Context) (api.VerifyResult, error) {
	d.mu.Lock()
	src := d.src
	running := d.srcRun != nil
	d.mu.Unlock()
	if src == nil || !running {
		return api.VerifyResult{}, fmt.Errorf("%w: verify runs on the job's active source while it replicates", job.ErrInvalid)
	}
	res, err := src.Verify(ctx)
	if err != nil {
		return api.VerifyResult{}, err
	}
	var diff int64
	for _, r := range res.Differing {
		diff += r.Length
	}
	const chunk = repl.DefaultChunkSize
	return api.VerifyResult{Job: d.rec.Spec.Name, Bytes: res.Scanned, Chunks: (res.Scanned + chunk - 1) / chunk,
		Differing: (diff + chunk - 1) / chunk, Equal: len(res.Differing) == 0}, nil
}

// startPoll turns the engine's state into state-machine events: link
// up/down, and on the target resync started / synced (the source learns
// those from its mirror). Called with d.mu held.
func (d *replPlane) startPoll() {
	if d.pollStop != nil {
		return
	}
	ctx, cancel := context.WithCancel(context.Background())
	d.pollStop = cancel
	go func() {
		t := time.NewTicker(100 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
			d.mu.Lock()
			src, tgt, running, gen := d.src, d.tgt, d.srcRun != nil, d.linkGen
			d.mu.Unlock()
			link, state := false, ""
			if src != nil {
				d.observeRPO(src.Status())
			}
			switch {
			case src != nil && running:
				// The source's sync state comes from its mirror.
				link = src.Connected()
			case tgt != nil:
				// replstate is the truth about the copy (its
				// generation and its applier together); the job
				// record's flag follows it.
				ts := tgt.Status()
				link, state = ts.Peer != "", "inconsistent"
				if ts.Consistent {
					state = "consistent"
				}
			}
			// The facts are compared and recorded under d.mu, and
			// dropped when a role started meanwhile (they describe the
			// session before it).
			var evs []ha.Event
			d.mu.Lock()
			if gen == d.linkGen {
				if link != d.lastLink {
					d.lastLink = link
					if link {
						evs = append(evs, ha.Event{Type: ha.EvLinkUp})
					} else {
						evs = append(evs, ha.Event{Type: ha.EvLinkDown})
					}
				}
				// A copy that turned inconsistent says so even
				// when the source went away meanwhile (it may not
				// come back to finish); it is taken for consistent
				// again only from a connected source's session.
				if state != "" && state != d.lastState && (link || state == "inconsistent") {
					switch state {
					case "consistent":
						evs = append(evs, ha.Event{Type: ha.EvSynced})
					case "inconsistent":
						evs = append(evs, ha.Event{Type: ha.EvResync})
					}
					d.lastState = state
				}
			}
			d.mu.Unlock()
			for _, ev := range evs {
				d.notify(ev)
			}
		}
	}()
}

// rateLimit is the job's replication rate limit, else the agent's.
func (d *replPlane) rateLimit() int64 {
	if d.rec.Spec.RateLimit > 0 {
		return d.rec.Spec.RateLimit
	}
	return d.p.RateLimit
}

// Close implements DataPlane.
func (d *replPlane) Close() error {
	err := errors.Join(d.StopSource(), d.StopTarget(false))
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.oldRemove != nil {
		d.oldRemove()
		d.oldRemove = nil
	}
	if d.pollStop != nil {
		d.pollStop()
		d.pollStop = nil
	}
	return err
}

// RollbackTo implements rollbacker: with the target stopped and no source
// open, the volume is rolled back by roll (the snapshot's data written
// through the backend) and the replication state with it
// (replstate.RollbackTarget: the rewritten chunks dirty for the reverse,
// the image consistent). gen is the snapshot's generation.
func (d *replPlane) RollbackTo(gen uint64, roll func(b blockdev.Backend, chunk int64, mark func([]int64) error) error) error {
	d.mu.Lock()
	busy := d.tgt != nil || d.src != nil
	d.mu.Unlock()
	if busy {
		return errors.New("roll back: the volume is in use by replication (the target must be stopped, no source open)")
	}
	chunk := int64(repl.DefaultChunkSize)
	return replstate.RollbackTarget(d.stateDir(), d.vol.Backend.Size(), chunk, gen, func(mark func([]int64) error) error {
		return roll(d.vol.Backend, chunk, mark)
	})
}
