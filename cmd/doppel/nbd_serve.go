package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"runtime/pprof"

	"github.com/doppelha/doppel/blockdev"
	"github.com/doppelha/doppel/daemon/job"
	"github.com/urfave/cli/v2"
)

// nbdServeCommand is `doppel nbd serve`: a plain NBD server for one file or
// block device, like qemu-nbd.
func nbdServeCommand() *cli.Command {
	return &cli.Command{
		Name:      "serve",
		Usage:     "serve a file or block device as an NBD export",
		ArgsUsage: " ",
		Description: "Serves --file over the NBD protocol (fixed newstyle; READ, WRITE, FLUSH, TRIM,\n" +
			"WRITE_ZEROES, FUA; several connections) until SIGINT or SIGTERM, then finishes\n" +
			"the requests in flight, syncs and exits. A missing file is created sparse\n" +
			"with --size. A mounted block device is refused.",
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "file", Usage: "`PATH` of the regular file or block device to serve", Required: true},
			&cli.StringFlag{Name: "size", Usage: "`SIZE` of the file to create (1G, 512M, 4096K, bytes); must match an existing file"},
			&cli.StringFlag{Name: "listen", Value: "unix:/run/doppel/nbd.sock", Usage: "`ADDR`: unix:PATH or tcp:HOST:PORT"},
			&cli.StringFlag{Name: "name", Usage: "export `NAME` (clients asking for the default name are also served)"},
			&cli.StringFlag{Name: "description", Usage: "export `TEXT` shown by nbdinfo"},
			&cli.BoolFlag{Name: "read-only", Usage: "open --file read-only (it must exist) and refuse writes, trims and write-zeroes"},
			&cli.StringFlag{Name: "cpuprofile", Usage: "write a CPU profile to `FILE` while serving"},
		},
		Action: func(c *cli.Context) error {
			if c.NArg() > 0 {
				return usageErrorf("serve: unexpected argument %q", c.Args().First())
			}
			var size int64
			if s := c.String("size"); s != "" {
				var err error
				if size, err = job.ParseSize(s); err != nil {
					return usageErrorf("serve: --size: %v", err)
				}
			}
			if c.String("file") == "" {
				return usageErrorf("serve: --file is empty")
			}
			if _, _, err := blockdev.ParseListen(c.String("listen")); err != nil {
				return usageErrorf("serve: --listen: %v", err)
			}
			if n := c.String("name"); len(n) > 4096 {
				return usageErrorf("serve: --name is longer than 4096 bytes")
			}
			return nbdServe(c.Context, slog.New(slog.NewTextHandler(os.Stderr, nil)), nbdServeConfig{
				file: c.String("file"), size: size, listen: c.String("listen"),
				name: c.String("name"), description: c.String("description"),
				readOnly: c.Bool("read-only"), cpuprofile: c.String("cpuprofile"),
			})
		},
	}
}

type nbdServeConfig struct {
	file, listen, name, description, cpuprofile string
	size                                        int64
	readOnly                                    bool
}

func nbdServe(ctx context.Context, log *slog.Logger, cfg nbdServeConfig) (err error) {
	var b blockdev.Backend
	if cfg.readOnly {
		f, err := blockdev.OpenReadOnly(cfg.file)
		if err != nil {
			return err
		}
		if cfg.size != 0 && cfg.size != f.Size() {
			f.Close()
			return fmt.Errorf("%s is %d bytes, not the --size %d given", cfg.file, f.Size(), cfg.size)
		}
		b = f
	} else if b, err = blockdev.OpenExclusive(cfg.file, cfg.size); err != nil {
		return err
	}
	defer func() {
		if c, ok := b.(interface{ Close() error }); ok {
			err = errors.Join(err, c.Close())
		}
	}()
	srv, err := blockdev.NewServer(log, blockdev.Export{
		Name: cfg.name, Description: cfg.description, Backend: b, ReadOnly: cfg.readOnly,
	})
	if err != nil {
		return err
	}
	l, err := blockdev.Listen(cfg.listen)
	if err != nil {
		return err
	}
	if cfg.cpuprofile != "" {
		pf, err := os.Create(cfg.cpuprofile)
		if err != nil {
			l.Close()
			return fmt.Errorf("cpu profile: %w", err)
		}
		if err := pprof.StartCPUProfile(pf); err != nil {
			l.Close()
			pf.Close()
			return fmt.Errorf("cpu profile: %w", err)
		}
		defer func() {
			pprof.StopCPUProfile()
			err = errors.Join(err, pf.Close())
		}()
	}
	log.Info("serving NBD export", "file", cfg.file, "size", b.Size(), "listen", cfg.listen,
		"name", cfg.name, "read_only", cfg.readOnly)
	err = srv.Serve(ctx, l)
	st := srv.Stats()
	log.Info("NBD server stopped", "connections", st.Connections, "reads", st.Reads, "writes", st.Writes,
		"flushes", st.Flushes, "trims", st.Trims, "zeroes", st.Zeroes, "errors", st.Errors)
	return err
}
