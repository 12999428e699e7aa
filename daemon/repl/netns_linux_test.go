package repl

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"

	"github.com/doppelha/doppel/blockdev"
	"github.com/doppelha/doppel/daemon/repl/wire"
	"github.com/doppelha/doppel/daemon/tlspin"
	"github.com/doppelha/doppel/test/lab"
)

// The namespace tier of the session keepalive: a source in one network
// namespace, its target in another, joined by a veth pair, over TLS with
// pinned certificates as the agent runs them. The link is then cut (the
// veth set down, or every packet dropped by a tcx BPF program: a silent
// blackhole with the link up) and both ends must drop the session within
// the default timeout (250 ms × 8 = 2 s) plus scheduling slack, not when
// TCP gives up.
//
//	DOPPEL_REPL_TRIALS=10 go test -count=1 -v -run '^TestSessionBlackholeNetns$' ./daemon/repl/

func needNetns(t *testing.T) { t.Helper(); lab.Need(t) }

func runCmd(t testing.TB, name string, args ...string) {
	t.Helper()
	if out, err := exec.Command(name, args...).CombinedOutput(); err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
}

// inNetns runs f on an OS thread switched into the named namespace:
// sockets f creates stay in it.
func inNetns(ns string, f func() error) error { return lab.DoIn(ns, f) }

type vethLab struct {
	nsA, nsB, vethA, vethB string
	addrA, addrB           string
}

func newVethLab(t *testing.T) *vethLab {
	t.Helper()
	lb := lab.New(t)
	a, b := lb.Host("drpa"), lb.Host("drpb")
	l := &vethLab{nsA: a.NS, nsB: b.NS, vethA: "drpa" + lb.Suffix, vethB: "drpb" + lb.Suffix, addrA: "10.99.0.1", addrB: "10.99.0.2"}
	a.Link(l.vethA, b, l.vethB, l.addrA+"/24", l.addrB+"/24")
	return l
}

// dropAll attaches tcx programs dropping every packet in and out of A's
// veth (the link stays up: a blackhole) and returns their removal.
func (l *vethLab) dropAll() (func() error, error) {
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Type: ebpf.SchedCLS, License: "GPL",
		Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, 2), asm.Return()}, // TCX_DROP
	})
	if err != nil {
		return nil, fmt.Errorf("load tcx drop program: %w", err)
	}
	var links []link.Link
	err = inNetns(l.nsA, func() error {
		ifc, err := net.InterfaceByName(l.vethA)
		if err != nil {
			return err
		}
		for _, at := range []ebpf.AttachType{ebpf.AttachTCXIngress, ebpf.AttachTCXEgress} {
			lk, err := link.AttachTCX(link.TCXOptions{Interface: ifc.Index, Program: prog, Attach: at})
			if err != nil {
				return err
			}
			links = append(links, lk)
		}
		return nil
	})
	remove := func() error {
		var errs []error
		for _, lk := range links {
			errs = append(errs, lk.Close())
		}
		return errors.Join(append(errs, prog.Close())...)
	}
	if err != nil {
		return nil, errors.Join(fmt.Errorf("attach tcx drop: %w", err), remove())
	}
	return remove, nil
}

func TestSessionBlackholeNetns(t *testing.T) {
	needNetns(t)
	trials := 2
	if n, err := strconv.Atoi(os.Getenv("DOPPEL_REPL_TRIALS")); err == nil && n > 0 {
		trials = n
	}
	cuts := []struct {
		name string
		cut  func(t *testing.T, l *vethLab) (restore func())
	}{
		{"link-down", func(t *testing.T, l *vethLab) func() {
			runCmd(t, "ip", "-n", l.nsA, "link", "set", l.vethA, "down")
			return func() { runCmd(t, "ip", "-n", l.nsA, "link", "set", l.vethA, "up") }
		}},
		{"tcx-drop", func(t *testing.T, l *vethLab) func() {
			remove, err := l.dropAll()
			if err != nil {
				t.Fatal(err)
			}
			return func() {
				if err := remove(); err != nil {
					t.Fatal(err)
				}
			}
		}},
	}
	for _, cm := range cuts {
		t.Run(cm.name, func(t *testing.T) {
			l := newVethLab(t)
			srcCert, srcPin, err := LoadOrCreateCert(t.TempDir())
			if err != nil {
				t.Fatal(err)
			}
			tgtCert, tgtPin, err := LoadOrCreateCert(t.TempDir())
			if err != nil {
				t.Fatal(err)
			}
			srvConf, err := tlspin.ServerConfig(tgtCert, srcPin)
			if err != nil {
				t.Fatal(err)
			}
			cliConf, err := tlspin.ClientConfig(&srcCert, tgtPin)
			if err != nil {
				t.Fatal(err)
			}
			var ln net.Listener
			if err := inNetns(l.nsB, func() (err error) {
				ln, err = net.Listen("tcp", l.addrB+":6325")
				return err
			}); err != nil {
				t.Fatal(err)
			}
			log, _ := testLogger(t)
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			tgt, err := NewApplier(ApplierConfig{Backend: newMem(1 << 20), Log: log.With("side", "target")})
			if err != nil {
				t.Fatal(err)
			}
			srvDone := make(chan struct{})
			go func() { defer close(srvDone); tgt.Serve(ctx, tls.NewListener(ln, srvConf)) }()
			defer func() { cancel(); <-srvDone }()
			src, err := NewStream(StreamConfig{Backend: newMem(1 << 20), Mode: wire.ModeSync, Log: log.With("side", "source"),
				Dial: func(ctx context.Context) (c net.Conn, err error) {
					err = inNetns(l.nsA, func() error {
						d := tls.Dialer{NetDialer: &net.Dialer{Timeout: time.Second}, Config: cliConf}
						c, err = d.DialContext(ctx, "tcp", l.addrB+":6325")
						return err
					})
					return c, err
				}})
			if err != nil {
				t.Fatal(err)
			}
			defer src.Close()
			runDone := make(chan error, 1)
			go func() { runDone <- src.Run(ctx) }()
			defer func() { cancel(); <-runDone }()

			timeout := DefaultTimeout
			var srcD, tgtD []time.Duration
			for i := range trials {
				waitFor(t, 10*time.Second, "connected", src.Connected)
				waitFor(t, 5*time.Second, "target session", func() bool { _, _, peer := tgt.Status(); return peer != "" })
				if err := src.Apply(ctx, &blockdev.Mutation{Op: blockdev.OpWrite, Offset: int64(i) * 4096, Length: 4096, Data: make([]byte, 4096)}); err != nil {
					t.Fatal(err)
				}
				time.Sleep(timeout / 2)
				cut := time.Now() // before the cut command: delays only lengthen what is measured
				restore := cm.cut(t, l)
				var sd, td time.Duration
				for deadline := cut.Add(timeout + 10*time.Second); (sd == 0 || td == 0) && time.Now().Before(deadline); time.Sleep(5 * time.Millisecond) {
					if sd == 0 && !src.Connected() {
						sd = time.Since(cut)
					}
					if _, _, peer := tgt.Status(); td == 0 && peer == "" {
						td = time.Since(cut)
					}
				}
				restore()
				for side, d := range map[string]time.Duration{"source": sd, "target": td} {
					switch {
					case d == 0:
						t.Fatalf("trial %d: %s still replicating %v after the cut", i, side, timeout+10*time.Second)
					case d < timeout/2 || d > timeout+1500*time.Millisecond:
						t.Errorf("trial %d: %s dropped the session %v after the cut, want within [%v, %v + 1.5 s]", i, side, d, timeout/2, timeout)
					}
				}
				srcD, tgtD = append(srcD, sd), append(tgtD, td)
			}
			t.Logf("%s, timeout %v, %d trials: cut -> session down: source %s; target %s", cm.name, timeout, trials, msSummary(srcD), msSummary(tgtD))
		})
	}
}

// msSummary is "min / median / max ms".
func msSummary(ds []time.Duration) string {
	s := slices.Clone(ds)
	slices.Sort(s)
	ms := func(d time.Duration) string { return strconv.FormatFloat(float64(d)/1e6, 'f', 0, 64) }
	return fmt.Sprintf("%s / %s / %s ms", ms(s[0]), ms(s[len(s)/2]), ms(s[len(s)-1]))
}

// TestUserTimeoutSet: TCP_USER_TIMEOUT reaches the socket under a TLS
// connection (and under the prefix wrapper the mux uses).
func TestUserTimeoutSet(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		if c, err := l.Accept(); err == nil {
			defer c.Close()
			time.Sleep(time.Second)
		}
	}()
	raw, err := net.Dial("tcp", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	tc := tls.Client(raw, &tls.Config{InsecureSkipVerify: true})
	for _, c := range []net.Conn{tc, &prefixConn{Conn: tc}} {
		if err := setUserTimeout(c, 1500*time.Millisecond); err != nil {
			t.Fatal(err)
		}
		sc, _ := raw.(*net.TCPConn).SyscallConn()
		var got int
		var gerr error
		sc.Control(func(fd uintptr) { got, gerr = unix.GetsockoptInt(int(fd), unix.IPPROTO_TCP, unix.TCP_USER_TIMEOUT) })
		if gerr != nil || got != 1500 {
			t.Fatalf("TCP_USER_TIMEOUT = %d, %v; want 1500", got, gerr)
		}
		setUserTimeout(c, 0)
	}
	if err := setUserTimeout(&net.UnixConn{}, time.Second); err == nil {
		t.Fatal("setUserTimeout accepted a unix socket")
	}
}
