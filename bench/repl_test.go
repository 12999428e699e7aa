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
	rows := []Job{NBDRows[0], NBDRows[2]}
	rep := &ReplReport{
		Config:    ReplConfig{Rows: rows, Size: 1 << 30, Runs: 1, Runtime: time.Second, MirrorRuns: 1, MirrorSize: 1 << 30},
		RTT:       50 * time.Microsecond,
		Argv:      map[string]string{},
		Runs:      map[string]map[string][]Result{},
		Failed:    map[string]map[string][]string{},
		Identical: map[string]string{ModeAsync: "yes", ModeSync: "yes"},
	}
	mib := float64(1 << 20)
	rep.Runs[rows[0].Slug] = map[string][]Result{
		ModeUnreplicated: {{BW: 1000 * mib}}, ModeAsync: {{BW: 950 * mib}}, ModeSync: {{BW: 600 * mib}},
	}
	rep.Runs[rows[1].Slug] = map[string][]Result{
		ModeUnreplicated: {{IOPS: 20000, LatMeanNs: 50e3}}, ModeAsync: {{IOPS: 19000, LatMeanNs: 52e3}}, ModeSync: {{IOPS: 5000, LatMeanNs: 190e3}},
	}
	rep.MirrorDoppel = []float64{400 * mib}
	rep.MirrorNbdcopy = []float64{500 * mib}
	rep.Profiles = []Profile{{Row: Job{Name: "sync: rand write 4 KiB, iodepth 32", IODepth: 32, BS: "4k"}, Res: Result{IOPS: 9000},
		Top: "perf record -F 999 -g of the source process\n    75.75%     1.99%  [k] do_syscall_64\n"}}
	md := rep.Markdown("cmd", "")
	for _, want := range []string{
		"sampled with `perf record -F 999 -g -p PID`",
		"<summary>sync: rand write 4 KiB, iodepth 32 (profiled run: 9,000 IOPS)</summary>",
		"75.75%     1.99%  [k] do_syscall_64",
		"| seq write 1 MiB, iodepth 16 | MiB/s | 1,000 | 950 | 600 | 0.95× | 0.60× |",
		"async ≥ 0.9× unreplicated — **met**; sync ≥ 0.7× unreplicated — **not met** on seq write 1 MiB, iodepth 16; rand write 4 KiB, iodepth 1.",
		"190 µs vs unreplicated 50.0 µs + RTT 50.0 µs + 100 µs = 200 µs — **met**",
		"Mirror ÷ nbdcopy: 0.80× (target ≥ 0.9×: **not met**)",
	} {
		if !strings.Contains(md, want) {
			t.Errorf("report lacks %q:\n%s", want, md)
		}
	}
}

// TestRunReplSmoke runs the replication harness end to end, briefly, on a
// freshly built doppel: namespaces, the three configurations, fio, the
// drained-queue and byte-identity checks and one mirror against nbdcopy. It
// fails when `doppel repl` changes a flag or a metric the harness reads.
func TestRunReplSmoke(t *testing.T) {
	if testing.Short() {
		t.Skip("builds doppel and runs fio across network namespaces")
	}
	if os.Geteuid() != 0 {
		t.Skip("needs root: creates network namespaces")
	}
	for _, tool := range []string{"fio", "nbdkit", "nbdcopy", "go"} {
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
		Rows:       []Job{NBDRows[2]},
		MirrorSize: 16 << 20,
		MirrorRuns: 1,
		Metrics:    DefaultReplMetrics,
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, mode := range ReplModes {
		if n := len(rep.Runs[NBDRows[2].Slug][mode]); n != 1 {
			t.Errorf("%s: %d runs, failures %v", mode, n, rep.Failed[NBDRows[2].Slug][mode])
		}
	}
	for _, mode := range []string{ModeAsync, ModeSync} {
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
