package main

import (
	"github.com/doppelha/doppel/daemon/api"
	"github.com/doppelha/doppel/daemon/client"
	"github.com/doppelha/doppel/daemon/ha"
	"github.com/urfave/cli/v2"
)

// failoverCommand fails a job over to its target.
func failoverCommand() *cli.Command {
	return &cli.Command{
		Name:      "failover",
		Usage:     "fail a job over to its target",
		ArgsUsage: "NAME",
		Description: "Runs on the job's target: it stops applying (after applying what is queued,\n" +
			"unless --discard-queue), promotes its copy to a new generation, serves the\n" +
			"volume, takes the service IPs and runs the post-failover script.\n" +
			"Refused, unless --force: an inconsistent target (mirror incomplete), a source\n" +
			"still heard on some path (doppel switchover, or failover --planned, moves a\n" +
			"live job without losing a write). Always refused: a job already failed over\n" +
			"(next step: doppel reverse).",
		Flags: append(connFlags(),
			&cli.BoolFlag{Name: "apply-queue", Usage: "apply the target's queued writes first (what happens without --discard-queue)"},
			&cli.BoolFlag{Name: "discard-queue", Usage: "drop the target's unapplied queue (faster, loses those writes)"},
			&cli.BoolFlag{Name: "force", Usage: "override the data-safety refusals"},
			&cli.BoolFlag{Name: "planned", Usage: "a planned switchover with both hosts up (doppel switchover)"},
			waitFlag(),
		),
		Action: func(c *cli.Context) error {
			if _, err := positional(c); err != nil { // flags after NAME
				return err
			}
			if c.Bool("apply-queue") && c.Bool("discard-queue") {
				return usageErrorf("--apply-queue and --discard-queue exclude each other")
			}
			if c.Bool("planned") {
				if c.Bool("force") || c.Bool("discard-queue") {
					return usageErrorf("--planned loses nothing: it takes neither --force nor --discard-queue")
				}
				return switchover(c, ha.CmdSwitchover)
			}
			opts := api.CommandOptions{Force: c.Bool("force"), DiscardQueue: c.Bool("discard-queue")}
			return sendCommand(c, ha.CmdFailover, opts, client.ForFailover)
		},
	}
}
