// Command replbench measures fio's nbd engine through doppel's replicated
// export (unreplicated vs async vs sync) across a veth pair between two
// network namespaces it creates, and doppel's full mirror against nbdcopy
// between two nbdkit servers, writing the figures to bench/RESULTS.md.
// `make bench-repl` runs it as root from the repository root; -short is a
// quick run that checks the harness itself.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/doppelha/doppel/bench"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:])
	stop()
	if err != nil && !errors.Is(err, context.Canceled) {
		fmt.Fprintln(os.Stderr, "replbench:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("replbench", flag.ContinueOnError)
	var (
		doppel     = fs.String("doppel", "bin/doppel", "doppel binary")
		fio        = fs.String("fio", "fio", "fio binary (with the nbd engine)")
		dir        = fs.String("dir", "/var/tmp", "parent of the working directory")
		size       = fs.Int64("size", 1<<30, "volume size of the fio rows, bytes")
		runs       = fs.Int("runs", 3, "runs per row and mode")
		runtime    = fs.Duration("runtime", 4*time.Second, "measured time per run")
		ramp       = fs.Duration("ramp", time.Second, "ramp time per run (not measured)")
		rows       = fs.String("rows", "", "comma-separated row slugs (default: write-1m-qd16,randwrite-4k-qd1,randwrite-4k-qd32)")
		mirrorSize = fs.Int64("mirror-size", 1<<30, "size of the mirrored volume, bytes")
		mirrorRuns = fs.Int("mirror-runs", 3, "runs of each of doppel's mirror and nbdcopy (0: skip)")
		results    = fs.String("results", "bench/RESULTS.md", "Markdown file whose replication section is replaced (empty: print only)")
		note       = fs.String("note", "", "remark on the conditions, printed in bold in the report")
		short      = fs.Bool("short", false, "quick check of the harness: 64 MiB volumes, 1 run of 1 s, one mirror run, results printed not written")
		keep       = fs.Bool("keep", false, "keep the working directory")
	)
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *short {
		*size, *mirrorSize, *runs, *mirrorRuns, *runtime, *ramp = 64<<20, 64<<20, 1, 1, time.Second, 0
		set := false
		fs.Visit(func(f *flag.Flag) { set = set || f.Name == "results" })
		if !set {
			*results = ""
		}
	}
	if os.Geteuid() != 0 {
		return errors.New("needs root: it creates network namespaces and a veth pair")
	}
	for _, tool := range []string{*fio, "ip", "ping", "nbdkit", "nbdcopy"} {
		if _, err := exec.LookPath(tool); err != nil {
			return fmt.Errorf("%w (make deps installs it)", err)
		}
	}
	doppelAbs, err := filepath.Abs(*doppel)
	if err != nil {
		return err
	}
	if err := bench.CheckRepl(doppelAbs); err != nil {
		return fmt.Errorf("%w; the harness is ready and runs once `doppel repl source|target` exist (`make build`)", err)
	}
	jobs := bench.ReplRows
	if *rows != "" {
		jobs = nil
		for _, slug := range strings.Split(*rows, ",") {
			found := false
			for _, j := range bench.NBDRows {
				if j.Slug == strings.TrimSpace(slug) {
					jobs = append(jobs, j)
					found = true
				}
			}
			if !found {
				return fmt.Errorf("unknown row %q", slug)
			}
		}
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	work, err := os.MkdirTemp(*dir, "doppel-replbench-")
	if err != nil {
		return err
	}
	if *keep {
		log.Info("working directory kept", "dir", work)
	} else {
		defer os.RemoveAll(work)
	}
	machine := bench.DescribeMachine(work, map[string][]string{
		"nbdkit":  {"nbdkit", "--version"},
		"nbdcopy": {"nbdcopy", "--version"},
		"go":      {"go", "version"},
	})
	machine.Versions["doppel"] = "doppel " + bench.BinaryRevision(doppelAbs, ".")

	rep, err := bench.RunRepl(ctx, bench.ReplConfig{
		Doppel:     doppelAbs,
		Fio:        *fio,
		Dir:        work,
		Size:       *size,
		Runs:       *runs,
		Runtime:    *runtime,
		Ramp:       *ramp,
		Rows:       jobs,
		MirrorSize: *mirrorSize,
		MirrorRuns: *mirrorRuns,
		Metrics:    bench.DefaultReplMetrics,
		Log:        log,
	})
	if err != nil {
		return err
	}
	rep.Machine = machine
	md := rep.Markdown("go run ./bench/cmd/replbench "+bench.ShellJoin(args), *note)
	fmt.Print(md)
	if *results == "" {
		return nil
	}
	if err := bench.ReplaceSection(*results, bench.ReplSection, md); err != nil {
		return err
	}
	log.Info("results written", "file", *results, "took", time.Since(rep.Start).Round(time.Second))
	return nil
}
