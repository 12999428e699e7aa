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
