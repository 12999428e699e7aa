// Command scalebench runs many protection jobs (default 32) between one
// pair of doppel agents (the real `doppel agent` and CLI) in two network
// namespaces joined by a veth pair, and measures: both agents' RSS, CPU,
// threads, goroutines and descriptors at idle and under light writes; the
// resync of every job after a 60 s target outage (time and bytes resent);
// the failover of every job at once when the source agent is killed (RTO
// per job); the state on disk. It writes the figures to bench/RESULTS.md.
// `make bench-scale` runs it as root from the repository root; -short is a
// quick check of the harness (4 jobs, no 60 s wait, nothing written).
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
	"syscall"
	"time"

	"github.com/doppelha/doppel/bench"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:])
	stop()
	if err != nil && !errors.Is(err, context.Canceled) {
		fmt.Fprintln(os.Stderr, "scalebench:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("scalebench", flag.ContinueOnError)
	var (
		doppel  = fs.String("doppel", "bin/doppel", "doppel binary (agents and CLI)")
		dir     = fs.String("dir", "/var/tmp", "parent of the working directory")
		jobs    = fs.Int("jobs", 32, "jobs between the agent pair")
		size    = fs.Int64("size", 1<<30, "each job's volume, bytes (sparse files)")
		mode    = fs.String("mode", "sync", "replication mode of the jobs: sync or async")
		rate    = fs.Float64("rate", 20, "4 KiB writes per second per job")
		idle    = fs.Duration("idle", 20*time.Second, "idle measurement window")
		load    = fs.Duration("load", 20*time.Second, "loaded measurement window")
		settle  = fs.Duration("settle", 5*time.Second, "wait before each window")
		outage  = fs.Duration("outage", 60*time.Second, "how long the target agent stays down (0: skip the resync phase)")
		outSig  = fs.String("outage-signal", "kill", "how the target agent is stopped for the outage: kill (SIGKILL, a crash) or term (SIGTERM, a clean stop)")
		results = fs.String("results", "bench/RESULTS.md", "Markdown file whose scale section is replaced (empty: print only)")
		note    = fs.String("note", "", "remark on the conditions, printed in bold in the report")
		short   = fs.Bool("short", false, "quick check of the harness: 4 jobs of 64 MiB, 3 s windows, a 5 s outage, results printed not written (flags given override these)")
		keep    = fs.Bool("keep", false, "keep the working directory")
	)
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *short {
		set := map[string]bool{}
		fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
		for name, v := range map[string]string{"jobs": "4", "size": "67108864", "idle": "3s", "load": "3s", "settle": "1s", "outage": "5s"} {
			if !set[name] {
				if err := fs.Set(name, v); err != nil {
					return err
				}
			}
		}
		if !set["results"] {
			*results = ""
		}
	}
	sig := map[string]syscall.Signal{"kill": syscall.SIGKILL, "term": syscall.SIGTERM}[*outSig]
	if sig == 0 {
		return fmt.Errorf("-outage-signal %q: want kill or term", *outSig)
	}
	if os.Geteuid() != 0 {
		return errors.New("needs root: it creates network namespaces and a veth pair")
	}
	if _, err := exec.LookPath("ip"); err != nil {
		return fmt.Errorf("%w (make deps installs it)", err)
	}
	doppelAbs, err := filepath.Abs(*doppel)
	if err != nil {
		return err
	}
	if _, err := os.Stat(doppelAbs); err != nil {
		return fmt.Errorf("%w (make build)", err)
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	work, err := os.MkdirTemp(*dir, "doppel-scalebench-")
	if err != nil {
		return err
	}
	if *keep {
		log.Info("working directory kept", "dir", work)
	} else {
		defer os.RemoveAll(work)
	}
	machine := bench.DescribeMachine(work, map[string][]string{"go": {"go", "version"}})
	machine.Versions["doppel"] = bench.BinaryRevision(doppelAbs, ".")
	rep, err := bench.RunScale(ctx, bench.ScaleConfig{
		Doppel: doppelAbs, Dir: work, Jobs: *jobs, Size: *size, Mode: *mode, Rate: *rate,
		Idle: *idle, Load: *load, Settle: *settle, Outage: *outage, OutageSignal: sig, Log: log,
	})
	if rep != nil {
		rep.Machine = machine
		rep.Command = "go run ./bench/cmd/scalebench " + bench.ShellJoin(args)
		rep.Note = *note
	}
	if err != nil {
		if rep != nil {
			fmt.Print(rep.Markdown())
		}
		if *keep {
			return fmt.Errorf("%w (logs in %s)", err, work)
		}
		return err
	}
	md := rep.Markdown()
	fmt.Print(md)
	log.Info("done", "took", rep.End.Sub(rep.Start).Round(time.Second))
	if *results == "" {
		return nil
	}
	return bench.ReplaceSection(*results, bench.ScaleSection, md)
}
