// Command replbench measures fio's nbd engine through doppel's replicated
// export (async, sync) across a veth pair between two network namespaces it
// creates, side by side with doppel's unreplicated export, the two-copy
// limit (every block written twice, locally and across the veth, with no
// replication logic) and QEMU's block mirror (qemu-storage-daemon,
// background and write-blocking), then doppel's full mirror against
// nbdcopy between two nbdkit servers, writing the figures to
// bench/RESULTS.md.
// `make bench-repl` runs it as root from the repository root; -short is a
// quick run that checks the harness itself.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"slices"
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
		doppelB    = fs.String("doppel-b", "", "a second doppel binary for A/B runs (configurations async-b, sync-b)")
		fio        = fs.String("fio", "fio", "fio binary (with the nbd engine)")
		dir        = fs.String("dir", "/var/tmp", "parent of the working directory")
		size       = fs.Int64("size", 1<<30, "volume size of the fio rows, bytes")
		runs       = fs.Int("runs", 5, "runs per row and configuration")
		runtime    = fs.Duration("runtime", 3*time.Second, "measured time per run")
		ramp       = fs.Duration("ramp", time.Second, "ramp time per run (not measured)")
		rows       = fs.String("rows", "", "comma-separated row slugs (default: write-1m-qd16,randwrite-4k-qd1,randwrite-4k-qd32,randwrite-4k-qd1-fsync)")
		noState    = fs.Bool("no-state-dir", false, "run doppel's sources without --state-dir (the bare engine: no bitmap, activity log or disk queue)")
		modes      = fs.String("modes", "", "comma-separated configurations (default: "+strings.Join(bench.ReplModes, ",")+")")
		mirrorSize = fs.Int64("mirror-size", 1<<30, "size of the mirrored volume, bytes")
		mirrorRuns = fs.Int("mirror-runs", 5, "runs of each of doppel's mirror and nbdcopy (0: skip)")
		results    = fs.String("results", "bench/RESULTS.md", "Markdown file whose replication section is replaced (empty: print only)")
		note       = fs.String("note", "", "remark on the conditions, printed in bold in the report")
		short      = fs.Bool("short", false, "quick check of the harness: 64 MiB volumes, 1 run of 1 s, one mirror run, results printed not written (flags given override these)")
		keep       = fs.Bool("keep", false, "keep the working directory")
		profDir    = fs.String("profile-dir", "bench/profiles", "where the source's CPU profiles go (empty: no profiling)")
		profRows   = fs.String("profile-rows", "sync:randwrite-4k-qd32,sync:write-1m-qd16,async:write-1m-qd16", "MODE:ROW pairs to profile the source on")
		rawOut     = fs.String("json", "bench/profiles/replbench.json", "where every run's figures are saved as JSON (empty: not saved)")
		render     = fs.String("render", "", "re-render the report from a JSON file saved by -json instead of running")
	)
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *short {
		// -short sets what the command line does not.
		set := map[string]bool{}
		fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
		for name, v := range map[string]string{"size": "67108864", "mirror-size": "67108864", "runs": "1", "mirror-runs": "1", "runtime": "1s", "ramp": "0s"} {
			if !set[name] {
				if err := fs.Set(name, v); err != nil {
					return err
				}
			}
		}
		if !set["results"] {
			*results = ""
		}
		if !set["profile-dir"] {
			*profDir = ""
		}
		if !set["json"] {
			*rawOut = ""
		}
	}
	if *render != "" {
		b, err := os.ReadFile(*render)
		if err != nil {
			return err
		}
		var rep bench.ReplReport
		if err := json.Unmarshal(b, &rep); err != nil {
			return fmt.Errorf("%s: %w", *render, err)
		}
		if *note != "" {
			rep.Note = *note
		}
		return output(&rep, *results)
	}
	if os.Geteuid() != 0 {
		return errors.New("needs root: it creates network namespaces and a veth pair")
	}
	for _, tool := range []string{*fio, "ip", "ping", "nbdkit", "nbdcopy", "qemu-storage-daemon", "qemu-nbd"} {
		if _, err := exec.LookPath(tool); err != nil {
			return fmt.Errorf("%w (make deps installs it)", err)
		}
	}
	doppelAbs, err := filepath.Abs(*doppel)
	if err != nil {
		return err
	}
	var doppelBAbs string
	if *doppelB != "" {
		if doppelBAbs, err = filepath.Abs(*doppelB); err != nil {
			return err
		}
	}
	if err := bench.CheckRepl(doppelAbs); err != nil {
		return fmt.Errorf("%w; the harness is ready and runs once `doppel repl source|target` exist (`make build`)", err)
	}
	known := append(slices.Clone(bench.NBDRows), bench.SyncRow)
	jobs := bench.ReplRows
	if *rows != "" {
		jobs = nil
		for _, slug := range strings.Split(*rows, ",") {
			i := slices.IndexFunc(known, func(j bench.Job) bool { return j.Slug == strings.TrimSpace(slug) })
			if i < 0 {
				return fmt.Errorf("unknown row %q", slug)
			}
			jobs = append(jobs, known[i])
		}
	}
	var cols []string
	if *modes != "" {
		for _, m := range strings.Split(*modes, ",") {
			if m = strings.TrimSpace(m); !slices.Contains(bench.ReplModes, m) && m != bench.ModeAsyncB && m != bench.ModeSyncB {
				return fmt.Errorf("unknown configuration %q (want some of %s)", m, strings.Join(bench.ReplModes, ","))
			}
			cols = append(cols, strings.TrimSpace(m))
		}
	}
	var prows []bench.ReplProfileRow
	if *profDir != "" && *profRows != "" {
		for _, pr := range strings.Split(*profRows, ",") {
			mode, slug, ok := strings.Cut(strings.TrimSpace(pr), ":")
			found := false
			for _, j := range known {
				if ok && j.Slug == slug && (mode == bench.ModeSync || mode == bench.ModeAsync) {
					prows = append(prows, bench.ReplProfileRow{Mode: mode, Row: j})
					found = true
				}
			}
			if !found {
				return fmt.Errorf("bad -profile-rows entry %q: want sync|async:ROW", pr)
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
		"qemu":    {"qemu-storage-daemon", "--version"},
	})
	machine.Versions["doppel"] = "doppel " + bench.BinaryRevision(doppelAbs, ".")
	if doppelBAbs != "" {
		machine.Versions["doppel B"] = "doppel (B) " + bench.BinaryRevision(doppelBAbs, ".")
	}

	rep, err := bench.RunRepl(ctx, bench.ReplConfig{
		Doppel:      doppelAbs,
		DoppelB:     doppelBAbs,
		Fio:         *fio,
		Dir:         work,
		Size:        *size,
		Runs:        *runs,
		Runtime:     *runtime,
		Ramp:        *ramp,
		Rows:        jobs,
		Modes:       cols,
		NoStateDir:  *noState,
		MirrorSize:  *mirrorSize,
		MirrorRuns:  *mirrorRuns,
		Metrics:     bench.DefaultReplMetrics,
		ProfileDir:  *profDir,
		ProfileRows: prows,
		Log:         log,
	})
	if err != nil {
		return err
	}
	rep.Machine = machine
	rep.Command = "go run ./bench/cmd/replbench " + bench.ShellJoin(args)
	rep.Note = *note
	if *rawOut != "" {
		b, err := json.MarshalIndent(rep, "", " ")
		if err != nil {
			return err
		}
		if err := os.MkdirAll(filepath.Dir(*rawOut), 0o755); err != nil {
			return err
		}
		if err := os.WriteFile(*rawOut, b, 0o644); err != nil {
			return err
		}
	}
	if err := output(rep, *results); err != nil {
		return err
	}
	log.Info("done", "took", time.Since(rep.Start).Round(time.Second))
	return nil
}

// output prints the report and replaces its section of results (unless
// results is empty).
func output(rep *bench.ReplReport, results string) error {
	md := rep.Markdown(rep.Command, rep.Note)
	fmt.Print(md)
	if results == "" {
		return nil
	}
	return bench.ReplaceSection(results, bench.ReplSection, md)
}
