package main

import (
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
		Flags: connFlags(),
		Action: func(c *cli.Context) error {
			return sendCommand(c, ha.CmdFailback, api.CommandOptions{}, activeSource)
		},
	}
}
