// Command nbdbench compares doppel's NBD server with nbdkit's file plugin,
// qemu-nbd and go-nbd's stock server using fio's nbd engine, and writes the
// medians and ratios to bench/RESULTS.md. `make bench-nbd` runs it from the
// repository root; -short is a quick run that checks the harness itself.
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
		fmt.Fprintln(os.Stderr, "nbdbench:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("nbdbench", flag.ContinueOnError)
	var (
		doppel   = fs.String("doppel", "bin/doppel", "doppel binary")
		gonbd    = fs.String("gonbd", "bin/gonbd-serve", "go-nbd stock server binary (go build -o bin/gonbd-serve ./bench/cmd/gonbd-serve)")
		fio      = fs.String("fio", "fio", "fio binary (with the nbd engine)")
		dir      = fs.String("dir", "/var/tmp", "parent of the working directory (volumes, sockets, server logs)")
		size     = fs.Int64("size", 1<<30, "volume size in bytes")
		runs     = fs.Int("runs", 5, "runs per row and server")
		runtime  = fs.Duration("runtime", 3*time.Second, "measured time per run")
		ramp     = fs.Duration("ramp", time.Second, "ramp time per run (not measured)")
		rows     = fs.String("rows", "", "comma-separated row slugs (default: all)")
		servers  = fs.String("servers", "", "comma-separated servers (default: doppel,nbdkit,qemu-nbd,go-nbd)")
		results  = fs.String("results", "bench/RESULTS.md", "Markdown file whose NBD section is replaced (empty: print only)")
		profDir  = fs.String("profile-dir", "bench/profiles", "where doppel's CPU profiles go (empty: no profiling)")
		profRows = fs.String("profile-rows", "randread-4k-qd32,randwrite-4k-qd32,read-1m-qd16,write-1m-qd16", "rows to profile doppel on")
		note     = fs.String("note", "", "remark on the conditions, printed in bold in the report")
		short    = fs.Bool("short", false, "quick check of the harness: 64 MiB, 1 run of 1 s, no ramp, results printed not written, no profiles")
		keep     = fs.Bool("keep", false, "keep the working directory")
		rawOut   = fs.String("json", "bench/profiles/nbdbench.json", "where every run's figures are saved as JSON (empty: not saved)")
		render   = fs.String("render", "", "re-render the report from a JSON file saved by -json instead of running")
	)
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *short {
		*size, *runs, *runtime, *ramp = 64<<20, 1, time.Second, 0
		if !flagSet(fs, "results") {
			*results = ""
		}
		if !flagSet(fs, "profile-dir") {
			*profDir = ""
		}
		if !flagSet(fs, "json") {
			*rawOut = ""
		}
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))

	if *render != "" {
		b, err := os.ReadFile(*render)
		if err != nil {
			return err
		}
		var rep bench.NBDReport
		if err := json.Unmarshal(b, &rep); err != nil {
			return fmt.Errorf("%s: %w", *render, err)
		}
		if *note != "" {
			rep.Note = *note
		}
		return output(&rep, *results)
	}
	doppelAbs, _ := filepath.Abs(*doppel)
	gonbdAbs, _ := filepath.Abs(*gonbd)
	all := bench.NBDServers(doppelAbs, gonbdAbs)
	sel, err := pick(all, *servers, func(s bench.NBDServer) string { return s.Name })
	if err != nil {
		return err
	}
	need := map[string]string{"doppel": *doppel, "go-nbd": *gonbd, "nbdkit": "nbdkit", "qemu-nbd": "qemu-nbd"}
	for _, tool := range []string{*fio, "go"} {
		if _, err := exec.LookPath(tool); err != nil {
			return fmt.Errorf("%w (make deps installs it)", err)
		}
	}
	for _, s := range sel {
		if _, err := exec.LookPath(need[s.Name]); err != nil {
			return fmt.Errorf("%s: %w (`make bench-nbd` builds bin/doppel and bin/gonbd-serve; make deps installs the rest)", s.Name, err)
		}
	}
	jobs, err := pick(bench.NBDRows, *rows, func(j bench.Job) string { return j.Slug })
	if err != nil {
		return err
	}
	var pjobs []bench.Job
	if *profDir != "" && *profRows != "" {
		if pjobs, err = pick(bench.NBDRows, *profRows, func(j bench.Job) string { return j.Slug }); err != nil {
			return err
		}
	}

	work, err := os.MkdirTemp(*dir, "doppel-nbdbench-")
	if err != nil {
		return err
	}
	if !*keep {
		defer os.RemoveAll(work)
	} else {
		log.Info("working directory kept", "dir", work)
	}

	machine := bench.DescribeMachine(work, map[string][]string{
		"nbdkit":   {"nbdkit", "--version"},
		"qemu-nbd": {"qemu-nbd", "--version"},
		"go":       {"go", "version"},
	})
	for _, s := range sel {
		switch s.Name {
		case "doppel":
			machine.Versions["doppel"] = "doppel " + bench.BinaryRevision(doppelAbs, ".")
		case "go-nbd":
			machine.Versions["go-nbd"] = "go-nbd v0.3.2"
		}
	}

	est := time.Duration(len(jobs)*len(sel)*(*runs))*(*runtime+*ramp+time.Second) + time.Duration(len(pjobs))*(*runtime+*ramp+3*time.Second)
	log.Info("starting", "rows", len(jobs), "servers", len(sel), "runs", *runs, "estimate", est.Round(time.Second))

	rep, err := bench.RunNBD(ctx, bench.NBDConfig{
		Servers:     sel,
		Rows:        jobs,
		Fio:         *fio,
		Dir:         work,
		Size:        *size,
		Runs:        *runs,
		Runtime:     *runtime,
		Ramp:        *ramp,
		Doppel:      doppelAbs,
		ProfileDir:  *profDir,
		ProfileRows: pjobs,
		Log:         log,
	})
	if err != nil {
		return err
	}
	rep.Machine = machine
	rep.Command = "go run ./bench/cmd/nbdbench " + bench.ShellJoin(args)
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
func output(rep *bench.NBDReport, results string) error {
	md := rep.Markdown(rep.Command, rep.Note)
	fmt.Print(md)
	if results == "" {
		return nil
	}
	return bench.ReplaceSection(results, bench.NBDSection, md)
}

// pick selects the items named in the comma-separated list (all when empty),
// in the list's order.
func pick[T any](all []T, list string, name func(T) string) ([]T, error) {
	if list == "" {
		return all, nil
	}
	var out []T
	for _, n := range strings.Split(list, ",") {
		found := false
		for _, x := range all {
			if name(x) == strings.TrimSpace(n) {
				out = append(out, x)
				found = true
			}
		}
		if !found {
			var names []string
			for _, x := range all {
				names = append(names, name(x))
			}
			return nil, fmt.Errorf("unknown %q; choose from %s", n, strings.Join(names, ", "))
		}
	}
	return out, nil
}

func flagSet(fs *flag.FlagSet, name string) bool {
	set := false
	fs.Visit(func(f *flag.Flag) { set = set || f.Name == name })
	return set
}
