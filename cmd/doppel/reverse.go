package main

import (
	"github.com/doppelha/doppel/daemon/api"
	"github.com/doppelha/doppel/daemon/client"
	"github.com/doppelha/doppel/daemon/ha"
	"github.com/urfave/cli/v2"
)

// reverseCommand restarts protection in the other direction after a
// failover.
func reverseCommand() *cli.Command {
	return &cli.Command{
		Name:      "reverse",
		Usage:     "protect a failed-over job in the other direction",
		ArgsUsage: "NAME",
		Description: "Runs on the failed-over host once the old source is back (fenced,\n" +
			"\"superseded, run doppel reverse\"): the old source becomes the target and only\n" +
			"the chunks in the union of both sides' dirty bitmaps are resynced.",
		Flags: connFlags(),
		Action: func(c *cli.Context) error {
			return sendCommand(c, ha.CmdReverse, api.CommandOptions{}, client.ForReverse)
		},
	}
}
