package protection

import (
	"strings"
	"testing"
	"time"

	"github.com/doppelha/doppel/daemon/api"
	"github.com/doppelha/doppel/daemon/ha"
	"github.com/doppelha/doppel/daemon/job"
)

// side builds one agent's status of job web (home vm1): role and state,
// then the tweaks.
func side(server string, role ha.Role, state ha.State, tweak ...func(*api.JobStatus)) Side {
	st := &api.JobStatus{
		Spec: job.Spec{Name: "web", Source: job.Endpoint{Name: "vm1"}, Target: job.Endpoint{Name: "vm2"}, Mode: job.ModeSync, Failover: ha.FailoverAuto},
		Self: server,
		HA: ha.Status{Job: "web", Self: server, Role: role, State: state, Epoch: 3, Consistent: true, LinkUp: true,
			Paths: []ha.PathStatus{{Name: "repl", Up: true}, {Name: "app", Up: true}}},
		Data:  api.DataStatus{Known: true, RPO: 0},
		Probe: api.ProbeStatus{Mode: "xdp-generic", Interval: 250 * time.Millisecond, Missed: 8, TimeToFail: -1, Active: true},
	}
	if role == ha.RoleTarget {
		st.Data.RPO = -1
	}
	for _, f := range tweak {
		f(st)
	}
	return Side{Server: server, Status: st}
}

func down(server, err string) Side { return Side{Server: server, Err: err} }

// withArbiter gives a side an etcd arbiter (lease TTL 5 s); holding: the
// side holds the lease.
func withArbiter(holding bool) func(*api.JobStatus) {
	return func(s *api.JobStatus) {
		s.Spec.Arbiter, s.Spec.LeaseTTL = job.ArbiterEtcd, 5*time.Second
		s.Arbiter = &api.ArbiterStatus{Holding: holding, TTL: 5 * time.Second, LeaseAge: -1}
	}
}

func TestAssess(t *testing.T) {
	for _, tc := range []struct {
		name     string
		sides    []Side
		level    Level
		reason   string // substring
		src, tgt string
		advice   string // prefix of the first advice line, "" for none
		risk     string // substring of RiskLine
	}{
		{
			name:  "protected at home",
			sides: []Side{side("vm1", ha.RoleSource, ha.StateReplicating), side("vm2", ha.RoleTarget, ha.StateReplicating)},
			level: Protected, reason: "every write on vm1 is replicated to vm2", src: "vm1", tgt: "vm2",
			risk: "if vm1 died now: lose 0 B / 0s of writes, vm2 takes over in ~2s (automatic)",
		},
		{
			name:  "protected away from home, after a switchover: the real direction and failback",
			sides: []Side{side("vm1", ha.RoleTarget, ha.StateReplicating), side("vm2", ha.RoleSource, ha.StateReplicating)},
			level: Protected, src: "vm2", tgt: "vm1", advice: "doppel failback web",
			risk: "if vm2 died now: lose 0 B / 0s of writes, vm1 takes over in ~2s (automatic)",
		},
		{
			name: "countdown running: the failover estimate is the countdown",
			sides: []Side{side("vm1", ha.RoleSource, ha.StateReplicating), side("vm2", ha.RoleTarget, ha.StateReplicating, func(s *api.JobStatus) {
				s.Probe.TimeToFail = 750 * time.Millisecond
			})},
			level: Protected, src: "vm1", tgt: "vm2", risk: "vm2 takes over in ~750ms (automatic)",
		},
		{
			name:  "manual failover mode",
			sides: []Side{side("vm1", ha.RoleSource, ha.StateReplicating), side("vm2", ha.RoleTarget, ha.StateReplicating, func(s *api.JobStatus) { s.Spec.Failover = ha.FailoverManual })},
			level: Protected, src: "vm1", tgt: "vm2", risk: "vm2 takes over when you run doppel failover",
		},
		{
			name: "one path silent",
			sides: []Side{side("vm1", ha.RoleSource, ha.StateReplicating), side("vm2", ha.RoleTarget, ha.StateReplicating, func(s *api.JobStatus) {
				s.HA.Paths[1].Up = false
			})},
			level: Degraded, reason: "vm2 does not hear vm1 on path app", src: "vm1", tgt: "vm2",
		},
		{
			name:  "arbiter: the failover waits for the lease",
			sides: []Side{side("vm1", ha.RoleSource, ha.StateReplicating, withArbiter(true)), side("vm2", ha.RoleTarget, ha.StateReplicating, withArbiter(false))},
			level: Protected, src: "vm1", tgt: "vm2", risk: "vm2 takes over in ~5s (automatic)",
		},
		{
			name:  "arbiter unreachable, sync and replicating: writes go on, no failover",
			sides: []Side{side("vm1", ha.RoleSource, ha.StateReplicating, withArbiter(false)), side("vm2", ha.RoleTarget, ha.StateReplicating, withArbiter(false))},
			level: Degraded, reason: "vm1 cannot renew its lease on the arbiter", src: "vm1", tgt: "vm2",
		},
		{
			name: "arbiter unreachable, async: writes held",
			sides: []Side{side("vm1", ha.RoleSource, ha.StateReplicating, withArbiter(false), func(s *api.JobStatus) { s.Spec.Mode = job.ModeAsync }),
				side("vm2", ha.RoleTarget, ha.StateReplicating, withArbiter(false))},
			level: Suspended, reason: "writes on vm1 are held", src: "vm1", tgt: "vm2",
		},
		{
			name:  "arbiter unreachable and the target gone, sync: writes held",
			sides: []Side{side("vm1", ha.RoleSource, ha.StateDisconnected, withArbiter(false)), down("vm2", "timeout")},
			level: Suspended, reason: "writes on vm1 are held", src: "vm1", tgt: "vm2",
		},
		{
			name: "target recorded out of sync, link down",
			sides: []Side{side("vm1", ha.RoleSource, ha.StateDisconnected, withArbiter(true), func(s *api.JobStatus) { s.Arbiter.TargetOutOfSync = true }),
				side("vm2", ha.RoleTarget, ha.StateDisconnected, withArbiter(false))},
			level: NotProtected, reason: "vm2 is recorded out of sync", src: "vm1", tgt: "vm2",
		},
		{
			name:  "the target's agent does not answer",
			sides: []Side{side("vm1", ha.RoleSource, ha.StateReplicating), down("vm2", "context deadline exceeded")},
			level: Degraded, reason: "vm2's agent does not answer (context deadline exceeded)", src: "vm1", tgt: "vm2",
			risk: "no host can take over",
		},
		{
			name: "failure detection off on the target",
			sides: []Side{side("vm1", ha.RoleSource, ha.StateReplicating), side("vm2", ha.RoleTarget, ha.StateReplicating, func(s *api.JobStatus) {
				s.Probe.Active, s.Probe.Mode = false, "xdp (unavailable, failure detection suspended: map gone)"
			})},
			level: Degraded, reason: "failure detection is off on vm2", risk: "vm2 takes over when you run doppel failover",
		},
		{
			name: "async target lagging: RPO beyond interval × missed, queue on disk",
			sides: []Side{side("vm1", ha.RoleSource, ha.StateReplicating, func(s *api.JobStatus) {
				s.Data.RPO, s.Data.QueueMemory, s.Data.QueueDisk = 3*time.Second, 128<<20, 64<<20
			}), side("vm2", ha.RoleTarget, ha.StateReplicating)},
			level: Degraded, reason: "vm2 lags: RPO 3s", risk: "lose 192.0 MiB / 3s of writes",
		},
		{
			name:  "dirty bytes left",
			sides: []Side{side("vm1", ha.RoleSource, ha.StateReplicating, func(s *api.JobStatus) { s.Data.DirtyBytes = 65536 }), side("vm2", ha.RoleTarget, ha.StateReplicating)},
			level: Degraded, reason: "64.0 KiB dirty on vm1", risk: "lose 64.0 KiB",
		},
		{
			name: "mirror in progress",
			sides: []Side{side("vm1", ha.RoleSource, ha.StateMirroring, func(s *api.JobStatus) {
				s.HA.Consistent, s.Data.SyncTotal, s.Data.SyncDone, s.Data.BytesRemaining = false, 4<<30, 1<<30, 3<<30
			}), side("vm2", ha.RoleTarget, ha.StateMirroring, func(s *api.JobStatus) { s.HA.Consistent = false })},
			level: NotProtected, reason: "mirror to vm2 in progress: its copy is unusable until it ends (25.0%, 3.0 GiB remaining)",
			src: "vm1", tgt: "vm2", risk: "no host can take over",
		},
		{
			name:  "reverse resync in progress",
			sides: []Side{side("vm2", ha.RoleSource, ha.StateReversing), side("vm1", ha.RoleTarget, ha.StateReversing, func(s *api.JobStatus) { s.HA.Consistent = false })},
			level: NotProtected, reason: "reverse resync to vm1", src: "vm2", tgt: "vm1",
		},
		{
			name:  "paused",
			sides: []Side{side("vm1", ha.RoleSource, ha.StatePaused, func(s *api.JobStatus) { s.Data.DirtyBytes = 1 << 20 }), side("vm2", ha.RoleTarget, ha.StateDisconnected)},
			level: NotProtected, reason: "paused by the operator: writes on vm1 are tracked (1.0 MiB dirty)", advice: "doppel job resume web",
			risk: "lose 1.0 MiB",
		},
		{
			name:  "link down",
			sides: []Side{side("vm1", ha.RoleSource, ha.StateDisconnected), side("vm2", ha.RoleTarget, ha.StateDisconnected)},
			level: NotProtected, reason: "vm1 cannot reach vm2 for replication",
		},
		{
			name:  "restarted source waiting for its peer",
			sides: []Side{side("vm1", ha.RoleSource, ha.StateStarting), down("vm2", "connection refused")},
			level: NotProtected, reason: "vm1 restarted and waits to hear vm2",
		},
		{
			name: "no replication engine",
			sides: []Side{side("vm1", ha.RoleSource, ha.StateReplicating, func(s *api.JobStatus) {
				s.Data = api.DataStatus{RPO: -1, Note: "replication engine not wired"}
			}), side("vm2", ha.RoleTarget, ha.StateReplicating)},
			level: NotProtected, reason: "vm1's replication engine does not answer: replication engine not wired", risk: "writes at risk unknown",
		},
		{
			name:  "switchover in progress",
			sides: []Side{side("vm1", ha.RoleSource, ha.StateSwitchingOver), side("vm2", ha.RoleTarget, ha.StateReplicating)},
			level: Degraded, reason: "switchover to vm2 in progress: writes on vm1 are held", src: "vm1", tgt: "vm2",
		},
		{
			name:  "handed over, the peer not yet source",
			sides: []Side{side("vm1", ha.RoleTarget, ha.StateHandingOver), side("vm2", ha.RoleTarget, ha.StateReplicating)},
			level: NotProtected, reason: "vm1 handed over and waits for vm2",
		},
		{
			name: "failed over, old source back and fenced: reverse",
			sides: []Side{side("vm1", ha.RoleSource, ha.StateSuperseded, func(s *api.JobStatus) { s.HA.Epoch = 3 }),
				side("vm2", ha.RoleSource, ha.StateFailedOver, func(s *api.JobStatus) { s.HA.Epoch = 4 })},
			level: FailedOver, reason: "vm2 took over at epoch 4", src: "vm2", tgt: "vm1", advice: "doppel reverse web",
			risk: "no host can take over",
		},
		{
			name: "failover to a snapshot whose rollback failed: not served, retry",
			sides: []Side{side("vm1", ha.RoleSource, ha.StateSuperseded), side("vm2", ha.RoleSource, ha.StateRollingBack, func(s *api.JobStatus) {
				s.HA.RollingBack = "s1"
				s.HA.Reason = "the rollback to snapshot s1 failed: write volume: input/output error; the volume is NOT served"
			})},
			level: NotProtected, reason: "no host serves the volume: the rollback to snapshot s1 failed", src: "vm2", tgt: "vm1",
			advice: "doppel failover web --snapshot s1   # vm2 redoes the rollback",
		},
		{
			name:  "failed over, old source unreachable: no command would succeed",
			sides: []Side{down("vm1", "connection refused"), side("vm2", ha.RoleSource, ha.StateFailedOver)},
			level: FailedOver, reason: "vm1 is unreachable: start its agent, it comes back fenced", src: "vm2", tgt: "vm1",
		},
		{
			name: "source down, manual mode: failover",
			sides: []Side{down("vm1", "no route to host"), side("vm2", ha.RoleTarget, ha.StateSourceDown, func(s *api.JobStatus) {
				s.HA.Reason = "source vm1 is down: run doppel failover"
			})},
			level: NotProtected, reason: "no host serves the volume: source vm1 is down", advice: "doppel failover web   #",
		},
		{
			name: "source down, target inconsistent: only a forced failover",
			sides: []Side{down("vm1", "no route to host"), side("vm2", ha.RoleTarget, ha.StateSourceDown, func(s *api.JobStatus) {
				s.HA.Consistent = false
			})},
			level: NotProtected, advice: "doppel failover web --force",
		},
		{
			name: "split brain",
			sides: []Side{side("vm1", ha.RoleSource, ha.StateSplitBrain, func(s *api.JobStatus) { s.HA.Reason = "split brain: vm1 and vm2 both claim source at epoch 3" }),
				side("vm2", ha.RoleSource, ha.StateReplicating)},
			level: NotProtected, reason: "split brain",
		},
		{
			name:  "nobody answers",
			sides: []Side{down("vm1", "timeout"), down("vm2", "timeout")},
			level: Unreachable, reason: "no agent of the job answered: vm1: timeout; vm2: timeout",
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			v := Assess(tc.sides)
			if v.Level != tc.level || !strings.Contains(v.Reason, tc.reason) {
				t.Fatalf("got %s: %s\nwant %s: ...%s...", v.Level, v.Reason, tc.level, tc.reason)
			}
			if v.ExitCode != tc.level.ExitCode() {
				t.Errorf("exit code %d for %s", v.ExitCode, v.Level)
			}
			if tc.src != "" && (v.Source != tc.src || v.Target != tc.tgt) {
				t.Errorf("direction %s -> %s, want %s -> %s", v.Source, v.Target, tc.src, tc.tgt)
			}
			switch {
			case tc.advice == "" && len(v.Advice) > 0:
				t.Errorf("advice %q, want none", v.Advice)
			case tc.advice != "" && (len(v.Advice) == 0 || !strings.HasPrefix(v.Advice[0], tc.advice)):
				t.Errorf("advice %q, want %q...", v.Advice, tc.advice)
			}
			if !strings.Contains(v.RiskLine(), tc.risk) {
				t.Errorf("risk line %q lacks %q", v.RiskLine(), tc.risk)
			}
		})
	}
}

func TestExitCodes(t *testing.T) {
	for l, want := range map[Level]int{Protected: 0, Degraded: 1, NotProtected: 2, FailedOver: 2, Unreachable: 3} {
		if got := l.ExitCode(); got != want {
			t.Errorf("%s: exit %d, want %d", l, got, want)
		}
	}
}
