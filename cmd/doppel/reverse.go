package main

import (
	"github.com/doppelha/doppel/daemon/api"
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
			return sendCommand(c, ha.CmdReverse, api.CommandOptions{}, pickReverse)
		},
	}
}

// pickReverse sends a reverse to the failed-over side, else to the active
// source (whose state machine says why it does not apply).
func pickReverse(views []view) (string, error) {
	for _, v := range views {
		if v.Status != nil && v.Status.HA.State == ha.StateFailedOver {
			return v.Server, nil
		}
	}
	return activeSource(views)
}
