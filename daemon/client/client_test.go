package client

import (
	"errors"
	"path/filepath"
	"strings"
	"testing"

	"github.com/doppelha/doppel/daemon/api"
	"github.com/doppelha/doppel/daemon/ha"
	"github.com/doppelha/doppel/daemon/job"
)

func side(server string, role ha.Role, state ha.State) Side {
	return Side{Server: server, Status: &api.JobStatus{HA: ha.Status{Role: role, State: state}}}
}

// TestPickers: each command goes to the side that must act, and says
// what it could not reach otherwise.
func TestPickers(t *testing.T) {
	down := Side{Server: "vm1", Err: "connection refused"}
	for _, tc := range []struct {
		name  string
		pick  Picker
		sides []Side
		want  string // server, or the start of the error
	}{
		{"active source", ActiveSource, []Side{side("vm1", ha.RoleSource, ha.StateReplicating), side("vm2", ha.RoleTarget, ha.StateReplicating)}, "vm1"},
		{"fenced source is not active", ActiveSource, []Side{side("vm1", ha.RoleSource, ha.StateSuperseded), side("vm2", ha.RoleSource, ha.StateFailedOver)}, "vm2"},
		{"no active source", ActiveSource, []Side{down, side("vm2", ha.RoleTarget, ha.StateDisconnected)}, "cannot reach the job's active source (vm1: connection refused; vm2: target"},
		{"failover on the target", ForFailover, []Side{down, side("vm2", ha.RoleTarget, ha.StateDisconnected)}, "vm2"},
		{"failover retried on the side rolling back", ForFailover, []Side{side("vm1", ha.RoleSource, ha.StateSuperseded), side("vm2", ha.RoleSource, ha.StateRollingBack)}, "vm2"},
		{"snapshots of the side rolling back", Target, []Side{side("vm1", ha.RoleSource, ha.StateSuperseded), side("vm2", ha.RoleSource, ha.StateRollingBack)}, "vm2"},
		{"failover again on the failed-over side", ForFailover, []Side{down, side("vm2", ha.RoleSource, ha.StateFailedOver)}, "vm2"},
		{"reverse on the failed-over side", ForReverse, []Side{side("vm1", ha.RoleSource, ha.StateSuperseded), side("vm2", ha.RoleSource, ha.StateFailedOver)}, "vm2"},
		{"reverse elsewhere goes to the source", ForReverse, []Side{side("vm1", ha.RoleSource, ha.StateReplicating), side("vm2", ha.RoleTarget, ha.StateReplicating)}, "vm1"},
		{"snapshots on the target", Target, []Side{side("vm1", ha.RoleSource, ha.StateReplicating), side("vm2", ha.RoleTarget, ha.StateReplicating)}, "vm2"},
		{"no target", Target, []Side{side("vm1", ha.RoleSource, ha.StateFailedOver), down}, "cannot reach the job's target"},
	} {
		got, err := tc.pick(tc.sides)
		if err != nil {
			got = err.Error()
		}
		if !strings.HasPrefix(got, tc.want) {
			t.Errorf("%s: got %q, want %q", tc.name, got, tc.want)
		}
	}
}

// TestJobSides: the two sides in spec order whatever answered first, a
// side that did not answer says why, and a side outside --server says
// it was not asked.
func TestJobSides(t *testing.T) {
	spec := job.Spec{Source: job.Endpoint{Name: "vm1"}, Target: job.Endpoint{Name: "vm2"}}
	tgt := side("vm2", ha.RoleTarget, ha.StateReplicating)
	got := jobSides(spec, []Side{tgt}, []Side{{Server: "vm1", Err: "timeout"}}, "")
	if len(got) != 2 || got[0].Server != "vm1" || got[0].Err != "timeout" || got[1].Status == nil {
		t.Fatalf("sides: %+v", got)
	}
	got = jobSides(spec, []Side{tgt}, nil, "vm2")
	if got[0].Err != "not asked (--server vm2)" {
		t.Fatalf("side outside --server: %+v", got[0])
	}
	got = jobSides(spec, []Side{tgt}, nil, "")
	if got[0].Err != "not in this CLI's servers" {
		t.Fatalf("side not configured: %+v", got[0])
	}
}

// TestPreflightErrorLists every problem with its server, in one error.
func TestPreflightErrorLists(t *testing.T) {
	err := error(&PreflightError{Job: "web", Problems: []Problem{
		{Server: "vm1", Problem: api.Problem{Check: "volume", Message: "missing"}},
		{Server: "vm2", Problem: api.Problem{Check: "size", Message: "smaller"}},
	}})
	var pe *PreflightError
	if !errors.As(err, &pe) || len(pe.Problems) != 2 {
		t.Fatalf("not a PreflightError: %v", err)
	}
	msg := err.Error()
	if !strings.HasPrefix(msg, "job web not created: 2 problem(s), nothing was changed:\n  vm1 ") || !strings.Contains(msg, "\n  vm2 ") {
		t.Fatalf("message: %q", msg)
	}
}

// TestFleetOptions: a fleet needs servers, --server must name one, and
// Servers is --server or all.
func TestFleetOptions(t *testing.T) {
	cfg, err := LoadConfig(filepath.Join(t.TempDir(), "config.json"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := New(cfg, Options{}); err == nil || !strings.Contains(err.Error(), "no servers configured") {
		t.Fatalf("empty config: %v", err)
	}
	cfg.Put(Server{Name: "vm1", Addr: "127.0.0.1:6320"})
	cfg.Put(Server{Name: "vm2", Addr: "127.0.0.2:6320"})
	if _, err := New(cfg, Options{Only: "vm3"}); !errors.Is(err, ErrUnknownServer) {
		t.Fatalf("unknown --server: %v", err)
	}
	f, err := New(cfg, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if got := f.Servers(); len(got) != 2 || f.Timeout() != DefaultTimeout {
		t.Fatalf("servers %v, timeout %v", got, f.Timeout())
	}
	f, _ = New(cfg, Options{Only: "vm2"})
	if got := f.Servers(); len(got) != 1 || got[0] != "vm2" {
		t.Fatalf("servers with --server vm2: %v", got)
	}
}
