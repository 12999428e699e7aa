package ha

import (
	"errors"
	"fmt"
	"strings"
	"testing"
)

func testConfig(self string) Config {
	peer := "vm2"
	if self == "vm2" {
		peer = "vm1"
	}
	return Config{Job: "web", Self: self, Peer: peer, Home: "vm1", Failover: FailoverAuto, Paths: []string{"repl"}, Missed: 3}
}

func TestNewNodeValidates(t *testing.T) {
	good := testConfig("vm1")
	for name, mut := range map[string]func(*Config){
		"same names": func(c *Config) { c.Peer = c.Self },
		"bad home":   func(c *Config) { c.Home = "vm3" },
		"bad mode":   func(c *Config) { c.Failover = "sometimes" },
		"no paths":   func(c *Config) { c.Paths = nil },
		"missed 0":   func(c *Config) { c.Missed = 0 },
	} {
		c := good
		mut(&c)
		if _, err := NewNode(c, Initial(c)); err == nil {
			t.Errorf("%s: NewNode accepted %+v", name, c)
		}
	}
	if _, err := NewNode(good, HardState{}); err == nil {
		t.Error("NewNode accepted a zero hard state")
	}
}

// TestSplitBrainEqualEpochs: two sources at the same epoch is reported, and
// neither node changes what it serves.
func TestSplitBrainEqualEpochs(t *testing.T) {
	n, err := NewNode(testConfig("vm1"), HardState{Role: RoleSource, Epoch: 2, Consistent: true})
	if err != nil {
		t.Fatal(err)
	}
	n.Step(Event{Type: EvStart})
	n.Step(Event{Type: EvMessage, Msg: &Message{Type: MsgHello, From: "vm2", To: "vm1", Role: RoleTarget, Epoch: 2}})
	n.Ready()
	n.Step(Event{Type: EvMessage, Msg: &Message{Type: MsgHello, From: "vm2", To: "vm1", Role: RoleSource, Epoch: 2}})
	st := n.Status()
	if st.State != StateSplitBrain || !strings.Contains(st.Reason, "split brain") {
		t.Fatalf("state %s reason %q, want split-brain", st.State, st.Reason)
	}
	for _, a := range n.Ready().Actions {
		if a.Type == ActStopServe || a.Type == ActReleaseIdentity {
			t.Errorf("split brain resolved silently by %s", a)
		}
	}
}

// TestRefusalChangesNothing: a refused command leaves state and Ready alone.
func TestRefusalChangesNothing(t *testing.T) {
	n, _ := NewNode(testConfig("vm2"), HardState{Role: RoleTarget, Epoch: 1})
	n.Step(Event{Type: EvStart})
	n.Ready()
	before := n.Status()
	err := n.Step(Event{Type: CmdFailover})
	if !errors.Is(err, ErrInconsistent) || !IsRefused(err) {
		t.Fatalf("failover of inconsistent target: %v, want ErrInconsistent", err)
	}
	if n.HasReady() {
		t.Fatalf("refused command produced %+v", n.Ready())
	}
	if after := n.Status(); after.State != before.State || after.Role != before.Role {
		t.Fatalf("refused command changed state %v -> %v", before, after)
	}
	if err := n.Step(Event{Type: EvMessage, Msg: &Message{Type: MsgHello, From: "vm3", To: "vm2", Role: RoleSource, Epoch: 9}}); err != nil {
		t.Fatal(err)
	}
	if n.HardState().Epoch != 1 || n.Status().LastError == "" {
		t.Fatalf("message from a stranger was acted on: %v", n.HardState())
	}
}

// actionList renders Ready's actions, in order.
func actionList(n *Node) string {
	var s []string
	for _, a := range n.Ready().Actions {
		s = append(s, a.String())
	}
	return strings.Join(s, "; ")
}

// TestFailoverToSnapshot: a failover to a snapshot is allowed on an
// inconsistent target (the snapshot is a consistent image), rolls the
// volume back after the applier stopped and before the promotion, and
// leaves the promoted copy consistent. With an arbiter nothing is rolled
// back before the arbiter grants the epoch; a refused promotion rolls
// nothing back and a later failover does not inherit the snapshot.
func TestFailoverToSnapshot(t *testing.T) {
	const want = "run-script pre-failover; stop-target apply-queue; rollback to s1"
	const after = "promote epoch=2; serve; apply-identity; run-script post-failover"
	t.Run("no arbiter", func(t *testing.T) {
		cfg := testConfig("vm2")
		cfg.Failover = FailoverManual
		n, _ := NewNode(cfg, HardState{Role: RoleTarget, Epoch: 1})
		n.Step(Event{Type: EvStart})
		for range 3 {
			n.Tick()
		}
		n.Step(Event{Type: EvPeerDown})
		n.Ready()
		if err := n.Step(Event{Type: CmdFailover}); !errors.Is(err, ErrInconsistent) {
			t.Fatalf("plain failover of an inconsistent target: %v, want ErrInconsistent", err)
		}
		if err := n.Step(Event{Type: CmdFailover, Snapshot: "s1"}); err != nil {
			t.Fatalf("failover --snapshot: %v", err)
		}
		if got := actionList(n); got != want {
			t.Fatalf("actions\n got %s\nwant %s", got, want)
		}
		if hs := n.HardState(); hs.Role != RoleSource || hs.Epoch != 2 || !hs.Consistent || !hs.FailedOver || hs.RollingBack != "s1" {
			t.Fatalf("hard state after the failover: %+v", hs)
		}
		n.Step(Event{Type: EvRolledBack, Snapshot: "s1"})
		if got := actionList(n); got != after {
			t.Fatalf("actions after the rollback\n got %s\nwant %s", got, after)
		}
		if hs, st := n.HardState(), n.Status(); hs.RollingBack != "" || st.State != StateFailedOver {
			t.Fatalf("after the rollback: %+v %s", hs, st.State)
		}
	})
	t.Run("arbiter", func(t *testing.T) {
		cfg := testConfig("vm2")
		cfg.Failover = FailoverManual
		cfg.Arbiter = true
		n, _ := NewNode(cfg, HardState{Role: RoleTarget, Epoch: 1, Consistent: true})
		n.Step(Event{Type: EvStart})
		for range 3 {
			n.Tick()
		}
		n.Step(Event{Type: EvPeerDown})
		n.Ready()
		if err := n.Step(Event{Type: CmdFailover, Snapshot: "s1"}); err != nil {
			t.Fatalf("failover --snapshot: %v", err)
		}
		if got := actionList(n); got != "campaign epoch=2" {
			t.Fatalf("before the arbiter's answer: %s, want only the campaign", got)
		}
		n.Step(Event{Type: EvPromotion, Epoch: 2, Err: "the key is held", Final: true})
		if got := actionList(n); strings.Contains(got, "rollback") || strings.Contains(got, "promote") {
			t.Fatalf("refused promotion acted: %s", got)
		}
		if err := n.Step(Event{Type: CmdFailover, Snapshot: "s1"}); err != nil {
			t.Fatalf("failover --snapshot again: %v", err)
		}
		n.Ready()
		n.Step(Event{Type: EvPromotion, Epoch: 2, Final: true})
		if got := actionList(n); got != want {
			t.Fatalf("after the grant\n got %s\nwant %s", got, want)
		}
		n.Step(Event{Type: EvRolledBack, Snapshot: "s1"})
		if got := actionList(n); got != after {
			t.Fatalf("after the rollback\n got %s\nwant %s", got, after)
		}
	})
	t.Run("later failover forgets it", func(t *testing.T) {
		cfg := testConfig("vm2")
		cfg.Failover = FailoverManual
		cfg.Arbiter = true
		n, _ := NewNode(cfg, HardState{Role: RoleTarget, Epoch: 1, Consistent: true})
		n.Step(Event{Type: EvStart})
		for range 3 {
			n.Tick()
		}
		n.Step(Event{Type: EvPeerDown})
		n.Ready()
		n.Step(Event{Type: CmdFailover, Snapshot: "s1"})
		n.Ready()
		n.Step(Event{Type: EvPromotion, Epoch: 2, Err: "refused", Final: true})
		n.Ready()
		n.Step(Event{Type: CmdFailover})
		n.Ready()
		n.Step(Event{Type: EvPromotion, Epoch: 2, Final: true})
		if got := actionList(n); strings.Contains(got, "rollback") {
			t.Fatalf("a plain failover rolled back: %s", got)
		}
	})
}

// TestRollbackPending: a failover to a snapshot whose rollback fails, or
// is interrupted by a restart, neither promotes nor serves the volume
// (it holds part of the snapshot and part of the newer data): the state
// says so and what to do, a plain failover is refused, the failover to
// the snapshot again redoes only the rollback, and a node restarted
// from the persisted state redoes the rollback first, promotes once it
// completed, and serves only after the start grace like any restarted
// source, running the failover's post-failover hook then.
func TestRollbackPending(t *testing.T) {
	cfg := testConfig("vm2")
	cfg.Failover = FailoverManual
	n, _ := NewNode(cfg, HardState{Role: RoleTarget, Epoch: 1, Consistent: true})
	n.Step(Event{Type: EvStart})
	for range 3 {
		n.Tick()
	}
	n.Step(Event{Type: EvPeerDown})
	n.Ready()
	if err := n.Step(Event{Type: CmdFailover, Snapshot: "s1"}); err != nil {
		t.Fatal(err)
	}
	rd := n.Ready()
	if !rd.MustPersist || rd.HardState.RollingBack != "s1" || rd.HardState.Epoch != 2 {
		t.Fatalf("the rollback is not persisted as pending with the epoch before it starts: %+v", rd)
	}
	persisted := rd.HardState
	n.Step(Event{Type: EvActionFailed, Action: ActRollback, Err: "rollback to s1: write volume: input/output error"})
	st := n.Status()
	if st.State != StateRollingBack || !strings.Contains(st.Reason, "NOT served") || !strings.Contains(st.Reason, "doppel failover web --snapshot s1") {
		t.Fatalf("after a failed rollback: %s %q", st.State, st.Reason)
	}
	if got := actionList(n); got != "" {
		t.Fatalf("a failed rollback acted: %s", got)
	}
	for range 3 * cfg.Missed {
		n.Tick()
	}
	n.Step(Event{Type: EvLease, Held: true})
	if got := actionList(n); got != "" {
		t.Fatalf("a pending rollback acted on ticks or the lease: %s", got)
	}
	if err := n.Step(Event{Type: CmdFailover}); !errors.Is(err, ErrBadState) || !strings.Contains(err.Error(), "--snapshot s1") {
		t.Fatalf("plain failover with a rollback pending: %v", err)
	}
	if err := n.Step(Event{Type: CmdFailover, Snapshot: "s1"}); err != nil {
		t.Fatalf("failover --snapshot s1 again: %v", err)
	}
	if got := actionList(n); got != "rollback to s1" {
		t.Fatalf("the retry: %s, want only the rollback", got)
	}

	// The agent is killed during the retry: restart from the persisted
	// state.
	n, _ = NewNode(cfg, persisted)
	n.Step(Event{Type: EvStart})
	if got := actionList(n); got != "rollback to s1" {
		t.Fatalf("restart with a rollback pending: %s, want only the rollback", got)
	}
	if st := n.Status(); st.State != StateRollingBack {
		t.Fatalf("restart with a rollback pending: state %s", st.State)
	}
	n.Step(Event{Type: EvActionFailed, Action: ActRollback, Err: "still failing"})
	for range 3 * cfg.Missed {
		n.Tick()
	}
	if got := actionList(n); got != "" {
		t.Fatalf("restarted, the rollback failed again, and it acted: %s", got)
	}
	n.Step(Event{Type: CmdFailover, Snapshot: "s1"})
	n.Ready()
	n.Step(Event{Type: EvRolledBack, Snapshot: "s1"})
	rd = n.Ready()
	if rd.HardState.RollingBack != "" || !rd.MustPersist {
		t.Fatalf("the marker is not cleared durably: %+v", rd)
	}
	if got := fmt.Sprint(rd.Actions); got != "[promote epoch=2]" {
		t.Fatalf("after the rollback on a restarted node: %s, want the promotion only", got)
	}
	if st := n.Status(); st.State != StateStarting {
		t.Fatalf("after the rollback on a restarted node: %s, want starting", st.State)
	}
	for range 2 * cfg.Missed {
		n.Tick()
	}
	if got := actionList(n); !strings.HasPrefix(got, "serve; apply-identity; run-script post-failover") {
		t.Fatalf("after the start grace: %s, want it served and the failover's post-failover hook run", got)
	}
}
