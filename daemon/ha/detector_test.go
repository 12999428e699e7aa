package ha

import (
	"errors"
	"strings"
	"testing"
)

// TestDetectorVerdicts: the node never declares the source down from its
// own tick count; the detector's verdicts decide, a single heartbeat does
// not end source-down (the detector's rise hysteresis does), and the
// manual failover's "still heard" refusal follows the detector.
func TestDetectorVerdicts(t *testing.T) {
	c := testConfig("vm2")
	c.Failover = FailoverManual
	n, err := NewNode(c, HardState{Role: RoleTarget, Epoch: 1, Consistent: true})
	if err != nil {
		t.Fatal(err)
	}
	n.Step(Event{Type: EvStart})
	for range 10 * c.Missed {
		n.Tick()
		if st := n.Status(); st.State == StateSourceDown {
			t.Fatalf("silent ticks decided: state %s", st.State)
		}
	}
	var re *RefusedError
	if err := n.Step(Event{Type: CmdFailover}); !errors.As(err, &re) || !errors.Is(err, ErrSourceAlive) {
		t.Fatalf("failover with the detector saying up: %v", err)
	}
	n.Step(Event{Type: EvPeerDown})
	if st := n.Status(); st.State != StateSourceDown {
		t.Fatalf("after peer-down: %s", st.State)
	}
	n.Step(Event{Type: EvHeartbeat, Path: "repl"})
	if st := n.Status(); st.State != StateSourceDown {
		t.Fatalf("one heartbeat ended source-down: %s", st.State)
	}
	n.Step(Event{Type: EvPeerUp, Path: "repl"})
	if st := n.Status(); st.State == StateSourceDown {
		t.Fatal("peer-up did not end source-down")
	}
	n.Step(Event{Type: EvPeerDown})
	n.Tick() // the last heartbeat's interval ends
	n.Tick()
	if err := n.Step(Event{Type: CmdFailover}); err != nil {
		t.Fatalf("failover with the detector saying down: %v", err)
	}
	if st := n.Status(); st.State != StateFailedOver {
		t.Fatalf("after failover: %s", st.State)
	}

	// Auto mode: the verdict fails over a consistent target at once.
	c.Failover = FailoverAuto
	n, _ = NewNode(c, HardState{Role: RoleTarget, Epoch: 1, Consistent: true})
	n.Step(Event{Type: EvStart})
	n.Step(Event{Type: EvPeerDown})
	if st := n.Status(); st.State != StateFailedOver {
		t.Fatalf("auto: after peer-down: %s", st.State)
	}
}

// TestArbiterCampaign: with an arbiter, the detector's peer-down starts a
// campaign and nothing is served until the arbiter grants an epoch; a
// refusal that may change keeps it going, a final one ends it, the
// source coming back stops it.
func TestArbiterCampaign(t *testing.T) {
	c := testConfig("vm2")
	c.Arbiter = true
	n, _ := NewNode(c, HardState{Role: RoleTarget, Epoch: 3, Consistent: true})
	n.Step(Event{Type: EvStart})
	n.Ready()
	n.Step(Event{Type: EvPeerDown})
	rd := n.Ready()
	if st := n.Status(); st.State != StatePromoting || len(rd.Actions) != 1 || rd.Actions[0].Type != ActCampaign || rd.Actions[0].Epoch != 4 {
		t.Fatalf("peer-down with an arbiter: %s %v", st.State, rd.Actions)
	}
	n.Step(Event{Type: EvPromotion, Err: "the source holds the lease"})
	if st := n.Status(); st.State != StatePromoting || !strings.Contains(st.Reason, "holds the lease") || n.HasReady() {
		t.Fatalf("not final refusal: %s %q", st.State, st.Reason)
	}
	n.Step(Event{Type: EvPromotion, Epoch: 4})
	rd = n.Ready()
	if st := n.Status(); st.State != StateFailedOver || st.Epoch != 4 || rd.HardState.Role != RoleSource {
		t.Fatalf("granted: %s epoch %d", st.State, st.Epoch)
	}
	// A final refusal (out of sync): back to source-down, nothing served.
	n, _ = NewNode(c, HardState{Role: RoleTarget, Epoch: 1, Consistent: true})
	n.Step(Event{Type: EvStart})
	n.Step(Event{Type: EvPeerDown})
	n.Ready()
	n.Step(Event{Type: EvPromotion, Err: "the target is out of sync", Final: true})
	if st := n.Status(); st.State != StateSourceDown || !strings.Contains(st.Reason, "out of sync") || st.Role != RoleTarget || n.HasReady() {
		t.Fatalf("final refusal: %s %q %s", st.State, st.Reason, st.Role)
	}
	// The source comes back during a campaign: stopped.
	n, _ = NewNode(c, HardState{Role: RoleTarget, Epoch: 1, Consistent: true})
	n.Step(Event{Type: EvStart})
	n.Step(Event{Type: EvPeerDown})
	n.Ready()
	n.Step(Event{Type: EvPeerUp, Path: "repl"})
	rd = n.Ready()
	if st := n.Status(); st.State == StatePromoting || len(rd.Actions) != 1 || rd.Actions[0].Type != ActStopCampaign {
		t.Fatalf("peer back during the campaign: %s %v", st.State, rd.Actions)
	}
	// Without an arbiter the answers are refused.
	c.Arbiter = false
	n, _ = NewNode(c, HardState{Role: RoleTarget, Epoch: 1, Consistent: true})
	n.Step(Event{Type: EvStart})
	if err := n.Step(Event{Type: EvPromotion, Epoch: 2}); err == nil {
		t.Fatal("promotion accepted without an arbiter")
	}
}

// TestEpochSeenFences: a source that learns a newer epoch fences itself;
// a target follows it.
func TestEpochSeenFences(t *testing.T) {
	c := testConfig("vm1")
	n, _ := NewNode(c, HardState{Role: RoleSource, Epoch: 2})
	n.Step(Event{Type: EvStart})
	n.Step(Event{Type: EvEpochSeen, Epoch: 2})
	if n.Status().State == StateSuperseded {
		t.Fatal("fenced by its own epoch")
	}
	n.Step(Event{Type: EvEpochSeen, Epoch: 3})
	if st := n.Status(); st.State != StateSuperseded || !n.HardState().Superseded {
		t.Fatalf("source after a newer epoch: %s", st.State)
	}
	t2 := testConfig("vm2")
	m, _ := NewNode(t2, HardState{Role: RoleTarget, Epoch: 2, Consistent: true})
	m.Step(Event{Type: EvStart})
	m.Step(Event{Type: EvEpochSeen, Epoch: 5})
	if m.HardState().Epoch != 5 || m.HardState().Role != RoleTarget {
		t.Fatalf("target after a newer epoch: %s", m.HardState())
	}
}
