// Package protection turns the two sides' views of a job (api.JobStatus
// from each agent, or why an agent did not answer) into one headline in
// the operator's language — PROTECTED, DEGRADED, NOT PROTECTED, FAILED
// OVER — with its reason, the job's real direction, what a failure of the
// source now would cost (bytes and seconds of writes, time to fail over),
// and the commands that would succeed now. It is the one place these rules
// live: doppel job status and job list use it, and so will any console.
//
// The rules, first match wins (docs/status.md):
//
//	no side answered                                   UNREACHABLE    exit 3
//	a side reports split brain                         NOT PROTECTED  exit 2
//	a side is failed over (serves, nothing protects)   FAILED OVER    exit 2
//	no side serves the volume                          NOT PROTECTED  exit 2
//	the source is starting, paused, disconnected,
//	  mirroring or reversing, or has no engine         NOT PROTECTED  exit 2
//	the source is switching over (writes held)         DEGRADED       exit 1
//	replicating, but: the target's agent did not
//	  answer, the target is not consistent and
//	  replicating, a path is silent, failure detection
//	  is off, dirty bytes remain, the queue spilled to
//	  disk, or the RPO exceeds interval × missed       DEGRADED       exit 1
//	otherwise                                          PROTECTED      exit 0
package protection

import (
	"fmt"
	"strings"
	"time"

	"github.com/doppelha/doppel/daemon/api"
	"github.com/doppelha/doppel/daemon/ha"
	"github.com/doppelha/doppel/daemon/job"
)

// Level is the headline.
type Level string

// Levels, from best to worst.
const (
	Protected    Level = "PROTECTED"
	Degraded     Level = "DEGRADED"
	NotProtected Level = "NOT PROTECTED"
	// Suspended: the source holds writes it may not acknowledge (it
	// cannot renew its lease on the arbiter and its target does not
	// acknowledge them): the application waits, then gets EIO.
	Suspended  Level = "SUSPENDED"
	FailedOver Level = "FAILED OVER"
	// Unreachable: no agent of the job answered; its state is unknown.
	Unreachable Level = "UNREACHABLE"
)

// ExitCode is the exit status of doppel job status for the level: 0
// protected, 1 degraded, 2 not protected, suspended or failed over, 3
// unreachable.
func (l Level) ExitCode() int {
	switch l {
	case Protected:
		return 0
	case Degraded:
		return 1
	case NotProtected, Suspended, FailedOver:
		return 2
	}
	return 3
}

// Side is one agent's answer about the job: its status, or why there is
// none.
type Side struct {
	Server string
	Status *api.JobStatus
	Err    string
}

// Risk is what a failure of the source now would cost.
type Risk struct {
	// Known: the source's replication engine answered; the figures below
	// are meaningful.
	Known bool `json:"known"`
	// LoseBytes: writes acknowledged on the source that the target does
	// not hold (queue in memory and on disk, dirty bytes).
	LoseBytes int64 `json:"lose_bytes"`
	// LoseFor: the RPO estimate, the age of the oldest such write.
	LoseFor time.Duration `json:"lose_for"`
	// Failover says how the target would take over: "automatic",
	// "manual" (doppel failover), or "none" (no usable target).
	Failover string `json:"failover"`
	// FailoverIn: time from the failure to the automatic failover
	// (interval × missed, or the running countdown); -1 unless automatic.
	FailoverIn time.Duration `json:"failover_in"`
}

// Verdict is the headline of a job and what goes with it.
type Verdict struct {
	Job    string `json:"job"`
	Level  Level  `json:"headline"`
	Reason string `json:"reason"`
	// Source and Target: the real direction (who serves, who receives),
	// empty when no side serves. Home is where the job was created.
	Source string `json:"source,omitempty"`
	Target string `json:"target,omitempty"`
	Home   string `json:"home,omitempty"`
	Risk   Risk   `json:"risk"`
	// Advice lists commands that would be accepted now, with what they do.
	Advice []string `json:"advice,omitempty"`
	// ExitCode is Level.ExitCode().
	ExitCode int `json:"exit_code"`
}

// Assess computes the verdict of a job from its sides (any order; nil
// Status for a side that did not answer).
func Assess(sides []Side) Verdict {
	var v Verdict
	var src, tgt *Side
	var spec *api.JobStatus
	for i := range sides {
		s := &sides[i]
		if s.Status == nil {
			continue
		}
		if spec == nil {
			spec = s.Status
		}
		switch {
		case s.Status.HA.Role == ha.RoleSource && s.Status.HA.State != ha.StateSuperseded:
			src = s
		case s.Status.HA.Role == ha.RoleTarget:
			tgt = s
		}
	}
	if spec == nil {
		v.Level, v.Reason = Unreachable, "no agent of the job answered: "+errs(sides)
		v.ExitCode = v.Level.ExitCode()
		v.Risk.FailoverIn = -1
		return v
	}
	v.Job, v.Home = spec.Spec.Name, spec.Spec.Source.Name
	peer := func(name string) *Side {
		for i := range sides {
			if sides[i].Server != name {
				return &sides[i]
			}
		}
		return &Side{}
	}
	if src != nil {
		v.Source = src.Server
		v.Target = peer(src.Server).Server
	}
	v.Risk = risk(src, tgt)
	v.Level, v.Reason, v.Advice = judge(sides, src, tgt, peer)
	v.ExitCode = v.Level.ExitCode()
	return v
}

func judge(sides []Side, src, tgt *Side, peer func(string) *Side) (Level, string, []string) {
	name := ""
	for _, s := range sides {
		if s.Status != nil {
			name = s.Status.Spec.Name
			break
		}
	}
	for _, s := range sides {
		if s.Status != nil && s.Status.HA.State == ha.StateSplitBrain {
			return NotProtected, s.Status.HA.Reason, nil
		}
	}
	if src != nil && src.Status.HA.State == ha.StateRollingBack {
		// The volume holds part of the snapshot and part of the newer
		// data: nothing serves it until the rollback completes.
		return NotProtected, fmt.Sprintf("no host serves the volume: %s", src.Status.HA.Reason),
			[]string{fmt.Sprintf("doppel failover %s --snapshot %s   # %s redoes the rollback, then serves the snapshot's data", name, src.Status.HA.RollingBack, src.Server)}
	}
	if src != nil && src.Status.HA.State == ha.StateFailedOver {
		old := peer(src.Server)
		reason := fmt.Sprintf("%s took over at epoch %d and serves the volume; nothing protects it until doppel reverse", src.Server, src.Status.HA.Epoch)
		if old.Status != nil && old.Status.HA.State == ha.StateSuperseded {
			return FailedOver, reason, []string{fmt.Sprintf("doppel reverse %s   # %s becomes the target, only the differing chunks are resynced", name, old.Server)}
		}
		if old.Status == nil {
			reason += fmt.Sprintf(" (%s is unreachable: start its agent, it comes back fenced)", old.Server)
		}
		return FailedOver, reason, nil
	}
	if src == nil {
		if tgt != nil && tgt.Status.HA.State == ha.StateSourceDown {
			reason := fmt.Sprintf("no host serves the volume: %s", tgt.Status.HA.Reason)
			if tgt.Status.HA.Consistent {
				return NotProtected, reason, []string{fmt.Sprintf("doppel failover %s   # %s takes over with every write it applied", name, tgt.Server)}
			}
			return NotProtected, reason, []string{fmt.Sprintf("doppel failover %s --force   # %s takes over with an INCOMPLETE copy", name, tgt.Server)}
		}
		for _, s := range sides {
			if s.Status != nil && s.Status.HA.State == ha.StateHandingOver {
				return NotProtected, fmt.Sprintf("switchover in progress: %s handed over and waits for %s to take over", s.Server, peer(s.Server).Server), nil
			}
		}
		var parts []string
		for _, s := range sides {
			if s.Status == nil {
				parts = append(parts, fmt.Sprintf("%s unreachable (%s)", s.Server, s.Err))
			} else {
				parts = append(parts, fmt.Sprintf("%s %s %s", s.Server, s.Status.HA.Role, s.Status.HA.State))
			}
		}
		return NotProtected, "no host serves the volume: " + strings.Join(parts, ", "), nil
	}
	st := src.Status
	other := peer(src.Server)
	if a := st.Arbiter; a != nil && !a.Holding && st.HA.State != ha.StateStarting {
		// Without its lease a source acknowledges only what its target
		// acknowledges: an async source nothing, a sync one nothing
		// while the target is away (docs/safety.md).
		lease := fmt.Sprintf("%s cannot renew its lease on the arbiter", src.Server)
		if a.Error != "" {
			lease += " (" + a.Error + ")"
		}
		if st.Spec.Mode == job.ModeAsync || st.HA.State != ha.StateReplicating {
			return Suspended, lease + fmt.Sprintf(": writes on %s are held, then fail with EIO after the suspend timeout; they go on once the lease is back", src.Server), nil
		}
		return Degraded, lease + fmt.Sprintf(": no automatic failover; writes go on while %s acknowledges them", other.Server), nil
	}
	switch st.HA.State {
	case ha.StateStarting:
		return NotProtected, fmt.Sprintf("%s restarted and waits to hear %s before serving", src.Server, other.Server), nil
	case ha.StatePaused:
		return NotProtected, fmt.Sprintf("replication paused by the operator: writes on %s are tracked (%s dirty), not sent", src.Server, BytesHuman(st.Data.DirtyBytes)),
			[]string{fmt.Sprintf("doppel job resume %s", name)}
	case ha.StateDisconnected:
		r := fmt.Sprintf("%s cannot reach %s for replication: writes are tracked for a resync (%s dirty)", src.Server, other.Server, BytesHuman(st.Data.DirtyBytes))
		if a := st.Arbiter; a != nil && a.TargetOutOfSync {
			r += fmt.Sprintf("; %s is recorded out of sync: it cannot be promoted automatically", other.Server)
		}
		return NotProtected, r, nil
	case ha.StateMirroring, ha.StateReversing:
		what := "mirror"
		if st.HA.State == ha.StateReversing {
			what = "reverse resync"
		}
		r := fmt.Sprintf("%s to %s in progress: its copy is unusable until it ends", what, other.Server)
		if d := st.Data; d.SyncTotal > 0 {
			r += fmt.Sprintf(" (%.1f%%, %s remaining)", 100*float64(d.SyncDone)/float64(d.SyncTotal), BytesHuman(d.BytesRemaining))
		}
		return NotProtected, r, nil
	case ha.StateSwitchingOver, ha.StateFailingBack:
		return Degraded, fmt.Sprintf("switchover to %s in progress: writes on %s are held", other.Server, src.Server), nil
	}
	if !st.Data.Known {
		return NotProtected, fmt.Sprintf("%s's replication engine does not answer: %s", src.Server, st.Data.Note), nil
	}
	if st.HA.State != ha.StateReplicating {
		return NotProtected, fmt.Sprintf("%s is %s", src.Server, st.HA.State), nil
	}
	// Replicating: protected unless something below says otherwise.
	var why []string
	var advice []string
	if other.Status == nil {
		why = append(why, fmt.Sprintf("%s's agent does not answer (%s): its side is unknown", other.Server, other.Err))
	} else {
		t := other.Status
		if t.HA.Role != ha.RoleTarget || !t.HA.Consistent || t.HA.State != ha.StateReplicating {
			why = append(why, fmt.Sprintf("%s is %s %s, target data %s", other.Server, t.HA.Role, t.HA.State, consistency(t.HA.Consistent)))
		}
		for _, p := range t.HA.Paths {
			if !p.Up {
				why = append(why, fmt.Sprintf("%s does not hear %s on path %s", other.Server, src.Server, p.Name))
			}
		}
		if !t.Probe.Active {
			why = append(why, fmt.Sprintf("failure detection is off on %s (probe: %s)", other.Server, t.Probe.Mode))
		}
	}
	if d := st.Data; d.DirtyBytes > 0 {
		why = append(why, fmt.Sprintf("%s dirty on %s, not yet on %s", BytesHuman(d.DirtyBytes), src.Server, other.Server))
	}
	if st.Data.QueueDisk > 0 {
		why = append(why, fmt.Sprintf("the replication queue spilled to disk (%s)", BytesHuman(st.Data.QueueDisk)))
	}
	if a := st.Arbiter; a != nil && a.TargetOutOfSync {
		why = append(why, fmt.Sprintf("%s is recorded out of sync on the arbiter until its resync is acknowledged: no automatic failover onto it meanwhile", other.Server))
	}
	if limit := time.Duration(st.Probe.Missed) * st.Probe.Interval; limit > 0 && st.Data.RPO > limit {
		why = append(why, fmt.Sprintf("%s lags: RPO %v", other.Server, st.Data.RPO.Round(time.Millisecond)))
	}
	if len(why) > 0 {
		return Degraded, strings.Join(why, "; "), nil
	}
	if src.Server != st.Spec.Source.Name {
		advice = append(advice, fmt.Sprintf("doppel failback %s   # planned switchover back to %s, no write lost", name, st.Spec.Source.Name))
	}
	return Protected, fmt.Sprintf("every write on %s is replicated to %s", src.Server, other.Server), advice
}

// risk is what a failure of the source now would cost.
func risk(src, tgt *Side) Risk {
	r := Risk{Failover: "none", FailoverIn: -1}
	if src == nil {
		return r
	}
	st := src.Status
	if st.Data.Known {
		r.Known = true
		r.LoseBytes = st.Data.QueueMemory + st.Data.QueueDisk + st.Data.DirtyBytes
		r.LoseFor = max(st.Data.RPO, 0)
	}
	if tgt == nil || !tgt.Status.HA.Consistent || st.HA.State == ha.StateFailedOver {
		return r
	}
	t := tgt.Status
	if t.Spec.Failover != ha.FailoverAuto || !t.Probe.Active {
		r.Failover = "manual"
		return r
	}
	r.Failover = "automatic"
	r.FailoverIn = time.Duration(t.Probe.Missed) * t.Probe.Interval
	if t.Probe.TimeToFail >= 0 {
		r.FailoverIn = t.Probe.TimeToFail
	}
	if t.Spec.Arbiter != "" {
		// The promotion waits for the source's lease to expire.
		r.FailoverIn = max(r.FailoverIn, t.Spec.LeaseTTL)
	}
	return r
}

// RiskLine says what a failure of the source now would cost, in words.
func (v Verdict) RiskLine() string {
	if v.Source == "" {
		return ""
	}
	r := v.Risk
	s := "if " + v.Source + " died now: "
	if r.Known {
		s += fmt.Sprintf("lose %s / %v of writes", BytesHuman(r.LoseBytes), r.LoseFor.Round(time.Millisecond))
	} else {
		s += "writes at risk unknown"
	}
	switch r.Failover {
	case "automatic":
		s += fmt.Sprintf(", %s takes over in ~%v (automatic)", v.Target, r.FailoverIn.Round(10*time.Millisecond))
	case "manual":
		s += fmt.Sprintf(", %s takes over when you run doppel failover", v.Target)
	default:
		s += ", no host can take over"
	}
	return s
}

func consistency(c bool) string {
	if c {
		return "consistent"
	}
	return "inconsistent"
}

func errs(sides []Side) string {
	var parts []string
	for _, s := range sides {
		parts = append(parts, s.Server+": "+s.Err)
	}
	return strings.Join(parts, "; ")
}

// BytesHuman is n in binary units: 512 B, 1.5 MiB.
func BytesHuman(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}

// ArbiterLine is one side's arbiter in words: the lease and, on a source,
// whether its target is recorded in sync (what job status and the console
// show).
func ArbiterLine(role ha.Role, a *api.ArbiterStatus) string {
	var parts []string
	switch {
	case a.Holding:
		parts = append(parts, fmt.Sprintf("holds the lease (renewed %v ago, TTL %v)", a.LeaseAge.Round(10*time.Millisecond), a.TTL))
	case role == ha.RoleSource && a.LeaseAge >= 0:
		parts = append(parts, fmt.Sprintf("LEASE NOT HELD (last renewal %v ago, TTL %v): writes the target does not acknowledge are held", a.LeaseAge.Round(10*time.Millisecond), a.TTL))
	case role == ha.RoleSource:
		parts = append(parts, "LEASE NOT HELD yet")
	}
	switch {
	case a.TargetOutOfSync:
		parts = append(parts, "target recorded OUT OF SYNC (it cannot be promoted automatically)")
	case role == ha.RoleSource:
		parts = append(parts, "target in sync")
	}
	if a.Campaign != "" {
		parts = append(parts, "promotion: "+a.Campaign)
	}
	if a.Error != "" && !a.Holding {
		parts = append(parts, "error: "+a.Error)
	}
	if len(parts) == 0 {
		parts = append(parts, "no lease on this side (etcd "+strings.Join(a.Endpoints, ",")+")")
	}
	return strings.Join(parts, "; ")
}

// PathStates is each probe path as "NAME up" or "NAME SILENT", the form
// job status and the console show.
func PathStates(ps []ha.PathStatus) []string {
	var out []string
	for _, p := range ps {
		state := "up"
		if !p.Up {
			state = "SILENT"
		}
		out = append(out, p.Name+" "+state)
	}
	return out
}
