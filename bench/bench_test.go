package bench

import (
	"context"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

func TestParseFio(t *testing.T) {
	for _, tc := range []struct {
		file               string
		write              bool
		iops, bw, lat, p99 float64
		ios, runtimeMs     int64
	}{
		{"fio-randwrite-4k-qd1.json", true, 8698.854337, 35630507, 114579.309878, 203776, 5315, 611},
		{"fio-read-1m-qd16.json", false, 78.470825, 82282623, 200174141.846154, 463470592, 39, 497},
	} {
		out, err := os.ReadFile(filepath.Join("testdata", tc.file))
		if err != nil {
			t.Fatal(err)
		}
		if !strings.HasPrefix(string(out), "fio: connected") {
			t.Fatalf("%s: testdata should keep the nbd engine's leading line", tc.file)
		}
		r, err := ParseFio(out, tc.write)
		if err != nil {
			t.Fatalf("%s: %v", tc.file, err)
		}
		if r.IOPS != tc.iops || r.BW != tc.bw || r.LatMeanNs != tc.lat || r.LatP99Ns != tc.p99 || r.IOs != tc.ios || r.RuntimeMs != tc.runtimeMs || r.FioVersion != "fio-3.33" {
			t.Errorf("%s: got %+v", tc.file, r)
		}
		// The other direction did no I/O: that must be an error, not zeroes.
		if _, err := ParseFio(out, !tc.write); err != ErrNoIO {
			t.Errorf("%s other direction: err %v, want ErrNoIO", tc.file, err)
		}
	}
	for _, bad := range []string{"", "fio: connected to NBD server\n", `{"jobs": []}`, `{"jobs": [{"error": 5}]}`, `{"jobs": [`} {
		if _, err := ParseFio([]byte(bad), false); err == nil {
			t.Errorf("ParseFio(%q) succeeded", bad)
		}
	}
}

// TestParseFioTwoLegs parses a two-job run with a flush after every write
// (the two-copy limit on the flush row) and combines the legs.
func TestParseFioTwoLegs(t *testing.T) {
	out, err := os.ReadFile(filepath.Join("testdata", "fio-two-legs-fsync.json"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ParseFio(out, true); err == nil || !strings.Contains(err.Error(), "2 jobs") {
		t.Errorf("ParseFio of two jobs: %v", err)
	}
	rs, err := ParseFioJobs(out, true)
	if err != nil {
		t.Fatal(err)
	}
	if len(rs) != 2 {
		t.Fatalf("%d results", len(rs))
	}
	local, remote := rs[0], rs[1]
	if local.IOPS != 14146.179402 || local.IOs != 4258 || local.SyncLatMeanNs != 25671.632605 || local.LatMeanNs != 41342.931423 {
		t.Errorf("local leg: %+v", local)
	}
	if remote.IOPS != 15299.003322 || remote.SyncLatMeanNs != 25717.27861 {
		t.Errorf("remote leg: %+v", remote)
	}
	if got, want := local.OpLatNs(), 41342.931423+25671.632605; got != want {
		t.Errorf("op latency %v, want %v", got, want)
	}
	both := BothCopies(local, remote)
	if both.IOPS != local.IOPS || both.BW != local.BW || both.IOs != local.IOs {
		t.Errorf("both copies: rate %v %v %v, want the slower leg's", both.IOPS, both.BW, both.IOs)
	}
	if both.LatMeanNs != local.LatMeanNs || both.SyncLatMeanNs != remote.SyncLatMeanNs || both.LatP99Ns != 109056 || len(both.Legs) != 2 {
		t.Errorf("both copies: latency %+v, want the higher of each", both)
	}
}

func TestFioTwoLegs(t *testing.T) {
	got := strings.Join(FioTwoLegs(SyncRow, "L", "R", 3*time.Second, time.Second), " ")
	want := "--ioengine=nbd --rw=randwrite --bs=4k --iodepth=1 --numjobs=1 --time_based --runtime=3000ms --output-format=json --ramp_time=1000ms --fsync=1 --norandommap --randrepeat=0 --name=local --uri=L --name=remote --uri=R"
	if got != want {
		t.Errorf("FioTwoLegs:\n got %s\nwant %s", got, want)
	}
}

func TestFioArgs(t *testing.T) {
	got := strings.Join(FioArgs(NBDRows[5], "nbd+unix:///?socket=/s", 4*time.Second, time.Second), " ")
	want := "--name=randread-4k-qd32 --ioengine=nbd --uri=nbd+unix:///?socket=/s --rw=randread --bs=4k --iodepth=32 --numjobs=1 --time_based --runtime=4000ms --output-format=json --ramp_time=1000ms --norandommap --randrepeat=0"
	if got != want {
		t.Errorf("FioArgs:\n got %s\nwant %s", got, want)
	}
	got = strings.Join(FioArgs(NBDRows[0], "U", time.Second, 0), " ")
	if strings.Contains(got, "ramp") || strings.Contains(got, "norandommap") || !strings.Contains(got, "--rw=write --bs=1M --iodepth=16") {
		t.Errorf("FioArgs seq write without ramp: %s", got)
	}
}

func TestMedianRatioRotate(t *testing.T) {
	if m := Median([]float64{5, 1, 3}); m != 3 {
		t.Errorf("median odd = %v", m)
	}
	if m := Median([]float64{4, 1, 3, 2}); m != 2.5 {
		t.Errorf("median even = %v", m)
	}
	if !math.IsNaN(Median(nil)) {
		t.Error("median of nothing is not NaN")
	}
	if r := Ratio(3, 2); r != 1.5 {
		t.Errorf("ratio = %v", r)
	}
	if !math.IsNaN(Ratio(1, 0)) || !math.IsNaN(Ratio(math.NaN(), 1)) {
		t.Error("ratio of missing figures is not NaN")
	}
	if got := Rotate([]int{0, 1, 2, 3}, 5); got[0] != 1 || got[3] != 0 || len(got) != 4 {
		t.Errorf("rotate = %v", got)
	}
}

func TestSpliceSection(t *testing.T) {
	const head = "# R\n\nintro\n"
	sec := "## NBD\n\nnew table\n"
	for _, tc := range []struct{ name, doc, want string }{
		{"append", head, head + "\n" + sec},
		{"empty", "", sec},
		{"replace last", head + "\n## NBD\n\nold\n", head + "\n" + sec},
		{"replace middle", head + "\n## NBD\n\nold\n\n## Other\nkeep\n", head + "\n" + sec + "\n## Other\nkeep\n"},
		{"keeps a hand-written subsection", head + "\n## NBD\n\nold\n### sub\nold sub\n\n## Other\nkeep\n", head + "\n" + sec + "\n### sub\nold sub\n\n## Other\nkeep\n"},
		{"fence", head + "\n## NBD\n```\n## not a heading\n```\n## Other\nkeep\n", head + "\n" + sec + "\n## Other\nkeep\n"},
		{"similar heading", head + "\n## NBD server\nkeep\n", head + "\n## NBD server\nkeep\n\n" + sec},
	} {
		if got := SpliceSection(tc.doc, "## NBD", sec); got != tc.want {
			t.Errorf("%s:\n got %q\nwant %q", tc.name, got, tc.want)
		}
	}
	// A generated subsection is replaced; a hand-written one after it stays.
	gen := "## NBD\n\nnew\n### profile\nnew profile\n"
	old := head + "\n## NBD\n\nold\n### profile\nold profile\n### notes\nmine\n\n## Other\nkeep\n"
	if got, want := SpliceSection(old, "## NBD", gen), head+"\n"+gen+"\n### notes\nmine\n\n## Other\nkeep\n"; got != want {
		t.Errorf("generated subsection:\n got %q\nwant %q", got, want)
	}
	// Replacing twice is stable.
	doc := SpliceSection(head+"\n## Other\nkeep\n", "## NBD", sec)
	if again := SpliceSection(doc, "## NBD", sec); again != doc {
		t.Errorf("not idempotent:\n%q\n%q", doc, again)
	}
}

func TestFormat(t *testing.T) {
	for _, tc := range []struct{ got, want string }{
		{FormatCount(75123.4), "75,123"},
		{FormatCount(1234567), "1,234,567"},
		{FormatCount(512), "512"},
		{FormatCount(42.26), "42.3"},
		{FormatRatio(1.234), "1.23×"},
		{FormatRatio(math.NaN()), "n/a"},
		{FormatMicros(64_200), "64.2 µs"},
		{FormatMicros(240_000), "240 µs"},
		{FormatMicros(1_500_000), "1.5 ms"},
		{ShellJoin([]string{"-note", "8 helpers, noisy", "-runs=3", "it's", ""}), `-note '8 helpers, noisy' -runs=3 'it'\''s' ''`},
	} {
		if tc.got != tc.want {
			t.Errorf("got %q, want %q", tc.got, tc.want)
		}
	}
}

// TestMarkdownVerdicts renders a synthetic report and checks the medians,
// ratios and target verdicts it states.
func TestMarkdownVerdicts(t *testing.T) {
	servers := NBDServers("/x/doppel", "/x/gonbd")
	rows := []Job{NBDRows[0], NBDRows[4]} // seq write 1 MiB (MiB/s), rand read 4 KiB qd1 (IOPS + latency)
	rep := &NBDReport{
		Config: NBDConfig{Servers: servers, Rows: rows, Size: 1 << 30, Runs: 3, Runtime: time.Second},
		Runs:   map[string]map[string][]Result{},
		Failed: map[string]map[string][]string{},
		Argv:   map[string]string{},
	}
	mib := float64(1 << 20)
	rep.Runs[rows[0].Slug] = map[string][]Result{
		"doppel":   {{BW: 900 * mib}, {BW: 1000 * mib}, {BW: 5000 * mib}}, // median 1000
		"nbdkit":   {{BW: 800 * mib}},
		"qemu-nbd": {{BW: 500 * mib}},
		"go-nbd":   {{BW: 400 * mib}},
	}
	rep.Runs[rows[1].Slug] = map[string][]Result{
		"doppel":   {{IOPS: 20000, LatMeanNs: 50000}},
		"nbdkit":   {{IOPS: 25000, LatMeanNs: 40000}},
		"qemu-nbd": {{IOPS: 10000, LatMeanNs: 100000}},
		"go-nbd":   {{IOPS: 30000, LatMeanNs: 33000}},
	}
	rep.Failed[rows[1].Slug] = map[string][]string{"qemu-nbd": {"boom"}}
	md := rep.Markdown("cmd", "noisy")
	for _, want := range []string{
		"| seq write 1 MiB, iodepth 16 | MiB/s | 1,000 | 800 | 500 | 400 | 1.25× | 2.00× | 2.50× |",
		"| rand read 4 KiB, iodepth 1 | IOPS (mean latency) | 20,000 (50.0 µs) | 25,000 (40.0 µs) | 10,000 (100 µs) [1 failed] | 30,000 (33.0 µs) | 0.80× | 2.00× | 0.67× |",
		"doppel ≥ 1.0× nbdkit on every row — **not met** on rand read 4 KiB, iodepth 1;",
		"ahead of go-nbd on every row — **not met** on rand read 4 KiB, iodepth 1.",
		"**Conditions: noisy**",
		"failed: boom",
	} {
		if !strings.Contains(md, want) {
			t.Errorf("report lacks %q:\n%s", want, md)
		}
	}
}

// TestRunNBDAgainstNbdkit runs the real harness, briefly, against nbdkit's
// file plugin: servers start, fio runs, figures are parsed, the report
// renders.
func TestRunNBDAgainstNbdkit(t *testing.T) {
	if testing.Short() {
		t.Skip("runs fio and nbdkit")
	}
	for _, tool := range []string{"fio", "nbdkit"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s not installed (make deps installs it)", tool)
		}
	}
	servers := NBDServers("", "")[1:2]
	rep, err := RunNBD(context.Background(), NBDConfig{
		Servers: servers,
		Rows:    []Job{NBDRows[4], NBDRows[1]},
		Fio:     "fio",
		Dir:     t.TempDir(),
		Size:    16 << 20,
		Runs:    2,
		Runtime: 300 * time.Millisecond,
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, row := range []Job{NBDRows[4], NBDRows[1]} {
		runs := rep.Runs[row.Slug]["nbdkit"]
		if len(runs) != 2 || len(rep.Failed[row.Slug]["nbdkit"]) != 0 {
			t.Fatalf("%s: runs %v, failures %v", row.Slug, runs, rep.Failed[row.Slug])
		}
		for _, r := range runs {
			if r.IOPS <= 0 || r.BW <= 0 || r.LatMeanNs <= 0 || r.IOs <= 0 {
				t.Errorf("%s: implausible result %+v", row.Slug, r)
			}
		}
	}
	if md := rep.Markdown("test", ""); !strings.Contains(md, "| rand read 4 KiB, iodepth 1 | IOPS (mean latency) |") {
		t.Errorf("report:\n%s", md)
	}
}

func TestSummarizeProfile(t *testing.T) {
	top := `File: doppel
Duration: 4.65s, Total samples = 1.23s (26.45%)
Showing nodes accounting for 1.06s, 86.18% of 1.23s total
      flat  flat%   sum%        cum   cum%
     0.82s 66.67% 66.67%      0.82s 66.67%  internal/runtime/syscall/linux.Syscall6
         0     0% 68.29%      0.37s 30.08%  golang.org/x/sys/unix.Pread (inline)
         0     0% 68.29%      0.37s 30.08%  golang.org/x/sys/unix.pread
         0     0% 70.73%      0.25s 20.33%  internal/poll.(*FD).Writev
     0.10s  6.58% 95.39%      0.10s  6.58%  runtime.futex
`
	s := SummarizeProfile(top)
	want := map[string]string{"pread (backend)": "30%", "pwrite (backend)": "0%", "socket writev (replies)": "20%", "futex": "7%"}
	if s.CPU != "26%" {
		t.Errorf("CPU %q", s.CPU)
	}
	for k, v := range want {
		if s.Share[k] != v {
			t.Errorf("%s = %q, want %q", k, s.Share[k], v)
		}
	}
}

func TestProcCPU(t *testing.T) {
	rusage := func() time.Duration {
		var ru syscall.Rusage
		if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
			t.Fatal(err)
		}
		return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
	}
	p0, r0 := ProcCPU(os.Getpid()), rusage()
	// Burn at least 200 ms of CPU, however busy the machine is.
	for x := 0; rusage()-r0 < 200*time.Millisecond; x++ {
	}
	p1, r1 := ProcCPU(os.Getpid()), rusage()
	got, want := p1-p0, r1-r0
	if d := got - want; d < -50*time.Millisecond || d > 50*time.Millisecond {
		t.Errorf("ProcCPU advanced %v while getrusage advanced %v", got, want)
	}
	if ProcCPU(1<<30) != 0 {
		t.Error("CPU of a missing process is not 0")
	}
	var r Result
	r.IOPS = 1000
	r.SetServerCPU(500*time.Millisecond, 2*time.Second)
	if r.ServerCPUShare != 0.25 || r.ServerCPUPerIO != 250*time.Microsecond {
		t.Errorf("SetServerCPU: %v cores, %v per I/O", r.ServerCPUShare, r.ServerCPUPerIO)
	}
}
