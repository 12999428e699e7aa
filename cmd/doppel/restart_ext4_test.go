package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// TestAgentRestartUnderExt4Load: ext4 on the source's export (nbdfuse
// and a loop device: this kernel may have no nbd module), a writer
// creating files and fsyncing each, and the source agent restarts twice
// under it. No write or fsync fails, the file system stays read-write,
// every file reads back, fsck finds it clean and doppel verify finds no
// difference between source and target.
func TestAgentRestartUnderExt4Load(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: FUSE, loop devices, mount")
	}
	for _, tool := range []string{"nbdfuse", "losetup", "mkfs.ext4", "fsck.ext4", "mount", "umount"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s not installed (test/deps.sh installs it)", tool)
		}
	}
	if _, err := os.Stat("/dev/fuse"); err != nil {
		t.Skip("no /dev/fuse")
	}
	agents := procLab(t)
	ctx := context.Background()
	st, err := agents["vm1"].client.Job(ctx, "web")
	if err != nil {
		t.Fatal(err)
	}
	sock, _ := strings.CutPrefix(st.Data.Device, "unix:")
	dir := t.TempDir()
	fuse, mnt := filepath.Join(dir, "fuse"), filepath.Join(dir, "fs")
	os.Mkdir(fuse, 0o700)
	os.Mkdir(mnt, 0o700)
	nf := exec.Command("nbdfuse", fuse, "nbd+unix:///web?socket="+sock)
	nf.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	var nfOut bytes.Buffer
	nf.Stdout, nf.Stderr = &nfOut, &nfOut
	if err := nf.Start(); err != nil {
		t.Fatal(err)
	}
	var loop string
	t.Cleanup(func() {
		exec.Command("umount", "-l", mnt).Run()
		if loop != "" {
			exec.Command("losetup", "-d", loop).Run()
		}
		nf.Process.Signal(syscall.SIGTERM)
		done := make(chan struct{})
		go func() { nf.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			nf.Process.Kill()
			exec.Command("umount", "-l", fuse).Run()
		}
		if t.Failed() {
			t.Logf("nbdfuse: %s", nfOut.String())
		}
	})
	sh := func(name string, args ...string) string {
		t.Helper()
		out, err := exec.Command(name, args...).CombinedOutput()
		if err != nil {
			t.Fatalf("%s %v: %v\n%s", name, args, err, out)
		}
		return strings.TrimSpace(string(out))
	}
	for i := 0; ; i++ {
		if _, err := os.Stat(filepath.Join(fuse, "nbd")); err == nil {
			break
		}
		if i > 100 {
			t.Fatalf("nbdfuse did not come up: %s", nfOut.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
	loop = sh("losetup", "-f", "--show", filepath.Join(fuse, "nbd"))
	sh("mkfs.ext4", "-q", "-F", loop)
	sh("mount", loop, mnt)

	// The application: files of 64 KiB, each written and fsynced.
	type file struct {
		name string
		sum  [32]byte
	}
	var (
		mu      sync.Mutex
		files   []file
		werr    error
		longest time.Duration
		spans   [][2]time.Time // each write's start and end
	)
	stop, done := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(done)
		buf := make([]byte, 64<<10)
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			rand.Read(buf)
			name := filepath.Join(mnt, fmt.Sprintf("f%05d", i%400))
			start := time.Now()
			err := func() error {
				f, err := os.Create(name)
				if err != nil {
					return err
				}
				if _, err := f.Write(buf); err != nil {
					f.Close()
					return err
				}
				if err := f.Sync(); err != nil {
					f.Close()
					return err
				}
				return f.Close()
			}()
			d := time.Since(start)
			mu.Lock()
			longest = max(longest, d)
			spans = append(spans, [2]time.Time{start, start.Add(d)})
			if err != nil {
				werr = err
				mu.Unlock()
				return
			}
			files = append(files, file{name, sha256.Sum256(buf)})
			mu.Unlock()
		}
	}()
	var pids []int
	var windows [][2]time.Time
	t.Cleanup(func() {
		for _, p := range pids {
			syscall.Kill(p, syscall.SIGKILL)
		}
	})
	for range 2 {
		time.Sleep(time.Second)
		start := time.Now()
		res, err := agents["vm1"].client.RestartAgent(ctx)
		if err != nil {
			close(stop)
			<-done
			t.Fatalf("restart: %v", err)
		}
		windows = append(windows, [2]time.Time{start, time.Now()})
		pids = append(pids, res.PID)
		t.Logf("restart took %v: now pid %d", time.Since(start).Round(time.Millisecond), res.PID)
	}
	time.Sleep(time.Second)
	close(stop)
	<-done
	mu.Lock()
	// The longest write+fsync that overlapped a restart, and the longest
	// of the others (the file system's own latency on this machine).
	var during, other time.Duration
	for _, sp := range spans {
		d, hit := sp[1].Sub(sp[0]), false
		for _, w := range windows {
			hit = hit || sp[0].Before(w[1]) && sp[1].After(w[0])
		}
		if hit {
			during = max(during, d)
		} else {
			other = max(other, d)
		}
	}
	t.Logf("%d files of 64 KiB written and fsynced; the longest write+fsync across a restart took %v, the longest of the others %v",
		len(files), during.Round(time.Millisecond), other.Round(time.Millisecond))
	if werr != nil {
		t.Fatalf("the application got an error across the restarts: %v", werr)
	}
	mounts, _ := os.ReadFile("/proc/self/mounts")
	for _, l := range strings.Split(string(mounts), "\n") {
		if f := strings.Fields(l); len(f) > 3 && f[1] == mnt && !strings.HasPrefix(f[3], "rw") {
			t.Fatalf("the file system was remounted %s", f[3])
		}
	}
	latest := map[string][32]byte{}
	for _, f := range files {
		latest[f.name] = f.sum
	}
	mu.Unlock()
	for name, sum := range latest {
		b, err := os.ReadFile(name)
		if err != nil || sha256.Sum256(b) != sum {
			t.Fatalf("%s does not read back as written (%v)", name, err)
		}
	}
	sh("umount", mnt)
	if out, err := exec.Command("fsck.ext4", "-n", "-f", loop).CombinedOutput(); err != nil {
		t.Fatalf("fsck: %v\n%s", err, out)
	}
	waitJob(t, agents, protected)
	v, err := agents["vm1"].client.Verify(ctx, "web")
	if err != nil || !v.Equal || v.Differing != 0 {
		t.Fatalf("verify: %+v, %v", v, err)
	}
}
