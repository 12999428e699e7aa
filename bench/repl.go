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
	"strconv"
	"strings"
	"time"
)

// ReplSection is the heading of the replication benchmark in RESULTS.md.
const ReplSection = "## Replication: doppel against QEMU's mirror, the two-copy limit and nbdcopy"

// ReplRows are the rows of the replication table.
var ReplRows = []Job{NBDRows[0], NBDRows[2], NBDRows[3], SyncRow}

// The configurations compared (the table's columns), in table order.
const (
	ModeUnreplicated = "unreplicated"
	// ModeLimit is the two-copy limit: the same fio job writing every
	// block twice, once through doppel's unreplicated export on the source
	// and once across the veth to a plain `doppel nbd serve` on the target
	// side, both legs at once.
	ModeLimit = "limit"
	// ModeQemuAsync and ModeQemuSync are qemu-storage-daemon exporting the
	// source with a block mirror to qemu-nbd on the target side, in
	// copy-mode background and write-blocking (active) respectively.
	ModeQemuAsync = "qemu-async"
	ModeQemuSync  = "qemu-sync"
	ModeAsync     = "async"
	ModeSync      = "sync"
	// ModeAsyncB and ModeSyncB are doppel async and sync run with a second
	// binary (ReplConfig.DoppelB), for A/B comparisons of a change.
	ModeAsyncB = "async-b"
	ModeSyncB  = "sync-b"
)

// ReplModes are the columns of the table.
var ReplModes = []string{ModeUnreplicated, ModeLimit, ModeQemuAsync, ModeAsync, ModeQemuSync, ModeSync}

// ModeTitle is a configuration's column heading.
var ModeTitle = map[string]string{
	ModeUnreplicated: "unreplicated",
	ModeLimit:        "two-copy limit",
	ModeQemuAsync:    "qemu mirror, background",
	ModeAsync:        "doppel async",
	ModeQemuSync:     "qemu mirror, write-blocking",
	ModeSync:         "doppel sync",
	ModeAsyncB:       "doppel async (B)",
	ModeSyncB:        "doppel sync (B)",
}

// abModes maps each B configuration to its A.
var abModes = map[string]string{ModeAsyncB: ModeAsync, ModeSyncB: ModeSync}

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
	Doppel  string
	DoppelB string // the binary of ModeAsyncB and ModeSyncB
	Fio     string
	Dir     string // volumes, sockets, logs
	Size    int64  // volume of the fio rows
	Runs    int    // runs per row and configuration, configurations alternated run by run
	Runtime time.Duration
	Ramp    time.Duration
	Rows    []Job
	Modes   []string // configurations measured (default ReplModes)
	// NoStateDir runs doppel's sources without --state-dir (no bitmap,
	// activity log or disk queue: the bare engine).
	NoStateDir bool
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

// replTier is one configuration being measured (a column): set up once,
// kept running while the others are measured.
type replTier struct {
	mode   string
	uri    string // the export fio writes to
	remote string // ModeLimit: the second leg's export, across the veth
	procs  []*Proc
	// drain waits until nothing written is left to replicate (nil: no
	// replication backlog to wait for).
	drain func(ctx context.Context) error
	// src and tgt must hold the same bytes once drained (tgt empty: no
	// such check); files are fdatasync'd before each run.
	src, tgt string
	files    []string
	// stop stops the processes, sources first.
	stop func() error
}

// cpu is the CPU time the tier's processes used so far.
func (t *replTier) cpu() time.Duration {
	var c time.Duration
	for _, p := range t.procs {
		c += ProcCPU(p.PID())
	}
	return c
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
	bin            string // doppel binary (default cfg.Doppel)
	label          string // process names (default mode)
	// stateful: the source keeps its persistent state (--state-dir: bitmap,
	// activity log, disk queue), as the agent's jobs do.
	stateful bool
	srcExtra []string
}

func (p replPair) argv() (tgt, src []string) {
	bin := p.bin
	if bin == "" {
		bin = p.cfg.Doppel
	}
	tgt = In(p.link.Tgt, bin, "repl", "target", "--file", p.tgt, "--state-dir", p.tgt+".state")
	if p.size > 0 {
		tgt = append(tgt, "--size", fmt.Sprint(p.size))
	}
	tgt = append(tgt, "--listen", fmt.Sprintf("tcp:%s:%d", replTgtIP, p.port), "--insecure",
		"--metrics-listen", fmt.Sprintf("%s:%d", replTgtIP, p.port+1))
	size := p.size
	if size == 0 {
		size = p.cfg.Size
	}
	src = In(p.link.Src, bin, "repl", "source", "--file", p.src, "--size", fmt.Sprint(size),
		"--listen", "unix:"+p.sock, "--target", fmt.Sprintf("tcp:%s:%d", replTgtIP, p.port),
		"--mode", p.mode, "--mirror", p.mirror, "--insecure",
		"--metrics-listen", fmt.Sprintf("%s:%d", replSrcIP, p.port+2))
	if p.stateful {
		src = append(src, "--state-dir", p.src+".state")
	}
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
	if p.stateful {
		os.RemoveAll(p.src + ".state")
	}
	os.RemoveAll(p.tgt + ".state")
	label := p.label
	if label == "" {
		label = p.mode
	}
	if tgt, err = start(label+" target", tArgv); err != nil {
		return nil, nil, err
	}
	addr := fmt.Sprintf("%s:%d", replTgtIP, p.port)
	if err := tgt.WaitReady(ctx, 15*time.Second, func() error { return dialClose(ctx, p.link.Tgt, addr) }); err != nil {
		return tgt, nil, err
	}
	src, err = start(label+" source", sArgv)
	return tgt, src, err
}

// replEnv is what every tier's set-up shares.
type replEnv struct {
	ctx     context.Context
	cfg     ReplConfig
	rep     *ReplReport
	link    *Link
	srcHTTP *http.Client
	start   func(name string, argv []string) (*Proc, error)
	log     *slog.Logger
}

// volumes creates zeroed, allocated volumes for a tier.
func (e *replEnv) volumes(names ...string) ([]string, error) {
	var paths []string
	for _, n := range names {
		p := filepath.Join(e.cfg.Dir, n+".img")
		if err := PrepareVolume(p, e.cfg.Size, false, 0); err != nil {
			return nil, err
		}
		paths = append(paths, p)
	}
	return paths, nil
}

// stopAll stops procs in order and joins their errors.
func stopAll(procs ...*Proc) error {
	var errs []error
	for _, p := range procs {
		if p != nil && p.Alive() {
			errs = append(errs, p.Stop(30*time.Second))
		}
	}
	return errors.Join(errs...)
}

// unreplicatedTier is `doppel nbd serve` of the source volume.
func (e *replEnv) unreplicatedTier(mode string) (*replTier, error) {
	vols, err := e.volumes(mode + "-src")
	if err != nil {
		return nil, err
	}
	sock := filepath.Join(e.cfg.Dir, mode+".sock")
	argv := In(e.link.Src, e.cfg.Doppel, "nbd", "serve", "--file", vols[0], "--listen", "unix:"+sock)
	e.rep.Argv[mode] = displayArgv(argv, e.cfg.Dir)
	p, err := e.start(mode, argv)
	if err != nil {
		return nil, err
	}
	if err := p.WaitUnix(e.ctx, sock, 15*time.Second); err != nil {
		return nil, err
	}
	return &replTier{mode: mode, uri: "nbd+unix:///?socket=" + sock, procs: []*Proc{p}, files: vols,
		stop: func() error { return stopAll(p) }}, nil
}

// limitTier is the two-copy limit: doppel's unreplicated export on the
// source side (the local leg) and a plain `doppel nbd serve` on the target
// side, reached across the veth (the remote leg).
func (e *replEnv) limitTier(port int) (*replTier, error) {
	t, err := e.unreplicatedTier(ModeLimit + "-local")
	if err != nil {
		return nil, err
	}
	t.mode = ModeLimit
	e.rep.Argv[ModeLimit+" local leg"] = e.rep.Argv[ModeLimit+"-local"]
	delete(e.rep.Argv, ModeLimit+"-local")
	vols, err := e.volumes(ModeLimit + "-remote")
	if err != nil {
		return nil, err
	}
	addr := fmt.Sprintf("%s:%d", replTgtIP, port)
	argv := In(e.link.Tgt, e.cfg.Doppel, "nbd", "serve", "--file", vols[0], "--listen", "tcp:"+addr)
	e.rep.Argv[ModeLimit+" remote leg"] = displayArgv(argv, e.cfg.Dir)
	p, err := e.start(ModeLimit+" remote", argv)
	if err != nil {
		return nil, err
	}
	if err := p.WaitReady(e.ctx, 15*time.Second, func() error { return dialClose(e.ctx, e.link.Tgt, addr) }); err != nil {
		return nil, err
	}
	t.remote = "nbd://" + addr + "/"
	t.procs = append(t.procs, p)
	t.files = append(t.files, vols...)
	t.stop = func() error { return stopAll(t.procs...) }
	return t, nil
}

// doppelTier is `doppel repl source` (with its persistent state, as the
// agent runs it) replicating to `doppel repl target` across the veth.
func (e *replEnv) doppelTier(mode string, port int) (*replTier, error) {
	vols, err := e.volumes(mode+"-src", mode+"-tgt")
	if err != nil {
		return nil, err
	}
	pair := replPair{cfg: e.cfg, link: e.link, mode: mode, src: vols[0], tgt: vols[1], sock: filepath.Join(e.cfg.Dir, mode+".sock"),
		port: port, mirror: "none", stateful: !e.cfg.NoStateDir}
	if a, ok := abModes[mode]; ok {
		if e.cfg.DoppelB == "" {
			return nil, fmt.Errorf("%s needs a second binary (DoppelB)", mode)
		}
		pair.mode, pair.bin, pair.label = a, e.cfg.DoppelB, mode
	}
	tArgv, sArgv := pair.argv()
	e.rep.Argv[mode+" target"] = displayArgv(tArgv, e.cfg.Dir)
	e.rep.Argv[mode+" source"] = displayArgv(sArgv, e.cfg.Dir)
	tp, sp, err := pair.start(e.ctx, e.start)
	if err != nil {
		return nil, err
	}
	if err := sp.WaitUnix(e.ctx, pair.sock, 15*time.Second); err != nil {
		return nil, err
	}
	url := pair.metricsURL()
	t := &replTier{mode: mode, uri: "nbd+unix:///?socket=" + pair.sock, procs: []*Proc{sp, tp}, src: vols[0], tgt: vols[1], files: vols,
		stop: func() error { return stopAll(sp, tp) }}
	t.drain = func(ctx context.Context) error {
		return waitDrained(ctx, e.srcHTTP, url, e.cfg.Metrics, 60*time.Second)
	}
	return t, nil
}

// qemuTier is qemu-storage-daemon exporting the source volume over NBD
// with a block mirror (blockdev-mirror, sync none: like doppel's --mirror
// none, only new writes) onto an nbd blockdev connected across the veth to
// qemu-nbd serving the target volume. copyMode is "background" (writes
// acknowledged once local, copied by the job) or "write-blocking" (QEMU's
// active mirror: a write is acknowledged once written locally and on the
// target).
func (e *replEnv) qemuTier(mode, copyMode string, port int) (*replTier, error) {
	vols, err := e.volumes(mode+"-src", mode+"-tgt")
	if err != nil {
		return nil, err
	}
	addr := fmt.Sprintf("%s:%d", replTgtIP, port)
	tArgv := In(e.link.Tgt, "qemu-nbd", "-f", "raw", "--cache=writeback", "--aio=threads", "-t",
		"-b", replTgtIP, "-p", strconv.Itoa(port), vols[1])
	sock := filepath.Join(e.cfg.Dir, mode+".sock")
	qmpSock := filepath.Join(e.cfg.Dir, mode+".qmp")
	os.Remove(sock)
	os.Remove(qmpSock)
	sArgv := In(e.link.Src, "qemu-storage-daemon",
		"--blockdev", "driver=file,filename="+vols[0]+",node-name=file0",
		"--blockdev", "driver=raw,file=file0,node-name=src0",
		"--nbd-server", "addr.type=unix,addr.path="+sock,
		"--export", "type=nbd,id=exp0,node-name=src0,writable=on,name=vol",
		"--chardev", "socket,path="+qmpSock+",server=on,wait=off,id=qmp0",
		"--monitor", "chardev=qmp0")
	e.rep.Argv[mode+" target"] = displayArgv(tArgv, e.cfg.Dir)
	e.rep.Argv[mode+" source"] = displayArgv(sArgv, e.cfg.Dir)
	tp, err := e.start(mode+" target", tArgv)
	if err != nil {
		return nil, err
	}
	if err := tp.WaitReady(e.ctx, 15*time.Second, func() error { return dialClose(e.ctx, e.link.Tgt, addr) }); err != nil {
		return nil, err
	}
	sp, err := e.start(mode+" source", sArgv)
	if err != nil {
		return nil, err
	}
	if err := sp.WaitUnix(e.ctx, sock, 15*time.Second); err != nil {
		return nil, err
	}
	qmp, err := DialQMP(e.ctx, qmpSock, 15*time.Second)
	if err != nil {
		return nil, err
	}
	const job = "mirror0"
	cmds := []struct {
		cmd  string
		args map[string]any
	}{
		{"blockdev-add", map[string]any{"driver": "nbd", "node-name": "tgt0",
			"server": map[string]any{"type": "inet", "host": replTgtIP, "port": strconv.Itoa(port)}}},
		{"blockdev-mirror", map[string]any{"job-id": job, "device": "src0", "target": "tgt0", "sync": "none", "copy-mode": copyMode}},
	}
	for _, c := range cmds {
		if _, err := qmp.Execute(c.cmd, c.args); err != nil {
			qmp.Close()
			return nil, fmt.Errorf("%s: %w (log: %s)", mode, err, sp.LogTail(300))
		}
		e.rep.Argv[mode+" QMP "+c.cmd] = qmpDisplay(c.args)
	}
	if _, err := qmp.WaitJob(e.ctx, job, 30*time.Second, func(j BlockJob) bool { return j.Ready }); err != nil {
		qmp.Close()
		return nil, fmt.Errorf("%s: mirror not ready: %w", mode, err)
	}
	t := &replTier{mode: mode, uri: "nbd+unix:///vol?socket=" + sock, procs: []*Proc{sp, tp}, src: vols[0], tgt: vols[1], files: vols}
	t.drain = func(ctx context.Context) error {
		// The job notices a write made in background mode at its next
		// iteration (up to 100 ms later): synced twice, 150 ms apart.
		for range 2 {
			if _, err := qmp.WaitJob(ctx, job, 60*time.Second, MirrorSynced); err != nil {
				return fmt.Errorf("%s: %w", mode, err)
			}
			select {
			case <-ctx.Done():
				return ctx.Err()
			case <-time.After(150 * time.Millisecond):
			}
		}
		_, err := qmp.WaitJob(ctx, job, 60*time.Second, MirrorSynced)
		return err
	}
	t.stop = func() error {
		qmp.Close()
		return stopAll(sp, tp)
	}
	return t, nil
}

// qmpDisplay renders QMP arguments for the report.
func qmpDisplay(args map[string]any) string {
	var parts []string
	for _, k := range sortedKeys(args) {
		v := args[k]
		if m, ok := v.(map[string]any); ok {
			v = "{" + qmpDisplay(m) + "}"
		}
		parts = append(parts, fmt.Sprintf("%s: %v", k, v))
	}
	return strings.Join(parts, ", ")
}

// fioCommand is the fio command line of row against tier t: fio runs in
// the source namespace.
func (e *replEnv) fioCommand(t *replTier, row Job) (fio, args []string) {
	fio = In(e.link.Src, e.cfg.Fio)
	if t.remote == "" {
		return fio, FioArgs(row, t.uri, e.cfg.Runtime, e.cfg.Ramp)
	}
	return fio, FioTwoLegs(row, t.uri, t.remote, e.cfg.Runtime, e.cfg.Ramp)
}

// FioTwoLegs returns fio's arguments for the two-copy limit of job: two
// fio jobs in one run, started together with the same options, one on each
// export ("local" on local, "remote" on remote).
func FioTwoLegs(job Job, local, remote string, runtime, ramp time.Duration) []string {
	one := FioArgs(job, "", runtime, ramp)
	var global []string
	for _, a := range one {
		if !strings.HasPrefix(a, "--name=") && !strings.HasPrefix(a, "--uri=") {
			global = append(global, a)
		}
	}
	return append(global, "--name=local", "--uri="+local, "--name=remote", "--uri="+remote)
}

// measure runs row once against t.
func (e *replEnv) measure(t *replTier, row Job) (Result, error) {
	fio, args := e.fioCommand(t, row)
	out, err := runFio(e.ctx, fio, args)
	if err != nil {
		return Result{}, err
	}
	rs, err := ParseFioJobs(out.stdout, true)
	if err != nil {
		return Result{}, fmt.Errorf("%w (stderr: %s)", err, truncate(out.stderr, 300))
	}
	switch {
	case t.remote != "" && len(rs) == 2:
		return BothCopies(rs[0], rs[1]), nil
	case t.remote == "" && len(rs) == 1:
		return rs[0], nil
	}
	return Result{}, fmt.Errorf("parse fio output: %d jobs", len(rs))
}

// RunRepl measures, across a veth pair between two namespaces it creates
// and deletes, fio writes through doppel's replicated export (async, sync)
// against doppel's unreplicated export, the two-copy limit and QEMU's
// block mirror (background and write-blocking), then doppel's mirror
// against nbdcopy.
func RunRepl(ctx context.Context, cfg ReplConfig) (*ReplReport, error) {
	log := cfg.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if len(cfg.Modes) == 0 {
		cfg.Modes = ReplModes
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
	env := &replEnv{ctx: ctx, cfg: cfg, rep: rep, link: link, srcHTTP: srcHTTP, start: start, log: log}

	// Every configuration set up, all running, measured in turn.
	var tiers []*replTier
	defer func() {
		for _, t := range tiers {
			_ = t.stop()
		}
	}()
	for i, mode := range cfg.Modes {
		port := 16325 + 10*i
		var t *replTier
		switch mode {
		case ModeUnreplicated:
			t, err = env.unreplicatedTier(mode)
		case ModeLimit:
			t, err = env.limitTier(port)
		case ModeAsync, ModeSync, ModeAsyncB, ModeSyncB:
			t, err = env.doppelTier(mode, port)
		case ModeQemuAsync:
			t, err = env.qemuTier(mode, "background", port)
		case ModeQemuSync:
			t, err = env.qemuTier(mode, "write-blocking", port)
		default:
			err = fmt.Errorf("unknown configuration %q", mode)
		}
		if err != nil {
			return nil, fmt.Errorf("set up %s: %w", mode, err)
		}
		tiers = append(tiers, t)
		log.Info("configuration ready", "mode", mode)
	}

	drainAll := func() error {
		for _, o := range tiers {
			if o.drain != nil {
				if err := o.drain(ctx); err != nil {
					return fmt.Errorf("%s: %w", o.mode, err)
				}
			}
		}
		var files []string
		for _, o := range tiers {
			files = append(files, o.files...)
		}
		return SyncFiles(files...)
	}
	for _, row := range cfg.Rows {
		rep.Runs[row.Slug] = map[string][]Result{}
		rep.Failed[row.Slug] = map[string][]string{}
		for run := range cfg.Runs {
			for _, t := range Rotate(tiers, run) {
				for _, p := range t.procs {
					if !p.Alive() {
						return nil, p.Exited()
					}
				}
				// Start each run from a quiet state: every replication
				// backlog drained, no dirty pages left by the previous run.
				if err := drainAll(); err != nil {
					return nil, err
				}
				load := loadAvg1()
				cpu0, t0 := t.cpu(), time.Now()
				res, err := env.measure(t, row)
				if ctx.Err() != nil {
					return nil, ctx.Err()
				}
				res.SetServerCPU(t.cpu()-cpu0, time.Since(t0))
				res.Load = load
				if err != nil {
					log.Warn("run failed", "row", row.Slug, "mode", t.mode, "run", run+1, "err", err)
					rep.Failed[row.Slug][t.mode] = append(rep.Failed[row.Slug][t.mode], err.Error())
					continue
				}
				rep.FioVersion = res.FioVersion
				rep.Runs[row.Slug][t.mode] = append(rep.Runs[row.Slug][t.mode], res)
				log.Info("run", "row", row.Slug, "mode", t.mode, "run", run+1,
					"iops", math.Round(res.IOPS), "MiB/s", math.Round(res.MiBps()), "lat_us", math.Round(res.OpLatNs()/1e3),
					"cpu_us_per_io", math.Round(float64(res.ServerCPUPerIO.Nanoseconds())/100)/10, "load", load)
			}
		}
	}

	// Every replicated write must be on the target: drain, stop, compare.
	for _, t := range tiers {
		if t.tgt == "" {
			continue
		}
		if t.drain != nil {
			if err := t.drain(ctx); err != nil {
				rep.Identical[t.mode] = "not checked: " + err.Error()
				continue
			}
		}
		if err := t.stop(); err != nil {
			log.Warn("stop", "mode", t.mode, "err", err)
		}
		if err := SameContent(t.src, t.tgt); err != nil {
			rep.Identical[t.mode] = "**no**: " + err.Error()
		} else {
			rep.Identical[t.mode] = "yes"
		}
	}
	for _, t := range tiers {
		_ = t.stop()
	}
	tiers = nil

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

// loadAvg1 is /proc/loadavg's 1-minute figure (0 when unreadable).
func loadAvg1() float64 {
	f := strings.Fields(LoadAvg())
	if len(f) == 0 {
		return 0
	}
	v, _ := strconv.ParseFloat(f[0], 64)
	return v
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
			sock: filepath.Join(cfg.Dir, "prof.sock"), stateful: !cfg.NoStateDir}
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
