package bench

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os/exec"
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
}

// Write reports whether the job writes.
func (j Job) Write() bool { return j.RW == "write" || j.RW == "randwrite" }

// Random reports whether the job's offsets are random.
func (j Job) Random() bool { return j.RW == "randread" || j.RW == "randwrite" }

// Latency reports whether the row is latency-bound (iodepth 1), so that its
// latency is worth reporting next to its IOPS.
func (j Job) Latency() bool { return j.IODepth == 1 }

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
	IOPS       float64 // I/O operations per second
	BW         float64 // bytes per second
	LatMeanNs  float64 // mean completion latency as fio's lat_ns (submission + completion)
	LatP99Ns   float64 // 99th percentile of clat_ns
	IOs        int64   // completed I/Os in the measured period
	RuntimeMs  int64   // measured period
	FioVersion string

	// The server's CPU time (user + system, all threads) over the whole fio
	// run, as a share of one core and per I/O (assuming the measured rate
	// held during the ramp too). Zero when not measured.
	ServerCPUShare float64
	ServerCPUPerIO time.Duration
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

// MiBps is the bandwidth in MiB/s.
func (r Result) MiBps() float64 { return r.BW / (1 << 20) }

type fioOutput struct {
	Version string `json:"fio version"`
	Jobs    []struct {
		Error int         `json:"error"`
		Read  fioDirStats `json:"read"`
		Write fioDirStats `json:"write"`
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
	i := bytes.IndexByte(out, '{')
	if i < 0 {
		return Result{}, fmt.Errorf("parse fio output: no JSON in %q", truncate(out, 200))
	}
	var o fioOutput
	if err := json.Unmarshal(out[i:], &o); err != nil {
		return Result{}, fmt.Errorf("parse fio output: %w", err)
	}
	if len(o.Jobs) != 1 {
		return Result{}, fmt.Errorf("parse fio output: %d jobs, want 1", len(o.Jobs))
	}
	j := o.Jobs[0]
	if j.Error != 0 {
		return Result{}, fmt.Errorf("fio job failed with error %d", j.Error)
	}
	s := j.Read
	if write {
		s = j.Write
	}
	if s.TotalIOs == 0 || s.IOBytes == 0 {
		return Result{}, ErrNoIO
	}
	return Result{
		IOPS:       s.IOPS,
		BW:         s.BWBytes,
		LatMeanNs:  s.LatNs.Mean,
		LatP99Ns:   s.ClatNs.Percentile["99.000000"],
		IOs:        s.TotalIOs,
		RuntimeMs:  s.Runtime,
		FioVersion: o.Version,
	}, nil
}

// RunFio runs fio with args and parses its result.
func RunFio(ctx context.Context, fio string, args []string, write bool) (Result, error) {
	var stdout, stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, fio, args...)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	cmd.WaitDelay = 5 * time.Second
	if err := cmd.Run(); err != nil {
		return Result{}, fmt.Errorf("run fio: %w: %s", err, truncate(stderr.Bytes(), 500))
	}
	r, err := ParseFio(stdout.Bytes(), write)
	if err != nil {
		return Result{}, fmt.Errorf("%w (stderr: %s)", err, truncate(stderr.Bytes(), 300))
	}
	return r, nil
}

func truncate(b []byte, n int) string {
	b = bytes.TrimSpace(b)
	if len(b) > n {
		return string(b[:n]) + "..."
	}
	return string(b)
}
