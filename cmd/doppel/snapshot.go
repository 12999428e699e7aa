package main

import (
	"context"
	"fmt"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/doppelha/doppel/daemon/api"
	"github.com/doppelha/doppel/daemon/client"
	"github.com/doppelha/doppel/daemon/job"
	"github.com/doppelha/doppel/daemon/protection"
	"github.com/doppelha/doppel/daemon/snapshot"
	"github.com/urfave/cli/v2"
)

// snapshotCommand manages the snapshots of a job's target
// (docs/snapshots.md).
func snapshotCommand() *cli.Command {
	return &cli.Command{
		Name:  "snapshot",
		Usage: "point-in-time snapshots of a job's target volume",
		Description: "Snapshots live on the job's target: reflink clones for a file volume on XFS or\n" +
			"btrfs, LVM thin snapshots for a thin LV (doppel snapshot list shows which). The\n" +
			"target takes them at a replication sequence number, without stopping the\n" +
			"source; one is also taken automatically before every resync or reverse.",
		Subcommands: []*cli.Command{
			{
				Name:      "create",
				Usage:     "take a snapshot on the job's target",
				ArgsUsage: "JOB [NAME]",
				Description: "Crash-consistent by default: the target snapshots what it applied so far.\n" +
					"With --fsfreeze MOUNT (or --freeze-script PATH, run with freeze then thaw) the\n" +
					"source freezes its file system, marks the point in the stream, and the target\n" +
					"snapshots exactly there; the source thaws right after (or after\n" +
					"--freeze-timeout on its own).",
				Flags: append(connFlags(),
					&cli.StringFlag{Name: "fsfreeze", Usage: "mount point of the volume's file system on the source: application-consistent (fsfreeze -f/-u)"},
					&cli.StringFlag{Name: "freeze-script", Usage: "script on the source run with 'freeze' and then 'thaw' around the point"},
					&cli.DurationFlag{Name: "freeze-timeout", Value: 10 * time.Second, Usage: "the source thaws on its own after this"},
					&cli.BoolFlag{Name: "json", Usage: "machine-readable output"},
				),
				Action: snapshotCreate,
			},
			{
				Name:      "list",
				Usage:     "list a job's snapshots, their point, age and space",
				ArgsUsage: "JOB",
				Flags:     append(connFlags(), &cli.BoolFlag{Name: "json", Usage: "machine-readable output"}),
				Action:    snapshotList,
			},
			{
				Name:      "delete",
				Usage:     "delete a snapshot",
				ArgsUsage: "JOB NAME",
				Flags:     connFlags(),
				Action:    snapshotDelete,
			},
			{
				Name:      "schedule",
				Usage:     "set a job's snapshot schedule and retention (on both sides: it follows the target)",
				ArgsUsage: "JOB",
				Description: "Example: every hour, keep the last 24, the newest of each of the last 7 days\n" +
					"and of the last 4 weeks:\n" +
					"  doppel snapshot schedule web --every 1h --keep 24 --keep-daily 7 --keep-weekly 4\n" +
					"--every 0 stops scheduled snapshots (the ones taken stay until deleted).",
				Flags: append(connFlags(),
					&cli.DurationFlag{Name: "every", Usage: "interval between scheduled snapshots (0: none; at least 1m)"},
					&cli.IntFlag{Name: "keep", Usage: "keep the newest N scheduled snapshots"},
					&cli.IntFlag{Name: "keep-daily", Usage: "also keep the newest of each of the last N days"},
					&cli.IntFlag{Name: "keep-weekly", Usage: "also keep the newest of each of the last N weeks"},
					&cli.IntFlag{Name: "auto-keep", Usage: "automatic snapshots (before a resync) kept (-1: take none)", DefaultText: "1"},
				),
				Action: snapshotSchedule,
			},
		},
	}
}

// testFailoverCommand brings up a writable clone of the target's data.
func testFailoverCommand() *cli.Command {
	return &cli.Command{
		Name:      "test-failover",
		Usage:     "serve a writable clone of the target's data, replication going on",
		ArgsUsage: "JOB",
		Description: "Clones the target's current consistent image (at a replication sequence\n" +
			"number; or --snapshot S) and serves the clone as an NBD export of its own (a\n" +
			"Unix socket, or --test-ip CIDR@IFACE: an address of its own, never a service\n" +
			"IP). The clone's writes never reach the target volume or the source; the\n" +
			"job keeps replicating. --stop discards the clone.",
		Flags: append(connFlags(),
			&cli.StringFlag{Name: "snapshot", Usage: "clone this snapshot instead of the current image"},
			&cli.StringFlag{Name: "test-ip", Usage: "CIDR@IFACE to serve the clone on (NBD port 10809)"},
			&cli.BoolFlag{Name: "stop", Usage: "stop the test failover and discard its clone"},
			&cli.BoolFlag{Name: "json", Usage: "machine-readable output"},
		),
		Action: testFailover,
	}
}

// jobArgs reads JOB and up to max more arguments.
func jobArgs(c *cli.Context, usage string, min, max int) ([]string, error) {
	args, err := positional(c)
	if err != nil {
		return nil, err
	}
	if len(args) < min || len(args) > max {
		return nil, usageErrorf("usage: %s", usage)
	}
	if err := job.ValidName("job", args[0]); err != nil {
		return nil, usageErrorf("%v", err)
	}
	if len(args) > 1 {
		if err := snapshot.ValidName(args[1]); err != nil {
			return nil, usageErrorf("%v", err)
		}
	}
	return args, nil
}

// serverFor connects to the server pick chooses among the job's sides
// (or --server).
func serverFor(c *cli.Context, name string, pick client.Picker) (string, *api.Client, error) {
	f, err := fleet(c)
	if err != nil {
		return "", nil, err
	}
	return f.Pick(c.Context, name, pick)
}

func snapshotCreate(c *cli.Context) error {
	args, err := jobArgs(c, "doppel snapshot create JOB [NAME]", 1, 2)
	if err != nil {
		return err
	}
	name := args[0]
	req := api.SnapshotRequest{}
	if len(args) > 1 {
		req.Name = args[1]
	}
	mount, script := c.String("fsfreeze"), c.String("freeze-script")
	if mount != "" && script != "" {
		return usageErrorf("--fsfreeze and --freeze-script exclude each other")
	}
	var freeze *api.FreezeRequest
	if mount != "" || script != "" {
		freeze = &api.FreezeRequest{Mount: mount, Script: script, Timeout: c.Duration("freeze-timeout")}
	}
	f, err := fleet(c)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(c.Context, 2*time.Minute)
	defer cancel()
	server, info, err := f.Snapshot(ctx, name, req, freeze)
	if err != nil {
		return err
	}
	return printSnapshot(c, server, info)
}

func printSnapshot(c *cli.Context, server string, info api.SnapshotInfo) error {
	if c.Bool("json") {
		return writeJSONOut(c.App.Writer, info)
	}
	cons := "crash-consistent"
	if info.Point.AppConsistent {
		cons = "application-consistent"
	}
	fmt.Fprintf(c.App.Writer, "snapshot %s on %s: %s at sequence %d (%s), %s, the apply stream paused %v\n",
		info.Name, server, cons, info.Point.Seq, info.Mechanism, protection.BytesHuman(info.Size), info.Took.Round(time.Microsecond))
	return nil
}

func snapshotList(c *cli.Context) error {
	args, err := jobArgs(c, "doppel snapshot list JOB", 1, 1)
	if err != nil {
		return err
	}
	server, cl, err := serverFor(c, args[0], client.Target)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(c.Context, time.Minute)
	defer cancel()
	l, err := cl.Snapshots(ctx, args[0])
	if err != nil {
		return fmt.Errorf("snapshots on %s: %w", server, err)
	}
	if c.Bool("json") {
		return writeJSONOut(c.App.Writer, l)
	}
	w := c.App.Writer
	if l.Unsupported != "" {
		fmt.Fprintf(w, "%s on %s: no snapshots: %s\n", l.Job, server, l.Unsupported)
		return nil
	}
	fmt.Fprintf(w, "%s on %s: %s\n", l.Job, server, l.Describe)
	fmt.Fprintf(w, "schedule: %s\n", scheduleLine(l.Schedule))
	if tf := l.TestFailover; tf != nil {
		fmt.Fprintf(w, "test failover: %s (clone of %s at sequence %d, since %s)\n", tf.Device, tf.From, tf.Point.Seq, tf.Started.Local().Format(time.DateTime))
	}
	if len(l.Snapshots) == 0 {
		fmt.Fprintln(w, "no snapshots")
		return nil
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "NAME\tKIND\tCREATED\tAGE\tSEQ\tCONSISTENCY\tALLOCATED\tEXCLUSIVE")
	for _, s := range l.Snapshots {
		cons := "crash"
		if s.Point.AppConsistent {
			cons = "application"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%d\t%s\t%s\t%s\n", s.Name, s.Kind, s.Created.Local().Format(time.DateTime),
			s.Age.Round(time.Second), s.Point.Seq, cons, sizeOrUnknown(s.Usage.Allocated), sizeOrUnknown(s.Usage.Exclusive))
	}
	tw.Flush()
	if len(l.Snapshots) > 0 {
		fmt.Fprintf(w, "space: %s\n", l.Snapshots[0].Usage.How)
	}
	return nil
}

func sizeOrUnknown(n int64) string {
	if n < 0 {
		return "-"
	}
	return protection.BytesHuman(n)
}

func scheduleLine(s snapshot.Schedule) string {
	var b strings.Builder
	if s.Every <= 0 {
		b.WriteString("none")
	} else {
		fmt.Fprintf(&b, "every %v, keep %d", s.Every, s.Keep)
		if s.KeepDaily > 0 {
			fmt.Fprintf(&b, ", daily %d", s.KeepDaily)
		}
		if s.KeepWeekly > 0 {
			fmt.Fprintf(&b, ", weekly %d", s.KeepWeekly)
		}
	}
	if k := s.AutoKeepOr(); k > 0 {
		fmt.Fprintf(&b, "; automatic before a resync, keep %d", k)
	} else {
		b.WriteString("; no automatic snapshots")
	}
	return b.String()
}

func snapshotDelete(c *cli.Context) error {
	args, err := jobArgs(c, "doppel snapshot delete JOB NAME", 2, 2)
	if err != nil {
		return err
	}
	server, cl, err := serverFor(c, args[0], client.Target)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(c.Context, time.Minute)
	defer cancel()
	if err := cl.DeleteSnapshot(ctx, args[0], args[1]); err != nil {
		return fmt.Errorf("delete on %s: %w", server, err)
	}
	fmt.Fprintf(c.App.Writer, "snapshot %s of %s deleted on %s\n", args[1], args[0], server)
	return nil
}

func snapshotSchedule(c *cli.Context) error {
	args, err := jobArgs(c, "doppel snapshot schedule JOB --every DURATION --keep N", 1, 1)
	if err != nil {
		return err
	}
	name := args[0]
	s := snapshot.Schedule{Every: c.Duration("every"), Keep: c.Int("keep"), KeepDaily: c.Int("keep-daily"), KeepWeekly: c.Int("keep-weekly"), AutoKeep: c.Int("auto-keep")}
	if err := s.Validate(); err != nil {
		return usageErrorf("%v", err)
	}
	f, err := fleet(c)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(c.Context, time.Minute)
	defer cancel()
	failed, err := f.EachSide(ctx, name, func(server string, cl *api.Client) error {
		if err := cl.SetSnapshotSchedule(ctx, name, s); err != nil {
			return err
		}
		fmt.Fprintf(c.App.Writer, "%s on %s: %s\n", name, server, scheduleLine(s))
		return nil
	})
	if err != nil {
		return err
	}
	if len(failed) > 0 {
		return fmt.Errorf("schedule not set on every side (it must be, to follow the target): %s", strings.Join(failed, "; "))
	}
	return nil
}

func testFailover(c *cli.Context) error {
	args, err := jobArgs(c, "doppel test-failover JOB [--snapshot S] [--stop]", 1, 1)
	if err != nil {
		return err
	}
	name := args[0]
	if c.Bool("stop") && (c.String("snapshot") != "" || c.String("test-ip") != "") {
		return usageErrorf("--stop takes neither --snapshot nor --test-ip")
	}
	server, cl, err := serverFor(c, name, client.Target)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(c.Context, 2*time.Minute)
	defer cancel()
	if c.Bool("stop") {
		if err := cl.StopTestFailover(ctx, name); err != nil {
			return fmt.Errorf("stop the test failover on %s: %w", server, err)
		}
		fmt.Fprintf(c.App.Writer, "test failover of %s stopped on %s: clone discarded\n", name, server)
		return nil
	}
	st, err := cl.StartTestFailover(ctx, name, api.TestFailoverRequest{Snapshot: c.String("snapshot"), TestIP: c.String("test-ip")})
	if err != nil {
		return fmt.Errorf("test failover on %s: %w", server, err)
	}
	if c.Bool("json") {
		return writeJSONOut(c.App.Writer, st)
	}
	fmt.Fprintf(c.App.Writer, "test failover of %s on %s: a writable clone of %s at sequence %d is served on %s (export %s)\n"+
		"replication goes on; the clone's writes reach neither the target volume nor the source.\n"+
		"stop it with: doppel test-failover %s --stop\n", name, server, st.From, st.Point.Seq, st.Device, st.Export, name)
	return nil
}
