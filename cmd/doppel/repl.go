package main

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/urfave/cli/v2"

	"github.com/doppelha/doppel/blockdev"
	"github.com/doppelha/doppel/daemon/job"
	"github.com/doppelha/doppel/daemon/repl"
	"github.com/doppelha/doppel/daemon/repl/wire"
	"github.com/doppelha/doppel/daemon/tlspin"
)

const defaultCertDir = "/var/lib/doppel/repl-tls"

// replCommand is `doppel repl`: the replication engine as plumbing
// commands (source, target, fingerprint), used by tests and benchmarks.
func replCommand() *cli.Command {
	return &cli.Command{
		Name:        "repl",
		Usage:       "plumbing: run a replication source or target",
		Subcommands: []*cli.Command{replSourceCommand(), replTargetCommand(), replFingerprintCommand()},
	}
}

// transportFlags are shared by source and target.
func transportFlags() []cli.Flag {
	return []cli.Flag{
		&cli.BoolFlag{Name: "insecure", Usage: "plaintext replication (no TLS, no authentication): only on a trusted, private link"},
		&cli.StringFlag{Name: "cert-dir", Value: defaultCertDir, Usage: "`DIR` holding this side's TLS certificate (a self-signed ECDSA one is created on first use)"},
		&cli.StringFlag{Name: "peer-fingerprint", Usage: "`SHA256` fingerprint of the peer's certificate (see `doppel repl fingerprint`)"},
		&cli.StringFlag{Name: "metrics-listen", Usage: "serve Prometheus metrics on `HOST:PORT` (/metrics)"},
		&cli.DurationFlag{Name: "keepalive", Value: repl.DefaultKeepalive, Usage: "send a keepalive after `DURATION` without sending anything (protocol version 2 peers)"},
		&cli.DurationFlag{Name: "keepalive-timeout", Value: repl.DefaultTimeout, Usage: "drop the session after `DURATION` without anything from the peer (also TCP_USER_TIMEOUT)"},
		&cli.BoolFlag{Name: "json", Usage: "log as JSON lines"},
		&cli.BoolFlag{Name: "debug", Usage: "debug logs"},
	}
}

// replLiveness is the session keepalive the flags ask for.
func replLiveness(c *cli.Context) (repl.Liveness, error) {
	l := repl.Liveness{Interval: c.Duration("keepalive"), Timeout: c.Duration("keepalive-timeout")}
	if l.Interval <= 0 || l.Timeout <= 0 {
		return l, usageErrorf("--keepalive and --keepalive-timeout must be positive")
	}
	return l, nil
}

func replLogger(c *cli.Context) *slog.Logger {
	opts := &slog.HandlerOptions{}
	if c.Bool("debug") {
		opts.Level = slog.LevelDebug
	}
	if c.Bool("json") {
		return slog.New(slog.NewJSONHandler(os.Stderr, opts))
	}
	return slog.New(slog.NewTextHandler(os.Stderr, opts))
}

// replTLS returns this side's TLS configuration, or nil with --insecure.
func replTLS(c *cli.Context, log *slog.Logger, server bool) (*tls.Config, error) {
	if c.Bool("insecure") {
		if c.String("peer-fingerprint") != "" {
			return nil, usageErrorf("--insecure and --peer-fingerprint exclude each other")
		}
		log.Warn("replication link is plaintext and unauthenticated (--insecure)")
		return nil, nil
	}
	if c.String("peer-fingerprint") == "" {
		return nil, usageErrorf("--peer-fingerprint is required (the peer's `doppel repl fingerprint`), or --insecure for plaintext")
	}
	if _, err := tlspin.Parse(c.String("peer-fingerprint")); err != nil {
		return nil, usageErrorf("--peer-fingerprint: %v", err)
	}
	cert, fp, err := repl.LoadOrCreateCert(c.String("cert-dir"))
	if err != nil {
		return nil, err
	}
	log.Info("TLS certificate", "fingerprint", fp, "cert_dir", c.String("cert-dir"))
	if server {
		return tlspin.ServerConfig(cert, c.String("peer-fingerprint"))
	}
	return tlspin.ClientConfig(&cert, c.String("peer-fingerprint"))
}

// serveMetrics serves reg on addr until ctx is done.
func serveMetrics(ctx context.Context, log *slog.Logger, addr string, cs ...prometheus.Collector) (func(), error) {
	if addr == "" {
		return func() {}, nil
	}
	reg := prometheus.NewRegistry()
	for _, c := range cs {
		if err := reg.Register(c); err != nil {
			return nil, err
		}
	}
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("metrics: %w", err)
	}
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go srv.Serve(l)
	log.Info("metrics", "listen", l.Addr().String())
	return func() {
		sctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		srv.Shutdown(sctx)
	}, nil
}

// sourceFlags are the `repl source` flags that the plain path and the
// --state-dir path (repl_state.go) share, parsed and validated without side
// effects.
type sourceFlags struct {
	size, chunk, queueSize, rateLimit int64
	mode                              wire.Mode
	mirror                            repl.MirrorKind
	tnet, taddr                       string
	codec                             *wire.Codec
}

func parseSourceFlags(c *cli.Context) (sourceFlags, error) {
	var f sourceFlags
	var err error
	if f.size, err = optionalSize(c, "size"); err != nil {
		return f, err
	}
	switch c.String("mode") {
	case "sync":
		f.mode = wire.ModeSync
	case "async":
		f.mode = wire.ModeAsync
	default:
		return f, usageErrorf("--mode %q: want sync or async", c.String("mode"))
	}
	if f.mirror, err = repl.ParseMirrorKind(c.String("mirror")); err != nil {
		return f, usageErrorf("--mirror: %v", err)
	}
	if _, _, err := blockdev.ParseListen(c.String("listen")); err != nil {
		return f, usageErrorf("--listen: %v", err)
	}
	if f.tnet, f.taddr, err = blockdev.ParseListen(c.String("target")); err != nil || !strings.HasPrefix(f.tnet, "tcp") {
		return f, usageErrorf("--target %q: want tcp:HOST:PORT", c.String("target"))
	}
	if f.chunk, err = optionalSize(c, "chunk-size"); err != nil {
		return f, err
	}
	if f.queueSize, err = optionalSize(c, "queue-size"); err != nil {
		return f, err
	}
	if s := strings.TrimSuffix(c.String("bwlimit"), "/s"); s != "" {
		if f.rateLimit, err = job.ParseSize(s); err != nil {
			return f, usageErrorf("--bwlimit: %v", err)
		}
	}
	if f.codec, err = wire.NewCodec(c.String("compress")); err != nil {
		return f, usageErrorf("--compress: %v", err)
	}
	return f, nil
}

// dialer returns how the source connects to its target: TLS with the pinned
// peer unless --insecure (replTLS creates this side's certificate on first
// use), and the TLS config (nil when plaintext).
func (f sourceFlags) dialer(c *cli.Context, log *slog.Logger) (func(context.Context) (net.Conn, error), *tls.Config, error) {
	tlsConf, err := replTLS(c, log, false)
	if err != nil {
		return nil, nil, err
	}
	return func(ctx context.Context) (net.Conn, error) {
		d := net.Dialer{Timeout: 10 * time.Second, KeepAlive: 15 * time.Second}
		if tlsConf != nil {
			td := tls.Dialer{NetDialer: &d, Config: tlsConf}
			return td.DialContext(ctx, f.tnet, f.taddr)
		}
		return d.DialContext(ctx, f.tnet, f.taddr)
	}, tlsConf, nil
}
func optionalSize(c *cli.Context, name string) (int64, error) {
	s := c.String(name)
	if s == "" {
		return 0, nil
	}
	v, err := job.ParseSize(s)
	if err != nil {
		return 0, usageErrorf("--%s: %v", name, err)
	}
	return v, nil
}

func closeBackend(b blockdev.Backend) error {
	if c, ok := b.(interface{ Close() error }); ok {
		return c.Close()
	}
	return nil
}

func replSourceCommand() *cli.Command {
	return &cli.Command{
		Name:      "source",
		Usage:     "serve a volume over NBD and replicate every write to a target",
		ArgsUsage: " ",
		Description: "Serves --file as an NBD export on --listen (also under the default, empty\n" +
			"export name) and replicates every write, trim, write-zeroes and flush to the\n" +
			"target, in order: --mode sync acknowledges a write once the target applied it,\n" +
			"--mode async once it is written locally and queued. Flush and FUA are barriers\n" +
			"in both modes. --mirror copies the volume first (full: allocated non-zero\n" +
			"ranges; diff: only chunks whose checksums differ) while writes continue.\n" +
			"SIGINT/SIGTERM stop the NBD server, wait until the target has applied\n" +
			"everything (up to --drain-timeout), and exit.",
		Flags: append([]cli.Flag{
			&cli.StringFlag{Name: "file", Required: true, Usage: "`PATH` of the protected file or block device"},
			&cli.StringFlag{Name: "size", Usage: "`SIZE` to create a missing file with (1G, 512M, bytes)"},
			&cli.StringFlag{Name: "listen", Required: true, Usage: "NBD `ADDR`: unix:PATH or tcp:HOST:PORT"},
			&cli.StringFlag{Name: "name", Usage: "NBD export `NAME` (the default name is served too)"},
			&cli.StringFlag{Name: "target", Required: true, Usage: "replication target `ADDR`: tcp:HOST:PORT"},
			&cli.StringFlag{Name: "mode", Required: true, Usage: "`sync` or `async`"},
			&cli.StringFlag{Name: "mirror", Value: "full", Usage: "initial copy: `full`, diff or none"},
			&cli.BoolFlag{Name: "verify", Usage: "after the mirror, compare checksums and log differing ranges"},
			&cli.BoolFlag{Name: "verify-resync", Usage: "like --verify, and resync the differing ranges"},
			&cli.StringFlag{Name: "chunk-size", Value: "64K", Usage: "mirror/checksum chunk `SIZE` (power of two, 4K..16M)"},
			&cli.StringFlag{Name: "queue-size", Value: "128M", Usage: "memory queue `SIZE` (async back pressure beyond it)"},
			&cli.StringFlag{Name: "compress", Value: "none", Usage: "payload compression: `none`, zstd or lz4"},
			&cli.StringFlag{Name: "bwlimit", Usage: "cap replication traffic at `RATE` bytes/s (100M, 1G)"},
			&cli.DurationFlag{Name: "drain-timeout", Value: 60 * time.Second, Usage: "on shutdown, wait at most `DURATION` for the target"},
		}, append(transportFlags(), sourceStateFlags()...)...),
		Action: replSource,
	}
}

// sourceEngine is what `repl source` runs behind its NBD server: the plain
// engine (daemon/repl) or, with --state-dir, the one with persistent state
// (daemon/replstate, repl_state.go).
type sourceEngine interface {
	blockdev.Mutator
	drainer
	Run(ctx context.Context) error
	Close() error
	collectors() []prometheus.Collector
	// started runs once the NBD server and the link run (the plain
	// engine's mirror and verify); ctx ends with the NBD server.
	started(ctx context.Context, log *slog.Logger)
	// state is the engine's part of the start and stop log lines.
	state() []any
}

func replSource(c *cli.Context) error {
	if c.NArg() > 0 {
		return usageErrorf("repl source: unexpected argument %q", c.Args().First())
	}
	log := replLogger(c)
	f, err := parseSourceFlags(c)
	if err != nil {
		return err
	}
	var st stateSourceFlags
	stateful := c.String("state-dir") != ""
	if stateful {
		if st, err = parseStateSourceFlags(c, f); err != nil {
			return err
		}
	}
	dial, tlsConf, err := f.dialer(c, log)
	if err != nil {
		return err
	}
	live, err := replLiveness(c)
	if err != nil {
		return err
	}
	b, err := blockdev.OpenExclusive(c.String("file"), f.size)
	if err != nil {
		return err
	}
	defer closeBackend(b)
	var eng sourceEngine
	if stateful {
		eng, err = openStateSource(c, log, f, st, b, dial, live) // repl_state.go
	} else {
		eng, err = openPlainSource(c, f, b, dial, live, log)
	}
	if err != nil {
		return err
	}
	srv, err := blockdev.NewServer(log, blockdev.Export{Name: c.String("name"), Description: "doppel replicated " + filepath.Base(c.String("file")),
		Backend: b, Mutator: eng})
	if err != nil {
		eng.Close()
		return err
	}
	stopMetrics, err := serveMetrics(c.Context, log, c.String("metrics-listen"), eng.collectors()...)
	if err != nil {
		eng.Close()
		return err
	}
	defer stopMetrics()
	l, err := blockdev.Listen(c.String("listen"))
	if err != nil {
		eng.Close()
		return err
	}

	// The link outlives the NBD server so that shutdown can drain.
	linkCtx, stopLink := context.WithCancel(context.Background())
	defer stopLink()
	runErr := make(chan error, 1)
	go func() { runErr <- eng.Run(linkCtx) }()
	nbdCtx, stopNBD := context.WithCancel(c.Context)
	defer stopNBD()
	nbdErr := make(chan error, 1)
	go func() { nbdErr <- srv.Serve(nbdCtx, l) }()
	log.Info("replication source serving", append([]any{"file", c.String("file"), "size", b.Size(), "listen", c.String("listen"),
		"target", f.taddr, "mode", f.mode, "mirror", f.mirror, "tls", tlsConf != nil}, eng.state()...)...)
	eng.started(nbdCtx, log)

	fatal := shutdownSource(c.Context, log, c.Duration("drain-timeout"), eng, runErr, nbdErr, stopNBD, stopLink)
	log.Info("replication source stopped", eng.state()...)
	return errors.Join(fatal, eng.Close(), b.Sync())
}

// plainSource is the engine without persistent state: whatever the target
// lacks at exit is lost to it.
type plainSource struct {
	*repl.Stream
	mirror         repl.MirrorKind
	verify, resync bool
}

func openPlainSource(c *cli.Context, f sourceFlags, b blockdev.Backend, dial func(context.Context) (net.Conn, error), live repl.Liveness, log *slog.Logger) (sourceEngine, error) {
	src, err := repl.NewStream(repl.StreamConfig{Backend: b, Mode: f.mode, ChunkSize: f.chunk,
		Backlog: repl.NewMemBacklog(f.queueSize), Dial: dial, Codec: f.codec, RateLimit: f.rateLimit, Log: log, Liveness: live})
	if err != nil {
		return nil, err
	}
	return plainSource{Stream: src, mirror: f.mirror, verify: c.Bool("verify") || c.Bool("verify-resync"), resync: c.Bool("verify-resync")}, nil
}

func (p plainSource) collectors() []prometheus.Collector {
	return []prometheus.Collector{p.Collector()}
}

func (p plainSource) started(ctx context.Context, log *slog.Logger) {
	go func() {
		if _, err := p.Mirror(ctx, p.mirror); err != nil {
			if ctx.Err() == nil {
				log.Error("mirror failed", "err", err)
			}
			return
		}
		if p.verify {
			if _, err := p.Verify(ctx, p.resync); err != nil && ctx.Err() == nil {
				log.Error("verify failed", "err", err)
			}
		}
	}()
}

func (p plainSource) state() []any {
	st := p.Stats()
	return []any{"acked_seq", st.AckedSeq, "sent_bytes", st.SentBytes, "payload_bytes", st.PayloadBytes}
}

func (p plainSource) failWaiters() { p.Stream.Close() }

func (p plainSource) drain(ctx context.Context, log *slog.Logger) error {
	if err := p.WaitAcked(ctx); err != nil {
		st := p.Stats()
		return fmt.Errorf("drain: target applied up to %d of %d: %w", st.AckedSeq, st.LastSeq, err)
	}
	log.Info("drained: the target applied everything", "seq", p.LastSeq())
	return nil
}

// drainer is the replication side of a source's shutdown.
type drainer interface {
	// failWaiters fails the writes still waiting for the target (sync
	// mode: the client sees EIO; with a state dir they are tracked).
	failWaiters()
	// drain waits (up to ctx) until the target applied everything; an
	// error is fatal.
	drain(ctx context.Context, log *slog.Logger) error
}

// shutdownSource is the shutdown of `repl source`, with or without a state
// dir: wait for ctx, a replication error (runErr) or an NBD server error
// (nbdErr); stop the NBD server, failing the writes still waiting for the
// target after drainTimeout; drain the link (unless something failed);
// stop the link. Both channels are buffered 1; it returns the first error.
func shutdownSource(ctx context.Context, log *slog.Logger, drainTimeout time.Duration, d drainer,
	runErr, nbdErr chan error, stopNBD, stopLink func()) error {
	var fatal error
	select {
	case <-ctx.Done():
		log.Info("shutting down: stopping the NBD server")
	case err := <-runErr:
		fatal = err
		runErr <- err
		log.Error("replication stopped: stopping the NBD server", "err", err)
	case err := <-nbdErr:
		nbdErr <- err
		fatal = fmt.Errorf("nbd server: %w", err)
	}
	stopNBD()
	// In-flight sync writes wait for the target; if it does not answer
	// within the drain timeout they stop waiting.
	select {
	case err := <-nbdErr:
		nbdErr <- err
	case <-time.After(drainTimeout):
		log.Error("target not answering: failing the writes still waiting for it")
		d.failWaiters()
	}
	if err := <-nbdErr; err != nil && fatal == nil {
		fatal = fmt.Errorf("nbd server: %w", err)
	}
	if fatal == nil {
		dctx, cancel := context.WithTimeout(context.Background(), drainTimeout)
		fatal = d.drain(dctx, log)
		cancel()
	}
	stopLink()
	if err := <-runErr; err != nil && fatal == nil {
		fatal = err
	}
	return fatal
}

func replTargetCommand() *cli.Command {
	return &cli.Command{
		Name:      "target",
		Usage:     "receive a replicated volume and apply it in order",
		ArgsUsage: " ",
		Description: "Listens on --listen for a replication source and applies its writes to\n" +
			"--file in sequence order, fsyncing at every barrier. The last durable sequence\n" +
			"and the data state (consistent, or inconsistent during a mirror) persist in\n" +
			"the state directory. SIGINT/SIGTERM sync and exit.",
		Flags: append([]cli.Flag{
			&cli.StringFlag{Name: "file", Required: true, Usage: "`PATH` of the file or block device receiving the copy"},
			&cli.StringFlag{Name: "size", Usage: "`SIZE` to create a missing file with"},
			&cli.StringFlag{Name: "listen", Required: true, Usage: "replication `ADDR`: tcp:HOST:PORT"},
			&cli.StringFlag{Name: "state-dir", Usage: "`DIR` for the target state (default: next to --file)"},
		}, append(transportFlags(), targetStateFlags()...)...),
		Action: replTarget,
	}
}

// targetEngine is what `repl target` serves: the plain engine or, with
// --state-dir, the one with persistent state (repl_state.go).
type targetEngine interface {
	Serve(ctx context.Context, l net.Listener) error
	Close() error
	Collector() prometheus.Collector
	// state is the engine's part of the start and stop log lines.
	state() []any
}

func replTarget(c *cli.Context) (err error) {
	if c.NArg() > 0 {
		return usageErrorf("repl target: unexpected argument %q", c.Args().First())
	}
	log := replLogger(c)
	size, err := optionalSize(c, "size")
	if err != nil {
		return err
	}
	network, _, err := blockdev.ParseListen(c.String("listen"))
	if err != nil || !strings.HasPrefix(network, "tcp") {
		return usageErrorf("--listen %q: want tcp:HOST:PORT", c.String("listen"))
	}
	if err := checkTargetDiscard(c); err != nil { // repl_state.go
		return err
	}
	file := c.String("file")
	if size == 0 {
		if _, err := os.Stat(file); errors.Is(err, os.ErrNotExist) {
			return usageErrorf("%s does not exist: give --size to create it", file)
		}
	}
	tlsConf, err := replTLS(c, log, true)
	if err != nil {
		return err
	}
	live, err := replLiveness(c)
	if err != nil {
		return err
	}
	b, err := blockdev.OpenExclusive(file, size)
	if err != nil {
		return err
	}
	defer func() { err = errors.Join(err, closeBackend(b)) }()
	var tgt targetEngine
	if dir := c.String("state-dir"); dir != "" {
		tgt, err = openStateTarget(c, dir, b, live, log) // repl_state.go
	} else {
		tgt, err = openPlainTarget(file+".repl-target.json", b, live, log)
	}
	if err != nil {
		return err
	}
	defer func() { err = errors.Join(err, tgt.Close()) }()
	stopMetrics, err := serveMetrics(c.Context, log, c.String("metrics-listen"), tgt.Collector())
	if err != nil {
		return err
	}
	defer stopMetrics()
	l, err := blockdev.Listen(c.String("listen"))
	if err != nil {
		return err
	}
	if tlsConf != nil {
		l = tls.NewListener(l, tlsConf)
	}
	log.Info("replication target listening", append([]any{"file", file, "size", b.Size(), "listen", l.Addr().String(), "tls", tlsConf != nil}, tgt.state()...)...)
	err = tgt.Serve(c.Context, l)
	log.Info("replication target stopped", tgt.state()...)
	return err
}

// plainTarget is the target engine without persistent state: its applied
// sequence and data state live in one file next to the volume.
type plainTarget struct {
	*repl.Applier
	statePath string
}

func openPlainTarget(statePath string, b blockdev.Backend, live repl.Liveness, log *slog.Logger) (targetEngine, error) {
	tgt, err := repl.NewApplier(repl.ApplierConfig{Backend: b, StatePath: statePath, Log: log, Liveness: live})
	if err != nil {
		return nil, err
	}
	return plainTarget{Applier: tgt, statePath: statePath}, nil
}

func (p plainTarget) state() []any {
	st, durable, _ := p.Status()
	return []any{"state", p.statePath, "data_state", st.State, "applied_seq", st.Applied, "durable_seq", durable}
}

func replFingerprintCommand() *cli.Command {
	return &cli.Command{
		Name:      "fingerprint",
		Usage:     "print this host's replication certificate fingerprint (creating the certificate if needed)",
		ArgsUsage: " ",
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "cert-dir", Value: defaultCertDir, Usage: "certificate `DIR`"},
		},
		Action: func(c *cli.Context) error {
			_, fp, err := repl.LoadOrCreateCert(c.String("cert-dir"))
			if err != nil {
				return err
			}
			fmt.Fprintln(c.App.Writer, fp)
			return nil
		},
	}
}
