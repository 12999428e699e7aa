package ha

import (
	"errors"
	"fmt"
	"strings"
)

// Role is what a node does for a job's data: the source serves the volume
// and ships writes, the target applies them.
type Role string

// Roles.
const (
	RoleSource Role = "source"
	RoleTarget Role = "target"
)

// State is the job state in the operator's language, as one node sees it.
type State string

// States.
const (
	// StateStarting: a source that restarted waits (at most StartGrace
	// ticks) to hear its peer before it serves the volume or takes the
	// service IP, so that a host that was superseded while it was away
	// never serves stale data.
	StateStarting State = "starting"
	// StateMirroring: a full mirror or a bitmap resync is in progress; the
	// target's copy is inconsistent until it completes.
	StateMirroring State = "mirroring"
	// StateReplicating: connected, target consistent, every write shipped.
	StateReplicating State = "replicating"
	// StatePaused: replication paused by the operator; writes tracked in
	// the bitmap.
	StatePaused State = "paused"
	// StateDisconnected: the replication link is down. A source tracks
	// writes in its bitmap; a target waits and watches the monitor.
	StateDisconnected State = "disconnected"
	// StateSourceDown: the target's monitor declared the source failed
	// (every path silent for interval × missed) and the job does not fail
	// over by itself (manual mode, or the target is inconsistent).
	StateSourceDown State = "source-down"
	// StateFailedOver: this node took over as source after a failover.
	StateFailedOver State = "failed-over"
	// StateSuperseded: this node was the source, the peer took over; it
	// stays fenced (no service IP, volume not served) until doppel reverse.
	StateSuperseded State = "superseded"
	// StateReversing: protection restarted in the other direction after a
	// failover; the returned host is being resynced (dirty chunks only).
	StateReversing State = "reversing"
	// StateFailingBack: a planned switchover back to the job's home
	// (doppel failback) is under way on the source handing over.
	StateFailingBack State = "failing-back"
	// StateSwitchingOver: a planned switchover away from the job's home
	// (doppel switchover) is under way on the source handing over.
	StateSwitchingOver State = "switching-over"
	// StateHandingOver: this node was the source of a planned switchover,
	// is drained and demoted to target, and waits for its peer to confirm
	// that it took over (nothing is served meanwhile).
	StateHandingOver State = "handing-over"
	// StateSplitBrain: both nodes were promoted to the same generation
	// epoch independently. Never resolved silently.
	StateSplitBrain State = "split-brain"
	// StatePromoting: the target asked the arbiter for the next epoch
	// (after its detector declared the source down, or the operator's
	// failover) and waits for the answer; nothing was served yet.
	StatePromoting State = "promoting"
	// StateRollingBack: a failover to a snapshot won its epoch and the
	// volume is being rolled back to the snapshot (HardState.RollingBack),
	// or the rollback failed or was interrupted: the volume holds part of
	// the snapshot and part of the newer data, so it is neither promoted
	// nor served until a rollback completes (the agent redoes it when it
	// restarts; the operator runs the failover to the snapshot again).
	StateRollingBack State = "rolling-back"
)

// FailoverMode says whether the target takes over on its own.
type FailoverMode string

// Failover modes.
const (
	FailoverManual FailoverMode = "manual"
	FailoverAuto   FailoverMode = "auto"
)

// Hook names a script run at a step of a role change.
type Hook string

// Hooks. The agent runs the script configured for a hook with the
// environment documented in the agent package.
const (
	HookPreFailover  Hook = "pre-failover"
	HookPostFailover Hook = "post-failover"
	HookPreFailback  Hook = "pre-failback"
	HookPostFailback Hook = "post-failback"
)

// Hooks lists every hook, for validation.
var Hooks = []Hook{HookPreFailover, HookPostFailover, HookPreFailback, HookPostFailback}

// Refusals returned by Step for operator commands. They wrap into a
// *RefusedError that carries the reason in the operator's words.
var (
	ErrInconsistent      = errors.New("target data is inconsistent")
	ErrAlreadyFailedOver = errors.New("job is already failed over")
	ErrSourceAlive       = errors.New("source is still alive")
	ErrPeerUnreachable   = errors.New("peer is unreachable")
	ErrWrongRole         = errors.New("wrong role for this command")
	ErrBadState          = errors.New("invalid state for this command")
)

// RefusedError is an operator command the state machine refused; Err is one
// of the sentinels above, Reason says why and what to do instead.
type RefusedError struct {
	Command EventType
	Err     error
	Reason  string
}

func (e *RefusedError) Error() string {
	return fmt.Sprintf("%s refused: %s", e.Command, e.Reason)
}

func (e *RefusedError) Unwrap() error { return e.Err }

// HardState is what a node persists (atomically, before acting on a Ready
// that carries it) so that a restart resumes the same role.
type HardState struct {
	Role Role `json:"role"`
	// Epoch numbers promotions: a failover or failback promotes the new
	// source to max(own, peer's) + 1. The higher epoch is the newer history.
	Epoch uint64 `json:"epoch"`
	// Consistent: the target's copy is a prefix of the source's history
	// (no mirror or resync in progress).
	Consistent bool `json:"consistent"`
	// FailedOver: this node became the source by a failover and protection
	// has not been reversed yet.
	FailedOver bool `json:"failed_over,omitempty"`
	// Superseded: this node was the source and the peer took over.
	Superseded bool `json:"superseded,omitempty"`
	// Paused: replication paused by the operator.
	Paused bool `json:"paused,omitempty"`
	// Alone: this source started serving without hearing its peer (after
	// StartGrace); if the peer took over meanwhile, the histories diverged.
	Alone bool `json:"alone,omitempty"`
	// HandingOver: this node was the source of a planned switchover, is
	// drained and demoted, and repeats the handover to its peer until the
	// peer confirms it took over (or is seen as a newer source).
	HandingOver bool `json:"handing_over,omitempty"`
	// RollingBack names the snapshot a failover is rolling this node's
	// volume back to, from before the first byte of the volume is
	// rewritten (it is persisted with the promotion's epoch) until the
	// rollback is complete and synced (EvRolledBack). While it is set the
	// volume is neither promoted nor served: it holds part of the
	// snapshot and part of the newer data.
	RollingBack string `json:"rolling_back,omitempty"`
}

func (hs HardState) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "role=%s epoch=%d consistent=%t", hs.Role, hs.Epoch, hs.Consistent)
	if hs.FailedOver {
		b.WriteString(" failed-over")
	}
	if hs.Superseded {
		b.WriteString(" superseded")
	}
	if hs.Paused {
		b.WriteString(" paused")
	}
	if hs.Alone {
		b.WriteString(" alone")
	}
	if hs.HandingOver {
		b.WriteString(" handing-over")
	}
	if hs.RollingBack != "" {
		b.WriteString(" rolling-back=" + hs.RollingBack)
	}
	return b.String()
}

// EventType names an input to Step.
type EventType string

// Events from the driver's subsystems.
const (
	// EvStart is stepped once after NewNode (job created or agent restarted).
	EvStart EventType = "start"
	// EvLinkUp / EvLinkDown: the replication connection came up or went down.
	EvLinkUp   EventType = "link-up"
	EvLinkDown EventType = "link-down"
	// EvResync: a mirror or bitmap resync started (target inconsistent).
	EvResync EventType = "resync"
	// EvSynced: the mirror or resync completed (target consistent).
	EvSynced EventType = "synced"
	// EvHeartbeat: the probe saw the peer's traffic on Path (path status
	// only: the detector's verdicts are EvPeerDown and EvPeerUp).
	EvHeartbeat EventType = "heartbeat"
	// EvPeerDown / EvPeerUp: the failure detector (the agent's, with
	// daemon/monitor's policy) declared the peer down (every path silent
	// for interval × missed) or up again (its rise hysteresis passed;
	// Path: the path that brought it back).
	EvPeerDown EventType = "peer-down"
	EvPeerUp   EventType = "peer-up"
	// EvPromotion: the arbiter's answer to ActCampaign (Config.Arbiter):
	// won at Epoch, or refused with Err; Final when it will not change
	// by asking again (a stale epoch, out of sync), else the campaign
	// goes on (the source still holds the lease).
	EvPromotion EventType = "promotion"
	// EvEpochSeen: a newer epoch was learned (the arbiter's record, a
	// replication handshake refused, a heartbeat): a source fences itself.
	EvEpochSeen EventType = "epoch-seen"
	// EvLease: the source's lease is held (Held) or not (Err says why): a
	// restarted source that holds it serves at once (nobody can have been
	// promoted meanwhile).
	EvLease EventType = "lease"
	// EvDrained: the quiesce action completed (writes held, queue empty,
	// target acknowledged everything).
	EvDrained EventType = "drained"
	// EvActionFailed: an action of a Ready failed; Err says how.
	EvActionFailed EventType = "action-failed"
	// EvRolledBack: ActRollback completed: the volume holds snapshot
	// Snapshot's data, synced (the promotion and serving follow).
	EvRolledBack EventType = "rolled-back"
	// EvMessage: a message from the peer (Msg).
	EvMessage EventType = "message"
)

// Operator commands. Step returns a *RefusedError when one does not apply.
const (
	CmdFailover EventType = "failover"
	CmdReverse  EventType = "reverse"
	// CmdSwitchover: planned switchover to the peer, in either direction
	// (quiesce, drain, swap roles at a new epoch, move the service IPs,
	// resume): no acknowledged write is lost. CmdFailback is the same
	// switchover, refused unless it brings the job back to its home.
	CmdSwitchover EventType = "switchover"
	CmdFailback   EventType = "failback"
	CmdPause      EventType = "pause"
	CmdResume     EventType = "resume"
)

// Event is one input to Step.
type Event struct {
	Type EventType
	Path string // EvHeartbeat, EvPeerUp
	// Force overrides the refusals of CmdFailover that protect data
	// (inconsistent target, source still alive).
	Force bool
	// DiscardQueue: CmdFailover drops the target's unapplied queue instead
	// of applying it first (the default).
	DiscardQueue bool
	// Snapshot: CmdFailover promotes this snapshot of the target's volume
	// (a point in time before the latest data), not the latest data;
	// EvRolledBack: the snapshot the volume was rolled back to.
	Snapshot string
	Action   ActionType // EvActionFailed
	Err      string     // EvActionFailed, EvPromotion (refused), EvLease (not held)
	Msg      *Message   // EvMessage
	Epoch    uint64     // EvPromotion, EvEpochSeen
	Final    bool       // EvPromotion
	Held     bool       // EvLease
}

// MessageType names a message between the two nodes of a job.
type MessageType string

// Message types.
const (
	// MsgHello announces a node's role and epoch; sent at start and when
	// the link comes up, answered once (Reply set).
	MsgHello MessageType = "hello"
	// MsgPromoted: the sender took over as source at Epoch; a source with
	// a lower epoch that receives it fences itself.
	MsgPromoted MessageType = "promoted"
	// MsgReverse: the failed-over node asks the fenced one to become its
	// target.
	MsgReverse MessageType = "reverse"
	// A planned switchover (failback included) in two phases, so that a
	// target that cannot take over refuses before anything moved:
	// MsgHandoverPrepare: the drained source (still serving, writes held)
	// asks its target whether it can take over;
	MsgHandoverPrepare MessageType = "handover-prepare"
	// MsgHandoverReady: the target can (consistent, role target);
	MsgHandoverReady MessageType = "handover-ready"
	// MsgHandoverRefused: it cannot (Reason); the source resumes writes;
	MsgHandoverRefused MessageType = "handover-refused"
	// MsgHandover: the source released the IPs, stopped serving and
	// became target: the peer takes over at a new epoch (repeated until
	// MsgHandoverDone);
	MsgHandover MessageType = "handover"
	// MsgHandoverDone: the new source confirms it took over.
	MsgHandoverDone MessageType = "handover-done"
)

// Message is sent by the driver to the peer's node (over the control
// channel), which steps it as EvMessage.
type Message struct {
	Type       MessageType `json:"type"`
	From       string      `json:"from"`
	To         string      `json:"to"`
	Role       Role        `json:"role"`
	Epoch      uint64      `json:"epoch"`
	Superseded bool        `json:"superseded,omitempty"`
	Reply      bool        `json:"reply,omitempty"`
	// Reason: why a MsgHandoverRefused refused.
	Reason string `json:"reason,omitempty"`
}

func (m Message) String() string {
	s := fmt.Sprintf("%s->%s %s role=%s epoch=%d", m.From, m.To, m.Type, m.Role, m.Epoch)
	if m.Superseded {
		s += " superseded"
	}
	if m.Reply {
		s += " reply"
	}
	if m.Reason != "" {
		s += " reason=" + fmt.Sprintf("%q", m.Reason)
	}
	return s
}

// ActionType names something the driver must do.
type ActionType string

// Actions. Each is idempotent on the driver's side: doing it twice is
// harmless, undoing something not done is a no-op.
const (
	ActServe           ActionType = "serve"            // serve the volume (/dev/nbdN or NBD socket), tracking writes
	ActStopServe       ActionType = "stop-serve"       // stop serving the volume
	ActApplyIdentity   ActionType = "apply-identity"   // take the service IPs (netident Apply)
	ActReleaseIdentity ActionType = "release-identity" // drop the service IPs (netident Release)
	ActStartSource     ActionType = "start-source"     // connect to the peer and ship writes (mirror/resync as needed)
	ActStopSource      ActionType = "stop-source"      // stop shipping
	ActStartTarget     ActionType = "start-target"     // accept the peer's stream and apply it
	ActStopTarget      ActionType = "stop-target"      // stop applying (ApplyQueue: apply what is queued first)
	ActPromote         ActionType = "promote"          // start a new generation at Epoch
	ActRollback        ActionType = "rollback"         // roll the stopped target's volume back to Snapshot, keeping the newer data as a snapshot
	ActPauseRepl       ActionType = "pause-repl"       // stop shipping, track in bitmap
	ActResumeRepl      ActionType = "resume-repl"      // resume (resync dirty chunks)
	ActQuiesce         ActionType = "quiesce"          // hold writes, drain the queue; step EvDrained when done
	ActResumeWrites    ActionType = "resume-writes"    // end a quiesce: held writes proceed (a switchover that did not happen)
	ActRunScript       ActionType = "run-script"       // run the hook script (Hook)
	ActCampaign        ActionType = "campaign"         // ask the arbiter for Epoch (Force: forced takeover); step EvPromotion
	ActStopCampaign    ActionType = "stop-campaign"    // stop asking (the source came back)
	ActResign          ActionType = "resign"           // give the leadership key up (a drained source handing over)
)

// Action is one thing the driver must do, in the order given.
type Action struct {
	Type       ActionType
	Epoch      uint64 // ActPromote
	ApplyQueue bool   // ActStopTarget
	Hook       Hook   // ActRunScript
	Force      bool   // ActCampaign: forced takeover
	Why        string // ActCampaign: what the promotion is for, in words
	Snapshot   string // ActRollback
}

func (a Action) String() string {
	switch a.Type {
	case ActPromote:
		return fmt.Sprintf("%s epoch=%d", a.Type, a.Epoch)
	case ActStopTarget:
		if a.ApplyQueue {
			return string(a.Type) + " apply-queue"
		}
		return string(a.Type) + " discard-queue"
	case ActRunScript:
		return fmt.Sprintf("%s %s", a.Type, a.Hook)
	case ActRollback:
		return fmt.Sprintf("%s to %s", a.Type, a.Snapshot)
	case ActCampaign:
		s := fmt.Sprintf("%s epoch=%d", a.Type, a.Epoch)
		if a.Force {
			s += " force"
		}
		return s
	}
	return string(a.Type)
}

// Ready is what the driver must do after Step or Tick: persist HardState
// first (when MustPersist), then send Messages, then do Actions in order,
// then send AfterActions (whether the actions succeeded or not: a message
// that must not overtake them, such as a handover that must reach the peer
// only once this node stopped serving).
type Ready struct {
	HardState    HardState
	MustPersist  bool
	Messages     []Message
	Actions      []Action
	AfterActions []Message
}

// Empty reports whether there is nothing to do.
func (r Ready) Empty() bool {
	return !r.MustPersist && len(r.Messages) == 0 && len(r.Actions) == 0 && len(r.AfterActions) == 0
}

// PathStatus is the monitor's view of one path.
type PathStatus struct {
	Name string `json:"name"`
	// SilentTicks counts ticks since the peer was last heard on the path.
	SilentTicks int  `json:"silent_ticks"`
	Up          bool `json:"up"`
}

// Status is a node's view of the job, for status output.
type Status struct {
	Job  string `json:"job"`
	Self string `json:"self"`
	Peer string `json:"peer"`
	// Home is the job's original source (failback returns there).
	Home       string       `json:"home"`
	Role       Role         `json:"role"`
	State      State        `json:"state"`
	Epoch      uint64       `json:"epoch"`
	Consistent bool         `json:"target_consistent"`
	Failover   FailoverMode `json:"failover"`
	LinkUp     bool         `json:"link_up"`
	Paths      []PathStatus `json:"paths"`
	// Reason explains a state that needs the operator.
	Reason    string `json:"reason,omitempty"`
	LastError string `json:"last_error,omitempty"`
	// RollingBack is the snapshot a failover is rolling the volume back
	// to, until the rollback completed (StateRollingBack).
	RollingBack string `json:"rolling_back,omitempty"`
}
