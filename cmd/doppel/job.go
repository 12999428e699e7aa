package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"slices"
	"strings"
	"time"

	"github.com/doppelha/doppel/daemon/api"
	"github.com/doppelha/doppel/daemon/ha"
	"github.com/doppelha/doppel/daemon/job"
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
	for _, s := range c.StringSlice("service-ip") {
		ip, err := job.ParseServiceIP(s)
		if err != nil {
			return spec, err
		}
		spec.ServiceIPs = append(spec.ServiceIPs, ip)
	}
	for _, s := range c.StringSlice("map-iface") {
		src, tgt, ok := strings.Cut(s, "=")
		if !ok || src == "" || tgt == "" {
			return spec, fmt.Errorf("%w: --map-iface %q: want SRCIFACE=TGTIFACE", job.ErrInvalid, s)
		}
		if spec.MapIface == nil {
			spec.MapIface = map[string]string{}
		}
		if _, dup := spec.MapIface[src]; dup {
			return spec, fmt.Errorf("%w: --map-iface maps %s twice", job.ErrInvalid, src)
		}
		spec.MapIface[src] = tgt
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
	b := make([]byte, 32)
	rand.Read(b)
	spec.Secret = hex.EncodeToString(b)
	spec.UUID = job.NewUUID()
	return spec, nil
}

// endpointOf describes a server as a job endpoint: its control address,
// its replication address (the repl listener's host, or the control host
// when it listens on every address) and its pinned fingerprint.
func endpointOf(ctx context.Context, e *clientEnv, name string) (job.Endpoint, error) {
	s, err := e.cfg.Server(name)
	if err != nil {
		return job.Endpoint{}, err
	}
	cl, err := e.client(name)
	if err != nil {
		return job.Endpoint{}, err
	}
	info, err := cl.Info(ctx)
	if err != nil {
		return job.Endpoint{}, fmt.Errorf("server %s: %w", name, err)
	}
	chost, _, _ := net.SplitHostPort(s.Addr)
	rhost, rport, err := net.SplitHostPort(info.Repl)
	if err != nil {
		return job.Endpoint{}, fmt.Errorf("server %s reports replication address %q: %w", name, info.Repl, err)
	}
	if a, err := netip.ParseAddr(rhost); rhost == "" || (err == nil && a.IsUnspecified()) {
		rhost = chost
	}
	return job.Endpoint{Name: name, Control: s.Addr, Repl: net.JoinHostPort(rhost, rport), Fingerprint: s.Fingerprint}, nil
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
	e, err := newClientEnv(c)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(c.Context, 30*time.Second)
	defer cancel()
	if spec.Source, err = endpointOf(ctx, e, c.String("source")); err != nil {
		return err
	}
	if spec.Target, err = endpointOf(ctx, e, c.String("target")); err != nil {
		return err
	}
	spec.Defaults()
	if err := spec.Validate(); err != nil {
		return usageErrorf("%v", err)
	}
	src, _ := e.client(spec.Source.Name)
	tgt, _ := e.client(spec.Target.Name)
	w := c.App.Writer
	if spec.Failover == ha.FailoverAuto && spec.Arbiter == "" {
		fmt.Fprintf(c.App.ErrWriter, "warning: --failover auto without --arbiter: a partition between %s and %s (not a failure of %s) makes %s take over while %s keeps serving: split brain, writes of one side missing on the other. Use --arbiter etcd (docs/safety.md).\n",
			spec.Source.Name, spec.Target.Name, spec.Source.Name, spec.Target.Name, spec.Source.Name)
	}

	// Pre-flight on both sides before anything changes; every problem of
	// both is reported at once.
	if err := preflightCreate(ctx, w, &spec, src, tgt); err != nil {
		return err
	}
	if err := createBoth(ctx, spec, src, tgt); err != nil {
		return err
	}
	fmt.Fprintf(w, "created job %s: %s:%s -> %s:%s, %s, failover %s\n", name, spec.Source.Name, spec.Volume, spec.Target.Name, spec.VolumeOn(spec.Target.Name), spec.Mode, spec.Failover)
	return waitReplicating(c.Context, w, name, src, tgt, c.Duration("wait"))
}

// createBoth creates the job on the target first (it then waits for its
// source) and on the source last; when the source's create fails, the
// target's is rolled back (its record, state and a volume file it made).
func createBoth(ctx context.Context, spec job.Spec, src, tgt *api.Client) error {
	name := spec.Name
	if _, err := tgt.CreateJob(ctx, spec); err != nil {
		return fmt.Errorf("create job %s on target %s (nothing was changed on the source %s): %w", name, spec.Target.Name, spec.Source.Name, err)
	}
	if _, err := src.CreateJob(ctx, spec); err != nil {
		err = fmt.Errorf("create job %s on source %s: %w", name, spec.Source.Name, err)
		if _, derr := tgt.DeleteJobWith(ctx, name, api.DeleteOptions{Undo: true, Force: true}); derr != nil {
			return fmt.Errorf("%w; rolling back the target %s failed too: %v (delete it there: doppel job delete %s --server %s)", err, spec.Target.Name, derr, name, spec.Target.Name)
		}
		return fmt.Errorf("%w (rolled back on the target %s: nothing was left)", err, spec.Target.Name)
	}
	return nil
}

// preflightCreate runs the pre-flight of spec on both agents, sizes the
// job (the source volume's size is what is replicated; a target file to
// be created gets that size when --size was not given) and reports every
// problem of both sides at once. Notices are printed.
func preflightCreate(ctx context.Context, w io.Writer, spec *job.Spec, src, tgt *api.Client) error {
	var problems []string
	add := func(server string, p api.Problem) {
		problems = append(problems, fmt.Sprintf("  %-8s %s", server, p))
	}
	sp, err := src.Preflight(ctx, *spec)
	if err != nil {
		add(spec.Source.Name, api.Problem{Check: "agent", Message: err.Error()})
	}
	if spec.Size == 0 && sp.Volume.Exists && sp.Volume.Size > 0 {
		spec.Size = sp.Volume.Size // a missing target file is made this size
	}
	tp, err := tgt.Preflight(ctx, *spec)
	if err != nil {
		add(spec.Target.Name, api.Problem{Check: "agent", Message: err.Error()})
	}
	for _, p := range []struct {
		server string
		pf     api.Preflight
	}{{spec.Source.Name, sp}, {spec.Target.Name, tp}} {
		for _, pr := range p.pf.Problems {
			add(p.server, pr)
		}
	}
	if s, t := sp.Volume.Size, tp.Volume.Size; s > 0 && t > 0 && t < s {
		add(spec.Target.Name, api.Problem{Check: "size", Message: fmt.Sprintf("the target volume %s is %d bytes, smaller than the source volume %s (%d bytes)", tp.Volume.Path, t, sp.Volume.Path, s)})
	}
	if len(problems) > 0 {
		return cli.Exit(fmt.Sprintf("job %s not created: %d problem(s), nothing was changed:\n%s", spec.Name, len(problems), strings.Join(problems, "\n")), 1)
	}
	spec.VolumeSize = sp.Volume.Size
	for _, p := range []struct {
		server string
		pf     api.Preflight
	}{{spec.Source.Name, sp}, {spec.Target.Name, tp}} {
		for _, n := range p.pf.Notices {
			fmt.Fprintf(w, "  %-8s %s\n", p.server, n)
		}
	}
	if t := tp.Volume.Size; t > spec.VolumeSize {
		fmt.Fprintf(w, "  %-8s the target volume is %d bytes larger than the source: its last %d bytes are not used\n", tp.Server, t-spec.VolumeSize, t-spec.VolumeSize)
	}
	return nil
}

// waitReplicating waits, at most d, for the job's first replication
// handshake (the source connected to its target); the job counts as
// protected only then.
func waitReplicating(ctx context.Context, w io.Writer, name string, src, tgt *api.Client, d time.Duration) error {
	deadline := time.Now().Add(d)
	var st, tst api.JobStatus
	var serr, terr error
	for {
		qctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		st, serr = src.Job(qctx, name)
		cancel()
		if serr == nil && st.HA.LinkUp {
			what := string(st.HA.State)
			if st.Data.BytesRemaining > 0 {
				what += fmt.Sprintf(" (%s to copy)", bytesHuman(st.Data.BytesRemaining))
			}
			fmt.Fprintf(w, "replication handshake done: %s\nfollow it with: doppel job status %s --watch\n", what, name)
			return nil
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			break
		}
		select {
		case <-ctx.Done():
		case <-time.After(200 * time.Millisecond):
		}
	}
	qctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	tst, terr = tgt.Job(qctx, name)
	cancel()
	var why []string
	for _, v := range []struct {
		st  api.JobStatus
		err error
	}{{st, serr}, {tst, terr}} {
		switch {
		case v.err != nil:
			why = append(why, v.err.Error())
		default:
			msg := fmt.Sprintf("%s: %s %s", v.st.Self, v.st.HA.Role, v.st.HA.State)
			for _, s := range []string{v.st.HA.Reason, v.st.HA.LastError, v.st.Data.Note} {
				if s != "" {
					msg += "; " + s
				}
			}
			why = append(why, msg)
		}
	}
	return fmt.Errorf("job %s created, but it is not replicating: no replication handshake within %v (%s). The job stays and connects by itself once the cause is fixed; or remove it: doppel job delete %s",
		name, d, strings.Join(why, " | "), name)
}

func writeJSONOut(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

// jobServer reads the job NAME argument and connects to the server that
// must act on it: the one --server names, else the one pick chooses among
// the job's sides.
func jobServer(c *cli.Context, usage string, pick func([]view) (string, error)) (name, server string, cl *api.Client, err error) {
	if name, err = oneArg(c, usage); err != nil {
		return "", "", nil, err
	}
	e, err := newClientEnv(c)
	if err != nil {
		return "", "", nil, err
	}
	server = e.only
	if server == "" {
		views, err := e.findJob(c.Context, name)
		if err != nil {
			return "", "", nil, err
		}
		if server, err = pick(views); err != nil {
			return "", "", nil, err
		}
	}
	cl, err = e.client(server)
	return name, server, cl, err
}

// sendCommand runs an operator command on the server that must act: the
// one --server names, else the one pick chooses among the job's sides.
func sendCommand(c *cli.Context, cmd ha.EventType, opts api.CommandOptions, pick func([]view) (string, error)) error {
	name, server, cl, err := jobServer(c, "doppel "+string(cmd)+" NAME", pick)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(c.Context, 2*time.Minute)
	defer cancel()
	st, err := cl.Command(ctx, name, cmd, opts)
	for _, a := range st.Actions {
		fmt.Fprintf(c.App.Writer, "  %s: %s\n", server, a)
	}
	if err != nil {
		return fmt.Errorf("%s on %s: %w", cmd, server, err)
	}
	fmt.Fprintf(c.App.Writer, "%s %s on %s: now %s %s (epoch %d)\n", cmd, name, server, st.HA.Role, st.HA.State, st.HA.Epoch)
	if st.HA.Reason != "" {
		fmt.Fprintf(c.App.Writer, "  ! %s\n", st.HA.Reason)
	}
	return nil
}

// activeSource picks the side that serves the job (role source, not fenced).
func activeSource(views []view) (string, error) {
	for _, v := range views {
		if v.Status != nil && v.Status.HA.Role == ha.RoleSource && v.Status.HA.State != ha.StateSuperseded {
			return v.Server, nil
		}
	}
	return "", unreachableErr(views, "the job's active source")
}

func unreachableErr(views []view, what string) error {
	var parts []string
	for _, v := range views {
		if v.Status == nil {
			parts = append(parts, fmt.Sprintf("%s: %s", v.Server, v.Err))
		} else {
			parts = append(parts, fmt.Sprintf("%s: %s %s", v.Server, v.Status.HA.Role, v.Status.HA.State))
		}
	}
	return errors.New("cannot reach " + what + " (" + strings.Join(parts, "; ") + ")")
}

func jobSimple(cmd ha.EventType) cli.ActionFunc {
	return func(c *cli.Context) error {
		return sendCommand(c, cmd, api.CommandOptions{}, activeSource)
	}
}

func jobDelete(c *cli.Context) error {
	name, err := oneArg(c, "doppel job delete NAME")
	if err != nil {
		return err
	}
	e, err := newClientEnv(c)
	if err != nil {
		return err
	}
	views, err := e.findJob(c.Context, name)
	if err != nil {
		return err
	}
	// The target side first: the source keeps sending the job's
	// heartbeats until its own delete, so the peer's probe, which may
	// judge a sibling job's heartbeats by this job's, never hears silence.
	slices.SortStableFunc(views, func(a, b view) int {
		rank := func(v view) int {
			if v.Status != nil && v.Status.HA.Role == ha.RoleSource {
				return 1
			}
			return 0
		}
		return rank(a) - rank(b)
	})
	// Nothing is deleted anywhere while the volume is in use somewhere
	// (each agent refuses on its own too).
	if !c.Bool("force") {
		var users []string
		for _, v := range views {
			if v.Status != nil {
				for _, u := range v.Status.Data.Users {
					users = append(users, v.Server+": "+u)
				}
			}
		}
		if len(users) > 0 {
			return fmt.Errorf("job %s not deleted (nothing was changed): its volume is in use (%s). Stop the application (unmount) first, or delete with --force: it loses its disk",
				name, strings.Join(users, "; "))
		}
	}
	var errs []error
	for _, v := range views {
		if v.Status == nil {
			if v.err != nil && !api.IsKind(v.err, "not_found") {
				errs = append(errs, fmt.Errorf("%s: %s (delete it there when it is back)", v.Server, v.Err))
			}
			continue
		}
		cl, err := e.client(v.Server)
		var res api.DeleteResult
		if err == nil {
			ctx, cancel := context.WithTimeout(c.Context, 30*time.Second)
			res, err = cl.DeleteJobWith(ctx, name, api.DeleteOptions{KeepState: c.Bool("keep-state"), Force: c.Bool("force")})
			cancel()
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", v.Server, err))
			continue
		}
		fmt.Fprintf(c.App.Writer, "deleted job %s on %s\n", name, v.Server)
		if res.Archived != "" {
			fmt.Fprintf(c.App.Writer, "  %s: kept in %s\n", v.Server, res.Archived)
		}
	}
	return errors.Join(errs...)
}
