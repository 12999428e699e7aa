package main

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"os"
	"strings"

	"github.com/doppelha/doppel/blockdev"
	"github.com/doppelha/doppel/daemon/job"
	"github.com/doppelha/doppel/daemon/repl"
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

// stateSourceFlags are the parsed --state-dir flags of `repl source`.
type stateSourceFlags struct {
	diskQueue, resyncRate int64
}

func parseStateSourceFlags(c *cli.Context, f sourceFlags) (stateSourceFlags, error) {
	var st stateSourceFlags
	var err error
	if f.chunk > 64<<10 {
		return st, usageErrorf("--chunk-size %d: with --state-dir the bitmap chunk is at most 64K", f.chunk)
	}
	st.diskQueue = -1 // "0": no disk queue
	if c.String("disk-queue-size") != "0" {
		if st.diskQueue, err = optionalSize(c, "disk-queue-size"); err != nil {
			return st, err
		}
	}
	if s := strings.TrimSuffix(c.String("resync-rate"), "/s"); s != "" {
		if st.resyncRate, err = job.ParseSize(s); err != nil {
			return st, usageErrorf("--resync-rate: %v", err)
		}
	}
	switch d := c.String("discard-on"); d {
	case "", "target":
	case "source":
		return st, usageErrorf("%s", discardSourceHint(c, true))
	default:
		return st, usageErrorf("--discard-on %q: want target (or source, which tells how to swap the roles)", d)
	}
	return st, nil
}

// stateSource is `repl source --state-dir`: with persistent state, a drain
// is a courtesy, what the target lacks stays in the bitmap for the next
// start.
type stateSource struct {
	*replstate.Source
	dir string
}

func openStateSource(c *cli.Context, log *slog.Logger, f sourceFlags, st stateSourceFlags, b blockdev.Backend,
	dial func(context.Context) (net.Conn, error), live repl.Liveness) (sourceEngine, error) {
	src, err := replstate.OpenSource(replstate.SourceConfig{Dir: c.String("state-dir"), Backend: b, Mode: f.mode, ChunkSize: f.chunk,
		MemQueue: f.queueSize, DiskQueue: st.diskQueue, Dial: dial, Codec: f.codec, RateLimit: f.rateLimit, ResyncRate: st.resyncRate,
		SyncTimeout: c.Duration("sync-timeout"), Discard: c.String("discard-on"), Mirror: f.mirror, Force: c.Bool("force"), Log: log, Liveness: live})
	if err != nil {
		return nil, err
	}
	return stateSource{Source: src, dir: c.String("state-dir")}, nil
}

func (s stateSource) collectors() []prometheus.Collector {
	return []prometheus.Collector{s.Collector(), s.EngineCollector()}
}

func (stateSource) started(context.Context, *slog.Logger) {}

func (s stateSource) state() []any {
	st := s.Status()
	return []any{"state_dir", s.dir, "generation", fmt.Sprintf("%016x", st.Generation), "dirty_bytes", st.DirtyBytes, "resync_sent", st.ResyncSent}
}

// failWaiters closes the engine only: its waiters are tracked, and the
// state files stay open for the final Close.
func (s stateSource) failWaiters() { s.FailWaiters() }

func (s stateSource) drain(ctx context.Context, log *slog.Logger) error {
	if !s.Connected() {
		log.Info("target not connected: what it lacks stays tracked for the next start")
		return nil
	}
	if err := s.WaitAcked(ctx); err != nil {
		log.Warn("drain incomplete: the rest is tracked for the next start", "err", err)
	}
	return nil
}

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

// checkTargetDiscard validates `repl target --discard-on`.
func checkTargetDiscard(c *cli.Context) error {
	switch d := c.String("discard-on"); {
	case d == "" || (d == "target" && c.String("state-dir") != ""):
		return nil
	case d == "target":
		return usageErrorf("--discard-on needs --state-dir (a split brain is detected with the persistent state)")
	case d == "source" && c.String("state-dir") != "":
		return usageErrorf("%s", discardSourceHint(c, false))
	default:
		return usageErrorf("--discard-on %q: a target can only discard its own data (target)", d)
	}
}

// stateTarget is `repl target --state-dir`.
type stateTarget struct {
	*replstate.Target
	dir string
}

func openStateTarget(c *cli.Context, dir string, b blockdev.Backend, live repl.Liveness, log *slog.Logger) (targetEngine, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	tgt, err := replstate.OpenTarget(replstate.TargetConfig{Dir: dir, Backend: b, Discard: c.String("discard-on"), Log: log, Liveness: live})
	if err != nil {
		return nil, err
	}
	return stateTarget{Target: tgt, dir: dir}, nil
}

func (s stateTarget) state() []any {
	st := s.Status()
	return []any{"state_dir", s.dir, "generation", fmt.Sprintf("%016x", st.Generation), "data", st.Data, "refusal", st.Refusal}
}
