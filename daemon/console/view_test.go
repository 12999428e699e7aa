package console

import (
	"strings"
	"testing"
	"time"

	"github.com/doppelha/doppel/daemon/api"
	"github.com/doppelha/doppel/daemon/client"
	"github.com/doppelha/doppel/daemon/ha"
	"github.com/doppelha/doppel/daemon/job"
	"github.com/doppelha/doppel/daemon/protection"
	"github.com/doppelha/doppel/daemon/snapshot"
)

var t0 = time.Date(2026, 5, 1, 12, 0, 0, 0, time.UTC)

func testSpec(mode string) job.Spec {
	return job.Spec{Name: "web", Mode: mode, Failover: ha.FailoverManual,
		Source:     job.Endpoint{Name: "vm1"},
		Target:     job.Endpoint{Name: "vm2"},
		ServiceIPs: []job.ServiceIP{{Prefix: "172.17.22.187/24", Iface: "eth0"}},
		Monitor:    job.Monitor{Interval: 200 * time.Millisecond, Missed: 5},
		Arbiter:    "etcd", LeaseTTL: 2 * time.Second}
}

// status is one side's report.
func status(spec job.Spec, self string, role ha.Role, state ha.State, epoch uint64) *api.JobStatus {
	peer := "vm2"
	if self == "vm2" {
		peer = "vm1"
	}
	st := &api.JobStatus{Spec: spec, Self: self,
		HA:    ha.Status{Job: spec.Name, Self: self, Peer: peer, Home: "vm1", Role: role, State: state, Epoch: epoch, Consistent: true, LinkUp: state == ha.StateReplicating},
		Data:  api.DataStatus{Known: true, RPO: 0},
		Probe: api.ProbeStatus{Mode: "xdp-generic", Interval: 200 * time.Millisecond, Missed: 5, TimeToFail: -1, Active: true}}
	if role == ha.RoleTarget {
		st.Data.RPO = -1
	}
	for _, p := range []string{"repl", "app"} {
		st.HA.Paths = append(st.HA.Paths, ha.PathStatus{Name: p, Up: state == ha.StateReplicating})
	}
	return st
}

func answered(server string, st *api.JobStatus) sideReport {
	return sideReport{Side: client.Side{Server: server, Status: st}}
}

// silent is a side that does not answer now; last is its last report.
func silent(server string, last *api.JobStatus, age time.Duration) sideReport {
	return sideReport{Side: client.Side{Server: server, Err: "agent 172.17.22.11:6320: i/o timeout"}, Last: last, LastAt: t0.Add(-age)}
}

func hasLine(lines []string, want string) bool {
	for _, l := range lines {
		if strings.Contains(l, want) {
			return true
		}
	}
	return false
}

// TestPlanFailoverStatesTheConsequence: after vm1 went silent, Failover
// goes to vm2 and says who takes the service IP, who is fenced, and what
// is lost, from vm1's last report.
func TestPlanFailoverStatesTheConsequence(t *testing.T) {
	spec := testSpec(job.ModeSync)
	last := status(spec, "vm1", ha.RoleSource, ha.StateReplicating, 1)
	last.Arbiter = &api.ArbiterStatus{Holding: true}
	tgt := status(spec, "vm2", ha.RoleTarget, ha.StateSourceDown, 1)
	reps := []sideReport{silent("vm1", last, 9*time.Second), answered("vm2", tgt)}
	p := planAction("web", "failover", reps, ActionOptions{}, t0)
	if p.Server != "vm2" {
		t.Errorf("failover sent to %q, want vm2", p.Server)
	}
	for _, want := range []string{"vm2 will take 172.17.22.187 on eth0", "vm1 will be fenced", "epoch 2", "once vm1's lease has expired (TTL 2s)"} {
		if !hasLine(p.Consequences, want) {
			t.Errorf("consequences %q lack %q", p.Consequences, want)
		}
	}
	if !strings.Contains(p.Loss, "writes vm2 does not hold are lost") || !strings.Contains(p.Loss, "none expected") || !strings.Contains(p.Loss, "9s ago") {
		t.Errorf("loss %q: want none expected in sync mode, from vm1's report 9s ago", p.Loss)
	}
	if p.Refusal != "" || p.NeedsForce {
		t.Errorf("refusal %q needs force %t: the source is silent, the target consistent", p.Refusal, p.NeedsForce)
	}

	// Async with writes in flight: the loss names them.
	spec = testSpec(job.ModeAsync)
	spec.MapIface = map[string]string{"eth0": "ens3"}
	last = status(spec, "vm1", ha.RoleSource, ha.StateReplicating, 1)
	last.Data.QueueMemory, last.Data.DirtyBytes, last.Data.RPO = 3<<20, 64<<10, 1500*time.Millisecond
	tgt = status(spec, "vm2", ha.RoleTarget, ha.StateSourceDown, 1)
	tgt.Data.QueueMemory = 1 << 20
	reps = []sideReport{silent("vm1", last, 2*time.Second), answered("vm2", tgt)}
	p = planAction("web", "failover", reps, ActionOptions{}, t0)
	for _, want := range []string{"3.0 MiB queued", "64.0 KiB dirty", "RPO 1.5s"} {
		if !strings.Contains(p.Loss, want) {
			t.Errorf("async loss %q lacks %q", p.Loss, want)
		}
	}
	if !hasLine(p.Consequences, "vm2 will take 172.17.22.187 on ens3") || !hasLine(p.Consequences, "applies the 1.0 MiB it has queued") {
		t.Errorf("async consequences %q: want the mapped interface and the queue applied", p.Consequences)
	}
	p = planAction("web", "failover", reps, ActionOptions{DiscardQueue: true}, t0)
	if !hasLine(p.Consequences, "drops 1.0 MiB") || !strings.Contains(p.Loss, "1.0 MiB queued on vm2 that it drops") {
		t.Errorf("discard queue: consequences %q loss %q", p.Consequences, p.Loss)
	}
}

// TestPlanFailoverRefusals: a source still heard, or an inconsistent
// target, needs force, and the plan says why.
func TestPlanFailoverRefusals(t *testing.T) {
	spec := testSpec(job.ModeSync)
	src := status(spec, "vm1", ha.RoleSource, ha.StateReplicating, 1)
	tgt := status(spec, "vm2", ha.RoleTarget, ha.StateReplicating, 1)
	reps := []sideReport{answered("vm1", src), answered("vm2", tgt)}
	p := planAction("web", "failover", reps, ActionOptions{}, t0)
	if !p.NeedsForce || !strings.Contains(p.Refusal, "vm1 is still alive (vm2 hears it on repl, app)") || !strings.Contains(p.Refusal, "Switchover") {
		t.Errorf("live source: needs force %t, refusal %q", p.NeedsForce, p.Refusal)
	}
	p = planAction("web", "failover", reps, ActionOptions{Force: true}, t0)
	if p.NeedsForce || !strings.HasPrefix(p.Refusal, "forced: ") {
		t.Errorf("forced: needs force %t, refusal %q", p.NeedsForce, p.Refusal)
	}
	tgt = status(spec, "vm2", ha.RoleTarget, ha.StateSourceDown, 1)
	tgt.HA.Consistent = false
	reps = []sideReport{silent("vm1", src, time.Second), answered("vm2", tgt)}
	p = planAction("web", "failover", reps, ActionOptions{}, t0)
	if !p.NeedsForce || !strings.Contains(p.Refusal, "INCONSISTENT") {
		t.Errorf("inconsistent target: needs force %t, refusal %q", p.NeedsForce, p.Refusal)
	}
	// Failed over already: sent to the failed-over side, which refuses.
	fo := status(spec, "vm2", ha.RoleSource, ha.StateFailedOver, 2)
	reps = []sideReport{silent("vm1", src, time.Minute), answered("vm2", fo)}
	p = planAction("web", "failover", reps, ActionOptions{}, t0)
	if p.Server != "vm2" || !strings.Contains(p.Refusal, "Reverse next") {
		t.Errorf("second failover: server %q refusal %q", p.Server, p.Refusal)
	}
}

// TestPlanFailoverToSnapshot: the failover's confirmation offers a
// snapshot; with one, an inconsistent target needs no force, and the
// plan says the volume is rolled back to it, its newer data kept, and
// what the served volume loses. A side whose rollback failed gets the
// plan that finishes it, not "already failed over".
func TestPlanFailoverToSnapshot(t *testing.T) {
	spec := testSpec(job.ModeSync)
	src := status(spec, "vm1", ha.RoleSource, ha.StateReplicating, 1)
	tgt := status(spec, "vm2", ha.RoleTarget, ha.StateSourceDown, 1)
	tgt.HA.Consistent = false
	tgt.Snapshots = &api.SnapshotStatus{Count: 2, Latest: &snapshot.Snapshot{Name: "pre-resync-20260501-115900.000"}}
	reps := []sideReport{silent("vm1", src, time.Second), answered("vm2", tgt)}
	p := planAction("web", "failover", reps, ActionOptions{}, t0)
	if len(p.Inputs) != 1 || p.Inputs[0].Name != "snapshot" || !strings.Contains(p.Inputs[0].Placeholder, "pre-resync-20260501-115900.000") {
		t.Fatalf("inputs %+v: want the snapshot choice, the newest as the example", p.Inputs)
	}
	if !p.NeedsForce {
		t.Fatalf("inconsistent target without a snapshot: force not asked for (%q)", p.Refusal)
	}
	p = planAction("web", "failover", reps, ActionOptions{Snapshot: "pre-resync-20260501-115900.000"}, t0)
	if p.NeedsForce || p.Refusal != "" {
		t.Errorf("to a snapshot: needs force %t, refusal %q", p.NeedsForce, p.Refusal)
	}
	for _, want := range []string{"vm2 keeps its current data as snapshot before-failover-epoch-2", "vm2 rolls its volume back to snapshot pre-resync-20260501-115900.000", "promotes snapshot pre-resync-20260501-115900.000's image at epoch 2", "vm2 will take 172.17.22.187"} {
		if !hasLine(p.Consequences, want) {
			t.Errorf("consequences %q lack %q", p.Consequences, want)
		}
	}
	if !strings.Contains(p.Title, "at snapshot pre-resync-20260501-115900.000") || !strings.Contains(p.Loss, "goes back to snapshot pre-resync-20260501-115900.000") {
		t.Errorf("title %q loss %q", p.Title, p.Loss)
	}

	rb := status(spec, "vm2", ha.RoleSource, ha.StateRollingBack, 2)
	rb.HA.RollingBack = "s1"
	rb.HA.Reason = "the rollback to snapshot s1 failed: write volume: input/output error"
	reps = []sideReport{answered("vm1", status(spec, "vm1", ha.RoleSource, ha.StateSuperseded, 1)), answered("vm2", rb)}
	p = planAction("web", "failover", reps, ActionOptions{}, t0)
	if p.Server != "vm2" || p.Refusal != "" || len(p.Inputs) != 1 || p.Inputs[0].Value != "s1" || !strings.Contains(p.Title, "Finish the failover of web to snapshot s1") {
		t.Fatalf("rolling back: server %q refusal %q inputs %+v title %q", p.Server, p.Refusal, p.Inputs, p.Title)
	}
	if !hasLine(p.Consequences, "input/output error") || !hasLine(p.Consequences, "rolls its volume back to snapshot s1 again") {
		t.Errorf("rolling back: consequences %q", p.Consequences)
	}
}

func TestPlanReverseAndFailback(t *testing.T) {
	spec := testSpec(job.ModeSync)
	fo := status(spec, "vm2", ha.RoleSource, ha.StateFailedOver, 2)
	fo.Data.ChangedBytes = 1 << 20
	sup := status(spec, "vm1", ha.RoleSource, ha.StateSuperseded, 1)
	sup.Data.DirtyBytes = 128 << 10
	reps := []sideReport{answered("vm1", sup), answered("vm2", fo)}
	p := planAction("web", "reverse", reps, ActionOptions{}, t0)
	if p.Server != "vm2" || p.Refusal != "" {
		t.Errorf("reverse: server %q refusal %q, want vm2 and none", p.Server, p.Refusal)
	}
	if !hasLine(p.Consequences, "about 1.1 MiB") || !hasLine(p.Consequences, "vm1 (fenced since the failover) becomes the target of vm2") {
		t.Errorf("reverse consequences %q", p.Consequences)
	}
	if !strings.Contains(p.Loss, "128.0 KiB of writes vm1 made that vm2 never received") {
		t.Errorf("reverse loss %q", p.Loss)
	}

	// After the reverse: vm2 → vm1, failback goes to vm2 and moves the IP home.
	src := status(spec, "vm2", ha.RoleSource, ha.StateReplicating, 2)
	src.Data.QueueMemory = 4096
	tgt := status(spec, "vm1", ha.RoleTarget, ha.StateReplicating, 2)
	reps = []sideReport{answered("vm1", tgt), answered("vm2", src)}
	p = planAction("web", "failback", reps, ActionOptions{}, t0)
	if p.Server != "vm2" || p.Refusal != "" {
		t.Errorf("failback: server %q refusal %q", p.Server, p.Refusal)
	}
	for _, want := range []string{"vm2 releases 172.17.22.187; vm1 takes 172.17.22.187 on eth0", "4.0 KiB queued", "no acknowledged write is lost", "vm1 promotes at epoch 3"} {
		if !hasLine(p.Consequences, want) {
			t.Errorf("failback consequences %q lack %q", p.Consequences, want)
		}
	}
	// At home, failback is refused; switchover is not.
	src = status(spec, "vm1", ha.RoleSource, ha.StateReplicating, 1)
	tgt = status(spec, "vm2", ha.RoleTarget, ha.StateReplicating, 1)
	reps = []sideReport{answered("vm1", src), answered("vm2", tgt)}
	if p := planAction("web", "failback", reps, ActionOptions{}, t0); !strings.Contains(p.Refusal, "already runs at home") {
		t.Errorf("failback at home: refusal %q", p.Refusal)
	}
	if p := planAction("web", "switchover", reps, ActionOptions{}, t0); p.Server != "vm1" || p.Refusal != "" {
		t.Errorf("switchover: server %q refusal %q", p.Server, p.Refusal)
	}
}

func TestPlanDeleteInUse(t *testing.T) {
	spec := testSpec(job.ModeSync)
	src := status(spec, "vm1", ha.RoleSource, ha.StateReplicating, 1)
	src.Data.Users = []string{"nbd client 1"}
	reps := []sideReport{answered("vm1", src), answered("vm2", status(spec, "vm2", ha.RoleTarget, ha.StateReplicating, 1))}
	p := planAction("web", "delete", reps, ActionOptions{}, t0)
	if !p.NeedsForce || !strings.Contains(p.Refusal, "vm1: nbd client 1") {
		t.Errorf("delete in use: needs force %t refusal %q", p.NeedsForce, p.Refusal)
	}
	p = planAction("web", "delete", reps, ActionOptions{Force: true, KeepState: true}, t0)
	if p.NeedsForce || !strings.Contains(p.Loss, "lose their disk") || !hasLine(p.Consequences, "archives its state") {
		t.Errorf("forced delete keeping state: %+v", p)
	}
}

// TestJobViewColumns: the columns a Double-Take user reads, from the
// sides' status.
func TestJobViewColumns(t *testing.T) {
	spec := testSpec(job.ModeAsync)
	src := status(spec, "vm1", ha.RoleSource, ha.StateMirroring, 1)
	src.HA.LinkUp = true
	src.Data.SyncTotal, src.Data.SyncDone, src.Data.BytesRemaining = 100<<20, 25<<20, 75<<20
	src.Data.QueueMemory, src.Data.QueueDisk, src.Data.RPO = 1<<20, 2<<20, 2*time.Second
	src.Arbiter = &api.ArbiterStatus{Holding: true, LeaseAge: 300 * time.Millisecond, TTL: 2 * time.Second}
	tgt := status(spec, "vm2", ha.RoleTarget, ha.StateMirroring, 1)
	tgt.HA.Consistent = false
	reps := []sideReport{answered("vm1", src), answered("vm2", tgt)}
	jv := buildJobView("web", reps, 5<<20, 4<<20, t0)
	want := protection.Assess(client.Protection(clientSides(reps)))
	if jv.Verdict.Level != want.Level || jv.Verdict.Level != protection.NotProtected {
		t.Errorf("headline %s, want protection.Assess's %s", jv.Verdict.Level, want.Level)
	}
	if jv.Direction != "vm1 → vm2" || jv.TargetData != "inconsistent" || jv.Mode != "async" {
		t.Errorf("direction %q target data %q mode %q", jv.Direction, jv.TargetData, jv.Mode)
	}
	if jv.Sync == nil || jv.Sync.Percent != 25 || jv.Sync.ETA != 15 || jv.Sync.What != "mirror" {
		t.Errorf("sync %+v: want 25%%, 75 MiB at 5 MiB/s = 15 s", jv.Sync)
	}
	if jv.QueueMemory != 1<<20 || jv.QueueDisk != 2<<20 || jv.RPO != 2 {
		t.Errorf("queue %d/%d RPO %v", jv.QueueMemory, jv.QueueDisk, jv.RPO)
	}
	if !strings.Contains(jv.Arbiter, "holds the lease") || !strings.Contains(jv.Arbiter, "target in sync") {
		t.Errorf("arbiter line %q", jv.Arbiter)
	}
	if jv.Countdown != "" || jv.CountdownMS != -1 {
		t.Errorf("countdown %q while the source is heard", jv.Countdown)
	}

	// The source goes silent: the target's monitor counts down.
	tgt.HA.Consistent = true
	tgt.Probe.TimeToFail = 600 * time.Millisecond
	jv = buildJobView("web", []sideReport{silent("vm1", src, time.Second), answered("vm2", tgt)}, 0, -1, t0)
	if !strings.Contains(jv.Countdown, "vm1 silent on every path: vm2 declares it failed in 0.6 s") || jv.CountdownMS != 600 {
		t.Errorf("countdown %q (%v ms)", jv.Countdown, jv.CountdownMS)
	}
	if jv.Sides[0].Reachable || jv.Sides[0].State != "mirroring" || jv.Sides[0].Age != 1 {
		t.Errorf("silent side %+v: want its last report, 1 s old", jv.Sides[0])
	}
	enabled := map[string]bool{}
	for _, a := range jv.Actions {
		enabled[a.Name] = a.Enabled
	}
	if !enabled["failover"] || enabled["reverse"] || enabled["failback"] || enabled["switchover"] {
		t.Errorf("actions with vm1 silent: %v", enabled)
	}
}

// TestHistory: throughput from the target's applied bytes, restarted when
// another side becomes the target; the mirror rate; retention.
func TestHistory(t *testing.T) {
	spec := testSpec(job.ModeSync)
	var h history
	at := func(s int) time.Time { return t0.Add(time.Duration(s) * time.Second) }
	mk := func(applied, done int64, tgtName string) []sideReport {
		srcName := "vm1"
		if tgtName == "vm1" {
			srcName = "vm2"
		}
		src := status(spec, srcName, ha.RoleSource, ha.StateMirroring, 1)
		src.Data.SyncTotal, src.Data.SyncDone, src.Data.BytesRemaining = 100<<20, done, 100<<20-done
		tgt := status(spec, tgtName, ha.RoleTarget, ha.StateMirroring, 1)
		tgt.Data.AppliedBytes = applied
		return []sideReport{answered(srcName, src), answered(tgtName, tgt)}
	}
	s, rate := h.add(mk(0, 0, "vm2"), at(0), time.Hour)
	if s.Throughput != -1 || rate != 0 {
		t.Errorf("first sample: throughput %v rate %v, want unknown", s.Throughput, rate)
	}
	s, rate = h.add(mk(10<<20, 10<<20, "vm2"), at(2), time.Hour)
	if s.Throughput != 5<<20 || rate != 5<<20 {
		t.Errorf("after 10 MiB in 2 s: throughput %v rate %v, want 5 MiB/s", s.Throughput, rate)
	}
	// vm1 becomes the target: its counter starts at 0, no negative rate.
	s, _ = h.add(mk(1<<20, 0, "vm1"), at(3), time.Hour)
	if s.Throughput != -1 {
		t.Errorf("new target: throughput %v, want unknown for one sample", s.Throughput)
	}
	s, _ = h.add(mk(3<<20, 2<<20, "vm1"), at(4), time.Hour)
	if s.Throughput != 2<<20 {
		t.Errorf("new target after 1 s: %v", s.Throughput)
	}
	h.add(mk(3<<20, 2<<20, "vm1"), at(4000), time.Hour)
	if len(h.samples) != 1 {
		t.Errorf("after an hour: %d samples kept, want 1", len(h.samples))
	}
}
