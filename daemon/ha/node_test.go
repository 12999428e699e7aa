package ha

import (
	"errors"
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
	const want = "run-script pre-failover; stop-target apply-queue; rollback to s1; promote epoch=2; serve; apply-identity; run-script post-failover"
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
		if hs := n.HardState(); hs.Role != RoleSource || hs.Epoch != 2 || !hs.Consistent || !hs.FailedOver {
			t.Fatalf("hard state after the failover: %+v", hs)
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
