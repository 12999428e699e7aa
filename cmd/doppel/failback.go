package main

import (
	"github.com/doppelha/doppel/daemon/ha"
	"github.com/urfave/cli/v2"
)

// failbackCommand is the planned switchover back to the original source.
func failbackCommand() *cli.Command {
	return &cli.Command{
		Name:      "failback",
		Usage:     "planned switchover back to the job's original source",
		ArgsUsage: "NAME",
		Description: "doppel switchover, refused unless it brings the job back to its original\n" +
			"source (after doppel reverse, or a switchover away from it): the pre-failback\n" +
			"script, writes held, drain until the target holds every acknowledged write,\n" +
			"roles swapped at a new epoch, the service IPs moved, post-failback.",
		Flags:  append(connFlags(), waitFlag()),
		Action: func(c *cli.Context) error { return switchover(c, ha.CmdFailback) },
	}
}
