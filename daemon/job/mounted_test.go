package job

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// TestCheckVolumeRealMount: a loop device with a mounted ext4 (and its
// backing file) is refused, naming the mount point; unmounted, accepted.
func TestCheckVolumeRealMount(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: loop device and mount")
	}
	for _, tool := range []string{"losetup", "mkfs.ext4", "mount", "umount"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s not installed", tool)
		}
	}
	dir := t.TempDir()
	img := filepath.Join(dir, "vol.img")
	if err := os.WriteFile(img, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(img, 16<<20); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command("losetup", "-f", "--show", img).Output()
	if err != nil {
		t.Skipf("no loop device available: %v", err)
	}
	loop := strings.TrimSpace(string(out))
	t.Cleanup(func() { exec.Command("losetup", "-d", loop).Run() })
	if out, err := exec.Command("mkfs.ext4", "-q", "-F", loop).CombinedOutput(); err != nil {
		t.Fatalf("mkfs: %v %s", err, out)
	}
	if err := CheckVolume(loop, 0, "/proc/self/mountinfo"); err != nil {
		t.Fatalf("unmounted loop device refused: %v", err)
	}
	mnt := filepath.Join(dir, "mnt")
	os.Mkdir(mnt, 0o755)
	if out, err := exec.Command("mount", loop, mnt).CombinedOutput(); err != nil {
		t.Fatalf("mount: %v %s", err, out)
	}
	t.Cleanup(func() { exec.Command("umount", mnt).Run() })
	err = CheckVolume(loop, 0, "/proc/self/mountinfo")
	if !errors.Is(err, ErrVolumeMounted) || !strings.Contains(err.Error(), mnt) {
		t.Fatalf("mounted device: %v, want ErrVolumeMounted naming %s", err, mnt)
	}
	err = CheckVolume(img, 0, "/proc/self/mountinfo")
	if !errors.Is(err, ErrVolumeMounted) || !strings.Contains(err.Error(), loop) && !strings.Contains(err.Error(), mnt) {
		t.Fatalf("file backing a mounted loop device: %v", err)
	}
}
