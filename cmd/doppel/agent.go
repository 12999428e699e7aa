package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/doppelha/doppel/blockdev/kernel"
	"github.com/doppelha/doppel/daemon/agent"
	"github.com/doppelha/doppel/daemon/api"
	"github.com/doppelha/doppel/ebpf/heartbeat"
	"github.com/doppelha/doppel/netident"
	"github.com/urfave/cli/v2"
	"github.com/vishvananda/netns"
	"go.yaml.in/yaml/v3"
)

// version is set at build time (-ldflags -X main.version=...).
var version = "dev"

// agentCommand runs the daemon.
func agentCommand() *cli.Command {
	return &cli.Command{
		Name:  "agent",
		Usage: "run the doppel agent (daemon)",
		Description: "Runs the agent: the control API (HTTPS, bearer token), the protection jobs\n" +
			"stored in the state dir, their failover state machines, the failure probe.\n" +
			"First start creates STATE/tls/{cert,key}.pem and STATE/token (mode 0600):\n" +
			"give the token file to `doppel server add`. Flags override --config.",
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "config", Usage: "YAML config `FILE` (every key documented in the installed /etc/doppel/agent.yaml)"},
			// No Value: a flag overrides the config file only when given;
			// DefaultText shows what applies when neither sets it.
			&cli.StringFlag{Name: "state-dir", Usage: "job state, certificate and token", DefaultText: "/var/lib/doppel"},
			&cli.StringFlag{Name: "control-listen", Usage: "control API address", DefaultText: ":6320"},
			&cli.StringFlag{Name: "repl-listen", Usage: "replication address; its host is what peers connect to", DefaultText: ":6325"},
			&cli.IntFlag{Name: "heartbeat-port", Usage: "UDP heartbeat port", DefaultText: "6326"},
			&cli.StringFlag{Name: "probe-mode", Usage: "auto, xdp-driver, xdp-generic or userspace", DefaultText: "auto"},
			&cli.StringFlag{Name: "metrics-listen", Usage: "also serve /metrics in plain HTTP without a token on `HOST:PORT` (the control port serves them with the API token)"},
			&cli.StringSliceFlag{Name: "probe-iface", Usage: "interface the XDP probe attaches to (repeatable)", DefaultText: "the interface of the route to each peer address"},
			&cli.StringSliceFlag{Name: "arbiter-endpoints", Usage: "etcd endpoints of the arbiter (repeatable or comma-separated, e.g. http://10.0.0.5:2379); config: arbiter.endpoints"},
			&cli.StringFlag{Name: "arbiter-ca", Usage: "CA file of the etcd servers (TLS)"},
			&cli.StringFlag{Name: "arbiter-cert", Usage: "client certificate file for etcd"},
			&cli.StringFlag{Name: "arbiter-key", Usage: "its key file"},
			&cli.StringFlag{Name: "arbiter-prefix", Usage: "etcd key prefix", DefaultText: "/doppel"},
			&cli.StringFlag{Name: "log-level", Value: "info", Usage: "debug, info, warn or error"},
			&cli.BoolFlag{Name: "log-json", Usage: "log as JSON instead of text"},
		},
		Action: runAgent,
		Subcommands: []*cli.Command{
			{
				Name:  "restart",
				Usage: "restart (or upgrade) an agent without taking the volumes away from their applications",
				Description: "The agent named by --server starts the doppel binary installed now (an\n" +
					"upgrade: install the new one first) and hands it its state: the jobs' volumes,\n" +
					"their exports' sockets and connected clients, the control listener. The\n" +
					"applications see a pause, not an error. Same as SIGHUP (systemctl reload).\n" +
					"If the new agent fails, the old one keeps (or takes back) its jobs.",
				Flags:  connFlags(),
				Action: agentRestart,
			},
			{
				Name:  "stop",
				Usage: "stop an agent (refused while a job's volume is in use, unless --force)",
				Description: "Asks the agent named by --server to stop. It refuses while any job's volume\n" +
					"is in use there (NBD clients connected to its export, its /dev/nbdN mounted or\n" +
					"held open) and says by whom; --force stops it anyway: those users lose their disks.",
				Flags:  append(connFlags(), &cli.BoolFlag{Name: "force", Usage: "stop even while volumes are in use"}),
				Action: agentStop,
			},
		},
	}
}

// agentRestart asks one agent (--server) to restart.
func agentRestart(c *cli.Context) error {
	if args, err := positional(c); err != nil || len(args) != 0 {
		return usageErrorf("usage: doppel agent restart --server NAME")
	}
	f, err := fleet(c)
	if err != nil {
		return err
	}
	if f.Only() == "" {
		return usageErrorf("doppel agent restart: name the agent with --server (one agent at a time)")
	}
	cl, err := f.Client(f.Only())
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(c.Context, 2*time.Minute)
	defer cancel()
	res, err := cl.RestartAgent(ctx)
	if err != nil {
		return fmt.Errorf("restart agent %s: %w", f.Only(), err)
	}
	fmt.Fprintf(c.App.Writer, "agent %s: %s\n", f.Only(), res.Message)
	return nil
}

// agentStop asks one agent (--server) to stop.
func agentStop(c *cli.Context) error {
	if args, err := positional(c); err != nil || len(args) != 0 {
		return usageErrorf("usage: doppel agent stop --server NAME [--force]")
	}
	f, err := fleet(c)
	if err != nil {
		return err
	}
	if f.Only() == "" {
		return usageErrorf("doppel agent stop: name the agent with --server (one agent at a time)")
	}
	cl, err := f.Client(f.Only())
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(c.Context, 30*time.Second)
	defer cancel()
	if _, err := cl.StopAgent(ctx, api.StopOptions{Force: c.Bool("force")}); err != nil {
		return fmt.Errorf("stop agent %s: %w", f.Only(), err)
	}
	fmt.Fprintf(c.App.Writer, "agent %s is stopping\n", f.Only())
	return nil
}

// loadAgentConfig reads the agent's YAML config file; an unknown key is an
// error (a typo must not silently leave a default in place).
func loadAgentConfig(path string) (agent.Config, error) {
	var cfg agent.Config
	b, err := os.ReadFile(path)
	if err != nil {
		return cfg, fmt.Errorf("read config: %w", err)
	}
	dec := yaml.NewDecoder(strings.NewReader(string(b)))
	dec.KnownFields(true)
	if err := dec.Decode(&cfg); err != nil && !errors.Is(err, io.EOF) {
		return cfg, fmt.Errorf("config %s: %w", path, err)
	}
	return cfg, nil
}

func runAgent(c *cli.Context) error {
	if c.NArg() > 0 {
		return usageErrorf("agent takes no arguments, got %q", c.Args().Slice())
	}
	var level slog.Level
	if err := level.UnmarshalText([]byte(c.String("log-level"))); err != nil {
		return usageErrorf("--log-level %q: %v", c.String("log-level"), err)
	}
	opts := &slog.HandlerOptions{Level: level}
	var h slog.Handler = slog.NewTextHandler(os.Stderr, opts)
	if c.Bool("log-json") {
		h = slog.NewJSONHandler(os.Stderr, opts)
	}
	log := slog.New(h)

	var cfg agent.Config
	if p := c.String("config"); p != "" {
		var err error
		if cfg, err = loadAgentConfig(p); err != nil {
			return err
		}
	}
	if v := c.String("state-dir"); v != "" {
		cfg.StateDir = v
	}
	if v := c.String("control-listen"); v != "" {
		cfg.ControlListen = v
	}
	if v := c.String("repl-listen"); v != "" {
		cfg.ReplListen = v
	}
	if c.IsSet("heartbeat-port") {
		cfg.HeartbeatPort = c.Int("heartbeat-port")
	}
	if v := c.String("probe-mode"); v != "" {
		cfg.ProbeMode = v
	}
	if v := c.String("metrics-listen"); v != "" {
		cfg.MetricsListen = v
	}
	if v := c.StringSlice("probe-iface"); len(v) > 0 {
		cfg.ProbeIfaces = v
	}
	if v := c.StringSlice("arbiter-endpoints"); len(v) > 0 {
		cfg.Arbiter.Endpoints = nil
		for _, e := range v {
			cfg.Arbiter.Endpoints = append(cfg.Arbiter.Endpoints, strings.Split(e, ",")...)
		}
	}
	for flag, dst := range map[string]*string{"arbiter-ca": &cfg.Arbiter.CA, "arbiter-cert": &cfg.Arbiter.Cert, "arbiter-key": &cfg.Arbiter.Key, "arbiter-prefix": &cfg.Arbiter.Prefix} {
		if v := c.String(flag); v != "" {
			*dst = v
		}
	}
	cfg.Defaults()
	cfg.Version = version
	if cfg.HeartbeatPort < 1 || cfg.HeartbeatPort > 65535 {
		return usageErrorf("--heartbeat-port %d is not 1-65535", cfg.HeartbeatPort)
	}
	mode, err := heartbeat.ParseMode(cfg.ProbeMode)
	if err != nil {
		return usageErrorf("--probe-mode: %v", err)
	}

	// The agent serves /dev/nbdN: it must never be throttled into waiting
	// on its own writeback.
	if err := kernel.SetIOFlusher(); err != nil {
		log.Warn("PR_SET_IO_FLUSHER not set", "err", err)
	}

	// Started by a restarting agent (SIGHUP, doppel agent restart): say we
	// are up and take its state over. It has stopped its jobs (not what
	// they serve) and released the probe's socket when this returns.
	var handover *agent.Handover
	if fd := os.Getenv(agent.HandoverEnv); fd != "" {
		os.Unsetenv(agent.HandoverEnv)
		n, err := strconv.Atoi(fd)
		if err != nil || n < 3 {
			return fmt.Errorf("%s=%q: not a descriptor", agent.HandoverEnv, fd)
		}
		if handover, err = agent.ReceiveHandover(os.NewFile(uintptr(n), "handover"), version); err != nil {
			return fmt.Errorf("take over from the previous agent: %w", err)
		}
		log.Info("taking over from the previous agent", "its_version", handover.Version(), "version", version)
	}
	takeOver := func(err error) error {
		if handover != nil && err != nil {
			handover.Ack(err) // it takes its jobs back at once
			handover.Close()
		}
		return err
	}

	subs := agent.Subsystems{
		Volumes: &agent.NBDVolumes{Log: log, RunDir: filepath.Join(cfg.StateDir, "run"), Kernel: true},
	}
	arb, err := agent.DialArbiter(log, cfg.Arbiter)
	if err != nil {
		return usageErrorf("%v", err)
	}
	if arb != nil {
		defer arb.Close()
		subs.Arbiter = arb
		log.Info("arbiter", "endpoints", cfg.Arbiter.Endpoints)
	}
	if sys, err := netident.OpenLinux(nil, netns.None()); err != nil {
		log.Warn("network identity unavailable: service IPs will not move", "err", err)
	} else {
		defer sys.Close()
		m := netident.New(log, sys, sys, netident.Config{})
		defer m.Close()
		subs.NetIdent = agent.NetIdentManager{M: m}
	}
	// Without --probe-iface the XDP probe attaches to the interface of the
	// route to each peer address it watches; the userspace fallback
	// listens on every address. A restart's successor opens its own (this
	// agent's is closed first, and opened again if the successor fails).
	var probe heartbeat.Probe
	var live *agent.ProbeLiveness
	openProbe := func() error {
		p, err := heartbeat.Open(heartbeat.Config{Interfaces: cfg.ProbeIfaces, Mode: mode, Port: uint16(cfg.HeartbeatPort), Logger: log})
		if err != nil {
			log.Warn("failure probe unavailable: no failure detection", "err", err)
			probe, live = nil, nil
			return nil
		}
		inc, err := agent.NextIncarnation(cfg.StateDir, time.Now())
		if err != nil {
			p.Close()
			return err
		}
		probe = p
		live = &agent.ProbeLiveness{Log: log, Probe: p, Port: uint16(cfg.HeartbeatPort), Incarnation: inc}
		log.Info("failure probe", "mode", p.Mode(), "interfaces", cfg.ProbeIfaces, "incarnation", inc)
		return nil
	}
	if err := openProbe(); err != nil {
		return takeOver(err)
	}
	if live != nil {
		subs.Liveness = live
	}
	defer func() {
		if probe != nil {
			probe.Close()
		}
	}()
	// A restart starts the binary installed now (an upgrade) with the
	// same arguments; os.Executable names it even once replaced.
	cfg.Successor = func(sock *os.File) (agent.Successor, error) {
		exe, err := os.Executable()
		if err != nil {
			return nil, err
		}
		return agent.SuccessorCommand(exe, os.Args[1:], os.Environ())(sock)
	}
	a, err := agent.New(log, cfg, subs)
	if err != nil {
		return takeOver(err)
	}
	// The successor opens its own probe (its heartbeat socket, its XDP
	// program): this agent's goes first, and comes back if it fails.
	a.BeforeHandover = func() {
		sdNotify(log, "RELOADING=1")
		if probe != nil {
			probe.Close()
			probe = nil
		}
	}
	a.AfterFailedHandover = func() error {
		err := openProbe()
		if live != nil {
			a.Subsystems.Liveness = live
		} else {
			a.Subsystems.Liveness = nil
		}
		sdNotify(log, "READY=1")
		return err
	}
	a.OnServing = func() {
		if handover != nil {
			if err := handover.Ack(nil); err != nil {
				log.Error("tell the previous agent we took over", "err", err)
			}
		}
		sdNotify(log, fmt.Sprintf("MAINPID=%d\nREADY=1", os.Getpid()))
	}
	// The replication engine authenticates with the agent's certificate:
	// the one pinned at doppel server add.
	planes := &agent.ReplPlanes{Log: log, Cert: a.Credentials.Cert, ReplListen: cfg.ReplListen, StateDir: cfg.StateDir}
	planes.SessionRecorder = func(job string) func() {
		if live == nil {
			return nil
		}
		return live.SessionRecorder(job)
	}
	a.Subsystems.DataPlane = planes.Open
	a.Subsystems.ReplListener = planes
	// SIGTERM (systemctl stop) and SIGINT stop the agent once no volume
	// is in use; a second one, or doppel agent stop --force, at once.
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	defer signal.Stop(sigs)
	go func() {
		forced := false
		for sig := range sigs {
			log.Info("signal", "signal", sig, "force", forced)
			a.Shutdown(forced)
			forced = true
		}
	}()
	// SIGHUP (systemctl reload): restart, keeping the volumes served.
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	go func() {
		for range hup {
			if pid, err := a.Restart(context.Background()); err != nil {
				log.Error("restart", "err", err)
			} else {
				log.Info("restarted: the new agent serves", "pid", pid)
			}
		}
	}()
	// The agent's own signal handling decides when it stops: not the
	// CLI's context, cancelled by the first signal.
	ctx := context.WithoutCancel(c.Context)
	if handover != nil {
		a.SetHandover(handover)
		l, lerr := handover.Control()
		if lerr == nil && l == nil {
			l, lerr = net.Listen("tcp", cfg.ControlListen)
		}
		if lerr != nil {
			return takeOver(fmt.Errorf("control listener: %w", lerr))
		}
		err = a.Serve(ctx, l)
	} else {
		err = a.Run(ctx)
	}
	switch {
	case err != nil:
		return err
	case a.HandedOver():
		log.Info("agent handed over to its successor: exiting")
	default:
		log.Info("agent stopped")
	}
	return nil
}

// sdNotify sends state to systemd when it started the agent with
// Type=notify (NOTIFY_SOCKET set); otherwise it does nothing.
func sdNotify(log *slog.Logger, state string) {
	path := os.Getenv("NOTIFY_SOCKET")
	if path == "" {
		return
	}
	if path[0] == '@' {
		path = "\x00" + path[1:]
	}
	c, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		log.Warn("sd_notify", "err", err)
		return
	}
	defer c.Close()
	if _, err := c.Write([]byte(state)); err != nil {
		log.Warn("sd_notify", "err", err)
	}
}
