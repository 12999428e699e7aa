package main

import (
	"context"
	"errors"
	"io"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/urfave/cli/v2"
)

// runProbeCLI runs the CLI with args and returns its stdout and error.
func runProbeCLI(t *testing.T, args ...string) (string, error) {
	t.Helper()
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	old := os.Stdout
	os.Stdout = w
	out := make(chan string)
	go func() { b, _ := io.ReadAll(r); out <- string(b) }()
	err = run(context.Background(), append([]string{"doppel"}, args...))
	os.Stdout = old
	w.Close()
	return <-out, err
}

func probeFreePort(t *testing.T) string {
	c, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	return strconv.Itoa(c.LocalAddr().(*net.UDPAddr).Port)
}

func probeExitCode(err error) int {
	var ec cli.ExitCoder
	if errors.As(err, &ec) {
		return ec.ExitCode()
	}
	return -1
}

func TestProbeSendCount(t *testing.T) {
	out, err := runProbeCLI(t, "probe", "send", "--to", "127.0.0.1", "--port", probeFreePort(t), "--interval", "5ms", "--count", "3",
		"--job", "web", "--secret", "s3cret", "--sender", "vm1")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out, "sent 3 heartbeats (seq 3, 0 failed writes)") {
		t.Fatalf("output %q", out)
	}
}

// TestProbeWatchExitOnDown: a peer that never sends is declared down after
// interval × missed, and --exit-on-down exits with status 3.
func TestProbeWatchExitOnDown(t *testing.T) {
	out, err := runProbeCLI(t, "probe", "watch", "--mode", "userspace", "--peer", "127.0.0.2", "--port", probeFreePort(t),
		"--interval", "20ms", "--missed", "3", "--exit-on-down", "--job", "web", "--secret", "s3cret", "--sender", "vm1")
	if probeExitCode(err) != exitPeerDown {
		t.Fatalf("err %v (exit code %d), want exit code %d", err, probeExitCode(err), exitPeerDown)
	}
	if !strings.Contains(out, "probe mode: userspace") {
		t.Fatalf("output %q", out)
	}
	// Down after at least interval × missed (60 ms) of silence and at most
	// two intervals more (the detector's window).
	_, after, ok := strings.Cut(out, "peer down: unknown -> down after ")
	if !ok {
		t.Fatalf("no down line in output %q", out)
	}
	silence, err := time.ParseDuration(strings.Fields(after)[0])
	if err != nil {
		t.Fatalf("down line %q: %v", after, err)
	}
	if silence < 60*time.Millisecond || silence > 100*time.Millisecond {
		t.Fatalf("declared down after %v of silence, want 60ms..100ms", silence)
	}
}

func TestProbeUsageErrors(t *testing.T) {
	for _, args := range [][]string{
		{"probe", "watch", "--peer", "not-an-ip", "--job", "web", "--secret", "s", "--sender", "vm1"},
		{"probe", "watch", "--peer", "127.0.0.1", "--mode", "xdp", "--job", "web", "--secret", "s", "--sender", "vm1"},
		{"probe", "watch", "--peer", "127.0.0.1", "--job", "web", "--sender", "vm1"}, // no secret
		{"probe", "send", "--to", "127.0.0.1", "--port", "70000", "--job", "web", "--secret", "s", "--sender", "vm1"},
		{"probe", "send", "--to", "127.0.0.1", "--from", "127.0.0.1,127.0.0.2", "--job", "web", "--secret", "s", "--sender", "vm1"},
	} {
		if _, err := runProbeCLI(t, args...); probeExitCode(err) != exitUsage {
			t.Errorf("%v: %v (exit code %d), want a usage error", args, err, probeExitCode(err))
		}
	}
}

// TestProbeSendWatch: heartbeats sent with the job's secret as vm1 bring
// the peer up in a watcher that expects vm1's key; signed as anyone else
// they are counted as bad MACs and the peer is declared down.
func TestProbeSendWatch(t *testing.T) {
	for _, tc := range []struct {
		sender, want string
	}{{"vm1", "peer up"}, {"vm9", "bad-mac "}} {
		t.Run(tc.sender, func(t *testing.T) {
			port := probeFreePort(t)
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			// The sender is a process of its own: two CLI apps in one
			// process share urfave/cli's global flags (a data race).
			exe, err := os.Executable()
			if err != nil {
				t.Fatal(err)
			}
			send := exec.CommandContext(ctx, exe, "doppel", "probe", "send", "--to", "127.0.0.1", "--port", port, "--interval", "10ms",
				"--job", "web", "--secret", "s3cret", "--sender", tc.sender)
			send.Env = append(os.Environ(), childEnv+"=1")
			if err := send.Start(); err != nil {
				t.Fatal(err)
			}
			time.AfterFunc(500*time.Millisecond, cancel) // then the watcher declares the peer down and exits
			out, err := runProbeCLI(t, "probe", "watch", "--mode", "userspace", "--peer", "127.0.0.1", "--port", port,
				"--interval", "10ms", "--missed", "30", "--rise", "1", "--exit-on-down", "--job", "web", "--secret", "s3cret", "--sender", "vm1")
			cancel()
			_ = send.Wait() // killed by the cancel
			switch tc.sender {
			case "vm1":
				if probeExitCode(err) != exitPeerDown || !strings.Contains(out, "peer up") || !strings.Contains(out, "bad-mac 0") {
					t.Fatalf("heartbeats of vm1 did not bring the peer up: %v\n%s", err, out)
				}
			default:
				if probeExitCode(err) != exitPeerDown || strings.Contains(out, "peer up") || strings.Contains(out, "bad-mac 0") {
					t.Fatalf("heartbeats signed by %s: %v\n%s", tc.sender, err, out)
				}
			}
		})
	}
}
