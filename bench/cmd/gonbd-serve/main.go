// Command gonbd-serve serves a file over NBD with go-nbd v0.3.2's stock
// server (github.com/pojntfx/go-nbd/pkg/server) and its file backend, exactly
// as the library ships them: the benchmark's baseline for "a Go NBD server".
// It exports the file under the default (empty) name and under "default".
//
//	gonbd-serve --file PATH --listen unix:PATH|tcp:HOST:PORT
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/pojntfx/go-nbd/pkg/backend"
	"github.com/pojntfx/go-nbd/pkg/server"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:])
	stop()
	if err != nil && !errors.Is(err, context.Canceled) {
		fmt.Fprintln(os.Stderr, "gonbd-serve:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("gonbd-serve", flag.ContinueOnError)
	file := fs.String("file", "", "file to export (must exist)")
	listen := fs.String("listen", "", "unix:PATH or tcp:HOST:PORT")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *file == "" || *listen == "" {
		return errors.New("--file and --listen are required")
	}
	f, err := os.OpenFile(*file, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	defer f.Close()

	network, addr, ok := strings.Cut(*listen, ":")
	if !ok || (network != "unix" && network != "tcp") {
		return fmt.Errorf("bad --listen %q: want unix:PATH or tcp:HOST:PORT", *listen)
	}
	if network == "unix" {
		os.Remove(addr)
	}
	l, err := net.Listen(network, addr)
	if err != nil {
		return err
	}
	go func() {
		<-ctx.Done()
		l.Close()
	}()

	b := backend.NewFileBackend(f)
	exports := []*server.Export{
		{Name: "", Backend: b},
		{Name: "default", Backend: b},
	}
	opts := &server.Options{SupportsMultiConn: true}
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	for {
		c, err := l.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return f.Sync()
			}
			return err
		}
		go func() {
			defer c.Close()
			if err := server.Handle(c, exports, opts); err != nil && !errors.Is(err, net.ErrClosed) {
				log.Debug("connection ended", "err", err)
			}
		}()
	}
}
