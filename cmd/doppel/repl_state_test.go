package main

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// The state tests run doppel as real processes (kill -9 needs a process):
// the test binary re-executes itself as `doppel` when this is set.
const childEnv = "DOPPEL_REPL_STATE_CHILD"

func init() {
	if os.Getenv(childEnv) != "1" {
		return
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:])
	stop()
	if err != nil {
		fmt.Fprintln(os.Stderr, "doppel:", err)
		os.Exit(1)
	}
	os.Exit(0)
}

type proc struct {
	t   *testing.T
	cmd *exec.Cmd
	log *os.File
	out string
}

func startProc(t *testing.T, name string, args ...string) *proc {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	logPath := filepath.Join(t.TempDir(), name+".log")
	f, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(exe, append([]string{"doppel", "repl"}, args...)...)
	cmd.Env = append(os.Environ(), childEnv+"=1")
	cmd.Stdout, cmd.Stderr = f, f
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	p := &proc{t: t, cmd: cmd, log: f, out: logPath}
	t.Cleanup(func() {
		if cmd.ProcessState == nil {
			cmd.Process.Kill()
			cmd.Wait()
		}
		if t.Failed() {
			b, _ := os.ReadFile(logPath)
			t.Logf("%s log:\n%s", name, tail(string(b), 4000))
		}
	})
	return p
}

func tail(s string, n int) string {
	if len(s) > n {
		return s[len(s)-n:]
	}
	return s
}

func (p *proc) kill9() {
	p.cmd.Process.Signal(syscall.SIGKILL)
	p.cmd.Wait()
}

func (p *proc) stop() {
	p.t.Helper()
	p.cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan error, 1)
	go func() { done <- p.cmd.Wait() }()
	select {
	case err := <-done:
		if err != nil {
			b, _ := os.ReadFile(p.out)
			p.t.Fatalf("%v exited: %v\n%s", p.cmd.Args[2:4], err, tail(string(b), 3000))
		}
	case <-time.After(90 * time.Second):
		p.cmd.Process.Kill()
		p.t.Fatalf("%v did not stop", p.cmd.Args[2:4])
	}
}

func metrics(t *testing.T, addr string) map[string]float64 {
	t.Helper()
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		return nil
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	m := map[string]float64{}
	for _, l := range regexp.MustCompile(`(?m)^(\S+) (\S+)$`).FindAllStringSubmatch(string(body), -1) {
		v, _ := strconv.ParseFloat(l[2], 64)
		m[l[1]] = v
	}
	return m
}

// waitSynced waits until the source reports nothing dirty, nothing queued,
// no resync, and a consistent target.
func waitSynced(t *testing.T, addr string, timeout time.Duration) map[string]float64 {
	t.Helper()
	deadline := time.Now().Add(timeout)
	var m map[string]float64
	for time.Now().Before(deadline) {
		m = metrics(t, addr)
		if m != nil && m["doppel_repl_dirty_bytes"] == 0 && m["doppel_repl_resync_active"] == 0 &&
			m["doppel_repl_queue_memory_bytes"] == 0 && m["doppel_repl_queue_disk_bytes"] == 0 &&
			m["doppel_repl_tracking"] == 0 && m[`doppel_repl_target_data_state{state="consistent"}`] == 1 &&
			m["doppel_repl_queue_overflow"] == 0 {
			return m
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Fatalf("source never synced: %v", pick(m, "doppel_repl_"))
	return nil
}

func pick(m map[string]float64, prefix string) map[string]float64 {
	out := map[string]float64{}
	for k, v := range m {
		if strings.HasPrefix(k, prefix) && !strings.Contains(k, "bucket") {
			out[k] = v
		}
	}
	return out
}

func needFio(t *testing.T) string {
	t.Helper()
	if testing.Short() {
		t.Skip("real-process resilience test: not in -short")
	}
	fio, err := exec.LookPath("fio")
	if err != nil {
		t.Skip("fio is not installed (test/deps.sh installs it)")
	}
	if out, _ := exec.Command(fio, "--enghelp=nbd").CombinedOutput(); !strings.Contains(string(out), "uri") {
		t.Skip("this fio has no nbd engine")
	}
	return fio
}

func fioWrite(t *testing.T, fio, sock string, extra ...string) error {
	args := append([]string{"--name=w", "--ioengine=nbd", "--uri=nbd+unix:///?socket=" + sock, "--rw=randwrite",
		"--bs=64k", "--iodepth=8", "--randrepeat=0", "--output-format=terse"}, extra...)
	out, err := exec.Command(fio, args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("fio %v: %v\n%s", extra, err, tail(string(out), 2000))
	}
	return nil
}

type stateRig struct {
	t                        *testing.T
	dir                      string
	srcFile, tgtFile         string
	srcState, tgtState, sock string
	replAddr, mAddr          string
	size                     string
	srcArgs                  []string
}

func newRig(t *testing.T, size string, srcArgs ...string) *stateRig {
	dir := t.TempDir()
	return &stateRig{t: t, dir: dir, srcFile: filepath.Join(dir, "src.img"), tgtFile: filepath.Join(dir, "tgt.img"),
		srcState: filepath.Join(dir, "src.state"), tgtState: filepath.Join(dir, "tgt.state"), sock: filepath.Join(dir, "nbd.sock"),
		replAddr: replFreePort(t), mAddr: replFreePort(t), size: size, srcArgs: srcArgs}
}

func (r *stateRig) target() *proc {
	p := startProc(r.t, "target", "target", "--file", r.tgtFile, "--size", r.size, "--listen", "tcp:"+r.replAddr,
		"--state-dir", r.tgtState, "--insecure")
	replWaitSocket(r.t, "tcp", r.replAddr, nil)
	return p
}

func (r *stateRig) source() *proc {
	os.Remove(r.sock)
	p := startProc(r.t, "source", append([]string{"source", "--file", r.srcFile, "--size", r.size, "--listen", "unix:" + r.sock,
		"--target", "tcp:" + r.replAddr, "--state-dir", r.srcState, "--insecure", "--metrics-listen", r.mAddr}, r.srcArgs...)...)
	replWaitSocket(r.t, "unix", r.sock, nil)
	return p
}

func (r *stateRig) cmp() {
	r.t.Helper()
	if out, err := exec.Command("cmp", r.srcFile, r.tgtFile).CombinedOutput(); err != nil {
		r.t.Fatalf("images differ: %v: %s", err, out)
	}
}

// TestReplStateKillTarget: kill -9 the target during fio writes, keep
// writing 64 MiB, restart it: the resync sends at most 1.1 × the dirty
// chunks' bytes and the images end identical. The memory queue is lowered
// to 8 MiB without a disk queue so that most of the 64 MiB lands in the
// bitmap (the resync is what this measures).
func TestReplStateKillTarget(t *testing.T) {
	fio := needFio(t)
	r := newRig(t, "256M", "--mode", "async", "--queue-size", "8M", "--disk-queue-size", "0")
	tgt := r.target()
	src := r.source()
	if err := fioWrite(t, fio, r.sock, "--size=256M", "--io_size=16M"); err != nil {
		t.Fatal(err)
	}
	waitSynced(t, r.mAddr, 60*time.Second)
	errc := make(chan error, 1)
	go func() { errc <- fioWrite(t, fio, r.sock, "--size=256M", "--io_size=80M") }()
	time.Sleep(300 * time.Millisecond)
	tgt.kill9()
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	m0 := metrics(t, r.mAddr)
	tgt = r.target()
	m := waitSynced(t, r.mAddr, 90*time.Second)
	sent := m["doppel_repl_resync_sent_bytes_total"] - m0["doppel_repl_resync_sent_bytes_total"]
	sched := m["doppel_repl_resync_scheduled_bytes_total"] - m0["doppel_repl_resync_scheduled_bytes_total"]
	src.stop()
	tgt.stop()
	r.cmp()
	t.Logf("dirty at restart %.0f bytes; resync scheduled %.0f bytes (dirty chunks), sent %.0f bytes: %.3f ×",
		m0["doppel_repl_dirty_bytes"], sched, sent, sent/sched)
	if sched < 16<<20 {
		t.Fatalf("only %.0f dirty bytes resynced: the test did not exercise the bitmap", sched)
	}
	if sent > 1.1*sched {
		t.Fatalf("resync sent %.0f bytes for %.0f dirty (> 1.1 ×)", sent, sched)
	}
}

// TestReplStateKillSource: kill -9 the source mid-write and restart it:
// only the dirty chunks and the hot extents are resynced, and the images
// end identical. A large region (256 MiB) is written and replicated first
// and left to cool (the activity log is cleaned while idle); then a small
// region (16 MiB, elsewhere on the 1 GiB volume) is rewritten in a loop and
// the source killed: the resync must cover the hot region, not the 256 MiB.
func TestReplStateKillSource(t *testing.T) {
	fio := needFio(t)
	const hotOff, hotSize, coldSize = 512 << 20, 16 << 20, 256 << 20
	r := newRig(t, "1G", "--mode", "async")
	tgt := r.target()
	src := r.source()
	if err := fioWrite(t, fio, r.sock, "--rw=write", "--bs=1M", fmt.Sprintf("--size=%d", coldSize)); err != nil {
		t.Fatal(err)
	}
	waitSynced(t, r.mAddr, 120*time.Second)
	// Idle extents are cooled every 2 s while connected.
	for deadline := time.Now().Add(30 * time.Second); metrics(t, r.mAddr)["doppel_repl_hot_extents"] > 0; {
		if time.Now().After(deadline) {
			t.Fatalf("extents still hot after the large write replicated: %v", pick(metrics(t, r.mAddr), "doppel_repl_"))
		}
		time.Sleep(100 * time.Millisecond)
	}
	errc := make(chan error, 1)
	go func() {
		errc <- fioWrite(t, fio, r.sock, fmt.Sprintf("--offset=%d", hotOff), fmt.Sprintf("--size=%d", hotSize), "--io_size=4G")
	}()
	time.Sleep(1500 * time.Millisecond)
	src.kill9()
	<-errc // fio fails: its server died
	src = r.source()
	m := waitSynced(t, r.mAddr, 90*time.Second)
	src.stop()
	tgt.stop()
	r.cmp()
	open, hot, sched := m["doppel_repl_open_dirty_bytes"], m["doppel_repl_open_hot_extents"], m["doppel_repl_resync_scheduled_bytes_total"]
	const extent = 4 << 20
	t.Logf("after kill -9: %.0f hot extents, %.0f dirty+hot bytes at open; resync scheduled %.0f bytes (%d MiB written and replicated before, %d MiB hot region)",
		hot, open, sched, coldSize>>20, hotSize>>20)
	if open == 0 || hot == 0 {
		t.Fatalf("the restart found nothing hot or dirty (%v hot, %v dirty): the crash was not mid-write", hot, open)
	}
	// The resync is the dirty + hot set, and that set is the hot region
	// (4 MiB extents: 16 MiB at a 4 MiB boundary), not what was written.
	if sched > open {
		t.Fatalf("resync scheduled %.0f bytes, more than the %.0f dirty + hot bytes", sched, open)
	}
	if open > hotSize || hot*extent > hotSize {
		t.Fatalf("%.0f dirty+hot bytes, %.0f hot extents: more than the %d-byte hot region (the replicated %d bytes leaked in)", open, hot, hotSize, coldSize)
	}
}

func rssKiB(pid int) int64 {
	b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	m := regexp.MustCompile(`VmRSS:\s+(\d+) kB`).FindSubmatch(b)
	if m == nil {
		return 0
	}
	v, _ := strconv.ParseInt(string(m[1]), 10, 64)
	return v
}

func dirBytes(dir string) int64 {
	var n int64
	filepath.Walk(dir, func(_ string, fi os.FileInfo, err error) error {
		if err == nil && !fi.IsDir() {
			n += fi.Size()
		}
		return nil
	})
	return n
}

// TestReplStateMemoryBound: the target stalled (SIGSTOP) while the source
// writes 4 × the memory queue in async mode: the source's RSS stays under
// 128 MiB + memory queue + 64 MiB, the disk queue under its limit, and
// everything converges after SIGCONT. The memory queue is lowered to 32 MiB
// (bound: 224 MiB) and the disk queue to 64 MiB.
func TestReplStateMemoryBound(t *testing.T) {
	fio := needFio(t)
	const memQ, diskQ = 32 << 20, 64 << 20
	r := newRig(t, "512M", "--mode", "async", "--queue-size", "32M", "--disk-queue-size", "64M")
	tgt := r.target()
	src := r.source()
	waitSynced(t, r.mAddr, 120*time.Second)
	tgt.cmd.Process.Signal(syscall.SIGSTOP)
	stopped := true
	defer func() {
		if stopped {
			tgt.cmd.Process.Signal(syscall.SIGCONT)
		}
	}()
	errc := make(chan error, 1)
	go func() { errc <- fioWrite(t, fio, r.sock, "--size=512M", fmt.Sprintf("--io_size=%d", 4*memQ)) }()
	var maxRSS, maxDisk, maxDiskMetric int64
	qdir := filepath.Join(r.srcState, "queue")
	for done := false; !done; {
		select {
		case err := <-errc:
			if err != nil {
				t.Fatal(err)
			}
			done = true
		case <-time.After(50 * time.Millisecond):
		}
		maxRSS = max(maxRSS, rssKiB(src.cmd.Process.Pid)<<10)
		maxDisk = max(maxDisk, dirBytes(qdir))
		if m := metrics(t, r.mAddr); m != nil {
			maxDiskMetric = max(maxDiskMetric, int64(m["doppel_repl_queue_disk_bytes"]))
		}
	}
	m := metrics(t, r.mAddr)
	tgt.cmd.Process.Signal(syscall.SIGCONT)
	stopped = false
	waitSynced(t, r.mAddr, 120*time.Second)
	src.stop()
	tgt.stop()
	r.cmp()
	bound := int64(128<<20 + memQ + 64<<20)
	t.Logf("wrote %d MiB with the target stopped: max source RSS %.1f MiB (bound %d MiB), max disk queue %.1f MiB on disk / %.1f MiB metric (limit %d MiB), overflowed %v, dirty %.0f bytes",
		4*memQ>>20, float64(maxRSS)/(1<<20), bound>>20, float64(maxDisk)/(1<<20), float64(maxDiskMetric)/(1<<20), diskQ>>20,
		m["doppel_repl_queue_overflow"] == 1, m["doppel_repl_dirty_bytes"])
	if maxRSS >= bound {
		t.Fatalf("source RSS %d bytes ≥ bound %d", maxRSS, bound)
	}
	if maxDisk > diskQ+(4<<20) || maxDiskMetric > diskQ {
		t.Fatalf("disk queue reached %d bytes on disk (%d metric), limit %d", maxDisk, maxDiskMetric, diskQ)
	}
}

// TestReplStateSplitBrain: both sides written while partitioned (the
// target promoted by running it as a source) → the source refuses with a
// clear message; with --discard-on target the target's divergent chunks
// are saved (exactly them), then the images converge.
func TestReplStateSplitBrain(t *testing.T) {
	fio := needFio(t)
	r := newRig(t, "64M", "--mode", "async")
	tgt := r.target()
	src := r.source()
	if err := fioWrite(t, fio, r.sock, "--size=16M", "--io_size=4M"); err != nil {
		t.Fatal(err)
	}
	waitSynced(t, r.mAddr, 60*time.Second)
	tgt.stop()
	if err := fioWrite(t, fio, r.sock, "--size=16M", "--io_size=1M"); err != nil {
		t.Fatal(err)
	}
	src.stop()

	// The target is promoted: it serves and writes 2 MiB at 32 MiB.
	bSock := filepath.Join(r.dir, "b.sock")
	b := startProc(t, "promoted", "source", "--file", r.tgtFile, "--listen", "unix:"+bSock, "--target", "tcp:"+replFreePort(t),
		"--state-dir", r.tgtState, "--insecure", "--mode", "async")
	replWaitSocket(t, "unix", bSock, nil)
	if err := fioWrite(t, fio, bSock, "--rw=write", "--offset=32M", "--size=2M"); err != nil {
		t.Fatal(err)
	}
	b.stop()
	before, err := os.ReadFile(r.tgtFile)
	if err != nil {
		t.Fatal(err)
	}

	tgt = r.target()
	// Not r.source(): the refusal may come before the socket is seen.
	os.Remove(r.sock)
	src = startProc(t, "source-refused", append([]string{"source", "--file", r.srcFile, "--listen", "unix:" + r.sock,
		"--target", "tcp:" + r.replAddr, "--state-dir", r.srcState, "--insecure"}, r.srcArgs...)...)
	done := make(chan error, 1)
	go func() { done <- src.cmd.Wait() }()
	select {
	case err := <-done:
		if err == nil {
			t.Fatal("the source accepted a split brain")
		}
	case <-time.After(30 * time.Second):
		t.Fatal("split brain not detected")
	}
	log, _ := os.ReadFile(src.out)
	if !strings.Contains(string(log), "split brain: both sides wrote after generation") || !strings.Contains(string(log), "--discard-on target") {
		t.Fatalf("no clear split-brain message:\n%s", tail(string(log), 3000))
	}
	if m := regexp.MustCompile(`replication refused[^\n]*`).Find(log); m != nil {
		t.Logf("source: %s", m)
	}

	os.Remove(r.sock)
	src = startProc(t, "source-discard", append([]string{"source", "--file", r.srcFile, "--listen", "unix:" + r.sock,
		"--target", "tcp:" + r.replAddr, "--state-dir", r.srcState, "--insecure", "--metrics-listen", r.mAddr, "--discard-on", "target"}, r.srcArgs...)...)
	waitSynced(t, r.mAddr, 60*time.Second)
	src.stop()
	tgt.stop()
	r.cmp()
	saves, _ := filepath.Glob(filepath.Join(r.tgtState, "splitbrain-*.img"))
	if len(saves) != 1 {
		t.Fatalf("want one split-brain save, got %v", saves)
	}
	ranges, err := os.ReadFile(saves[0] + ".ranges")
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("saved %s:\n%s", filepath.Base(saves[0]), ranges)
	if !strings.Contains(string(ranges), fmt.Sprint(32<<20)) || strings.Count(strings.TrimSpace(string(ranges)), "\n") > 2 {
		t.Fatalf("ranges are not exactly the target's divergent 2 MiB at 32 MiB:\n%s", ranges)
	}
	saved, _ := os.ReadFile(saves[0])
	if string(saved[32<<20:34<<20]) != string(before[32<<20:34<<20]) {
		t.Fatal("the save does not hold the target's divergent data")
	}
	for i, c := range saved[:32<<20] {
		if c != 0 {
			t.Fatalf("the save holds data at %d, outside the divergent chunks", i)
		}
	}
}
