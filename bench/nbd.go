package bench

import (
	"context"
	"fmt"
	"log/slog"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"
)

// NBDSection is the heading of the NBD server comparison in RESULTS.md.
const NBDSection = "## NBD server: fio nbd engine vs peers"

// NBDServer is one server under test, serving a file on a Unix socket.
type NBDServer struct {
	Name string
	// Argv returns the command line serving file on the Unix socket sock.
	Argv func(file, sock string) []string `json:"-"`
	// Why explains the options chosen, for the report.
	Why string
}

// NBDServers returns the four servers compared: doppel, nbdkit's file
// plugin, qemu-nbd and go-nbd's stock server. All serve a regular file
// through the page cache (no O_DIRECT), with as many requests in flight as
// each supports by default.
func NBDServers(doppel, gonbd string) []NBDServer {
	return []NBDServer{
		{
			Name: "doppel",
			Argv: func(file, sock string) []string {
				return []string{doppel, "nbd", "serve", "--file", file, "--listen", "unix:" + sock}
			},
			Why: "defaults",
		},
		{
			Name: "nbdkit",
			Argv: func(file, sock string) []string {
				return []string{"nbdkit", "-U", sock, "-f", "--exit-with-parent", "file", "file=" + file}
			},
			Why: "defaults: parallel thread model, 16 threads, page cache (cache=default)",
		},
		{
			Name: "qemu-nbd",
			Argv: func(file, sock string) []string {
				return []string{"qemu-nbd", "-k", sock, "-f", "raw", "--cache=writeback", "--aio=threads", "--discard=unmap", "-t", "-e", "8", file}
			},
			Why: "page cache like the others (--cache=writeback, the default, stated explicitly), thread-pool AIO (the default), -t to outlive each fio client, -e 8 shared connections",
		},
		{
			Name: "go-nbd",
			Argv: func(file, sock string) []string {
				return []string{gonbd, "--file", file, "--listen", "unix:" + sock}
			},
			Why: "go-nbd v0.3.2 `server.Handle` + `backend.NewFileBackend`, stock options (bench/cmd/gonbd-serve)",
		},
	}
}

// NBDConfig configures RunNBD.
type NBDConfig struct {
	Servers []NBDServer
	Rows    []Job
	Fio     string // fio binary
	Dir     string // volumes, sockets and logs; one filesystem for all servers
	Size    int64  // volume size
	Runs    int    // runs per row and server
	Runtime time.Duration
	Ramp    time.Duration

	// Profiling (optional): doppel's binary and the rows to profile; each is
	// run once more against a fresh doppel started with --cpuprofile, after
	// the measured runs. Profiles and their `pprof -top` go to ProfileDir.
	Doppel      string
	ProfileDir  string
	ProfileRows []Job

	Log *slog.Logger `json:"-"`
}

// NBDReport holds every run's figures.
type NBDReport struct {
	Command    string // the command line that produced it
	Note       string // remark on the conditions
	Config     NBDConfig
	Machine    Machine
	Start, End time.Time
	LoadEnd    string
	FioVersion string
	// Runs[row slug][server] are the successful runs; Failed counts the rest.
	Runs   map[string]map[string][]Result
	Failed map[string]map[string][]string
	// Argv[server] is the command line used (with placeholder paths).
	Argv        map[string]string
	Profiles    []Profile
	ProfileNote string // why there are no profiles, when there are none
}

// Profile is a CPU profile of doppel taken during one row.
type Profile struct {
	Row  Job
	Path string // the pprof file
	Top  string // `go tool pprof -top` output
	Res  Result // the profiled run's figures (not part of the medians)
}

// RunNBD runs every row against every server, alternating the servers run
// by run, and returns the figures.
func RunNBD(ctx context.Context, cfg NBDConfig) (*NBDReport, error) {
	log := cfg.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	rep := &NBDReport{
		Config: cfg,
		Start:  time.Now().UTC(),
		Runs:   map[string]map[string][]Result{},
		Failed: map[string]map[string][]string{},
		Argv:   map[string]string{},
	}
	if err := os.MkdirAll(cfg.Dir, 0o755); err != nil {
		return nil, err
	}

	files := make([]string, len(cfg.Servers))
	socks := make([]string, len(cfg.Servers))
	for i, s := range cfg.Servers {
		files[i] = filepath.Join(cfg.Dir, s.Name+".img")
		socks[i] = filepath.Join(cfg.Dir, s.Name+".sock")
		rep.Argv[s.Name] = strings.Join(s.Argv("FILE", "SOCK"), " ")
		if wd, err := os.Getwd(); err == nil {
			rep.Argv[s.Name] = strings.ReplaceAll(rep.Argv[s.Name], wd+"/", "")
		}
		log.Info("preparing volume", "server", s.Name, "file", files[i], "size", cfg.Size)
		if err := PrepareVolume(files[i], cfg.Size, true, 1); err != nil {
			return nil, err
		}
	}

	order := make([]int, len(cfg.Servers))
	for i := range order {
		order[i] = i
	}
	for _, row := range cfg.Rows {
		rep.Runs[row.Slug] = map[string][]Result{}
		rep.Failed[row.Slug] = map[string][]string{}
		for run := range cfg.Runs {
			for _, i := range Rotate(order, run) {
				s := cfg.Servers[i]
				// Run k gives server i the file (i+k) mod n, so that every
				// server meets every file: files on one filesystem do not
				// write equally fast (extent layout), and a fixed
				// assignment biased the write rows.
				file := files[(i+run)%len(files)]
				res, err := runOne(ctx, cfg, row, s, file, socks[i])
				if ctx.Err() != nil {
					return nil, ctx.Err()
				}
				if err != nil {
					log.Warn("run failed", "row", row.Slug, "server", s.Name, "run", run+1, "err", err)
					rep.Failed[row.Slug][s.Name] = append(rep.Failed[row.Slug][s.Name], err.Error())
					continue
				}
				rep.FioVersion = res.FioVersion
				rep.Runs[row.Slug][s.Name] = append(rep.Runs[row.Slug][s.Name], res)
				log.Info("run", "row", row.Slug, "server", s.Name, "run", run+1, "file", filepath.Base(file),
					"iops", math.Round(res.IOPS), "MiB/s", math.Round(res.MiBps()), "lat_us", math.Round(res.LatMeanNs/1e3),
					"cpu_us_per_io", math.Round(float64(res.ServerCPUPerIO.Nanoseconds())/100)/10, "cpu_cores", math.Round(res.ServerCPUShare*100)/100)
			}
		}
	}
	rep.LoadEnd = LoadAvg()

	if cfg.ProfileDir != "" && len(cfg.ProfileRows) > 0 {
		if err := profileDoppel(ctx, cfg, rep, files[0], log); err != nil {
			rep.ProfileNote = err.Error()
			log.Warn("profiling", "err", err)
		}
	}
	rep.End = time.Now().UTC()
	return rep, nil
}

// runOne starts server s on file, runs one fio job against it and stops it,
// so that only the server being measured is running.
func runOne(ctx context.Context, cfg NBDConfig, row Job, s NBDServer, file, sock string) (Result, error) {
	if err := SyncFiles(file); err != nil {
		return Result{}, err
	}
	_ = os.Remove(sock)
	p, err := StartProc(s.Name, s.Argv(file, sock), filepath.Join(cfg.Dir, s.Name+".log"))
	if err != nil {
		return Result{}, err
	}
	defer func() {
		if p.Alive() {
			_ = p.Stop(10 * time.Second)
		}
	}()
	if err := p.WaitUnix(ctx, sock, 15*time.Second); err != nil {
		return Result{}, err
	}
	cpu0, t0 := ProcCPU(p.PID()), time.Now()
	res, err := RunFio(ctx, cfg.Fio, FioArgs(row, "nbd+unix:///?socket="+sock, cfg.Runtime, cfg.Ramp), row.Write())
	res.SetServerCPU(ProcCPU(p.PID())-cpu0, time.Since(t0))
	if err != nil {
		return res, err
	}
	if !p.Alive() {
		return res, fmt.Errorf("%s exited during the run: %v", s.Name, p.Exited())
	}
	if err := p.Stop(10 * time.Second); err != nil {
		return res, fmt.Errorf("stop %s: %w", s.Name, err)
	}
	return res, nil
}

// profileDoppel runs each profile row against a doppel started with
// --cpuprofile and records `go tool pprof -top` of each profile.
func profileDoppel(ctx context.Context, cfg NBDConfig, rep *NBDReport, file string, log *slog.Logger) error {
	help, _ := exec.Command(cfg.Doppel, "nbd", "serve", "--help").CombinedOutput()
	if !strings.Contains(string(help), "--cpuprofile") {
		return fmt.Errorf("no CPU profile: `%s nbd serve` has no --cpuprofile flag", filepath.Base(cfg.Doppel))
	}
	if err := os.MkdirAll(cfg.ProfileDir, 0o755); err != nil {
		return err
	}
	sock := filepath.Join(cfg.Dir, "doppel-prof.sock")
	for _, row := range cfg.ProfileRows {
		prof, err := filepath.Abs(filepath.Join(cfg.ProfileDir, "doppel-"+row.Slug+".prof"))
		if err != nil {
			return err
		}
		argv := []string{cfg.Doppel, "nbd", "serve", "--file", file, "--listen", "unix:" + sock, "--cpuprofile", prof}
		p, err := StartProc("doppel (profiled)", argv, filepath.Join(cfg.Dir, "doppel-prof.log"))
		if err != nil {
			return err
		}
		if err := p.WaitUnix(ctx, sock, 15*time.Second); err != nil {
			p.Stop(5 * time.Second)
			return err
		}
		if err := SyncFiles(file); err != nil {
			p.Stop(5 * time.Second)
			return err
		}
		res, ferr := RunFio(ctx, cfg.Fio, FioArgs(row, "nbd+unix:///?socket="+sock, cfg.Runtime, cfg.Ramp), row.Write())
		serr := p.Stop(30 * time.Second)
		if ferr != nil {
			return ferr
		}
		if serr != nil {
			return serr
		}
		top, err := PprofTop(ctx, cfg.Doppel, prof)
		if err != nil {
			return err
		}
		log.Info("profiled", "row", row.Slug, "profile", prof, "iops", math.Round(res.IOPS))
		rep.Profiles = append(rep.Profiles, Profile{Row: row, Path: prof, Top: string(top), Res: res})
	}
	return nil
}

func (r *NBDReport) hasCPU() bool {
	for _, byServer := range r.Runs {
		for _, runs := range byServer {
			for _, x := range runs {
				if x.ServerCPUPerIO > 0 {
					return true
				}
			}
		}
	}
	return false
}

// PprofTop runs `go tool pprof -top -cum` (and the flat top) on prof,
// saves both next to it as .txt and returns the cumulative top.
func PprofTop(ctx context.Context, bin, prof string) (string, error) {
	// Cumulative order shows where the time goes (which syscall, the
	// scheduler, the reply path); the flat order follows in the file.
	top, err := exec.CommandContext(ctx, "go", "tool", "pprof", "-top", "-cum", "-nodecount=45", bin, prof).Output()
	if err != nil {
		return "", fmt.Errorf("pprof %s: %w", prof, err)
	}
	flat, err := exec.CommandContext(ctx, "go", "tool", "pprof", "-top", "-nodecount=25", bin, prof).Output()
	if err != nil {
		return "", fmt.Errorf("pprof %s: %w", prof, err)
	}
	txt := strings.TrimSuffix(prof, ".prof") + ".txt"
	if err := os.WriteFile(txt, append(append(top, "\n# flat\n"...), flat...), 0o644); err != nil {
		return "", err
	}
	return string(top), nil
}

// Median returns the median of a figure over the runs of row on server.
func (r *NBDReport) Median(row, server string, f func(Result) float64) float64 {
	var xs []float64
	for _, res := range r.Runs[row][server] {
		xs = append(xs, f(res))
	}
	return Median(xs)
}

// Headline is the figure a row is compared on: MiB/s for 1 MiB rows, IOPS
// otherwise.
func Headline(j Job) (unit string, f func(Result) float64) {
	if j.BS == "1M" {
		return "MiB/s", Result.MiBps
	}
	return "IOPS", func(r Result) float64 { return r.IOPS }
}

// Markdown renders the report as the RESULTS.md section. command is the
// command line that produced it and note an optional remark on conditions.
func (r *NBDReport) Markdown(command, note string) string {
	var b strings.Builder
	cfg := r.Config
	w := func(format string, a ...any) { fmt.Fprintf(&b, format, a...) }
	w("%s\n\n", NBDSection)
	w("Measured %s by `%s`.\n\n", r.Start.Format("2006-01-02 15:04 MST"), command)
	m := r.Machine
	w("- Machine: %s; benchmark files on %s. Load average %s at start, %s at end.\n", m, m.FS, m.Load, r.LoadEnd)
	if note != "" {
		w("- **Conditions: %s**\n", note)
	}
	w("- Tools: %s", r.FioVersion)
	for _, k := range sortedKeys(m.Versions) {
		w(", %s", m.Versions[k])
	}
	w(".\n")
	w("- Method: %d preallocated %s files of pseudo-random data on the same filesystem (page cache warm); run k starts server i alone on file (i+k) mod %d over a Unix socket and stops it after the run, so every server meets every file and only the server measured is running. "+
		"fio's `nbd` engine, one job, identical arguments for every server except `--uri`: %s. "+
		"Each run lasts %v after a %v ramp (excluded); %d runs per row and server; the servers are alternated run by run (run k starts with the k-th server); "+
		"before each run the volume is fdatasync'd so no run pays for another's writeback. Figures are medians of the runs; ratio = doppel ÷ peer (above 1: doppel faster).\n",
		len(cfg.Servers), humanBytes(cfg.Size), len(cfg.Servers), fioTemplate(cfg.Runtime, cfg.Ramp),
		cfg.Runtime, cfg.Ramp, cfg.Runs)
	w("- Servers:\n")
	for _, s := range cfg.Servers {
		w("  - %s: `%s` (%s)\n", s.Name, r.Argv[s.Name], s.Why)
	}
	w("\n")

	// The table.
	var peers []string
	w("| workload | unit |")
	for _, s := range cfg.Servers {
		w(" %s |", s.Name)
		if s.Name != "doppel" {
			peers = append(peers, s.Name)
		}
	}
	for _, p := range peers {
		w(" doppel ÷ %s |", p)
	}
	w("\n|---|---|")
	for range len(cfg.Servers) + len(peers) {
		w("--:|")
	}
	w("\n")
	type miss struct{ row, peer string }
	var belowNbdkit, behindGonbd []miss
	for _, row := range cfg.Rows {
		unit, f := Headline(row)
		if row.Latency() {
			unit += " (mean latency)"
		}
		w("| %s | %s |", row.Name, unit)
		for _, s := range cfg.Servers {
			v := r.Median(row.Slug, s.Name, f)
			cell := FormatCount(v)
			if row.Latency() {
				cell += " (" + FormatMicros(r.Median(row.Slug, s.Name, func(x Result) float64 { return x.LatMeanNs })) + ")"
			}
			if n := len(r.Failed[row.Slug][s.Name]); n > 0 {
				cell += fmt.Sprintf(" [%d failed]", n)
			}
			w(" %s |", cell)
		}
		d := r.Median(row.Slug, "doppel", f)
		for _, p := range peers {
			ratio := Ratio(d, r.Median(row.Slug, p, f))
			w(" %s |", FormatRatio(ratio))
			if (p == "nbdkit" && !(ratio >= 1.0)) || (p == "go-nbd" && !(ratio > 1.0)) {
				if p == "nbdkit" {
					belowNbdkit = append(belowNbdkit, miss{row.Name, p})
				} else {
					behindGonbd = append(behindGonbd, miss{row.Name, p})
				}
			}
		}
		w("\n")
	}
	w("\n")
	if has(cfg.Servers, "doppel") {
		w("Targets: doppel ≥ 1.0× nbdkit on every row — ")
		if has(cfg.Servers, "nbdkit") {
			if len(belowNbdkit) == 0 {
				w("**met**")
			} else {
				var rows []string
				for _, m := range belowNbdkit {
					rows = append(rows, m.row)
				}
				w("**not met** on %s", strings.Join(rows, "; "))
			}
		} else {
			w("not measured")
		}
		w("; doppel ahead of go-nbd on every row — ")
		if has(cfg.Servers, "go-nbd") {
			if len(behindGonbd) == 0 {
				w("**met**")
			} else {
				var rows []string
				for _, m := range behindGonbd {
					rows = append(rows, m.row)
				}
				w("**not met** on %s", strings.Join(rows, "; "))
			}
		} else {
			w("not measured")
		}
		w(".\n\n")
	}

	// CPU cost: on a shared machine the rate depends on what else runs, the
	// server's CPU time per I/O much less.
	if r.hasCPU() {
		w("Server CPU per I/O (user + system time of the server process over the run ÷ I/Os; median), and in parentheses the server's CPU use in cores: " +
			"less CPU per I/O is better and is less sensitive to the machine's noise than the rates.\n\n")
		w("| workload |")
		for _, s := range cfg.Servers {
			w(" %s |", s.Name)
		}
		w("\n|---|")
		for range cfg.Servers {
			w("--:|")
		}
		w("\n")
		for _, row := range cfg.Rows {
			w("| %s |", row.Name)
			for _, s := range cfg.Servers {
				per := r.Median(row.Slug, s.Name, func(x Result) float64 { return float64(x.ServerCPUPerIO.Nanoseconds()) })
				share := r.Median(row.Slug, s.Name, func(x Result) float64 { return x.ServerCPUShare })
				if per > 0 {
					w(" %s (%.2f) |", FormatMicros(per), share)
				} else {
					w(" n/a |")
				}
			}
			w("\n")
		}
		w("\n")
	}

	// Every run, for whoever doubts a median.
	w("<details><summary>Every run (same unit as the table; iodepth-1 rows also p99 completion latency)</summary>\n\n")
	w("| workload | server | runs | p99 latency (median) |\n|---|---|---|--:|\n")
	for _, row := range cfg.Rows {
		_, f := Headline(row)
		for _, s := range cfg.Servers {
			var vs []string
			for _, res := range r.Runs[row.Slug][s.Name] {
				vs = append(vs, FormatCount(f(res)))
			}
			for _, e := range r.Failed[row.Slug][s.Name] {
				vs = append(vs, "failed: "+strings.ReplaceAll(truncate([]byte(e), 80), "|", "/"))
			}
			p99 := FormatMicros(r.Median(row.Slug, s.Name, func(x Result) float64 { return x.LatP99Ns }))
			w("| %s | %s | %s | %s |\n", row.Name, s.Name, strings.Join(vs, ", "), p99)
		}
	}
	w("\n</details>\n")

	writeProfiles(&b, "doppel's server", r.Profiles, r.ProfileNote)
	return b.String()
}

// writeProfiles renders the profile summary table and the tops.
func writeProfiles(b *strings.Builder, what string, profiles []Profile, note string) {
	w := func(format string, a ...any) { fmt.Fprintf(b, format, a...) }
	if len(profiles) == 0 && note == "" {
		return
	}
	w("\n### CPU profile of %s\n\n", what)
	if note != "" {
		w("%s\n", note)
	}
	var pprofs, perfs []Profile
	for _, p := range profiles {
		if strings.HasPrefix(p.Top, "perf ") {
			perfs = append(perfs, p)
		} else {
			pprofs = append(pprofs, p)
		}
	}
	if len(pprofs) > 0 {
		w("One extra run per row against a doppel started with `--cpuprofile` (not part of the medians). " +
			"CPU is the profile's samples over its duration (100%% = one core); the other columns are cumulative shares of those samples " +
			"(`go tool pprof -top -cum`; the profiles and their full cumulative and flat tops are left in `bench/profiles/`, which git ignores).\n\n")
		w("| profiled row | run | CPU |")
		for _, c := range profileColumns {
			w(" %s |", c.label)
		}
		w("\n|---|--:|--:|")
		for range profileColumns {
			w("--:|")
		}
		w("\n")
		for _, p := range pprofs {
			unit, f := Headline(p.Row)
			sum := SummarizeProfile(p.Top)
			w("| %s | %s %s | %s |", p.Row.Name, FormatCount(f(p.Res)), unit, sum.CPU)
			for _, c := range profileColumns {
				w(" %s |", sum.Share[c.label])
			}
			w("\n")
		}
		w("\n")
		for _, p := range pprofs {
			w("<details><summary>%s: top of <code>go tool pprof -top -cum</code></summary>\n\n```\n%s```\n\n</details>\n\n", p.Row.Name, TopLines(p.Top, 30))
		}
	}
	if len(perfs) > 0 {
		w("One extra run per row, each process sampled with `perf record -F 999 -g -p PID` where the binary has no `--cpuprofile` " +
			"(user and kernel stacks; not part of the medians). Symbols by cumulative (children) share, flat (self) share next to it:\n\n")
		for _, p := range perfs {
			unit, f := Headline(p.Row)
			w("<details><summary>%s (profiled run: %s %s)</summary>\n\n```\n%s```\n\n</details>\n\n", p.Row.Name, FormatCount(f(p.Res)), unit, firstLines(p.Top, 32))
		}
	}
}

// firstLines returns the first n lines of s.
func firstLines(s string, n int) string {
	var b strings.Builder
	for l := range strings.Lines(s) {
		if n == 0 {
			break
		}
		b.WriteString(l)
		n--
	}
	return b.String()
}

// TopLines returns the header and the first n function lines of `go tool
// pprof -top` output, dropping the binary's path lines.
func TopLines(top string, n int) string {
	var b strings.Builder
	funcs := 0
	for l := range strings.Lines(top) {
		t := strings.TrimSpace(l)
		if strings.HasPrefix(t, "File:") || strings.HasPrefix(t, "Build ID:") || strings.HasPrefix(t, "Type:") || strings.HasPrefix(t, "Time:") {
			continue
		}
		if strings.HasPrefix(t, "Showing") || strings.HasPrefix(t, "Duration") || strings.HasPrefix(t, "flat") {
			b.WriteString(l)
			continue
		}
		if funcs >= n {
			break
		}
		if t != "" {
			funcs++
			b.WriteString(l)
		}
	}
	return b.String()
}

func has(servers []NBDServer, name string) bool {
	for _, s := range servers {
		if s.Name == name {
			return true
		}
	}
	return false
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}

func humanBytes(n int64) string {
	switch {
	case n >= 1<<30 && n%(1<<30) == 0:
		return fmt.Sprintf("%d GiB", n>>30)
	case n >= 1<<20 && n%(1<<20) == 0:
		return fmt.Sprintf("%d MiB", n>>20)
	}
	return fmt.Sprintf("%d bytes", n)
}

// fioTemplate is the fio command line of every run with placeholders.
func fioTemplate(runtime, ramp time.Duration) string {
	args := FioArgs(Job{Slug: "ROW", RW: "RW", BS: "BS", IODepth: 1}, "nbd+unix:///?socket=SOCK", runtime, ramp)
	for i, a := range args {
		if a == "--iodepth=1" {
			args[i] = "--iodepth=QD"
		}
	}
	return "`fio " + strings.Join(args, " ") + "` (random rows add `--norandommap --randrepeat=0`)"
}

// profileColumns are the call sites a profile summary reports, by label.
var profileColumns = []struct{ label, fn string }{
	{"pread (backend)", "golang.org/x/sys/unix.pread"},
	{"pwrite (backend)", "golang.org/x/sys/unix.pwrite"},
	{"socket read (requests)", "internal/poll.(*FD).Read"},
	{"socket writev (replies)", "internal/poll.(*FD).Writev"},
	{"Go scheduler", "runtime.schedule"},
	{"futex", "runtime.futex"},
	{"GC", "runtime.gcBgMarkWorker"},
}

// ProfileSummary is the compact form of a CPU profile.
type ProfileSummary struct {
	CPU   string            // samples over duration, e.g. "26%"
	Share map[string]string // column label -> cumulative share, e.g. "30%"
}

// SummarizeProfile reads `go tool pprof -top -cum` output.
func SummarizeProfile(top string) ProfileSummary {
	sum := ProfileSummary{CPU: "?", Share: map[string]string{}}
	for _, c := range profileColumns {
		sum.Share[c.label] = "0%"
	}
	for l := range strings.Lines(top) {
		t := strings.TrimSpace(l)
		if strings.HasPrefix(t, "Duration:") {
			if i := strings.LastIndex(t, "("); i >= 0 {
				sum.CPU = strings.TrimSuffix(strings.TrimSpace(t[i+1:]), ")")
				if v, err := strconv.ParseFloat(strings.TrimSuffix(sum.CPU, "%"), 64); err == nil {
					sum.CPU = fmt.Sprintf("%.0f%%", v)
				}
			}
			continue
		}
		f := strings.Fields(t)
		if len(f) < 6 || !strings.HasSuffix(f[4], "%") {
			continue
		}
		for _, c := range profileColumns {
			if f[5] == c.fn {
				if v, err := strconv.ParseFloat(strings.TrimSuffix(f[4], "%"), 64); err == nil {
					sum.Share[c.label] = fmt.Sprintf("%.0f%%", v)
				}
			}
		}
	}
	return sum
}
