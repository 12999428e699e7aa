package ebpf

import (
	"bufio"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/doppelha/doppel/daemon/monitor"
)

// The namespace tier. Defaults keep `go test ./ebpf/...` short; the full
// runs behind bench/RESULTS.md are:
//
//	DOPPEL_PROBE_TRIALS=20 DOPPEL_PROBE_CONFIGS=250ms*8,50ms*3 DOPPEL_PROBE_REPORT=/tmp/probe.md \
//	  go test -v -count=1 -timeout 60m -run 'TestDetect' ./ebpf/
//	DOPPEL_PROBE_SOAK=2m go test -v -count=1 -timeout 30m -run 'TestNoFalseDown' ./ebpf/

func envInt(name string, def int) int {
	if v, err := strconv.Atoi(os.Getenv(name)); err == nil && v > 0 {
		return v
	}
	return def
}

func envDuration(name string, def time.Duration) time.Duration {
	if v, err := time.ParseDuration(os.Getenv(name)); err == nil && v > 0 {
		return v
	}
	return def
}

// detectConfigs parses DOPPEL_PROBE_CONFIGS ("250ms*8,50ms*3"); default 100ms*3.
func detectConfigs(t *testing.T) []monitor.Config {
	s := os.Getenv("DOPPEL_PROBE_CONFIGS")
	if s == "" {
		s = "100ms*3"
	}
	var out []monitor.Config
	for _, c := range strings.Split(s, ",") {
		iv, n, ok := strings.Cut(c, "*")
		d, err1 := time.ParseDuration(iv)
		m, err2 := strconv.Atoi(n)
		if !ok || err1 != nil || err2 != nil {
			t.Fatalf("bad DOPPEL_PROBE_CONFIGS entry %q", c)
		}
		out = append(out, monitor.Config{Interval: d, Missed: m, Rise: 3})
	}
	return out
}

// cutMethod cuts the link from the sender's side (cut runs on the sender's
// goroutine: it returns errors instead of failing the test).
type cutMethod struct {
	name string
	cut  func(l *lab) (restore func() error, err error)
}

var cutMethods = []cutMethod{
	{"link-down", func(l *lab) (func() error, error) {
		if out, err := exec.Command("ip", "-n", l.nsA, "link", "set", l.vethA, "down").CombinedOutput(); err != nil {
			return nil, fmt.Errorf("link down: %v: %s", err, out)
		}
		return func() error { return exec.Command("ip", "-n", l.nsA, "link", "set", l.vethA, "up").Run() }, nil
	}},
	{"loss-100%", func(l *lab) (func() error, error) {
		remove, _, err := l.addLoss(100)
		return remove, err
	}},
}

const tok2 = 0xfeedfacecafe0001

// TestDetect cuts the link between sender and probe, repeatedly, and
// checks when the monitor declares the peer down: the silence it measured
// (from the kernel's arrival time of the last heartbeat) is at least
// interval×missed, and the time from the cut (made right after a heartbeat
// left) is within [interval×missed − 5 ms, interval×missed + 2 intervals].
// The 5 ms allow for the last heartbeat's own flight; nothing else may make
// it early. Each probe mode is run: auto (must be XDP here), forced XDP
// generic, forced userspace fallback.
func TestDetect(t *testing.T) {
	needRoot(t)
	trials := envInt("DOPPEL_PROBE_TRIALS", 3)
	var report []string
	for _, cfg := range detectConfigs(t) {
		for _, mode := range []Mode{ModeAuto, ModeXDPGeneric, ModeUserspace} {
			for _, cm := range cutMethods {
				name := fmt.Sprintf("%v*%d/%s/%s", cfg.Interval, cfg.Missed, modeName(mode), cm.name)
				t.Run(name, func(t *testing.T) {
					l := newLab(t)
					p := l.openProbe(mode, tok2)
					switch mode {
					case ModeAuto:
						if m := p.Mode(); m != ModeXDPDriver && m != ModeXDPGeneric {
							t.Fatalf("auto mode as root fell back to %s", m)
						}
					default:
						if p.Mode() != mode {
							t.Fatalf("mode %s, want %s", p.Mode(), mode)
						}
					}
					timeout, iv := cfg.Timeout(), cfg.Interval
					s := l.startSender(iv, tok2)
					w := startWatch(t, p, l.addrA, cfg)
					w.next(t, monitor.Up, 2*time.Second)
					var fromCut, silence []time.Duration
					for i := range trials {
						var restore func() error
						var err error
						cutAt := s.cutAfterSend(func() { restore, err = cm.cut(l) })
						if err != nil {
							t.Fatal(err)
						}
						c := w.next(t, monitor.Down, timeout+2*iv+3*time.Second)
						d := c.At - cutAt
						fromCut, silence = append(fromCut, d), append(silence, c.Silence)
						if c.Silence < timeout {
							t.Errorf("trial %d: down after %v of silence, before the %v timeout", i, c.Silence, timeout)
						}
						if d < timeout-5*time.Millisecond || d > timeout+2*iv {
							t.Errorf("trial %d: down %v after the cut, want within [%v, %v]", i, d, timeout, timeout+2*iv)
						}
						if err := restore(); err != nil {
							t.Fatal(err)
						}
						w.next(t, monitor.Up, timeout+5*time.Second)
						time.Sleep(timeout / 2)
					}
					row := fmt.Sprintf("| %v × %d | %s | %s | %d | %s | %s |", iv, cfg.Missed, p.Mode(), cm.name, trials,
						summary(fromCut), summary(silence))
					t.Log(row)
					report = append(report, row)
				})
			}
		}
	}
	if path := os.Getenv("DOPPEL_PROBE_REPORT"); path != "" && len(report) > 0 {
		hdr := "| interval × missed | mode | cut | trials | cut → down: min / median / p95 / max | silence → down: min / median / p95 / max |\n|---|---|---|---|---|---|\n"
		if err := os.WriteFile(path, []byte(hdr+strings.Join(report, "\n")+"\n"), 0o644); err != nil {
			t.Error(err)
		}
	}
}

func modeName(m Mode) string {
	if m == ModeAuto {
		return "auto"
	}
	return string(m)
}

// summary is "min / median / p95 / max" in milliseconds (nearest-rank p95).
func summary(ds []time.Duration) string {
	s := slices.Clone(ds)
	slices.Sort(s)
	ms := func(d time.Duration) string { return strconv.FormatFloat(float64(d)/1e6, 'f', 1, 64) }
	p95 := s[(len(s)*95+99)/100-1]
	return fmt.Sprintf("%s / %s / %s / %s ms", ms(s[0]), ms(s[len(s)/2]), ms(p95), ms(s[len(s)-1]))
}

// TestWrongToken: a peer whose real heartbeats stop is declared down on
// time although heartbeats with a wrong token keep coming from its address.
func TestWrongToken(t *testing.T) {
	l := newLab(t)
	cfg := monitor.Config{Interval: 100 * time.Millisecond, Missed: 3, Rise: 1}
	p := l.openProbe(ModeAuto, tok2)
	good := l.startSender(cfg.Interval, tok2)
	spoof := l.startSender(cfg.Interval/2, tok2+1)
	w := startWatch(t, p, l.addrA, cfg)
	w.next(t, monitor.Up, 2*time.Second)
	time.Sleep(500 * time.Millisecond)
	var stopAt time.Duration
	good.cutAfterSend(func() { stopAt = Now(); go good.stop() })
	c := w.next(t, monitor.Down, 3*time.Second)
	if d := c.At - stopAt; d < cfg.Timeout()-5*time.Millisecond || d > cfg.Timeout()+2*cfg.Interval {
		t.Errorf("down %v after the real heartbeats stopped, want about %v", d, cfg.Timeout())
	}
	w.quiet(t, time.Second) // the spoofer never brings it back
	st, _ := p.Stats(l.addrA)
	if st.BadToken < 20 {
		t.Errorf("bad-token count %d: the spoofed heartbeats did not arrive", st.BadToken)
	}
	spoof.Stop()
}

// TestReplicationTrafficIsLiveness: with XDP, packets on the replication
// port keep the peer up without any heartbeat.
func TestReplicationTrafficIsLiveness(t *testing.T) {
	l := newLab(t)
	cfg := monitor.Config{Interval: 100 * time.Millisecond, Missed: 3, Rise: 1}
	p := l.openProbe(ModeAuto, tok2)
	w := startWatch(t, p, l.addrA, cfg)
	var s *Sender
	if err := inNS(t, l.nsA, func() (err error) {
		s, err = NewSender([]netip.AddrPort{netip.AddrPortFrom(l.addrB, ReplicationPort)}, Heartbeat{})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	for range 20 { // 2 s of replication-port datagrams, no heartbeat
		s.Send()
		time.Sleep(cfg.Interval)
	}
	w.next(t, monitor.Up, time.Second)
	w.quiet(t, 0)
	st, _ := p.Stats(l.addrA)
	if st.Heartbeats != 0 || st.ReplicationPackets < 15 {
		t.Fatalf("stats %+v", st)
	}
	w.next(t, monitor.Down, time.Second)
}

// helperWatch starts this test binary in B as a separate monitor process
// (TestHelperWatch) and returns it and its output lines.
func (l *lab) helperWatch(mode Mode, cfg monitor.Config, token uint64) (*exec.Cmd, <-chan string) {
	l.t.Helper()
	cmd := exec.Command("ip", "netns", "exec", l.nsB, os.Args[0], "-test.run=^TestHelperWatch$", "-test.v")
	cmd.Env = append(os.Environ(), "DOPPEL_PROBE_HELPER=1",
		"DOPPEL_HELPER_IFACE="+l.vethB, "DOPPEL_HELPER_PEER="+l.addrA.String(), "DOPPEL_HELPER_MODE="+modeName(mode),
		fmt.Sprintf("DOPPEL_HELPER_CFG=%v,%d,%d,%d", cfg.Interval, cfg.Missed, cfg.Rise, token))
	out, err := cmd.StdoutPipe()
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
			if strings.HasPrefix(sc.Text(), "HELPER ") {
				lines <- strings.TrimPrefix(sc.Text(), "HELPER ")
			} else {
				fmt.Fprintln(os.Stderr, "helper:", sc.Text())
			}
		}
		close(lines)
	}()
	return cmd, lines
}

// helperSend starts this test binary in A as a separate heartbeat sender
// process (TestHelperSend) at real-time priority (chrt -f 10), like
// corosync's: the sender stands for the peer host, which the busy loops
// of this host must not starve. It is stopped at cleanup.
func (l *lab) helperSend(interval time.Duration, token uint64) *exec.Cmd {
	l.t.Helper()
	cmd := exec.Command("ip", "netns", "exec", l.nsA, "chrt", "-f", "10", os.Args[0], "-test.run=^TestHelperSend$")
	cmd.Env = append(os.Environ(), "DOPPEL_PROBE_HELPER=1",
		fmt.Sprintf("DOPPEL_HELPER_SEND=%s,%v,%d", l.addrB, interval, token))
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	if err := cmd.Start(); err != nil {
		l.t.Fatal(err)
	}
	l.t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	return cmd
}

// TestHelperSend is the sender process of helperSend.
func TestHelperSend(t *testing.T) {
	if os.Getenv("DOPPEL_PROBE_HELPER") != "1" {
		t.Skip("helper process for TestNoFalseDown*")
	}
	f := strings.Split(os.Getenv("DOPPEL_HELPER_SEND"), ",")
	if len(f) != 3 {
		t.Fatalf("bad DOPPEL_HELPER_SEND %q", os.Getenv("DOPPEL_HELPER_SEND"))
	}
	iv, err1 := time.ParseDuration(f[1])
	token, err2 := strconv.ParseUint(f[2], 10, 64)
	if err := errors.Join(err1, err2); err != nil {
		t.Fatal(err)
	}
	s, err := NewSender([]netip.AddrPort{netip.AddrPortFrom(netip.MustParseAddr(f[0]), HeartbeatPort)}, Heartbeat{Token: token})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	s.Run(t.Context(), iv, nil)
}

// TestHelperWatch is the monitor process of the SIGSTOP and busy-CPU tests;
// it only runs when started by helperWatch.
func TestHelperWatch(t *testing.T) {
	if os.Getenv("DOPPEL_PROBE_HELPER") != "1" {
		t.Skip("helper process for TestNoFalseDown*")
	}
	f := strings.Split(os.Getenv("DOPPEL_HELPER_CFG"), ",")
	if len(f) != 4 {
		t.Fatalf("bad DOPPEL_HELPER_CFG %q", os.Getenv("DOPPEL_HELPER_CFG"))
	}
	iv, err1 := time.ParseDuration(f[0])
	missed, err2 := strconv.Atoi(f[1])
	rise, err3 := strconv.Atoi(f[2])
	token, err4 := strconv.ParseUint(f[3], 10, 64)
	if err := errors.Join(err1, err2, err3, err4); err != nil {
		t.Fatal(err)
	}
	mode, err := ParseMode(os.Getenv("DOPPEL_HELPER_MODE"))
	if err != nil {
		t.Fatal(err)
	}
	p, err := Open(Config{Interfaces: []string{os.Getenv("DOPPEL_HELPER_IFACE")}, Mode: mode})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	peer := netip.MustParseAddr(os.Getenv("DOPPEL_HELPER_PEER"))
	if err := p.SetPeer(peer, token); err != nil {
		t.Fatal(err)
	}
	m, err := monitor.New(monitor.Config{Interval: iv, Missed: missed, Rise: rise}, []string{"p"}, Now())
	if err != nil {
		t.Fatal(err)
	}
	fmt.Printf("HELPER mode %s\n", p.Mode())
	err = monitor.Watch(t.Context(), m, Now, func(string) (monitor.Sample, error) {
		s, err := p.Stats(peer)
		return monitor.Sample{LastSeen: s.LastSeen(), Packets: s.Packets()}, err
	}, func(c monitor.Change) {
		fmt.Printf("HELPER %s %d %d\n", c.To, c.At, c.Silence)
	})
	if err != nil {
		t.Fatal(err)
	}
}

func expectLine(t *testing.T, lines <-chan string, prefix string, within time.Duration) string {
	t.Helper()
	select {
	case s, ok := <-lines:
		if !ok {
			t.Fatalf("helper exited, waiting for %q", prefix)
		}
		if !strings.HasPrefix(s, prefix) {
			t.Fatalf("helper said %q, want %q", s, prefix)
		}
		return s
	case <-time.After(within):
		t.Fatalf("helper did not say %q within %v", prefix, within)
	}
	return ""
}

func expectNoLine(t *testing.T, lines <-chan string, d time.Duration) {
	t.Helper()
	select {
	case s := <-lines:
		t.Fatalf("helper said %q", s)
	case <-time.After(d):
	}
}

// TestNoFalseDownSIGSTOP stops the monitor process for 2 × interval ×
// missed while heartbeats keep arriving: after SIGCONT it must not declare
// the peer down (the probe timestamped the heartbeats on arrival). The
// control at the end stops the heartbeats too, and then it must.
func TestNoFalseDownSIGSTOP(t *testing.T) {
	for _, mode := range []Mode{ModeAuto, ModeUserspace} {
		t.Run(modeName(mode), func(t *testing.T) {
			l := newLab(t)
			cfg := monitor.Config{Interval: 50 * time.Millisecond, Missed: 3, Rise: 3}
			sender := l.helperSend(cfg.Interval, tok2)
			cmd, lines := l.helperWatch(mode, cfg, tok2)
			t.Log(expectLine(t, lines, "mode ", 10*time.Second))
			expectLine(t, lines, "up ", 2*time.Second)
			pause := 2 * cfg.Timeout()
			for range envInt("DOPPEL_PROBE_STOPS", 5) {
				cmd.Process.Signal(syscall.SIGSTOP)
				time.Sleep(pause)
				cmd.Process.Signal(syscall.SIGCONT)
				expectNoLine(t, lines, 500*time.Millisecond)
			}
			// Control: the same pause with the peer silent is a down, reported
			// as soon as the monitor runs again.
			cmd.Process.Signal(syscall.SIGSTOP)
			sender.Process.Kill()
			time.Sleep(pause)
			cont := Now()
			cmd.Process.Signal(syscall.SIGCONT)
			f := strings.Fields(expectLine(t, lines, "down ", time.Second))
			at, _ := strconv.ParseInt(f[1], 10, 64)
			if d := time.Duration(at) - cont; d > 100*time.Millisecond {
				t.Errorf("control: down %v after SIGCONT", d)
			}
		})
	}
}

// busyCPUs starts one busy loop per CPU for the rest of the test.
func busyCPUs(t *testing.T) {
	for range runtime.NumCPU() {
		c := exec.Command("sh", "-c", "while :; do :; done")
		if err := c.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Process.Kill(); c.Wait() })
	}
}

// TestNoFalseDownBusyCPU: 50 ms × 3 with every CPU saturated by busy
// loops, for DOPPEL_PROBE_SOAK (default 20 s; the figure is 2 min).
func TestNoFalseDownBusyCPU(t *testing.T) {
	t.Parallel()
	l := newLab(t)
	cfg := monitor.Config{Interval: 50 * time.Millisecond, Missed: 3, Rise: 3}
	l.helperSend(cfg.Interval, tok2)
	_, lines := l.helperWatch(ModeAuto, cfg, tok2)
	expectLine(t, lines, "mode ", 10*time.Second)
	expectLine(t, lines, "up ", 2*time.Second)
	busyCPUs(t)
	expectNoLine(t, lines, envDuration("DOPPEL_PROBE_SOAK", 20*time.Second))
}

// TestNoFalseDownLoss: 250 ms × 8 with 10% random loss on the link, for
// DOPPEL_PROBE_SOAK (default 20 s). The loss must show as sequence gaps.
func TestNoFalseDownLoss(t *testing.T) {
	t.Parallel()
	l := newLab(t)
	cfg := monitor.Config{Interval: 250 * time.Millisecond, Missed: 8, Rise: 3}
	p := l.openProbe(ModeAuto, tok2)
	remove, how, err := l.addLoss(10)
	if err != nil {
		t.Fatal(err)
	}
	defer remove()
	t.Log("10% loss with", how)
	l.startSender(cfg.Interval, tok2)
	w := startWatch(t, p, l.addrA, cfg)
	w.next(t, monitor.Up, 5*time.Second)
	soak := envDuration("DOPPEL_PROBE_SOAK", 20*time.Second)
	w.quiet(t, soak)
	st, _ := p.Stats(l.addrA)
	t.Logf("after %v: %d heartbeats, %d gaps (%.1f%% lost)", soak, st.Heartbeats, st.Gaps, 100*float64(st.Gaps)/float64(st.Gaps+st.Heartbeats))
	if st.Gaps == 0 {
		t.Error("no sequence gap: the 10% loss was not applied")
	}
}
