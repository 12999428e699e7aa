package bench

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/doppelha/doppel/blockdev/nbdclient"
	"github.com/doppelha/doppel/daemon/api"
)

// ScaleSection is the heading of the scale benchmark in RESULTS.md.
const ScaleSection = "## Scale: 32 jobs per agent pair"

// ScaleConfig configures RunScale.
type ScaleConfig struct {
	Doppel string // the doppel binary: agents and CLI
	Dir    string // volumes, state dirs, logs
	Jobs   int    // jobs between the one agent pair
	Size   int64  // each job's volume (sparse files on both sides)
	Mode   string // sync or async
	// Rate is each job's writes per second (4 KiB, random offsets, one
	// at a time, from a Go NBD client on the source's export).
	Rate   float64
	Idle   time.Duration // measurement window with no writes
	Load   time.Duration // measurement window under the writes
	Settle time.Duration // wait before each window
	// Outage: the target agent is killed for this long while the writes
	// go on, then started again (0: skip the phase).
	Outage time.Duration
	// OutageSignal stops the target agent for the outage: SIGKILL (a
	// crash, the default) or SIGTERM (a clean stop, as for maintenance).
	OutageSignal syscall.Signal
	// Verify runs `doppel verify` of every job after the resync (source
	// and target compared chunk by chunk, the writes running).
	Verify bool
	Log    *slog.Logger `json:"-"`
}

// AgentSample is one agent's footprint over a window.
type AgentSample struct {
	RSS        int64   // bytes, at the window's end
	CPUPercent float64 // of one CPU, over the window
	Threads    int
	FDs        int
	FDLimit    int64
	Goroutines float64 // go_goroutines from the agent's /metrics
	HeapInuse  float64 // go_memstats_heap_inuse_bytes: Go heap spans in use (garbage not yet collected included)
	NextGC     float64 // go_memstats_next_gc_bytes: the heap goal, about twice the heap live at the last GC
}

// ScaleWindow is both agents over a window, and the writes in it.
type ScaleWindow struct {
	Source, Target AgentSample
	Writes         int           // acknowledged in the window
	WritesPerSec   float64       // all jobs together
	P50, P99, Max  time.Duration // write latency (from the writer)
}

// ScaleReport holds the scale benchmark's figures.
type ScaleReport struct {
	Command    string
	Note       string
	Config     ScaleConfig
	Machine    Machine
	Start, End time.Time
	LoadEnd    string
	Argv       map[string]string // the commands run, for the report
	// CreateTook is how long `doppel job create` of every job took, one
	// after the other; InSyncTook from the first create until every job
	// replicated with a consistent target.
	CreateTook, InSyncTook time.Duration
	// ListTook: `doppel job list --json` with every job (median of 5).
	ListTook time.Duration
	// Bare: the agents before any job (a Settle-long window); Idle and
	// Loaded with every job; AfterResync under the writes again, once the
	// outage's resync is done (what the outage left behind).
	Bare        ScaleWindow
	Idle        ScaleWindow
	Loaded      ScaleWindow
	AfterResync ScaleWindow
	// State on disk after the idle window: apparent and allocated bytes of
	// each agent's state directory, and one job's files on the source.
	StateBytes, StateAlloc map[string]int64
	JobFiles               []string // one source job's files: "name size"
	// Outage and resync.
	OutageWrites  int           // writes acknowledged while the target was down
	OutageStall   time.Duration // the longest write acknowledged during the outage (or held by it)
	DirtyAtHeal   int64         // source bitmaps' dirty bytes, summed, before the heal
	QueuedAtHeal  int64         // sources' queues (memory and disk), summed, before the heal
	WrittenChunks int64         // bytes of the distinct 64 KiB chunks written in the outage
	Resent        int64         // mirror_sent growth on the source (resync data sent)
	ResyncAll     time.Duration // heal (target agent started) to every job in sync
	ResyncPerJob  []time.Duration
	EqualAfter    int // jobs `doppel verify` found equal after the resync (Verify)
	// Failover: the source agent killed with the writes running.
	RTO        []time.Duration // kill to the first write acknowledged on the promoted side, per job
	Reported   []time.Duration // kill to the job reported failed-over by the target, per job
	Verified   int             // jobs whose last acknowledged write reads back on the promoted side
	Unverified []string        // jobs where it did not (or could not be checked), and why
	Failures   []string        // what did not work
}

// scaleLab is the two agents, their namespaces and the CLI.
type scaleLab struct {
	cfg    ScaleConfig
	link   *Link
	log    *slog.Logger
	agents map[string]*Proc // vm1 (source), vm2 (target)
	starts map[string]int   // agent starts per host (log file names)
	rep    *ScaleReport
}

const (
	scaleSrcIP = "10.198.0.1"
	scaleTgtIP = "10.198.0.2"
	scaleBlock = 4096
	scaleChunk = 64 << 10
)

func (l *scaleLab) ip(host string) string {
	if host == "vm1" {
		return scaleSrcIP
	}
	return scaleTgtIP
}

func (l *scaleLab) ns(host string) string {
	if host == "vm1" {
		return l.link.Src
	}
	return l.link.Tgt
}

func (l *scaleLab) stateDir(host string) string { return filepath.Join(l.cfg.Dir, host, "state") }

func (l *scaleLab) agentArgv(host string) []string {
	ip := l.ip(host)
	return In(l.ns(host), l.cfg.Doppel, "agent", "--state-dir", l.stateDir(host),
		"--control-listen", ip+":6320", "--repl-listen", ip+":6325", "--metrics-listen", ip+":6321")
}

var fingerprintRE = regexp.MustCompile(`fingerprint=(sha256:[0-9a-f]+)`)

// startAgent starts host's agent and waits until it says it is ready.
func (l *scaleLab) startAgent(ctx context.Context, host string) error {
	l.starts[host]++
	logPath := filepath.Join(l.cfg.Dir, host, fmt.Sprintf("agent-%d.log", l.starts[host]))
	p, err := StartProc("agent "+host, l.agentArgv(host), logPath)
	if err != nil {
		return err
	}
	l.agents[host] = p
	return p.WaitReady(ctx, 30*time.Second, func() error {
		b, _ := os.ReadFile(logPath)
		if !bytes.Contains(b, []byte("agent ready")) {
			return errors.New("no \"agent ready\" in its log yet")
		}
		return nil
	})
}

// cli runs the doppel CLI in the source's namespace (it reaches both
// agents across the veth).
func (l *scaleLab) cli(ctx context.Context, args ...string) ([]byte, error) {
	ctx, cancel := context.WithTimeout(ctx, 90*time.Second)
	defer cancel()
	argv := In(l.link.Src, append([]string{l.cfg.Doppel}, args...)...)
	cmd := exec.CommandContext(ctx, argv[0], argv[1:]...)
	cmd.Env = append(os.Environ(), "DOPPEL_CONFIG="+filepath.Join(l.cfg.Dir, "cli.json"))
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		return out.Bytes(), fmt.Errorf("doppel %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(errb.String()))
	}
	return out.Bytes(), nil
}

// scaleSide is one agent's view of a job in `doppel job list --json`.
type scaleSide struct {
	Server string         `json:"server"`
	Status *api.JobStatus `json:"status"`
	Err    string         `json:"error"`
}

// jobs lists every job's sides as the agents report them (only server
// when not empty), by job name.
func (l *scaleLab) jobs(ctx context.Context, server string) (map[string]map[string]*api.JobStatus, error) {
	args := []string{"job", "list", "--json", "--timeout", "5s"}
	if server != "" {
		args = append(args, "--server", server)
	}
	out, err := l.cli(ctx, args...)
	var list struct {
		Jobs []struct {
			Sides []scaleSide `json:"sides"`
		} `json:"jobs"`
	}
	if jerr := json.Unmarshal(out, &list); jerr != nil {
		return nil, errors.Join(fmt.Errorf("list jobs: %w", jerr), err)
	}
	m := map[string]map[string]*api.JobStatus{}
	for _, j := range list.Jobs {
		for _, s := range j.Sides {
			if s.Status == nil {
				continue
			}
			name := s.Status.Spec.Name
			if m[name] == nil {
				m[name] = map[string]*api.JobStatus{}
			}
			m[name][s.Server] = s.Status
		}
	}
	return m, nil
}

func jobName(i int) string { return fmt.Sprintf("j%02d", i+1) }

// inSync: the source replicates to a target that replicates and holds a
// consistent copy.
func inSync(sides map[string]*api.JobStatus) bool {
	s, t := sides["vm1"], sides["vm2"]
	return s != nil && t != nil && s.HA.Role == "source" && s.HA.State == "replicating" &&
		t.HA.State == "replicating" && t.HA.Consistent && s.Data.BytesRemaining == 0
}

// waitInSync polls the job list until every job is in sync or d passes,
// and returns when each job was first seen in sync (since from).
func (l *scaleLab) waitInSync(ctx context.Context, from time.Time, d time.Duration) ([]time.Duration, error) {
	n := l.cfg.Jobs
	seen := make([]time.Duration, n)
	left := n
	deadline := time.Now().Add(d)
	var last map[string]map[string]*api.JobStatus
	for {
		m, err := l.jobs(ctx, "")
		if err == nil {
			last = m
			for i := range n {
				if seen[i] == 0 && inSync(m[jobName(i)]) {
					seen[i] = time.Since(from)
					left--
				}
			}
			if left == 0 {
				return seen, nil
			}
		}
		if time.Now().After(deadline) {
			var out []string
			for i := range n {
				if seen[i] == 0 {
					out = append(out, describeJob(jobName(i), last[jobName(i)]))
				}
			}
			return seen, fmt.Errorf("%d of %d jobs not in sync after %v (last error %v): %s", left, n, d, err, strings.Join(out, "; "))
		}
		select {
		case <-ctx.Done():
			return seen, ctx.Err()
		case <-time.After(250 * time.Millisecond):
		}
	}
}

func describeJob(name string, sides map[string]*api.JobStatus) string {
	var parts []string
	for _, h := range []string{"vm1", "vm2"} {
		s := sides[h]
		if s == nil {
			parts = append(parts, h+" -")
			continue
		}
		parts = append(parts, fmt.Sprintf("%s %s/%s consistent=%v remaining=%d", h, s.HA.Role, s.HA.State, s.HA.Consistent, s.Data.BytesRemaining))
	}
	return name + ": " + strings.Join(parts, ", ")
}

// sample measures both agents over window w.
func (l *scaleLab) sample(ctx context.Context, w time.Duration) (src, tgt AgentSample, err error) {
	hosts := []string{"vm1", "vm2"}
	cpu0 := map[string]time.Duration{}
	for _, h := range hosts {
		cpu0[h] = ProcCPU(l.agents[h].PID())
	}
	t0 := time.Now()
	select {
	case <-ctx.Done():
		return src, tgt, ctx.Err()
	case <-time.After(w):
	}
	wall := time.Since(t0)
	out := map[string]*AgentSample{"vm1": &src, "vm2": &tgt}
	for _, h := range hosts {
		p := l.agents[h]
		if !p.Alive() {
			return src, tgt, p.Exited()
		}
		s := out[h]
		s.CPUPercent = 100 * float64(ProcCPU(p.PID())-cpu0[h]) / float64(wall)
		m, err := ReadProcMem(p.PID())
		if err != nil {
			return src, tgt, err
		}
		s.RSS, s.Threads, s.FDs, s.FDLimit = m.RSS, m.Threads, m.FDs, m.FDLimit
		if mm, err := Scrape(ctx, HTTPClientIn(l.ns(h)), "http://"+l.ip(h)+":6321/metrics"); err == nil {
			s.Goroutines, _ = mm.Get("go_goroutines")
			s.HeapInuse, _ = mm.Get("go_memstats_heap_inuse_bytes")
			s.NextGC, _ = mm.Get("go_memstats_next_gc_bytes")
		}
	}
	return src, tgt, nil
}

// writeRec is one acknowledged write.
type writeRec struct {
	start time.Time
	lat   time.Duration
	off   int64
}

// scaleWriter writes 4 KiB blocks at random offsets of one job's export,
// one at a time, Rate a second.
type scaleWriter struct {
	job  int
	cl   *nbdclient.Client
	mu   sync.Mutex
	recs []writeRec
	// last acknowledged write and the write in flight (offset, -1: none)
	lastOff, lastSeq int64
	inFlight         int64
	err              error
}

// block is the content of write seq of job: its identity, repeated.
func block(job int, seq int64) []byte {
	b := make([]byte, scaleBlock)
	for i := 0; i < len(b); i += 16 {
		binary.LittleEndian.PutUint64(b[i:], uint64(job))
		binary.LittleEndian.PutUint64(b[i+8:], uint64(seq))
	}
	return b
}

func (w *scaleWriter) run(ctx context.Context, rate float64, size int64) {
	rng := rand.New(rand.NewPCG(uint64(w.job), uint64(time.Now().UnixNano())))
	// Offsets below the volume's last MiB: the failover probe writes there.
	slots := (size - 1<<20) / scaleBlock
	every := time.Duration(float64(time.Second) / rate)
	// Jobs start at spread phases, not all on one tick.
	select {
	case <-ctx.Done():
		return
	case <-time.After(time.Duration(rng.Int64N(int64(every)))):
	}
	t := time.NewTicker(every)
	defer t.Stop()
	for seq := int64(1); ; seq++ {
		off := rng.Int64N(slots) * scaleBlock
		w.mu.Lock()
		w.inFlight = off
		w.mu.Unlock()
		start := time.Now()
		_, err := w.cl.WriteAt(block(w.job, seq), off)
		lat := time.Since(start)
		w.mu.Lock()
		w.inFlight = -1
		if err != nil {
			w.inFlight = off // not acknowledged: the target may or may not hold it
			w.err = err
			w.mu.Unlock()
			return
		}
		w.recs = append(w.recs, writeRec{start: start, lat: lat, off: off})
		w.lastOff, w.lastSeq = off, seq
		w.mu.Unlock()
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// writers is the set of running writers.
type writers struct {
	ws     []*scaleWriter
	cancel context.CancelFunc
	wg     sync.WaitGroup
}

// startWriters connects a writer to every job's export on the source.
func (l *scaleLab) startWriters(ctx context.Context, m map[string]map[string]*api.JobStatus) (*writers, error) {
	ctx, cancel := context.WithCancel(ctx)
	ws := &writers{cancel: cancel}
	for i := range l.cfg.Jobs {
		s := m[jobName(i)]["vm1"]
		if s == nil || !strings.HasPrefix(s.Data.Device, "unix:") {
			ws.stop()
			return nil, fmt.Errorf("%s: the source serves no Unix-socket export (device %q)", jobName(i), deviceOf(s))
		}
		cl, err := nbdclient.Dial("unix", strings.TrimPrefix(s.Data.Device, "unix:"), jobName(i))
		if err != nil {
			ws.stop()
			return nil, fmt.Errorf("connect to %s's export: %w", jobName(i), err)
		}
		w := &scaleWriter{job: i, cl: cl, inFlight: -1, lastOff: -1}
		ws.ws = append(ws.ws, w)
		ws.wg.Add(1)
		go func() {
			defer ws.wg.Done()
			w.run(ctx, l.cfg.Rate, l.cfg.Size)
		}()
	}
	return ws, nil
}

func deviceOf(s *api.JobStatus) string {
	if s == nil {
		return ""
	}
	return s.Data.Device
}

// stop ends the writers and closes their connections.
func (ws *writers) stop() {
	ws.cancel()
	for _, w := range ws.ws {
		w.cl.Close()
	}
	ws.wg.Wait()
}

// between returns the writes that started in [a, b).
func (ws *writers) between(a, b time.Time) []writeRec {
	var out []writeRec
	for _, w := range ws.ws {
		w.mu.Lock()
		for _, r := range w.recs {
			if !r.start.Before(a) && r.start.Before(b) {
				out = append(out, r)
			}
		}
		w.mu.Unlock()
	}
	return out
}

// longestAcross returns the longest write acknowledged after a that
// started before b (the writes held when the target went away included).
func (ws *writers) longestAcross(a, b time.Time) time.Duration {
	var longest time.Duration
	for _, w := range ws.ws {
		w.mu.Lock()
		for _, r := range w.recs {
			if r.start.Add(r.lat).After(a) && r.start.Before(b) {
				longest = max(longest, r.lat)
			}
		}
		w.mu.Unlock()
	}
	return longest
}

func latencies(recs []writeRec) (p50, p99, max time.Duration) {
	if len(recs) == 0 {
		return 0, 0, 0
	}
	l := make([]time.Duration, len(recs))
	for i, r := range recs {
		l[i] = r.lat
	}
	slices.Sort(l)
	return l[len(l)/2], l[len(l)*99/100], l[len(l)-1]
}

// dirSize sums the apparent and allocated bytes of the files under dir.
func dirSize(dir string) (apparent, alloc int64, err error) {
	err = filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		fi, err := d.Info()
		if err != nil {
			return err
		}
		if !fi.Mode().IsRegular() {
			return nil
		}
		apparent += fi.Size()
		if st, ok := fi.Sys().(*syscall.Stat_t); ok {
			alloc += st.Blocks * 512
		}
		return nil
	})
	return apparent, alloc, err
}

// jobFiles lists the regular files under dir whose path names job, with
// their sizes.
func jobFiles(dir, job string) []string {
	var out []string
	filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return nil
		}
		rel, _ := filepath.Rel(dir, path)
		if !strings.Contains(rel, job) {
			return nil
		}
		if fi, err := d.Info(); err == nil && fi.Mode().IsRegular() {
			out = append(out, fmt.Sprintf("%s %d", rel, fi.Size()))
		}
		return nil
	})
	return out
}

// RunScale runs the scale benchmark: Jobs jobs between one pair of agents
// in two network namespaces joined by a veth pair.
func RunScale(ctx context.Context, cfg ScaleConfig) (*ScaleReport, error) {
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	if cfg.Jobs < 1 || cfg.Size < 2<<20 || cfg.Rate <= 0 {
		return nil, fmt.Errorf("scale: want jobs ≥ 1, size ≥ 2 MiB and a positive rate (got %d, %d, %v)", cfg.Jobs, cfg.Size, cfg.Rate)
	}
	rep := &ScaleReport{Config: cfg, Start: time.Now(), Argv: map[string]string{}, StateBytes: map[string]int64{}, StateAlloc: map[string]int64{}}
	link, err := NewLink("dsc", scaleSrcIP, scaleTgtIP)
	if err != nil {
		return nil, err
	}
	l := &scaleLab{cfg: cfg, link: link, log: cfg.Log, agents: map[string]*Proc{}, starts: map[string]int{}, rep: rep}
	defer func() {
		for _, p := range l.agents {
			if p.Alive() {
				p.Kill()
			}
		}
		link.Close()
	}()
	err = l.run(ctx)
	rep.End = time.Now()
	rep.LoadEnd = LoadAvg()
	return rep, err
}

func (l *scaleLab) run(ctx context.Context) error {
	cfg, rep, log := l.cfg, l.rep, l.log
	for _, h := range []string{"vm1", "vm2"} {
		if err := os.MkdirAll(filepath.Join(cfg.Dir, h), 0o755); err != nil {
			return err
		}
	}
	rep.Argv["agent (vm1; vm2 alike)"] = displayArgv(l.agentArgv("vm1"), cfg.Dir)
	for _, h := range []string{"vm1", "vm2"} {
		if err := l.startAgent(ctx, h); err != nil {
			return err
		}
	}
	for _, h := range []string{"vm1", "vm2"} {
		b, _ := os.ReadFile(l.agents[h].Log)
		fp := fingerprintRE.FindSubmatch(b)
		if fp == nil {
			return fmt.Errorf("%s: no certificate fingerprint in its log", h)
		}
		if _, err := l.cli(ctx, "server", "add", h, l.ip(h), "--token-file", filepath.Join(l.stateDir(h), "token"), "--fingerprint", string(fp[1])); err != nil {
			return err
		}
	}
	log.Info("agents up", "source", l.agents["vm1"].PID(), "target", l.agents["vm2"].PID())
	var err error
	if rep.Bare.Source, rep.Bare.Target, err = l.sample(ctx, cfg.Settle); err != nil {
		return err
	}

	// The jobs, created one after the other as a script would.
	t0 := time.Now()
	for i := range cfg.Jobs {
		vols := map[string]string{}
		for _, h := range []string{"vm1", "vm2"} {
			vols[h] = filepath.Join(cfg.Dir, h, jobName(i)+".img")
			f, err := os.Create(vols[h])
			if err != nil {
				return err
			}
			err = f.Truncate(cfg.Size)
			f.Close()
			if err != nil {
				return err
			}
		}
		args := []string{"job", "create", jobName(i), "--source", "vm1", "--target", "vm2",
			"--volume", vols["vm1"], "--target-volume", vols["vm2"], "--mode", cfg.Mode, "--failover", "auto"}
		if i == 0 {
			rep.Argv["job create (each job)"] = displayArgv(append([]string{"doppel"}, args...), cfg.Dir)
		}
		if _, err := l.cli(ctx, args...); err != nil {
			return err
		}
	}
	rep.CreateTook = time.Since(t0)
	log.Info("jobs created", "jobs", cfg.Jobs, "took", rep.CreateTook.Round(time.Millisecond))
	if _, err := l.waitInSync(ctx, t0, 5*time.Minute); err != nil {
		return err
	}
	rep.InSyncTook = time.Since(t0)
	log.Info("every job in sync", "took", rep.InSyncTook.Round(time.Millisecond))

	// Status at scale: the whole list, median of 5.
	var lt []float64
	var m map[string]map[string]*api.JobStatus
	for range 5 {
		t := time.Now()
		var err error
		if m, err = l.jobs(ctx, ""); err != nil {
			return err
		}
		lt = append(lt, float64(time.Since(t)))
	}
	rep.ListTook = time.Duration(Median(lt))

	// 1. Idle, then under the writes.
	time.Sleep(cfg.Settle)
	if rep.Idle.Source, rep.Idle.Target, err = l.sample(ctx, cfg.Idle); err != nil {
		return err
	}
	log.Info("idle measured", "source_rss", rep.Idle.Source.RSS, "target_rss", rep.Idle.Target.RSS)
	for _, h := range []string{"vm1", "vm2"} {
		if rep.StateBytes[h], rep.StateAlloc[h], err = dirSize(l.stateDir(h)); err != nil {
			return err
		}
	}
	rep.JobFiles = jobFiles(l.stateDir("vm1"), jobName(0))

	ws, err := l.startWriters(ctx, m)
	if err != nil {
		return err
	}
	defer ws.stop()
	time.Sleep(cfg.Settle)
	w0 := time.Now()
	if rep.Loaded.Source, rep.Loaded.Target, err = l.sample(ctx, cfg.Load); err != nil {
		return err
	}
	rep.Loaded.fill(ws.between(w0, time.Now()), cfg.Load)
	if err := ws.failed(); err != nil {
		return err
	}
	log.Info("load measured", "writes_per_s", rep.Loaded.WritesPerSec, "source_cpu", rep.Loaded.Source.CPUPercent)

	// 2. The target down for Outage while the writes go on, then back.
	if cfg.Outage > 0 {
		if err := l.outage(ctx, ws); err != nil {
			return err
		}
	}

	// 3. The source agent killed with the writes running.
	return l.failover(ctx, ws)
}

// failed returns the first writer's error (nil: all running).
func (ws *writers) failed() error {
	for _, w := range ws.ws {
		w.mu.Lock()
		err := w.err
		w.mu.Unlock()
		if err != nil {
			return fmt.Errorf("%s: write failed: %w", jobName(w.job), err)
		}
	}
	return nil
}

func sumData(m map[string]map[string]*api.JobStatus, host string, f func(api.DataStatus) int64) int64 {
	var n int64
	for _, sides := range m {
		if s := sides[host]; s != nil {
			n += f(s.Data)
		}
	}
	return n
}

func (l *scaleLab) outage(ctx context.Context, ws *writers) error {
	cfg, rep, log := l.cfg, l.rep, l.log
	before, err := l.jobs(ctx, "vm1")
	if err != nil {
		return err
	}
	sent0 := sumData(before, "vm1", func(d api.DataStatus) int64 { return d.MirrorSent })
	o0 := time.Now()
	if cfg.OutageSignal == syscall.SIGTERM {
		if err := l.agents["vm2"].Stop(30 * time.Second); err != nil {
			return fmt.Errorf("stop the target agent: %w", err)
		}
	} else {
		l.agents["vm2"].Kill()
	}
	log.Info("target agent stopped", "signal", cfg.OutageSignal, "for", cfg.Outage)
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-time.After(cfg.Outage):
	}
	atHeal, err := l.jobs(ctx, "vm1")
	if err != nil {
		return err
	}
	rep.DirtyAtHeal = sumData(atHeal, "vm1", func(d api.DataStatus) int64 { return d.DirtyBytes })
	rep.QueuedAtHeal = sumData(atHeal, "vm1", func(d api.DataStatus) int64 { return d.QueueMemory + d.QueueDisk })
	heal := time.Now()
	rep.OutageWrites = len(ws.between(o0, heal))
	chunks := map[[2]int64]bool{}
	for _, w := range ws.ws {
		w.mu.Lock()
		for _, r := range w.recs {
			if !r.start.Before(o0) && r.start.Before(heal) {
				chunks[[2]int64{int64(w.job), r.off / scaleChunk}] = true
			}
		}
		w.mu.Unlock()
	}
	rep.WrittenChunks = int64(len(chunks)) * scaleChunk
	if err := l.startAgent(ctx, "vm2"); err != nil {
		return err
	}
	per, err := l.waitInSync(ctx, heal, 5*time.Minute)
	rep.ResyncPerJob = per
	if err != nil {
		return err
	}
	rep.ResyncAll = slices.Max(per)
	rep.OutageStall = ws.longestAcross(o0, heal) // the writes held at the loss are acknowledged by now
	after, err := l.jobs(ctx, "vm1")
	if err != nil {
		return err
	}
	rep.Resent = sumData(after, "vm1", func(d api.DataStatus) int64 { return d.MirrorSent }) - sent0
	log.Info("resynced", "took", rep.ResyncAll.Round(time.Millisecond), "resent", rep.Resent, "dirty_at_heal", rep.DirtyAtHeal)
	if err := ws.failed(); err != nil {
		return err
	}
	if cfg.Verify {
		for i := range cfg.Jobs {
			out, err := l.cli(ctx, "verify", jobName(i), "--json", "--timeout", "10s")
			var v api.VerifyResult
			if jerr := json.Unmarshal(out, &v); jerr != nil {
				return errors.Join(fmt.Errorf("verify %s: %w", jobName(i), jerr), err)
			}
			if !v.Equal {
				return fmt.Errorf("verify %s after the resync: %d of %d chunks differ", jobName(i), v.Differing, v.Chunks)
			}
			rep.EqualAfter++
		}
	}
	time.Sleep(cfg.Settle)
	w0 := time.Now()
	if rep.AfterResync.Source, rep.AfterResync.Target, err = l.sample(ctx, cfg.Load); err != nil {
		return err
	}
	rep.AfterResync.fill(ws.between(w0, time.Now()), cfg.Load)
	return ws.failed()
}

// fill sets the window's write figures from the writes in it.
func (w *ScaleWindow) fill(recs []writeRec, d time.Duration) {
	w.Writes = len(recs)
	w.WritesPerSec = float64(len(recs)) / d.Seconds()
	w.P50, w.P99, w.Max = latencies(recs)
}

// probe is a client of one job's promoted export on the target.
type probe struct {
	rto      time.Duration
	cl       *nbdclient.Client
	attempts int
	last     error
}

// tryWrite connects to sock (export name) and writes one block at off:
// the promoted side serves and acknowledges writes.
func tryWrite(sock, name string, off int64, data []byte) (*nbdclient.Client, error) {
	c, err := net.DialTimeout("unix", sock, 500*time.Millisecond)
	if err != nil {
		return nil, err
	}
	c.SetDeadline(time.Now().Add(5 * time.Second))
	cl, err := nbdclient.Connect(c, name)
	if err != nil {
		c.Close()
		return nil, err
	}
	if _, err := cl.WriteAt(data, off); err != nil {
		cl.Close()
		return nil, err
	}
	c.SetDeadline(time.Time{})
	return cl, nil
}

func (l *scaleLab) failover(ctx context.Context, ws *writers) error {
	cfg, rep, log := l.cfg, l.rep, l.log
	n := cfg.Jobs
	probes := make([]*probe, n)
	pctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	t0 := time.Now()
	l.agents["vm1"].Kill()
	log.Info("source agent killed", "jobs", n)
	var wg sync.WaitGroup
	for i := range n {
		p := &probe{}
		probes[i] = p
		sock := filepath.Join(l.stateDir("vm2"), "run", jobName(i)+".sock")
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				p.attempts++
				cl, err := tryWrite(sock, jobName(i), cfg.Size-scaleBlock, block(1000+i, 0))
				if err == nil {
					p.rto, p.cl = time.Since(t0), cl
					return
				}
				p.last = err
				select {
				case <-pctx.Done():
					return
				case <-time.After(20 * time.Millisecond):
				}
			}
		}()
	}
	// Meanwhile: when the target reports each job failed over.
	reported := make([]time.Duration, n)
	left := n
	for left > 0 && pctx.Err() == nil {
		if m, err := l.jobs(pctx, "vm2"); err == nil {
			for i := range n {
				if s := m[jobName(i)]["vm2"]; reported[i] == 0 && s != nil && s.HA.State == "failed-over" {
					reported[i] = time.Since(t0)
					left--
				}
			}
		}
		select {
		case <-pctx.Done():
		case <-time.After(100 * time.Millisecond):
		}
	}
	wg.Wait()
	ws.stop()
	for i, p := range probes {
		if p.cl == nil {
			rep.Failures = append(rep.Failures, fmt.Sprintf("%s: no write acknowledged on vm2 within 2 min of the kill (%d attempts, last: %v)", jobName(i), p.attempts, p.last))
			continue
		}
		rep.RTO = append(rep.RTO, p.rto)
		if reported[i] > 0 {
			rep.Reported = append(rep.Reported, reported[i])
		} else {
			rep.Failures = append(rep.Failures, fmt.Sprintf("%s: vm2 never reported it failed-over", jobName(i)))
		}
		// The last acknowledged write on the old source reads back on the
		// promoted side (sync: it was applied there before its ack).
		w := ws.ws[i]
		switch {
		case w.lastOff < 0:
			rep.Unverified = append(rep.Unverified, jobName(i)+": no write acknowledged before the kill")
		case w.lastOff == w.inFlight:
			rep.Unverified = append(rep.Unverified, jobName(i)+": the write in flight at the kill went to the same block")
		default:
			got := make([]byte, scaleBlock)
			_, err := p.cl.ReadAt(got, w.lastOff)
			if want := block(i, w.lastSeq); err != nil || !bytes.Equal(got, want) {
				if cfg.Mode == "sync" {
					rep.Failures = append(rep.Failures, fmt.Sprintf("%s: the last acknowledged write (seq %d at %d) is not on the promoted side (err %v)", jobName(i), w.lastSeq, w.lastOff, err))
				} else {
					rep.Unverified = append(rep.Unverified, fmt.Sprintf("%s: async: the last acknowledged write is not on the promoted side (allowed)", jobName(i)))
				}
			} else {
				rep.Verified++
			}
		}
		p.cl.Close()
	}
	log.Info("failed over", "acknowledged", len(rep.RTO), "verified", rep.Verified)
	if len(rep.Failures) > 0 {
		return fmt.Errorf("failover: %s", strings.Join(rep.Failures, "; "))
	}
	return nil
}
