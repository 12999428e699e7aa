// Package ha is the failover state machine of a doppel job: protect, mirror,
// replicate, detect the source's failure, fail over (automatically or on the
// operator's word), fence the returned old source, reverse protection and
// fail back.
//
// It is a pure state machine in the style of etcd raft's RawNode: one Node
// per job per agent; the driver steps it with events (Step), advances its
// clock by one monitor interval (Tick) and collects what to do (Ready):
// state to persist, messages for the peer's node and actions (serve the
// volume, take the service IP, promote, run a script...). There are no
// sockets, netlink, goroutines or wall clock inside: all time is ticks, all
// effects are returned, so every scenario is a deterministic transcript
// (testdata/*.txt, regenerated with go test -rewrite).
//
// Failure detection is not the node's: the agent's detector (daemon/monitor
// over the probe's kernel timestamps, with rise hysteresis) declares the
// peer down when every monitored path has been silent for interval ×
// missed, and up again, and steps those verdicts in (EvPeerDown,
// EvPeerUp). Ticks and heartbeats only feed the paths' status, a restarted
// source's start grace, the switchover's timeouts and the "source still
// heard" refusal.
//
// Safety rules it enforces:
//   - the target takes the source for failed only on the detector's
//     verdict;
//   - automatic failover only in auto mode and only onto a consistent target;
//     the operator's failover is refused for an inconsistent target, a source
//     still alive, or a job already failed over (the first two unless forced);
//   - a restarted source neither serves nor takes the service IP until it has
//     heard its peer (or StartGrace ticks passed); a source that learns of a
//     newer epoch fences itself ("superseded, run doppel reverse");
//   - equal epochs claimed by two sources is split brain, reported, never
//     resolved silently;
//   - a planned switchover (doppel switchover, doppel failback) holds the
//     source's writes, drains them to the target, asks the target whether
//     it can take over, and only then releases the service IPs, stops
//     serving and becomes target; the peer promotes at a new epoch. A
//     target that refuses, a drain that fails, a peer that goes silent or
//     does not answer end the switchover with writes resumed where they
//     were: nothing moved.
package ha

import (
	"errors"
	"fmt"
	"slices"
)

// Config is a node's static configuration for one job.
type Config struct {
	Job  string
	Self string // this agent's name in the job
	Peer string // the other agent's name
	// Home is the job's original source: failback returns the role to it.
	Home     string
	Failover FailoverMode
	// Paths names the monitored paths (e.g. "repl", "app").
	Paths []string
	// Missed is the detector's number of silent intervals: a path silent
	// for Missed ticks is shown down, and it sizes the start grace and
	// the switchover's timeouts.
	Missed int
	// StartGrace is how many ticks a restarted source waits to hear its
	// peer before serving; 0 means 2 × Missed.
	StartGrace int
	// Arbiter: promotions go through the arbiter (docs/safety.md): a
	// failover asks it for the next epoch (ActCampaign) and happens only
	// with the epoch it granted (EvPromotion); a newer epoch learned
	// anywhere fences a source (EvEpochSeen).
	Arbiter bool
}

// Node is the state machine of one job on one agent.
type Node struct {
	cfg Config
	hs  HardState

	state      State
	started    bool
	linkUp     bool
	silent     map[string]int  // path -> whole ticks without hearing the peer
	heard      map[string]bool // path -> heard since the last tick
	sourceDown bool            // target: the detector declared the source failed
	peerDown   bool            // the detector's last verdict was down
	// campaign: Arbiter, a promotion asked for and not answered for good.
	campaign   *campaign
	startTicks int // ticks spent in StateStarting

	// A switchover this node started as source (StateSwitchingOver,
	// StateFailingBack): drained once EvDrained came; waitTicks counts
	// the ticks since, linkDownTicks the ticks in a row without the link.
	drained       bool
	waitTicks     int
	linkDownTicks int

	// resumed: this node restarted with a rollback pending
	// (HardState.RollingBack): once it completes, the node promotes and
	// then waits to hear its peer like any restarted source.
	resumed bool
	// postFailover: the failover's post-failover hook is still owed (a
	// rollback redone after a restart); run when the node serves.
	postFailover bool

	peerKnown      bool
	peerRole       Role
	peerEpoch      uint64
	peerSuperseded bool

	reason  string
	lastErr string

	pending  Ready
	lastSent HardState
}

// campaign is a promotion this target asked the arbiter for.
type campaign struct {
	auto         bool // the source was declared down (not the operator)
	planned      bool // a switchover's handover
	force        bool
	discardQueue bool
	snapshot     string // failover to this snapshot (rolled back before the promotion)
	prevState    State  // to go back to when it is refused
	prevReason   string
}

// NewNode returns a node for cfg resuming from hs (the zero HardState is not
// valid: a new job starts from Initial).
func NewNode(cfg Config, hs HardState) (*Node, error) {
	if cfg.Job == "" || cfg.Self == "" || cfg.Peer == "" || cfg.Self == cfg.Peer {
		return nil, fmt.Errorf("ha: job %q: need distinct self and peer names (%q, %q)", cfg.Job, cfg.Self, cfg.Peer)
	}
	if cfg.Home != cfg.Self && cfg.Home != cfg.Peer {
		return nil, fmt.Errorf("ha: job %q: home %q is neither %q nor %q", cfg.Job, cfg.Home, cfg.Self, cfg.Peer)
	}
	if cfg.Failover != FailoverAuto && cfg.Failover != FailoverManual {
		return nil, fmt.Errorf("ha: job %q: failover mode %q is neither auto nor manual", cfg.Job, cfg.Failover)
	}
	if len(cfg.Paths) == 0 {
		return nil, fmt.Errorf("ha: job %q: no monitored path", cfg.Job)
	}
	if cfg.Missed < 1 {
		return nil, fmt.Errorf("ha: job %q: missed must be at least 1, got %d", cfg.Job, cfg.Missed)
	}
	if hs.Role != RoleSource && hs.Role != RoleTarget {
		return nil, fmt.Errorf("ha: job %q: role %q is neither source nor target", cfg.Job, hs.Role)
	}
	if cfg.StartGrace == 0 {
		cfg.StartGrace = 2 * cfg.Missed
	}
	n := &Node{cfg: cfg, hs: hs, lastSent: hs, silent: map[string]int{}, heard: map[string]bool{}}
	for _, p := range cfg.Paths {
		n.silent[p] = 0
	}
	n.state = StateDisconnected
	return n, nil
}

// Initial is the hard state of a freshly created job on the named agent.
func Initial(cfg Config) HardState {
	if cfg.Self == cfg.Home {
		return HardState{Role: RoleSource, Epoch: 1}
	}
	return HardState{Role: RoleTarget, Epoch: 1}
}

// HardState returns the node's current persistent state.
func (n *Node) HardState() HardState { return n.hs }

// Tick advances the node's clock by one monitor interval.
func (n *Node) Tick() {
	if !n.started {
		return
	}
	for _, p := range n.cfg.Paths {
		switch {
		case n.heard[p]:
			n.heard[p] = false // heard during this interval: not a silent one
		case n.silent[p] < 1<<30:
			n.silent[p]++
		}
	}
	switch {
	case n.state == StateStarting:
		n.startTicks++
		if n.startTicks >= n.cfg.StartGrace {
			n.reason = ""
			n.hs.Alone = true
			n.becomeActiveSource()
		}
	case n.switching():
		n.tickSwitchover()
	}
}

// Step feeds one event. Operator commands return a *RefusedError when they
// do not apply, and change nothing then.
func (n *Node) Step(ev Event) error {
	if !n.started && ev.Type != EvStart {
		return fmt.Errorf("ha: job %q: %s before start", n.cfg.Job, ev.Type)
	}
	switch ev.Type {
	case EvStart:
		if n.started {
			return nil
		}
		n.started = true
		n.start()
	case EvLinkUp:
		n.linkUp = true
		n.hello(false)
		n.refreshState()
	case EvLinkDown:
		n.linkUp = false
		n.refreshState()
	case EvResync:
		n.setConsistent(false)
		n.refreshState()
	case EvSynced:
		n.setConsistent(true)
		n.refreshState()
	case EvHeartbeat:
		if _, ok := n.silent[ev.Path]; !ok {
			return fmt.Errorf("ha: job %q: heartbeat on unknown path %q", n.cfg.Job, ev.Path)
		}
		n.silent[ev.Path] = 0
		n.heard[ev.Path] = true
	case EvPeerDown:
		n.peerDown = true
		if n.switching() {
			n.abortSwitchover(n.cfg.Peer + " was declared down")
		}
		if n.hs.Role == RoleTarget && !n.hs.Superseded && !n.sourceDown {
			n.sourceDown = true
			n.onSourceDown()
		}
	case EvPeerUp:
		n.peerDown = false
		if n.campaign != nil && n.campaign.auto {
			// The source is back: it was not gone.
			n.campaign = nil
			n.act(Action{Type: ActStopCampaign})
			n.state = StateSourceDown // sourceBack leaves it
		}
		n.sourceBack()
	case EvPromotion:
		if !n.cfg.Arbiter {
			return fmt.Errorf("ha: job %q: %s without an arbiter", n.cfg.Job, ev.Type)
		}
		n.onPromotion(ev)
	case EvEpochSeen:
		n.onEpochSeen(ev.Epoch)
	case EvLease:
		if ev.Held && n.state == StateStarting && !n.hs.Superseded {
			// Nobody can have been promoted while this side holds the key.
			n.reason = ""
			n.becomeActiveSource()
		}
	case EvDrained:
		n.onDrained()
	case EvActionFailed:
		n.lastErr = fmt.Sprintf("%s: %s", ev.Action, ev.Err)
		if ev.Action == ActQuiesce && n.switching() && !n.drained {
			n.abortSwitchover("the drain failed: " + ev.Err)
		}
		if ev.Action == ActRollback && n.hs.RollingBack != "" {
			s := n.hs.RollingBack
			n.state = StateRollingBack
			n.reason = fmt.Sprintf("the rollback to snapshot %s failed: %s; the volume is NOT served: it holds part of %s and part of the newer data; fix the cause, then run doppel failover %s --snapshot %s again (or restart the agent: it redoes the rollback)",
				s, ev.Err, s, n.cfg.Job, s)
		}
	case EvRolledBack:
		n.rolledBack(ev.Snapshot)
	case EvMessage:
		if ev.Msg == nil {
			return fmt.Errorf("ha: job %q: message event without message", n.cfg.Job)
		}
		n.onMessage(*ev.Msg)
	case CmdFailover:
		return n.failover(ev, false)
	case CmdReverse:
		return n.reverse()
	case CmdFailback, CmdSwitchover:
		return n.switchover(ev.Type)
	case CmdPause:
		return n.pause()
	case CmdResume:
		return n.resume()
	default:
		return fmt.Errorf("ha: job %q: unknown event %q", n.cfg.Job, ev.Type)
	}
	return nil
}

// Announce queues a hello with this node's role and epoch. The driver
// repeats it while the replication link is down, so a peer that was away
// (a partition, a restart) learns of a promotion at its first contact,
// whoever reaches whom first.
func (n *Node) Announce() {
	if n.started {
		n.hello(false)
	}
}

// HasReady reports whether Ready has anything to do.
func (n *Node) HasReady() bool {
	return n.hs != n.lastSent || len(n.pending.Messages) > 0 || len(n.pending.Actions) > 0 || len(n.pending.AfterActions) > 0
}

// Ready returns what the driver must do now and forgets it: the driver
// persists HardState (when MustPersist) before sending the messages and
// doing the actions, in order.
func (n *Node) Ready() Ready {
	rd := n.pending
	rd.HardState = n.hs
	rd.MustPersist = n.hs != n.lastSent
	n.lastSent = n.hs
	n.pending = Ready{}
	return rd
}

// Status reports the node's view of the job.
func (n *Node) Status() Status {
	st := Status{
		Job: n.cfg.Job, Self: n.cfg.Self, Peer: n.cfg.Peer,
		Home: n.cfg.Home, Role: n.hs.Role, State: n.state, Epoch: n.hs.Epoch,
		Consistent: n.hs.Consistent, Failover: n.cfg.Failover,
		LinkUp: n.linkUp, Reason: n.reason, LastError: n.lastErr,
		RollingBack: n.hs.RollingBack,
	}
	for _, p := range n.cfg.Paths {
		s := n.silent[p]
		st.Paths = append(st.Paths, PathStatus{Name: p, SilentTicks: s, Up: s < n.cfg.Missed})
	}
	return st
}

// sourceBack: the peer is heard again; a source-down that did not fail
// over is over.
func (n *Node) sourceBack() {
	if n.sourceDown {
		n.sourceDown = false
		if n.state == StateSourceDown {
			n.reason = ""
			n.state = ""
			n.refreshState()
		}
	}
}

// peerAlive: the detector does not say the peer is down, or (its verdict
// being slower to rise) the peer was heard in the last tick: enough for an
// operator command that needs the peer, and the safe side for the
// "source still heard" refusal.
func (n *Node) peerAlive() bool {
	if !n.peerDown {
		return true
	}
	for _, p := range n.cfg.Paths {
		if n.silent[p] == 0 {
			return true
		}
	}
	return false
}

func (n *Node) act(a ...Action) { n.pending.Actions = append(n.pending.Actions, a...) }

func (n *Node) send(t MessageType, reply bool) {
	n.pending.Messages = append(n.pending.Messages, Message{
		Type: t, From: n.cfg.Self, To: n.cfg.Peer, Role: n.hs.Role,
		Epoch: n.hs.Epoch, Superseded: n.hs.Superseded, Reply: reply,
	})
}

func (n *Node) sendRefusal(reason string) {
	n.send(MsgHandoverRefused, false)
	n.pending.Messages[len(n.pending.Messages)-1].Reason = reason
}

func (n *Node) hello(reply bool) { n.send(MsgHello, reply) }

func (n *Node) setConsistent(c bool) { n.hs.Consistent = c }

func (n *Node) start() {
	switch {
	case n.hs.Superseded:
		n.fence() // announces itself
		return
	case n.hs.RollingBack != "":
		// A rollback that did not complete (agent killed, or it failed
		// and the agent restarted): redo it before anything is served.
		// It is idempotent: the chunks already rewritten compare equal.
		n.resumed = true
		n.state = StateRollingBack
		n.reason = fmt.Sprintf("the rollback to snapshot %s did not complete before the agent stopped: redoing it; the volume is not served until it completes", n.hs.RollingBack)
		n.act(Action{Type: ActRollback, Snapshot: n.hs.RollingBack})
	case n.hs.Role == RoleSource:
		n.state = StateStarting
		n.reason = "waiting to hear " + n.cfg.Peer + " before serving"
	default:
		n.act(Action{Type: ActStartTarget})
		n.refreshState()
	}
	n.hello(false)
	if n.hs.HandingOver {
		n.send(MsgHandover, false) // restarted before the peer confirmed
	}
}

// becomeActiveSource serves the volume, takes the service IP and starts
// shipping: the end of StateStarting.
func (n *Node) becomeActiveSource() {
	n.act(Action{Type: ActServe}, Action{Type: ActApplyIdentity})
	if n.postFailover {
		n.postFailover = false
		n.act(Action{Type: ActRunScript, Hook: HookPostFailover})
	}
	if n.hs.Paused {
		n.act(Action{Type: ActPauseRepl})
	}
	n.act(Action{Type: ActStartSource})
	n.state = "" // leave Starting
	n.refreshState()
}

// refreshState recomputes the state from the facts for the states that
// follow from them (not the ones held by a procedure in progress).
func (n *Node) refreshState() {
	switch n.state {
	case StateStarting, StateSuperseded, StateSplitBrain, StateFailingBack, StateSwitchingOver, StateSourceDown, StatePromoting, StateRollingBack:
		return
	case StateFailedOver:
		if n.hs.FailedOver {
			return
		}
	}
	switch {
	case n.hs.Role == RoleTarget && n.hs.HandingOver:
		n.state = StateHandingOver
	case n.hs.Role == RoleSource && n.hs.Paused:
		n.state = StatePaused
	case n.hs.Role == RoleSource && n.hs.FailedOver:
		n.state = StateFailedOver
	case !n.linkUp:
		n.state = StateDisconnected
	case !n.hs.Consistent && n.state == StateReversing:
		// stays reversing until synced
	case !n.hs.Consistent:
		n.state = StateMirroring
	default:
		n.state = StateReplicating
	}
}

func (n *Node) onSourceDown() {
	switch {
	case n.cfg.Failover == FailoverAuto && n.hs.Consistent:
		// Every path is silent: the source is gone (with an arbiter, once
		// its lease expired).
		n.state = StateSourceDown
		_ = n.failover(Event{Type: CmdFailover}, true)
	case n.cfg.Failover == FailoverAuto:
		n.state = StateSourceDown
		n.reason = "source " + n.cfg.Peer + " is down but the target is inconsistent (mirror incomplete): no automatic failover; doppel failover --force takes over with incomplete data"
	default:
		n.state = StateSourceDown
		n.reason = "source " + n.cfg.Peer + " is down: run doppel failover"
	}
}

func (n *Node) refuse(cmd EventType, err error, format string, a ...any) error {
	return &RefusedError{Command: cmd, Err: err, Reason: fmt.Sprintf(format, a...)}
}

func (n *Node) failover(ev Event, auto bool) error {
	switch {
	case n.hs.RollingBack != "" && ev.Snapshot == "":
		return n.refuse(CmdFailover, ErrBadState, "job %s: the rollback of %s's volume to snapshot %s is not complete: the volume holds part of it and part of the newer data; run doppel failover %s --snapshot %s to finish it (or --snapshot another one)",
			n.cfg.Job, n.cfg.Self, n.hs.RollingBack, n.cfg.Job, n.hs.RollingBack)
	case n.hs.RollingBack != "":
		// The epoch was granted already: only the rollback is redone
		// (to the same snapshot, or another one the operator chose).
		n.hs.RollingBack = ev.Snapshot
		n.state = StateRollingBack
		n.reason = fmt.Sprintf("rolling the volume back to snapshot %s again before serving it", ev.Snapshot)
		n.act(Action{Type: ActRollback, Snapshot: ev.Snapshot})
		return nil
	case n.hs.Role == RoleSource && n.hs.FailedOver:
		return n.refuse(CmdFailover, ErrAlreadyFailedOver, "job %s already failed over to %s (epoch %d); next step: doppel reverse", n.cfg.Job, n.cfg.Self, n.hs.Epoch)
	case n.hs.Superseded:
		return n.refuse(CmdFailover, ErrWrongRole, "%s is the superseded old source of job %s; %s holds the job", n.cfg.Self, n.cfg.Job, n.cfg.Peer)
	case n.hs.Role == RoleSource:
		return n.refuse(CmdFailover, ErrWrongRole, "%s is the source of job %s: fail over on its target %s", n.cfg.Self, n.cfg.Job, n.cfg.Peer)
	case n.switching():
		return n.refuse(CmdFailover, ErrBadState, "job %s is switching over", n.cfg.Job)
	case !n.hs.Consistent && !ev.Force && ev.Snapshot == "":
		// A snapshot is a consistent image whatever the volume holds now:
		// the failover rolls the volume back to it first.
		return n.refuse(CmdFailover, ErrInconsistent, "target %s is inconsistent (mirror or resync incomplete): its data is not a usable image; --snapshot S fails over to a snapshot taken before (doppel snapshot list), --force takes over anyway", n.cfg.Self)
	case !auto && n.peerAlive() && !ev.Force:
		return n.refuse(CmdFailover, ErrSourceAlive, "source %s is still heard on %s: use doppel switchover for a planned switchover (no data loss), or --force (the source will be fenced)", n.cfg.Peer, n.alivePaths())
	}
	if n.cfg.Arbiter {
		if n.campaign != nil {
			return n.refuse(CmdFailover, ErrBadState, "job %s: a promotion of %s is already under way (%s)", n.cfg.Job, n.cfg.Self, n.reason)
		}
		n.askArbiter(&campaign{auto: auto, force: ev.Force, discardQueue: ev.DiscardQueue, snapshot: ev.Snapshot})
		return nil
	}
	n.promoteFailover(max(n.hs.Epoch, n.peerEpoch)+1, ev.DiscardQueue, ev.Snapshot)
	return nil
}

// askArbiter starts a campaign for the next epoch: nothing changes until
// the arbiter grants it (EvPromotion).
func (n *Node) askArbiter(c *campaign) {
	c.prevState, c.prevReason = n.state, n.reason
	n.campaign = c
	epoch := n.hs.Epoch + 1
	n.state = StatePromoting
	n.reason = fmt.Sprintf("asking the arbiter for epoch %d", epoch)
	if c.force {
		n.reason += " (forced: the old source's lease is revoked and waited out)"
	}
	why := "failover: the operator asked"
	switch {
	case c.planned:
		why = "switchover: " + n.cfg.Peer + " handed over"
	case c.force:
		why = "forced failover by the operator"
	case c.auto:
		why = "failover: " + n.cfg.Peer + " was declared down"
	}
	n.act(Action{Type: ActCampaign, Epoch: epoch, Force: c.force, Why: why})
}

// onPromotion takes the arbiter's answer.
func (n *Node) onPromotion(ev Event) {
	c := n.campaign
	if c == nil || n.hs.Role != RoleTarget || n.hs.Superseded {
		n.lastErr = fmt.Sprintf("arbiter answer (epoch %d, %q) with no promotion asked", ev.Epoch, ev.Err)
		return
	}
	if ev.Err != "" {
		if !ev.Final {
			n.reason = "waiting for the arbiter: " + ev.Err
			return
		}
		n.campaign = nil
		n.lastErr = "the arbiter refused the promotion of " + n.cfg.Self + ": " + ev.Err
		n.state, n.reason = c.prevState, c.prevReason
		if c.auto && n.sourceDown {
			n.state = StateSourceDown
			n.reason = "source " + n.cfg.Peer + " is down but the arbiter refused to promote " + n.cfg.Self + ": " + ev.Err
			return
		}
		if n.state == StatePromoting || n.state == "" {
			n.state = ""
			n.refreshState()
		}
		return
	}
	n.campaign = nil
	if c.planned {
		n.takeOver(ev.Epoch)
		return
	}
	n.promoteFailover(ev.Epoch, c.discardQueue, c.snapshot)
}

// onEpochSeen: a newer epoch than this node's exists somewhere.
func (n *Node) onEpochSeen(epoch uint64) {
	n.peerEpoch = max(n.peerEpoch, epoch)
	if epoch <= n.hs.Epoch || n.hs.Superseded {
		return
	}
	switch {
	case n.hs.Role == RoleSource:
		n.fence()
	case n.campaign == nil:
		n.hs.Epoch = epoch // a target follows the newest history
	}
}

// promoteFailover makes this target the source at epoch; with a
// snapshot, its volume is rolled back to it first (after the applier
// stopped): the promoted copy is the snapshot's image, a consistent one.
// The rollback is recorded as pending (HardState.RollingBack) in the
// same persisted state as the epoch, before the volume is touched, and
// the promotion and serving wait for it to complete (EvRolledBack).
func (n *Node) promoteFailover(epoch uint64, discardQueue bool, snapshot string) {
	n.act(
		Action{Type: ActRunScript, Hook: HookPreFailover},
		Action{Type: ActStopTarget, ApplyQueue: !discardQueue},
	)
	// Every other flag (paused, alone, handing over) belonged to the
	// role this node leaves.
	n.hs = HardState{Role: RoleSource, Epoch: epoch, Consistent: n.hs.Consistent || snapshot != "", FailedOver: true, RollingBack: snapshot}
	n.sourceDown = false
	n.lastErr = ""
	if snapshot != "" {
		n.state = StateRollingBack
		n.reason = "rolling the volume back to snapshot " + snapshot + " before serving it"
		n.act(Action{Type: ActRollback, Snapshot: snapshot})
	} else {
		n.servePromoted()
	}
	// Tell the old source, in case it hears: it fences itself.
	n.send(MsgPromoted, false)
}

// servePromoted ends a failover: promote, serve, take the service IPs.
func (n *Node) servePromoted() {
	n.act(
		Action{Type: ActPromote, Epoch: n.hs.Epoch},
		Action{Type: ActServe},
		Action{Type: ActApplyIdentity},
		Action{Type: ActRunScript, Hook: HookPostFailover},
	)
	n.state = StateFailedOver
	n.reason = ""
}

// rolledBack: the pending rollback completed (the volume holds the
// snapshot's data, synced): the marker goes, the promotion follows. A
// node that restarted with the rollback pending then waits to hear its
// peer before serving, like any restarted source, and runs the
// failover's post-failover hook once it serves.
func (n *Node) rolledBack(snapshot string) {
	if n.hs.RollingBack == "" || snapshot != n.hs.RollingBack {
		n.lastErr = fmt.Sprintf("rolled back to snapshot %q with no such rollback pending (%q)", snapshot, n.hs.RollingBack)
		return
	}
	n.hs.RollingBack = ""
	n.lastErr = ""
	if !n.resumed {
		n.servePromoted()
		return
	}
	n.resumed = false
	n.postFailover = true
	n.act(Action{Type: ActPromote, Epoch: n.hs.Epoch})
	n.state = StateStarting
	n.startTicks = 0
	n.reason = "rolled back to snapshot " + snapshot + "; waiting to hear " + n.cfg.Peer + " before serving"
}

func (n *Node) alivePaths() string {
	var alive []string
	for _, p := range n.cfg.Paths {
		if n.silent[p] < n.cfg.Missed {
			alive = append(alive, p)
		}
	}
	return fmt.Sprint(alive)
}

// fence makes this node the superseded old source: no service IP, volume
// not served, nothing shipped.
func (n *Node) fence() {
	n.hs.Superseded = true
	n.hs.FailedOver = false
	n.hs.HandingOver = false
	n.drained = false
	n.state = StateSuperseded
	n.reason = "superseded by " + n.cfg.Peer + ", run doppel reverse"
	if n.hs.Alone {
		n.reason = "split brain: " + n.cfg.Self + " served alone while " + n.cfg.Peer + " took over; superseded by " + n.cfg.Peer + ", run doppel reverse (" + n.cfg.Self + "'s divergent blocks are saved before the resync)"
	}
	// Stop shipping first: writes waiting for the (gone) target's
	// acknowledgement fail instead of holding the volume open.
	n.act(Action{Type: ActReleaseIdentity}, Action{Type: ActStopSource}, Action{Type: ActStopServe})
	n.hello(false) // the new source learns that this node is fenced
}

func (n *Node) onMessage(m Message) {
	if m.From != n.cfg.Peer || m.To != n.cfg.Self {
		n.lastErr = fmt.Sprintf("message %s not for this job's pair", m)
		return
	}
	n.peerKnown = true
	n.peerRole, n.peerEpoch, n.peerSuperseded = m.Role, m.Epoch, m.Superseded
	switch m.Type {
	case MsgHello, MsgPromoted:
		n.onPeerState(m)
		if m.Type == MsgHello && !m.Reply {
			n.hello(true)
		}
	case MsgReverse:
		if !n.hs.Superseded || m.Epoch < n.hs.Epoch {
			n.lastErr = fmt.Sprintf("ignored %s: not superseded by that epoch", m)
			return
		}
		n.hs = HardState{Role: RoleTarget, Epoch: m.Epoch, Consistent: false}
		n.state = StateReversing
		n.reason = ""
		n.act(Action{Type: ActStartTarget})
	case MsgHandoverPrepare:
		n.onHandoverPrepare(m)
	case MsgHandoverReady:
		if n.switching() && n.drained && n.hs.Role == RoleSource {
			n.demote()
		}
	case MsgHandoverRefused:
		if n.switching() && n.hs.Role == RoleSource {
			n.abortSwitchover(n.cfg.Peer + " refused to take over: " + m.Reason)
		}
	case MsgHandover:
		n.onHandover(m)
	case MsgHandoverDone:
		if !n.hs.HandingOver {
			return
		}
		n.hs.HandingOver = false
		n.hs.Epoch = max(n.hs.Epoch, m.Epoch)
		n.reason = ""
		n.linkUp = false
		n.state = ""
		n.refreshState()
	}
}

// onPeerState reconciles this node with the peer's announced role/epoch.
func (n *Node) onPeerState(m Message) {
	if n.hs.Superseded {
		return
	}
	if n.hs.Role == RoleTarget {
		switch {
		case m.Role == RoleSource && m.Epoch > n.hs.Epoch:
			n.hs.Epoch = m.Epoch
			if n.hs.HandingOver {
				// The peer took over: its confirmation was lost.
				n.hs.HandingOver = false
				n.reason = ""
				n.refreshState()
			}
		case m.Role == RoleTarget && n.hs.HandingOver && !m.Reply:
			n.send(MsgHandover, false) // the peer has not taken over yet
		}
		return
	}
	// This node is a source.
	if m.Role == RoleTarget && m.Epoch == n.hs.Epoch {
		n.hs.Alone = false
	}
	if m.Role != RoleSource || m.Superseded {
		if n.state == StateStarting {
			n.reason = ""
			n.becomeActiveSource()
		}
		return
	}
	switch {
	case m.Epoch > n.hs.Epoch:
		n.fence()
	case m.Epoch == n.hs.Epoch:
		n.state = StateSplitBrain
		n.reason = fmt.Sprintf("split brain: %s and %s both claim source at epoch %d; resolve by hand (doppel verify, then reverse on the host whose data you keep)", n.cfg.Self, n.cfg.Peer, m.Epoch)
	default:
		// The peer is an older source: our reply hello fences it.
		if n.state == StateStarting {
			n.reason = ""
			n.becomeActiveSource()
		}
	}
}

func (n *Node) reverse() error {
	switch {
	case n.hs.Superseded:
		return n.refuse(CmdReverse, ErrWrongRole, "%s is the superseded side of job %s: run doppel reverse against %s, which holds the job", n.cfg.Self, n.cfg.Job, n.cfg.Peer)
	case !n.hs.FailedOver:
		return n.refuse(CmdReverse, ErrBadState, "job %s is %s: reverse applies to a failed-over job", n.cfg.Job, n.state)
	case !n.peerKnown || !n.peerSuperseded || !n.peerAlive():
		return n.refuse(CmdReverse, ErrPeerUnreachable, "old source %s has not reported back fenced: start its agent (it must be reachable on %v) and retry", n.cfg.Peer, n.cfg.Paths)
	}
	n.hs.FailedOver = false
	n.hs.Consistent = false
	n.state = StateReversing
	n.reason = ""
	n.act(Action{Type: ActStartSource})
	n.send(MsgReverse, false)
	return nil
}

// switching reports whether this node is the source of a switchover in
// progress (before it demoted itself).
func (n *Node) switching() bool {
	return n.state == StateSwitchingOver || n.state == StateFailingBack
}

// switchover starts a planned switchover to the peer (CmdSwitchover), or
// back to the job's home (CmdFailback, refused elsewhere).
func (n *Node) switchover(cmd EventType) error {
	switch {
	case n.hs.Role != RoleSource || n.hs.Superseded:
		return n.refuse(cmd, ErrWrongRole, "%s is not the active source of job %s: run %s against %s", n.cfg.Self, n.cfg.Job, cmd, n.cfg.Peer)
	case cmd == CmdFailback && n.cfg.Self == n.cfg.Home:
		return n.refuse(cmd, ErrBadState, "job %s already runs on its original source %s (doppel switchover moves it to %s)", n.cfg.Job, n.cfg.Self, n.cfg.Peer)
	case n.switching():
		return n.refuse(cmd, ErrBadState, "a switchover of job %s to %s is already under way", n.cfg.Job, n.cfg.Peer)
	case n.hs.FailedOver:
		return n.refuse(cmd, ErrBadState, "job %s is failed over and not protected: run doppel reverse first, then %s once replicating", n.cfg.Job, cmd)
	case n.hs.Paused:
		return n.refuse(cmd, ErrBadState, "job %s is paused: doppel job resume first, then %s once replicating", n.cfg.Job, cmd)
	case n.state != StateReplicating:
		return n.refuse(cmd, ErrBadState, "%s needs job %s replicating with both hosts up (state: %s)", cmd, n.cfg.Job, n.state)
	case !n.peerAlive():
		return n.refuse(cmd, ErrPeerUnreachable, "target %s is not heard on any path", n.cfg.Peer)
	}
	n.state = StateSwitchingOver
	if n.cfg.Peer == n.cfg.Home {
		n.state = StateFailingBack
	}
	n.drained, n.waitTicks, n.linkDownTicks = false, 0, 0
	n.reason = "switching over to " + n.cfg.Peer + ": writes held while the target catches up"
	n.lastErr = ""
	n.act(Action{Type: ActRunScript, Hook: HookPreFailback}, Action{Type: ActQuiesce})
	return nil
}

// switchoverTicks bounds the wait for the target's answer once drained,
// and the link being down during a switchover.
func (n *Node) switchoverTicks() int { return max(40, 8*n.cfg.Missed) }

func (n *Node) tickSwitchover() {
	if n.linkUp {
		n.linkDownTicks = 0
	} else {
		n.linkDownTicks++
	}
	if n.drained {
		n.waitTicks++
	}
	switch {
	case n.linkDownTicks > 2*n.cfg.Missed:
		n.abortSwitchover(fmt.Sprintf("the replication link to %s is down", n.cfg.Peer))
	case n.waitTicks > n.switchoverTicks():
		n.abortSwitchover(fmt.Sprintf("%s did not answer within %d intervals", n.cfg.Peer, n.switchoverTicks()))
	}
}

func (n *Node) onDrained() {
	if !n.switching() || n.hs.Role != RoleSource || n.drained {
		return
	}
	// Every acknowledged write is on the target and writes are held:
	// ask it to take over (nothing moved yet).
	n.drained, n.waitTicks = true, 0
	n.reason = "switching over to " + n.cfg.Peer + ": drained, waiting for it to accept"
	n.send(MsgHandoverPrepare, false)
}

// abortSwitchover ends a switchover that did not happen: writes resume
// here, and the post-failback hook restarts what the pre-failback hook
// stopped.
func (n *Node) abortSwitchover(why string) {
	n.act(Action{Type: ActResumeWrites}, Action{Type: ActRunScript, Hook: HookPostFailback})
	n.drained = false
	n.state = ""
	n.reason = ""
	n.refreshState()
	n.lastErr = fmt.Sprintf("switchover to %s aborted, writes resumed on %s: %s", n.cfg.Peer, n.cfg.Self, why)
}

// onHandoverPrepare: the peer, drained, asks this target to take over.
func (n *Node) onHandoverPrepare(m Message) {
	switch {
	case n.hs.Role != RoleTarget || n.hs.Superseded || n.hs.HandingOver:
		n.sendRefusal(fmt.Sprintf("%s is %s %s, not its target", n.cfg.Self, n.hs.Role, n.state))
	case !n.hs.Consistent:
		n.sendRefusal(fmt.Sprintf("%s's copy is inconsistent (mirror or resync incomplete)", n.cfg.Self))
	case m.Epoch < n.hs.Epoch:
		n.sendRefusal(fmt.Sprintf("%s is at epoch %d, the request at %d", n.cfg.Self, n.hs.Epoch, m.Epoch))
	default:
		n.send(MsgHandoverReady, false)
	}
}

// demote: the target accepted; release the IPs, stop shipping (held
// writes fail: they were never acknowledged), stop serving, become its
// target, and tell it to take over (repeated until it confirms).
func (n *Node) demote() {
	n.act(
		Action{Type: ActReleaseIdentity},
		Action{Type: ActStopSource},
		Action{Type: ActStopServe},
	)
	if n.cfg.Arbiter {
		// Drained and no longer serving: the peer may have the key now.
		n.act(Action{Type: ActResign})
	}
	n.act(Action{Type: ActStartTarget})
	n.hs = HardState{Role: RoleTarget, Epoch: n.hs.Epoch, Consistent: true, HandingOver: true}
	n.drained = false
	n.linkUp = false
	n.state = ""
	n.refreshState()
	n.reason = "handed over to " + n.cfg.Peer + ", waiting for it to confirm"
	// Only once the IPs are released and nothing is served here.
	n.send(MsgHandover, false)
	last := len(n.pending.Messages) - 1
	n.pending.AfterActions = append(n.pending.AfterActions, n.pending.Messages[last])
	n.pending.Messages = n.pending.Messages[:last]
}

// onHandover: the drained, demoted source hands the role over: promote.
func (n *Node) onHandover(m Message) {
	switch {
	case n.hs.Role == RoleSource && !n.hs.Superseded && n.hs.Epoch > m.Epoch:
		n.send(MsgHandoverDone, false) // took over already; the confirmation was lost
		return
	case n.hs.Role != RoleTarget || !n.hs.Consistent || n.hs.HandingOver:
		n.lastErr = fmt.Sprintf("refused %s: role %s consistent=%t", m, n.hs.Role, n.hs.Consistent)
		return
	}
	n.hs.Epoch = max(n.hs.Epoch, m.Epoch)
	if n.cfg.Arbiter {
		if n.campaign == nil {
			n.askArbiter(&campaign{planned: true})
		}
		return
	}
	n.takeOver(n.hs.Epoch + 1)
}

// takeOver completes a planned switchover on the new source at epoch.
func (n *Node) takeOver(epoch uint64) {
	n.act(
		Action{Type: ActStopTarget, ApplyQueue: true},
		Action{Type: ActPromote, Epoch: epoch},
		Action{Type: ActServe},
		Action{Type: ActApplyIdentity},
		Action{Type: ActStartSource},
		Action{Type: ActRunScript, Hook: HookPostFailback},
	)
	n.hs = HardState{Role: RoleSource, Epoch: epoch, Consistent: true}
	n.sourceDown = false
	n.reason = ""
	n.linkUp = false
	n.state = ""
	n.refreshState()
	n.send(MsgHandoverDone, false)
}

func (n *Node) pause() error {
	if n.hs.Role != RoleSource || n.hs.Superseded {
		return n.refuse(CmdPause, ErrWrongRole, "%s is not the source of job %s: pause on %s", n.cfg.Self, n.cfg.Job, n.cfg.Peer)
	}
	if n.hs.Paused {
		return n.refuse(CmdPause, ErrBadState, "job %s is already paused", n.cfg.Job)
	}
	if !slices.Contains([]State{StateMirroring, StateReplicating, StateDisconnected, StateReversing}, n.state) {
		return n.refuse(CmdPause, ErrBadState, "job %s is %s: only a protecting job can be paused", n.cfg.Job, n.state)
	}
	n.hs.Paused = true
	n.state = StatePaused
	n.act(Action{Type: ActPauseRepl})
	return nil
}

func (n *Node) resume() error {
	if !n.hs.Paused {
		return n.refuse(CmdResume, ErrBadState, "job %s is not paused (state: %s)", n.cfg.Job, n.state)
	}
	n.hs.Paused = false
	n.state = ""
	// The replication session restarts: the data plane reports the link
	// up again once it is (until then the job is not replicating, even if
	// the last session was up when it was paused).
	n.linkUp = false
	n.act(Action{Type: ActResumeRepl})
	n.refreshState()
	return nil
}

// IsRefused reports whether err is a refusal of an operator command.
func IsRefused(err error) bool {
	var r *RefusedError
	return errors.As(err, &r)
}
