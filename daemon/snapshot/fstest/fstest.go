// Package fstest makes real file systems for tests: an XFS or btrfs on a
// loop device over a sparse file, mounted until the test ends (unmounted,
// detached and removed in t.Cleanup, also on failure). A test that is not
// root skips; a root test fails when the kernel or the tools cannot make
// the file system (test/deps.sh installs xfsprogs and btrfs-progs).
package fstest

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// sizes are the smallest the mkfs tools accept, rounded up.
var sizes = map[string]string{"xfs": "320M", "btrfs": "256M", "ext4": "64M"}

// Mount makes a file system of type fstype (xfs, btrfs, ext4) on a loop
// device and returns its mount point.
func Mount(t testing.TB, fstype string) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: loop devices and mount")
	}
	size, ok := sizes[fstype]
	if !ok {
		t.Fatalf("fstest: unknown file system %q", fstype)
	}
	mkfs := "mkfs." + fstype
	for _, tool := range []string{mkfs, "losetup", "mount", "umount"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s not installed (test/deps.sh installs it): %v", tool, err)
		}
	}
	if b, err := os.ReadFile("/proc/filesystems"); err != nil || !strings.Contains(string(b), "\t"+fstype+"\n") {
		exec.Command("modprobe", fstype).Run()
		if b, _ := os.ReadFile("/proc/filesystems"); !strings.Contains(string(b), "\t"+fstype+"\n") {
			t.Skipf("the kernel has no %s", fstype)
		}
	}
	dir := t.TempDir()
	img := filepath.Join(dir, fstype+".img")
	mnt := filepath.Join(dir, "mnt")
	if err := os.Mkdir(mnt, 0o700); err != nil {
		t.Fatal(err)
	}
	run := func(name string, args ...string) string {
		t.Helper()
		out, err := exec.Command(name, args...).CombinedOutput()
		if err != nil {
			t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
		}
		return strings.TrimSpace(string(out))
	}
	run("truncate", "-s", size, img)
	loop := run("losetup", "-f", "--show", img)
	t.Cleanup(func() {
		for i := 0; i < 50; i++ {
			if err := exec.Command("umount", mnt).Run(); err == nil || !mounted(mnt) {
				break
			}
			time.Sleep(100 * time.Millisecond)
		}
		if mounted(mnt) {
			exec.Command("umount", "-l", mnt).Run()
		}
		exec.Command("losetup", "-d", loop).Run()
	})
	args := []string{"-q", loop}
	switch fstype {
	case "xfs":
		args = []string{"-q", "-f", "-m", "reflink=1", loop}
	case "btrfs":
		args = []string{"-q", "-f", loop}
	case "ext4":
		args = []string{"-q", "-F", loop}
	}
	run(mkfs, args...)
	run("mount", loop, mnt)
	return mnt
}

func mounted(dir string) bool {
	b, _ := os.ReadFile("/proc/self/mounts")
	for _, l := range strings.Split(string(b), "\n") {
		if f := strings.Fields(l); len(f) > 1 && f[1] == dir {
			return true
		}
	}
	return false
}
