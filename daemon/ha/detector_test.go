package ha

import (
	"errors"
	"strings"
	"testing"
)

// TestExternalDetector: with ExternalDetector the node never declares the
// source down from its own tick count; the detector's verdicts decide, a
// single heartbeat does not end source-down (the detector's rise
// hysteresis does), and the manual failover's "still heard" refusal
// follows the detector.
func TestExternalDetector(t *testing.T) {
	c := testConfig("vm2")
	c.Failover = FailoverManual
	c.ExternalDetector = true
	n, err := NewNode(c, HardState{Role: RoleTarget, Epoch: 1, Consistent: true})
	if err != nil {
		t.Fatal(err)
	}
	n.Step(Event{Type: EvStart})
	for range 10 * c.Missed {
		n.Tick()
		if st := n.Status(); st.State == StateSourceDown || st.TicksToFail != -1 {
			t.Fatalf("silent ticks decided: state %s, ticks to fail %d", st.State, st.TicksToFail)
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

	// Without an external detector the verdicts are refused.
	c.ExternalDetector = false
	n, _ = NewNode(c, HardState{Role: RoleTarget, Epoch: 1, Consistent: true})
	n.Step(Event{Type: EvStart})
	if err := n.Step(Event{Type: EvPeerDown}); err == nil {
		t.Fatal("peer-down accepted without an external detector")
	}
}

// TestWitnessVote: with a witness, the detector's peer-down alone does not
// fail over in auto mode; the witness losing the source too does.
func TestWitnessVote(t *testing.T) {
	c := testConfig("vm2")
	c.ExternalDetector, c.Witness = true, true
	n, _ := NewNode(c, HardState{Role: RoleTarget, Epoch: 1, Consistent: true})
	n.Step(Event{Type: EvStart})
	n.Step(Event{Type: EvPeerDown})
	if st := n.Status(); st.State != StateSourceDown || !strings.Contains(st.Reason, "witness") {
		t.Fatalf("peer-down without the witness: %s %q", st.State, st.Reason)
	}
	n.Step(Event{Type: EvWitness, WitnessLost: false, Err: "the witness heard it 200ms ago"})
	if st := n.Status(); st.State != StateSourceDown || !strings.Contains(st.Reason, "heard it 200ms ago") {
		t.Fatalf("witness still hears: %s %q", st.State, st.Reason)
	}
	n.Step(Event{Type: EvWitness, WitnessLost: true})
	if st := n.Status(); st.State != StateFailedOver {
		t.Fatalf("witness lost it too: %s %q", st.State, st.Reason)
	}
	// The witness's earlier verdict does not carry over a peer-up.
	n, _ = NewNode(c, HardState{Role: RoleTarget, Epoch: 1, Consistent: true})
	n.Step(Event{Type: EvStart})
	n.Step(Event{Type: EvPeerDown})
	n.Step(Event{Type: EvPeerUp, Path: "repl"})
	n.Step(Event{Type: EvPeerDown})
	if st := n.Status(); st.State != StateSourceDown {
		t.Fatalf("second peer-down: %s", st.State)
	}
	c.Witness = false
	n, _ = NewNode(c, HardState{Role: RoleTarget, Epoch: 1, Consistent: true})
	n.Step(Event{Type: EvStart})
	if err := n.Step(Event{Type: EvWitness, WitnessLost: true}); err == nil {
		t.Fatal("witness event accepted without a witness")
	}
}
