package main

import (
	"context"
	"fmt"
	"sort"
	"sync"

	"github.com/doppelha/doppel/daemon/api"
	"github.com/urfave/cli/v2"
)

// jobEventsCommand is doppel job events: the decision history of a job.
func jobEventsCommand() *cli.Command {
	return &cli.Command{
		Name:      "events",
		Usage:     "show a job's history: every decision of its agents (detections, arbiter answers, promotions, fencing, resyncs) with its reason",
		ArgsUsage: "NAME",
		Flags: append(connFlags(),
			&cli.BoolFlag{Name: "json", Usage: "machine-readable output"},
			&cli.IntFlag{Name: "last", Value: 50, Usage: "show the last N events (0: all kept)"},
		),
		Action: jobEvents,
	}
}

// serverEvent is one event and the agent that recorded it.
type serverEvent struct {
	Server string `json:"server"`
	api.Event
}

func jobEvents(c *cli.Context) error {
	name, err := oneArg(c, "doppel job events NAME [--json] [--last N]")
	if err != nil {
		return err
	}
	e, err := newClientEnv(c)
	if err != nil {
		return err
	}
	servers := e.servers()
	if e.only != "" {
		servers = []string{e.only}
	}
	var mu sync.Mutex
	var all []serverEvent
	var found int
	var errs []string
	var wg sync.WaitGroup
	for _, s := range servers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx, cancel := context.WithTimeout(c.Context, e.timeout)
			defer cancel()
			cl, err := e.client(s)
			var evs []api.Event
			if err == nil {
				evs, err = cl.Events(ctx, name)
			}
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				errs = append(errs, fmt.Sprintf("%s: %v", s, err))
				return
			}
			found++
			for _, ev := range evs {
				all = append(all, serverEvent{Server: s, Event: ev})
			}
		}()
	}
	wg.Wait()
	if found == 0 {
		return fmt.Errorf("job %s: no server answered with its events: %v", name, errs)
	}
	sort.SliceStable(all, func(i, j int) bool { return all[i].Time.Before(all[j].Time) })
	if n := c.Int("last"); n > 0 && len(all) > n {
		all = all[len(all)-n:]
	}
	if c.Bool("json") {
		return writeJSONOut(c.App.Writer, all)
	}
	for _, ev := range all {
		fmt.Fprintf(c.App.Writer, "%s  %-6s epoch %-3d %-8s %s\n", ev.Time.Local().Format("2006-01-02 15:04:05.000"), ev.Server, ev.Epoch, ev.Kind, ev.Msg)
	}
	for _, e := range errs {
		fmt.Fprintf(c.App.ErrWriter, "(not shown: %s)\n", e)
	}
	return nil
}
