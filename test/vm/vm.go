// Package vm is doppel's qemu VM tier: stock Debian kernels (declared as
// data in [Kernels], fetched with apt-get download) booted under qemu with
// an initramfs that holds busybox, e2fsprogs, a static doppel and the
// bundles of host programs a test asks for (fio, lvm), on a
// private virtual network (a network namespace with one bridge per subnet:
// application 172.17.22.0/24, replication 192.168.0.0/24) so that the real
// /dev/nbdN, XDP and IP takeover can be tested where the host kernel cannot.
//
// A test asks for a [Lab] of guests, drives each through a virtio-serial
// control port (commands in, output and exit codes out), and gets every
// qemu process and the namespace removed in t.Cleanup. Guest consoles are written to the
// test log only when the test fails.
package vm

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	_ "embed"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

//go:embed init.sh
var initScript []byte

// The lab's subnets (/24 each) and the service IP that follows the
// active side.
const (
	AppNet    = "172.17.22"
	ReplNet   = "192.168.0"
	ServiceIP = "172.17.22.187"
)

// Assets are the files every guest boots from.
type Assets struct {
	Kernel  *KernelImage
	Initrd  string // base archive + doppel overlay, concatenated
	base    string // the base archive (cache)
	overlay []byte // the doppel overlay archive
	work    string // temporary directory of the above

	mu      sync.Mutex
	initrds map[string]string // bundle names -> base + bundles + overlay
}

var (
	assetsOnce sync.Once
	assets     *Assets
	assetsErr  error
	assetsSkip string
)

// repoRoot is the module root (test/vm is two levels below it).
func repoRoot() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Clean(filepath.Join(filepath.Dir(file), "..", ".."))
}

// CacheDir is where kernels and images are kept between runs (gitignored).
func CacheDir() string { return filepath.Join(repoRoot(), "test", "vm", "cache") }

// Need skips t when this tier cannot run here, with the reason: -short,
// not root, or no qemu-system-x86_64.
func Need(t testing.TB) {
	t.Helper()
	if testing.Short() {
		t.Skip("VM tier skipped in -short mode")
	}
	if _, err := exec.LookPath("qemu-system-x86_64"); err != nil {
		t.Skip("qemu-system-x86_64 is not installed: the VM tier needs it (make deps installs qemu-system-x86)")
	}
	if os.Geteuid() != 0 {
		t.Skip("needs root: the VM tier creates network namespaces and tap devices")
	}
}

// GetAssets downloads and builds (once per test binary) what guests boot.
func GetAssets(t testing.TB) *Assets {
	t.Helper()
	Need(t)
	assetsOnce.Do(func() { assets, assetsSkip, assetsErr = buildAssets() })
	if assetsSkip != "" {
		t.Skip(assetsSkip)
	}
	if assetsErr != nil {
		t.Fatalf("VM tier assets: %v", assetsErr)
	}
	return assets
}

// lockCache takes the cache's lock (one test binary at a time fills it);
// the returned function releases it.
func lockCache(cache string) (func(), error) {
	if err := os.MkdirAll(cache, 0o755); err != nil {
		return nil, err
	}
	lock, err := os.OpenFile(filepath.Join(cache, ".lock"), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return nil, err
	}
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX); err != nil {
		lock.Close()
		return nil, fmt.Errorf("lock %s: %w", cache, err)
	}
	return func() { lock.Close() }, nil
}

// cachedArchive returns the archive prefix-key.cpio in cache, built with
// build when missing; archives of the same prefix and another key (other
// kernels, tools or /init versions) are stale and removed. The caller
// holds the cache's lock.
func cachedArchive(cache, prefix, key string, build func(io.Writer) error) (string, error) {
	p := filepath.Join(cache, prefix+"-"+key+".cpio")
	old, _ := filepath.Glob(filepath.Join(cache, prefix+"-*.cpio"))
	for _, o := range old {
		if o != p {
			os.Remove(o)
		}
	}
	if _, err := os.Stat(p); err == nil {
		return p, nil
	}
	var buf bytes.Buffer
	if err := build(&buf); err != nil {
		return "", fmt.Errorf("initramfs: %w", err)
	}
	return p, writeAtomic(p, buf.Bytes())
}

func buildAssets() (*Assets, string, error) {
	cache := CacheDir()
	unlock, err := lockCache(cache)
	if err != nil {
		return nil, "", err
	}
	defer unlock()
	k := Kernels[0]
	if pkg, err := cachedKernel(cache, k); err == nil && pkg == "" {
		if _, err := exec.LookPath("apt-get"); err != nil {
			return nil, "the VM tier downloads Debian kernels with apt-get, which this host lacks (and " + cache + " holds none)", nil
		}
	}
	start := time.Now()
	img, err := fetchKernel(cache, k)
	if err != nil {
		return nil, "", err
	}
	// The base archive changes only with the kernel, its modules, the
	// tools and /init.
	dep, err := os.ReadFile(filepath.Join(img.ModDir, "modules.dep"))
	if err != nil {
		return nil, "", err
	}
	key := fmt.Sprintf("%s-%x", img.Package, crc(fmt.Appendf(initScript, "%v%v%v%s", baseTools, k.Modules, k.Extra, dep)))
	base, err := cachedArchive(cache, "initrd-base", key, func(w io.Writer) error { return buildBase(w, img, initScript) })
	if err != nil {
		return nil, "", err
	}
	work, err := os.MkdirTemp("", "doppel-vm-")
	if err != nil {
		return nil, "", err
	}
	// The binary under test: static, built from this tree (or given by
	// DOPPEL_VM_BINARY, which must be a static build).
	doppel := os.Getenv("DOPPEL_VM_BINARY")
	if doppel == "" {
		doppel = filepath.Join(work, "doppel")
		defer os.Remove(doppel)
		gobin := goCommand()
		cmd := exec.Command(gobin, "build", "-trimpath", "-ldflags", "-s -w", "-o", doppel, "./cmd/doppel")
		cmd.Dir = repoRoot()
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			os.RemoveAll(work)
			return nil, "", fmt.Errorf("build static doppel: %v: %s", err, out)
		}
	}
	var overlay bytes.Buffer
	if err := buildOverlay(&overlay, doppel); err != nil {
		os.RemoveAll(work)
		return nil, "", err
	}
	as := &Assets{Kernel: img, work: work, base: base, overlay: overlay.Bytes(), initrds: map[string]string{}}
	if as.Initrd, err = as.initrd(nil); err != nil {
		os.RemoveAll(work)
		return nil, "", err
	}
	st, _ := os.Stat(as.Initrd)
	fmt.Fprintf(os.Stderr, "vm: kernel %s (%s), initramfs %d MiB, prepared in %v\n",
		img.Package, img.Release, st.Size()>>20, time.Since(start).Round(time.Millisecond))
	return as, "", nil
}

// initrd returns the initramfs of guests with bundles: the base archive,
// each bundle's (built and cached on first use) and the doppel overlay.
func (a *Assets) initrd(bundles []Bundle) (string, error) {
	var names []string
	for _, b := range bundles {
		names = append(names, b.Name)
	}
	id := strings.Join(names, "+")
	a.mu.Lock()
	defer a.mu.Unlock()
	if p, ok := a.initrds[id]; ok {
		return p, nil
	}
	parts := []string{a.base}
	if len(bundles) > 0 {
		cache := CacheDir()
		unlock, err := lockCache(cache)
		if err != nil {
			return "", err
		}
		defer unlock()
		for _, b := range bundles {
			p, err := cachedArchive(cache, "initrd-bundle-"+b.Name, fmt.Sprintf("%x", b.key()), func(w io.Writer) error { return buildBundle(w, b) })
			if err != nil {
				return "", err
			}
			parts = append(parts, p)
		}
	}
	var buf bytes.Buffer
	for _, p := range parts {
		b, err := os.ReadFile(p)
		if err != nil {
			return "", err
		}
		buf.Write(b)
	}
	buf.Write(a.overlay)
	name := "initrd"
	if id != "" {
		name += "-" + id
	}
	out := filepath.Join(a.work, name)
	if err := os.WriteFile(out, buf.Bytes(), 0o644); err != nil {
		return "", err
	}
	if id != "" {
		fmt.Fprintf(os.Stderr, "vm: initramfs with %s: %d MiB\n", id, buf.Len()>>20)
	}
	a.initrds[id] = out
	return out, nil
}

// CleanupAssets removes the per-run files of GetAssets (TestMain calls it).
func CleanupAssets() {
	if assets != nil {
		os.RemoveAll(assets.work)
	}
}

func crc(b []byte) uint32 {
	var h uint32 = 2166136261
	for _, c := range b {
		h = (h ^ uint32(c)) * 16777619
	}
	return h
}

func writeAtomic(path string, b []byte) error {
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, b, 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

// GuestConfig describes one guest of a lab.
type GuestConfig struct {
	Name  string // hostname; also names its log
	MemMB int    // default 512
	// Bundles are added to the guest's initramfs (FioBundle: 80 MiB
	// more to boot; LVMBundle).
	Bundles []Bundle
	// Files are copied into the guest: guest path -> host path.
	Files map[string]string
	// DiskMB > 0 gives the guest a disk (virtio-blk, a sparse file of the
	// lab, ext4 made at first boot) mounted at /var/lib/doppel instead of
	// a tmpfs: what is written there survives Lab.Restart.
	DiskMB int
	// RawDiskMB > 0 gives the guest another disk, blank, that nothing
	// uses: its device is the virtio disk of serial doppel-raw
	// (RawDisk finds it).
	RawDiskMB int
}

// RawDisk is a shell expression for the device of a guest's raw disk
// (GuestConfig.RawDiskMB).
const RawDisk = `$(for d in /sys/block/vd*; do [ "$(cat $d/serial 2>/dev/null)" = doppel-raw ] && echo /dev/${d##*/}; done)`

// Lab is a set of guests on one private network: a network namespace with
// the bridges br-app (172.17.22.0/24) and br-repl (192.168.0.0/24). Guest
// i (from 1) has app 172.17.22.(10+i) and repl 192.168.0.(10+i).
type Lab struct {
	t      testing.TB
	NS     string
	Guests []*Guest
	dir    string // sockets and logs
	assets *Assets
}

// Guest is one running qemu.
type Guest struct {
	Name    string
	N       int    // 1-based
	AppIP   string // without prefix length
	ReplIP  string
	Uptime  time.Duration // the guest's uptime when it was ready
	cfg     GuestConfig
	cmd     *exec.Cmd
	console string // path of the console log
	ctl     net.Conn
	rd      *bufio.Reader
	mu      sync.Mutex
	seq     int
	exited  chan struct{}
}

// bootTimeout bounds a guest's boot, generously: software emulation on a
// shared 2-core machine.
const bootTimeout = 3 * time.Minute

// NewLab boots guests (in parallel) and returns when every one is ready.
func NewLab(t testing.TB, guests ...GuestConfig) *Lab {
	t.Helper()
	a := GetAssets(t)
	var suffix [4]byte
	rand.Read(suffix[:])
	l := &Lab{t: t, NS: "dvm-" + hex.EncodeToString(suffix[:]), assets: a}
	dir, err := os.MkdirTemp("", "dvm-")
	if err != nil {
		t.Fatal(err)
	}
	l.dir = dir
	t.Cleanup(func() { os.RemoveAll(dir) })
	if out, err := exec.Command("ip", "netns", "add", l.NS).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add: %v: %s", err, out)
	}
	t.Cleanup(func() {
		if out, err := exec.Command("ip", "netns", "del", l.NS).CombinedOutput(); err != nil {
			t.Errorf("ip netns del %s: %v: %s", l.NS, err, out)
		}
	})
	ip := func(args ...string) {
		t.Helper()
		if out, err := exec.Command("ip", append([]string{"-n", l.NS}, args...)...).CombinedOutput(); err != nil {
			t.Fatalf("ip %s: %v: %s", strings.Join(args, " "), err, out)
		}
	}
	ip("link", "set", "lo", "up")
	for _, br := range []string{"br-app", "br-repl"} {
		ip("link", "add", br, "type", "bridge", "stp_state", "0", "forward_delay", "0")
		ip("link", "set", br, "up")
	}
	for i, gc := range guests {
		n := i + 1
		g := &Guest{
			Name: gc.Name, N: n,
			AppIP:  fmt.Sprintf("%s.%d", AppNet, 10+n),
			ReplIP: fmt.Sprintf("%s.%d", ReplNet, 10+n),
		}
		if g.Name == "" {
			g.Name = "vm" + strconv.Itoa(n)
		}
		g.cfg = gc
		for _, nic := range []struct{ tap, br string }{{fmt.Sprintf("tap%da", n), "br-app"}, {fmt.Sprintf("tap%dr", n), "br-repl"}} {
			ip("tuntap", "add", "dev", nic.tap, "mode", "tap")
			ip("link", "set", nic.tap, "master", nic.br, "up")
		}
		l.start(g, gc, a)
		l.Guests = append(l.Guests, g)
	}
	// Runs before the guests are killed (cleanups run last-in first-out).
	t.Cleanup(func() {
		if t.Failed() {
			for _, g := range l.Guests {
				b, _ := os.ReadFile(g.console)
				t.Logf("==== console of %s ====\n%s", g.Name, b)
				if logs := g.nodeLogs(); logs != "" {
					t.Logf("==== logs of %s (/run/*.log) ====\n%s", g.Name, logs)
				}
			}
		}
	})
	var wg sync.WaitGroup
	errs := make([]error, len(l.Guests))
	for i, g := range l.Guests {
		wg.Go(func() { errs[i] = g.waitReady() })
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		t.Fatal(err)
	}
	var ups []string
	for _, g := range l.Guests {
		ups = append(ups, fmt.Sprintf("%s %v", g.Name, g.Uptime.Round(10*time.Millisecond)))
	}
	t.Logf("guests ready (guest uptime: %s)", strings.Join(ups, ", "))
	return l
}

// Restart boots g again after g.Kill (or kills it first), on the same
// NICs and with the same disk, and returns when it is ready. Processes and
// tmpfs contents are gone, as after a power cut.
func (l *Lab) Restart(g *Guest) {
	t := l.t
	t.Helper()
	g.Kill()
	start := time.Now()
	g.seq = 0
	l.start(g, g.cfg, l.assets)
	if err := g.waitReady(); err != nil {
		t.Fatal(err)
	}
	t.Logf("%s restarted in %v (guest uptime %v)", g.Name, time.Since(start).Round(time.Millisecond), g.Uptime.Round(10*time.Millisecond))
}

// mac returns the MAC of guest n's NIC (role 0 app, 1 repl).
func mac(n, role int) string { return fmt.Sprintf("52:54:00:d0:%02x:%02x", n, role) }

func (l *Lab) start(g *Guest, gc GuestConfig, a *Assets) {
	t := l.t
	sock := filepath.Join(l.dir, g.Name+".sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	g.console = filepath.Join(l.dir, g.Name+".console")
	mem := gc.MemMB
	if mem == 0 {
		mem = 512
	}
	append_ := strings.Join([]string{
		"console=ttyS0", "panic=-1", "quiet", "loglevel=4", "8250.nr_uarts=1",
		"doppel.hostname=" + g.Name,
		"doppel.modules=" + strings.Join(a.Kernel.Load, ","),
		"doppel.appmac=" + mac(g.N, 0), fmt.Sprintf("doppel.appip=%s/24", g.AppIP),
		"doppel.replmac=" + mac(g.N, 1), fmt.Sprintf("doppel.replip=%s/24", g.ReplIP),
	}, " ")
	initrd, err := a.initrd(gc.Bundles)
	if err != nil {
		t.Fatalf("%s: initramfs: %v", g.Name, err)
	}
	if len(gc.Files) > 0 {
		initrd = l.withFiles(g.Name, initrd, gc.Files)
	}
	args := []string{"netns", "exec", l.NS, "qemu-system-x86_64"}
	if kvmWorks(a.Kernel.Vmlinuz) {
		args = append(args, "-accel", "kvm", "-accel", "tcg")
	} else {
		args = append(args, "-accel", "tcg")
	}
	// qboot boots a -kernel in a fraction of SeaBIOS's time.
	if _, err := os.Stat("/usr/share/qemu/qboot.rom"); err == nil {
		args = append(args, "-bios", "qboot.rom")
	}
	args = append(args,
		"-cpu", "max", "-smp", "1", "-m", strconv.Itoa(mem),
		"-nographic", "-monitor", "none", "-no-reboot", "-nodefaults",
		"-kernel", a.Kernel.Vmlinuz, "-initrd", initrd, "-append", append_,
		"-serial", "file:"+g.console,
		// The control channel: a virtio-serial port (the emulated 8250
		// UART occasionally held a reply back under load).
		"-device", "virtio-serial-pci,id=vser",
		"-chardev", "socket,id=ctl,path="+sock,
		"-device", "virtserialport,bus=vser.0,chardev=ctl,name=doppel.ctl",
		"-device", "virtio-rng-pci",
	)
	for _, d := range []struct {
		mb     int
		serial string
	}{{gc.DiskMB, "doppel-state"}, {gc.RawDiskMB, "doppel-raw"}} {
		if d.mb <= 0 {
			continue
		}
		disk := filepath.Join(l.dir, g.Name+"."+d.serial)
		f, err := os.OpenFile(disk, os.O_CREATE|os.O_RDWR, 0o644)
		if err == nil {
			err = errors.Join(f.Truncate(int64(d.mb)<<20), f.Close())
		}
		if err != nil {
			t.Fatalf("%s: disk: %v", g.Name, err)
		}
		// cache=unsafe: a killed qemu has still handed every write it
		// received to the host's page cache; only the host crashing
		// would lose them.
		args = append(args, "-drive", "file="+disk+",if=none,id="+d.serial+",format=raw,cache=unsafe",
			"-device", "virtio-blk-pci,drive="+d.serial+",serial="+d.serial)
	}
	for role, tap := range []string{fmt.Sprintf("tap%da", g.N), fmt.Sprintf("tap%dr", g.N)} {
		id := fmt.Sprintf("n%d", role)
		args = append(args,
			"-netdev", fmt.Sprintf("tap,id=%s,ifname=%s,script=no,downscript=no", id, tap),
			"-device", fmt.Sprintf("virtio-net-pci,netdev=%s,mac=%s,romfile=", id, mac(g.N, role)))
	}
	qlog, err := os.Create(filepath.Join(l.dir, g.Name+".qemu"))
	if err != nil {
		t.Fatal(err)
	}
	g.cmd = exec.Command("ip", args...) // ip netns exec execs qemu: same PID
	g.cmd.Stdout, g.cmd.Stderr = qlog, qlog
	if err := g.cmd.Start(); err != nil {
		qlog.Close()
		t.Fatalf("start qemu: %v", err)
	}
	g.exited = make(chan struct{})
	go func() { g.cmd.Wait(); qlog.Close(); close(g.exited) }()
	t.Cleanup(g.Kill)
	t.Cleanup(func() {
		if t.Failed() {
			b, _ := os.ReadFile(qlog.Name())
			if len(b) > 0 {
				t.Logf("==== qemu of %s ====\n%s", g.Name, b)
			}
		}
	})
	type res struct {
		c   net.Conn
		err error
	}
	ch := make(chan res, 1)
	go func() { c, err := ln.Accept(); ch <- res{c, err} }()
	select {
	case r := <-ch:
		if r.err != nil {
			t.Fatalf("%s: control channel: %v", g.Name, r.err)
		}
		g.ctl = r.c
		g.rd = bufio.NewReaderSize(r.c, 64<<10)
	case <-g.exited:
		b, _ := os.ReadFile(qlog.Name())
		t.Fatalf("%s: qemu exited at start: %s", g.Name, b)
	case <-time.After(30 * time.Second):
		t.Fatalf("%s: qemu did not connect its control channel", g.Name)
	}
}

// withFiles writes a per-guest initramfs: initrd and an archive of files.
func (l *Lab) withFiles(name, initrd string, files map[string]string) string {
	t := l.t
	b, err := os.ReadFile(initrd)
	if err != nil {
		t.Fatal(err)
	}
	buf := bytes.NewBuffer(b)
	c := newCPIO(buf)
	for guest, host := range files {
		c.hostFile(host, guest)
	}
	if err := c.close(); err != nil {
		t.Fatalf("files for %s: %v", name, err)
	}
	out := filepath.Join(l.dir, name+".initrd")
	if err := os.WriteFile(out, buf.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
	return out
}

// GoTestBinary builds a static test binary of pkg (a path from the module
// root, like "./blockdev/kernel") for a guest.
func GoTestBinary(t testing.TB, pkg string) string {
	t.Helper()
	out := filepath.Join(t.TempDir(), filepath.Base(pkg)+".test")
	gobin := goCommand()
	cmd := exec.Command(gobin, "test", "-c", "-trimpath", "-o", out, pkg)
	cmd.Dir = repoRoot()
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go test -c %s: %v: %s", pkg, err, b)
	}
	return out
}

var (
	kvmOnce sync.Once
	kvmOK   bool
)

// kvmWorks reports whether KVM can run our kernel: /dev/kvm opens and a
// probe boot under -accel kvm (the kernel panics at once for want of a
// root filesystem, and qemu exits) succeeds. Some nested hosts expose a
// /dev/kvm that aborts qemu.
func kvmWorks(vmlinuz string) bool {
	kvmOnce.Do(func() {
		f, err := os.OpenFile("/dev/kvm", os.O_RDWR, 0)
		if err != nil {
			return
		}
		f.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		err = exec.CommandContext(ctx, "qemu-system-x86_64", "-accel", "kvm", "-cpu", "max", "-m", "256",
			"-nographic", "-nodefaults", "-monitor", "none", "-no-reboot",
			"-kernel", vmlinuz, "-append", "panic=-1").Run()
		kvmOK = err == nil
	})
	return kvmOK
}

func (g *Guest) waitReady() error {
	start := time.Now()
	g.ctl.SetReadDeadline(start.Add(bootTimeout))
	defer g.ctl.SetReadDeadline(time.Time{})
	for {
		line, err := g.rd.ReadString('\n')
		if err != nil {
			return fmt.Errorf("%s: no ready signal after %v: %w", g.Name, time.Since(start).Round(time.Millisecond), err)
		}
		if up, ok := strings.CutPrefix(strings.TrimSpace(line), "@@READY"); ok {
			// The guest's uptime at ready: its own view of the boot.
			if s, err := strconv.ParseFloat(strings.TrimSpace(up), 64); err == nil {
				g.Uptime = time.Duration(s * float64(time.Second))
			}
			return nil
		}
	}
}

// Kill stops the guest's qemu at once (SIGKILL by PID), like pulling the
// plug. It is safe to call more than once.
func (g *Guest) Kill() {
	if g.cmd == nil || g.cmd.Process == nil {
		return
	}
	select {
	case <-g.exited:
		return
	default:
	}
	g.cmd.Process.Kill()
	<-g.exited
	if g.ctl != nil {
		g.ctl.Close()
	}
}

// Run runs script with sh in the guest and returns its combined output and
// exit code. err is set only when the control channel fails or ctx ends.
func (g *Guest) Run(ctx context.Context, script string) (string, int, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.seq++
	id := strconv.Itoa(g.seq)
	if dl, ok := ctx.Deadline(); ok {
		g.ctl.SetDeadline(dl)
		defer g.ctl.SetDeadline(time.Time{})
	}
	stop := context.AfterFunc(ctx, func() { g.ctl.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	msg := id + " " + base64.StdEncoding.EncodeToString([]byte(script)) + "\n"
	if _, err := g.ctl.Write([]byte(msg)); err != nil {
		return "", -1, fmt.Errorf("%s: send command: %w", g.Name, err)
	}
	out, rc, err := readReply(g.rd, id)
	if err != nil {
		return out, rc, fmt.Errorf("%s: %w", g.Name, err)
	}
	return out, rc, nil
}

// readReply reads "@@BEGIN id\n" output "\n@@END id rc\n" from r.
func readReply(r *bufio.Reader, id string) (string, int, error) {
	begin := "@@BEGIN " + id
	for {
		line, err := r.ReadString('\n')
		if err != nil {
			return "", -1, fmt.Errorf("waiting for command %s: %w", id, err)
		}
		if strings.TrimRight(line, "\r\n") == begin {
			break
		}
	}
	end := "\n@@END " + id + " "
	var out strings.Builder
	for {
		line, err := r.ReadString('\n')
		if err != nil {
			return out.String(), -1, fmt.Errorf("reading output of command %s: %w", id, err)
		}
		out.WriteString(line)
		s := out.String()
		if i := strings.LastIndex(s, end); i >= 0 && strings.HasSuffix(s, "\n") {
			rcs := strings.TrimSpace(s[i+len(end):])
			rc, err := strconv.Atoi(rcs)
			if err != nil {
				return s[:i], -1, fmt.Errorf("command %s: bad exit code %q", id, rcs)
			}
			return s[:i], rc, nil
		}
	}
}

// Start runs command in the background of the guest, detached from the
// control channel, with its output in /run/NAME.log: the node logs written
// to the test log when the test fails.
func (g *Guest) Start(t testing.TB, name, command string) {
	t.Helper()
	g.MustRun(t, 30*time.Second, fmt.Sprintf("setsid sh -c %s >/run/%s.log 2>&1 </dev/null &", shellQuote(command), name))
}

// nodeLogs returns the guest's /run/*.log files and processes, or "" when
// it is gone.
func (g *Guest) nodeLogs() string {
	select {
	case <-g.exited:
		return ""
	default:
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	out, _, err := g.Run(ctx, `for f in /run/*.log; do [ -e "$f" ] && { echo "--- $f"; tail -n 200 "$f"; }; done
echo "--- ps"; ps -o pid,ppid,stat,rss,args`)
	if err != nil {
		return ""
	}
	return out
}

func shellQuote(s string) string { return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'" }

// MustRun runs script and fails t unless it exits 0.
func (g *Guest) MustRun(t testing.TB, timeout time.Duration, script string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	out, rc, err := g.Run(ctx, script)
	if err != nil {
		t.Fatalf("%s: %v\n%s", g.Name, err, out)
	}
	if rc != 0 {
		t.Fatalf("%s: exit %d: %s\n%s", g.Name, rc, script, out)
	}
	return out
}

// guestNow prints the guest's wall clock with microseconds (busybox date
// has no %N; adjtimex shows the kernel's timeval).
const guestNow = `adjtimex | awk '/time.tv_sec/ {s=$2} /time.tv_usec/ {u=$2} END {printf "%d.%06d\n", s, u}'`

// parseGuestTime reads guestNow's output.
func parseGuestTime(s string) (time.Time, error) {
	sec, usec, ok := strings.Cut(strings.TrimSpace(s), ".")
	digits := func(s string) bool { return s != "" && strings.Trim(s, "0123456789") == "" }
	if !ok || len(usec) != 6 || !digits(sec) || !digits(usec) || len(sec) > 12 {
		return time.Time{}, fmt.Errorf("guest time %q: want SECONDS.MICROSECONDS", s)
	}
	a, err1 := strconv.ParseInt(sec, 10, 64)
	b, err2 := strconv.ParseInt(usec, 10, 64)
	if err := errors.Join(err1, err2); err != nil {
		return time.Time{}, fmt.Errorf("guest time %q: %w", s, err)
	}
	return time.Unix(a, b*1000), nil
}

// Clock is a guest's wall clock relative to the host's: guest time minus
// Offset is host time, within ±Error. Guests set their clocks from the
// emulated RTC (whole seconds), so timestamps taken in different guests
// are compared only after this correction.
type Clock struct {
	Offset, Error time.Duration
}

// Host converts a guest timestamp to host time.
func (c Clock) Host(guest time.Time) time.Time { return guest.Add(-c.Offset) }

// Clock measures the guest's clock against the host's through the control
// channel: of several round trips, the shortest bounds the error.
func (g *Guest) Clock(t testing.TB) Clock {
	t.Helper()
	best := Clock{Error: time.Hour}
	for range 5 {
		before := time.Now()
		out := g.MustRun(t, 30*time.Second, guestNow)
		after := time.Now()
		gt, err := parseGuestTime(out)
		if err != nil {
			t.Fatalf("%s: %v", g.Name, err)
		}
		half := after.Sub(before) / 2
		if half < best.Error {
			best = Clock{Offset: gt.Sub(before.Add(half)), Error: half}
		}
	}
	return best
}

// goCommand is the go command that runs this test: the one on PATH, else
// the toolchain's own (go test sets GOROOT for the binaries it runs).
func goCommand() string {
	if p, err := exec.LookPath("go"); err == nil {
		return p
	}
	if root := os.Getenv("GOROOT"); root != "" {
		return filepath.Join(root, "bin", "go")
	}
	return "go"
}
