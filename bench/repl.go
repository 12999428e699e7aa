package bench

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"
)

// ReplSection is the heading of the replication benchmark in RESULTS.md.
const ReplSection = "## Replication: fio nbd engine on a replicated export, mirror vs nbdcopy"

// ReplRows are the rows of issue 3's table.
var ReplRows = []Job{NBDRows[0], NBDRows[2], NBDRows[3]}

// Replication modes compared, in table order.
const (
	ModeUnreplicated = "unreplicated"
	ModeAsync        = "async"
	ModeSync         = "sync"
)

// ReplModes are the columns of the table.
var ReplModes = []string{ModeUnreplicated, ModeAsync, ModeSync}

// ReplMetricNames are the Prometheus series the harness reads from `doppel
// repl source --metrics-listen`. Each is a metric name optionally followed
// by label matchers, e.g. `doppel_repl_sent_bytes_total kind="mirror"`.
type ReplMetricNames struct {
	MirrorDone      string // bytes of the volume the mirror has covered
	MirrorRemaining string // bytes left to mirror (0 when done)
	MirrorActive    string // 1 while a mirror runs
	MirrorSent      string // bytes the mirror put on the wire
	Consistent      string // 1 when the target's data is consistent
	Sequence        string // last sequence number assigned by the source
	Acked           string // last sequence number the target acknowledged
}

// DefaultReplMetrics are the names `doppel repl` exposes.
var DefaultReplMetrics = ReplMetricNames{
	MirrorDone:      `doppel_repl_mirror_bytes stage="done"`,
	MirrorRemaining: `doppel_repl_mirror_bytes stage="remaining"`,
	MirrorActive:    `doppel_repl_mirror_active`,
	MirrorSent:      `doppel_repl_sent_bytes_total kind="mirror"`,
	Consistent:      `doppel_repl_target_data_state state="consistent"`,
	Sequence:        `doppel_repl_sequence stage="assigned"`,
	Acked:           `doppel_repl_sequence stage="acknowledged"`,
}

// get reads the series spec ("name label=..." ...) from m.
func (m Metrics) series(spec string) (float64, bool) {
	f := strings.Fields(spec)
	if len(f) == 0 {
		return 0, false
	}
	return m.Get(f[0], f[1:]...)
}

// ReplConfig configures RunRepl.
type ReplConfig struct {
	Doppel     string
	Fio        string
	Dir        string // volumes, sockets, logs
	Size       int64  // volume of the fio rows
	Runs       int    // runs per row and mode, modes alternated run by run
	Runtime    time.Duration
	Ramp       time.Duration
	Rows       []Job
	MirrorSize int64 // volume mirrored (filled with pseudo-random data)
	MirrorRuns int   // runs of each of doppel's mirror and nbdcopy, alternated
	Metrics    ReplMetricNames
	// Profiling (optional): each ProfileRows entry is run once more against
	// a fresh pair whose source has --cpuprofile, when `doppel repl source`
	// has that flag. Profiles go to ProfileDir.
	ProfileDir  string
	ProfileRows []ReplProfileRow
	Log         *slog.Logger `json:"-"`
}

// ReplProfileRow is a row to profile the replication source on, in a mode.
type ReplProfileRow struct {
	Mode string
	Row  Job
}

// ReplReport holds the replication benchmark's figures.
type ReplReport struct {
	Command    string // the command line that produced it
	Note       string // remark on the conditions
	Config     ReplConfig
	Machine    Machine
	Start, End time.Time
	LoadEnd    string
	FioVersion string
	RTT        time.Duration // mean ping RTT across the veth
	Argv       map[string]string
	// Runs[row slug][mode] and failures.
	Runs   map[string]map[string][]Result
	Failed map[string]map[string][]string
	// Identical[mode]: after the runs (and the async queue drained), the
	// target file equals the source file.
	Identical map[string]string
	// Mirror throughput runs, bytes/s, and the mirror's sent bytes.
	MirrorDoppel  []float64
	MirrorNbdcopy []float64
	MirrorSent    []float64
	MirrorFailed  []string
	Profiles      []Profile
	ProfileNote   string
}

// Addresses on the veth pair and the ports of each configuration.
const (
	replSrcIP = "10.199.0.1"
	replTgtIP = "10.199.0.2"
)

// ErrReplNotBuilt is returned when the doppel binary has no working
// `repl` command group yet.
var ErrReplNotBuilt = errors.New("`doppel repl` is not built in this binary yet")

// CheckRepl verifies that doppel has the repl plumbing commands the harness
// drives.
func CheckRepl(doppel string) error {
	for _, sub := range []string{"source", "target"} {
		out, err := exec.Command(doppel, "repl", sub, "--help").CombinedOutput()
		if err != nil || !strings.Contains(string(out), "--listen") {
			return fmt.Errorf("%w (`%s repl %s --help`: %v %s)", ErrReplNotBuilt, filepath.Base(doppel), sub, err, truncate(out, 200))
		}
	}
	return nil
}

// replSetup is one configuration being measured.
type replSetup struct {
	mode          string
	sock          string
	src, tgt      string // files (tgt empty when unreplicated)
	metrics       string // source metrics URL (empty when unreplicated)
	srcProc, tgtP *Proc
}

// replPair is one source/target pair of `doppel repl` across the link.
type replPair struct {
	cfg            ReplConfig
	link           *Link
	mode           string // sync or async
	src, tgt, sock string
	size           int64 // for the target's --size when its file is missing (0: not passed)
	port           int   // replication port; metrics on port+1 (target) and port+2 (source)
	mirror         string
	srcExtra       []string
}

func (p replPair) argv() (tgt, src []string) {
	tgt = In(p.link.Tgt, p.cfg.Doppel, "repl", "target", "--file", p.tgt, "--state-dir", p.tgt+".state")
	if p.size > 0 {
		tgt = append(tgt, "--size", fmt.Sprint(p.size))
	}
	tgt = append(tgt, "--listen", fmt.Sprintf("tcp:%s:%d", replTgtIP, p.port), "--insecure",
		"--metrics-listen", fmt.Sprintf("%s:%d", replTgtIP, p.port+1))
	size := p.size
	if size == 0 {
		size = p.cfg.Size
	}
	src = In(p.link.Src, p.cfg.Doppel, "repl", "source", "--file", p.src, "--size", fmt.Sprint(size),
		"--listen", "unix:"+p.sock, "--target", fmt.Sprintf("tcp:%s:%d", replTgtIP, p.port),
		"--mode", p.mode, "--mirror", p.mirror, "--insecure",
		"--metrics-listen", fmt.Sprintf("%s:%d", replSrcIP, p.port+2))
	return tgt, append(src, p.srcExtra...)
}

func (p replPair) metricsURL() string {
	return fmt.Sprintf("http://%s:%d/metrics", replSrcIP, p.port+2)
}

// start starts the target, waits for its listener, then starts the source
// (without waiting for its socket: the mirror timing starts here).
func (p replPair) start(ctx context.Context, start func(string, []string) (*Proc, error)) (tgt, src *Proc, err error) {
	tArgv, sArgv := p.argv()
	os.Remove(p.sock)
	if tgt, err = start(p.mode+" target", tArgv); err != nil {
		return nil, nil, err
	}
	addr := fmt.Sprintf("%s:%d", replTgtIP, p.port)
	if err := tgt.WaitReady(ctx, 15*time.Second, func() error { return dialClose(ctx, p.link.Tgt, addr) }); err != nil {
		return tgt, nil, err
	}
	src, err = start(p.mode+" source", sArgv)
	return tgt, src, err
}

// RunRepl measures unreplicated, async and sync writes through doppel's NBD
// export and the mirror against nbdcopy, across a veth pair between two
// namespaces it creates and deletes.
func RunRepl(ctx context.Context, cfg ReplConfig) (*ReplReport, error) {
	log := cfg.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if err := CheckRepl(cfg.Doppel); err != nil {
		return nil, err
	}
	rep := &ReplReport{
		Config:    cfg,
		Start:     time.Now().UTC(),
		Argv:      map[string]string{},
		Runs:      map[string]map[string][]Result{},
		Failed:    map[string]map[string][]string{},
		Identical: map[string]string{},
	}
	link, err := NewLink("db", replSrcIP, replTgtIP)
	if err != nil {
		return nil, err
	}
	defer link.Close()
	log.Info("namespaces ready", "src", link.Src, "tgt", link.Tgt)
	if rep.RTT, err = link.PingRTT(50); err != nil {
		return nil, err
	}
	srcHTTP := HTTPClientIn(link.Src)

	var procs []*Proc
	defer func() {
		for _, p := range procs {
			if p.Alive() {
				_ = p.Stop(10 * time.Second)
			}
		}
	}()
	start := func(name string, argv []string) (*Proc, error) {
		p, err := StartProc(name, argv, filepath.Join(cfg.Dir, strings.ReplaceAll(name, " ", "-")+".log"))
		if err == nil {
			procs = append(procs, p)
		}
		return p, err
	}

	// Three configurations, all running, measured in turn.
	var setups []*replSetup
	for i, mode := range ReplModes {
		s := &replSetup{mode: mode, sock: filepath.Join(cfg.Dir, mode+".sock"), src: filepath.Join(cfg.Dir, mode+"-src.img")}
		if err := PrepareVolume(s.src, cfg.Size, false, 0); err != nil {
			return nil, err
		}
		if mode == ModeUnreplicated {
			argv := In(link.Src, cfg.Doppel, "nbd", "serve", "--file", s.src, "--listen", "unix:"+s.sock)
			rep.Argv[mode] = displayArgv(argv, cfg.Dir)
			if s.srcProc, err = start(mode, argv); err != nil {
				return nil, err
			}
		} else {
			s.tgt = filepath.Join(cfg.Dir, mode+"-tgt.img")
			if err := PrepareVolume(s.tgt, cfg.Size, false, 0); err != nil {
				return nil, err
			}
			pair := replPair{cfg: cfg, link: link, mode: mode, src: s.src, tgt: s.tgt, sock: s.sock, port: 16325 + 10*i, mirror: "none"}
			tgtArgv, srcArgv := pair.argv()
			s.metrics = pair.metricsURL()
			rep.Argv[mode+" target"] = displayArgv(tgtArgv, cfg.Dir)
			rep.Argv[mode+" source"] = displayArgv(srcArgv, cfg.Dir)
			if s.tgtP, s.srcProc, err = pair.start(ctx, start); err != nil {
				return nil, err
			}
		}
		if err := s.srcProc.WaitUnix(ctx, s.sock, 15*time.Second); err != nil {
			return nil, err
		}
		setups = append(setups, s)
		log.Info("configuration ready", "mode", mode)
	}

	var files []string
	for _, s := range setups {
		files = append(files, s.src)
		if s.tgt != "" {
			files = append(files, s.tgt)
		}
	}
	for _, row := range cfg.Rows {
		rep.Runs[row.Slug] = map[string][]Result{}
		rep.Failed[row.Slug] = map[string][]string{}
		for run := range cfg.Runs {
			for _, s := range Rotate(setups, run) {
				for _, p := range []*Proc{s.srcProc, s.tgtP} {
					if p != nil && !p.Alive() {
						return nil, p.Exited()
					}
				}
				// Start each run from a quiet state: every queue drained, no
				// dirty pages left by the previous run.
				for _, o := range setups {
					if o.metrics != "" {
						if err := waitDrained(ctx, srcHTTP, o.metrics, cfg.Metrics, 60*time.Second); err != nil {
							return nil, fmt.Errorf("%s: %w", o.mode, err)
						}
					}
				}
				if err := SyncFiles(files...); err != nil {
					return nil, err
				}
				cpu := func() time.Duration {
					c := ProcCPU(s.srcProc.PID())
					if s.tgtP != nil {
						c += ProcCPU(s.tgtP.PID())
					}
					return c
				}
				cpu0, t0 := cpu(), time.Now()
				res, err := RunFio(ctx, cfg.Fio, FioArgs(row, "nbd+unix:///?socket="+s.sock, cfg.Runtime, cfg.Ramp), true)
				if ctx.Err() != nil {
					return nil, ctx.Err()
				}
				res.SetServerCPU(cpu()-cpu0, time.Since(t0))
				if err != nil {
					log.Warn("run failed", "row", row.Slug, "mode", s.mode, "run", run+1, "err", err)
					rep.Failed[row.Slug][s.mode] = append(rep.Failed[row.Slug][s.mode], err.Error())
					continue
				}
				rep.FioVersion = res.FioVersion
				rep.Runs[row.Slug][s.mode] = append(rep.Runs[row.Slug][s.mode], res)
				log.Info("run", "row", row.Slug, "mode", s.mode, "run", run+1,
					"iops", math.Round(res.IOPS), "MiB/s", math.Round(res.MiBps()), "lat_us", math.Round(res.LatMeanNs/1e3),
					"cpu_us_per_io", math.Round(float64(res.ServerCPUPerIO.Nanoseconds())/100)/10)
			}
		}
	}

	// Every replicated write must be on the target: drain, stop, compare.
	for _, s := range setups {
		if s.tgt == "" {
			continue
		}
		if err := waitDrained(ctx, srcHTTP, s.metrics, cfg.Metrics, 60*time.Second); err != nil {
			rep.Identical[s.mode] = "not checked: " + err.Error()
			continue
		}
		if err := s.srcProc.Stop(30 * time.Second); err != nil {
			log.Warn("stop", "mode", s.mode, "err", err)
		}
		if err := s.tgtP.Stop(30 * time.Second); err != nil {
			log.Warn("stop", "mode", s.mode+" target", "err", err)
		}
		if err := SameContent(s.src, s.tgt); err != nil {
			rep.Identical[s.mode] = "**no**: " + err.Error()
		} else {
			rep.Identical[s.mode] = "yes"
		}
	}
	for _, s := range setups {
		if s.srcProc.Alive() {
			_ = s.srcProc.Stop(10 * time.Second)
		}
	}

	if cfg.ProfileDir != "" && len(cfg.ProfileRows) > 0 {
		if err := profileRepl(ctx, cfg, rep, link, start, log); err != nil {
			rep.ProfileNote = err.Error()
			log.Warn("profiling", "err", err)
		}
	}
	if cfg.MirrorRuns > 0 {
		if err := runMirror(ctx, cfg, rep, link, srcHTTP, start, log); err != nil {
			return nil, err
		}
	}
	rep.LoadEnd = LoadAvg()
	rep.End = time.Now().UTC()
	return rep, nil
}

// profileRepl profiles the source of a fresh pair during each profile row.
func profileRepl(ctx context.Context, cfg ReplConfig, rep *ReplReport, link *Link, start func(string, []string) (*Proc, error), log *slog.Logger) error {
	help, _ := exec.Command(cfg.Doppel, "repl", "source", "--help").CombinedOutput()
	usePprof := strings.Contains(string(help), "--cpuprofile")
	perf, perfErr := exec.LookPath("perf")
	if !usePprof && perfErr != nil {
		return fmt.Errorf("no CPU profile of the source: `%s repl source` has no --cpuprofile flag and perf is not installed", filepath.Base(cfg.Doppel))
	}
	if err := os.MkdirAll(cfg.ProfileDir, 0o755); err != nil {
		return err
	}
	for _, pr := range cfg.ProfileRows {
		prof, err := filepath.Abs(filepath.Join(cfg.ProfileDir, "repl-"+pr.Mode+"-"+pr.Row.Slug+".prof"))
		if err != nil {
			return err
		}
		pair := replPair{cfg: cfg, link: link, mode: pr.Mode, port: 16375, mirror: "none",
			src: filepath.Join(cfg.Dir, "prof-src.img"), tgt: filepath.Join(cfg.Dir, "prof-tgt.img"),
			sock: filepath.Join(cfg.Dir, "prof.sock")}
		if usePprof {
			pair.srcExtra = []string{"--cpuprofile", prof}
		}
		for _, f := range []string{pair.src, pair.tgt} {
			if err := PrepareVolume(f, cfg.Size, false, 0); err != nil {
				return err
			}
		}
		tp, sp, err := pair.start(ctx, start)
		stop := func() error {
			var errs []error
			if sp != nil {
				errs = append(errs, sp.Stop(30*time.Second))
			}
			if tp != nil {
				errs = append(errs, tp.Stop(30*time.Second))
			}
			return errors.Join(errs...)
		}
		if err == nil {
			err = sp.WaitUnix(ctx, pair.sock, 15*time.Second)
		}
		if err != nil {
			stop()
			return err
		}
		// Without --cpuprofile, perf samples the source process (user and
		// kernel stacks) for the whole fio run.
		// The target has no --cpuprofile: perf samples it too when present.
		var recs []*exec.Cmd
		perfData := strings.TrimSuffix(prof, ".prof") + ".perf.data"
		tgtData := strings.TrimSuffix(prof, ".prof") + "-target.perf.data"
		record := func(data string, pid int) error {
			c := exec.Command(perf, "record", "-q", "-F", "999", "-g", "-o", data, "-p", fmt.Sprint(pid))
			if err := c.Start(); err != nil {
				return fmt.Errorf("perf record: %w", err)
			}
			recs = append(recs, c)
			return nil
		}
		if !usePprof {
			if err := record(perfData, sp.PID()); err != nil {
				stop()
				return err
			}
		}
		if perfErr == nil {
			if err := record(tgtData, tp.PID()); err != nil {
				stop()
				return err
			}
		}
		res, ferr := RunFio(ctx, cfg.Fio, FioArgs(pr.Row, "nbd+unix:///?socket="+pair.sock, cfg.Runtime, cfg.Ramp), true)
		for _, c := range recs {
			_ = c.Process.Signal(os.Interrupt)
			_ = c.Wait()
		}
		serr := stop()
		if ferr != nil {
			return ferr
		}
		if serr != nil {
			return serr
		}
		var top string
		if usePprof {
			top, err = PprofTop(ctx, cfg.Doppel, prof)
		} else {
			prof = perfData
			top, err = PerfTop(ctx, perf, perfData, "the source process")
		}
		if err != nil {
			return err
		}
		row := pr.Row
		row.Name = pr.Mode + " source: " + pr.Row.Name
		rep.Profiles = append(rep.Profiles, Profile{Row: row, Path: prof, Top: top, Res: res})
		if perfErr == nil {
			ttop, err := PerfTop(ctx, perf, tgtData, "the target process")
			if err != nil {
				return err
			}
			row.Name = pr.Mode + " target: " + pr.Row.Name
			rep.Profiles = append(rep.Profiles, Profile{Row: row, Path: tgtData, Top: ttop, Res: res})
		}
		log.Info("profiled", "mode", pr.Mode, "row", pr.Row.Slug, "iops", math.Round(res.IOPS))
	}
	return nil
}

// PerfTop reports a perf recording by symbol, cumulative (children)
// shares first, in the spirit of `pprof -top -cum`; it saves the text next
// to the recording as .txt.
func PerfTop(ctx context.Context, perf, data, what string) (string, error) {
	out, err := exec.CommandContext(ctx, perf, "report", "-i", data, "--stdio", "--children", "-g", "none",
		"--sort", "sym", "--percent-limit", "2").Output()
	if err != nil {
		return "", fmt.Errorf("perf report %s: %w", data, err)
	}
	var b strings.Builder
	b.WriteString("perf record -F 999 -g of " + what + "; children = cumulative share, self = flat share\n")
	for l := range strings.Lines(string(out)) {
		t := strings.TrimSpace(l)
		if t == "" || (strings.HasPrefix(t, "#") && !strings.Contains(t, "Children")) {
			continue
		}
		b.WriteString(l)
	}
	txt := strings.TrimSuffix(data, ".perf.data") + ".txt"
	if err := os.WriteFile(txt, []byte(b.String()), 0o644); err != nil {
		return "", err
	}
	return b.String(), nil
}

// runMirror times doppel's full mirror of a filled volume across the veth
// against nbdcopy between two nbdkit servers of the same volume, alternated.
func runMirror(ctx context.Context, cfg ReplConfig, rep *ReplReport, link *Link, srcHTTP *http.Client, start func(string, []string) (*Proc, error), log *slog.Logger) error {
	vol := filepath.Join(cfg.Dir, "mirror-src.img")
	log.Info("preparing mirror volume", "size", cfg.MirrorSize)
	if err := PrepareVolume(vol, cfg.MirrorSize, true, 2); err != nil {
		return err
	}
	tgt := filepath.Join(cfg.Dir, "mirror-tgt.img")
	const port = 16355
	doppelRun := func(run int) error {
		os.Remove(tgt)
		os.RemoveAll(tgt + ".state")
		tArgv := In(link.Tgt, cfg.Doppel, "repl", "target", "--file", tgt, "--state-dir", tgt+".state", "--size", fmt.Sprint(cfg.MirrorSize),
			"--listen", fmt.Sprintf("tcp:%s:%d", replTgtIP, port), "--insecure")
		sock := filepath.Join(cfg.Dir, "mirror.sock")
		os.Remove(sock)
		sArgv := In(link.Src, cfg.Doppel, "repl", "source", "--file", vol, "--size", fmt.Sprint(cfg.MirrorSize),
			"--listen", "unix:"+sock, "--target", fmt.Sprintf("tcp:%s:%d", replTgtIP, port),
			"--mode", "async", "--mirror", "full", "--insecure",
			"--metrics-listen", fmt.Sprintf("%s:%d", replSrcIP, port+2))
		rep.Argv["mirror target"] = displayArgv(tArgv, cfg.Dir)
		rep.Argv["mirror source"] = displayArgv(sArgv, cfg.Dir)
		tp, err := start("mirror target", tArgv)
		if err != nil {
			return err
		}
		defer tp.Stop(30 * time.Second)
		addr := fmt.Sprintf("%s:%d", replTgtIP, port)
		if err := tp.WaitReady(ctx, 15*time.Second, func() error { return dialClose(ctx, link.Tgt, addr) }); err != nil {
			return err
		}
		if err := SyncFiles(vol); err != nil {
			return err
		}
		t0 := time.Now()
		sp, err := start("mirror source", sArgv)
		if err != nil {
			return err
		}
		defer sp.Stop(30 * time.Second)
		url := fmt.Sprintf("http://%s:%d/metrics", replSrcIP, port+2)
		sent, series, err := waitMirrored(ctx, sp, srcHTTP, url, cfg.Metrics, cfg.MirrorSize, 10*time.Minute)
		if err != nil {
			return err
		}
		d := time.Since(t0)
		if err := sp.Stop(30 * time.Second); err != nil {
			return err
		}
		if err := tp.Stop(30 * time.Second); err != nil {
			return err
		}
		if err := SameContent(vol, tgt); err != nil {
			return fmt.Errorf("doppel mirror run %d: target differs from source: %w", run+1, err)
		}
		rep.MirrorDoppel = append(rep.MirrorDoppel, float64(cfg.MirrorSize)/d.Seconds())
		rep.MirrorSent = append(rep.MirrorSent, sent)
		log.Info("mirror", "tool", "doppel", "run", run+1, "took", d.Round(time.Millisecond), "MiB/s", math.Round(float64(cfg.MirrorSize)/d.Seconds()/(1<<20)),
			"source", lineWith(sp.Log, "mirror done"), "target", lineWith(tp.Log, "mirror ended"), "acked every 250ms", series)
		return nil
	}
	nbdcopyRun := func(run int) error {
		os.Remove(tgt)
		if err := os.WriteFile(tgt, nil, 0o644); err != nil {
			return err
		}
		if err := os.Truncate(tgt, cfg.MirrorSize); err != nil {
			return err
		}
		sock := filepath.Join(cfg.Dir, "nbdkit-src.sock")
		os.Remove(sock) // nbdkit does not replace a stale socket
		sArgv := In(link.Src, "nbdkit", "-f", "--exit-with-parent", "-r", "-U", sock, "file", "file="+vol)
		tArgv := In(link.Tgt, "nbdkit", "-f", "--exit-with-parent", "-i", replTgtIP, "-p", fmt.Sprint(port), "file", "file="+tgt)
		cArgv := In(link.Src, "nbdcopy", "--flush", "nbd+unix:///?socket="+sock, fmt.Sprintf("nbd://%s:%d", replTgtIP, port))
		rep.Argv["nbdkit source"] = displayArgv(sArgv, cfg.Dir)
		rep.Argv["nbdkit target"] = displayArgv(tArgv, cfg.Dir)
		rep.Argv["nbdcopy"] = displayArgv(cArgv, cfg.Dir)
		sp, err := start("nbdkit source", sArgv)
		if err != nil {
			return err
		}
		defer sp.Stop(10 * time.Second)
		tp, err := start("nbdkit target", tArgv)
		if err != nil {
			return err
		}
		defer tp.Stop(10 * time.Second)
		if err := sp.WaitUnix(ctx, sock, 15*time.Second); err != nil {
			return err
		}
		addr := fmt.Sprintf("%s:%d", replTgtIP, port)
		if err := tp.WaitReady(ctx, 15*time.Second, func() error { return dialClose(ctx, link.Tgt, addr) }); err != nil {
			return err
		}
		if err := SyncFiles(vol); err != nil {
			return err
		}
		t0 := time.Now()
		out, err := exec.CommandContext(ctx, cArgv[0], cArgv[1:]...).CombinedOutput()
		d := time.Since(t0)
		if err != nil {
			return fmt.Errorf("nbdcopy: %w: %s", err, truncate(out, 300))
		}
		if err := SameContent(vol, tgt); err != nil {
			return fmt.Errorf("nbdcopy run %d: target differs from source: %w", run+1, err)
		}
		rep.MirrorNbdcopy = append(rep.MirrorNbdcopy, float64(cfg.MirrorSize)/d.Seconds())
		log.Info("mirror", "tool", "nbdcopy", "run", run+1, "took", d.Round(time.Millisecond), "MiB/s", math.Round(float64(cfg.MirrorSize)/d.Seconds()/(1<<20)))
		return nil
	}
	runs := []func(int) error{doppelRun, nbdcopyRun}
	for run := range cfg.MirrorRuns {
		for _, f := range Rotate(runs, run) {
			if err := f(run); err != nil {
				if ctx.Err() != nil {
					return ctx.Err()
				}
				log.Warn("mirror run failed", "err", err)
				rep.MirrorFailed = append(rep.MirrorFailed, err.Error())
			}
		}
	}
	os.Remove(tgt)
	return nil
}

// waitDrained waits until the source has every assigned sequence number
// acknowledged by the target.
func waitDrained(ctx context.Context, client *http.Client, url string, names ReplMetricNames, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	var last string
	for {
		m, err := Scrape(ctx, client, url)
		if err == nil {
			seq, ok1 := m.series(names.Sequence)
			ack, ok2 := m.series(names.Acked)
			if !ok1 || !ok2 {
				return fmt.Errorf("metrics %s lack %q or %q (it has: %s)", url, names.Sequence, names.Acked, m.Names("doppel_"))
			}
			if ack >= seq {
				return nil
			}
			last = fmt.Sprintf("sequence %.0f, acknowledged %.0f", seq, ack)
		} else {
			last = err.Error()
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("replication not drained after %v: %s", timeout, last)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// waitMirrored waits until the mirror has covered size bytes, is no longer
// active, every frame is acknowledged and the target reports consistent data
// (each where the metric exists), and returns the mirror's sent bytes.
func waitMirrored(ctx context.Context, p *Proc, client *http.Client, url string, names ReplMetricNames, size int64, timeout time.Duration) (float64, string, error) {
	deadline := time.Now().Add(timeout)
	var last string
	var series strings.Builder
	next := time.Now()
	for {
		if !p.Alive() {
			return 0, "", p.Exited()
		}
		m, err := Scrape(ctx, client, url)
		if err == nil {
			done, okD := m.series(names.MirrorDone)
			rem, okR := m.series(names.MirrorRemaining)
			if !okD {
				return 0, "", fmt.Errorf("metrics %s lack %q (it has: %s)", url, names.MirrorDone, m.Names("doppel_"))
			}
			finished := done >= float64(size) && (!okR || rem == 0)
			if v, ok := m.series(names.MirrorActive); ok && v != 0 {
				finished = false
			}
			if v, ok := m.series(names.Consistent); ok && v != 1 {
				finished = false
			}
			seq, ok1 := m.series(names.Sequence)
			ack, ok2 := m.series(names.Acked)
			if ok2 && time.Now().After(next) {
				fmt.Fprintf(&series, " %.0f", ack)
				next = next.Add(250 * time.Millisecond)
			}
			if ok1 && ok2 && ack < seq {
				finished = false
			}
			if finished {
				sent, _ := m.series(names.MirrorSent)
				return sent, series.String(), nil
			}
			last = fmt.Sprintf("done %.0f of %d, remaining %.0f, acknowledged %.0f of %.0f", done, size, rem, ack, seq)
		} else {
			last = err.Error()
		}
		if time.Now().After(deadline) {
			return 0, "", fmt.Errorf("mirror not done after %v: %s", timeout, last)
		}
		select {
		case <-ctx.Done():
			return 0, "", ctx.Err()
		case <-time.After(10 * time.Millisecond):
		}
	}
}

// SameContent reports, as an error naming the first differing offset,
// whether files a and b hold the same bytes.
func SameContent(a, b string) error {
	fa, err := os.Open(a)
	if err != nil {
		return err
	}
	defer fa.Close()
	fb, err := os.Open(b)
	if err != nil {
		return err
	}
	defer fb.Close()
	ba, bb := make([]byte, 4<<20), make([]byte, 4<<20)
	var off int64
	for {
		na, ea := io.ReadFull(fa, ba)
		nb, eb := io.ReadFull(fb, bb)
		if na != nb {
			return fmt.Errorf("sizes differ near offset %d", off+int64(min(na, nb)))
		}
		if !bytes.Equal(ba[:na], bb[:nb]) {
			for i := range na {
				if ba[i] != bb[i] {
					return fmt.Errorf("first difference at offset %d", off+int64(i))
				}
			}
		}
		off += int64(na)
		if ea == io.EOF || ea == io.ErrUnexpectedEOF {
			if eb != ea {
				return fmt.Errorf("sizes differ at offset %d", off)
			}
			return nil
		}
		if ea != nil {
			return ea
		}
		if eb != nil {
			return eb
		}
	}
}

func dialClose(ctx context.Context, ns, addr string) error {
	c, err := DialIn(ctx, ns, "tcp", addr)
	if err != nil {
		return err
	}
	return c.Close()
}

// displayArgv renders argv for the report with the working directory
// replaced by DIR and the binary by its repository-relative path.
func displayArgv(argv []string, dir string) string {
	s := strings.Join(argv, " ")
	s = strings.ReplaceAll(s, dir, "DIR")
	if wd, err := os.Getwd(); err == nil {
		s = strings.ReplaceAll(s, wd+"/", "")
	}
	return s
}

// Median returns the median of a figure over the runs of row in mode.
func (r *ReplReport) Median(row, mode string, f func(Result) float64) float64 {
	var xs []float64
	for _, res := range r.Runs[row][mode] {
		xs = append(xs, f(res))
	}
	return Median(xs)
}

// Markdown renders the report as the RESULTS.md section.
func (r *ReplReport) Markdown(command, note string) string {
	var b strings.Builder
	cfg := r.Config
	w := func(format string, a ...any) { fmt.Fprintf(&b, format, a...) }
	w("%s\n\n", ReplSection)
	w("Measured %s by `%s`.\n\n", r.Start.Format("2006-01-02 15:04 MST"), command)
	m := r.Machine
	w("- Machine: %s; files on %s. Load average %s at start, %s at end.\n", m, m.FS, m.Load, r.LoadEnd)
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
	w("- Method: fio's `nbd` engine on the source's export (Unix socket), %s volumes (fresh, zero, identical on both sides: `--mirror none`). "+
		"All three configurations run side by side and are measured in turn, alternated run by run, %d runs each of %v after a %v ramp; "+
		"before each run every async queue is drained and the volumes fdatasync'd. Same fio arguments as the NBD section. "+
		"Figures are medians; ratios are to unreplicated. Replication runs in plaintext (`--insecure`), no compression.\n",
		humanBytes(cfg.Size), cfg.Runs, cfg.Runtime, cfg.Ramp)
	w("- Commands:\n")
	for _, k := range sortedKeys(r.Argv) {
		w("  - %s: `%s`\n", k, r.Argv[k])
	}
	w("\n| workload | unit | unreplicated | async | sync | async ÷ unrepl. | sync ÷ unrepl. |\n|---|---|--:|--:|--:|--:|--:|\n")
	var missA, missS []string
	for _, row := range cfg.Rows {
		unit, f := Headline(row)
		if row.Latency() {
			unit += " (mean latency)"
		}
		w("| %s | %s |", row.Name, unit)
		for _, mode := range ReplModes {
			cell := FormatCount(r.Median(row.Slug, mode, f))
			if row.Latency() {
				cell += " (" + FormatMicros(r.Median(row.Slug, mode, func(x Result) float64 { return x.LatMeanNs })) + ")"
			}
			if n := len(r.Failed[row.Slug][mode]); n > 0 {
				cell += fmt.Sprintf(" [%d failed]", n)
			}
			w(" %s |", cell)
		}
		u := r.Median(row.Slug, ModeUnreplicated, f)
		ra, rs := Ratio(r.Median(row.Slug, ModeAsync, f), u), Ratio(r.Median(row.Slug, ModeSync, f), u)
		w(" %s | %s |\n", FormatRatio(ra), FormatRatio(rs))
		if !(ra >= 0.9) {
			missA = append(missA, row.Name)
		}
		if !(rs >= 0.7) {
			missS = append(missS, row.Name)
		}
	}
	w("\n")
	verdict := func(miss []string) string {
		if len(miss) == 0 {
			return "**met**"
		}
		return "**not met** on " + strings.Join(miss, "; ")
	}
	w("Targets (issue 3): async ≥ 0.9× unreplicated — %s; sync ≥ 0.7× unreplicated — %s.\n", verdict(missA), verdict(missS))
	for _, row := range cfg.Rows {
		if !row.Latency() {
			continue
		}
		lat := func(x Result) float64 { return x.LatMeanNs }
		u, s := r.Median(row.Slug, ModeUnreplicated, lat), r.Median(row.Slug, ModeSync, lat)
		bound := u + float64(r.RTT.Nanoseconds()) + 100e3
		v := "**met**"
		if !(s <= bound) {
			v = "**not met**"
		}
		w("Sync latency, %s: %s vs unreplicated %s + RTT %s + 100 µs = %s — %s.\n", row.Name, FormatMicros(s), FormatMicros(u),
			FormatMicros(float64(r.RTT.Nanoseconds())), FormatMicros(bound), v)
	}
	w("\ndoppel's CPU time per write (user + system of the source and target processes over the run ÷ writes; unreplicated: the one server), median, and in parentheses the cores used:\n\n")
	w("| workload | unreplicated | async | sync |\n|---|--:|--:|--:|\n")
	for _, row := range cfg.Rows {
		w("| %s |", row.Name)
		for _, mode := range ReplModes {
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
	for _, mode := range []string{ModeAsync, ModeSync} {
		if v, ok := r.Identical[mode]; ok {
			w("Target byte-identical to the source after the %s runs (queue drained, `cmp`-style compare): %s.\n", mode, v)
		}
	}
	if cfg.MirrorRuns > 0 {
		w("\n**Mirror** of a %s volume of pseudo-random data (nothing to skip) across the same veth, %d runs each, alternated; time from start to the last byte applied "+
			"(doppel: source process start until the mirror metric reports the whole volume; nbdcopy: the whole `nbdcopy --flush` run). Each copy is then compared with the source.\n\n",
			humanBytes(cfg.MirrorSize), cfg.MirrorRuns)
		d, n := Median(r.MirrorDoppel), Median(r.MirrorNbdcopy)
		ratio := Ratio(d, n)
		w("| copy | MiB/s (median) | runs (MiB/s) |\n|---|--:|---|\n")
		w("| doppel repl source --mirror full | %s | %s |\n", FormatCount(d/(1<<20)), joinMiB(r.MirrorDoppel))
		w("| nbdcopy, nbdkit → nbdkit | %s | %s |\n\n", FormatCount(n/(1<<20)), joinMiB(r.MirrorNbdcopy))
		v := "**met**"
		if !(ratio >= 0.9) {
			v = "**not met**"
		}
		w("Mirror ÷ nbdcopy: %s (target ≥ 0.9×: %s).", FormatRatio(ratio), v)
		if len(r.MirrorSent) > 0 {
			w(" Mirror chunk data sent: %s MiB (median).", FormatCount(Median(r.MirrorSent)/(1<<20)))
		}
		w("\n")
		for _, e := range r.MirrorFailed {
			w("- failed run: %s\n", strings.ReplaceAll(truncate([]byte(e), 200), "\n", " "))
		}
	}
	writeProfiles(&b, "the replication source and target", r.Profiles, r.ProfileNote)
	w("\n<details><summary>Every run</summary>\n\n| workload | mode | runs |\n|---|---|---|\n")
	for _, row := range cfg.Rows {
		_, f := Headline(row)
		for _, mode := range ReplModes {
			var vs []string
			for _, res := range r.Runs[row.Slug][mode] {
				vs = append(vs, FormatCount(f(res)))
			}
			for _, e := range r.Failed[row.Slug][mode] {
				vs = append(vs, "failed: "+strings.ReplaceAll(truncate([]byte(e), 80), "|", "/"))
			}
			w("| %s | %s | %s |\n", row.Name, mode, strings.Join(vs, ", "))
		}
	}
	w("\n</details>\n")
	return b.String()
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
