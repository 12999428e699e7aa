package bench

import (
	"fmt"
	"math"
	"os"
	"slices"
	"strings"
)

// Median returns the median of a figure over the runs of row in mode.
func (r *ReplReport) Median(row, mode string, f func(Result) float64) float64 {
	var xs []float64
	for _, res := range r.Runs[row][mode] {
		xs = append(xs, f(res))
	}
	return Median(xs)
}

// Spread is max ÷ min of xs (NaN for none or a non-positive minimum).
func Spread(xs []float64) float64 {
	if len(xs) == 0 {
		return math.NaN()
	}
	return Ratio(slices.Max(xs), slices.Min(xs))
}

// Targets of the replication benchmark.
const (
	targetSyncOverQemu   = 1.2  // doppel sync ÷ qemu write-blocking, every row
	targetAsyncOverLimit = 0.9  // doppel async ÷ two-copy limit, seq 1 MiB
	targetSyncLatMargin  = 50e3 // ns over unreplicated + RTT, sync 4 KiB QD1
	targetMirror         = 1.0  // doppel mirror ÷ nbdcopy
	targetMirrorSpread   = 1.5  // max ÷ min of doppel's mirror runs
	latencyRow           = "randwrite-4k-qd1"
	seqRow               = "write-1m-qd16"
)

// ReplVerdict is one target's outcome.
type ReplVerdict struct {
	Target string
	Met    bool
	Detail string
}

// Verdicts evaluates the targets on the report's medians.
func (r *ReplReport) Verdicts() []ReplVerdict {
	var vs []ReplVerdict
	cfg := r.Config
	var miss []string
	for _, row := range cfg.Rows {
		_, f := Headline(row)
		ratio := Ratio(r.Median(row.Slug, ModeSync, f), r.Median(row.Slug, ModeQemuSync, f))
		if !(ratio >= targetSyncOverQemu) {
			miss = append(miss, fmt.Sprintf("%s (%s)", row.Name, FormatRatio(ratio)))
		}
	}
	vs = append(vs, verdict(fmt.Sprintf("doppel sync ≥ %.1f× QEMU's write-blocking mirror on every row", targetSyncOverQemu), miss))
	for _, row := range cfg.Rows {
		if row.Slug != seqRow {
			continue
		}
		_, f := Headline(row)
		ratio := Ratio(r.Median(row.Slug, ModeAsync, f), r.Median(row.Slug, ModeLimit, f))
		v := ReplVerdict{Target: fmt.Sprintf("doppel async ≥ %.1f× the two-copy limit on %s", targetAsyncOverLimit, row.Name), Met: ratio >= targetAsyncOverLimit,
			Detail: FormatRatio(ratio)}
		vs = append(vs, v)
	}
	for _, row := range cfg.Rows {
		if row.Slug != latencyRow {
			continue
		}
		lat := func(x Result) float64 { return x.OpLatNs() }
		u, s := r.Median(row.Slug, ModeUnreplicated, lat), r.Median(row.Slug, ModeSync, lat)
		rtt := float64(r.RTT.Nanoseconds())
		bound := u + rtt + targetSyncLatMargin
		vs = append(vs, ReplVerdict{Target: "doppel sync latency on " + row.Name + " ≤ unreplicated + 1 RTT + 50 µs", Met: s <= bound,
			Detail: fmt.Sprintf("%s vs %s + %s + 50 µs = %s", FormatMicros(s), FormatMicros(u), FormatMicros(rtt), FormatMicros(bound))})
	}
	if cfg.MirrorRuns > 0 {
		d, n := Median(r.MirrorDoppel), Median(r.MirrorNbdcopy)
		ratio, spread := Ratio(d, n), Spread(r.MirrorDoppel)
		vs = append(vs, ReplVerdict{Target: fmt.Sprintf("doppel mirror ≥ %.1f× nbdcopy with a spread (max ÷ min of its runs) under %.1f×", targetMirror, targetMirrorSpread),
			Met:    ratio >= targetMirror && spread < targetMirrorSpread,
			Detail: fmt.Sprintf("%s, spread %s", FormatRatio(ratio), FormatRatio(spread))})
	}
	return vs
}

func verdict(target string, miss []string) ReplVerdict {
	if len(miss) == 0 {
		return ReplVerdict{Target: target, Met: true}
	}
	return ReplVerdict{Target: target, Detail: "not on " + strings.Join(miss, "; ")}
}

// has reports whether the report measured mode.
func (r *ReplReport) has(mode string) bool {
	modes := r.Config.Modes
	if len(modes) == 0 {
		modes = ReplModes
	}
	return slices.Contains(modes, mode)
}

// Markdown renders the report as the RESULTS.md section.
func (r *ReplReport) Markdown(command, note string) string {
	var b strings.Builder
	cfg := r.Config
	w := func(format string, a ...any) { fmt.Fprintf(&b, format, a...) }
	var modes []string
	for _, m := range append(slices.Clone(ReplModes), ModeAsyncB, ModeSyncB) {
		if r.has(m) {
			modes = append(modes, m)
		}
	}
	w("%s\n\n", ReplSection)
	w("Measured %s by `%s`.\n\n", r.Start.Format("2006-01-02 15:04 MST"), command)
	m := r.Machine
	var loads []float64
	for _, byMode := range r.Runs {
		for _, rs := range byMode {
			for _, x := range rs {
				if x.Load > 0 {
					loads = append(loads, x.Load)
				}
			}
		}
	}
	w("- Machine: %s; files on %s. Load average %s at start, %s at end", m, m.FS, m.Load, r.LoadEnd)
	if len(loads) > 0 {
		w("; 1-minute load at the start of the fio runs %.2f–%.2f (median %.2f)", slices.Min(loads), slices.Max(loads), Median(loads))
	}
	w(". Took %s.\n", r.End.Sub(r.Start).Round(1e9))
	if note != "" {
		w("- **Conditions: %s**\n", note)
	}
	w("- Tools: %s", r.FioVersion)
	for _, k := range sortedKeys(m.Versions) {
		w(", %s", m.Versions[k])
	}
	w(".\n")
	w("- Network: two network namespaces made for the run, joined by a veth pair (%s ↔ %s); mean ping RTT %s.\n",
		replSrcIP, replTgtIP, FormatMicros(float64(r.RTT.Nanoseconds())))
	w("- Method: fio's `nbd` engine (run in the source namespace) on each configuration's export, %s volumes (fresh, zero, identical on both sides: no initial copy). "+
		"All configurations run side by side and are measured in turn, alternated run by run, %d runs each of %v after a %v ramp; "+
		"before each run every replication backlog is drained and every volume fdatasync'd. Same fio arguments as the NBD section "+
		"(the flush row adds `--fsync=1`: an NBD flush after every write). Figures are medians. Replication in plaintext (`--insecure`), no compression; %s.\n",
		humanBytes(cfg.Size), cfg.Runs, cfg.Runtime, cfg.Ramp, stateNote(cfg))
	w("- Configurations:\n")
	w("  - **two-copy limit**: what this box does when every block must exist twice, on the source and across the veth, with no replication logic at all: " +
		"one fio run of two jobs started together with identical options, one on doppel's unreplicated export on the source (the local copy), " +
		"one across the veth on a plain `doppel nbd serve` of a volume in the target namespace (the remote copy). Its rate is the slower job's " +
		"(a block exists twice only once both legs wrote it), its latency the higher mean. A replicator does at least this work — the application's " +
		"write into the server and the local page-cache write, the bytes through TCP on the veth and the remote page-cache write (and each flush on both sides) — " +
		"on the same two cores, plus its own ordering and acknowledgements; so it is the ceiling for a replicated write here, the replicator's " +
		"overhead being what separates the two (the limit's legs overlap fully, which a sync write does too, doppel sending while it writes locally).\n")
	w("  - **qemu mirror**: `qemu-storage-daemon` exports the source volume over NBD; QMP `blockdev-add` of an `nbd` node connected across the veth to " +
		"`qemu-nbd` serving the target volume, then `blockdev-mirror` (sync `none`: only new writes, like doppel's `--mirror none`) in copy-mode " +
		"`background` (writes acknowledged once local, copied by the job from the source: async) or `write-blocking` (QEMU's active mirror: " +
		"a write is acknowledged once written locally and on the target: sync); measured once the job is `ready`.\n")
	w("- Commands:\n")
	for _, k := range sortedKeys(r.Argv) {
		w("  - %s: `%s`\n", k, r.Argv[k])
	}

	w("\n| workload | unit |")
	for _, mode := range modes {
		w(" %s |", ModeTitle[mode])
	}
	w("\n|---|---|")
	for range modes {
		w("--:|")
	}
	w("\n")
	for _, row := range cfg.Rows {
		unit, f := Headline(row)
		if row.Latency() {
			unit += " (mean latency)"
		}
		w("| %s | %s |", row.Name, unit)
		for _, mode := range modes {
			cell := FormatCount(r.Median(row.Slug, mode, f))
			if row.Latency() {
				cell += " (" + FormatMicros(r.Median(row.Slug, mode, Result.OpLatNs)) + ")"
			}
			if n := len(r.Failed[row.Slug][mode]); n > 0 {
				cell += fmt.Sprintf(" [%d failed]", n)
			}
			w(" %s |", cell)
		}
		w("\n")
	}
	w("\nRatios of the medians (above 1: doppel faster):\n\n")
	type ratioCol struct{ title, a, b string }
	cols := []ratioCol{
		{"async ÷ limit", ModeAsync, ModeLimit}, {"sync ÷ limit", ModeSync, ModeLimit},
		{"async ÷ qemu background", ModeAsync, ModeQemuAsync}, {"sync ÷ qemu write-blocking", ModeSync, ModeQemuSync},
		{"async ÷ unrepl.", ModeAsync, ModeUnreplicated}, {"sync ÷ unrepl.", ModeSync, ModeUnreplicated},
		{"limit ÷ unrepl.", ModeLimit, ModeUnreplicated},
	}
	cols = slices.DeleteFunc(cols, func(c ratioCol) bool { return !r.has(c.a) || !r.has(c.b) })
	w("| workload |")
	for _, c := range cols {
		w(" %s |", c.title)
	}
	w("\n|---|")
	for range cols {
		w("--:|")
	}
	w("\n")
	for _, row := range cfg.Rows {
		_, f := Headline(row)
		w("| %s |", row.Name)
		for _, c := range cols {
			w(" %s |", FormatRatio(Ratio(r.Median(row.Slug, c.a, f), r.Median(row.Slug, c.b, f))))
		}
		w("\n")
	}
	for _, b := range []string{ModeAsyncB, ModeSyncB} {
		if !r.has(b) || !r.has(abModes[b]) {
			continue
		}
		a := abModes[b]
		w("\nA/B, %s ÷ %s (the same configuration with binary A = `%s` and B = `%s`, alternated in the same run):", ModeTitle[a], ModeTitle[b],
			displayArgv([]string{r.Config.Doppel}, r.Config.Dir), displayArgv([]string{r.Config.DoppelB}, r.Config.Dir))
		for _, row := range cfg.Rows {
			_, f := Headline(row)
			w(" %s %s;", row.Name, FormatRatio(Ratio(r.Median(row.Slug, a, f), r.Median(row.Slug, b, f))))
		}
		w("\n")
	}
	w("\nTargets:\n\n")
	for _, v := range r.Verdicts() {
		s := "**met**"
		if !v.Met {
			s = "**not met**"
		}
		if v.Detail != "" {
			s += " (" + v.Detail + ")"
		}
		w("- %s: %s\n", v.Target, s)
	}

	w("\nCPU time per write of the configuration's processes (user + system over the run ÷ writes; the limit: both servers; qemu: qemu-storage-daemon and qemu-nbd; doppel: source and target), median, and in parentheses the cores used:\n\n")
	w("| workload |")
	for _, mode := range modes {
		w(" %s |", ModeTitle[mode])
	}
	w("\n|---|")
	for range modes {
		w("--:|")
	}
	w("\n")
	for _, row := range cfg.Rows {
		w("| %s |", row.Name)
		for _, mode := range modes {
			per := r.Median(row.Slug, mode, func(x Result) float64 { return float64(x.ServerCPUPerIO.Nanoseconds()) })
			share := r.Median(row.Slug, mode, func(x Result) float64 { return x.ServerCPUShare })
			if per > 0 {
				w(" %s (%.2f) |", FormatMicros(per), share)
			} else {
				w(" n/a |")
			}
		}
		w("\n")
	}
	w("\n")
	for _, mode := range modes {
		if v, ok := r.Identical[mode]; ok {
			w("Target byte-identical to the source after the %s runs (backlog drained, processes stopped, byte compare): %s.\n", ModeTitle[mode], v)
		}
	}
	if cfg.MirrorRuns > 0 {
		w("\n**Mirror** of a %s volume of pseudo-random data (nothing to skip) across the same veth, %d runs each, alternated; time from start to the last byte applied "+
			"(doppel: source process start until the mirror metric reports the whole volume; nbdcopy: the whole `nbdcopy --flush` run). Each copy is then compared with the source.\n\n",
			humanBytes(cfg.MirrorSize), cfg.MirrorRuns)
		d, n := Median(r.MirrorDoppel), Median(r.MirrorNbdcopy)
		w("| copy | MiB/s (median) | spread (max ÷ min) | runs (MiB/s) |\n|---|--:|--:|---|\n")
		w("| doppel repl source --mirror full | %s | %s | %s |\n", FormatCount(d/(1<<20)), FormatRatio(Spread(r.MirrorDoppel)), joinMiB(r.MirrorDoppel))
		w("| nbdcopy, nbdkit → nbdkit | %s | %s | %s |\n\n", FormatCount(n/(1<<20)), FormatRatio(Spread(r.MirrorNbdcopy)), joinMiB(r.MirrorNbdcopy))
		w("Mirror ÷ nbdcopy: %s.", FormatRatio(Ratio(d, n)))
		if len(r.MirrorSent) > 0 {
			w(" Mirror chunk data sent: %s MiB (median).", FormatCount(Median(r.MirrorSent)/(1<<20)))
		}
		w("\n")
		for _, e := range r.MirrorFailed {
			w("- failed run: %s\n", strings.ReplaceAll(truncate([]byte(e), 200), "\n", " "))
		}
	}
	writeProfiles(&b, "the replication source and target", r.Profiles, r.ProfileNote)
	w("\n<details><summary>Every run (headline figure; the limit's two legs in brackets; 1-minute load at the run's start)</summary>\n\n| workload | configuration | runs |\n|---|---|---|\n")
	for _, row := range cfg.Rows {
		_, f := Headline(row)
		for _, mode := range modes {
			var vs []string
			for _, res := range r.Runs[row.Slug][mode] {
				s := FormatCount(f(res))
				if len(res.Legs) == 2 {
					s += fmt.Sprintf(" [%s, %s]", FormatCount(f(res.Legs[0])), FormatCount(f(res.Legs[1])))
				}
				if res.Load > 0 {
					s += fmt.Sprintf(" (%.1f)", res.Load)
				}
				vs = append(vs, s)
			}
			for _, e := range r.Failed[row.Slug][mode] {
				vs = append(vs, "failed: "+strings.ReplaceAll(truncate([]byte(e), 80), "|", "/"))
			}
			w("| %s | %s | %s |\n", row.Name, ModeTitle[mode], strings.Join(vs, ", "))
		}
	}
	w("\n</details>\n")
	return b.String()
}

func stateNote(cfg ReplConfig) string {
	if cfg.NoStateDir {
		return "doppel's source runs **without** `--state-dir` (the bare engine: no bitmap, activity log or disk queue)"
	}
	return "doppel's source keeps its persistent state (`--state-dir`: bitmap, activity log, disk queue) as the agent's jobs do"
}

func joinMiB(xs []float64) string {
	var s []string
	for _, x := range xs {
		s = append(s, FormatCount(x/(1<<20)))
	}
	return strings.Join(s, ", ")
}

// lineWith returns the time and the took= field of the last line of the log
// at path that contains s (for the run's log line), or "".
func lineWith(path, s string) string {
	b, _ := os.ReadFile(path)
	lines := strings.Split(string(b), "\n")
	for i := len(lines) - 1; i >= 0; i-- {
		if strings.Contains(lines[i], s) {
			var out []string
			for _, f := range strings.Fields(lines[i]) {
				if strings.HasPrefix(f, "time=") || strings.HasPrefix(f, "took=") {
					out = append(out, f)
				}
			}
			return strings.Join(out, " ")
		}
	}
	return ""
}
