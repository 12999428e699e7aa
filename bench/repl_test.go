package bench

import (
	"context"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestParseMetrics(t *testing.T) {
	const text = `# HELP doppel_repl_sent_bytes_total Bytes sent.
# TYPE doppel_repl_sent_bytes_total counter
doppel_repl_sent_bytes_total{kind="mirror"} 1.048576e+08
doppel_repl_sent_bytes_total{kind="write"} 4096
doppel_repl_sent_bytes_total{kind="a b}",x="y"} 7 1700000000000
doppel_repl_mirror_remaining_bytes 0
`
	m, err := ParseMetrics(strings.NewReader(text))
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		spec string
		want float64
		ok   bool
	}{
		{`doppel_repl_sent_bytes_total kind="mirror"`, 104857600, true},
		{`doppel_repl_sent_bytes_total`, 104857600 + 4096 + 7, true},
		{`doppel_repl_sent_bytes_total x="y"`, 7, true},
		{`doppel_repl_mirror_remaining_bytes`, 0, true},
		{`doppel_repl_sent_bytes_total kind="verify"`, 0, false},
		{`doppel_missing`, 0, false},
	} {
		if got, ok := m.series(tc.spec); got != tc.want || ok != tc.ok {
			t.Errorf("%s = %v, %v; want %v, %v", tc.spec, got, ok, tc.want, tc.ok)
		}
	}
	if _, err := ParseMetrics(strings.NewReader("novalue\n")); err == nil {
		t.Error("a line without a value parsed")
	}
	if _, err := ParseMetrics(strings.NewReader("x{a=\"b\"} notanumber\n")); err == nil {
		t.Error("a bad value parsed")
	}
}

func TestSameContent(t *testing.T) {
	dir := t.TempDir()
	a, b := filepath.Join(dir, "a"), filepath.Join(dir, "b")
	data := make([]byte, 5<<20+123)
	for i := range data {
		data[i] = byte(i * 7)
	}
	if err := os.WriteFile(a, data, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(b, data, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := SameContent(a, b); err != nil {
		t.Fatalf("identical files: %v", err)
	}
	data[5<<20+7] ^= 1
	os.WriteFile(b, data, 0o644)
	if err := SameContent(a, b); err == nil || !strings.Contains(err.Error(), "offset 5242887") {
		t.Fatalf("one flipped bit: %v", err)
	}
	os.WriteFile(b, data[:4096], 0o644)
	if err := SameContent(a, b); err == nil {
		t.Fatal("different sizes reported identical")
	}
}

// TestLink creates the namespace pair, measures the RTT, dials a listener
// inside the target namespace and deletes the pair.
func TestLink(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: creates network namespaces")
	}
	l, err := NewLink("dbT", "10.198.0.1", "10.198.0.2")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	rtt, err := l.PingRTT(5)
	if err != nil {
		t.Fatal(err)
	}
	if rtt <= 0 || rtt > time.Second {
		t.Errorf("rtt %v", rtt)
	}
	// A listener in the target namespace, reached from the source one.
	p, err := StartProc("nbdkit", In(l.Tgt, "nbdkit", "-f", "--exit-with-parent", "-i", l.TgtIP, "-p", "10809", "memory", "1M"), filepath.Join(t.TempDir(), "log"))
	if err != nil {
		t.Skip("nbdkit:", err)
	}
	defer p.Stop(5 * time.Second)
	ctx := context.Background()
	addr := net.JoinHostPort(l.TgtIP, "10809")
	if err := p.WaitReady(ctx, 10*time.Second, func() error { return dialClose(ctx, l.Src, addr) }); err != nil {
		t.Fatal(err)
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	if out, _ := exec.Command("ip", "netns", "list").Output(); strings.Contains(string(out), l.Src) || strings.Contains(string(out), l.Tgt) {
		t.Errorf("namespaces left behind: %s", out)
	}
}

func TestReplMarkdownVerdicts(t *testing.T) {
	rows := []Job{NBDRows[0], NBDRows[2], SyncRow}
	rep := &ReplReport{
		Config:    ReplConfig{Rows: rows, Size: 1 << 30, Runs: 1, Runtime: time.Second, MirrorRuns: 2, MirrorSize: 1 << 30},
		RTT:       50 * time.Microsecond,
		Argv:      map[string]string{},
		Runs:      map[string]map[string][]Result{},
		Failed:    map[string]map[string][]string{},
		Identical: map[string]string{ModeAsync: "yes", ModeSync: "yes", ModeQemuSync: "yes"},
	}
	mib := float64(1 << 20)
	rep.Runs[rows[0].Slug] = map[string][]Result{
		ModeUnreplicated: {{BW: 1000 * mib, Load: 1.5}}, ModeLimit: {{BW: 800 * mib, Legs: []Result{{BW: 800 * mib}, {BW: 900 * mib}}}},
		ModeQemuAsync: {{BW: 500 * mib}}, ModeAsync: {{BW: 760 * mib}}, ModeQemuSync: {{BW: 400 * mib}}, ModeSync: {{BW: 600 * mib}},
	}
	rep.Runs[rows[1].Slug] = map[string][]Result{
		ModeUnreplicated: {{IOPS: 20000, LatMeanNs: 50e3}}, ModeLimit: {{IOPS: 15000, LatMeanNs: 66e3}},
		ModeQemuAsync: {{IOPS: 9000, LatMeanNs: 110e3}}, ModeAsync: {{IOPS: 19000, LatMeanNs: 52e3}},
		ModeQemuSync: {{IOPS: 4500, LatMeanNs: 220e3}}, ModeSync: {{IOPS: 6000, LatMeanNs: 160e3}},
	}
	rep.Runs[rows[2].Slug] = map[string][]Result{
		ModeUnreplicated: {{IOPS: 2000, LatMeanNs: 50e3, SyncLatMeanNs: 450e3}}, ModeLimit: {{IOPS: 1500}},
		ModeQemuAsync: {{IOPS: 1400}}, ModeAsync: {{IOPS: 1300}}, ModeQemuSync: {{IOPS: 1200}}, ModeSync: {{IOPS: 1000}},
	}
	rep.MirrorDoppel = []float64{400 * mib, 700 * mib}
	rep.MirrorNbdcopy = []float64{500 * mib, 500 * mib}
	rep.Profiles = []Profile{{Row: Job{Name: "sync: rand write 4 KiB, iodepth 32", IODepth: 32, BS: "4k"}, Res: Result{IOPS: 9000},
		Top: "perf record -F 999 -g of the source process\n    75.75%     1.99%  [k] do_syscall_64\n"}}
	md := rep.Markdown("cmd", "")
	for _, want := range []string{
		"sampled with `perf record -F 999 -g -p PID`",
		"<summary>sync: rand write 4 KiB, iodepth 32 (profiled run: 9,000 IOPS)</summary>",
		"75.75%     1.99%  [k] do_syscall_64",
		"| workload | unit | unreplicated | two-copy limit | qemu mirror, background | doppel async | qemu mirror, write-blocking | doppel sync |",
		"| seq write 1 MiB, iodepth 16 | MiB/s | 1,000 | 800 | 500 | 760 | 400 | 600 |",
		"| rand write 4 KiB + flush each, iodepth 1 | IOPS (mean latency) | 2,000 (500 µs) |",
		"| seq write 1 MiB, iodepth 16 | 0.95× | 0.75× | 1.52× | 1.50× | 0.76× | 0.60× | 0.80× |",
		"- doppel sync ≥ 1.2× QEMU's write-blocking mirror on every row: **not met** (not on rand write 4 KiB + flush each, iodepth 1 (0.83×))",
		"- doppel async ≥ 0.9× the two-copy limit on seq write 1 MiB, iodepth 16: **met** (0.95×)",
		"- doppel sync latency on rand write 4 KiB, iodepth 1 ≤ unreplicated + 1 RTT + 50 µs: **not met** (160 µs vs 50.0 µs + 50.0 µs + 50 µs = 150 µs)",
		"- doppel mirror ≥ 1.0× nbdcopy with a spread (max ÷ min of its runs) under 1.5×: **not met** (1.10×, spread 1.75×)",
		"| seq write 1 MiB, iodepth 16 | two-copy limit | 800 [800, 900] |",
		"| seq write 1 MiB, iodepth 16 | unreplicated | 1,000 (1.5) |",
		"Target byte-identical to the source after the qemu mirror, write-blocking runs",
	} {
		if !strings.Contains(md, want) {
			t.Errorf("report lacks %q:\n%s", want, md)
		}
	}
}

// TestRunReplSmoke runs the replication harness end to end, briefly, on a
// freshly built doppel: namespaces, every configuration (QEMU's mirrors
// through QMP included), fio, the drained-backlog and byte-identity checks
// and one mirror against nbdcopy. It fails when `doppel repl` changes a flag
// or a metric the harness reads.
func TestRunReplSmoke(t *testing.T) {
	if testing.Short() {
		t.Skip("builds doppel and runs fio across network namespaces")
	}
	if os.Geteuid() != 0 {
		t.Skip("needs root: creates network namespaces")
	}
	for _, tool := range []string{"fio", "nbdkit", "nbdcopy", "go", "qemu-storage-daemon", "qemu-nbd"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s not installed (make deps installs it)", tool)
		}
	}
	dir := t.TempDir()
	doppel := filepath.Join(dir, "doppel")
	if out, err := exec.Command("go", "build", "-o", doppel, "../cmd/doppel").CombinedOutput(); err != nil {
		t.Fatalf("build doppel: %v\n%s", err, out)
	}
	rep, err := RunRepl(context.Background(), ReplConfig{
		Doppel:     doppel,
		Fio:        "fio",
		Dir:        dir,
		Size:       16 << 20,
		Runs:       1,
		Runtime:    300 * time.Millisecond,
		Rows:       []Job{SyncRow},
		MirrorSize: 16 << 20,
		MirrorRuns: 1,
		Metrics:    DefaultReplMetrics,
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, mode := range ReplModes {
		if n := len(rep.Runs[SyncRow.Slug][mode]); n != 1 {
			t.Errorf("%s: %d runs, failures %v", mode, n, rep.Failed[SyncRow.Slug][mode])
		}
	}
	if r := rep.Runs[SyncRow.Slug][ModeLimit]; len(r) == 1 && (len(r[0].Legs) != 2 || r[0].SyncLatMeanNs == 0) {
		t.Errorf("limit run: %+v", r[0])
	}
	for _, mode := range []string{ModeAsync, ModeSync, ModeQemuAsync, ModeQemuSync} {
		if rep.Identical[mode] != "yes" {
			t.Errorf("%s: target identical: %q", mode, rep.Identical[mode])
		}
	}
	if len(rep.MirrorDoppel) != 1 || len(rep.MirrorNbdcopy) != 1 || len(rep.MirrorFailed) != 0 {
		t.Errorf("mirror: doppel %v, nbdcopy %v, failed %v", rep.MirrorDoppel, rep.MirrorNbdcopy, rep.MirrorFailed)
	}
	if len(rep.MirrorSent) == 1 && (rep.MirrorSent[0] < 16<<20 || rep.MirrorSent[0] > 18<<20) {
		t.Errorf("mirror sent %v bytes for a 16 MiB volume of random data", rep.MirrorSent[0])
	}
}
