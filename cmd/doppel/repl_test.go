package main

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/doppelha/doppel/daemon/repl"
)

func replFreePort(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

func replWaitSocket(t *testing.T, network, addr string, done <-chan error) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		if c, err := net.Dial(network, addr); err == nil {
			c.Close()
			return
		}
		select {
		case err := <-done:
			t.Fatalf("command exited before listening on %s: %v", addr, err)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("nothing listens on %s %s", network, addr)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func replMetric(t *testing.T, addr, name string) float64 {
	t.Helper()
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	m := regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(name) + ` (\S+)$`).FindSubmatch(body)
	if m == nil {
		t.Fatalf("metric %s not found in:\n%s", name, body)
	}
	v, _ := strconv.ParseFloat(string(m[1]), 64)
	return v
}

// TestReplFioEndToEnd runs `doppel repl target` and `doppel repl source`
// over real TCP with pinned TLS certificates, writes with fio's nbd engine
// (verify=crc32c) into the source's socket, stops both, and compares the
// files with cmp; in both modes, with the bare engine and with the
// persistent state (--state-dir on both sides: activity log, bitmap, the
// memory → disk queue), as the agent runs it.
func TestReplFioEndToEnd(t *testing.T) {
	if testing.Short() {
		t.Skip("fio end to end: not in -short")
	}
	fio, err := exec.LookPath("fio")
	if err != nil {
		t.Skip("fio is not installed (test/deps.sh installs it)")
	}
	if out, _ := exec.Command(fio, "--enghelp=nbd").CombinedOutput(); !strings.Contains(string(out), "uri") {
		t.Skip("this fio has no nbd engine")
	}
	for _, name := range []string{"sync", "async", "sync+state", "async+state"} {
		mode, stateful := strings.CutSuffix(name, "+state")
		t.Run(name, func(t *testing.T) {
			dir := t.TempDir()
			srcCerts, tgtCerts := filepath.Join(dir, "src-tls"), filepath.Join(dir, "tgt-tls")
			_, srcFP, err := repl.LoadOrCreateCert(srcCerts)
			if err != nil {
				t.Fatal(err)
			}
			_, tgtFP, err := repl.LoadOrCreateCert(tgtCerts)
			if err != nil {
				t.Fatal(err)
			}
			srcFile, tgtFile := filepath.Join(dir, "src.img"), filepath.Join(dir, "tgt.img")
			sock := filepath.Join(dir, "nbd.sock")
			replAddr, srcMetrics := replFreePort(t), replFreePort(t)

			tctx, tcancel := context.WithCancel(context.Background())
			defer tcancel()
			tdone := make(chan error, 1)
			tArgs := []string{"doppel", "repl", "target", "--file", tgtFile, "--size", "64M",
				"--listen", "tcp:" + replAddr, "--cert-dir", tgtCerts, "--peer-fingerprint", srcFP}
			tgtStateFile := tgtFile + ".repl-target.json"
			if stateful {
				tArgs = append(tArgs, "--state-dir", filepath.Join(dir, "tgt.state"))
				tgtStateFile = filepath.Join(dir, "tgt.state", "repl-target.json")
			}
			go func() { tdone <- run(tctx, tArgs) }()
			replWaitSocket(t, "tcp", replAddr, tdone)
			sctx, scancel := context.WithCancel(context.Background())
			defer scancel()
			sdone := make(chan error, 1)
			sArgs := []string{"doppel", "repl", "source", "--file", srcFile, "--size", "64M",
				"--listen", "unix:" + sock, "--target", "tcp:" + replAddr, "--mode", mode, "--mirror", "full",
				"--cert-dir", srcCerts, "--peer-fingerprint", tgtFP, "--compress", "lz4",
				"--metrics-listen", srcMetrics}
			if stateful {
				sArgs = append(sArgs, "--state-dir", filepath.Join(dir, "src.state"))
			}
			go func() { sdone <- run(sctx, sArgs) }()
			replWaitSocket(t, "unix", sock, sdone)

			uri := "nbd+unix:///?socket=" + sock
			for _, job := range [][]string{
				{"--rw=randwrite", "--bs=4k", "--iodepth=16", "--io_size=16M"},
				{"--rw=write", "--bs=1M", "--iodepth=4", "--io_size=32M"},
				{"--rw=randtrim", "--bs=64k", "--iodepth=4", "--io_size=4M"},
			} {
				args := append([]string{"--name=repl", "--ioengine=nbd", "--uri=" + uri, "--size=64M",
					"--verify=crc32c", "--do_verify=1", "--randrepeat=0", "--output-format=terse"}, job...)
				if strings.Contains(job[0], "trim") {
					args = replWithout(args, "--verify=crc32c", "--do_verify=1")
				}
				cmd := exec.Command(fio, args...)
				cmd.Dir = t.TempDir() // fio writes its verify state files in its working directory
				if out, err := cmd.CombinedOutput(); err != nil {
					t.Fatalf("fio %v: %v\n%s", job, err, out)
				}
			}
			if v := replMetric(t, srcMetrics, `doppel_repl_payload_bytes_total{kind="write"}`); v < 48<<20 {
				t.Errorf("only %v write bytes replicated", v)
			}
			if v := replMetric(t, srcMetrics, `doppel_repl_target_data_state{state="consistent"}`); v != 1 {
				t.Errorf("target data state consistent = %v", v)
			}
			scancel()
			if err := <-sdone; err != nil {
				t.Fatalf("source: %v", err)
			}
			tcancel()
			if err := <-tdone; err != nil {
				t.Fatalf("target: %v", err)
			}
			if out, err := exec.Command("cmp", srcFile, tgtFile).CombinedOutput(); err != nil {
				t.Fatalf("cmp: %v: %s", err, out)
			}
			state, err := os.ReadFile(tgtStateFile)
			if err != nil || !strings.Contains(string(state), `"consistent"`) {
				t.Fatalf("target state: %s %v", state, err)
			}
		})
	}
}

func replWithout(s []string, drop ...string) []string {
	var out []string
	for _, v := range s {
		keep := true
		for _, d := range drop {
			keep = keep && v != d
		}
		if keep {
			out = append(out, v)
		}
	}
	return out
}

func TestReplRejectsBadInput(t *testing.T) {
	dir := t.TempDir()
	f := filepath.Join(dir, "v.img")
	for _, args := range [][]string{
		{"source", "--file", f, "--size", "1M", "--listen", "unix:" + dir + "/s", "--target", "tcp:127.0.0.1:1", "--mode", "sync"}, // no pin, no --insecure
		{"source", "--file", f, "--size", "1M", "--listen", "unix:" + dir + "/s", "--target", "tcp:127.0.0.1:1", "--mode", "fast", "--insecure"},
		{"source", "--file", f, "--size", "1M", "--listen", "unix:" + dir + "/s", "--target", "unix:/x", "--mode", "sync", "--insecure"},
		{"source", "--file", f, "--size", "1M", "--listen", "unix:" + dir + "/s", "--target", "tcp:127.0.0.1:1", "--mode", "sync", "--insecure", "--mirror", "half"},
		{"source", "--file", f, "--size", "1M", "--listen", "unix:" + dir + "/s", "--target", "tcp:127.0.0.1:1", "--mode", "sync", "--insecure", "--compress", "gzip"},
		{"source", "--file", f, "--size", "1M", "--listen", "unix:" + dir + "/s", "--target", "tcp:127.0.0.1:1", "--mode", "sync", "--peer-fingerprint", "abc"},
		{"target", "--file", f, "--listen", "tcp:127.0.0.1:0", "--insecure"}, // missing file, no size
		{"target", "--file", f, "--size", "1M", "--listen", "unix:/x", "--insecure"},
	} {
		err := run(context.Background(), append([]string{"doppel", "repl"}, args...))
		var ec cli.ExitCoder
		if !errors.As(err, &ec) || ec.ExitCode() != exitUsage {
			t.Errorf("%v: err = %v, want a usage error", args, err)
		}
	}
	if _, err := os.Stat(f); err == nil {
		t.Error("a refused command created the volume file")
	}
}

func TestReplFingerprint(t *testing.T) {
	dir := t.TempDir()
	var out strings.Builder
	app := &cli.App{Writer: &out, Commands: []*cli.Command{replCommand()}}
	if err := app.Run([]string{"doppel", "repl", "fingerprint", "--cert-dir", dir}); err != nil {
		t.Fatal(err)
	}
	_, fp, err := repl.LoadOrCreateCert(dir)
	if err != nil {
		t.Fatal(err)
	}
	if got := strings.TrimSpace(out.String()); got != fp {
		t.Fatalf("printed %q, want %q", got, fp)
	}
}

// fakeDrain records the shutdown's calls.
type fakeDrain struct {
	onFail   func()
	failed   bool
	drained  bool
	drainErr error
}

func (f *fakeDrain) failWaiters() {
	f.failed = true
	if f.onFail != nil {
		f.onFail()
	}
}

func (f *fakeDrain) drain(ctx context.Context, _ *slog.Logger) error {
	f.drained = true
	return f.drainErr
}

// TestReplShutdown: the shutdown shared by `repl source` with and without
// a state dir.
func TestReplShutdown(t *testing.T) {
	log := slog.New(slog.DiscardHandler)
	type run struct {
		runErr, nbdErr    chan error
		nbdStop, linkStop bool
	}
	start := func(nbdStops bool) (*run, func(), func()) {
		r := &run{runErr: make(chan error, 1), nbdErr: make(chan error, 1)}
		stopNBD := func() {
			r.nbdStop = true
			if nbdStops {
				r.nbdErr <- nil
			}
		}
		stopLink := func() { r.linkStop = true; r.runErr <- nil }
		return r, stopNBD, stopLink
	}
	t.Run("clean", func(t *testing.T) {
		r, stopNBD, stopLink := start(true)
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		d := &fakeDrain{}
		if err := shutdownSource(ctx, log, time.Minute, d, r.runErr, r.nbdErr, stopNBD, stopLink); err != nil {
			t.Fatal(err)
		}
		if !r.nbdStop || !r.linkStop || !d.drained || d.failed {
			t.Fatalf("nbd stopped %v, link stopped %v, drained %v, waiters failed %v", r.nbdStop, r.linkStop, d.drained, d.failed)
		}
	})
	t.Run("stuck-writes", func(t *testing.T) {
		r, stopNBD, stopLink := start(false)
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		d := &fakeDrain{drainErr: errors.New("drain: target applied up to 1 of 2")}
		d.onFail = func() { r.nbdErr <- nil } // the stuck writes return: the server stops
		begin := time.Now()
		err := shutdownSource(ctx, log, 100*time.Millisecond, d, r.runErr, r.nbdErr, stopNBD, stopLink)
		if !d.failed || time.Since(begin) < 100*time.Millisecond {
			t.Fatalf("waiters failed %v after %v: want after the drain timeout", d.failed, time.Since(begin))
		}
		if err == nil || !strings.Contains(err.Error(), "drain") || !r.linkStop {
			t.Fatalf("want the drain error and the link stopped, got %v (link stopped %v)", err, r.linkStop)
		}
	})
	t.Run("replication-fails", func(t *testing.T) {
		r, stopNBD, _ := start(true)
		boom := errors.New("replication refused: split brain")
		r.runErr <- boom
		d := &fakeDrain{}
		stopLink := func() { r.linkStop = true } // Run already returned
		err := shutdownSource(context.Background(), log, time.Minute, d, r.runErr, r.nbdErr, stopNBD, stopLink)
		if !errors.Is(err, boom) || !r.nbdStop || d.drained {
			t.Fatalf("got %v (nbd stopped %v, drained %v): want the replication error, no drain", err, r.nbdStop, d.drained)
		}
	})
	t.Run("nbd-fails", func(t *testing.T) {
		r, stopNBD, stopLink := start(false)
		r.nbdErr <- errors.New("accept: too many files")
		d := &fakeDrain{}
		err := shutdownSource(context.Background(), log, time.Minute, d, r.runErr, r.nbdErr, stopNBD, stopLink)
		if err == nil || !strings.Contains(err.Error(), "nbd server: accept") || d.drained || !r.linkStop {
			t.Fatalf("got %v (drained %v, link stopped %v)", err, d.drained, r.linkStop)
		}
	})
}

// TestReplDiscardOnSourceHint: --discard-on source is refused with the two
// commands that swap the roles (replstate's TestSplitBrainDiscardSource
// runs that path).
func TestReplDiscardOnSourceHint(t *testing.T) {
	dir := t.TempDir()
	f, sd := filepath.Join(dir, "v.img"), filepath.Join(dir, "state")
	for _, tc := range []struct {
		args []string
		want []string
	}{
		{[]string{"source", "--file", f, "--size", "1M", "--listen", "unix:" + dir + "/s", "--target", "tcp:10.0.0.2:7000", "--mode", "sync",
			"--insecure", "--state-dir", sd, "--discard-on", "source"},
			[]string{"doppel repl target --file " + f + " --state-dir " + sd + " --listen tcp:0.0.0.0:7000 --discard-on target --insecure",
				"on the peer (tcp:10.0.0.2:7000)", "doppel repl source --file PEER_FILE --state-dir PEER_STATE_DIR --listen NBD_ADDR --target tcp:THIS_HOST:7000 --mode sync --insecure"}},
		{[]string{"target", "--file", f, "--size", "1M", "--listen", "tcp:0.0.0.0:7001", "--peer-fingerprint", "ab12", "--cert-dir", dir,
			"--state-dir", sd, "--discard-on", "source"},
			[]string{"doppel repl target --file SOURCE_FILE --state-dir SOURCE_STATE_DIR --listen tcp:0.0.0.0:7001 --discard-on target --peer-fingerprint HERE_FINGERPRINT",
				"HERE_FINGERPRINT: the output of `doppel repl fingerprint --cert-dir " + dir + "` on this host",
				"doppel repl source --file " + f + " --state-dir " + sd + " --listen NBD_ADDR --target tcp:SOURCE_HOST:7001 --mode MODE --cert-dir " + dir + " --peer-fingerprint ab12"}},
	} {
		err := run(context.Background(), append([]string{"doppel", "repl"}, tc.args...))
		var ec cli.ExitCoder
		if !errors.As(err, &ec) || ec.ExitCode() != exitUsage {
			t.Fatalf("%v: err = %v, want a usage error", tc.args, err)
		}
		for _, w := range tc.want {
			if !strings.Contains(err.Error(), w) {
				t.Errorf("%s: the hint lacks %q:\n%v", tc.args[0], w, err)
			}
		}
	}
	if _, err := os.Stat(f); err == nil {
		t.Error("a refused command created the volume file")
	}
}
