package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/doppelha/doppel/daemon/api"
	"github.com/doppelha/doppel/daemon/client"
	"github.com/doppelha/doppel/daemon/ha"
	"github.com/doppelha/doppel/daemon/job"
	"github.com/doppelha/doppel/daemon/protection"
	"github.com/urfave/cli/v2"
)

// jobCommand creates and manages protection jobs.
func jobCommand() *cli.Command {
	return &cli.Command{
		Name:  "job",
		Usage: "create and manage protection jobs",
		Subcommands: []*cli.Command{
			{
				Name:      "create",
				Usage:     "protect a volume of SOURCE on TARGET",
				ArgsUsage: "NAME",
				Description: "Checks both agents first (pre-flight: volumes, sizes, mounts, other jobs, hook\n" +
					"scripts, each side reaching the other) and reports every problem at once,\n" +
					"changing nothing; then creates the job on the target and the source (a failure\n" +
					"rolls both back) and waits for the first replication handshake (--wait): exit 0\n" +
					"means the job is mirroring or replicating. Example, the seed's lab:\n" +
					"  doppel job create web --source vm1 --target vm2 --volume /dev/vdb \\\n" +
					"    --service-ip 172.17.22.187/24@eth0 --failover auto",
				Flags: append(connFlags(),
					&cli.StringFlag{Name: "source", Usage: "source server (doppel server list)"},
					&cli.StringFlag{Name: "target", Usage: "target server"},
					&cli.StringFlag{Name: "volume", Usage: "block device or file to protect (same path on the target)"},
					&cli.StringFlag{Name: "target-volume", Usage: "the volume's path on the target, when not the same as --volume"},
					&cli.StringFlag{Name: "size", Usage: "create a missing file volume of this size (e.g. 1G; default for the target: the source's size)"},
					&cli.StringFlag{Name: "mode", Value: job.ModeSync, Usage: "sync (ack after the target applied) or async"},
					&cli.StringSliceFlag{Name: "service-ip", Usage: "CIDR@IFACE that follows the active side (repeatable)"},
					&cli.StringSliceFlag{Name: "map-iface", Usage: "SRCIFACE=TGTIFACE: where the target puts a source interface's IPs (repeatable)"},
					&cli.StringFlag{Name: "monitor", Value: "interval=250ms,missed=8", Usage: "failure detection: interval=DURATION,missed=N"},
					&cli.StringFlag{Name: "failover", Value: string(ha.FailoverManual), Usage: "auto (when every path is down) or manual (doppel failover)"},
					&cli.StringSliceFlag{Name: "script", Usage: "HOOK=PATH, hook one of pre-failover, post-failover, pre-failback, post-failback (repeatable)"},
					&cli.StringFlag{Name: "arbiter", Usage: "etcd: promotions need the agents' etcd arbiter (endpoints in each agent's config; docs/arbiter.md); strongly advised with --failover auto"},
					&cli.DurationFlag{Name: "lease-ttl", Usage: "with --arbiter: the source's lease TTL (2s to 2m): the failover waits for it, an isolated source stops acknowledging before it", DefaultText: "5s"},
					&cli.DurationFlag{Name: "suspend-timeout", Usage: "with --arbiter: how long writes the source may not acknowledge are held before they fail with EIO (-1s: forever)", DefaultText: "30s"},
					&cli.StringFlag{Name: "queue-size", Usage: "the source's memory queue `SIZE` (at least 4M): writes the target has not taken yet wait there", DefaultText: "128M"},
					&cli.StringFlag{Name: "disk-queue-size", Usage: "the disk queue `SIZE` beyond it (at least 4M; none: no disk queue); beyond both, writes are tracked in the bitmap and resynced", DefaultText: "2048M"},
					&cli.StringFlag{Name: "rate-limit", Usage: "cap the replication traffic at `SIZE` bytes per second (at least 64K; e.g. 50M)", DefaultText: "none"},
					&cli.DurationFlag{Name: "wait", Value: 30 * time.Second, Usage: "how long to wait for the first replication handshake (exit 0 only once it happened)"},
				),
				Action: jobCreate,
			},
			{
				Name:   "list",
				Usage:  "list the jobs of every server",
				Flags:  append(connFlags(), &cli.BoolFlag{Name: "json", Usage: "machine-readable output"}),
				Action: jobList,
			},
			{
				Name:      "status",
				Usage:     "show a job as both agents see it, under one headline",
				ArgsUsage: "NAME",
				Description: "The first line is the job's headline: PROTECTED, DEGRADED, NOT PROTECTED,\n" +
					"FAILED OVER or UNREACHABLE, with the reason; then what a failure of the source\n" +
					"now would cost, the commands that would succeed now, and each side as its\n" +
					"agent sees it. Every server is asked in parallel, each for at most --timeout.\n" +
					"Exit status: 0 protected, 1 degraded, 2 not protected or failed over,\n" +
					"3 unreachable (no agent answered for the job), 64 usage error.",
				Flags: append(connFlags(),
					&cli.BoolFlag{Name: "json", Usage: "machine-readable output"},
					&cli.BoolFlag{Name: "watch", Usage: "refresh every --interval until interrupted"},
					&cli.DurationFlag{Name: "interval", Value: time.Second, Usage: "refresh interval of --watch"},
				),
				Action: jobStatus,
			},
			jobEventsCommand(),
			{Name: "pause", Usage: "pause replication (writes are tracked, resynced on resume)", ArgsUsage: "NAME", Flags: connFlags(), Action: jobSimple(ha.CmdPause)},
			{Name: "resume", Usage: "resume replication", ArgsUsage: "NAME", Flags: connFlags(), Action: jobSimple(ha.CmdResume)},
			{
				Name:      "delete",
				Usage:     "delete a job on both agents (the volumes' data and service IPs stay as they are)",
				ArgsUsage: "NAME",
				Description: "Stops the job and removes it and its replication state (generations, bitmap,\n" +
					"queue) on both agents. --keep-state archives the record and state instead,\n" +
					"under STATE/archive/NAME.deleted-TIMESTAMP (printed); split-brain saves are\n" +
					"always archived, never removed. Refused, on every host, while the job's volume\n" +
					"is in use (NBD clients connected to its export, its /dev/nbdN mounted or held\n" +
					"open): the command says by whom; --force deletes anyway.",
				Flags: append(connFlags(),
					&cli.BoolFlag{Name: "keep-state", Usage: "archive the job's record and replication state instead of removing them"},
					&cli.BoolFlag{Name: "force", Usage: "delete even while the volume is in use (NBD clients, a mounted /dev/nbdN): they lose their disk"},
				),
				Action: jobDelete,
			},
		},
	}
}

func oneArg(c *cli.Context, usage string) (string, error) {
	args, err := positional(c)
	if err != nil {
		return "", err
	}
	if len(args) != 1 {
		return "", usageErrorf("usage: %s", usage)
	}
	name := args[0]
	if err := job.ValidName("job", name); err != nil {
		return "", usageErrorf("%v", err)
	}
	return name, nil
}

// buildSpec turns the create flags into a job spec (without endpoints).
func buildSpec(c *cli.Context, name string) (job.Spec, error) {
	spec := job.Spec{Name: name, Volume: c.String("volume"), TargetVolume: c.String("target-volume"), Mode: c.String("mode"), Failover: ha.FailoverMode(c.String("failover"))}
	if s := c.String("size"); s != "" {
		n, err := job.ParseSize(s)
		if err != nil {
			return spec, err
		}
		spec.Size = n
	}
	var err error
	if spec.ServiceIPs, err = job.ParseServiceIPs(c.StringSlice("service-ip")); err != nil {
		return spec, err
	}
	if spec.MapIface, err = job.ParseInterfaceMap("--map-iface", c.StringSlice("map-iface")); err != nil {
		return spec, err
	}
	for _, f := range []struct {
		flag string
		dst  *int64
	}{{"queue-size", &spec.QueueMemory}, {"disk-queue-size", &spec.QueueDisk}, {"rate-limit", &spec.RateLimit}} {
		v := c.String(f.flag)
		switch {
		case v == "":
		case v == "none" && f.flag == "disk-queue-size":
			*f.dst = -1
		default:
			n, err := job.ParseSize(v)
			if err != nil {
				return spec, fmt.Errorf("--%s: %w", f.flag, err)
			}
			*f.dst = n
		}
	}
	m, err := job.ParseMonitor(c.String("monitor"))
	if err != nil {
		return spec, err
	}
	spec.Monitor = m
	spec.Arbiter = c.String("arbiter")
	spec.LeaseTTL = c.Duration("lease-ttl")
	spec.SuspendTimeout = c.Duration("suspend-timeout")
	if spec.Arbiter == "" && (spec.LeaseTTL != 0 || spec.SuspendTimeout != 0) {
		return spec, fmt.Errorf("%w: --lease-ttl and --suspend-timeout go with --arbiter etcd", job.ErrInvalid)
	}
	for _, s := range c.StringSlice("script") {
		hook, path, ok := strings.Cut(s, "=")
		if !ok {
			return spec, fmt.Errorf("%w: --script %q: want HOOK=PATH", job.ErrInvalid, s)
		}
		if spec.Scripts == nil {
			spec.Scripts = map[ha.Hook]string{}
		}
		spec.Scripts[ha.Hook(hook)] = path
	}
	spec.Secret = job.NewSecret()
	spec.UUID = job.NewUUID()
	return spec, nil
}

func jobCreate(c *cli.Context) error {
	name, err := oneArg(c, "doppel job create NAME --source SRV --target SRV --volume PATH [flags]")
	if err != nil {
		return err
	}
	if err := required(c, "source", "target", "volume"); err != nil {
		return err
	}
	if c.Duration("wait") <= 0 {
		return usageErrorf("--wait %v: the create waits for the first replication handshake, give a positive bound", c.Duration("wait"))
	}
	spec, err := buildSpec(c, name)
	if err != nil {
		return usageErrorf("%v", err)
	}
	f, err := fleet(c)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(c.Context, 30*time.Second)
	defer cancel()
	if spec.Source, err = f.Endpoint(ctx, c.String("source")); err != nil {
		return err
	}
	if spec.Target, err = f.Endpoint(ctx, c.String("target")); err != nil {
		return err
	}
	spec.Defaults()
	if err := spec.Validate(); err != nil {
		return usageErrorf("%v", err)
	}
	src, _ := f.Client(spec.Source.Name)
	tgt, _ := f.Client(spec.Target.Name)
	w := c.App.Writer
	for _, warning := range client.Warnings(spec) {
		fmt.Fprintf(c.App.ErrWriter, "warning: %s\n", warning)
	}
	// Pre-flight on both sides before anything changes; every problem of
	// both is reported at once.
	notices, err := client.Preflight(ctx, &spec, src, tgt)
	if err != nil {
		return err
	}
	for _, n := range notices {
		fmt.Fprintf(w, "  %-8s %s\n", n.Server, n.Message)
	}
	if err := client.CreateBoth(ctx, spec, src, tgt); err != nil {
		return err
	}
	fmt.Fprintf(w, "created job %s: %s:%s -> %s:%s, %s, failover %s\n", name, spec.Source.Name, spec.Volume, spec.Target.Name, spec.VolumeOn(spec.Target.Name), spec.Mode, spec.Failover)
	st, err := client.WaitReplicating(c.Context, name, src, tgt, c.Duration("wait"))
	if err != nil {
		return err
	}
	what := string(st.HA.State)
	if st.Data.BytesRemaining > 0 {
		what += fmt.Sprintf(" (%s to copy)", protection.BytesHuman(st.Data.BytesRemaining))
	}
	fmt.Fprintf(w, "replication handshake done: %s\nfollow it with: doppel job status %s --watch\n", what, name)
	return nil
}

func writeJSONOut(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

// jobServer reads the job NAME argument and connects to the server that
// must act on it: the one --server names, else the one pick chooses among
// the job's sides.
func jobServer(c *cli.Context, usage string, pick client.Picker) (name, server string, cl *api.Client, err error) {
	if name, err = oneArg(c, usage); err != nil {
		return "", "", nil, err
	}
	f, err := fleet(c)
	if err != nil {
		return "", "", nil, err
	}
	server, cl, err = f.Pick(c.Context, name, pick)
	return name, server, cl, err
}

// sendCommand runs an operator command on the server that must act: the
// one --server names, else the one pick chooses among the job's sides.
func sendCommand(c *cli.Context, cmd ha.EventType, opts api.CommandOptions, pick client.Picker) error {
	name, err := oneArg(c, "doppel "+string(cmd)+" NAME")
	if err != nil {
		return err
	}
	f, err := fleet(c)
	if err != nil {
		return err
	}
	server, st, err := f.Command(c.Context, name, cmd, opts, pick)
	for _, a := range st.Actions {
		fmt.Fprintf(c.App.Writer, "  %s: %s\n", server, a)
	}
	if err != nil {
		return err
	}
	fmt.Fprintf(c.App.Writer, "%s %s on %s: now %s %s (epoch %d)\n", cmd, name, server, st.HA.Role, st.HA.State, st.HA.Epoch)
	if st.HA.Reason != "" {
		fmt.Fprintf(c.App.Writer, "  ! %s\n", st.HA.Reason)
	}
	return nil
}

func jobSimple(cmd ha.EventType) cli.ActionFunc {
	return func(c *cli.Context) error {
		return sendCommand(c, cmd, api.CommandOptions{}, client.ActiveSource)
	}
}

func jobDelete(c *cli.Context) error {
	name, err := oneArg(c, "doppel job delete NAME")
	if err != nil {
		return err
	}
	f, err := fleet(c)
	if err != nil {
		return err
	}
	opts := api.DeleteOptions{KeepState: c.Bool("keep-state"), Force: c.Bool("force")}
	return f.Delete(c.Context, name, opts, func(server string, res api.DeleteResult) {
		fmt.Fprintf(c.App.Writer, "deleted job %s on %s\n", name, server)
		if res.Archived != "" {
			fmt.Fprintf(c.App.Writer, "  %s: kept in %s\n", server, res.Archived)
		}
	})
}
