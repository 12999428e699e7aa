package console

import (
	"fmt"
	"net/netip"
	"sort"
	"time"

	"github.com/doppelha/doppel/daemon/api"
	"github.com/doppelha/doppel/daemon/client"
	"github.com/doppelha/doppel/daemon/ha"
	"github.com/doppelha/doppel/daemon/job"
	"github.com/doppelha/doppel/daemon/protection"
)

// Snapshot is what the console shows at one instant: every server and
// every job, as the last round of queries found them. It is sent to the
// browser as JSON (GET /api/state, and on the event stream).
type Snapshot struct {
	Time    time.Time    `json:"time"`
	Servers []ServerView `json:"servers"`
	Jobs    []JobView    `json:"jobs"`
}

// ServerView is one configured agent.
type ServerView struct {
	Name        string `json:"name"`
	Addr        string `json:"addr"`
	Fingerprint string `json:"fingerprint"`
	Reachable   bool   `json:"reachable"`
	// Error says why the agent did not answer.
	Error    string `json:"error,omitempty"`
	Hostname string `json:"hostname,omitempty"`
	Version  string `json:"version,omitempty"`
	// Subsystems: per subsystem, "ok" or why it is unavailable (the
	// agent's own words).
	Subsystems map[string]string `json:"subsystems,omitempty"`
	// Probe is the failure probe's mode on this agent, as its jobs report
	// it (xdp-driver, xdp-generic, userspace, or why none).
	Probe string `json:"probe,omitempty"`
	// Paths: per job, the paths on which this agent hears the job's peer.
	Paths []string `json:"paths,omitempty"`
	Jobs  int      `json:"jobs"`
	// LastSeen is when the agent last answered (zero: never).
	LastSeen time.Time `json:"last_seen"`
}

// JobView is one job in the operator's terms: the columns of the jobs
// table and the header of the job page.
type JobView struct {
	Name string `json:"name"`
	// Verdict is protection.Assess over both sides: the headline (the
	// same one doppel job status prints), the reason, the real direction,
	// what a failure of the source now would cost.
	Verdict  protection.Verdict `json:"verdict"`
	RiskLine string             `json:"risk_line,omitempty"`
	// Direction is "vm1 → vm2" (who serves → who receives), or why there
	// is none.
	Direction string `json:"direction"`
	Home      string `json:"home"`
	// TargetData: consistent, inconsistent, or unknown (target not heard).
	TargetData string `json:"target_data"`
	// Sync is the mirror or resync in progress (nil: none).
	Sync *SyncView `json:"sync,omitempty"`
	// Replication is the replication status in words.
	Replication string `json:"replication"`
	// Mode: sync or async; Compression: the stream's payload compression.
	Mode        string `json:"mode"`
	Compression string `json:"compression"`
	Failover    string `json:"failover"`
	// QueueMemory, QueueDisk: the source's replication queue, bytes.
	QueueMemory int64 `json:"queue_memory"`
	QueueDisk   int64 `json:"queue_disk"`
	// RPO: the source's estimate (seconds; -1 unknown).
	RPO float64 `json:"rpo"`
	// DirtyBytes on the active source.
	DirtyBytes int64 `json:"dirty_bytes"`
	// Arbiter is the arbiter line ("" without an arbiter).
	Arbiter string `json:"arbiter,omitempty"`
	// Countdown is the failover monitor's line while the source is silent
	// ("" while it is heard); CountdownMS the time to fail (-1: none).
	Countdown   string     `json:"countdown,omitempty"`
	CountdownMS float64    `json:"countdown_ms"`
	ServiceIPs  []string   `json:"service_ips,omitempty"`
	Sides       []SideView `json:"sides"`
	// Actions are the buttons of the job: which would be accepted now.
	Actions []ActionState `json:"actions"`
	// Throughput: bytes per second applied on the target, over the last
	// sample (-1: unknown).
	Throughput float64 `json:"throughput"`
	Epoch      uint64  `json:"epoch"`
	// Sample is this round's point of the job's charts.
	Sample Sample `json:"sample"`
	// Snapshots is the target's snapshot line (nil: no target answers, or
	// its agent has no snapshots).
	Snapshots *SnapshotView `json:"snapshots,omitempty"`
}

// SnapshotView is the snapshot line of a job's target.
type SnapshotView struct {
	Server string `json:"server"`
	// Mechanism in use (reflink, lvm-thin), or Unsupported: why none.
	Mechanism   string `json:"mechanism,omitempty"`
	Unsupported string `json:"unsupported,omitempty"`
	Count       int    `json:"count"`
	// Latest is the newest snapshot's name and LatestAt when it was taken.
	Latest   string    `json:"latest,omitempty"`
	LatestAt time.Time `json:"latest_at,omitzero"`
	// Every is the schedule's interval in seconds (0: none).
	Every     float64 `json:"every"`
	LastError string  `json:"last_error,omitempty"`
	// TestFailover is the running test failover (nil: none).
	TestFailover *api.TestFailoverStatus `json:"test_failover,omitempty"`
}

// SyncView is a mirror or resync in progress.
type SyncView struct {
	Server    string  `json:"server"`
	What      string  `json:"what"` // mirror, resync, reverse resync
	Done      int64   `json:"done"`
	Total     int64   `json:"total"`
	Remaining int64   `json:"remaining"`
	Percent   float64 `json:"percent"`
	// Rate in bytes per second over the last samples (0: not known yet);
	// ETA in seconds (-1: unknown).
	Rate float64 `json:"rate"`
	ETA  float64 `json:"eta"`
}

// SideView is one side of a job as its agent reports it.
type SideView struct {
	Server     string   `json:"server"`
	Reachable  bool     `json:"reachable"`
	Error      string   `json:"error,omitempty"`
	Role       string   `json:"role,omitempty"`
	State      string   `json:"state,omitempty"`
	Epoch      uint64   `json:"epoch"`
	Consistent bool     `json:"consistent"`
	Device     string   `json:"device,omitempty"`
	Users      []string `json:"users,omitempty"`
	Reason     string   `json:"reason,omitempty"`
	LastError  string   `json:"last_error,omitempty"`
	Probe      string   `json:"probe,omitempty"`
	Paths      []string `json:"paths,omitempty"`
	LinkUp     bool     `json:"link_up"`
	Arbiter    string   `json:"arbiter,omitempty"`
	// Changed, Dirty, Applied: api.DataStatus's ChangedBytes, DirtyBytes,
	// AppliedBytes.
	Changed int64 `json:"changed_bytes"`
	Dirty   int64 `json:"dirty_bytes"`
	Applied int64 `json:"applied_bytes"`
	// Age is how old the status shown is, in seconds (0: this round; a
	// side that stopped answering keeps its last report).
	Age float64 `json:"age"`
}

// ActionState says whether an action's button is offered.
type ActionState struct {
	Name    string `json:"name"`
	Label   string `json:"label"`
	Enabled bool   `json:"enabled"`
	// Why it is disabled, or what it would do.
	Hint string `json:"hint,omitempty"`
}

// sideReport is one agent's answer about a job (client.Side: its status,
// or why there is none) and, when it does not answer now, the last one it
// gave.
type sideReport struct {
	client.Side
	// Last is the side's last report when it does not answer now, and
	// LastAt when it was received.
	Last   *api.JobStatus
	LastAt time.Time
}

// clientSides are the reports as the client package's sides.
func clientSides(reports []sideReport) []client.Side {
	out := make([]client.Side, len(reports))
	for i, r := range reports {
		out[i] = r.Side
	}
	return out
}

// buildJobView turns the two sides' reports into the operator's columns.
// rate is the mirror/resync rate (bytes/s, 0 unknown), throughput the
// bytes per second the target applied (-1 unknown).
func buildJobView(name string, reports []sideReport, rate, throughput float64, now time.Time) JobView {
	v := client.Assess(clientSides(reports))
	if v.Job == "" {
		v.Job = name
	}
	jv := JobView{Name: name, Verdict: v, RiskLine: v.RiskLine(), RPO: -1, CountdownMS: -1, Throughput: throughput, TargetData: "unknown"}
	spec := specOf(reports)
	if spec != nil {
		jv.Home = spec.Source.Name
		jv.Mode = spec.Mode
		jv.Failover = string(spec.Failover)
		for _, ip := range spec.ServiceIPs {
			jv.ServiceIPs = append(jv.ServiceIPs, ip.Prefix+"@"+ip.Iface)
		}
	}
	// The jobs' replication streams are not compressed: the payload goes
	// as written (doppel repl --compress is the plumbing command's).
	jv.Compression = "none"
	src, tgt := roles(reports)
	switch {
	case src != nil && src.Status.HA.State == ha.StateFailedOver:
		jv.Direction = v.Source + " (failed over: no target until Reverse)"
	case v.Source != "":
		jv.Direction = v.Source + " → " + v.Target
	case tgt != nil && tgt.Status != nil:
		jv.Direction = "no active source (" + tgt.Server + " is the target)"
	default:
		jv.Direction = "no active source"
	}
	if tgt != nil && tgt.Status != nil {
		jv.TargetData = consistency(tgt.Status.HA.Consistent)
	}
	if src != nil && src.Status != nil {
		st := src.Status
		jv.Epoch = st.HA.Epoch
		if st.Data.Known {
			jv.QueueMemory, jv.QueueDisk, jv.DirtyBytes = st.Data.QueueMemory, st.Data.QueueDisk, st.Data.DirtyBytes
			if st.Data.RPO >= 0 {
				jv.RPO = st.Data.RPO.Seconds()
			}
		}
		if d := st.Data; d.SyncTotal > 0 && d.BytesRemaining > 0 {
			what := "mirror"
			switch st.HA.State {
			case ha.StateReversing:
				what = "reverse resync"
			case ha.StateReplicating, ha.StateDisconnected, ha.StatePaused:
				what = "resync"
			}
			sv := &SyncView{Server: src.Server, What: what, Done: d.SyncDone, Total: d.SyncTotal, Remaining: d.BytesRemaining,
				Percent: 100 * float64(min(max(d.SyncDone, 0), d.SyncTotal)) / float64(d.SyncTotal), Rate: rate, ETA: -1}
			if rate > 0 {
				sv.ETA = float64(d.BytesRemaining) / rate
			}
			jv.Sync = sv
		}
		if st.Arbiter != nil {
			jv.Arbiter = protection.ArbiterLine(st.HA.Role, st.Arbiter)
		}
	}
	if jv.Arbiter == "" && spec != nil && spec.Arbiter != "" {
		for _, r := range reports {
			if r.Status != nil && r.Status.Arbiter != nil {
				jv.Arbiter = r.Server + ": " + protection.ArbiterLine(r.Status.HA.Role, r.Status.Arbiter)
				break
			}
		}
		if jv.Arbiter == "" {
			jv.Arbiter = "etcd (no side reports it)"
		}
	}
	jv.Replication = replicationLine(src, tgt, v)
	jv.Countdown, jv.CountdownMS = countdown(src, tgt, reports)
	for _, r := range reports {
		jv.Sides = append(jv.Sides, sideView(r, now))
	}
	if epoch := maxEpoch(reports); epoch > jv.Epoch {
		jv.Epoch = epoch
	}
	if tgt != nil && tgt.Status.Snapshots != nil {
		ss := tgt.Status.Snapshots
		jv.Snapshots = &SnapshotView{Server: tgt.Server, Mechanism: ss.Mechanism, Unsupported: ss.Unsupported, Count: ss.Count,
			Every: ss.Schedule.Every.Seconds(), LastError: ss.LastError, TestFailover: ss.TestFailover}
		if ss.Latest != nil {
			jv.Snapshots.Latest, jv.Snapshots.LatestAt = ss.Latest.Name, ss.Latest.Created
		}
	}
	jv.Actions = actionStates(reports)
	return jv
}

func specOf(reports []sideReport) *job.Spec {
	for _, r := range reports {
		if r.Status != nil {
			return &r.Status.Spec
		}
	}
	for _, r := range reports {
		if r.Last != nil {
			return &r.Last.Spec
		}
	}
	return nil
}

// roles finds the active source (role source, not fenced) and the target
// among the reports that answered.
func roles(reports []sideReport) (src, tgt *sideReport) {
	for i := range reports {
		r := &reports[i]
		if r.Status == nil {
			continue
		}
		switch {
		case r.Status.HA.Role == ha.RoleSource && r.Status.HA.State != ha.StateSuperseded:
			src = r
		case r.Status.HA.Role == ha.RoleTarget:
			tgt = r
		}
	}
	return src, tgt
}

func maxEpoch(reports []sideReport) uint64 {
	var e uint64
	for _, r := range reports {
		if r.Status != nil {
			e = max(e, r.Status.HA.Epoch)
		}
	}
	return e
}

// replicationLine is the replication status in words.
func replicationLine(src, tgt *sideReport, v protection.Verdict) string {
	if src == nil {
		if tgt != nil && tgt.Status != nil {
			return fmt.Sprintf("%s is the target, %s", tgt.Server, tgt.Status.HA.State)
		}
		return "no source"
	}
	st := src.Status
	s := string(st.HA.State)
	if st.HA.LinkUp {
		s += ", link up"
	} else {
		s += ", link down"
	}
	if !st.Data.Known {
		s += " (engine: " + st.Data.Note + ")"
	}
	return s
}

// countdown is the failover monitor's line while the target does not hear
// the source: the time until it declares it failed, then what follows.
func countdown(src, tgt *sideReport, reports []sideReport) (string, float64) {
	if tgt == nil || tgt.Status == nil {
		return "", -1
	}
	t := tgt.Status
	srcName := t.HA.Peer
	if t.Probe.TimeToFail >= 0 {
		line := fmt.Sprintf("%s silent on every path: %s declares it failed in %.1f s", srcName, tgt.Server, t.Probe.TimeToFail.Seconds())
		if t.Spec.Failover == ha.FailoverAuto && t.HA.Consistent {
			line += ", then fails over automatically"
			if t.Spec.Arbiter != "" {
				line += fmt.Sprintf(" once %s's lease expires (TTL %v)", srcName, t.Spec.LeaseTTL)
			}
		} else {
			line += " (failover manual: press Failover)"
		}
		return line, float64(t.Probe.TimeToFail.Milliseconds())
	}
	switch t.HA.State {
	case ha.StateSourceDown:
		return fmt.Sprintf("%s declared %s failed: %s", tgt.Server, srcName, t.HA.Reason), 0
	case ha.StatePromoting:
		line := fmt.Sprintf("%s declared %s failed and asks the arbiter for epoch %d", tgt.Server, srcName, t.HA.Epoch+1)
		if a := t.Arbiter; a != nil && a.Campaign != "" {
			line += ": " + a.Campaign
		}
		return line, 0
	}
	return "", -1
}

func sideView(r sideReport, now time.Time) SideView {
	sv := SideView{Server: r.Server, Reachable: r.Status != nil, Error: r.Err}
	st := r.Status
	if st == nil {
		st = r.Last
		if st == nil {
			return sv
		}
		sv.Age = now.Sub(r.LastAt).Seconds()
	}
	sv.Role, sv.State, sv.Epoch, sv.Consistent = string(st.HA.Role), string(st.HA.State), st.HA.Epoch, st.HA.Consistent
	sv.Device, sv.Users, sv.Reason, sv.LastError = st.Data.Device, st.Data.Users, st.HA.Reason, st.HA.LastError
	sv.Probe = fmt.Sprintf("%s, %v × %d", st.Probe.Mode, st.Probe.Interval, st.Probe.Missed)
	sv.LinkUp = st.HA.LinkUp
	sv.Paths = append(sv.Paths, protection.PathStates(st.HA.Paths)...)
	if st.Arbiter != nil {
		sv.Arbiter = protection.ArbiterLine(st.HA.Role, st.Arbiter)
	}
	sv.Changed, sv.Dirty, sv.Applied = st.Data.ChangedBytes, st.Data.DirtyBytes, st.Data.AppliedBytes
	return sv
}

func consistency(c bool) string {
	if c {
		return "consistent"
	}
	return "inconsistent"
}

// actionStates are the job's buttons: each enabled when the agents would
// accept it now (they decide; a refusal is shown with its reason).
func actionStates(reports []sideReport) []ActionState {
	src, tgt := roles(reports)
	var failedOver, superseded *sideReport
	for i := range reports {
		r := &reports[i]
		if r.Status == nil {
			continue
		}
		switch r.Status.HA.State {
		case ha.StateFailedOver:
			failedOver = r
		case ha.StateSuperseded:
			superseded = r
		}
	}
	st := func(name string, enabled bool, hint string) ActionState {
		return ActionState{Name: name, Label: actionLabel(name), Enabled: enabled, Hint: hint}
	}
	replicating := src != nil && src.Status.HA.State == ha.StateReplicating && tgt != nil && tgt.Status.HA.Consistent
	var out []ActionState
	switch {
	case tgt != nil && failedOver == nil:
		out = append(out, st("failover", true, tgt.Server+" takes over"))
	case failedOver != nil:
		out = append(out, st("failover", false, "already failed over to "+failedOver.Server+": Reverse next"))
	default:
		out = append(out, st("failover", false, "no target answers"))
	}
	switch {
	case failedOver != nil && superseded != nil:
		out = append(out, st("reverse", true, superseded.Server+" becomes the target of "+failedOver.Server))
	case failedOver != nil:
		out = append(out, st("reverse", false, "waiting for the old source to come back (fenced)"))
	default:
		out = append(out, st("reverse", false, "only after a failover"))
	}
	home := ""
	if spec := specOf(reports); spec != nil {
		home = spec.Source.Name
	}
	switch {
	case replicating && src.Server != home:
		out = append(out, st("failback", true, "planned switchover back to "+home+", no write lost"))
		out = append(out, st("switchover", true, tgt.Server+" becomes the source, no write lost"))
	case replicating:
		out = append(out, st("failback", false, "the job runs at home ("+home+")"))
		out = append(out, st("switchover", true, tgt.Server+" becomes the source, no write lost"))
	default:
		out = append(out, st("failback", false, "needs both sides replicating, target consistent"))
		out = append(out, st("switchover", false, "needs both sides replicating, target consistent"))
	}
	paused := src != nil && src.Status.HA.State == ha.StatePaused
	switch {
	case paused:
		out = append(out, st("pause", false, "paused"), st("resume", true, "resync the tracked writes, then replicate"))
	case src != nil && failedOver == nil:
		out = append(out, st("pause", true, "stop shipping writes (tracked for a resync)"), st("resume", false, "not paused"))
	default:
		out = append(out, st("pause", false, "no replicating source"), st("resume", false, "not paused"))
	}
	out = append(out, st("verify", src != nil && tgt != nil, "compare source and target chunk by chunk"))
	switch {
	case tgt == nil:
		out = append(out, st("snapshot", false, "no target answers (snapshots live there)"), st("test-failover", false, "no target answers"))
	case tgt.Status.Snapshots == nil:
		out = append(out, st("snapshot", false, tgt.Server+"'s agent has no snapshots"), st("test-failover", false, tgt.Server+"'s agent has no snapshots"))
	case tgt.Status.Snapshots.Unsupported != "":
		why := tgt.Status.Snapshots.Unsupported
		out = append(out, st("snapshot", false, why), st("test-failover", false, why))
	case tgt.Status.Snapshots.TestFailover != nil:
		out = append(out, st("snapshot", true, "point-in-time copy on "+tgt.Server+" ("+tgt.Status.Snapshots.Mechanism+")"),
			st("stop-test-failover", true, "discard the test clone on "+tgt.Server))
	default:
		out = append(out, st("snapshot", true, "point-in-time copy on "+tgt.Server+" ("+tgt.Status.Snapshots.Mechanism+")"),
			st("test-failover", true, "serve a writable clone on "+tgt.Server+"; replication goes on"))
	}
	out = append(out, st("delete", true, "remove the job from both agents"))
	return out
}

func actionLabel(name string) string {
	switch name {
	case "failover":
		return "Failover"
	case "reverse":
		return "Reverse"
	case "failback":
		return "Failback"
	case "switchover":
		return "Switchover"
	case "pause":
		return "Pause"
	case "resume":
		return "Resume"
	case "verify":
		return "Verify"
	case "delete":
		return "Delete"
	case "snapshot":
		return "Take snapshot"
	case "test-failover":
		return "Test failover"
	case "stop-test-failover":
		return "Stop test failover"
	case "delete-snapshot":
		return "Delete snapshot"
	}
	return name
}

// targetIface is where the target puts a service IP (the job's interface
// map, else the same name).
func targetIface(spec *job.Spec, ip job.ServiceIP) string {
	if m, ok := spec.MapIface[ip.Iface]; ok {
		return m
	}
	return ip.Iface
}

// ipOnly is the address of a CIDR ("172.17.22.187/24" -> "172.17.22.187").
func ipOnly(prefix string) string {
	if p, err := netip.ParsePrefix(prefix); err == nil {
		return p.Addr().String()
	}
	return prefix
}

// sortedNames returns the keys of m in order.
func sortedNames[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}
