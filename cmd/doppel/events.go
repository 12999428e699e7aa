package main

import (
	"fmt"

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

func jobEvents(c *cli.Context) error {
	name, err := oneArg(c, "doppel job events NAME [--json] [--last N]")
	if err != nil {
		return err
	}
	f, err := fleet(c)
	if err != nil {
		return err
	}
	all, missed, err := f.Events(c.Context, name, c.Int("last"))
	if err != nil {
		return err
	}
	if c.Bool("json") {
		return writeJSONOut(c.App.Writer, all)
	}
	for _, ev := range all {
		fmt.Fprintf(c.App.Writer, "%s  %-6s epoch %-3d %-8s %s\n", ev.Time.Local().Format("2006-01-02 15:04:05.000"), ev.Server, ev.Epoch, ev.Kind, ev.Msg)
	}
	for _, e := range missed {
		fmt.Fprintf(c.App.ErrWriter, "(not shown: %s)\n", e)
	}
	return nil
}
