package heartbeat

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/doppelha/doppel/daemon/monitor"
)

// Helper processes: this test binary re-executed inside a namespace as a
// heartbeat sender (TestHelperSend) or a monitor (TestHelperWatch). Both
// report on stdout with lines starting "HELPER "; the sender also takes
// commands on stdin. As separate processes they can be stopped (SIGSTOP)
// and given real-time priority (chrt -f 10) independently of the test.

type helper struct {
	cmd   *exec.Cmd
	lines <-chan string
	stdin io.Writer
}

func (l *lab) startHelper(ns string, rt bool, test string, env ...string) *helper {
	return l.startHelperAs(ns, rt, nil, os.Args[0], test, env...)
}

// startHelperAs is startHelper with a command prefix (e.g. setpriv) and
// test binary of its own.
func (l *lab) startHelperAs(ns string, rt bool, prefix []string, bin, test string, env ...string) *helper {
	l.t.Helper()
	args := []string{"netns", "exec", ns}
	if rt {
		args = append(args, "chrt", "-f", "10")
	}
	args = append(append(args, prefix...), bin, "-test.run=^"+test+"$", "-test.v")
	cmd := exec.Command("ip", args...)
	cmd.Env = append(append(os.Environ(), "DOPPEL_PROBE_HELPER=1"), env...)
	out, err := cmd.StdoutPipe()
	if err != nil {
		l.t.Fatal(err)
	}
	in, err := cmd.StdinPipe()
	if err != nil {
		l.t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		l.t.Fatal(err)
	}
	l.t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGCONT)
		cmd.Process.Kill()
		cmd.Wait()
	})
	lines := make(chan string, 100)
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			if s, ok := strings.CutPrefix(sc.Text(), "HELPER "); ok {
				lines <- s
			} else if !strings.HasPrefix(sc.Text(), "=== RUN") {
				fmt.Fprintln(os.Stderr, test+":", sc.Text())
			}
		}
		close(lines)
	}()
	return &helper{cmd: cmd, lines: lines, stdin: in}
}

// helperWatch starts a monitor process in B on B's veth, watching the lab
// job from A with A's key.
func (l *lab) helperWatch(mode Mode, cfg monitor.Config, rt bool) *helper {
	return l.startHelper(l.nsB, rt, "TestHelperWatch",
		"DOPPEL_HELPER_IFACE="+l.vethB, "DOPPEL_HELPER_PEER="+l.addrA.String(), "DOPPEL_HELPER_MODE="+modeName(mode),
		fmt.Sprintf("DOPPEL_HELPER_CFG=%v,%d,%d", cfg.Interval, cfg.Missed, cfg.Rise))
}

// helperSend starts a heartbeat sender process in A at real-time priority,
// as corosync runs its own: it stands for the peer host, which this host's
// load must not starve. It signs as signer, with incarnation inc; with
// replay it sends sequence numbers 1 to 5 over and over (a replay of
// heartbeats already sent with that incarnation).
func (l *lab) helperSend(interval time.Duration, signer string, inc uint64, replay bool) *helper {
	l.t.Helper()
	h := l.startHelper(l.nsA, true, "TestHelperSend",
		fmt.Sprintf("DOPPEL_HELPER_SEND=%s,%v,%s,%s,%s,%d,%v", l.addrB, interval, signer, l.nsA, l.vethA, inc, replay))
	h.expect(l.t, "sending", 10*time.Second) // so that a monitor started next finds it running
	return h
}

// expect waits for the helper's next line, which must start with prefix.
func (h *helper) expect(t testing.TB, prefix string, within time.Duration) []string {
	t.Helper()
	select {
	case s, ok := <-h.lines:
		if !ok {
			t.Fatalf("helper exited, waiting for %q", prefix)
		}
		if !strings.HasPrefix(s, prefix) {
			t.Fatalf("helper said %q, want %q", s, prefix)
		}
		return strings.Fields(s)
	case <-time.After(within):
		t.Fatalf("helper did not say %q within %v", prefix, within)
	}
	return nil
}

// firstUp waits for the helper's first "up": a "down" before it is the
// start-up silence of a loaded machine (the sender not running yet), not
// what a test checks.
func (h *helper) firstUp(t testing.TB, within time.Duration) []string {
	t.Helper()
	deadline := time.After(within)
	for {
		select {
		case s, ok := <-h.lines:
			if !ok {
				t.Fatalf("helper exited, waiting for its first %q", "up ")
			}
			if strings.HasPrefix(s, "up ") {
				return strings.Fields(s)
			}
			if !strings.HasPrefix(s, "down ") {
				t.Fatalf("helper said %q, want %q", s, "up ")
			}
			t.Logf("before the first up (start-up): %s", s)
		case <-deadline:
			t.Fatalf("helper did not say %q within %v", "up ", within)
		}
	}
}

// quiet fails if the helper says anything within d.
func (h *helper) quiet(t testing.TB, d time.Duration) {
	t.Helper()
	select {
	case s := <-h.lines:
		t.Fatalf("helper said %q", s)
	case <-time.After(d):
	}
}

// command sends a command to a sender helper and returns its answer.
func (h *helper) command(t testing.TB, cmd, answer string) []string {
	t.Helper()
	if _, err := fmt.Fprintln(h.stdin, cmd); err != nil {
		t.Fatal(err)
	}
	return h.expect(t, answer, 10*time.Second)
}

func parseNs(t testing.TB, s string) time.Duration {
	t.Helper()
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil {
		t.Fatalf("bad time %q", s)
	}
	return time.Duration(n)
}

// TestHelperSend sends heartbeats every interval. Commands on stdin are
// run right after the next heartbeat left: "cut METHOD" (answers "cut
// <monotonic ns after that heartbeat>"), "restore" ("restored"), "stop"
// ("stopped <ns>", then no more heartbeats).
func TestHelperSend(t *testing.T) {
	if os.Getenv("DOPPEL_PROBE_HELPER") != "1" {
		t.Skip("helper process of the namespace tests")
	}
	f := strings.Split(os.Getenv("DOPPEL_HELPER_SEND"), ",")
	if len(f) != 7 {
		t.Fatalf("bad DOPPEL_HELPER_SEND %q", os.Getenv("DOPPEL_HELPER_SEND"))
	}
	iv, err1 := time.ParseDuration(f[1])
	inc, err2 := strconv.ParseUint(f[5], 10, 64)
	replay, err3 := strconv.ParseBool(f[6])
	if err := errors.Join(err1, err2, err3); err != nil {
		t.Fatal(err)
	}
	l := &lab{t: t, nsA: f[3], vethA: f[4]}
	s, err := newLabSender(t, f[2], inc, Dest{Remote: netip.AddrPortFrom(netip.MustParseAddr(f[0]), Port)})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	send := s.Send
	if replay {
		k := labKey(t, f[2])
		c, err := net.Dial("udp", netip.AddrPortFrom(netip.MustParseAddr(f[0]), Port).String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		var n uint64
		send = func() error {
			n++
			p := Packet{Job: labJobID, Incarnation: inc, Seq: (n-1)%5 + 1, Epoch: 1}
			p.Sign(k)
			b, _ := p.MarshalBinary()
			_, err := c.Write(b)
			return err
		}
	}
	cmds := make(chan string)
	go func() {
		sc := bufio.NewScanner(os.Stdin)
		for sc.Scan() {
			cmds <- sc.Text()
		}
		close(cmds)
	}()
	var restore func() error
	tk := time.NewTicker(iv)
	defer tk.Stop()
	send()
	fmt.Println("HELPER sending")
	for {
		<-tk.C
		send()
		select {
		case c, ok := <-cmds:
			if !ok {
				return
			}
			at := Now()
			switch {
			case strings.HasPrefix(c, "cut "):
				cm, ok := cutMethodByName(strings.TrimPrefix(c, "cut "))
				if !ok {
					fmt.Printf("HELPER error unknown cut %q\n", c)
					continue
				}
				if restore, err = cm.cut(l); err != nil {
					fmt.Printf("HELPER error %v\n", err)
					continue
				}
				fmt.Printf("HELPER cut %d\n", at)
			case c == "restore":
				if err := restore(); err != nil {
					fmt.Printf("HELPER error %v\n", err)
					continue
				}
				fmt.Println("HELPER restored")
			case c == "stop":
				fmt.Printf("HELPER stopped %d\n", at)
				<-t.Context().Done()
				return
			}
		default:
		}
	}
}

// prefixWriter prefixes every write (one slog record) with p.
type prefixWriter struct {
	w io.Writer
	p string
}

func (w prefixWriter) Write(b []byte) (int, error) {
	if _, err := io.WriteString(w.w, w.p+string(b)); err != nil {
		return 0, err
	}
	return len(b), nil
}

// TestHelperWatch runs the probe and monitor.Watch, printing "mode M",
// then "up|down <At ns> <silence ns>" for each change.
func TestHelperWatch(t *testing.T) {
	if os.Getenv("DOPPEL_PROBE_HELPER") != "1" {
		t.Skip("helper process of the namespace tests")
	}
	f := strings.Split(os.Getenv("DOPPEL_HELPER_CFG"), ",")
	if len(f) != 3 {
		t.Fatalf("bad DOPPEL_HELPER_CFG %q", os.Getenv("DOPPEL_HELPER_CFG"))
	}
	iv, err1 := time.ParseDuration(f[0])
	missed, err2 := strconv.Atoi(f[1])
	rise, err3 := strconv.Atoi(f[2])
	if err := errors.Join(err1, err2, err3); err != nil {
		t.Fatal(err)
	}
	mode, err := ParseMode(os.Getenv("DOPPEL_HELPER_MODE"))
	if err != nil {
		t.Fatal(err)
	}
	log := slog.New(slog.NewTextHandler(prefixWriter{os.Stdout, "HELPER log "}, nil))
	p, err := Open(Config{Interfaces: []string{os.Getenv("DOPPEL_HELPER_IFACE")}, Mode: mode, Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	peer := labPeer(netip.MustParseAddr(os.Getenv("DOPPEL_HELPER_PEER")))
	if err := p.Watch(peer, labKey(t, labGood)); err != nil {
		t.Fatal(err)
	}
	m, err := monitor.New(monitor.Config{Interval: iv, Missed: missed, Rise: rise}, []string{"p"}, Now())
	if err != nil {
		t.Fatal(err)
	}
	fmt.Printf("HELPER mode %s\n", p.Mode())
	err = monitor.Watch(t.Context(), m, Now, func(string) (monitor.Sample, error) {
		s, err := p.Stats(peer)
		return monitor.Sample{LastSeen: s.LastSeen, Packets: s.Heartbeats}, err
	}, func(c monitor.Change) {
		st, _ := p.Stats(peer)
		fmt.Printf("HELPER %s %d %d heartbeats=%d seq=%d gaps=%d replays=%d badmac=%d last=%d now=%d\n", c.To, c.At, c.Silence, st.Heartbeats, st.Seq, st.Gaps, st.Replays, st.BadMAC, st.LastSeen, Now())
	})
	if err != nil {
		t.Fatal(err)
	}
}
