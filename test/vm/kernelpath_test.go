package vm

import (
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/doppelha/doppel/bench"
)

// kernelPathRows are the workloads of the kernel-path comparison.
var kernelPathRows = []bench.Job{
	{Name: "seq write 1 MiB, iodepth 16", Slug: "write-1m-qd16", RW: "write", BS: "1M", IODepth: 16},
	{Name: "rand write 4 KiB, iodepth 1", Slug: "randwrite-4k-qd1", RW: "randwrite", BS: "4k", IODepth: 1},
	{Name: "rand write 4 KiB, iodepth 32", Slug: "randwrite-4k-qd32", RW: "randwrite", BS: "4k", IODepth: 32},
	{Name: "rand read 4 KiB, iodepth 32", Slug: "randread-4k-qd32", RW: "randread", BS: "4k", IODepth: 32},
	bench.SyncRow,
}

// kernelPathFioArgs are fio's arguments for job on the block device dev:
// libaio, O_DIRECT (both devices take it), the whole volume.
func kernelPathFioArgs(job bench.Job, dev string, runtime, ramp time.Duration) string {
	args := []string{"fio", "--name=" + job.Slug, "--filename=" + dev, "--ioengine=libaio", "--direct=1",
		"--rw=" + job.RW, "--bs=" + job.BS, "--iodepth=" + strconv.Itoa(job.IODepth), "--numjobs=1",
		"--time_based", fmt.Sprintf("--runtime=%dms", runtime.Milliseconds()), "--output-format=json"}
	if ramp > 0 {
		args = append(args, fmt.Sprintf("--ramp_time=%dms", ramp.Milliseconds()))
	}
	if job.Fsync > 0 {
		args = append(args, "--fsync="+strconv.Itoa(job.Fsync))
	}
	if job.Random() {
		args = append(args, "--norandommap", "--randrepeat=0")
	}
	return strings.Join(args, " ")
}

// kernelPathDevices are the two ways to the same volume file: a loop
// device, and /dev/nbd0 attached by doppel nbd attach (the kernel nbd
// client, doppel's server in the same guest, 2 connections: its defaults).
var kernelPathDevices = []string{"loop", "nbd"}

// TestKernelPath measures fio on /dev/nbd0 (doppel nbd attach) against a
// loop device on the same volume file, in one guest: the cost of the
// kernel NBD path. Runs alternate the two devices (their order flips from
// run to run and row to row). In make test it runs each row once for a
// second (the benchmark runs, every row yields figures: nothing is
// asserted about speed); make bench-kernel sets DOPPEL_BENCH_KERNEL=full
// for the real comparison (DOPPEL_BENCH_RUNS runs of
// DOPPEL_BENCH_SECONDS each) and DOPPEL_BENCH_OUT to write its table.
func TestKernelPath(t *testing.T) {
	runs, runtime, ramp := 1, time.Second, time.Duration(0)
	full := os.Getenv("DOPPEL_BENCH_KERNEL") == "full"
	if full {
		runs, runtime, ramp = 5, 10*time.Second, 2*time.Second
		if n, err := strconv.Atoi(os.Getenv("DOPPEL_BENCH_RUNS")); err == nil && n > 0 {
			runs = n
		}
		if n, err := strconv.Atoi(os.Getenv("DOPPEL_BENCH_SECONDS")); err == nil && n > 0 {
			runtime = time.Duration(n) * time.Second
		}
	}
	l := NewLab(t, GuestConfig{Name: "vm1", MemMB: 1024, Bundles: []Bundle{FioBundle}})
	g := l.Guests[0]
	const mib = 256
	g.MustRun(t, 5*time.Minute, fmt.Sprintf(`set -e
dd if=/dev/urandom of=/var/lib/doppel/vol.img bs=1M count=%d 2>/dev/null
modprobe loop
losetup /dev/loop0 /var/lib/doppel/vol.img
[ "$(cat /sys/block/loop0/size)" = %d ]`, mib, mib*2048))
	out := g.MustRun(t, 3*time.Minute, `
( doppel nbd attach --file /var/lib/doppel/vol.img --device /dev/nbd0 >/run/attach.out 2>/run/attach.log; echo $? >/run/attach.rc ) &
for i in $(seq 300); do
	[ -e /sys/block/nbd0/pid ] && [ -s /run/attach.out ] && break
	[ -e /run/attach.rc ] && break
	sleep 0.1
done
[ -e /sys/block/nbd0/pid ] || { echo "not attached:"; cat /run/attach.log; exit 1; }
echo nbd0=$(cat /sys/block/nbd0/size) write_cache=$(cat /sys/block/nbd0/queue/write_cache) loop0_cache=$(cat /sys/block/loop0/queue/write_cache)`)
	t.Logf("devices: %s", strings.TrimSpace(out))
	if !strings.Contains(out, fmt.Sprintf("nbd0=%d ", mib*2048)) {
		t.Fatalf("nbd0 is not the volume: %s", out)
	}
	dev := map[string]string{"loop": "/dev/loop0", "nbd": "/dev/nbd0"}

	res := map[string]map[string][]bench.Result{} // row slug -> device -> runs
	var loads []string
	start := time.Now()
	for r := range runs {
		loads = append(loads, bench.LoadAvg())
		for i, job := range kernelPathRows {
			order := kernelPathDevices
			if (r+i)%2 == 1 {
				order = slices.Clone(order)
				slices.Reverse(order)
			}
			for _, d := range order {
				out := g.MustRun(t, runtime+ramp+3*time.Minute, kernelPathFioArgs(job, dev[d], runtime, ramp)+" 2>&1")
				rs, err := bench.ParseFio([]byte(out), job.Write())
				if err != nil {
					t.Fatalf("%s on %s: %v\n%s", job.Name, d, err, out)
				}
				if res[job.Slug] == nil {
					res[job.Slug] = map[string][]bench.Result{}
				}
				res[job.Slug][d] = append(res[job.Slug][d], rs)
			}
		}
	}
	loads = append(loads, bench.LoadAvg())
	table := kernelPathTable(res, runs)
	t.Logf("kernel path: %d run(s) of %v (+%v ramp) per row and device, in %v; host load (1, 5, 15 min) %s\n%s",
		runs, runtime, ramp, time.Since(start).Round(time.Second), strings.Join(loads, " → "), table)
	if ko := g.MustRun(t, 30*time.Second, "dmesg | grep -E 'nbd|I/O error|blocked for more' || true"); strings.Contains(ko, "I/O error") || strings.Contains(ko, "blocked for more") {
		t.Errorf("kernel log:\n%s", ko)
	}
	g.MustRun(t, 2*time.Minute, `kill -TERM $(pidof doppel); for i in $(seq 300); do [ -e /run/attach.rc ] && break; sleep 0.1; done; cat /run/attach.rc`)
	if p := os.Getenv("DOPPEL_BENCH_OUT"); p != "" {
		kernel := l.assets.Kernel
		head := fmt.Sprintf("host: %s\n\nguest: %s (%s) under qemu -accel %s, 1 vCPU, 1 GiB; volume: %d MiB file on the guest's tmpfs; %d runs × %v (+%v ramp), alternated; host load (1, 5, 15 min) per run: %s\n\n",
			bench.DescribeMachine(os.TempDir(), nil), kernel.Package, kernel.Release, accelName(kernel.Vmlinuz), mib, runs, runtime, ramp, strings.Join(loads, " → "))
		if err := os.WriteFile(p, []byte(head+table), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

func accelName(vmlinuz string) string {
	if kvmWorks(vmlinuz) {
		return "kvm"
	}
	return "tcg"
}

// kernelPathTable renders the medians side by side, and NBD ÷ loop: the
// median of the ratios of alternated pairs (run r of both devices) and
// their range.
func kernelPathTable(res map[string]map[string][]bench.Result, runs int) string {
	var b strings.Builder
	b.WriteString("| workload | loop IOPS | nbd IOPS | NBD ÷ loop (IOPS) | pairs min–max | loop MiB/s | nbd MiB/s | loop lat | nbd lat |\n")
	b.WriteString("|---|--:|--:|--:|--:|--:|--:|--:|--:|\n")
	for _, job := range kernelPathRows {
		lo, nb := res[job.Slug]["loop"], res[job.Slug]["nbd"]
		med := func(rs []bench.Result, f func(bench.Result) float64) float64 {
			var xs []float64
			for _, r := range rs {
				xs = append(xs, f(r))
			}
			return bench.Median(xs)
		}
		iops := func(r bench.Result) float64 { return r.IOPS }
		mibs := func(r bench.Result) float64 { return r.MiBps() }
		lat := func(r bench.Result) float64 { return r.OpLatNs() }
		var ratios []float64
		for i := range min(len(lo), len(nb)) {
			ratios = append(ratios, bench.Ratio(nb[i].IOPS, lo[i].IOPS))
		}
		fmt.Fprintf(&b, "| %s | %.0f | %.0f | %.2f | %.2f–%.2f | %.1f | %.1f | %s | %s |\n", job.Name,
			med(lo, iops), med(nb, iops), bench.Median(ratios), slices.Min(ratios), slices.Max(ratios),
			med(lo, mibs), med(nb, mibs),
			time.Duration(med(lo, lat)).Round(time.Microsecond), time.Duration(med(nb, lat)).Round(time.Microsecond))
	}
	fmt.Fprintf(&b, "\n%d run(s) per row and device; lat is fio's mean completion latency (write + its fsync for the fsync row).\n", runs)
	return b.String()
}
