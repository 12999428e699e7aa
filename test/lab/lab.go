// Package lab builds network-namespace labs for doppel's multi-host tests:
// hosts (network namespaces) joined by bridges that live in a switch
// namespace of their own, processes started inside a host and stopped by
// PID, code run on a thread switched into a host's namespace. Every name
// carries a random suffix; everything a lab made is removed in t.Cleanup,
// also when the test fails.
//
//	l := lab.New(t)
//	app := l.Bridge("app")
//	vm1 := l.Host("vm1")
//	vm1.Attach("eth0", app, "10.77.0.11/24")
//	p := vm1.Start("agent", logFile, "doppel", "agent", ...)
package lab

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// Need skips the test when it cannot run here (not root, or -short) and
// fails it when it should run but a tool it needs is missing.
func Need(t testing.TB, tools ...string) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: network namespaces, veth, bridges")
	}
	if testing.Short() {
		t.Skip("network-namespace tier skipped in -short mode")
	}
	for _, tool := range append([]string{"ip"}, tools...) {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s not found (make deps installs it): %v", tool, err)
		}
	}
}

// Lab is a set of hosts and bridges made for one test.
type Lab struct {
	t      testing.TB
	Suffix string // random, in every name the lab makes
	Switch string // the namespace holding the bridges

	mu    sync.Mutex
	n     int // interfaces made, for unique names
	procs []*Proc
	hosts []*Host
}

// New makes an empty lab (a switch namespace) removed when the test ends.
func New(t testing.TB) *Lab {
	t.Helper()
	var b [3]byte
	_, _ = rand.Read(b[:])
	l := &Lab{t: t, Suffix: hex.EncodeToString(b[:])}
	l.Switch = "dsw-" + l.Suffix
	l.must("ip", "netns", "add", l.Switch)
	t.Cleanup(l.close)
	l.must("ip", "-n", l.Switch, "link", "set", "lo", "up")
	return l
}

func (l *Lab) close() {
	l.mu.Lock()
	procs := l.procs
	hosts := l.hosts
	l.mu.Unlock()
	for _, p := range procs {
		p.kill()
	}
	for _, h := range hosts {
		exec.Command("ip", "netns", "del", h.NS).Run()
	}
	exec.Command("ip", "netns", "del", l.Switch).Run()
}

// must runs argv and fails the test when it fails.
func (l *Lab) must(argv ...string) {
	l.t.Helper()
	if out, err := exec.Command(argv[0], argv[1:]...).CombinedOutput(); err != nil {
		l.t.Fatalf("%s: %v\n%s", strings.Join(argv, " "), err, out)
	}
}

// Run runs argv (in the caller's namespace) and returns its combined output.
func Run(argv ...string) ([]byte, error) {
	out, err := exec.Command(argv[0], argv[1:]...).CombinedOutput()
	if err != nil {
		return out, fmt.Errorf("%s: %w: %s", strings.Join(argv, " "), err, strings.TrimSpace(string(out)))
	}
	return out, nil
}

// Bridge makes a bridge in the switch namespace and returns its name.
func (l *Lab) Bridge(name string) string {
	l.t.Helper()
	br := name
	if len(br) > 15 {
		br = br[:15]
	}
	l.must("ip", "-n", l.Switch, "link", "add", br, "type", "bridge")
	l.must("ip", "-n", l.Switch, "link", "set", br, "up")
	return br
}

// Host is a network namespace of the lab.
type Host struct {
	l    *Lab
	Name string // as the test calls it
	NS   string // the namespace
}

// Host makes a namespace with its loopback up.
func (l *Lab) Host(name string) *Host {
	l.t.Helper()
	h := &Host{l: l, Name: name, NS: name + "-" + l.Suffix}
	l.must("ip", "netns", "add", h.NS)
	l.mu.Lock()
	l.hosts = append(l.hosts, h)
	l.mu.Unlock()
	l.must("ip", "-n", h.NS, "link", "set", "lo", "up")
	return h
}

// Attach connects the host to a bridge with a veth pair: ifname in the
// host with the addresses (CIDR), and a port on the bridge, whose name
// it returns.
func (h *Host) Attach(ifname, bridge string, cidrs ...string) (port string) {
	l := h.l
	l.t.Helper()
	l.mu.Lock()
	l.n++
	port = fmt.Sprintf("p%d%s", l.n, l.Suffix)
	l.mu.Unlock()
	tmp := "t" + port[1:]
	l.must("ip", "-n", l.Switch, "link", "add", port, "type", "veth", "peer", "name", tmp, "netns", h.NS)
	l.must("ip", "-n", h.NS, "link", "set", tmp, "name", ifname)
	l.must("ip", "-n", l.Switch, "link", "set", port, "master", bridge, "up")
	for _, c := range cidrs {
		l.must("ip", "-n", h.NS, "addr", "add", c, "dev", ifname)
	}
	l.must("ip", "-n", h.NS, "link", "set", ifname, "up")
	return port
}

// Link joins the host to peer with a veth pair and no bridge: ifname in
// the host, peerIf in peer, each with its address (CIDR), both up.
func (h *Host) Link(ifname string, peer *Host, peerIf, cidr, peerCIDR string) {
	l := h.l
	l.t.Helper()
	l.must("ip", "link", "add", ifname, "netns", h.NS, "type", "veth", "peer", "name", peerIf, "netns", peer.NS)
	for _, s := range [][3]string{{h.NS, ifname, cidr}, {peer.NS, peerIf, peerCIDR}} {
		l.must("ip", "-n", s[0], "addr", "add", s[2], "dev", s[1])
		l.must("ip", "-n", s[0], "link", "set", s[1], "up")
	}
}

// Cmd is argv run inside the host's namespace.
func (h *Host) Cmd(argv ...string) *exec.Cmd {
	return exec.Command("ip", append([]string{"netns", "exec", h.NS}, argv...)...)
}

// Run runs argv in the host and returns its combined output.
func (h *Host) Run(argv ...string) ([]byte, error) {
	return Run(append([]string{"ip", "netns", "exec", h.NS}, argv...)...)
}

// Output runs argv in the host's namespace and returns its standard output
// only (a program that logs warnings to stderr, like etcdctl, still prints
// parsable output); stderr is in the error when it fails.
func (h *Host) Output(argv ...string) ([]byte, error) {
	cmd := exec.Command("ip", append([]string{"netns", "exec", h.NS}, argv...)...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return out, fmt.Errorf("%s: %w: %s", strings.Join(argv, " "), err, strings.TrimSpace(stderr.String()))
	}
	return out, nil
}

// IP runs `ip ARGS` on the host's namespace.
func (h *Host) IP(args ...string) error {
	_, err := Run(append([]string{"ip", "-n", h.NS}, args...)...)
	return err
}

// Proc is a process started in a host. Its PID is the program's own (ip
// netns exec execs it).
type Proc struct {
	Name string
	Cmd  *exec.Cmd
	log  *os.File
	done chan struct{}
	err  error
}

// Start runs argv in the host with its output appended to logPath; the
// lab kills it at the end of the test if it still runs.
func (h *Host) Start(name, logPath string, argv ...string) (*Proc, error) {
	f, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	cmd := h.Cmd(argv...)
	cmd.Stdout, cmd.Stderr = f, f
	// Pdeathsig: killed if the test process dies without its cleanups
	// (a timeout's panic, a signal).
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		f.Close()
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	p := &Proc{Name: name, Cmd: cmd, log: f, done: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		f.Close()
		close(p.done)
	}()
	h.l.mu.Lock()
	h.l.procs = append(h.l.procs, p)
	h.l.mu.Unlock()
	return p, nil
}

// PID is the process's id.
func (p *Proc) PID() int { return p.Cmd.Process.Pid }

// Signal sends sig to the process (not its group: children of its own,
// like hook scripts, are left alone).
func (p *Proc) Signal(sig syscall.Signal) error {
	select {
	case <-p.done:
		return fmt.Errorf("signal %s: %s already exited", sig, p.Name)
	default:
	}
	return unix.Kill(p.PID(), sig)
}

// Exited is closed when the process has exited.
func (p *Proc) Exited() <-chan struct{} { return p.done }

// Kill sends SIGKILL (after SIGCONT, in case it was stopped) and waits
// up to 10 s for it to exit.
func (p *Proc) Kill() error {
	_ = p.Signal(syscall.SIGKILL)
	_ = p.Signal(syscall.SIGCONT)
	select {
	case <-p.done:
		return nil
	case <-time.After(10 * time.Second):
		return fmt.Errorf("kill %s (pid %d): still running after 10 s", p.Name, p.PID())
	}
}

func (p *Proc) kill() { _ = p.Kill() }

// Do runs f on an OS thread switched into the host's network namespace:
// sockets f opens stay in it. The thread is discarded if switching back
// fails.
func (h *Host) Do(f func() error) error { return DoIn(h.NS, f) }

// DoIn runs f on an OS thread switched into the named network namespace.
func DoIn(ns string, f func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // never unlocked if restoring fails: the thread dies with the goroutine
		orig, err := os.Open(fmt.Sprintf("/proc/self/task/%d/ns/net", unix.Gettid()))
		if err != nil {
			errc <- err
			return
		}
		defer orig.Close()
		target, err := os.Open("/var/run/netns/" + ns)
		if err != nil {
			errc <- err
			return
		}
		defer target.Close()
		if err := unix.Setns(int(target.Fd()), unix.CLONE_NEWNET); err != nil {
			errc <- fmt.Errorf("setns %s: %w", ns, err)
			return
		}
		ferr := f()
		if err := unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET); err != nil {
			errc <- fmt.Errorf("restore netns: %w", err)
			return
		}
		runtime.UnlockOSThread()
		errc <- ferr
	}()
	return <-errc
}
