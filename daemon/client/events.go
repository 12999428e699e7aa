package client

import (
	"context"
	"fmt"
	"sort"

	"github.com/doppelha/doppel/daemon/api"
)

// ServerEvent is one event of a job's history and the agent that
// recorded it.
type ServerEvent struct {
	Server string `json:"server"`
	api.Event
}

// Events merges the decision histories of job name from the fleet's
// servers (asked in parallel, each for at most Timeout) in time order,
// keeping the last n (0: all). missed lists the servers that did not
// answer and why; it fails when none did.
func (f *Fleet) Events(ctx context.Context, name string, n int) (events []ServerEvent, missed []string, err error) {
	names := f.Servers()
	answers := make([][]api.Event, len(names))
	errs := f.ask(ctx, names, func(ctx context.Context, i int, cl *api.Client) (err error) {
		answers[i], err = cl.Events(ctx, name)
		return err
	})
	found := 0
	for i, s := range names {
		if errs[i] != nil {
			missed = append(missed, fmt.Sprintf("%s: %v", s, errs[i]))
			continue
		}
		found++
		for _, ev := range answers[i] {
			events = append(events, ServerEvent{Server: s, Event: ev})
		}
	}
	if found == 0 {
		return nil, missed, fmt.Errorf("job %s: no server answered with its events: %v", name, missed)
	}
	sort.SliceStable(events, func(i, j int) bool { return events[i].Time.Before(events[j].Time) })
	if n > 0 && len(events) > n {
		events = events[len(events)-n:]
	}
	return events, missed, nil
}
