package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"github.com/doppelha/doppel/blockdev"
	"github.com/doppelha/doppel/blockdev/kernel"
	"github.com/doppelha/doppel/daemon/job"
	"github.com/urfave/cli/v2"
)

// nbdAttachCommand is `doppel nbd attach`: serve a file or block device
// through doppel's NBD server and attach it to the kernel as /dev/nbdN, like
// qemu-nbd --connect, until SIGINT or SIGTERM.
func nbdAttachCommand() *cli.Command {
	return &cli.Command{
		Name:      "attach",
		Usage:     "attach a file as /dev/nbdN through doppel's NBD server",
		ArgsUsage: " ",
		Description: "Serves --file with doppel's NBD server over socket pairs handed to the kernel\n" +
			"(generic-netlink nbd: FLUSH, FUA, TRIM, WRITE_ZEROES, several connections,\n" +
			"a dead-connection timeout) and prints the device path. On SIGINT or SIGTERM\n" +
			"it flushes, disconnects, waits until the kernel has released the device and\n" +
			"exits. A missing file is created sparse with --size. Loads the nbd module\n" +
			"when needed. SIGUSR1 writes the request counters to --stats-file.",
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "file", Usage: "`PATH` of the regular file or block device to serve", Required: true},
			&cli.StringFlag{Name: "size", Usage: "`SIZE` of the file to create (1G, 512M, bytes); must match an existing file"},
			&cli.StringFlag{Name: "device", Usage: "`/dev/nbdN` to use (default: the first free one)"},
			&cli.IntFlag{Name: "connections", Value: 2, Usage: "socket pairs between the kernel and the server (`N`, 1-64)"},
			&cli.DurationFlag{Name: "timeout", Usage: "per-request timeout `D` after which the kernel fails I/O (0: never)"},
			&cli.DurationFlag{Name: "dead-conn-timeout", Value: 10 * time.Second, Usage: "how long the kernel waits for a dead connection before failing its requests (`D`)"},
			&cli.BoolFlag{Name: "read-only", Usage: "attach read-only"},
			&cli.StringFlag{Name: "stats-file", Usage: "write the server's request counters as JSON to `PATH` on SIGUSR1 and at exit"},
			&cli.BoolFlag{Name: "reclaim", Usage: "first disconnect --device if it is stale (connected, but its server process died)"},
			&cli.DurationFlag{Name: "detach-timeout", Value: 60 * time.Second, Usage: "how long to wait for the kernel to release the device (`D`)"},
		},
		Action: func(c *cli.Context) error {
			if c.NArg() > 0 {
				return usageErrorf("attach: unexpected argument %q", c.Args().First())
			}
			cfg := nbdAttachConfig{
				file: c.String("file"), device: c.String("device"), statsFile: c.String("stats-file"),
				connections: c.Int("connections"), timeout: c.Duration("timeout"),
				deadConn: c.Duration("dead-conn-timeout"), detachTimeout: c.Duration("detach-timeout"),
				readOnly: c.Bool("read-only"), reclaim: c.Bool("reclaim"),
			}
			if s := c.String("size"); s != "" {
				var err error
				if cfg.size, err = job.ParseSize(s); err != nil {
					return usageErrorf("attach: --size: %v", err)
				}
			}
			if cfg.file == "" {
				return usageErrorf("attach: --file is empty")
			}
			if cfg.device != "" {
				if _, err := kernel.ParseDevice(cfg.device); err != nil {
					return usageErrorf("%v", err)
				}
			} else if cfg.reclaim {
				return usageErrorf("attach: --reclaim needs --device")
			}
			if cfg.connections < 1 || cfg.connections > 64 {
				return usageErrorf("attach: --connections %d: want 1 to 64", cfg.connections)
			}
			if cfg.timeout < 0 || cfg.deadConn < 0 || cfg.detachTimeout <= 0 {
				return usageErrorf("attach: timeouts must not be negative")
			}
			return nbdAttach(c.Context, slog.New(slog.NewTextHandler(os.Stderr, nil)), cfg)
		},
	}
}

type nbdAttachConfig struct {
	file, device, statsFile          string
	size                             int64
	connections                      int
	timeout, deadConn, detachTimeout time.Duration
	readOnly, reclaim                bool
}

func nbdAttach(ctx context.Context, log *slog.Logger, cfg nbdAttachConfig) (err error) {
	// The serving process must never be throttled by, or recurse into, the
	// writeback of the device it serves.
	if err := kernel.SetIOFlusher(); err != nil {
		log.Warn("not an I/O flusher: the device may deadlock under memory pressure", "err", err)
	}
	// Fail before creating anything when the kernel cannot attach.
	if err := kernel.Probe(ctx); err != nil {
		return err
	}
	if cfg.device != "" {
		idx, _ := kernel.ParseDevice(cfg.device)
		if cfg.reclaim {
			if err := kernel.Reclaim(ctx, idx, log); err != nil {
				return err
			}
		}
		if err := kernel.CheckFree(idx); err != nil {
			return err
		}
	}
	b, err := blockdev.OpenExclusive(cfg.file, cfg.size)
	if err != nil {
		return err
	}
	defer func() { err = errors.Join(err, b.Close()) }()
	srv, err := blockdev.NewServer(log, blockdev.Export{Backend: b, ReadOnly: cfg.readOnly})
	if err != nil {
		return err
	}
	abs, _ := filepath.Abs(cfg.file)
	dev, err := kernel.Attach(ctx, kernel.Config{
		Device: cfg.device, Serve: srv.ServeConn, Connections: cfg.connections,
		Timeout: cfg.timeout, DeadConnTimeout: cfg.deadConn, ReadOnly: cfg.readOnly,
		BackendID: "doppel:" + abs, Log: log,
	})
	if err != nil {
		return err
	}
	fmt.Println(dev.Path())

	usr1 := make(chan os.Signal, 1)
	signal.Notify(usr1, syscall.SIGUSR1)
	defer signal.Stop(usr1)
	var lost bool
loop:
	for {
		select {
		case <-ctx.Done():
			break loop
		case <-dev.Done():
			lost = true
			break loop
		case <-usr1:
			if err := writeStats(cfg.statsFile, srv.Stats()); err != nil {
				log.Warn("stats file", "err", err)
			}
		}
	}
	dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), cfg.detachTimeout)
	derr := dev.Detach(dctx)
	cancel()
	st := srv.Stats()
	log.Info("NBD server stopped", "device", dev.Path(), "connections", st.Connections, "reads", st.Reads,
		"writes", st.Writes, "flushes", st.Flushes, "fua", st.FUA, "trims", st.Trims, "zeroes", st.Zeroes,
		"errors", st.Errors)
	serr := writeStats(cfg.statsFile, st)
	if lost {
		derr = errors.Join(fmt.Errorf("%s was disconnected from outside doppel", dev.Path()), derr)
	}
	return errors.Join(derr, serr)
}

// writeStats replaces path (if set) with st as JSON.
func writeStats(path string, st blockdev.Stats) error {
	if path == "" {
		return nil
	}
	b, err := json.Marshal(st)
	if err != nil {
		return err
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, append(b, '\n'), 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}
