package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/pem"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/doppelha/doppel/test/lab"

	cdpruntime "github.com/chromedp/cdproto/runtime"
	"github.com/chromedp/chromedp"
	"github.com/doppelha/doppel/blockdev/nbdclient"
	"github.com/doppelha/doppel/daemon/api"
	"github.com/doppelha/doppel/daemon/tlspin"
)

var updateScreenshots = flag.Bool("update-screenshots", false, "write the console test's screenshots to docs/console/*.png")

// consoleLab is the demo's two-VM lab in network namespaces: vm1 and vm2
// (application network 172.17.22.0/24 on eth0, replication network
// 192.168.0.0/24 on eth1) and a client namespace holding the etcd
// arbiter and the console. Agents and the console are this test binary
// run as doppel (childEnv); Chromium runs in the client namespace too.
type consoleLab struct {
	t      *testing.T
	dir    string
	exe    string
	suffix string
	ns     map[string]string // vm1, vm2, client -> namespace
	procs  map[string]*labProc
	url    string
	spki   string // the console certificate's SPKI hash, for the browser
	fp     string // its fingerprint, as doppel console prints it
}

type labProc struct {
	cmd  *exec.Cmd
	log  string
	done chan struct{}
}

func labRun(t *testing.T, args ...string) string {
	t.Helper()
	out, err := exec.Command(args[0], args[1:]...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

func newConsoleLab(t *testing.T) *consoleLab {
	t.Helper()
	if testing.Short() {
		t.Skip("console browser test: namespace tier")
	}
	if os.Geteuid() != 0 {
		t.Skip("needs root: network namespaces, veth, bridges")
	}
	for _, tool := range []string{"ip", "etcd"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s not installed (make deps installs it)", tool)
		}
	}
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	nl := lab.New(t)
	l := &consoleLab{t: t, dir: t.TempDir(), exe: exe, suffix: nl.Suffix, procs: map[string]*labProc{}, ns: map[string]string{}}
	t.Cleanup(func() {
		for _, p := range l.procs {
			p.kill()
		}
		if t.Failed() {
			for name, p := range l.procs {
				b, _ := os.ReadFile(p.log)
				t.Logf("%s log:\n%s", name, tail(string(b), 6000))
			}
		}
	})
	brA, brR := nl.Bridge("app"), nl.Bridge("repl")
	hosts := map[string]*lab.Host{}
	for _, name := range []string{"vm1", "vm2", "client"} {
		h := nl.Host(name)
		// IPv4 only: no IPv6 address appearing after its duplicate
		// detection, which Chromium would take for a network change
		// (ERR_NETWORK_CHANGED aborts the page's requests).
		if _, err := h.Run("sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"); err != nil {
			t.Fatal(err)
		}
		hosts[name], l.ns[name] = h, h.NS
	}
	hosts["vm1"].Attach("eth0", brA, "172.17.22.11/24")
	hosts["vm1"].Attach("eth1", brR, "192.168.0.11/24")
	hosts["vm2"].Attach("eth0", brA, "172.17.22.12/24")
	hosts["vm2"].Attach("eth1", brR, "192.168.0.12/24")
	hosts["client"].Attach("eth0", brA, "172.17.22.100/24")
	return l
}

func (p *labProc) kill() {
	if p.cmd.Process != nil {
		p.cmd.Process.Kill()
		<-p.done
	}
}

// start runs argv in the host's namespace, logging to a file.
func (l *consoleLab) start(name, host string, env []string, argv ...string) *labProc {
	l.t.Helper()
	logPath := filepath.Join(l.dir, name+".log")
	f, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		l.t.Fatal(err)
	}
	defer f.Close()
	args := append([]string{"netns", "exec", l.ns[host]}, argv...)
	cmd := exec.Command("ip", args...)
	cmd.Env = append(append(os.Environ(), childEnv+"=1"), env...)
	cmd.Stdout, cmd.Stderr = f, f
	if err := cmd.Start(); err != nil {
		l.t.Fatal(err)
	}
	p := &labProc{cmd: cmd, log: logPath, done: make(chan struct{})}
	go func() { cmd.Wait(); close(p.done) }()
	l.procs[name] = p
	return p
}

func (l *consoleLab) startEtcd() string {
	ep := "http://172.17.22.100:2379"
	l.start("etcd", "client", nil, "etcd", "--name", "e1", "--data-dir", filepath.Join(l.dir, "etcd"), "--log-level", "error",
		"--listen-client-urls", ep, "--advertise-client-urls", ep,
		"--listen-peer-urls", "http://172.17.22.100:2380", "--initial-advertise-peer-urls", "http://172.17.22.100:2380",
		"--initial-cluster", "e1=http://172.17.22.100:2380")
	return ep
}

func (l *consoleLab) startAgent(host, etcd string) {
	app := map[string]string{"vm1": "172.17.22.11", "vm2": "172.17.22.12"}[host]
	repl := map[string]string{"vm1": "192.168.0.11", "vm2": "192.168.0.12"}[host]
	l.start(host, host, nil, l.exe, "doppel", "agent", "--state-dir", filepath.Join(l.dir, host),
		"--control-listen", app+":6320", "--repl-listen", repl+":6325", "--arbiter-endpoints", etcd)
	deadline := time.Now().Add(20 * time.Second)
	for {
		b, _ := os.ReadFile(l.procs[host].log)
		if bytes.Contains(b, []byte("agent ready")) {
			return
		}
		if time.Now().After(deadline) {
			l.t.Fatalf("agent %s did not start:\n%s", host, b)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// agentFingerprint and agentToken are what the operator reads on the
// agent's host (its log line and its STATE/token).
func (l *consoleLab) agentFingerprint(host string) string {
	b, err := os.ReadFile(filepath.Join(l.dir, host, "tls", "cert.pem"))
	if err != nil {
		l.t.Fatal(err)
	}
	blk, _ := pem.Decode(b)
	return tlspin.Fingerprint(blk.Bytes)
}

func (l *consoleLab) agentToken(host string) string {
	tok, err := api.ReadToken(filepath.Join(l.dir, host, "token"))
	if err != nil {
		l.t.Fatal(err)
	}
	return tok
}

// startConsole runs doppel console in the client namespace, listening on
// its loopback (the browser runs there too: no change of the root
// namespace's interfaces, by this test or another, interrupts its
// requests), with the password given.
func (l *consoleLab) startConsole(password string) {
	pw := filepath.Join(l.dir, "console-password")
	if err := os.WriteFile(pw, []byte(password+"\n"), 0o600); err != nil {
		l.t.Fatal(err)
	}
	p := l.start("console", "client", []string{"DOPPEL_CONFIG=" + filepath.Join(l.dir, "cli.json")},
		l.exe, "doppel", "console", "--listen", "127.0.0.1:6330", "--state-dir", filepath.Join(l.dir, "console"), "--init-password", pw, "--interval", "500ms")
	deadline := time.Now().Add(20 * time.Second)
	urlRE := regexp.MustCompile(`doppel console: (https://\S+)`)
	fpRE := regexp.MustCompile(`certificate (sha256:[0-9a-f]{64})`)
	for {
		b, _ := os.ReadFile(p.log)
		if m, fm := urlRE.FindSubmatch(b), fpRE.FindSubmatch(b); m != nil && fm != nil {
			l.url, l.fp = strings.TrimSuffix(string(m[1]), "/"), string(fm[1])
			break
		}
		if time.Now().After(deadline) {
			l.t.Fatalf("console did not start:\n%s", b)
		}
		time.Sleep(50 * time.Millisecond)
	}
	b, err := os.ReadFile(filepath.Join(l.dir, "console", "tls", "cert.pem"))
	if err != nil {
		l.t.Fatal(err)
	}
	blk, _ := pem.Decode(b)
	cert, err := x509.ParseCertificate(blk.Bytes)
	if err != nil {
		l.t.Fatal(err)
	}
	if got := tlspin.Fingerprint(blk.Bytes); got != l.fp {
		l.t.Fatalf("console printed fingerprint %s, its certificate is %s", l.fp, got)
	}
	sum := sha256.Sum256(cert.RawSubjectPublicKeyInfo)
	l.spki = base64.StdEncoding.EncodeToString(sum[:])
}

// xfsDir mounts a fresh XFS file system (a loop device on a sparse file)
// and returns its mount point: snapshots of a file volume need reflinks.
func (l *consoleLab) xfsDir(name string) string {
	l.t.Helper()
	if _, err := exec.LookPath("mkfs.xfs"); err != nil {
		l.t.Skip("mkfs.xfs not installed (make deps installs xfsprogs)")
	}
	img, dir := filepath.Join(l.dir, name+".xfs"), filepath.Join(l.dir, name)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		l.t.Fatal(err)
	}
	labRun(l.t, "truncate", "-s", "512M", img)
	dev := strings.TrimSpace(labRun(l.t, "losetup", "-f", "--show", img))
	l.t.Cleanup(func() { exec.Command("losetup", "-d", dev).Run() })
	labRun(l.t, "mkfs.xfs", "-q", "-m", "reflink=1", dev)
	labRun(l.t, "mount", dev, dir)
	l.t.Cleanup(func() { exec.Command("umount", "-l", dir).Run() })
	return dir
}

// hasIP reports whether the host's eth0 holds ip (ip -n NS addr).
func (l *consoleLab) hasIP(host, ip string) bool {
	out, _ := exec.Command("ip", "-n", l.ns[host], "addr", "show", "dev", "eth0").CombinedOutput()
	return strings.Contains(string(out), " "+ip+"/")
}

// browser drives headless Chromium.
type browser struct {
	t   *testing.T
	ctx context.Context
	dir string // where screenshots go

	mu    sync.Mutex
	notes []string // the page's exceptions and console messages
}

// chromiumPath is Debian's chromium (test/deps.sh installs it).
func chromiumPath(t *testing.T) string {
	for _, p := range []string{"chromium", "chromium-browser"} {
		if lp, err := exec.LookPath(p); err == nil {
			return lp
		}
	}
	t.Skip("chromium not installed (make deps installs Debian's chromium)")
	return ""
}

func newBrowser(t *testing.T, ctx context.Context, path, netns, spki string) *browser {
	t.Helper()
	opts := []chromedp.ExecAllocatorOption{
		chromedp.ExecPath(path),
		chromedp.Headless, chromedp.NoSandbox, chromedp.DisableGPU, chromedp.NoFirstRun, chromedp.NoDefaultBrowserCheck,
		chromedp.Flag("disable-quic", true),
		chromedp.Flag("disable-background-networking", true),
		chromedp.Flag("disable-component-update", true),
		chromedp.Flag("disable-sync", true),
		chromedp.Flag("disable-dev-shm-usage", true),
		chromedp.Flag("disable-extensions", true),
		chromedp.Flag("disable-features", "Translate,MediaRouter,OptimizationHints"),
		chromedp.Flag("password-store", "basic"),
		// Trust exactly the console's key (its self-signed certificate),
		// nothing else.
		chromedp.Flag("ignore-certificate-errors-spki-list", spki),
		chromedp.UserDataDir(t.TempDir()),
		chromedp.WindowSize(1400, 1000),
		// Run it in the lab's client namespace: ip netns exec NS chromium
		// (the DevTools pipe's descriptors pass through).
		chromedp.ModifyCmdFunc(func(cmd *exec.Cmd) {
			ip, _ := exec.LookPath("ip")
			cmd.Args = append([]string{"ip", "netns", "exec", netns, path}, cmd.Args[1:]...)
			cmd.Path = ip
			cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
		}),
	}
	actx, acancel := chromedp.NewExecAllocator(ctx, opts...)
	bctx, bcancel := chromedp.NewContext(actx)
	t.Cleanup(func() { bcancel(); acancel() })
	if err := chromedp.Do(bctx); err != nil {
		t.Fatalf("start chromium: %v", err)
	}
	b := &browser{t: t, ctx: bctx}
	// The page's exceptions and console messages, shown when the test
	// fails.
	exceptions := chromedp.Events(bctx, cdpruntime.ExceptionThrown)
	consoleMsgs := chromedp.Events(bctx, cdpruntime.ConsoleAPICalled)
	go func() {
		for ev, err := range exceptions {
			if err != nil {
				return
			}
			b.note("exception: " + (&chromedp.ExceptionError{ExceptionDetails: ev.ExceptionDetails}).Error())
		}
	}()
	go func() {
		for ev, err := range consoleMsgs {
			if err != nil {
				return
			}
			var parts []string
			for _, a := range ev.Args {
				parts = append(parts, string(a.Value))
			}
			b.note("console." + string(ev.Type) + ": " + strings.Join(parts, " "))
		}
	}()
	t.Cleanup(func() {
		if t.Failed() {
			b.mu.Lock()
			t.Logf("browser:\n%s", strings.Join(b.notes, "\n"))
			b.mu.Unlock()
		}
	})
	b.dir = t.TempDir()
	if *updateScreenshots {
		b.dir = filepath.Join("..", "..", "docs", "console")
		if err := os.MkdirAll(b.dir, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	return b
}

func (b *browser) note(s string) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.notes = append(b.notes, time.Now().Format("15:04:05.000")+" "+s)
}

func (b *browser) run(what string, actions ...chromedp.Action[chromedp.Void]) {
	b.t.Helper()
	ctx, cancel := context.WithTimeout(b.ctx, 30*time.Second)
	defer cancel()
	if err := chromedp.Do(ctx, actions...); err != nil {
		b.t.Fatalf("%s: %v (page: %.2000s)", what, err, b.text("body"))
	}
}

// goTo changes the page's route (its hash: no load event) and waits for
// an element of the new page.
func (b *browser) goTo(hash, sel string) chromedp.Action[chromedp.Void] {
	return chromedp.Steps(
		b.eval(fmt.Sprintf("location.hash = %q", hash)),
		chromedp.WaitVisible(chromedp.CSS(sel)))
}

// eval runs a JavaScript statement in the page.
func (b *browser) eval(js string) chromedp.Action[chromedp.Void] {
	return chromedp.Func(func(ctx context.Context, t *chromedp.Target) error {
		_, err := chromedp.Evaluate[any](js)(ctx, t)
		return err
	})
}

// text is the innerText of the first element matching sel ("" if none).
func (b *browser) text(sel string) string {
	ctx, cancel := context.WithTimeout(b.ctx, 5*time.Second)
	defer cancel()
	js := fmt.Sprintf(`(() => { const e = document.querySelector(%q); return e ? e.innerText : ""; })()`, sel)
	s, err := chromedp.Run(ctx, chromedp.Evaluate[string](js))
	if err != nil {
		return ""
	}
	return s
}

// waitText waits until the element's text contains every want.
func (b *browser) waitText(sel string, d time.Duration, want ...string) string {
	b.t.Helper()
	deadline := time.Now().Add(d)
	for {
		got := b.text(sel)
		ok := true
		for _, w := range want {
			if !strings.Contains(got, w) {
				ok = false
			}
		}
		if ok {
			return got
		}
		if time.Now().After(deadline) {
			b.t.Fatalf("after %v, %s shows %q; want %q", d, sel, got, want)
		}
		time.Sleep(150 * time.Millisecond)
	}
}

// waitEnabled waits until the button can be pressed.
func (b *browser) waitEnabled(sel string, d time.Duration) {
	b.t.Helper()
	deadline := time.Now().Add(d)
	js := fmt.Sprintf(`(() => { const e = document.querySelector(%q); return !!e && !e.disabled; })()`, sel)
	for {
		ctx, cancel := context.WithTimeout(b.ctx, 5*time.Second)
		ok, _ := chromedp.Run(ctx, chromedp.Evaluate[bool](js))
		cancel()
		if ok {
			return
		}
		if time.Now().After(deadline) {
			b.t.Fatalf("after %v, %s is not enabled (%s)", d, sel, b.text("main"))
		}
		time.Sleep(150 * time.Millisecond)
	}
}

// shot saves a PNG of the whole page (of the window: with a dialog open).
func (b *browser) shot(name string) {
	b.t.Helper()
	b.run("settle before "+name, b.eval(`document.getElementById("toasts") && document.getElementById("toasts").replaceChildren()`),
		chromedp.Sleep(300*time.Millisecond))
	ctx, cancel := context.WithTimeout(b.ctx, 30*time.Second)
	defer cancel()
	capture := chromedp.FullScreenshot(100)
	if modal := b.text("#modal:not([hidden]) .modal-box"); modal != "" {
		capture = chromedp.CaptureScreenshot()
	}
	buf, err := chromedp.Run(ctx, capture)
	if err != nil {
		b.t.Fatalf("screenshot %s: %v", name, err)
	}
	if !bytes.HasPrefix(buf, []byte("\x89PNG\r\n\x1a\n")) || len(buf) < 5000 {
		b.t.Fatalf("screenshot %s: %d bytes, not a PNG of a page", name, len(buf))
	}
	if err := os.WriteFile(filepath.Join(b.dir, name+".png"), buf, 0o644); err != nil {
		b.t.Fatal(err)
	}
}

// confirm opens the action's confirmation, checks its text and confirms.
func (b *browser) confirm(action string, want ...string) string {
	b.t.Helper()
	b.waitEnabled("#action-"+action, 60*time.Second)
	b.run("press "+action, chromedp.Click(chromedp.CSS("#action-"+action)), chromedp.WaitVisible(chromedp.CSS("#modal-ok")))
	return b.waitText("#modal .modal-box", 10*time.Second, want...)
}

// TestConsoleBrowser runs the whole two-VM scenario from the console, in
// headless Chromium, against two agent processes in network namespaces
// with an etcd arbiter: log in (a wrong password refused), add both
// servers (fingerprint shown for confirmation), create the job (the
// pre-flight's problems of both sides shown at once first), see it
// replicating, force-stop vm1, press Failover, choose vm2's snapshot
// before-test among the confirmation's choices and confirm (the
// confirmation states who takes the service IP, who is fenced, what is
// lost, and, re-planned for the snapshot, the rollback and the newer
// data kept), see the service IP move to vm2 (ip -n NS addr), bring vm1 back,
// press Reverse, wait for replicating, press Failback: the IP is back on
// vm1. Then Verify, Switchover (the IP on vm2) and Failback, Pause and
// Resume, and Delete (gone from both agents). Screenshots of the main pages are saved
// (-update-screenshots writes them to docs/console/).
func TestConsoleBrowser(t *testing.T) {
	chromium := chromiumPath(t)
	lab := newConsoleLab(t)
	start := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	// vm2's volume on XFS (mounted before the agents start: their mount
	// namespaces see it): the target's snapshots and test failover are
	// reflink clones.
	xfs := lab.xfsDir("vm2-fs")
	etcd := lab.startEtcd()
	lab.startAgent("vm1", etcd)
	lab.startAgent("vm2", etcd)
	const password = "console-test-password"
	lab.startConsole(password)
	b := newBrowser(t, ctx, chromium, lab.ns["client"], lab.spki)
	t.Logf("lab up in %v: console %s (%s)", time.Since(start).Round(time.Millisecond), lab.url, lab.fp)

	// Log in: a wrong password is refused, the right one opens the page.
	b.run("open the console", chromedp.Navigate(lab.url+"/"), chromedp.WaitVisible(chromedp.CSS("#password")))
	b.shot("login")
	b.run("wrong password", chromedp.SendKeys(chromedp.CSS("#password"), "not-the-password"), chromedp.Click(chromedp.CSS("#login-submit")),
		chromedp.WaitVisible(chromedp.CSS("#login-error")))
	b.waitText("#login-error", 5*time.Second, "wrong password or token")
	b.run("log in", chromedp.SendKeys(chromedp.CSS("#password"), password), chromedp.Click(chromedp.CSS("#login-submit")),
		chromedp.WaitVisible(chromedp.CSS("#jobs-table")))
	b.waitText("#jobs-table", 10*time.Second, "No servers yet")

	// Add both servers: the console shows each agent's fingerprint, the
	// operator compares and pastes the token.
	b.run("servers page", b.goTo("#/servers", "#srv-name"))
	for _, host := range []string{"vm1", "vm2"} {
		addr := map[string]string{"vm1": "172.17.22.11", "vm2": "172.17.22.12"}[host]
		b.run("connect to "+host, chromedp.SetValue(chromedp.CSS("#srv-name"), host), chromedp.SetValue(chromedp.CSS("#srv-addr"), addr),
			chromedp.Click(chromedp.CSS("#srv-fetch")), chromedp.WaitVisible(chromedp.CSS("#srv-fp")))
		if got, want := b.text("#srv-fp"), lab.agentFingerprint(host); got != want {
			t.Fatalf("console shows %s's fingerprint %q, the agent's is %q", host, got, want)
		}
		if host == "vm2" {
			b.shot("add-server")
		}
		b.run("add "+host, chromedp.SetValue(chromedp.CSS("#srv-token"), lab.agentToken(host)), chromedp.Click(chromedp.CSS("#srv-add")))
		b.waitText(`#servers-table tr[data-server="`+host+`"]`, 15*time.Second, "yes")
	}
	servers := b.waitText("#servers-table", 15*time.Second, "172.17.22.11:6320", "172.17.22.12:6320")
	if strings.Contains(servers, "no:") {
		t.Fatalf("a server is unreachable: %s", servers)
	}

	// Create the job: first with a hook script missing on both hosts (every
	// problem of both sides at once, nothing created), then for real.
	vol1, vol2 := filepath.Join(lab.dir, "vm1.img"), filepath.Join(xfs, "vm2.img")
	b.run("create form", b.goTo("#/create", "#c-name"))
	b.waitText("#c-target", 10*time.Second, "vm2")
	b.run("fill the form",
		chromedp.SetValue(chromedp.CSS("#c-name"), "web"),
		chromedp.SetValue(chromedp.CSS("#c-source"), "vm1"),
		chromedp.SetValue(chromedp.CSS("#c-target"), "vm2"),
		chromedp.SetValue(chromedp.CSS("#c-volume"), vol1),
		chromedp.SetValue(chromedp.CSS("#c-target-volume"), vol2),
		chromedp.SetValue(chromedp.CSS("#c-size"), "32M"),
		chromedp.SetValue(chromedp.CSS("#c-service-ips"), "172.17.22.187/24@eth0"),
		chromedp.SetValue(chromedp.CSS("#c-monitor"), "interval=200ms,missed=5"),
		chromedp.SetValue(chromedp.CSS("#c-failover"), "manual"),
		chromedp.SetValue(chromedp.CSS("#c-arbiter"), "etcd"),
		chromedp.SetValue(chromedp.CSS("#c-lease-ttl"), "2s"),
		chromedp.SetValue(chromedp.CSS("#c-scripts"), "post-failover="+filepath.Join(lab.dir, "no-such-hook.sh")),
		chromedp.Click(chromedp.CSS("#c-create")))
	problems := b.waitText("#create-result", 30*time.Second, "nothing was changed", "vm1", "vm2", "no-such-hook.sh")
	t.Logf("pre-flight refused the create:\n%s", problems)
	b.shot("create-preflight")
	if _, err := os.Stat(vol2); err == nil {
		t.Fatalf("the refused create made %s", vol2)
	}
	b.run("create", b.eval(`document.querySelector("#c-scripts").value = ""`), chromedp.Click(chromedp.CSS("#c-create")))
	b.waitText("#create-message", 40*time.Second, "created job web", "replication handshake done")

	// The jobs table: the job replicating, PROTECTED.
	b.run("jobs page", b.goTo("#/", "#jobs-table"))
	row := `#jobs-table tr[data-job="web"]`
	b.waitText(row, 60*time.Second, "PROTECTED", "vm1 → vm2", "replicating", "consistent", "sync", "holds the lease", "target in sync")

	// Some writes through vm1's export, for the charts.
	lab.write(t, "vm1", 8<<20)
	b.run("job page", b.goTo("#/job/web", "#job-headline"))
	b.waitText("#job-events", 10*time.Second, "console", "created job web")
	b.waitText("#charts", 10*time.Second, "Throughput", "RPO")

	// A snapshot on the target, then a test failover of it, stopped.
	b.confirm("snapshot", "vm2 snapshots its copy", "crash-consistent")
	b.run("name the snapshot", chromedp.SetValue(chromedp.CSS("#in-name"), "before-test"), chromedp.Click(chromedp.CSS("#modal-ok")))
	b.waitText("#job-snapshots", 30*time.Second, "before-test", "manual")
	b.confirm("test-failover", "writable clone", "replication to vm2 goes on")
	b.run("clone the snapshot", chromedp.SetValue(chromedp.CSS("#in-snapshot"), "before-test"), chromedp.Click(chromedp.CSS("#modal-ok")))
	b.waitText("#test-failover-status", 30*time.Second, "before-test", "unix:")
	b.waitText("#job-headline", 10*time.Second, "PROTECTED")
	b.shot("job")
	b.confirm("stop-test-failover", "stops serving the test clone", "everything written to the test clone is discarded")
	b.run("confirm stop", chromedp.Click(chromedp.CSS("#modal-ok")))
	b.waitEnabled("#action-test-failover", 30*time.Second)
	b.run("phone", chromedp.EmulateViewport(390, 844), b.goTo("#/", row))
	b.waitText(row, 10*time.Second, "PROTECTED")
	b.shot("phone")
	b.run("desktop", chromedp.EmulateViewport(1400, 1000))
	b.run("jobs page", b.goTo("#/", row))
	b.waitText(row, 10*time.Second, "PROTECTED")
	b.shot("jobs")

	// The servers page with the job: each agent's version, probe and the
	// paths on which it hears its peer.
	b.run("servers page", b.goTo("#/servers", `#servers-table tr[data-server="vm1"]`))
	for _, host := range []string{"vm1", "vm2"} {
		b.waitText(`#servers-table tr[data-server="`+host+`"]`, 10*time.Second, "yes", "dev", "web: repl up, app up")
	}
	b.shot("servers")

	// vm1 dies: agent killed, links down. The console shows vm2's monitor
	// declaring it failed; the operator fails over.
	b.run("job page", b.goTo("#/job/web", "#job-headline"))
	tKill := time.Now()
	lab.procs["vm1"].kill()
	labRun(t, "ip", "-n", lab.ns["vm1"], "link", "set", "eth0", "down")
	labRun(t, "ip", "-n", lab.ns["vm1"], "link", "set", "eth1", "down")
	b.waitText("#job-countdown", 20*time.Second, "vm2 declared vm1 failed")
	// The snapshots on vm2 stay listed with vm1 dead (emptied here, so
	// only a list fetched with vm1 dead fills it again).
	b.run("empty the snapshot list", b.eval(`document.getElementById("job-snapshots").replaceChildren()`))
	b.waitText("#job-snapshots", 15*time.Second, "before-test", "manual")
	plan := b.confirm("failover", "vm2 will take 172.17.22.187 on eth0", "vm1 will be fenced", "epoch 2", "lease has expired", "writes vm2 does not hold are lost",
		"fail over to this snapshot")
	t.Logf("failover confirmation:\n%s", plan)
	b.shot("failover-confirm")
	// The confirmation offers vm2's snapshots; choosing one re-plans the
	// failover as a rollback to it.
	deadline := time.Now().Add(10 * time.Second)
	for !strings.Contains(b.text("#snapshot-choices-values"), "before-test") {
		if time.Now().After(deadline) {
			t.Fatalf("the failover's snapshot choices lack before-test: %q", b.text("#snapshot-choices-values"))
		}
		b.run("list the snapshot choices", b.eval(`(() => {
			const d = document.getElementById("snapshot-choices"), p = document.getElementById("snapshot-choices-values") || document.body.appendChild(Object.assign(document.createElement("pre"), {id: "snapshot-choices-values"}));
			p.textContent = d ? Array.from(d.options).map((o) => o.value).join(" ") : "";
		})()`))
		time.Sleep(100 * time.Millisecond)
	}
	b.run("choose the snapshot", b.eval(`(() => { const e = document.getElementById("in-snapshot"); e.value = "before-test"; e.dispatchEvent(new Event("change")); })()`))
	plan = b.waitText("#modal .modal-box", 10*time.Second, "at snapshot before-test", "vm2 keeps its current data as snapshot before-failover-epoch-2",
		"vm2 rolls its volume back to snapshot before-test", "goes back to snapshot before-test")
	t.Logf("failover to a snapshot, confirmation:\n%s", plan)
	b.run("confirm failover", chromedp.Click(chromedp.CSS("#modal-ok")))
	deadline = time.Now().Add(30 * time.Second)
	for !lab.hasIP("vm2", "172.17.22.187") {
		if time.Now().After(deadline) {
			t.Fatalf("vm2 did not take 172.17.22.187 within 30 s of the failover: %s", b.text("main"))
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Logf("vm2 holds the service IP %v after vm1 was killed", time.Since(tKill).Round(time.Millisecond))
	b.waitText("#job-headline", 20*time.Second, "FAILED OVER")
	b.waitText("#job-events", 10*time.Second, "failover to snapshot before-test", "rolled the volume back to snapshot before-test")

	// vm1 comes back fenced; Reverse makes it vm2's target.
	labRun(t, "ip", "-n", lab.ns["vm1"], "link", "set", "eth0", "up")
	labRun(t, "ip", "-n", lab.ns["vm1"], "link", "set", "eth1", "up")
	lab.startAgent("vm1", etcd)
	b.waitText(`#job-sides tr[data-side="vm1"]`, 30*time.Second, "superseded")
	if lab.hasIP("vm1", "172.17.22.187") {
		t.Fatal("the returned vm1 holds the service IP")
	}
	b.waitText("#job-snapshots", 10*time.Second, "No target answers now")
	b.shot("failed-over")
	b.confirm("reverse", "vm1 (fenced since the failover) becomes the target of vm2", "only the chunks that differ")
	b.run("confirm reverse", chromedp.Click(chromedp.CSS("#modal-ok")))
	b.waitText("#job-head", 60*time.Second, "PROTECTED", "vm2 → vm1")

	// Failback: the planned switchover home.
	b.confirm("failback", "vm2 releases 172.17.22.187; vm1 takes 172.17.22.187 on eth0", "no acknowledged write is lost")
	b.run("confirm failback", chromedp.Click(chromedp.CSS("#modal-ok")))
	b.waitText("#job-head", 60*time.Second, "PROTECTED", "vm1 → vm2")
	deadline = time.Now().Add(20 * time.Second)
	for !lab.hasIP("vm1", "172.17.22.187") || lab.hasIP("vm2", "172.17.22.187") {
		if time.Now().After(deadline) {
			t.Fatalf("after the failback: vm1 has the IP %t, vm2 %t", lab.hasIP("vm1", "172.17.22.187"), lab.hasIP("vm2", "172.17.22.187"))
		}
		time.Sleep(100 * time.Millisecond)
	}
	b.waitText("#job-events", 30*time.Second, "failback done: vm1 is the source")

	// Verify from the console: both sides identical.
	b.confirm("verify", "read and checksum")
	b.run("confirm verify", chromedp.Click(chromedp.CSS("#modal-ok")))
	b.waitText("#job-events", 60*time.Second, "source and target are identical")

	// Switchover to vm2 and Failback home again: the planned move both ways.
	b.confirm("switchover", "vm1 holds new writes and drains", "vm1 releases 172.17.22.187; vm2 takes 172.17.22.187 on eth0", "no acknowledged write is lost")
	b.run("confirm switchover", chromedp.Click(chromedp.CSS("#modal-ok")))
	b.waitText("#job-head", 60*time.Second, "PROTECTED", "vm2 → vm1")
	if !lab.hasIP("vm2", "172.17.22.187") || lab.hasIP("vm1", "172.17.22.187") {
		t.Fatalf("after the switchover: vm1 has the IP %t, vm2 %t", lab.hasIP("vm1", "172.17.22.187"), lab.hasIP("vm2", "172.17.22.187"))
	}
	b.confirm("failback", "vm2 releases 172.17.22.187; vm1 takes 172.17.22.187 on eth0")
	b.run("confirm failback", chromedp.Click(chromedp.CSS("#modal-ok")))
	b.waitText("#job-head", 60*time.Second, "PROTECTED", "vm1 → vm2")

	// Pause (the job says it is not protected), then Resume.
	b.confirm("pause", "vm1 stops shipping writes to vm2", "NOT PROTECTED until Resume", "every write since the pause is missing on vm2")
	b.run("confirm pause", chromedp.Click(chromedp.CSS("#modal-ok")))
	b.waitText("#job-head", 30*time.Second, "NOT PROTECTED", "replication paused by the operator")
	b.confirm("resume", "vm1 resyncs", "then replicates every write")
	b.run("confirm resume", chromedp.Click(chromedp.CSS("#modal-ok")))
	b.waitText("#job-head", 60*time.Second, "PROTECTED", "vm1 → vm2", "every write on vm1 is replicated to vm2")

	// Delete: gone from both agents (the jobs table lists what both report).
	b.confirm("delete", "Delete job web from vm1 and vm2", "removes its state on both")
	b.run("confirm delete", chromedp.Click(chromedp.CSS("#modal-ok")))
	b.waitText("#jobs-table", 30*time.Second, "No jobs yet")
	t.Logf("whole scenario from the console in %v", time.Since(start).Round(time.Millisecond))
}

// write writes n random bytes through the job's export on host (its
// Unix socket STATE/run/web.sock: the file system is shared with the
// namespaces) in 256 KiB writes over about 4 s, and flushes.
func (l *consoleLab) write(t *testing.T, host string, n int) {
	t.Helper()
	sock := filepath.Join(l.dir, host, "run", "web.sock")
	c, err := nbdclient.Dial("unix", sock, "web")
	if err != nil {
		t.Fatalf("dial %s's export %s: %v", host, sock, err)
	}
	defer c.Close()
	buf := make([]byte, 256<<10)
	for off := 0; off < n; off += len(buf) {
		rand.Read(buf)
		if _, err := c.WriteAt(buf, int64(off)); err != nil {
			t.Fatal(err)
		}
		time.Sleep(time.Duration(len(buf)) * 4 * time.Second / time.Duration(n)) // over about 4 s
	}
	if err := c.Flush(); err != nil {
		t.Fatal(err)
	}
}
