package main

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"

	"github.com/doppelha/doppel/blockdev"
	"github.com/doppelha/doppel/daemon/job"
	"github.com/doppelha/doppel/daemon/replstate"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/urfave/cli/v2"
)

// sourceStateFlags are the `repl source` flags of the persistent state
// (daemon/replstate).
func sourceStateFlags() []cli.Flag {
	return []cli.Flag{
		&cli.StringFlag{Name: "state-dir", Usage: "`DIR` for the persistent state (bitmap, activity log, generations, disk queue): a killed and restarted source resyncs only what changed"},
		&cli.StringFlag{Name: "disk-queue-size", Value: "2048M", Usage: "with --state-dir: disk queue `SIZE` beyond the memory queue (0: none); when both are full, changes are tracked in the bitmap"},
		&cli.DurationFlag{Name: "sync-timeout", Value: replstate.DefaultSyncTimeout, Usage: "with --state-dir, sync mode: after `DURATION` without the target, continue in tracking mode"},
		&cli.StringFlag{Name: "discard-on", Usage: "with --state-dir: resolve a split brain by discarding `SIDE`'s divergent data (target; it is saved first)"},
		&cli.StringFlag{Name: "resync-rate", Usage: "with --state-dir: cap resync traffic at `RATE` bytes/s (never below 10M)"},
		&cli.BoolFlag{Name: "force", Usage: "with --state-dir: promote this side even if its data is inconsistent"},
	}
}

// targetStateFlags are the `repl target` flags of the persistent state.
func targetStateFlags() []cli.Flag {
	return []cli.Flag{
		&cli.StringFlag{Name: "discard-on", Usage: "with --state-dir: accept a split-brain resolution that discards this `SIDE` (target; its divergent chunks are saved first)"},
	}
}

// replSourceState is `repl source --state-dir`.
func replSourceState(c *cli.Context) error {
	log := replLogger(c)
	f, err := parseSourceFlags(c)
	if err != nil {
		return err
	}
	chunk := f.chunk
	if chunk > 64<<10 {
		return usageErrorf("--chunk-size %d: with --state-dir the bitmap chunk is at most 64K", chunk)
	}
	memQ := f.queueSize
	diskQ := int64(-1) // "0": no disk queue
	if c.String("disk-queue-size") != "0" {
		if diskQ, err = optionalSize(c, "disk-queue-size"); err != nil {
			return err
		}
	}
	var resyncRate int64
	if s := strings.TrimSuffix(c.String("resync-rate"), "/s"); s != "" {
		if resyncRate, err = job.ParseSize(s); err != nil {
			return usageErrorf("--resync-rate: %v", err)
		}
	}
	switch d := c.String("discard-on"); d {
	case "", "target":
	case "source":
		return usageErrorf("%s", discardSourceHint(c, true))
	default:
		return usageErrorf("--discard-on %q: want target (or source, which tells how to swap the roles)", d)
	}
	dial, tlsConf, err := f.dialer(c, log)
	if err != nil {
		return err
	}
	live, err := replLiveness(c)
	if err != nil {
		return err
	}
	mode, mirror, taddr, codec, rateLimit := f.mode, f.mirror, f.taddr, f.codec, f.rateLimit
	b, err := blockdev.OpenExclusive(c.String("file"), f.size)
	if err != nil {
		return err
	}
	defer closeBackend(b)
	src, err := replstate.OpenSource(replstate.SourceConfig{Dir: c.String("state-dir"), Backend: b, Mode: mode, ChunkSize: chunk,
		MemQueue: memQ, DiskQueue: diskQ, Dial: dial, Codec: codec, RateLimit: rateLimit, ResyncRate: resyncRate,
		SyncTimeout: c.Duration("sync-timeout"), Discard: c.String("discard-on"), Mirror: mirror, Force: c.Bool("force"), Log: log, Liveness: live})
	if err != nil {
		return err
	}
	srv, err := blockdev.NewServer(log, blockdev.Export{Name: c.String("name"), Description: "doppel replicated " + filepath.Base(c.String("file")),
		Backend: b, Mutator: src})
	if err != nil {
		src.Close()
		return err
	}
	stopMetrics, err := serveMetrics(c.Context, log, c.String("metrics-listen"), src.Collector(), engineCollector{src})
	if err != nil {
		src.Close()
		return err
	}
	defer stopMetrics()
	l, err := blockdev.Listen(c.String("listen"))
	if err != nil {
		src.Close()
		return err
	}
	linkCtx, stopLink := context.WithCancel(context.Background())
	defer stopLink()
	runErr := make(chan error, 1)
	go func() { runErr <- src.Run(linkCtx) }()
	nbdCtx, stopNBD := context.WithCancel(c.Context)
	defer stopNBD()
	nbdErr := make(chan error, 1)
	go func() { nbdErr <- srv.Serve(nbdCtx, l) }()
	st := src.Status()
	log.Info("replication source serving", "file", c.String("file"), "size", b.Size(), "listen", c.String("listen"),
		"target", taddr, "mode", mode, "state_dir", c.String("state-dir"), "generation", fmt.Sprintf("%016x", st.Generation),
		"dirty_bytes", st.DirtyBytes, "tls", tlsConf != nil)

	fatal := shutdownSource(c.Context, log, c.Duration("drain-timeout"), stateDrain{src}, runErr, nbdErr, stopNBD, stopLink)
	st = src.Status()
	log.Info("replication source stopped", "dirty_bytes", st.DirtyBytes, "resync_sent", st.ResyncSent)
	return errors.Join(fatal, src.Close(), b.Sync())
}

// stateDrain: with a state dir, a drain is a courtesy: what the target
// lacks stays in the bitmap for the next start.
type stateDrain struct{ src *replstate.Source }

// failWaiters closes the engine only: its waiters are tracked, and the
// state files stay open for the final Close.
func (s stateDrain) failWaiters() { s.src.Engine().Close() }

func (s stateDrain) drain(ctx context.Context, log *slog.Logger) error {
	eng := s.src.Engine()
	if !eng.Connected() {
		log.Info("target not connected: what it lacks stays tracked for the next start")
		return nil
	}
	if err := eng.WaitAcked(ctx); err != nil {
		log.Warn("drain incomplete: the rest is tracked for the next start", "err", err)
	}
	return nil
}

// engineCollector exposes the current engine's metrics (the engine is
// replaced when the stream restarts).
type engineCollector struct{ s *replstate.Source }

// discardSourceHint is the answer to --discard-on source. The source's
// data is overwritten only when it receives the other side's, and the
// stream flows source → target only: the roles swap, which takes both
// processes. The hint names the two commands with this side's flags
// (placeholders in capitals for what only the operator knows).
func discardSourceHint(c *cli.Context, onSource bool) string {
	tlsHere, tlsThere, note := " --insecure", " --insecure", ""
	if !c.Bool("insecure") {
		fp := c.String("peer-fingerprint")
		if fp == "" {
			fp = "PEER_FINGERPRINT"
		}
		tlsHere = fmt.Sprintf(" --cert-dir %s --peer-fingerprint %s", c.String("cert-dir"), fp)
		tlsThere = " --peer-fingerprint HERE_FINGERPRINT"
		note = fmt.Sprintf("\n  (HERE_FINGERPRINT: the output of `doppel repl fingerprint --cert-dir %s` on this host)", c.String("cert-dir"))
	}
	port := "6325"
	if onSource {
		if _, addr, err := blockdev.ParseListen(c.String("target")); err == nil {
			if _, p, err := net.SplitHostPort(addr); err == nil {
				port = p
			}
		}
		return fmt.Sprintf("--discard-on source: this source's data is overwritten only when it receives the target's, "+
			"and the stream flows source → target only: swap the roles.\n"+
			"  1. here, instead of this command (this side's divergent chunks are saved to %s/splitbrain-repl-*.img before the resync):\n"+
			"     doppel repl target --file %s --state-dir %s --listen tcp:0.0.0.0:%s --discard-on target%s\n"+
			"  2. on the peer (%s), instead of its `repl target`, with its own file and state dir:\n"+
			"     doppel repl source --file PEER_FILE --state-dir PEER_STATE_DIR --listen NBD_ADDR --target tcp:THIS_HOST:%s --mode %s%s%s",
			c.String("state-dir"), c.String("file"), c.String("state-dir"), port, tlsHere,
			c.String("target"), port, c.String("mode"), tlsThere, note)
	}
	if _, addr, err := blockdev.ParseListen(c.String("listen")); err == nil {
		if _, p, err := net.SplitHostPort(addr); err == nil {
			port = p
		}
	}
	return fmt.Sprintf("--discard-on source: the source's data is overwritten only when it receives this side's, "+
		"and the stream flows source → target only: swap the roles.\n"+
		"  1. on the source host, instead of its `repl source` (its divergent chunks are saved to its state dir before the resync):\n"+
		"     doppel repl target --file SOURCE_FILE --state-dir SOURCE_STATE_DIR --listen tcp:0.0.0.0:%s --discard-on target%s\n"+
		"  2. here, instead of this command (this side is promoted: a new generation):\n"+
		"     doppel repl source --file %s --state-dir %s --listen NBD_ADDR --target tcp:SOURCE_HOST:%s --mode MODE%s%s",
		port, tlsThere, c.String("file"), c.String("state-dir"), port, tlsHere, note)
}

// replTargetState is `repl target --state-dir`.
func replTargetState(c *cli.Context) (err error) {
	log := replLogger(c)
	size, err := optionalSize(c, "size")
	if err != nil {
		return err
	}
	network, _, err := blockdev.ParseListen(c.String("listen"))
	if err != nil || !strings.HasPrefix(network, "tcp") {
		return usageErrorf("--listen %q: want tcp:HOST:PORT", c.String("listen"))
	}
	switch d := c.String("discard-on"); d {
	case "", "target":
	case "source":
		return usageErrorf("%s", discardSourceHint(c, false))
	default:
		return usageErrorf("--discard-on %q: a target can only discard its own data (target)", d)
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
	dir := c.String("state-dir")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	b, err := blockdev.OpenExclusive(file, size)
	if err != nil {
		return err
	}
	defer func() { err = errors.Join(err, closeBackend(b)) }()
	live, err := replLiveness(c)
	if err != nil {
		return err
	}
	tgt, err := replstate.OpenTarget(replstate.TargetConfig{Dir: dir, Backend: b, Discard: c.String("discard-on"), Log: log, Liveness: live})
	if err != nil {
		return err
	}
	defer func() { err = errors.Join(err, tgt.Close()) }()
	stopMetrics, err := serveMetrics(c.Context, log, c.String("metrics-listen"), tgt.Engine().Collector())
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
	st := tgt.Status()
	log.Info("replication target listening", "file", file, "size", b.Size(), "listen", l.Addr().String(),
		"state_dir", dir, "generation", fmt.Sprintf("%016x", st.Generation), "data", st.Data, "tls", tlsConf != nil)
	err = tgt.Serve(c.Context, l)
	st = tgt.Status()
	log.Info("replication target stopped", "generation", fmt.Sprintf("%016x", st.Generation), "data", st.Data, "refusal", st.Refusal)
	return err
}

func (e engineCollector) Describe(ch chan<- *prometheus.Desc) { prometheus.DescribeByCollect(e, ch) }
func (e engineCollector) Collect(ch chan<- prometheus.Metric) { e.s.Engine().Collector().Collect(ch) }
