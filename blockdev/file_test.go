package blockdev

import (
	"bytes"
	"errors"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
)

func TestOpenFile(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "new")
	if _, err := OpenFile(p, 0); err == nil {
		t.Fatal("created a file without a size")
	}
	f, err := OpenFile(p, 1<<30)
	if err != nil {
		t.Fatal(err)
	}
	var st syscall.Stat_t
	if err := syscall.Stat(p, &st); err != nil {
		t.Fatal(err)
	}
	if st.Size != 1<<30 || st.Blocks != 0 {
		t.Fatalf("new file: size %d, %d blocks; want 1 GiB sparse", st.Size, st.Blocks)
	}
	if st.Mode&0o777 != 0o600 {
		t.Fatalf("new file mode %o, want 600", st.Mode&0o777)
	}
	if _, err := f.WriteAt([]byte("hello"), 1<<29); err != nil {
		t.Fatal(err)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	f.Close()

	// Reopen: size 0 or the same size is fine; another size is refused.
	for _, size := range []int64{0, 1 << 30} {
		f, err := OpenFile(p, size)
		if err != nil {
			t.Fatalf("reopen size %d: %v", size, err)
		}
		b := make([]byte, 5)
		if _, err := f.ReadAt(b, 1<<29); err != nil || string(b) != "hello" {
			t.Fatalf("reopen: %q %v", b, err)
		}
		f.Close()
	}
	if _, err := OpenFile(p, 1<<20); err == nil || !strings.Contains(err.Error(), "not the") {
		t.Fatalf("size mismatch: %v", err)
	}
	// An empty file is extended; a directory is refused.
	empty := filepath.Join(dir, "empty")
	os.WriteFile(empty, nil, 0o600)
	if _, err := OpenFile(empty, 0); err == nil {
		t.Fatal("served an empty file")
	}
	if f, err := OpenFile(empty, 8192); err != nil || f.Size() != 8192 {
		t.Fatalf("extend empty file: %v", err)
	} else {
		f.Close()
	}
	if _, err := OpenFile(dir, 0); err == nil {
		t.Fatal("opened a directory")
	}
	if _, err := OpenFile(filepath.Join(dir, "x"), -1); err == nil {
		t.Fatal("negative size accepted")
	}
	// Open picks the regular-file backend too.
	b, err := Open(p, 0)
	if err != nil {
		t.Fatal(err)
	}
	if b.Size() != 1<<30 {
		t.Fatalf("Open: size %d", b.Size())
	}
	b.(*File).Close()
}

func TestFileShortReadsZeroFill(t *testing.T) {
	p := filepath.Join(t.TempDir(), "f")
	f, err := OpenFile(p, 8192)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	f.WriteAt(bytes.Repeat([]byte{7}, 8192), 0)
	os.Truncate(p, 100) // shrunk behind the server's back
	b := make([]byte, 200)
	if n, err := f.ReadAt(b, 0); err != nil || n != 200 {
		t.Fatalf("ReadAt: %d, %v", n, err)
	}
	if !bytes.Equal(b[:100], bytes.Repeat([]byte{7}, 100)) || !bytes.Equal(b[100:], make([]byte, 100)) {
		t.Fatal("tail past EOF not zero")
	}
}

func TestFileZeroRanges(t *testing.T) {
	f, err := OpenFile(filepath.Join(t.TempDir(), "f"), 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	rng := rand.New(rand.NewPCG(1, 2))
	model := make([]byte, 1<<20)
	for i := range 200 {
		off := rng.IntN(1 << 20)
		n := rng.IntN(1<<20-off) / (1 + rng.IntN(8))
		switch i % 4 {
		case 0:
			p := pattern(n, byte(i))
			f.WriteAt(p, int64(off))
			copy(model[off:], p)
		case 1:
			err = f.Trim(int64(off), int64(n))
			clear(model[off : off+n])
		case 2:
			err = f.WriteZeroes(int64(off), int64(n), true)
			clear(model[off : off+n])
		case 3:
			err = f.WriteZeroes(int64(off), int64(n), false)
			clear(model[off : off+n])
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	got := make([]byte, 1<<20)
	f.ReadAt(got, 0)
	if !bytes.Equal(got, model) {
		t.Fatal("file differs from model after random write/trim/zero")
	}
	if err := f.Trim(1<<20-10, 20); err == nil {
		t.Fatal("trim past end accepted")
	}
}

func TestParseListen(t *testing.T) {
	for spec, ok := range map[string]bool{
		"unix:/run/doppel/nbd.sock": true, "tcp:127.0.0.1:10809": true, "tcp::10809": true, "tcp:[::1]:10809": true,
		"": false, "unix:": false, "tcp:localhost": false, "tcp:1.2.3.4:": false, "udp:1.2.3.4:5": false,
		"/run/x.sock": false, "unix:/" + strings.Repeat("x", 120): false,
	} {
		if _, _, err := ParseListen(spec); (err == nil) != ok {
			t.Errorf("ParseListen(%q) = %v, want ok=%v", spec, err, ok)
		}
	}
}

func TestListenUnix(t *testing.T) {
	dir := shortTempDir(t)
	sock := filepath.Join(dir, "sub", "nbd.sock")
	l, err := Listen("unix:" + sock)
	if err != nil {
		t.Fatal(err)
	}
	// A live socket is not stolen.
	if _, err := Listen("unix:" + sock); err == nil || !strings.Contains(err.Error(), "another server") {
		t.Fatalf("second Listen on a live socket: %v", err)
	}
	l.Close()
	if _, err := os.Stat(sock); !errors.Is(err, os.ErrNotExist) {
		t.Fatal("socket not removed on Close")
	}
	// A stale socket (its server died) is replaced.
	ul, err := net.ListenUnix("unix", &net.UnixAddr{Name: sock, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	ul.SetUnlinkOnClose(false)
	ul.Close()
	l, err = Listen("unix:" + sock)
	if err != nil {
		t.Fatalf("Listen over a stale socket: %v", err)
	}
	l.Close()
	// A regular file is never removed.
	os.WriteFile(sock, []byte("data"), 0o600)
	if _, err := Listen("unix:" + sock); err == nil {
		t.Fatal("Listen replaced a regular file")
	}
	if b, _ := os.ReadFile(sock); string(b) != "data" {
		t.Fatal("regular file clobbered")
	}
}

func TestListenTCP(t *testing.T) {
	l, err := Listen("tcp:127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	s, err := NewServer(testLogger(t), Export{Name: "a", Backend: newMem(4096)})
	if err != nil {
		t.Fatal(err)
	}
	go s.Serve(t.Context(), l)
	c, err := net.Dial("tcp", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	b := make([]byte, 8)
	if _, err := c.Read(b); err != nil || string(b) != "NBDMAGIC" {
		t.Fatalf("greeting %q, %v", b, err)
	}
}

// loopDevice attaches a fresh sparse file of size bytes to a loop device,
// detached in t.Cleanup.
func loopDevice(t *testing.T, size int64) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: loop devices")
	}
	if _, err := exec.LookPath("losetup"); err != nil {
		t.Skip("losetup not installed")
	}
	img := filepath.Join(t.TempDir(), "disk.img")
	if err := os.WriteFile(img, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(img, size); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command("losetup", "--find", "--show", img).CombinedOutput()
	if err != nil {
		t.Fatalf("losetup: %v: %s", err, out)
	}
	dev := strings.TrimSpace(string(out))
	t.Cleanup(func() {
		if out, err := exec.Command("losetup", "-d", dev).CombinedOutput(); err != nil {
			t.Errorf("losetup -d %s: %v: %s", dev, err, out)
		}
	})
	return dev
}

func TestBlockDevice(t *testing.T) {
	dev := loopDevice(t, 64<<20)
	b, err := Open(dev, 0)
	if err != nil {
		t.Fatal(err)
	}
	d := b.(*File)
	if d.Size() != 64<<20 || !d.dev {
		t.Fatalf("device size %d dev %v", d.Size(), d.dev)
	}
	// Exclusive: a second open (or a mount) is refused while served.
	if _, err := Open(dev, 0); !errors.Is(err, ErrInUse) {
		t.Fatalf("second open: %v, want ErrInUse", err)
	}
	if _, err := Open(dev, 1<<20); err == nil {
		t.Fatal("size mismatch accepted")
	}
	model := make([]byte, 4<<20)
	p := pattern(4<<20, 3)
	d.WriteAt(p, 0)
	copy(model, p)
	for _, r := range []struct {
		off, n int64
		trim   bool
		noHole bool
	}{{4096, 8192, true, false}, {100, 1000, true, false}, {1 << 20, 1 << 20, false, true}, {3<<20 + 7, 70000, false, false}} {
		if r.trim {
			err = d.Trim(r.off, r.n)
		} else {
			err = d.WriteZeroes(r.off, r.n, r.noHole)
		}
		if err != nil {
			t.Fatalf("zero %+v: %v", r, err)
		}
		clear(model[r.off : r.off+r.n])
	}
	if err := d.Sync(); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 4<<20)
	d.ReadAt(got, 0)
	if !bytes.Equal(got, model) {
		t.Fatal("device differs after trim/zeroes")
	}
	if err := d.Discard(0, 1<<20); err != nil {
		t.Fatalf("BLKDISCARD: %v", err)
	}
	d.Close()
	ro, err := OpenReadOnly(dev)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ro.WriteAt([]byte("x"), 0); err == nil {
		t.Fatal("write through a read-only device descriptor")
	}
	if _, err := Open(dev, 0); !errors.Is(err, ErrInUse) {
		t.Fatalf("open while held read-only: %v, want ErrInUse", err)
	}
	ro.Close()

	// Mounted: refused with the mount point in the reason.
	if _, err := exec.LookPath("mkfs.ext4"); err != nil {
		t.Skip("mkfs.ext4 not installed")
	}
	if out, err := exec.Command("mkfs.ext4", "-q", "-F", dev).CombinedOutput(); err != nil {
		t.Fatalf("mkfs: %v: %s", err, out)
	}
	mnt := t.TempDir()
	if out, err := exec.Command("mount", dev, mnt).CombinedOutput(); err != nil {
		t.Fatalf("mount: %v: %s", err, out)
	}
	defer exec.Command("umount", mnt).Run()
	_, err = Open(dev, 0)
	if !errors.Is(err, ErrInUse) || !strings.Contains(err.Error(), mnt) {
		t.Fatalf("mounted device: %v, want ErrInUse naming %s", err, mnt)
	}
	t.Log(err)
}

func TestOpenReadOnly(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "f")
	if _, err := OpenReadOnly(p); err == nil {
		t.Fatal("opened a missing file")
	}
	os.WriteFile(p, nil, 0o400)
	if _, err := OpenReadOnly(p); err == nil {
		t.Fatal("opened an empty file")
	}
	os.WriteFile(p, []byte("read only data"), 0o400)
	f, err := OpenReadOnly(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	b := make([]byte, 4)
	if _, err := f.ReadAt(b, 5); err != nil || string(b) != "only" || f.Size() != 14 {
		t.Fatalf("read %q, %v, size %d", b, err, f.Size())
	}
	if _, err := f.WriteAt([]byte("x"), 0); err == nil {
		t.Fatal("write through a read-only descriptor")
	}
	if _, err := OpenReadOnly(dir); err == nil {
		t.Fatal("opened a directory")
	}
}

// TestWritesSplitForThePageCache: no pwrite over maxPwrite reaches the
// kernel, the pieces store the same bytes, and a small write is one call.
func TestWritesSplitForThePageCache(t *testing.T) {
	f, err := OpenFile(filepath.Join(t.TempDir(), "vol"), 4<<20)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var sizes []int
	pwrite = func(fd int, p []byte, off int64) (int, error) {
		sizes = append(sizes, len(p))
		return unix.Pwrite(fd, p, off)
	}
	t.Cleanup(func() { pwrite = unix.Pwrite })

	data := make([]byte, 1<<20+12345)
	for i := range data {
		data[i] = byte(rand.Uint32())
	}
	if _, err := f.WriteAt(data, 4096); err != nil {
		t.Fatal(err)
	}
	if len(sizes) != 5 {
		t.Fatalf("%d writes (%v), want 5", len(sizes), sizes)
	}
	for _, n := range sizes {
		if n > maxPwrite {
			t.Fatalf("a write of %d bytes reached the kernel (max %d)", n, maxPwrite)
		}
	}
	got := make([]byte, len(data))
	if _, err := f.ReadAt(got, 4096); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("split write stored different bytes (read: %v)", err)
	}
	sizes = nil
	if _, err := f.WriteAt(data[:4096], 0); err != nil || len(sizes) != 1 {
		t.Fatalf("small write: %v, %d writes", err, len(sizes))
	}
}

// TestOpenExclusive: a file opened exclusively cannot be opened so again,
// by any path (a hard link here), until it is closed; LimitSize serves a
// prefix of it.
func TestOpenExclusive(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "vol")
	f, err := OpenExclusive(p, 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	hard := filepath.Join(dir, "hard")
	if err := os.Link(p, hard); err != nil {
		t.Fatal(err)
	}
	for _, path := range []string{p, hard} {
		if g, err := OpenExclusive(path, 0); !errors.Is(err, ErrInUse) {
			if err == nil {
				g.Close()
			}
			t.Fatalf("second exclusive open of %s: %v", path, err)
		}
	}
	if err := f.LimitSize(1<<20 + 512); err == nil {
		t.Fatal("LimitSize grew the file")
	}
	if err := f.LimitSize(512 << 10); err != nil || f.Size() != 512<<10 {
		t.Fatalf("LimitSize: %v, size %d", err, f.Size())
	}
	f.Close()
	g, err := OpenExclusive(hard, 0)
	if err != nil {
		t.Fatalf("after close: %v", err)
	}
	g.Close()
}
