package main

import (
	"fmt"
	"os"

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
			"(next step: doppel reverse).\n" +
			"With --snapshot S the target's volume is rolled back to its snapshot S first\n" +
			"(after a confirmation; --yes skips it) and that point in time is promoted; the\n" +
			"newer data is kept as a snapshot of its own (before-failover-epoch-N). An\n" +
			"inconsistent target (a resync interrupted) fails over to a snapshot without\n" +
			"--force. doppel reverse then resyncs only the chunks that differ.",
		Flags: append(connFlags(),
			&cli.BoolFlag{Name: "apply-queue", Usage: "apply the target's queued writes first (what happens without --discard-queue)"},
			&cli.BoolFlag{Name: "discard-queue", Usage: "drop the target's unapplied queue (faster, loses those writes)"},
			&cli.BoolFlag{Name: "force", Usage: "override the data-safety refusals"},
			&cli.BoolFlag{Name: "planned", Usage: "a planned switchover with both hosts up (doppel switchover)"},
			&cli.StringFlag{Name: "snapshot", Usage: "promote this snapshot of the target's volume (doppel snapshot list), not its latest data"},
			&cli.BoolFlag{Name: "yes", Usage: "do not ask for confirmation (--snapshot)"},
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
				if c.String("snapshot") != "" {
					return usageErrorf("--planned moves the latest data: it takes no --snapshot")
				}
				if c.Bool("force") || c.Bool("discard-queue") {
					return usageErrorf("--planned loses nothing: it takes neither --force nor --discard-queue")
				}
				return switchover(c, ha.CmdSwitchover)
			}
			opts := api.CommandOptions{Force: c.Bool("force"), DiscardQueue: c.Bool("discard-queue"), Snapshot: c.String("snapshot")}
			if opts.Snapshot != "" && !c.Bool("yes") {
				if f, ok := c.App.Reader.(*os.File); ok {
					if fi, err := f.Stat(); err != nil || fi.Mode()&os.ModeCharDevice == 0 {
						return usageErrorf("no terminal to confirm the failover to snapshot %s: pass --yes", opts.Snapshot)
					}
				}
				ok, err := confirm(c.App.Reader, c.App.Writer, fmt.Sprintf("Fail %s over to snapshot %s: the target's volume is rolled back to it (its newer data is kept as a snapshot), "+
					"the source is fenced, and a reverse overwrites the source's newer data. Continue? [y/N] ", c.Args().First(), opts.Snapshot))
				if err != nil {
					return err
				}
				if !ok {
					return usageErrorf("failover to snapshot %s not confirmed: nothing done", opts.Snapshot)
				}
			}
			return sendCommand(c, ha.CmdFailover, opts, client.ForFailover)
		},
	}
}
