package bench

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os/exec"
	"slices"
	"strconv"
	"time"
)

// Job is one fio workload: a row of a results table.
type Job struct {
	Name    string // row label, e.g. "rand read 4 KiB, iodepth 32"
	Slug    string // short file-name-safe id, e.g. "randread-4k-qd32"
	RW      string // fio --rw: read, write, randread, randwrite
	BS      string // fio --bs, e.g. "4k", "1M"
	IODepth int
	Fsync   int // fio --fsync: a flush after every Fsync writes (0: none)
}

// Write reports whether the job writes.
func (j Job) Write() bool { return j.RW == "write" || j.RW == "randwrite" }

// Random reports whether the job's offsets are random.
func (j Job) Random() bool { return j.RW == "randread" || j.RW == "randwrite" }

// Latency reports whether the row is latency-bound (iodepth 1), so that its
// latency is worth reporting next to its IOPS.
func (j Job) Latency() bool { return j.IODepth == 1 }

// SyncRow is the replication table's write+flush row: every 4 KiB write is
// followed by a flush (fio --fsync=1, an NBD_CMD_FLUSH on the nbd engine),
// as a database commit does.
var SyncRow = Job{Name: "rand write 4 KiB + flush each, iodepth 1", Slug: "randwrite-4k-qd1-fsync", RW: "randwrite", BS: "4k", IODepth: 1, Fsync: 1}

// NBDRows are the rows of the NBD server table.
var NBDRows = []Job{
	{Name: "seq write 1 MiB, iodepth 16", Slug: "write-1m-qd16", RW: "write", BS: "1M", IODepth: 16},
	{Name: "seq read 1 MiB, iodepth 16", Slug: "read-1m-qd16", RW: "read", BS: "1M", IODepth: 16},
	{Name: "rand write 4 KiB, iodepth 1", Slug: "randwrite-4k-qd1", RW: "randwrite", BS: "4k", IODepth: 1},
	{Name: "rand write 4 KiB, iodepth 32", Slug: "randwrite-4k-qd32", RW: "randwrite", BS: "4k", IODepth: 32},
	{Name: "rand read 4 KiB, iodepth 1", Slug: "randread-4k-qd1", RW: "randread", BS: "4k", IODepth: 1},
	{Name: "rand read 4 KiB, iodepth 32", Slug: "randread-4k-qd32", RW: "randread", BS: "4k", IODepth: 32},
}

// FioArgs returns fio's arguments for job against the NBD export at uri,
// running for runtime after ramp (fio's --ramp_time: excluded from figures).
// Every server gets exactly these arguments; only the URI differs.
func FioArgs(job Job, uri string, runtime, ramp time.Duration) []string {
	args := []string{
		"--name=" + job.Slug,
		"--ioengine=nbd",
		"--uri=" + uri,
		"--rw=" + job.RW,
		"--bs=" + job.BS,
		"--iodepth=" + strconv.Itoa(job.IODepth),
		"--numjobs=1",
		"--time_based",
		"--runtime=" + fioDuration(runtime),
		"--output-format=json",
	}
	if ramp > 0 {
		args = append(args, "--ramp_time="+fioDuration(ramp))
	}
	if job.Fsync > 0 {
		args = append(args, "--fsync="+strconv.Itoa(job.Fsync))
	}
	if job.Random() {
		// No random map: fio's own bookkeeping would otherwise take CPU from
		// the server on this small machine; offsets stay uniform.
		args = append(args, "--norandommap", "--randrepeat=0")
	}
	return args
}

// fioDuration formats d for fio's time options (milliseconds, at least 1).
func fioDuration(d time.Duration) string {
	ms := d.Milliseconds()
	if ms < 1 {
		ms = 1
	}
	return strconv.FormatInt(ms, 10) + "ms"
}

// Result is what one fio run measured, for the job's direction.
type Result struct {
	IOPS      float64 // I/O operations per second
	BW        float64 // bytes per second
	LatMeanNs float64 // mean completion latency as fio's lat_ns (submission + completion)
	LatP99Ns  float64 // 99th percentile of clat_ns
	// SyncLatMeanNs is the mean latency of the flushes fio issued after
	// writes (--fsync), 0 without.
	SyncLatMeanNs float64
	IOs           int64 // completed I/Os in the measured period
	RuntimeMs     int64 // measured period
	FioVersion    string

	// The server's CPU time (user + system, all threads) over the whole fio
	// run, as a share of one core and per I/O (assuming the measured rate
	// held during the ramp too). Zero when not measured.
	ServerCPUShare float64
	ServerCPUPerIO time.Duration

	// Load is /proc/loadavg's 1-minute figure when the run started.
	Load float64 `json:",omitempty"`
	// Legs are the two legs' own results for a two-copy limit run.
	Legs []Result `json:",omitempty"`
}

// SetServerCPU records the server's CPU time cpu used during a fio run that
// took wall.
func (r *Result) SetServerCPU(cpu, wall time.Duration) {
	if cpu <= 0 || wall <= 0 || r.IOPS <= 0 {
		return
	}
	r.ServerCPUShare = cpu.Seconds() / wall.Seconds()
	r.ServerCPUPerIO = time.Duration(float64(cpu) / (r.IOPS * wall.Seconds()))
}

// OpLatNs is the mean latency of one operation as the application sees it:
// a write, plus its flush for --fsync rows.
func (r Result) OpLatNs() float64 { return r.LatMeanNs + r.SyncLatMeanNs }

// MiBps is the bandwidth in MiB/s.
func (r Result) MiBps() float64 { return r.BW / (1 << 20) }

type fioOutput struct {
	Version string `json:"fio version"`
	Jobs    []struct {
		Name  string      `json:"jobname"`
		Error int         `json:"error"`
		Read  fioDirStats `json:"read"`
		Write fioDirStats `json:"write"`
		Sync  struct {
			TotalIOs int64  `json:"total_ios"`
			LatNs    fioLat `json:"lat_ns"`
		} `json:"sync"`
	} `json:"jobs"`
}

type fioDirStats struct {
	IOBytes   int64   `json:"io_bytes"`
	BWBytes   float64 `json:"bw_bytes"`
	IOPS      float64 `json:"iops"`
	Runtime   int64   `json:"runtime"`
	TotalIOs  int64   `json:"total_ios"`
	ShortIOs  int64   `json:"short_ios"`
	LatNs     fioLat  `json:"lat_ns"`
	ClatNs    fioLat  `json:"clat_ns"`
	DroppedIO int64   `json:"drop_ios"`
}

type fioLat struct {
	Mean       float64            `json:"mean"`
	N          int64              `json:"N"`
	Percentile map[string]float64 `json:"percentile"`
}

// ErrNoIO is returned when fio completed no I/O in the measured period.
var ErrNoIO = errors.New("fio completed no I/O")

// ParseFio extracts the figures of fio's --output-format=json output for the
// given direction (write or not). fio's nbd engine prints a line ("fio:
// connected to NBD server") before the JSON; anything before the first '{'
// is skipped.
func ParseFio(out []byte, write bool) (Result, error) {
	rs, err := ParseFioJobs(out, write)
	if err != nil {
		return Result{}, err
	}
	if len(rs) != 1 {
		return Result{}, fmt.Errorf("parse fio output: %d jobs, want 1", len(rs))
	}
	return rs[0], nil
}

// ParseFioJobs is ParseFio for a run of several jobs (not grouped): one
// Result per job, in fio's order.
func ParseFioJobs(out []byte, write bool) ([]Result, error) {
	i := bytes.IndexByte(out, '{')
	if i < 0 {
		return nil, fmt.Errorf("parse fio output: no JSON in %q", truncate(out, 200))
	}
	var o fioOutput
	if err := json.Unmarshal(out[i:], &o); err != nil {
		return nil, fmt.Errorf("parse fio output: %w", err)
	}
	if len(o.Jobs) == 0 {
		return nil, errors.New("parse fio output: no jobs")
	}
	var rs []Result
	for _, j := range o.Jobs {
		if j.Error != 0 {
			return nil, fmt.Errorf("fio job %s failed with error %d", j.Name, j.Error)
		}
		s := j.Read
		if write {
			s = j.Write
		}
		if s.TotalIOs == 0 || s.IOBytes == 0 {
			return nil, ErrNoIO
		}
		r := Result{
			IOPS:       s.IOPS,
			BW:         s.BWBytes,
			LatMeanNs:  s.LatNs.Mean,
			LatP99Ns:   s.ClatNs.Percentile["99.000000"],
			IOs:        s.TotalIOs,
			RuntimeMs:  s.Runtime,
			FioVersion: o.Version,
		}
		if j.Sync.TotalIOs > 0 {
			r.SyncLatMeanNs = j.Sync.LatNs.Mean
		}
		rs = append(rs, r)
	}
	return rs, nil
}

// BothCopies combines the results of two legs that ran at the same time,
// each writing every block once (the two-copy limit): a block exists twice
// at the rate of the slower leg, and a write issued to both at once is done
// when the later one is.
func BothCopies(a, b Result) Result {
	r := a
	r.IOPS, r.BW, r.IOs = min(a.IOPS, b.IOPS), min(a.BW, b.BW), min(a.IOs, b.IOs)
	r.LatMeanNs, r.LatP99Ns = max(a.LatMeanNs, b.LatMeanNs), max(a.LatP99Ns, b.LatP99Ns)
	r.SyncLatMeanNs = max(a.SyncLatMeanNs, b.SyncLatMeanNs)
	r.Legs = []Result{a, b}
	return r
}

// RunFio runs fio with args and parses its result.
func RunFio(ctx context.Context, fio string, args []string, write bool) (Result, error) {
	out, err := runFio(ctx, []string{fio}, args)
	if err != nil {
		return Result{}, err
	}
	r, err := ParseFio(out.stdout, write)
	if err != nil {
		return Result{}, fmt.Errorf("%w (stderr: %s)", err, truncate(out.stderr, 300))
	}
	return r, nil
}

type fioOut struct{ stdout, stderr []byte }

// runFio runs the command fio (argv, e.g. inside a namespace) with args.
func runFio(ctx context.Context, fio, args []string) (fioOut, error) {
	var stdout, stderr bytes.Buffer
	argv := append(slices.Clone(fio), args...)
	cmd := exec.CommandContext(ctx, argv[0], argv[1:]...)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	cmd.WaitDelay = 5 * time.Second
	if err := cmd.Run(); err != nil {
		return fioOut{}, fmt.Errorf("run fio: %w: %s", err, truncate(stderr.Bytes(), 500))
	}
	return fioOut{stdout.Bytes(), stderr.Bytes()}, nil
}

func truncate(b []byte, n int) string {
	b = bytes.TrimSpace(b)
	if len(b) > n {
		return string(b[:n]) + "..."
	}
	return string(b)
}
