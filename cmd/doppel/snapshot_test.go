package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/doppelha/doppel/daemon/api"
	"github.com/doppelha/doppel/daemon/client"
	"github.com/doppelha/doppel/daemon/ha"
	"github.com/doppelha/doppel/daemon/snapshot/fstest"
)

// needTools skips without root or a tool the test needs.
func needTools(t *testing.T, tools ...string) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: FUSE, loop devices, mount")
	}
	for _, tool := range tools {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s not installed (test/deps.sh installs it)", tool)
		}
	}
	if _, err := os.Stat("/dev/fuse"); err != nil {
		t.Skip("no /dev/fuse")
	}
}

func sh(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %v: %v\n%s", name, args, err, out)
	}
	return strings.TrimSpace(string(out))
}

// snapLab is procLab with the target's volume on dir (a file system
// that takes reflinks).
func snapLab(t *testing.T, dir string) map[string]*agentProc {
	t.Helper()
	root := t.TempDir()
	hb := int(freeUDPPortOn(t))
	agents := map[string]*agentProc{
		"vm1": startAgentProc(t, root, "vm1", "127.0.0.1", hb),
		"vm2": startAgentProc(t, root, "vm2", "127.0.0.2", hb),
	}
	cfg, err := client.LoadConfig(filepath.Join(root, "cli.json"))
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range []string{"vm1", "vm2"} {
		ap := agents[n]
		token, _ := os.ReadFile(filepath.Join(ap.dir, "token"))
		fp, _ := api.FetchFingerprint(context.Background(), ap.control)
		cfg.Put(client.Server{Name: n, Addr: ap.control, Fingerprint: fp, Token: strings.TrimSpace(string(token))})
	}
	if err := cfg.Save(); err != nil {
		t.Fatal(err)
	}
	t.Setenv("DOPPEL_CONFIG", cfg.Path())
	if err := run(context.Background(), []string{"doppel", "job", "create", "web", "--source", "vm1", "--target", "vm2",
		"--volume", filepath.Join(root, "vol1.img"), "--target-volume", filepath.Join(dir, "vol2.img"), "--size", "96M",
		"--monitor", "interval=250ms,missed=8"}); err != nil {
		t.Fatalf("create: %v", err)
	}
	waitJob(t, agents, protected)
	return agents
}

// mountExport mounts the file system on an NBD export (nbdfuse, a loop
// device, mount) until the test ends; mkfs makes one first. It returns
// the mount point and a function that unmounts and detaches early.
func mountExport(t *testing.T, device, export string, mkfs bool, opts string) (string, func()) {
	t.Helper()
	sock, ok := strings.CutPrefix(device, "unix:")
	if !ok {
		t.Fatalf("device %q is not a Unix socket export", device)
	}
	dir := t.TempDir()
	fuse, mnt := filepath.Join(dir, "fuse"), filepath.Join(dir, "fs")
	os.Mkdir(fuse, 0o700)
	os.Mkdir(mnt, 0o700)
	nf := exec.Command("nbdfuse", fuse, "nbd+unix:///"+export+"?socket="+sock)
	nf.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	var nfOut bytes.Buffer
	nf.Stdout, nf.Stderr = &nfOut, &nfOut
	if err := nf.Start(); err != nil {
		t.Fatal(err)
	}
	var loop string
	var once sync.Once
	done := func() {
		once.Do(func() {
			exec.Command("umount", mnt).Run()
			exec.Command("umount", "-l", mnt).Run()
			if loop != "" {
				exec.Command("losetup", "-d", loop).Run()
			}
			nf.Process.Signal(syscall.SIGTERM)
			ended := make(chan struct{})
			go func() { nf.Wait(); close(ended) }()
			select {
			case <-ended:
			case <-time.After(5 * time.Second):
				nf.Process.Kill()
				exec.Command("umount", "-l", fuse).Run()
			}
		})
	}
	t.Cleanup(done)
	for i := 0; ; i++ {
		if _, err := os.Stat(filepath.Join(fuse, "nbd")); err == nil {
			break
		}
		if i > 100 {
			t.Fatalf("nbdfuse did not come up: %s", nfOut.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
	loop = sh(t, "losetup", "-f", "--show", filepath.Join(fuse, "nbd"))
	if mkfs {
		sh(t, "mkfs.ext4", "-q", "-F", loop)
	} else {
		// A crash-consistent image: replay the journal first.
		exec.Command("e2fsck", "-fy", loop).Run()
	}
	args := []string{loop, mnt}
	if opts != "" {
		args = []string{"-o", opts, loop, mnt}
	}
	sh(t, "mount", args...)
	return mnt, done
}

// fileRec is one file the writer created: name, content hash, when its
// creation started and when its fsync returned.
type fileRec struct {
	name        string
	sum         [32]byte
	start, done time.Time
}

// fileWriter creates files of 64 KiB on mnt, each fsynced, until stopped.
type fileWriter struct {
	mnt     string
	mu      sync.Mutex
	files   []fileRec
	err     error
	longest time.Duration
	stop    chan struct{}
	done    chan struct{}
}

func startFileWriter(mnt string) *fileWriter {
	w := &fileWriter{mnt: mnt, stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(w.done)
		buf := make([]byte, 64<<10)
		for i := 0; i < 1200; i++ {
			select {
			case <-w.stop:
				return
			default:
			}
			rand.Read(buf)
			name := fmt.Sprintf("f%05d", i)
			start := time.Now()
			err := writeSynced(filepath.Join(mnt, name), buf)
			end := time.Now()
			w.mu.Lock()
			w.longest = max(w.longest, end.Sub(start))
			if err != nil {
				w.err = err
				w.mu.Unlock()
				return
			}
			w.files = append(w.files, fileRec{name: name, sum: sha256.Sum256(buf), start: start, done: end})
			w.mu.Unlock()
			time.Sleep(5 * time.Millisecond)
		}
	}()
	return w
}

func writeSynced(path string, b []byte) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if _, err := f.Write(b); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	// The directory entry too: the file exists once this returns.
	if err := f.Close(); err != nil {
		return err
	}
	d, err := os.Open(filepath.Dir(path))
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

func (w *fileWriter) snapshotFiles() ([]fileRec, time.Duration) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return append([]fileRec(nil), w.files...), w.longest
}

func (w *fileWriter) finish(t *testing.T) []fileRec {
	close(w.stop)
	<-w.done
	if w.err != nil {
		t.Fatalf("the application got an error: %v", w.err)
	}
	f, _ := w.snapshotFiles()
	return f
}

// checkImage mounts an ext4 image read-only (on a loop device: fsck -n
// must be clean; a crash-consistent image is first given its journal
// replay on a reflink copy) and checks that every file whose fsync
// returned before from is there with its content, and none created
// after to is.
func checkImage(t *testing.T, img string, files []fileRec, from, to time.Time, crash bool) int {
	t.Helper()
	if crash {
		// Replay the journal on a reflink copy (the snapshot stays as
		// taken), as mounting it would.
		cp := img + ".check"
		sh(t, "cp", "--reflink=always", img, cp)
		defer os.Remove(cp)
		if out, err := exec.Command("e2fsck", "-fy", cp).CombinedOutput(); err != nil {
			// Exit 1: errors corrected (the journal replayed): fine.
			if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() > 1 {
				t.Fatalf("e2fsck -fy %s: %v\n%s", img, err, out)
			}
		}
		img = cp
	}
	loop := sh(t, "losetup", "-r", "-f", "--show", img)
	defer exec.Command("losetup", "-d", loop).Run()
	if out, err := exec.Command("e2fsck", "-fn", loop).CombinedOutput(); err != nil {
		t.Fatalf("e2fsck -fn of %s: %v\n%s", img, err, out)
	}
	mnt := t.TempDir()
	sh(t, "mount", "-o", "ro", loop, mnt)
	defer exec.Command("umount", mnt).Run()
	present := 0
	for _, f := range files {
		b, err := os.ReadFile(filepath.Join(mnt, f.name))
		switch {
		case f.done.Before(from):
			if err != nil || sha256.Sum256(b) != f.sum {
				t.Fatalf("%s: %s was fsynced before the snapshot began but is not in it as written (%v)", img, f.name, err)
			}
			present++
		case f.start.After(to):
			if err == nil {
				t.Fatalf("%s: %s was created after the snapshot ended but is in it", img, f.name)
			}
		}
	}
	return present
}

// TestSnapshotsExt4 runs the snapshot scenario with the target volume on
// XFS and on btrfs.
func TestSnapshotsExt4(t *testing.T) {
	needTools(t, "nbdfuse", "losetup", "mkfs.ext4", "e2fsck", "mount", "umount", "fsfreeze", "mkfs.xfs", "mkfs.btrfs")
	if testing.Short() {
		t.Skip("agent processes: slow tier")
	}
	for _, fs := range []string{"xfs", "btrfs"} {
		t.Run(fs, func(t *testing.T) { snapshotScenario(t, fs) })
	}
}

// snapshotScenario: ext4 on the source's export, a writer creating files
// and fsyncing each. Under that load: two crash-consistent snapshots and
// an application-consistent one (fsfreeze on the source); each mounts
// read-only from a loop device, fsck's clean and holds exactly the files
// written before its point. A test failover serves a writable clone
// while replication goes on: the clone is written, the job stays
// protected, and afterwards doppel verify finds no difference (the
// clone's writes reached neither side). A file deleted on the source is
// recovered from the snapshot taken before the deletion (a test failover
// of it).
func snapshotScenario(t *testing.T, fs string) {
	tmnt := fstest.Mount(t, fs)
	agents := snapLab(t, tmnt)
	ctx := context.Background()
	st, err := agents["vm1"].client.Job(ctx, "web")
	if err != nil {
		t.Fatal(err)
	}
	mnt, unmount := mountExport(t, st.Data.Device, "web", true, "")
	tg, _ := agents["vm2"].client.Job(ctx, "web")
	if tg.Snapshots == nil || tg.Snapshots.Mechanism != "reflink" {
		t.Fatalf("target's snapshot status %+v: want reflink on %s", tg.Snapshots, fs)
	}
	w := startFileWriter(mnt)
	type taken struct {
		name     string
		from, to time.Time
		app      bool
	}
	var snaps []taken
	out := &bytes.Buffer{}
	create := func(name string, extra ...string) {
		time.Sleep(700 * time.Millisecond)
		from := time.Now()
		args := append([]string{"doppel", "snapshot", "create", "web", name}, extra...)
		if err := runIO(ctx, args, out, out); err != nil {
			t.Fatalf("%v: %v\n%s", args, err, out)
		}
		snaps = append(snaps, taken{name, from, time.Now(), len(extra) > 0})
	}
	create("s1")
	create("app1", "--fsfreeze", mnt)
	create("s2")
	t.Logf("%s", out)

	// Test failover while the writer goes on.
	files, longestBefore := w.snapshotFiles()
	nBefore := len(files)
	out.Reset()
	if err := runIO(ctx, []string{"doppel", "test-failover", "web", "--json"}, out, out); err != nil {
		t.Fatalf("test-failover: %v\n%s", err, out)
	}
	var tf api.TestFailoverStatus
	if err := json.Unmarshal(out.Bytes(), &tf); err != nil {
		t.Fatalf("test-failover output: %v\n%s", err, out)
	}
	cmnt, cunmount := mountExport(t, tf.Device, tf.Export, false, "")
	if err := writeSynced(filepath.Join(cmnt, "only-in-the-clone"), []byte("test failover")); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(cmnt, files[0].name)); err != nil {
		t.Fatalf("the clone lacks %s: %v", files[0].name, err)
	}
	time.Sleep(2 * time.Second)
	src, err1 := agents["vm1"].client.Job(ctx, "web")
	tgt, err2 := agents["vm2"].client.Job(ctx, "web")
	if err1 != nil || err2 != nil || !protected(src, tgt) || tgt.Snapshots.TestFailover == nil {
		t.Fatalf("during the test failover: source %s %s, target %s %s consistent %t, test %+v (%v %v)", src.HA.Role, src.HA.State,
			tgt.HA.Role, tgt.HA.State, tgt.HA.Consistent, tgt.Snapshots, err1, err2)
	}
	files, longestDuring := w.snapshotFiles()
	t.Logf("test failover on %s from sequence %d; the writer created %d files meanwhile; longest write+fsync before %v, with the test failover %v; source RPO %v",
		tf.Device, tf.Point.Seq, len(files)-nBefore, longestBefore.Round(time.Millisecond), longestDuring.Round(time.Millisecond), src.Data.RPO)
	if len(files) == nBefore {
		t.Fatal("the application made no progress during the test failover")
	}
	cunmount()
	out.Reset()
	if err := runIO(ctx, []string{"doppel", "test-failover", "web", "--stop"}, out, out); err != nil {
		t.Fatalf("test-failover --stop: %v\n%s", err, out)
	}
	if _, err := os.Stat(tf.Clone); !os.IsNotExist(err) {
		t.Fatalf("the clone %s is still there: %v", tf.Clone, err)
	}

	// A deleted file, recovered from the snapshot before the deletion.
	victim := files[3]
	create("before-delete")
	if err := os.Remove(filepath.Join(mnt, victim.name)); err != nil {
		t.Fatal(err)
	}
	files = w.finish(t)
	unmount()
	waitJob(t, agents, protected)
	v, err := agents["vm1"].client.Verify(ctx, "web")
	if err != nil || !v.Equal || v.Differing != 0 {
		t.Fatalf("verify after the test failover: %+v, %v", v, err)
	}

	// Every snapshot: clean, and exactly the files before its point.
	l, err := agents["vm2"].client.Snapshots(ctx, "web")
	if err != nil {
		t.Fatal(err)
	}
	loc := map[string]api.SnapshotInfo{}
	for _, s := range l.Snapshots {
		loc[s.Name] = s
	}
	for _, s := range snaps {
		info, ok := loc[s.name]
		if !ok {
			t.Fatalf("snapshot %s not listed: %+v", s.name, l)
		}
		if info.Point.AppConsistent != s.app {
			t.Fatalf("snapshot %s app-consistent %t", s.name, info.Point.AppConsistent)
		}
		n := checkImage(t, info.Location, files, s.from, s.to, !s.app)
		t.Logf("snapshot %s (seq %d, %s, apply paused %v, allocated %d, exclusive %d): fsck clean, %d files present as written",
			s.name, info.Point.Seq, map[bool]string{true: "application-consistent", false: "crash-consistent"}[s.app], info.Took,
			info.Usage.Allocated, info.Usage.Exclusive, n)
	}
	out.Reset()
	if err := runIO(ctx, []string{"doppel", "test-failover", "web", "--snapshot", "before-delete", "--json"}, out, out); err != nil {
		t.Fatalf("test-failover --snapshot: %v\n%s", err, out)
	}
	if err := json.Unmarshal(out.Bytes(), &tf); err != nil {
		t.Fatal(err)
	}
	rmnt, runmount := mountExport(t, tf.Device, tf.Export, false, "ro")
	b, err := os.ReadFile(filepath.Join(rmnt, victim.name))
	if err != nil || sha256.Sum256(b) != victim.sum {
		t.Fatalf("the deleted file is not in the snapshot before the deletion: %v", err)
	}
	runmount()
	if err := run(ctx, []string{"doppel", "test-failover", "web", "--stop"}); err != nil {
		t.Fatal(err)
	}
	out.Reset()
	if err := runIO(ctx, []string{"doppel", "snapshot", "list", "web"}, out, out); err != nil {
		t.Fatal(err)
	}
	t.Logf("%s", out)
	if err := run(ctx, []string{"doppel", "snapshot", "delete", "web", "s1"}); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(loc["s1"].Location); !os.IsNotExist(err) {
		t.Fatalf("s1's image is still there: %v", err)
	}
	// job delete removes the rest.
	if err := run(ctx, []string{"doppel", "job", "delete", "web"}); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(tmnt, ".doppel-snapshots")); !os.IsNotExist(err) {
		ents, _ := os.ReadDir(filepath.Join(tmnt, ".doppel-snapshots", "web"))
		t.Fatalf("snapshots left after job delete: %v %v", err, ents)
	}
}

// TestFailoverToSnapshotExt4: a file deleted on the source is recovered by
// failing over to the snapshot taken before the deletion (ext4 on the
// export, the target volume on XFS). The target's newer data is kept as a
// snapshot; the promoted volume holds the deleted file and not what the
// source wrote after the snapshot; the reverse resyncs only changed
// chunks and leaves both sides equal (verify), and so does the failback,
// after which the old source holds the recovered file and the writes made
// on the target meanwhile.
func TestFailoverToSnapshotExt4(t *testing.T) {
	needTools(t, "nbdfuse", "losetup", "mkfs.ext4", "e2fsck", "mount", "umount", "mkfs.xfs")
	if testing.Short() {
		t.Skip("agent processes: slow tier")
	}
	tmnt := fstest.Mount(t, "xfs")
	agents := snapLab(t, tmnt)
	ctx := context.Background()
	job := func(n string) api.JobStatus {
		st, err := agents[n].client.Job(ctx, "web")
		if err != nil {
			t.Fatal(err)
		}
		return st
	}
	mnt, unmount := mountExport(t, job("vm1").Data.Device, "web", true, "")
	victim := []byte(strings.Repeat("the file the ransomware deletes\n", 4096))
	if err := writeSynced(filepath.Join(mnt, "victim"), victim); err != nil {
		t.Fatal(err)
	}
	out := &bytes.Buffer{}
	if err := runIO(ctx, []string{"doppel", "snapshot", "create", "web", "before-delete"}, out, out); err != nil {
		t.Fatalf("snapshot create: %v\n%s", err, out)
	}
	if err := os.Remove(filepath.Join(mnt, "victim")); err != nil {
		t.Fatal(err)
	}
	if err := writeSynced(filepath.Join(mnt, "after-snapshot"), []byte("written after the snapshot")); err != nil {
		t.Fatal(err)
	}
	unmount()
	waitJob(t, agents, protected)

	// Without --yes and without a terminal: refused, nothing done.
	out.Reset()
	if err := runIO(ctx, []string{"doppel", "failover", "web", "--snapshot", "before-delete", "--force"}, out, out); err == nil {
		t.Fatalf("failover --snapshot without confirmation went on:\n%s", out)
	}
	out.Reset()
	if err := runIO(ctx, []string{"doppel", "failover", "web", "--snapshot", "no-such", "--force", "--yes"}, out, out); err == nil {
		t.Fatalf("failover to a missing snapshot went on:\n%s", out)
	}
	if st := job("vm2"); st.HA.Role != ha.RoleTarget {
		t.Fatalf("a refused failover changed vm2: %s %s", st.HA.Role, st.HA.State)
	}
	out.Reset()
	if err := runIO(ctx, []string{"doppel", "failover", "web", "--snapshot", "before-delete", "--force", "--yes"}, out, out); err != nil {
		t.Fatalf("failover --snapshot: %v\n%s", err, out)
	}
	t.Logf("%s", out)
	waitJob(t, agents, func(s, tg api.JobStatus) bool {
		return tg.HA.Role == ha.RoleSource && tg.HA.State == ha.StateFailedOver && strings.HasPrefix(tg.Data.Device, "unix:") && s.HA.State == ha.StateSuperseded
	})
	l, err := agents["vm2"].client.Snapshots(ctx, "web")
	if err != nil {
		t.Fatal(err)
	}
	kept := ""
	for _, s := range l.Snapshots {
		if s.Kind == "before-rollback" && strings.HasPrefix(s.Name, "before-failover-epoch-") {
			kept = s.Location
		}
	}
	if kept == "" {
		t.Fatalf("the newer data was not kept as a snapshot: %+v", l.Snapshots)
	}
	// The kept snapshot is the data before the rollback: no victim.
	checkFiles := func(dev, export, label string, want map[string][]byte, absent ...string) {
		t.Helper()
		m, um := mountExport(t, dev, export, false, "")
		defer um()
		for f, b := range want {
			got, err := os.ReadFile(filepath.Join(m, f))
			if err != nil || !bytes.Equal(got, b) {
				t.Fatalf("%s: %s: %v (%d bytes, want %d)", label, f, err, len(got), len(b))
			}
		}
		for _, f := range absent {
			if _, err := os.Stat(filepath.Join(m, f)); !os.IsNotExist(err) {
				t.Fatalf("%s: %s is there (%v)", label, f, err)
			}
		}
	}
	m, um := mountExport(t, job("vm2").Data.Device, "web", false, "")
	if b, err := os.ReadFile(filepath.Join(m, "victim")); err != nil || !bytes.Equal(b, victim) {
		t.Fatalf("the deleted file is not back after the failover to the snapshot: %v", err)
	}
	if _, err := os.Stat(filepath.Join(m, "after-snapshot")); !os.IsNotExist(err) {
		t.Fatalf("a file written after the snapshot is on the promoted volume: %v", err)
	}
	if err := writeSynced(filepath.Join(m, "on-vm2"), []byte("written after the failover")); err != nil {
		t.Fatal(err)
	}
	um()

	out.Reset()
	if err := runIO(ctx, []string{"doppel", "reverse", "web"}, out, out); err != nil {
		t.Fatalf("reverse: %v\n%s", err, out)
	}
	reversed := func(s, tg api.JobStatus) bool {
		return tg.HA.Role == ha.RoleSource && tg.HA.State == ha.StateReplicating && s.HA.Role == ha.RoleTarget && s.HA.State == ha.StateReplicating && s.HA.Consistent
	}
	waitJob(t, agents, reversed)
	v, err := agents["vm2"].client.Verify(ctx, "web")
	if err != nil || !v.Equal || v.Differing != 0 {
		t.Fatalf("verify after the reverse: %+v, %v", v, err)
	}
	evs, _ := agents["vm2"].client.Events(ctx, "web")
	for _, e := range evs {
		if strings.Contains(fmt.Sprint(e), "rolled the volume back") {
			t.Logf("vm2: %v", e)
		}
	}
	t.Logf("after the reverse, verify: %+v", v)

	out.Reset()
	if err := runIO(ctx, []string{"doppel", "failback", "web"}, out, out); err != nil {
		t.Fatalf("failback: %v\n%s", err, out)
	}
	waitJob(t, agents, protected)
	v, err = agents["vm1"].client.Verify(ctx, "web")
	if err != nil || !v.Equal || v.Differing != 0 {
		t.Fatalf("verify after the failback: %+v, %v", v, err)
	}
	checkFiles(job("vm1").Data.Device, "web", "vm1 after the failback",
		map[string][]byte{"victim": victim, "on-vm2": []byte("written after the failover")}, "after-snapshot")
}
