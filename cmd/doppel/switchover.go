package main

import (
	"context"
	"fmt"
	"time"

	"github.com/doppelha/doppel/daemon/api"
	"github.com/doppelha/doppel/daemon/client"
	"github.com/doppelha/doppel/daemon/ha"
	"github.com/urfave/cli/v2"
)

// switchoverCommand is the planned switchover to the job's standby, in
// either direction.
func switchoverCommand() *cli.Command {
	return &cli.Command{
		Name:      "switchover",
		Usage:     "planned switchover: the standby becomes the source, no write lost",
		ArgsUsage: "NAME",
		Description: "With both hosts up and the job replicating: runs the pre-failback script on\n" +
			"the source, holds its writes, drains until the target holds every\n" +
			"acknowledged write, and asks the target to take over; only then the source\n" +
			"releases the service IPs, stops serving and becomes the target, and the\n" +
			"target promotes at a new epoch, serves, takes the IPs and runs the\n" +
			"post-failback script. Protection continues in the other direction. If the\n" +
			"drain fails or the target cannot take over, nothing moves and the held\n" +
			"writes go on. doppel failback is the same switchover back to the job's\n" +
			"original source.",
		Flags:  append(connFlags(), waitFlag()),
		Action: func(c *cli.Context) error { return switchover(c, ha.CmdSwitchover) },
	}
}

func waitFlag() cli.Flag {
	return &cli.DurationFlag{Name: "wait", Value: 2 * time.Minute, Usage: "wait this long for the new source to replicate (0: do not wait)"}
}

// switchover sends cmd (switchover or failback) to the active source and
// follows it until the other side is the replicating source.
func switchover(c *cli.Context, cmd ha.EventType) error {
	name, err := oneArg(c, "doppel "+string(cmd)+" NAME")
	if err != nil {
		return err
	}
	f, err := fleet(c)
	if err != nil {
		return err
	}
	sides, err := f.FindJob(c.Context, name)
	if err != nil {
		return err
	}
	from, err := client.ActiveSource(sides)
	if err != nil {
		return err
	}
	if err := sendCommand(c, cmd, api.CommandOptions{}, client.ActiveSource); err != nil {
		return err
	}
	wait := c.Duration("wait")
	if wait <= 0 {
		return nil
	}
	ctx, cancel := context.WithTimeout(c.Context, wait)
	defer cancel()
	now, err := f.WaitSwitchover(ctx, name, cmd, from)
	switch {
	case err != nil && ctx.Err() != nil:
		return fmt.Errorf("%s %s not complete after %v: see doppel job status %s", cmd, name, wait, name)
	case err != nil:
		return err
	}
	fmt.Fprintf(c.App.Writer, "%s %s done: %s is the source (epoch %d), %s the standby\n", cmd, name, now.Server, now.Status.HA.Epoch, from)
	return nil
}
