package console

import (
	"fmt"
	"strings"
	"time"

	"github.com/doppelha/doppel/daemon/api"
	"github.com/doppelha/doppel/daemon/client"
	"github.com/doppelha/doppel/daemon/ha"
	"github.com/doppelha/doppel/daemon/job"
	"github.com/doppelha/doppel/daemon/protection"
)

// Plan is what an action would do, computed from the sides' status before
// the operator confirms: who acts, what moves, what is lost.
type Plan struct {
	Job    string `json:"job"`
	Action string `json:"action"`
	// Server is the agent the action is sent to ("" when no side can
	// take it: Refusal says why).
	Server string `json:"server"`
	Title  string `json:"title"`
	// Consequences, in the order they happen.
	Consequences []string `json:"consequences"`
	// Loss says what data the action loses ("" when none).
	Loss string `json:"loss,omitempty"`
	// Refusal: why the agent will refuse it as asked; with NeedsForce,
	// the forced action goes through (Force is what it would then do).
	Refusal    string `json:"refusal,omitempty"`
	NeedsForce bool   `json:"needs_force,omitempty"`
	// Options the form offers: checkboxes and text inputs.
	Options []PlanOption `json:"options,omitempty"`
	Inputs  []PlanInput  `json:"inputs,omitempty"`
	Confirm string       `json:"confirm"`
}

// PlanOption is a checkbox of the confirmation: force, discard_queue,
// keep_state.
type PlanOption struct {
	Name  string `json:"name"`
	Label string `json:"label"`
	// Set when the operator asked for it (the plan was computed with it).
	Set bool `json:"set"`
}

// PlanInput is a text field of the confirmation (a snapshot's name, the
// mount point to freeze...).
type PlanInput struct {
	Name        string `json:"name"`
	Label       string `json:"label"`
	Placeholder string `json:"placeholder,omitempty"`
	Value       string `json:"value,omitempty"`
}

// ActionOptions are the options of an action, as the confirmation sets
// them.
type ActionOptions struct {
	Force        bool `json:"force,omitempty"`
	DiscardQueue bool `json:"discard_queue,omitempty"`
	KeepState    bool `json:"keep_state,omitempty"`
	// Name of a new snapshot; Mount: the source's file system to freeze
	// for it (application-consistent).
	Name  string `json:"name,omitempty"`
	Mount string `json:"mount,omitempty"`
	// Snapshot: the one a test failover clones, or the one to delete.
	Snapshot string `json:"snapshot,omitempty"`
	// TestIP (CIDR@IFACE) puts a test failover's export on an address.
	TestIP string `json:"test_ip,omitempty"`
}

// Actions the console sends.
var knownActions = []string{"failover", "reverse", "switchover", "failback", "pause", "resume", "verify", "delete",
	"snapshot", "test-failover", "stop-test-failover", "delete-snapshot"}

// planAction computes the plan of action on the job from its sides'
// reports (a side that does not answer contributes its last report, with
// its age). now dates those reports.
func planAction(name, action string, reports []sideReport, opts ActionOptions, now time.Time) Plan {
	p := Plan{Job: name, Action: action, Confirm: actionLabel(action)}
	spec := specOf(reports)
	if spec == nil {
		p.Refusal = "no agent of the job answered"
		return p
	}
	src, tgt := roles(reports)
	// The side that must act is the one the CLI sends the command to.
	if pick := pickerOf(action); pick != nil {
		server, err := pick(clientSides(reports))
		if err != nil {
			p.Refusal = err.Error()
			return p
		}
		p.Server = server
	}
	byName := func(s string) *sideReport {
		for i := range reports {
			if reports[i].Server == s {
				return &reports[i]
			}
		}
		return nil
	}
	other := func(s string) string {
		if s == spec.Source.Name {
			return spec.Target.Name
		}
		return spec.Source.Name
	}
	switch action {
	case "failover":
		planFailover(&p, spec, reports, src, tgt, opts, now)
	case "reverse":
		var fo, sup *sideReport
		for i := range reports {
			if st := reports[i].Status; st != nil {
				switch st.HA.State {
				case ha.StateFailedOver:
					fo = &reports[i]
				case ha.StateSuperseded:
					sup = &reports[i]
				}
			}
		}
		if fo == nil {
			p.Refusal = "no side is failed over: Reverse follows a failover"
			return p
		}
		old := other(fo.Server)
		p.Title = fmt.Sprintf("Reverse %s: %s becomes the target of %s", name, old, fo.Server)
		if sup == nil {
			p.Refusal = fmt.Sprintf("%s is not back yet (or not fenced): start its agent, it comes back superseded", old)
		}
		changed := fo.Status.Data.ChangedBytes
		var dirty int64
		if sup != nil {
			dirty = sup.Status.Data.DirtyBytes
		}
		p.Consequences = append(p.Consequences,
			fmt.Sprintf("%s (fenced since the failover) becomes the target of %s; %s keeps serving the volume and the service IPs", old, fo.Server, fo.Server),
			fmt.Sprintf("only the chunks that differ are sent to %s: %s changed on %s since the failover + %s dirty on %s (about %s)",
				old, protection.BytesHuman(changed), fo.Server, protection.BytesHuman(dirty), old, protection.BytesHuman(changed+dirty)),
			fmt.Sprintf("%s's copy is inconsistent until the resync ends; then the job is protected again, %s → %s", old, fo.Server, old))
		if dirty > 0 {
			p.Loss = fmt.Sprintf("%s of writes %s made that %s never received (its dirty chunks) are overwritten with %s's data", protection.BytesHuman(dirty), old, fo.Server, fo.Server)
		}
	case "switchover", "failback":
		to := other(src.Server)
		if action == "failback" && src.Server == spec.Source.Name {
			p.Refusal = fmt.Sprintf("the job already runs at home (%s): Failback brings it back there after a Reverse or a Switchover", spec.Source.Name)
		}
		p.Title = fmt.Sprintf("%s %s: %s becomes the source, %s the standby", actionLabel(action), name, to, src.Server)
		st := src.Status
		if t := byName(to); t == nil || t.Status == nil {
			p.Refusal = fmt.Sprintf("%s does not answer: a switchover needs both hosts up", to)
		} else if st.HA.State != ha.StateReplicating || !t.Status.HA.Consistent {
			p.Refusal = fmt.Sprintf("the job is not replicating with a consistent target (%s %s, %s target data %s): a switchover would refuse",
				src.Server, st.HA.State, to, consistency(t.Status.HA.Consistent))
		}
		if path := spec.Scripts[ha.HookPreFailback]; path != "" {
			p.Consequences = append(p.Consequences, fmt.Sprintf("%s runs its pre-failback script %s (stop the application)", src.Server, path))
		}
		p.Consequences = append(p.Consequences,
			fmt.Sprintf("%s holds new writes and drains: %s queued, %s dirty, RPO %s must reach %s (applications on %s wait meanwhile)",
				src.Server, protection.BytesHuman(st.Data.QueueMemory+st.Data.QueueDisk), protection.BytesHuman(st.Data.DirtyBytes), rpoText(st.Data.RPO), to, src.Server))
		for _, ip := range spec.ServiceIPs {
			p.Consequences = append(p.Consequences, fmt.Sprintf("%s releases %s; %s takes %s on %s", src.Server, ipOnly(ip.Prefix), to, ipOnly(ip.Prefix), ifaceOn(spec, ip, to)))
		}
		p.Consequences = append(p.Consequences,
			fmt.Sprintf("%s promotes at epoch %d and serves the volume; %s becomes its target: protection continues %s → %s", to, st.HA.Epoch+1, src.Server, to, src.Server))
		if path := spec.Scripts[ha.HookPostFailback]; path != "" {
			p.Consequences = append(p.Consequences, fmt.Sprintf("%s runs its post-failback script %s (start the application)", to, path))
		}
		p.Consequences = append(p.Consequences, "no acknowledged write is lost; if the drain or the handover fails, nothing moves and the held writes go on")
	case "pause":
		p.Title = fmt.Sprintf("Pause %s on %s", name, src.Server)
		p.Consequences = append(p.Consequences,
			fmt.Sprintf("%s stops shipping writes to %s; they are tracked in its dirty bitmap", src.Server, other(src.Server)),
			"the job is NOT PROTECTED until Resume, which resyncs only the tracked chunks")
		p.Loss = fmt.Sprintf("if %s fails while paused, every write since the pause is missing on %s", src.Server, other(src.Server))
	case "resume":
		p.Title = fmt.Sprintf("Resume %s on %s", name, src.Server)
		if src.Status.HA.State != ha.StatePaused {
			p.Refusal = fmt.Sprintf("%s is %s, not paused", src.Server, src.Status.HA.State)
		}
		p.Consequences = append(p.Consequences,
			fmt.Sprintf("%s resyncs %s of tracked writes to %s (inconsistent until done), then replicates every write", src.Server, protection.BytesHuman(src.Status.Data.DirtyBytes), other(src.Server)))
	case "verify":
		p.Title = fmt.Sprintf("Verify %s: compare %s and %s", name, src.Server, other(src.Server))
		size := spec.VolumeSize
		what := "the whole volume"
		if size > 0 {
			what = "the whole volume (" + protection.BytesHuman(size) + ")"
		}
		p.Consequences = append(p.Consequences,
			fmt.Sprintf("both agents read and checksum %s, chunk by chunk; replication goes on (expect read load on both hosts)", what),
			"the result names the number of differing chunks")
	case "delete":
		p.Title = fmt.Sprintf("Delete job %s from %s and %s", name, spec.Source.Name, spec.Target.Name)
		p.Options = []PlanOption{{Name: "keep_state", Label: "keep the job's state (archive it: generations, bitmap, queue)", Set: opts.KeepState},
			{Name: "force", Label: "delete even while the volume is in use (its users lose their disk)", Set: opts.Force}}
		var users []string
		for _, r := range reports {
			if r.Status != nil {
				for _, u := range r.Status.Data.Users {
					users = append(users, r.Server+": "+u)
				}
			}
		}
		if len(users) > 0 && !opts.Force {
			p.Refusal = "the volume is in use (" + strings.Join(users, "; ") + "): stop the application first, or force"
			p.NeedsForce = true
		}
		p.Server = spec.Target.Name + ", " + spec.Source.Name
		state := "removes its state on both (generations, bitmap, queue)"
		if opts.KeepState {
			state = "archives its state on both (STATE/archive/" + name + ".deleted-TIMESTAMP)"
		}
		p.Consequences = append(p.Consequences,
			"stops the job on the target, then on the source, and "+state,
			"the volumes' data and the service IPs stay where they are; nothing protects the volume afterwards")
		for _, r := range reports {
			if r.Status == nil && !strings.Contains(r.Err, "not found") {
				p.Consequences = append(p.Consequences, fmt.Sprintf("%s does not answer (%s): delete it there when it is back", r.Server, r.Err))
			}
		}
		if len(users) > 0 && opts.Force {
			p.Loss = "the volume's users lose their disk: " + strings.Join(users, "; ")
		}
	case "snapshot":
		p.Title = fmt.Sprintf("Take a snapshot of %s on %s", name, p.Server)
		p.Inputs = []PlanInput{{Name: "name", Label: "name", Placeholder: "snap-TIMESTAMP", Value: opts.Name},
			{Name: "mount", Label: "application-consistent: freeze this mount point on the source (fsfreeze)", Placeholder: "/srv/data", Value: opts.Mount}}
		if tgt != nil && tgt.Status.Snapshots != nil && tgt.Status.Snapshots.Unsupported != "" {
			p.Refusal = tgt.Status.Snapshots.Unsupported
		}
		mech := ""
		if tgt != nil && tgt.Status.Snapshots != nil && tgt.Status.Snapshots.Mechanism != "" {
			mech = " (" + tgt.Status.Snapshots.Mechanism + ")"
		}
		if opts.Mount != "" && src != nil {
			p.Consequences = append(p.Consequences,
				fmt.Sprintf("%s freezes the file system at %s (its writes wait), marks the point in the replication stream, and thaws right after the snapshot (on its own after 10 s at most)", src.Server, opts.Mount),
				fmt.Sprintf("%s snapshots its copy exactly at that point%s: application-consistent", p.Server, mech))
		} else {
			p.Consequences = append(p.Consequences,
				fmt.Sprintf("%s snapshots its copy at the last write it applied%s: crash-consistent, like a power cut", p.Server, mech))
		}
		p.Consequences = append(p.Consequences, fmt.Sprintf("%s pauses applying for the copy (milliseconds with reflink); the source is not stopped and replication goes on", p.Server))
	case "test-failover":
		p.Title = fmt.Sprintf("Test failover of %s on %s", name, p.Server)
		p.Inputs = []PlanInput{{Name: "snapshot", Label: "clone this snapshot (empty: the current consistent image)", Value: opts.Snapshot},
			{Name: "test_ip", Label: "serve it on this address, CIDR@IFACE (empty: a Unix socket)", Placeholder: "10.0.0.99/24@eth0", Value: opts.TestIP}}
		from := "its current consistent image"
		if opts.Snapshot != "" {
			from = "snapshot " + opts.Snapshot
		}
		where := "on a Unix socket"
		if opts.TestIP != "" {
			where = "on " + opts.TestIP
		}
		p.Consequences = append(p.Consequences,
			fmt.Sprintf("%s serves a writable clone of %s as the NBD export %s-test %s: start the application on it to test", p.Server, from, name, where),
			fmt.Sprintf("replication to %s goes on and the job stays protected; the source and the service IPs are not touched", p.Server),
			"Stop test failover discards the clone and everything written to it")
	case "stop-test-failover":
		p.Title = fmt.Sprintf("Stop the test failover of %s on %s", name, p.Server)
		dev := ""
		if tgt != nil && tgt.Status.Snapshots != nil && tgt.Status.Snapshots.TestFailover != nil {
			t := tgt.Status.Snapshots.TestFailover
			dev = " at " + t.Device
			if len(t.Clients) > 0 {
				p.Consequences = append(p.Consequences, "its clients are cut off: "+strings.Join(t.Clients, ", "))
			}
		}
		p.Consequences = append(p.Consequences, fmt.Sprintf("%s stops serving the test clone%s and deletes it", p.Server, dev))
		p.Loss = "everything written to the test clone is discarded"
	case "delete-snapshot":
		p.Title = fmt.Sprintf("Delete snapshot %s of %s on %s", opts.Snapshot, name, p.Server)
		if opts.Snapshot == "" {
			p.Refusal = "no snapshot named"
		}
		p.Consequences = append(p.Consequences, fmt.Sprintf("%s deletes the snapshot and frees the space only it holds", p.Server))
		p.Loss = "the point-in-time copy " + opts.Snapshot + " is gone"
	default:
		p.Refusal = fmt.Sprintf("unknown action %q", action)
	}
	return p
}

// planFailover: the target takes over.
func planFailover(p *Plan, spec *job.Spec, reports []sideReport, src, tgt *sideReport, opts ActionOptions, now time.Time) {
	for _, r := range reports {
		if r.Server == p.Server && r.Status != nil && r.Status.HA.State == ha.StateRollingBack {
			planFinishRollback(p, spec, r.Status, opts)
			return
		}
	}
	p.Options = []PlanOption{{Name: "force", Label: "force: override the data-safety refusals", Set: opts.Force},
		{Name: "discard_queue", Label: "discard the target's unapplied queue (faster, loses those writes)", Set: opts.DiscardQueue}}
	snapInput := PlanInput{Name: "snapshot", Label: "fail over to this snapshot of the target's volume, a point in time before its latest data (empty: the latest data)", Value: opts.Snapshot}
	if tgt != nil && tgt.Status.Snapshots != nil && tgt.Status.Snapshots.Latest != nil {
		snapInput.Placeholder = "e.g. " + tgt.Status.Snapshots.Latest.Name + " (the newest)"
	}
	p.Inputs = []PlanInput{snapInput}
	if tgt == nil {
		// The picker chose the failed-over side, whose state machine
		// refuses a second failover.
		p.Refusal = fmt.Sprintf("already failed over to %s: Reverse next", p.Server)
		return
	}
	t := tgt.Status
	to := tgt.Server
	from := t.HA.Peer
	if from == "" {
		from = spec.Source.Name
		if from == to {
			from = spec.Target.Name
		}
	}
	p.Title = fmt.Sprintf("Fail %s over to %s", spec.Name, to)
	var old *sideReport
	for i := range reports {
		if reports[i].Server == from {
			old = &reports[i]
		}
	}
	var heard []string
	for _, path := range t.HA.Paths {
		if path.Up {
			heard = append(heard, path.Name)
		}
	}
	var refusals []string
	if !t.HA.Consistent && opts.Snapshot == "" {
		refusals = append(refusals, fmt.Sprintf("%s's copy is INCONSISTENT (a mirror or resync did not finish): forced, it serves an incomplete image the file system may not survive", to))
	}
	if len(heard) > 0 {
		refusals = append(refusals, fmt.Sprintf("%s is still alive (%s hears it on %s): for a planned move without loss use Switchover; forced, %s takes over while %s may still be writing", from, to, strings.Join(heard, ", "), to, from))
	}
	if len(refusals) > 0 {
		p.Refusal = strings.Join(refusals, "; ")
		p.NeedsForce = !opts.Force
		if opts.Force {
			p.Refusal = "forced: " + p.Refusal
		}
	}
	epoch := t.HA.Epoch + 1
	if spec.Arbiter != "" {
		p.Consequences = append(p.Consequences, fmt.Sprintf("%s asks the arbiter for epoch %d: granted once %s's lease has expired (TTL %v), so %s has stopped acknowledging writes first",
			to, epoch, from, spec.LeaseTTL, from))
	}
	queue := t.Data.QueueMemory + t.Data.QueueDisk
	switch {
	case opts.DiscardQueue:
		p.Consequences = append(p.Consequences, fmt.Sprintf("%s stops applying and drops %s of received writes it has not applied", to, protection.BytesHuman(queue)))
	case queue > 0:
		p.Consequences = append(p.Consequences, fmt.Sprintf("%s applies the %s it has queued, then stops applying", to, protection.BytesHuman(queue)))
	}
	if path := spec.Scripts[ha.HookPreFailover]; path != "" {
		p.Consequences = append(p.Consequences, fmt.Sprintf("%s runs its pre-failover script %s", to, path))
	}
	if opts.Snapshot != "" {
		p.Title = fmt.Sprintf("Fail %s over to %s, at snapshot %s", spec.Name, to, opts.Snapshot)
		p.Consequences = append(p.Consequences,
			fmt.Sprintf("%s keeps its current data as snapshot before-failover-epoch-%d", to, epoch),
			fmt.Sprintf("%s rolls its volume back to snapshot %s: only the chunks that differ are rewritten, and marked so that Reverse sends them to %s; if that fails, nothing is served until it is finished", to, opts.Snapshot, from),
			fmt.Sprintf("%s promotes snapshot %s's image at epoch %d and serves the volume", to, opts.Snapshot, epoch))
	} else {
		p.Consequences = append(p.Consequences, fmt.Sprintf("%s promotes its copy at epoch %d and serves the volume", to, epoch))
	}
	for _, ip := range spec.ServiceIPs {
		p.Consequences = append(p.Consequences, fmt.Sprintf("%s will take %s on %s", to, ipOnly(ip.Prefix), ifaceOn(spec, ip, to)))
	}
	if path := spec.Scripts[ha.HookPostFailover]; path != "" {
		p.Consequences = append(p.Consequences, fmt.Sprintf("%s runs its post-failover script %s (mount, start services)", to, path))
	}
	p.Consequences = append(p.Consequences, fmt.Sprintf("%s will be fenced: when it comes back it stays superseded (no service IP, volume not served) until Reverse", from))
	p.Consequences = append(p.Consequences, fmt.Sprintf("nothing protects the volume until Reverse makes %s the target of %s", from, to))
	p.Loss = failoverLoss(spec, old, src, t, opts, now)
	if opts.Snapshot != "" {
		p.Loss = fmt.Sprintf("the served volume goes back to snapshot %s: what %s applied after it is not served (kept in snapshot before-failover-epoch-%d), and Reverse overwrites %s's newer data. Besides, %s",
			opts.Snapshot, to, epoch, from, p.Loss)
	}
}

// planFinishRollback: a failover to a snapshot whose rollback failed or
// was interrupted; the failover to a snapshot again finishes it.
func planFinishRollback(p *Plan, spec *job.Spec, st *api.JobStatus, opts ActionOptions) {
	snap := opts.Snapshot
	if snap == "" {
		snap = st.HA.RollingBack
	}
	p.Title = fmt.Sprintf("Finish the failover of %s to snapshot %s on %s", spec.Name, snap, p.Server)
	p.Inputs = []PlanInput{{Name: "snapshot", Label: "roll back to this snapshot (the one the failover chose, or another, such as before-failover-epoch-N to undo it)", Value: snap}}
	p.Consequences = append(p.Consequences,
		fmt.Sprintf("%s is not serving the volume: %s", p.Server, st.HA.Reason),
		fmt.Sprintf("%s rolls its volume back to snapshot %s again: only the chunks that still differ are rewritten (the newer data was kept before the first attempt)", p.Server, snap),
		fmt.Sprintf("then %s is promoted at epoch %d (already granted), serves the volume and takes the service IPs", p.Server, st.HA.Epoch))
	p.Loss = fmt.Sprintf("the served volume is snapshot %s's image: the newer data stays only in snapshot before-failover-epoch-%d", snap, st.HA.Epoch)
}

// failoverLoss says which acknowledged writes a failover loses: those
// the old source acknowledged that the target does not hold, from the
// old source's last report.
func failoverLoss(spec *job.Spec, old, src *sideReport, t *api.JobStatus, opts ActionOptions, now time.Time) string {
	to := t.Self
	from := t.HA.Peer
	var st *api.JobStatus
	age := ""
	if old != nil {
		st = old.Status
		if st == nil && old.Last != nil {
			st = old.Last
			age = fmt.Sprintf(" (its last report, %s ago)", now.Sub(old.LastAt).Round(time.Second))
		}
	}
	discard := ""
	if q := t.Data.QueueMemory + t.Data.QueueDisk; opts.DiscardQueue && q > 0 {
		discard = fmt.Sprintf("; plus the %s queued on %s that it drops", protection.BytesHuman(q), to)
	}
	if st == nil || !st.Data.Known {
		return fmt.Sprintf("writes %s does not hold are lost: %s has not reported what it held%s", to, from, discard)
	}
	lose := st.Data.QueueMemory + st.Data.QueueDisk + st.Data.DirtyBytes
	outOfSync := st.Arbiter != nil && st.Arbiter.TargetOutOfSync
	synced := st.HA.State == ha.StateReplicating && st.HA.LinkUp
	if spec.Mode == job.ModeSync && synced && lose == 0 && !outOfSync {
		return fmt.Sprintf("writes %s does not hold are lost — none expected: sync mode, and %s%s had nothing queued or dirty, %s in sync, RPO %s%s",
			to, from, age, to, rpoText(st.Data.RPO), discard)
	}
	line := fmt.Sprintf("writes %s does not hold are lost: %s%s had %s queued and %s dirty, RPO %s",
		to, from, age, protection.BytesHuman(st.Data.QueueMemory+st.Data.QueueDisk), protection.BytesHuman(st.Data.DirtyBytes), rpoText(st.Data.RPO))
	if outOfSync {
		line += fmt.Sprintf("; %s was recorded OUT OF SYNC on the arbiter", to)
	}
	if !synced {
		line += fmt.Sprintf("; %s was %s", from, st.HA.State)
	}
	return line + discard
}

// ifaceOn is the interface a service IP goes on when server serves.
func ifaceOn(spec *job.Spec, ip job.ServiceIP, server string) string {
	if server == spec.Target.Name {
		return targetIface(spec, ip)
	}
	return ip.Iface
}

func rpoText(d time.Duration) string {
	if d < 0 {
		return "unknown"
	}
	return d.Round(time.Millisecond).String()
}

// pickerOf is the client package's choice of the side an action goes
// to (nil: the action concerns both sides).
func pickerOf(action string) client.Picker {
	switch action {
	case "failover":
		return client.ForFailover
	case "reverse":
		return client.ForReverse
	case "switchover", "failback", "pause", "resume", "verify":
		return client.ActiveSource
	case "snapshot", "test-failover", "stop-test-failover", "delete-snapshot":
		return client.Target
	}
	return nil
}
