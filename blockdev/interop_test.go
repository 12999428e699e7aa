package blockdev

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// Interoperability with real NBD clients. A test skips only when its tool
// is not installed (test/deps.sh installs them under make test).

func needTool(t *testing.T, names ...string) {
	t.Helper()
	for _, n := range names {
		if _, err := exec.LookPath(n); err != nil {
			t.Skipf("%s not installed (test/deps.sh installs it)", n)
		}
	}
}

// serveFile serves a fresh sparse file of size bytes as export "vol" and
// returns the file path and the nbd URI of the export.
func serveFile(t *testing.T, size int64) (*served, string, string) {
	t.Helper()
	p := filepath.Join(t.TempDir(), "vol.img")
	f, err := OpenFile(p, size)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	s := serve(t, Export{Name: "vol", Description: "doppel test volume", Backend: f})
	return s, p, "nbd+unix:///vol?socket=" + s.sock
}

func run(t *testing.T, timeout time.Duration, name string, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

func TestInteropNbdinfo(t *testing.T) {
	needTool(t, "nbdinfo")
	_, _, uri := serveFile(t, 64<<20)
	out := run(t, 30*time.Second, "nbdinfo", "--json", uri)
	var info struct {
		Protocol string `json:"protocol"`
		Exports  []map[string]any
	}
	if err := json.Unmarshal([]byte(out), &info); err != nil {
		t.Fatalf("nbdinfo json: %v\n%s", err, out)
	}
	if info.Protocol != "newstyle-fixed" || len(info.Exports) != 1 {
		t.Fatalf("nbdinfo: %s", out)
	}
	x := info.Exports[0]
	for _, k := range []string{"can_flush", "can_fua", "can_trim", "can_zero", "can_multi_conn"} {
		if x[k] != true {
			t.Errorf("%s = %v, want true", k, x[k])
		}
	}
	if x["is_read_only"] != false || x["export-size"] != float64(64<<20) || x["export-name"] != "vol" ||
		x["description"] != "doppel test volume" || x["block_size_maximum"] != float64(MaxPayload) {
		t.Errorf("nbdinfo export: %v", x)
	}
	// The default name and NBD_OPT_LIST work too.
	run(t, 30*time.Second, "nbdinfo", "--size", strings.Replace(uri, "/vol?", "/?", 1))
	if out := run(t, 30*time.Second, "nbdinfo", "--list", "--json", uri); !strings.Contains(out, `"export-name": "vol"`) {
		t.Errorf("nbdinfo --list: %s", out)
	}
}

func TestInteropQemuIO(t *testing.T) {
	needTool(t, "qemu-io")
	_, path, uri := serveFile(t, 64<<20)
	out := run(t, 60*time.Second, "qemu-io", "-f", "raw",
		"-c", "write -P 0xa5 0 4M",
		"-c", "write -P 0x5a -f 4M 1M", // FUA
		"-c", "aio_write -P 0x11 8M 64k", "-c", "aio_write -P 0x22 9M 64k", "-c", "aio_flush",
		"-c", "flush",
		"-c", "read -P 0xa5 0 4M",
		"-c", "read -P 0x5a 4M 1M",
		"-c", "read -P 0x11 8M 64k", "-c", "read -P 0x22 9M 64k",
		"-c", "discard 1M 1M",
		"-c", "read -P 0 1M 1M",
		"-c", "write -z 2M 512k",
		"-c", "read -P 0 2M 512k",
		"-c", "write -z -u 3M 512k", // may unmap: no NO_HOLE
		"-c", "read -P 0 3M 512k",
		"-c", "read -P 0xa5 2621440 524288", // the untouched half of 2M..3M
		"-c", "write -P 0x77 63M 1M",
		"-c", "read -P 0x77 63M 1M",
		uri)
	if strings.Contains(out, "Pattern verification failed") || strings.Contains(out, "failed") {
		t.Fatalf("qemu-io:\n%s", out)
	}
	if n := strings.Count(out, "read "); n != 9 {
		t.Fatalf("qemu-io ran %d reads, want 9:\n%s", n, out)
	}
	// The backing file holds what qemu-io wrote.
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	want := map[int]byte{0: 0xa5, 1<<20 + 5: 0, 2<<20 + 7: 0, 3<<20 + 9: 0, 4<<20 + 1: 0x5a, 8 << 20: 0x11, 9 << 20: 0x22, 63<<20 + 3: 0x77}
	for off, v := range want {
		if b[off] != v {
			t.Errorf("backing file byte %d = %#x, want %#x", off, b[off], v)
		}
	}
}

func TestInteropNbdcopy(t *testing.T) {
	needTool(t, "nbdcopy")
	if testing.Short() {
		t.Skip("short: 256 MiB copy")
	}
	const size = 256 << 20
	dir := t.TempDir()
	src := filepath.Join(dir, "src")
	sf, err := os.Create(src)
	if err != nil {
		t.Fatal(err)
	}
	h := sha256.New()
	// Random data with some zero stretches (nbdcopy skips those).
	buf := make([]byte, 1<<20)
	for i := range size >> 20 {
		if i%7 == 3 {
			clear(buf)
		} else {
			rand.Read(buf)
		}
		sf.Write(buf)
		h.Write(buf)
	}
	sf.Close()
	sum := h.Sum(nil)
	_, path, uri := serveFile(t, size)
	run(t, 3*time.Minute, "nbdcopy", "--flush", src, uri)
	dst := filepath.Join(dir, "dst")
	run(t, 3*time.Minute, "nbdcopy", uri, dst)
	for _, p := range []string{dst, path} {
		f, err := os.Open(p)
		if err != nil {
			t.Fatal(err)
		}
		h := sha256.New()
		n, _ := io.Copy(h, f)
		f.Close()
		if n != size || !bytes.Equal(h.Sum(nil), sum) {
			t.Fatalf("%s: %d bytes, sha256 %x; want %d bytes, %x", p, n, h.Sum(nil), size, sum)
		}
	}
}

func TestInteropFioVerify(t *testing.T) {
	needTool(t, "fio")
	if testing.Short() {
		t.Skip("short: fio")
	}
	if out, _ := exec.Command("fio", "--enghelp=nbd").CombinedOutput(); !strings.Contains(string(out), "uri") {
		t.Skipf("fio has no nbd engine: %s", out)
	}
	s, _, _ := serveFile(t, 128<<20)
	uri := "nbd+unix:///vol?socket=" + s.sock
	out := run(t, 3*time.Minute, "fio", "--name=verify", "--ioengine=nbd", "--uri="+uri,
		"--rw=randwrite", "--bs=4k", "--iodepth=32", "--numjobs=4", "--size=16M", "--offset_increment=32M",
		"--verify=crc32c", "--verify_fatal=1", "--do_verify=1", "--verify_state_save=0", "--group_reporting", "--output-format=json")
	var res struct {
		Jobs []struct {
			Error int `json:"error"`
			Write struct {
				IOBytes int64 `json:"io_bytes"`
			} `json:"write"`
			Read struct {
				IOBytes int64 `json:"io_bytes"`
			} `json:"read"`
		} `json:"jobs"`
	}
	i := strings.Index(out, "{")
	if i < 0 || json.Unmarshal([]byte(out[i:]), &res) != nil || len(res.Jobs) == 0 {
		t.Fatalf("fio output:\n%s", out)
	}
	j := res.Jobs[0]
	if j.Error != 0 || j.Write.IOBytes != 4*16<<20 || j.Read.IOBytes != 4*16<<20 {
		t.Fatalf("fio: error %d, wrote %d, verified %d bytes; want 0, %d, %d\n%s", j.Error, j.Write.IOBytes, j.Read.IOBytes, 4*16<<20, 4*16<<20, out)
	}
	if st := s.srv.Stats(); st.Writes < 4*4096 || st.Reads < 4*4096 {
		t.Fatalf("server saw %d writes, %d reads", st.Writes, st.Reads)
	}
}

// TestInteropFilesystem puts ext4 on the export through nbdfuse and a loop
// device (this kernel has no nbd module), writes and reads files, and
// checks the filesystem after unmounting.
func TestInteropFilesystem(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: losetup and mount")
	}
	if testing.Short() {
		t.Skip("short: filesystem tier")
	}
	needTool(t, "nbdfuse", "fusermount3", "losetup", "mkfs.ext4", "e2fsck", "mount", "umount")
	if _, err := os.Stat("/dev/fuse"); err != nil {
		t.Skip("no /dev/fuse")
	}
	s, _, _ := serveFile(t, 256<<20)
	dir := t.TempDir()
	fuseDir := filepath.Join(dir, "fuse")
	mnt := filepath.Join(dir, "mnt")
	os.Mkdir(fuseDir, 0o755)
	os.Mkdir(mnt, 0o755)

	nf := exec.Command("nbdfuse", filepath.Join(fuseDir, "disk"), "--unix", s.sock)
	var nfOut bytes.Buffer
	nf.Stdout, nf.Stderr = &nfOut, &nfOut
	if err := nf.Start(); err != nil {
		t.Fatal(err)
	}
	nfDone := make(chan error, 1)
	go func() { nfDone <- nf.Wait() }()
	t.Cleanup(func() {
		// The loop device lets go of the file asynchronously: retry the
		// unmount, then unmount lazily, then stop nbdfuse by its PID.
		for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(100 * time.Millisecond) {
			if exec.Command("fusermount3", "-u", fuseDir).Run() == nil {
				break
			}
			if time.Now().After(deadline) {
				t.Errorf("fusermount3 -u %s kept failing; unmounting lazily", fuseDir)
				exec.Command("fusermount3", "-u", "-z", fuseDir).Run()
				break
			}
		}
		select {
		case <-nfDone:
		case <-time.After(10 * time.Second):
			nf.Process.Kill()
			<-nfDone
		}
	})
	disk := filepath.Join(fuseDir, "disk")
	for deadline := time.Now().Add(20 * time.Second); ; {
		if fi, err := os.Stat(disk); err == nil && fi.Size() == 256<<20 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("nbdfuse did not expose %s: %s", disk, nfOut.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
	loop := strings.TrimSpace(run(t, 30*time.Second, "losetup", "--find", "--show", disk))
	t.Cleanup(func() {
		exec.Command("losetup", "-d", loop).Run()
		backing := filepath.Join("/sys/block", filepath.Base(loop), "loop", "backing_file")
		for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
			if _, err := os.Stat(backing); err != nil {
				return
			}
		}
		t.Errorf("%s still attached 30 s after losetup -d", loop)
	})

	run(t, 2*time.Minute, "mkfs.ext4", "-q", "-F", loop)
	run(t, 30*time.Second, "mount", loop, mnt)
	mounted := true
	t.Cleanup(func() {
		if mounted {
			exec.Command("umount", mnt).Run()
		}
	})
	files := map[string][]byte{}
	for i := range 8 {
		b := make([]byte, (i+1)*700<<10)
		rand.Read(b)
		name := filepath.Join(mnt, fmt.Sprintf("f%d", i))
		if err := os.WriteFile(name, b, 0o644); err != nil {
			t.Fatal(err)
		}
		files[name] = b
	}
	os.Remove(filepath.Join(mnt, "f3")) // freed blocks: discard on fstrim
	delete(files, filepath.Join(mnt, "f3"))
	run(t, 30*time.Second, "sync")
	if _, err := exec.LookPath("fstrim"); err == nil {
		run(t, 30*time.Second, "fstrim", mnt)
	}
	run(t, 30*time.Second, "umount", mnt)
	run(t, 30*time.Second, "mount", loop, mnt)
	for name, want := range files {
		got, err := os.ReadFile(name)
		if err != nil || !bytes.Equal(got, want) {
			t.Fatalf("%s after remount: %v (%d bytes, want %d)", name, err, len(got), len(want))
		}
	}
	run(t, 30*time.Second, "umount", mnt)
	mounted = false
	out := run(t, time.Minute, "e2fsck", "-f", "-n", loop)
	if !strings.Contains(out, "clean") && !strings.Contains(out, "files") {
		t.Fatalf("e2fsck: %s", out)
	}
	st := s.srv.Stats()
	if st.Writes == 0 || st.Flushes == 0 {
		t.Fatalf("server stats %+v: expected writes and flushes from ext4", st)
	}
	t.Logf("server stats: %+v", st)
}
