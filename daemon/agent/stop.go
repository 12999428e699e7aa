package agent

import (
	"context"
	"fmt"
	"sort"
	"strings"
	"time"

	"github.com/doppelha/doppel/daemon/api"
)

// Stopping the agent takes every served volume away from its users: a
// stop is refused while any job's volume is in use (NBD clients connected
// to its export, its /dev/nbdN mounted or held open), unless forced.
//
// SIGTERM (systemctl stop) is a stop that waits: the agent keeps serving,
// logs who uses which volume, and stops as soon as nobody does. A second
// SIGTERM or SIGINT, or doppel agent stop --force, stops it at once.

// usersWaitLog is how often a waiting stop says what it waits for.
const usersWaitLog = 10 * time.Second

// Users maps each job whose volume is in use on this host to its users.
func (a *Agent) Users() map[string][]string {
	a.mu.Lock()
	names := make([]string, 0, len(a.jobs))
	for n := range a.jobs {
		names = append(names, n)
	}
	a.mu.Unlock()
	out := map[string][]string{}
	for _, n := range names {
		if u := a.inUse(n); len(u) > 0 {
			out[n] = u
		}
	}
	return out
}

func describeUsers(users map[string][]string) string {
	names := make([]string, 0, len(users))
	for n := range users {
		names = append(names, n)
	}
	sort.Strings(names)
	var parts []string
	for _, n := range names {
		parts = append(parts, fmt.Sprintf("job %s: %s", n, strings.Join(users[n], ", ")))
	}
	return strings.Join(parts, "; ")
}

// StopAgent implements api.Agent: the agent stops (its jobs stop, their
// volumes are no longer served), refused while a volume is in use unless
// opts.Force.
func (a *Agent) StopAgent(ctx context.Context, opts api.StopOptions) (api.StopResult, error) {
	if a.restarting.Load() {
		return api.StopResult{}, fmt.Errorf("%w: retry in a moment", api.ErrRestarting)
	}
	users := a.Users()
	if len(users) > 0 && !opts.Force {
		return api.StopResult{}, fmt.Errorf("%w: not stopping the agent on %s: %s. Stop the applications (unmount) first, or stop with --force: they lose their disks",
			api.ErrInUse, a.Hostname, describeUsers(users))
	}
	if len(users) > 0 {
		a.Log.Warn("agent stop forced while volumes are in use: their users lose their disks", "users", describeUsers(users))
	}
	a.Log.Info("agent stop requested", "force", opts.Force)
	a.requestStop()
	return api.StopResult{Message: "stopping"}, nil
}

// Shutdown is SIGTERM: with force, or when no volume is in use, the
// agent stops now. Otherwise it keeps serving, logs who uses which
// volume, and stops as soon as nobody does. It returns at once.
func (a *Agent) Shutdown(force bool) {
	users := a.Users()
	if force || len(users) == 0 {
		if len(users) > 0 {
			a.Log.Warn("agent stop forced while volumes are in use: their users lose their disks", "users", describeUsers(users))
		}
		a.requestStop()
		return
	}
	a.Log.Error("refusing to stop while volumes are in use: serving on, stopping once they are released. "+
		"Stop the applications (unmount) first; a second SIGTERM, or doppel agent stop --force, stops now and they lose their disks",
		"users", describeUsers(users))
	a.waitMu.Lock()
	defer a.waitMu.Unlock()
	if a.waiting {
		return
	}
	a.waiting = true
	go func() {
		t := time.NewTicker(time.Second)
		defer t.Stop()
		last := time.Now()
		for {
			select {
			case <-a.stopc:
				return
			case <-t.C:
			}
			users := a.Users()
			if len(users) == 0 {
				a.Log.Info("volumes released: stopping")
				a.requestStop()
				return
			}
			if time.Since(last) >= usersWaitLog {
				last = time.Now()
				a.Log.Warn("stop waits: volumes still in use", "users", describeUsers(users))
			}
		}
	}()
}

func (a *Agent) requestStop() { a.stopOnce.Do(func() { close(a.stopc) }) }
