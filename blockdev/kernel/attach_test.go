package kernel

import (
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/doppelha/doppel/blockdev/nbdproto"
)

func TestConfigRequest(t *testing.T) {
	serve := func(context.Context, net.Conn) error { return nil }
	const all = nbdproto.FlagHasFlags | nbdproto.FlagSendFlush | nbdproto.FlagSendFUA | nbdproto.FlagSendTrim | nbdproto.FlagSendWriteZeroes | nbdproto.FlagCanMultiConn
	for _, tc := range []struct {
		cfg   Config
		info  nbdproto.Export
		conns int
		want  string // error substring; "" = valid
		bs    uint64
		idx   int32
	}{
		{cfg: Config{Serve: serve}, info: nbdproto.Export{Size: 1 << 20, Flags: all}, bs: 4096, idx: -1},
		{cfg: Config{Device: "/dev/nbd3", Serve: serve}, info: nbdproto.Export{Size: 1536, Flags: all}, bs: 512, idx: 3},
		{cfg: Config{Device: "nbd12", BlockSize: 1024, Serve: serve}, info: nbdproto.Export{Size: 4096, Flags: all}, bs: 1024, idx: 12},
		{cfg: Config{Serve: serve}, info: nbdproto.Export{Size: 3072, Flags: all, MinBlock: 1024}, bs: 1024, idx: -1},
		{cfg: Config{}, want: "no Serve function"},
		{cfg: Config{Serve: serve}, info: nbdproto.Export{Size: 0, Flags: all}, want: "not a positive multiple of 512"},
		{cfg: Config{Serve: serve}, info: nbdproto.Export{Size: 1000, Flags: all}, want: "not a positive multiple of 512"},
		{cfg: Config{Serve: serve, BlockSize: 3000}, want: "not a power of two"},
		{cfg: Config{Serve: serve, BlockSize: 8192}, want: "not a power of two"},
		{cfg: Config{Serve: serve, BlockSize: 1024}, info: nbdproto.Export{Size: 1536, Flags: all}, want: "not a multiple of the block size"},
		{cfg: Config{Serve: serve, Device: "/dev/sda"}, want: "not an nbd device"},
		{cfg: Config{Serve: serve, Device: "/dev/nbd-1"}, want: "not an nbd device"},
		{cfg: Config{Serve: serve, Connections: 65}, want: "connections"},
		{cfg: Config{Serve: serve}, conns: 2, info: nbdproto.Export{Size: 4096, Flags: nbdproto.FlagHasFlags}, want: "no CAN_MULTI_CONN"},
	} {
		r, err := tc.cfg.request()
		if err == nil {
			err = r.fill(&tc.cfg, tc.info, max(tc.conns, 1))
		}
		if tc.want != "" {
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("%+v: err %v, want %q", tc.cfg, err, tc.want)
			}
			continue
		}
		if err != nil {
			t.Errorf("%+v: %v", tc.cfg, err)
			continue
		}
		if r.BlockSize != tc.bs || r.Index != tc.idx || r.Size != tc.info.Size {
			t.Errorf("%+v: block size %d index %d size %d, want %d %d %d", tc.cfg, r.BlockSize, r.Index, r.Size, tc.bs, tc.idx, tc.info.Size)
		}
		if r.ServerFlags != uint64(all) {
			t.Errorf("flags %#x, want %#x", r.ServerFlags, all)
		}
	}
	cfg := Config{Serve: serve, Timeout: 1500 * time.Millisecond, DeadConnTimeout: 10 * time.Second, ReadOnly: true}
	r, _ := cfg.request()
	if err := r.fill(&cfg, nbdproto.Export{Size: 4096, Flags: nbdproto.FlagHasFlags}, 1); err != nil {
		t.Fatal(err)
	}
	if r.TimeoutSec != 2 || r.DeadConnTimeout != 10 || r.ServerFlags != uint64(nbdproto.FlagHasFlags|nbdproto.FlagReadOnly) {
		t.Errorf("timeouts/read-only: %+v", r)
	}
}

// fakeSysfs builds /sys/module and /sys/block/nbdN entries under a temp dir.
func fakeSysfs(t *testing.T, module bool, devs map[int][2]string) string {
	t.Helper()
	root := t.TempDir()
	if module {
		os.MkdirAll(filepath.Join(root, "module", "nbd"), 0o755)
	}
	for i, d := range devs {
		dir := filepath.Join(root, "block", "nbd"+string(rune('0'+i)))
		os.MkdirAll(dir, 0o755)
		os.WriteFile(filepath.Join(dir, "size"), []byte(d[0]+"\n"), 0o644)
		if d[1] != "" {
			os.WriteFile(filepath.Join(dir, "pid"), []byte(d[1]+"\n"), 0o644)
		}
	}
	return root
}

func TestEnsureModule(t *testing.T) {
	calls := 0
	h := host{sysfs: fakeSysfs(t, false, nil), modprobe: func(context.Context) ([]byte, error) {
		calls++
		return []byte("modprobe: FATAL: Module nbd not found in directory /lib/modules/6.18.0\n"), errors.New("exit status 1")
	}}
	err := h.ensureModule(t.Context())
	if !errors.Is(err, ErrNoNBD) || !strings.Contains(err.Error(), "kernel has no nbd support: modprobe nbd failed: exit status 1: modprobe: FATAL: Module nbd not found") {
		t.Errorf("got %v", err)
	}
	// modprobe "succeeds" but nothing appears.
	h.modprobe = func(context.Context) ([]byte, error) { calls++; return nil, nil }
	if err := h.ensureModule(t.Context()); !errors.Is(err, ErrNoNBD) {
		t.Errorf("got %v", err)
	}
	// Loaded already: modprobe is not run.
	calls = 0
	h.sysfs = fakeSysfs(t, true, nil)
	if err := h.ensureModule(t.Context()); err != nil || calls != 0 {
		t.Errorf("loaded module: err %v, %d modprobe calls", err, calls)
	}
}

func TestCheckFree(t *testing.T) {
	proc := t.TempDir()
	os.Mkdir(filepath.Join(proc, "4242"), 0o755) // a live server
	h := host{sysfs: fakeSysfs(t, true, map[int][2]string{0: {"0", ""}, 1: {"2097152", "4242"}, 2: {"8", ""}, 3: {"8", "777"}}), proc: proc}
	if err := h.checkFree(0); err != nil {
		t.Errorf("idle nbd0: %v", err)
	}
	if err := h.checkFree(5); err != nil {
		t.Errorf("missing nbd5 (the kernel creates it): %v", err)
	}
	err := h.checkFree(1)
	if !errors.Is(err, ErrBusy) || !strings.Contains(err.Error(), "/dev/nbd1 is connected (1073741824 bytes, served by pid 4242)") {
		t.Errorf("busy nbd1: %v", err)
	}
	if err := h.checkFree(2); !errors.Is(err, ErrBusy) {
		t.Errorf("nbd2 with a size and no pid: %v", err)
	}
	if err := h.checkFree(3); !errors.Is(err, ErrBusy) || !strings.Contains(err.Error(), "its server (pid 777) is gone: the device is stale") {
		t.Errorf("nbd3 served by a dead pid: %v", err)
	}
	// Reclaim leaves free and live devices alone.
	if err := h.reclaim(t.Context(), 0, nil); err != nil {
		t.Errorf("reclaim free nbd0: %v", err)
	}
	if err := h.reclaim(t.Context(), 1, nil); !errors.Is(err, ErrBusy) {
		t.Errorf("reclaim live nbd1: %v", err)
	}
}

// TestAttachBusyDeviceTouchesNothing: a busy device is refused before any
// socket is made or any netlink message is sent.
func TestAttachBusyDeviceTouchesNothing(t *testing.T) {
	h := host{sysfs: fakeSysfs(t, true, map[int][2]string{0: {"2048", "99"}})}
	served := false
	_, err := h.attach(t.Context(), Config{Device: "/dev/nbd0", Serve: func(context.Context, net.Conn) error { served = true; return nil }})
	if !errors.Is(err, ErrBusy) || served {
		t.Errorf("err %v, served %v", err, served)
	}
}

// TestAttachWithoutNBD runs on hosts whose kernel has no nbd driver (like
// the development machines): Attach must say so plainly and leave nothing
// behind.
func TestAttachWithoutNBD(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: modprobe")
	}
	if _, err := os.Stat("/sys/module/nbd"); err == nil {
		t.Skip("this kernel has nbd loaded: the VM tier and the attach test cover it")
	}
	served := false
	_, err := Attach(t.Context(), Config{Serve: func(context.Context, net.Conn) error { served = true; return nil }})
	if err == nil {
		t.Skip("modprobe nbd worked on this host: the no-nbd path is not reachable here")
	}
	if !errors.Is(err, ErrNoNBD) || !strings.Contains(err.Error(), "kernel has no nbd support: modprobe nbd failed:") {
		t.Errorf("got %v", err)
	}
	if served {
		t.Error("a connection was served")
	}
	t.Log(err)
}

// TestUsers: a device's mounts (its own and its partitions'), holders
// and the processes holding it open are its users; this process is not.
func TestUsers(t *testing.T) {
	root := t.TempDir()
	h := host{sysfs: filepath.Join(root, "sys"), proc: filepath.Join(root, "proc")}
	mk := func(path, data string) {
		os.MkdirAll(filepath.Dir(path), 0o755)
		os.WriteFile(path, []byte(data), 0o644)
	}
	mk(filepath.Join(h.sysfs, "block/nbd3/dev"), "43:96\n")
	mk(filepath.Join(h.sysfs, "block/nbd3/nbd3p1/dev"), "43:97\n")
	os.MkdirAll(filepath.Join(h.sysfs, "block/nbd3/nbd3p1/holders/dm-0"), 0o755)
	if got := h.users(3, 1); len(got) != 1 || got[0] != "/dev/nbd3p1 held by dm-0" {
		t.Fatalf("users %q", got)
	}
	mk(filepath.Join(h.proc, "self/mountinfo"), "36 25 43:96 / /mnt/web rw - ext4 /dev/nbd3 rw\n37 25 8:1 / /boot rw - ext4 /dev/sda1 rw\n")
	for _, pid := range []string{"1", "77"} {
		mk(filepath.Join(h.proc, pid, "comm"), "app"+pid+"\n")
		os.MkdirAll(filepath.Join(h.proc, pid, "fd"), 0o755)
		os.Symlink("/dev/nbd3", filepath.Join(h.proc, pid, "fd", "4"))
	}
	got := h.users(3, 1)
	want := []string{"/dev/nbd3 mounted on /mnt/web", "/dev/nbd3p1 held by dm-0", "/dev/nbd3 open by pid 77 (app77)"}
	if !slices.Equal(got, want) {
		t.Fatalf("users\n%q\nwant\n%q", got, want)
	}
	if got := h.users(4, 1); len(got) != 0 {
		t.Fatalf("an unknown device has users %q", got)
	}
}
