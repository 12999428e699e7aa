package main

import (
	"context"
	"fmt"
	"time"

	"github.com/doppelha/doppel/daemon/api"
	"github.com/doppelha/doppel/daemon/ha"
	"github.com/urfave/cli/v2"
)

// failbackCommand is the planned switchover back to the original source.
func failbackCommand() *cli.Command {
	return &cli.Command{
		Name:      "failback",
		Usage:     "planned switchover back to the job's original source",
		ArgsUsage: "NAME",
		Description: "With both hosts up and the job replicating (after doppel reverse): runs the\n" +
			"pre-failback script, pauses writes, drains the queue until the target holds\n" +
			"every acknowledged write, releases the service IPs, hands the source role\n" +
			"back (the original source promotes, serves, takes the IPs, runs\n" +
			"post-failback) and protection continues in the original direction.",
		Flags: append(connFlags(), &cli.DurationFlag{Name: "wait", Value: 2 * time.Minute, Usage: "wait this long for the original source to replicate again (0: do not wait)"}),
		Action: func(c *cli.Context) error {
			if err := sendCommand(c, ha.CmdFailback, api.CommandOptions{}, activeSource); err != nil {
				return err
			}
			if c.Duration("wait") <= 0 {
				return nil
			}
			return waitFailback(c)
		},
	}
}

// waitFailback follows the switchover until the job's original source is
// the source again and replicating.
func waitFailback(c *cli.Context) error {
	name, _ := oneArg(c, "doppel failback NAME")
	e, err := newClientEnv(c)
	if err != nil {
		return err
	}
	e.only = "" // both sides
	ctx, cancel := context.WithTimeout(c.Context, c.Duration("wait"))
	defer cancel()
	for {
		views, err := e.findJob(ctx, name)
		if err == nil {
			home := views[0]
			if home.Status != nil && home.Status.HA.Role == ha.RoleSource && home.Status.HA.State == ha.StateReplicating {
				fmt.Fprintf(c.App.Writer, "failback %s done: %s is the source again (epoch %d), %s the standby\n", name, home.Server, home.Status.HA.Epoch, views[1].Server)
				return nil
			}
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("failback %s not complete after %v: see doppel job status %s", name, c.Duration("wait"), name)
		case <-time.After(250 * time.Millisecond):
		}
	}
}
