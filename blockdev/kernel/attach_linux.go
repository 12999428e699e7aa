package kernel

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/doppelha/doppel/blockdev/nbdproto"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"golang.org/x/sys/unix"
)

// Config describes one attach.
type Config struct {
	// Device is "/dev/nbdN" (or "nbdN"); empty lets the kernel pick a free
	// device (creating one when all are in use).
	Device string
	// Serve runs one server connection (negotiation, then transmission),
	// like [blockdev.Server.ServeConn]. Attach negotiates on the other end
	// of each socket pair, as nbd-client does, then hands it to the kernel.
	Serve ServeFunc
	// Export is the export name asked for ("" is the default export).
	Export string
	// BlockSize is the logical block size: a power of two from 512 to 4096.
	// 0 picks the server's minimum block size, else 4096 when the size is a
	// multiple of it, else 512.
	BlockSize int64
	// Connections is the number of socket pairs (default 1); the kernel
	// spreads requests over them. More than one needs CAN_MULTI_CONN.
	Connections int
	// Timeout is the per-request timeout after which the kernel fails a
	// request with EIO; 0 means none (the kernel waits, logging a warning
	// every 30 s), which is what a replicated volume wants. Whole seconds.
	Timeout time.Duration
	// DeadConnTimeout is how long the kernel waits for a dead connection to
	// be replaced before failing its requests (0: fail at once). Whole
	// seconds.
	DeadConnTimeout time.Duration
	// ReadOnly marks the device read-only even if the export is writable.
	ReadOnly bool
	// BackendID names the backend in /sys/block/nbdN/backend.
	BackendID string
	// Log receives progress messages; nil discards them.
	Log *slog.Logger
}

// negotiationTimeout bounds the handshake on each connection.
const negotiationTimeout = 30 * time.Second

// host is the part of the system Attach touches besides netlink, so that
// tests can point it at a fake sysfs tree and a fake modprobe.
type host struct {
	sysfs    string                                    // "/sys"
	proc     string                                    // "/proc"
	modprobe func(ctx context.Context) ([]byte, error) // loads the nbd module
}

var realHost = host{
	sysfs: "/sys",
	proc:  "/proc",
	modprobe: func(ctx context.Context) ([]byte, error) {
		return exec.CommandContext(ctx, "modprobe", "nbd").CombinedOutput()
	},
}

// Device is an attached /dev/nbdN.
type Device struct {
	index int
	log   *slog.Logger
	host  host

	cancel context.CancelFunc // stops the serving goroutines
	conns  []net.Conn
	done   chan struct{} // closed when every connection's Serve returned

	mu      sync.Mutex
	errs    []error // from Serve
	detach  sync.Once
	detErr  error
	stopped chan struct{}
	release chan struct{} // frees the thread that connected
}

// connect sends NBD_CMD_CONNECT from a thread that stays alive until the
// device is detached: the kernel shows that thread's ID in
// /sys/block/nbdN/pid, and a vanished pid is how a stale device (its
// server crashed) is recognised.
func (d *Device) connect(family uint16, req *connectRequest) (uint32, error) {
	type result struct {
		idx uint32
		err error
	}
	res := make(chan result, 1)
	d.release = make(chan struct{})
	go func() {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		idx, err := genlConnect(family, req)
		res <- result{idx, err}
		if err == nil {
			<-d.release
		}
	}()
	r := <-res
	return r.idx, r.err
}

// Attach connects a /dev/nbdN to cfg.Serve. It loads the nbd module when
// needed, refuses a device that is already connected, and on any failure
// leaves nothing configured. The returned Device serves until Detach (or
// until the kernel drops every connection: see Done).
func Attach(ctx context.Context, cfg Config) (*Device, error) {
	return realHost.attach(ctx, cfg)
}

func (h host) attach(ctx context.Context, cfg Config) (*Device, error) {
	log := cfg.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	req, err := cfg.request()
	if err != nil {
		return nil, err
	}
	if err := h.ensureModule(ctx); err != nil {
		return nil, err
	}
	if req.Index >= 0 {
		if err := h.checkFree(int(req.Index)); err != nil {
			return nil, err
		}
	}
	fam, err := h.probe(ctx)
	if err != nil {
		return nil, err
	}

	n := max(cfg.Connections, 1)
	serveCtx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	d := &Device{
		log: log, host: h, cancel: cancel,
		done: make(chan struct{}), stopped: make(chan struct{}),
	}
	var wg sync.WaitGroup
	var theirs []int
	// abort undoes everything before the kernel took the sockets.
	abort := func(err error) (*Device, error) {
		for _, fd := range theirs {
			unix.Close(fd)
		}
		cancel()
		for _, c := range d.conns {
			c.Close()
		}
		wg.Wait()
		return nil, err
	}
	var info nbdproto.Export
	for i := range n {
		fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return abort(fmt.Errorf("attach: socketpair: %w", err))
		}
		theirs = append(theirs, fds[1])
		c, err := fileConn(fds[0])
		unix.Close(fds[0])
		if err != nil {
			return abort(fmt.Errorf("attach: socketpair: %w", err))
		}
		d.conns = append(d.conns, c)
		wg.Go(func() {
			err := cfg.Serve(serveCtx, c)
			if err != nil && !errors.Is(err, context.Canceled) && !errors.Is(err, net.ErrClosed) {
				d.mu.Lock()
				d.errs = append(d.errs, err)
				d.mu.Unlock()
			}
		})
		got, err := negotiateFD(fds[1], cfg.Export)
		if err != nil {
			return abort(fmt.Errorf("attach: connection %d: %w", i+1, err))
		}
		if i > 0 && got != info {
			return abort(fmt.Errorf("attach: %w: connection %d sees export %+v, connection 1 %+v", ErrNegotiation, i+1, got, info))
		}
		info = got
	}
	if err := req.fill(&cfg, info, n); err != nil {
		return abort(err)
	}
	for _, fd := range theirs {
		req.FDs = append(req.FDs, uint32(fd))
	}
	go func() { wg.Wait(); close(d.done) }()

	idx, err := d.connect(fam.ID, req)
	// The kernel took its own references to the sockets it accepted.
	for _, fd := range theirs {
		unix.Close(fd)
	}
	if err != nil {
		cancel()
		for _, c := range d.conns {
			c.Close()
		}
		<-d.done
		if errors.Is(err, unix.EBUSY) {
			return nil, fmt.Errorf("%w: %s is already connected (the kernel said: %v)", ErrBusy, devPath(int(req.Index)), err)
		}
		return nil, fmt.Errorf("attach: nbd netlink connect: %w", err)
	}
	d.index = int(idx)
	log.Info("nbd attached", "device", d.Path(), "size", req.Size, "block_size", req.BlockSize,
		"connections", n, "flags", fmt.Sprintf("%#x", req.ServerFlags),
		"timeout", cfg.Timeout, "dead_conn_timeout", cfg.DeadConnTimeout)
	return d, nil
}

// request validates cfg and starts the connect request.
func (cfg *Config) request() (*connectRequest, error) {
	r := &connectRequest{Index: -1, BackendID: cfg.BackendID}
	if cfg.Serve == nil {
		return nil, errors.New("attach: no Serve function")
	}
	if cfg.Device != "" {
		i, err := ParseDevice(cfg.Device)
		if err != nil {
			return nil, err
		}
		r.Index = int32(i)
	}
	if bs := cfg.BlockSize; bs != 0 && (bs < 512 || bs > 4096 || bs&(bs-1) != 0) {
		return nil, fmt.Errorf("attach: block size %d is not a power of two from 512 to 4096", bs)
	}
	if cfg.Connections < 0 || cfg.Connections > 64 {
		return nil, fmt.Errorf("attach: %d connections (want 1 to 64)", cfg.Connections)
	}
	if cfg.Timeout < 0 || cfg.DeadConnTimeout < 0 {
		return nil, errors.New("attach: negative timeout")
	}
	r.TimeoutSec = uint64((cfg.Timeout + time.Second - 1) / time.Second)
	r.DeadConnTimeout = uint64((cfg.DeadConnTimeout + time.Second - 1) / time.Second)
	return r, nil
}

// fill completes the request with what the server said about the export.
func (r *connectRequest) fill(cfg *Config, info nbdproto.Export, conns int) error {
	if info.Size == 0 || info.Size%512 != 0 {
		return fmt.Errorf("attach: export size %d is not a positive multiple of 512", info.Size)
	}
	if info.Flags&nbdproto.FlagHasFlags == 0 {
		info.Flags = nbdproto.FlagHasFlags // no flags at all: read/write, no flush
	}
	if conns > 1 && info.Flags&nbdproto.FlagCanMultiConn == 0 {
		return fmt.Errorf("attach: %d connections, but the server does not allow several (no CAN_MULTI_CONN)", conns)
	}
	bs := uint64(cfg.BlockSize)
	if bs == 0 {
		switch {
		case info.MinBlock >= 512 && info.MinBlock <= 4096 && info.MinBlock&(info.MinBlock-1) == 0:
			bs = uint64(info.MinBlock)
			if info.Size%4096 == 0 && bs < 4096 {
				bs = 4096
			}
		case info.Size%4096 == 0:
			bs = 4096
		default:
			bs = 512
		}
	}
	if info.Size%bs != 0 {
		return fmt.Errorf("attach: export size %d is not a multiple of the block size %d", info.Size, bs)
	}
	r.Size = info.Size
	r.BlockSize = bs
	r.ServerFlags = uint64(info.Flags)
	if cfg.ReadOnly {
		r.ServerFlags |= uint64(nbdproto.FlagReadOnly)
	}
	return nil
}

// fileConn returns a net.Conn on a duplicate of fd.
func fileConn(fd int) (net.Conn, error) {
	dup, err := unix.Dup(fd)
	if err != nil {
		return nil, err
	}
	f := os.NewFile(uintptr(dup), "nbd-socket")
	defer f.Close()
	return net.FileConn(f)
}

// negotiateFD runs the client handshake on fd and leaves fd blocking, as
// the kernel expects it.
func negotiateFD(fd int, export string) (nbdproto.Export, error) {
	c, err := fileConn(fd)
	if err != nil {
		return nbdproto.Export{}, err
	}
	c.SetDeadline(time.Now().Add(negotiationTimeout))
	info, err := negotiate(c, export)
	c.Close()
	if err != nil {
		return info, err
	}
	return info, unix.SetNonblock(fd, false)
}

// ParseDevice returns N of "/dev/nbdN" or "nbdN".
func ParseDevice(s string) (int, error) {
	name := strings.TrimPrefix(s, "/dev/")
	num, ok := strings.CutPrefix(name, "nbd")
	i, err := strconv.Atoi(num)
	if !ok || err != nil || i < 0 || i > 1<<20 || strings.ContainsAny(num, "+-") {
		return 0, fmt.Errorf("attach: %q is not an nbd device (want /dev/nbdN)", s)
	}
	return i, nil
}

func devPath(i int) string {
	if i < 0 {
		return "/dev/nbd?"
	}
	return "/dev/nbd" + strconv.Itoa(i)
}

// Probe checks that the kernel can attach nbd devices, loading the nbd
// module when needed. Its error wraps [ErrNoNBD].
func Probe(ctx context.Context) error {
	_, err := realHost.probe(ctx)
	return err
}

func (h host) probe(ctx context.Context) (*netlink.GenlFamily, error) {
	if err := h.ensureModule(ctx); err != nil {
		return nil, err
	}
	fam, err := netlink.GenlFamilyGet(genlFamily)
	if err != nil {
		return nil, fmt.Errorf("%w: no generic-netlink family %q (kernel older than 4.10?): %v", ErrNoNBD, genlFamily, err)
	}
	return fam, nil
}

// ensureModule loads nbd when /sys/module/nbd is missing.
func (h host) ensureModule(ctx context.Context) error {
	mod := filepath.Join(h.sysfs, "module", "nbd")
	if _, err := os.Stat(mod); err == nil {
		return nil
	}
	out, err := h.modprobe(ctx)
	if err != nil {
		msg := strings.TrimSpace(string(out))
		if msg == "" {
			msg = err.Error()
		} else {
			msg = err.Error() + ": " + msg
		}
		return fmt.Errorf("%w: modprobe nbd failed: %s", ErrNoNBD, msg)
	}
	if _, err := os.Stat(mod); err != nil {
		return fmt.Errorf("%w: modprobe nbd succeeded but %s is missing", ErrNoNBD, mod)
	}
	return nil
}

// DeviceState is what sysfs says about /dev/nbdN.
type DeviceState struct {
	Exists bool  // /sys/block/nbdN exists
	Size   int64 // bytes
	PID    int   // serving process (0: none)
}

// Busy reports whether the device is connected.
func (s DeviceState) Busy() bool { return s.Size != 0 || s.PID != 0 }

// State reads /sys/block/nbdN.
func State(index int) (DeviceState, error) { return realHost.state(index) }

func (h host) state(index int) (DeviceState, error) {
	dir := filepath.Join(h.sysfs, "block", "nbd"+strconv.Itoa(index))
	var s DeviceState
	b, err := os.ReadFile(filepath.Join(dir, "size"))
	if errors.Is(err, os.ErrNotExist) {
		return s, nil
	}
	if err != nil {
		return s, err
	}
	s.Exists = true
	sectors, err := strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
	if err != nil {
		return s, fmt.Errorf("read %s/size: %w", dir, err)
	}
	s.Size = sectors * 512
	b, err = os.ReadFile(filepath.Join(dir, "pid"))
	switch {
	case errors.Is(err, os.ErrNotExist):
	case err != nil:
		return s, err
	default:
		s.PID, err = strconv.Atoi(strings.TrimSpace(string(b)))
		if err != nil {
			return s, fmt.Errorf("read %s/pid: %w", dir, err)
		}
	}
	return s, nil
}

// CheckFree returns an error wrapping [ErrBusy] when /dev/nbdN is connected.
func CheckFree(index int) error { return realHost.checkFree(index) }

func (h host) checkFree(index int) error {
	s, err := h.state(index)
	if err != nil {
		return fmt.Errorf("attach: %w", err)
	}
	if !s.Busy() {
		return nil
	}
	if h.stale(s) {
		return fmt.Errorf("%w: %s is connected (%d bytes) but its server (pid %d) is gone: the device is stale; reclaim it (doppel nbd attach --reclaim)",
			ErrBusy, devPath(index), s.Size, s.PID)
	}
	who := "no serving process"
	if s.PID != 0 {
		who = "served by pid " + strconv.Itoa(s.PID)
	}
	return fmt.Errorf("%w: %s is connected (%d bytes, %s); detach it first", ErrBusy, devPath(index), s.Size, who)
}

// stale reports whether a connected device's serving process is gone (its
// sockets are dead; only a disconnect frees the device).
func (h host) stale(s DeviceState) bool {
	if s.PID == 0 {
		return false
	}
	_, err := os.Stat(filepath.Join(h.proc, strconv.Itoa(s.PID)))
	return errors.Is(err, os.ErrNotExist)
}

// Reclaim disconnects /dev/nbdN when it is connected but its serving
// process is gone (a crash), and waits until the kernel releases it. A
// free device is left alone; a device served by a live process is refused.
func Reclaim(ctx context.Context, index int, log *slog.Logger) error {
	return realHost.reclaim(ctx, index, log)
}

func (h host) reclaim(ctx context.Context, index int, log *slog.Logger) error {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	s, err := h.state(index)
	if err != nil || !s.Busy() {
		return err
	}
	if !h.stale(s) {
		return h.checkFree(index)
	}
	fam, err := h.probe(ctx)
	if err != nil {
		return err
	}
	log.Warn("reclaiming a stale nbd device", "device", devPath(index), "dead_pid", s.PID, "size", s.Size)
	if err := genlDisconnect(fam.ID, index); err != nil {
		return fmt.Errorf("reclaim %s: nbd netlink disconnect: %w", devPath(index), err)
	}
	d := &Device{index: index, host: h}
	return d.waitFree(ctx)
}

// genlConnect sends NBD_CMD_CONNECT and returns the device index.
func genlConnect(family uint16, r *connectRequest) (uint32, error) {
	req := nl.NewNetlinkRequest(int(family), unix.NLM_F_ACK)
	req.AddRawData(genlHeader(cmdConnect))
	req.AddRawData(r.encode())
	msgs, err := req.Execute(unix.NETLINK_GENERIC, 0)
	if err != nil {
		return 0, err
	}
	if len(msgs) > 0 {
		attrs, err := stripGenlHeader(msgs[0])
		if err != nil {
			return 0, err
		}
		return decodeIndexReply(attrs)
	}
	if r.Index >= 0 {
		return uint32(r.Index), nil
	}
	return 0, errors.New("no reply to NBD_CMD_CONNECT")
}

func genlDisconnect(family uint16, index int) error {
	req := nl.NewNetlinkRequest(int(family), unix.NLM_F_ACK)
	req.AddRawData(genlHeader(cmdDisconnect))
	req.AddRawData(appendU32(nil, attrIndex, uint32(index)))
	_, err := req.Execute(unix.NETLINK_GENERIC, 0)
	return err
}

// Index is N of /dev/nbdN.
func (d *Device) Index() int { return d.index }

// Path is "/dev/nbdN".
func (d *Device) Path() string { return devPath(d.index) }

// Done is closed when every connection ended: after Detach, or when the
// device was disconnected from outside (nbd-client -d, a dead-connection
// timeout).
func (d *Device) Done() <-chan struct{} { return d.done }

// Detach flushes the device, disconnects it (NBD_CMD_DISCONNECT), waits for
// the connections to end and for the kernel to release the device (size 0,
// no pid). ctx bounds the wait. It is safe to call more than once.
func (d *Device) Detach(ctx context.Context) error {
	d.detach.Do(func() { d.detErr = d.doDetach(ctx); close(d.stopped) })
	<-d.stopped
	return d.detErr
}

func (d *Device) doDetach(ctx context.Context) error {
	var errs []error
	select {
	case <-d.done:
	default:
		if m := mountedAt(d.Path()); m != "" {
			d.log.Warn("detaching a mounted device: the filesystem will get I/O errors", "device", d.Path(), "mountpoint", m)
		}
		// Write back the device's page cache while the server still runs:
		// the disconnect itself does not.
		if err := flushDevice(ctx, d.Path()); err != nil {
			d.log.Warn("flush before detach", "device", d.Path(), "err", err)
		}
		fam, err := netlink.GenlFamilyGet(genlFamily)
		if err == nil {
			err = genlDisconnect(fam.ID, d.index)
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("detach %s: nbd netlink disconnect: %w", d.Path(), err))
		}
	}
	select {
	case <-d.done:
	case <-ctx.Done():
		errs = append(errs, fmt.Errorf("detach %s: connections still open: %w", d.Path(), ctx.Err()))
	}
	d.cancel()
	for _, c := range d.conns {
		c.Close()
	}
	<-d.done
	if err := d.waitFree(ctx); err != nil {
		errs = append(errs, err)
	}
	if d.release != nil {
		close(d.release)
	}
	d.mu.Lock()
	for _, e := range d.errs {
		errs = append(errs, fmt.Errorf("serve %s: %w", d.Path(), e))
	}
	d.mu.Unlock()
	if len(errs) == 0 {
		d.log.Info("nbd detached", "device", d.Path())
	}
	return errors.Join(errs...)
}

func (d *Device) waitFree(ctx context.Context) error {
	t := time.NewTicker(20 * time.Millisecond)
	defer t.Stop()
	for {
		s, err := d.host.state(d.index)
		if err == nil && !s.Busy() {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("detach %s: device still busy (size %d, pid %d): %w", d.Path(), s.Size, s.PID, ctx.Err())
		case <-t.C:
		}
	}
}

// flushDevice writes back the device's dirty pages and sends a FLUSH.
func flushDevice(ctx context.Context, path string) error {
	errc := make(chan error, 1)
	go func() {
		f, err := os.OpenFile(path, os.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			errc <- err
			return
		}
		err = f.Sync()
		errc <- errors.Join(err, f.Close())
	}()
	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// mountedAt returns where dev is mounted, or "".
func mountedAt(dev string) string {
	b, err := os.ReadFile("/proc/self/mounts")
	if err != nil {
		return ""
	}
	for line := range strings.Lines(string(b)) {
		f := strings.Fields(line)
		if len(f) >= 2 && (f[0] == dev || strings.HasPrefix(f[0], dev+"p")) {
			return f[1]
		}
	}
	return ""
}

// SetIOFlusher sets PR_SET_IO_FLUSHER on every thread of the process (new
// threads inherit it), so that memory reclaim never waits on the I/O this
// process is serving. It needs CAP_SYS_RESOURCE and a binary built without
// cgo (otherwise only the calling thread is marked, and an error says so).
func SetIOFlusher() error {
	_, _, errno := syscall.AllThreadsSyscall6(unix.SYS_PRCTL, unix.PR_SET_IO_FLUSHER, 1, 0, 0, 0, 0)
	if errno == 0 {
		return nil
	}
	if errno == syscall.ENOTSUP {
		if err := unix.Prctl(unix.PR_SET_IO_FLUSHER, 1, 0, 0, 0); err != nil {
			return fmt.Errorf("prctl(PR_SET_IO_FLUSHER): %w", err)
		}
		return errors.New("prctl(PR_SET_IO_FLUSHER): set on one thread only (cgo binary)")
	}
	return fmt.Errorf("prctl(PR_SET_IO_FLUSHER): %w", errno)
}

// Release stops serving the device without disconnecting it, for a
// handover to another process: the server must have been told to hand
// its connections over first (blockdev.Server.Handover), so that serving
// them ends with the server's ends handed over, not closed; the device
// stays connected to them. The thread that connected the device ends.
// Detach does nothing afterwards.
func (d *Device) Release() {
	d.detach.Do(func() {
		d.cancel()
		<-d.done
		if d.release != nil {
			close(d.release)
		}
		close(d.stopped)
		d.log.Info("nbd device released for a handover", "device", d.Path())
	})
}

// Adopt takes over /dev/nbdN (index), connected by another process (a
// restarting agent) that handed over the server ends of its connections:
// serve runs connection i (resuming it where that process stopped) until
// Detach. The device must still be connected.
func Adopt(index int, conns []net.Conn, serve func(ctx context.Context, i int, c net.Conn) error, log *slog.Logger) (*Device, error) {
	return realHost.adopt(index, conns, serve, log)
}

func (h host) adopt(index int, conns []net.Conn, serve func(ctx context.Context, i int, c net.Conn) error, log *slog.Logger) (*Device, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	s, err := h.state(index)
	if err != nil {
		return nil, fmt.Errorf("adopt %s: %w", devPath(index), err)
	}
	if !s.Busy() {
		return nil, fmt.Errorf("adopt %s: the device is not connected (its connections were lost)", devPath(index))
	}
	ctx, cancel := context.WithCancel(context.Background())
	d := &Device{index: index, log: log, host: h, cancel: cancel, conns: conns, done: make(chan struct{}), stopped: make(chan struct{})}
	var wg sync.WaitGroup
	for i, c := range conns {
		wg.Go(func() {
			if err := serve(ctx, i, c); err != nil && !errors.Is(err, context.Canceled) && !errors.Is(err, net.ErrClosed) {
				d.mu.Lock()
				d.errs = append(d.errs, err)
				d.mu.Unlock()
			}
		})
	}
	go func() { wg.Wait(); close(d.done) }()
	log.Info("nbd device adopted", "device", d.Path(), "connections", len(conns))
	return d, nil
}
