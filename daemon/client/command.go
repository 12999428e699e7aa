package client

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/doppelha/doppel/daemon/api"
	"github.com/doppelha/doppel/daemon/ha"
)

// A Picker chooses, among a job's sides, the server a command must go to.
type Picker func(sides []Side) (server string, err error)

// ActiveSource picks the side that serves the job (role source, not
// fenced): pause, resume, verify, switchover, failback, freeze.
func ActiveSource(sides []Side) (string, error) {
	for _, s := range sides {
		if s.Status != nil && s.Status.HA.Role == ha.RoleSource && s.Status.HA.State != ha.StateSuperseded {
			return s.Server, nil
		}
	}
	return "", unreachable(sides, "the job's active source")
}

// ForFailover picks the side whose failover to a snapshot is still
// rolling its volume back (a retry finishes it), else the job's target;
// when no side is a target any more, the failed-over side (whose state
// machine refuses a second failover with the reason).
func ForFailover(sides []Side) (string, error) {
	for _, s := range sides {
		if s.Status != nil && s.Status.HA.State == ha.StateRollingBack {
			return s.Server, nil
		}
	}
	for _, s := range sides {
		if s.Status != nil && s.Status.HA.Role == ha.RoleTarget {
			return s.Server, nil
		}
	}
	for _, s := range sides {
		if s.Status != nil && s.Status.HA.State == ha.StateFailedOver {
			return s.Server, nil
		}
	}
	return "", unreachable(sides, "the job's target (a failover runs there)")
}

// ForReverse picks the failed-over side, else the active source (whose
// state machine says why a reverse does not apply).
func ForReverse(sides []Side) (string, error) {
	for _, s := range sides {
		if s.Status != nil && s.Status.HA.State == ha.StateFailedOver {
			return s.Server, nil
		}
	}
	return ActiveSource(sides)
}

// Target picks the job's target (where snapshots live), or the side
// whose failover to a snapshot is still rolling back (its snapshots are
// what a retry chooses from).
func Target(sides []Side) (string, error) {
	for _, s := range sides {
		if s.Status != nil && s.Status.HA.Role == ha.RoleTarget {
			return s.Server, nil
		}
	}
	for _, s := range sides {
		if s.Status != nil && s.Status.HA.State == ha.StateRollingBack {
			return s.Server, nil
		}
	}
	return "", unreachable(sides, "the job's target (snapshots live there)")
}

func unreachable(sides []Side, what string) error {
	var parts []string
	for _, s := range sides {
		if s.Status == nil {
			parts = append(parts, fmt.Sprintf("%s: %s", s.Server, s.Err))
		} else {
			parts = append(parts, fmt.Sprintf("%s: %s %s", s.Server, s.Status.HA.Role, s.Status.HA.State))
		}
	}
	return errors.New("cannot reach " + what + " (" + strings.Join(parts, "; ") + ")")
}

// Pick returns the server a command about job name goes to, and its
// client: Only when the fleet has one, else the side pick chooses.
func (f *Fleet) Pick(ctx context.Context, name string, pick Picker) (string, *api.Client, error) {
	server := f.only
	if server == "" {
		sides, err := f.FindJob(ctx, name)
		if err != nil {
			return "", nil, err
		}
		if server, err = pick(sides); err != nil {
			return "", nil, err
		}
	}
	cl, err := f.Client(server)
	return server, cl, err
}

// CommandTimeout bounds an operator command (a failover waits for its
// actions and, with an arbiter, for the promotion).
const CommandTimeout = 2 * time.Minute

// Command runs an operator command about job name on the server that
// must act (Pick), for at most CommandTimeout. It returns that server and
// the job's status there; on an error the status still lists the actions
// that ran.
func (f *Fleet) Command(ctx context.Context, name string, cmd ha.EventType, opts api.CommandOptions, pick Picker) (string, api.JobStatus, error) {
	server, cl, err := f.Pick(ctx, name, pick)
	if err != nil {
		return "", api.JobStatus{}, err
	}
	ctx, cancel := context.WithTimeout(ctx, CommandTimeout)
	defer cancel()
	st, err := cl.Command(ctx, name, cmd, opts)
	if err != nil {
		return server, st, fmt.Errorf("%s on %s: %w", cmd, server, err)
	}
	return server, st, nil
}

// WaitSwitchover follows a switchover (or failback) of job name away from
// the server from until the other side is the replicating source, asking
// every server (not only Only), until ctx ends. It returns that side; it
// fails with the switchover's own abort when from reports one.
func (f *Fleet) WaitSwitchover(ctx context.Context, name string, cmd ha.EventType, from string) (Side, error) {
	for {
		sides, err := f.findJob(ctx, name, f.all())
		if err == nil {
			for _, s := range sides {
				st := s.Status
				if st == nil {
					continue
				}
				if s.Server != from && st.HA.Role == ha.RoleSource && st.HA.State == ha.StateReplicating {
					return s, nil
				}
				if s.Server == from && st.HA.Role == ha.RoleSource && st.HA.State != ha.StateSwitchingOver && st.HA.State != ha.StateFailingBack && st.HA.LastError != "" {
					return Side{}, fmt.Errorf("%s %s: %s", cmd, name, st.HA.LastError)
				}
			}
		}
		select {
		case <-ctx.Done():
			return Side{}, ctx.Err()
		case <-time.After(250 * time.Millisecond):
		}
	}
}
