// Command snapbench measures what snapshots of a job's target cost: how
// long taking one pauses the target's apply stream (and the sync writes
// waiting behind it), and sync replication with 0 and with 10 snapshots
// kept, side by side, on a target volume on XFS and on btrfs (loop
// devices it makes and removes). A replstate source and target over TCP
// on loopback, in this process; the writer does random 4 KiB sync writes.
// Root only. Prints a Markdown section for bench/RESULTS.md.
//
//	go run ./bench/cmd/snapbench [-mib 512] [-seconds 10]
package main

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/doppelha/doppel/blockdev"
	"github.com/doppelha/doppel/daemon/repl"
	"github.com/doppelha/doppel/daemon/repl/wire"
	"github.com/doppelha/doppel/daemon/replstate"
	"github.com/doppelha/doppel/daemon/snapshot"
)

func main() {
	mib := flag.Int64("mib", 512, "volume size in MiB")
	secs := flag.Int("seconds", 10, "seconds per write phase")
	flag.Parse()
	if err := run(*mib<<20, time.Duration(*secs)*time.Second); err != nil {
		fmt.Fprintln(os.Stderr, "snapbench:", err)
		os.Exit(1)
	}
}

type phase struct {
	name      string
	writes    int
	p50, p99  time.Duration
	max       time.Duration
	snapTook  []time.Duration
	snapAlloc int64
	snapExcl  int64
}

func run(size int64, d time.Duration) error {
	if os.Geteuid() != 0 {
		return fmt.Errorf("needs root (loop devices, mount)")
	}
	load, _ := os.ReadFile("/proc/loadavg")
	fmt.Printf("## Snapshots: cost of a snapshot, replication with 10 kept\n\n")
	fmt.Printf("`go run ./bench/cmd/snapbench -mib %d -seconds %d` (%s, load %s at start). A replstate source and target in one process over TCP on loopback, sync mode; the target's %d MiB volume file on a loop-mounted file system; the writer does random 4 KiB writes, one at a time, each acknowledged after the target applied it. The volume is first filled with random data through replication.\n\n",
		size>>20, int(d.Seconds()), machine(), strings.Fields(string(load))[0], size>>20)
	fmt.Println("| target fs | phase | writes/s | p50 | p99 | max | snapshot pause (median / max of 10) | allocated / exclusive (newest) |")
	fmt.Println("|---|---|---|---|---|---|---|---|")
	for _, fs := range []string{"xfs", "btrfs"} {
		ps, err := runFS(fs, size, d)
		if err != nil {
			return fmt.Errorf("%s: %w", fs, err)
		}
		for _, p := range ps {
			pause := ""
			if len(p.snapTook) > 0 {
				s := slices.Clone(p.snapTook)
				slices.Sort(s)
				pause = fmt.Sprintf("%v / %v", s[len(s)/2].Round(10*time.Microsecond), s[len(s)-1].Round(10*time.Microsecond))
			}
			space := ""
			if p.snapAlloc > 0 {
				space = fmt.Sprintf("%.1f / %.1f MiB", float64(p.snapAlloc)/(1<<20), float64(p.snapExcl)/(1<<20))
			}
			fmt.Printf("| %s | %s | %.0f | %v | %v | %v | %s | %s |\n", fs, p.name, float64(p.writes)/d.Seconds(),
				p.p50.Round(time.Microsecond), p.p99.Round(time.Microsecond), p.max.Round(time.Microsecond), pause, space)
		}
	}
	return nil
}

func machine() string {
	b, _ := os.ReadFile("/proc/cpuinfo")
	model := ""
	for _, l := range strings.Split(string(b), "\n") {
		if k, v, ok := strings.Cut(l, ":"); ok && strings.TrimSpace(k) == "model name" {
			model = strings.TrimSpace(v)
			break
		}
	}
	out, _ := exec.Command("nproc").Output()
	return fmt.Sprintf("%s cores %s", strings.TrimSpace(string(out)), model)
}

// mountFS makes fstype on a loop device; undo removes everything.
func mountFS(fstype string) (mnt string, undo func(), err error) {
	dir, err := os.MkdirTemp("", "snapbench-")
	if err != nil {
		return "", nil, err
	}
	img, mnt := filepath.Join(dir, "fs.img"), filepath.Join(dir, "mnt")
	os.Mkdir(mnt, 0o700)
	var loop string
	undo = func() {
		exec.Command("umount", mnt).Run()
		if loop != "" {
			exec.Command("losetup", "-d", loop).Run()
		}
		os.RemoveAll(dir)
	}
	sh := func(name string, args ...string) (string, error) {
		out, err := exec.Command(name, args...).CombinedOutput()
		if err != nil {
			return "", fmt.Errorf("%s %v: %w: %s", name, args, err, out)
		}
		return strings.TrimSpace(string(out)), nil
	}
	if _, err := sh("truncate", "-s", "4G", img); err != nil {
		undo()
		return "", nil, err
	}
	if loop, err = sh("losetup", "-f", "--show", img); err != nil {
		undo()
		return "", nil, err
	}
	args := []string{"-q", "-f", loop}
	if fstype == "xfs" {
		args = []string{"-q", "-f", "-m", "reflink=1", loop}
	}
	if _, err := sh("mkfs."+fstype, args...); err != nil {
		undo()
		return "", nil, err
	}
	if _, err := sh("mount", loop, mnt); err != nil {
		undo()
		return "", nil, err
	}
	return mnt, undo, nil
}

func runFS(fs string, size int64, d time.Duration) ([]phase, error) {
	mnt, undo, err := mountFS(fs)
	if err != nil {
		return nil, err
	}
	defer undo()
	work, err := os.MkdirTemp("", "snapbench-src-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(work)
	log := slog.New(slog.DiscardHandler)
	tvol := filepath.Join(mnt, "vol.img")
	tb, err := blockdev.OpenFile(tvol, size)
	if err != nil {
		return nil, err
	}
	defer tb.Close()
	tgt, err := replstate.OpenTarget(replstate.TargetConfig{Dir: filepath.Join(work, "tstate"), Backend: tb, Log: log})
	if err != nil {
		return nil, err
	}
	defer tgt.Close()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { defer wg.Done(); tgt.Serve(ctx, l) }()
	sb, err := blockdev.OpenFile(filepath.Join(work, "src.img"), size)
	if err != nil {
		return nil, err
	}
	defer sb.Close()
	src, err := replstate.OpenSource(replstate.SourceConfig{Dir: filepath.Join(work, "sstate"), Backend: sb, Mode: wire.ModeSync, Log: log,
		Mirror: repl.MirrorFull, Dial: func(ctx context.Context) (net.Conn, error) {
			var dl net.Dialer
			return dl.DialContext(ctx, "tcp", l.Addr().String())
		}})
	if err != nil {
		return nil, err
	}
	wg.Add(1)
	go func() { defer wg.Done(); src.Run(ctx) }()
	defer func() { cancel(); src.Close(); wg.Wait() }()
	if err := waitSynced(src, tgt, time.Minute); err != nil {
		return nil, err
	}
	// Fill with random data, 1 MiB writes.
	buf := make([]byte, 1<<20)
	for off := int64(0); off < size; off += int64(len(buf)) {
		rand.Read(buf)
		if err := src.Apply(ctx, &blockdev.Mutation{Op: blockdev.OpWrite, Offset: off, Length: int64(len(buf)), Data: buf}); err != nil {
			return nil, err
		}
	}
	src.Apply(ctx, &blockdev.Mutation{Op: blockdev.OpFlush})
	mgr, err := snapshot.Open(snapshot.Config{Dir: filepath.Join(work, "snaps"), Volume: tvol, Job: "bench", Log: log})
	if err != nil {
		return nil, err
	}
	if _, err := mgr.Mechanism(); err != nil {
		return nil, err
	}
	var out []phase
	p0, err := writePhase(ctx, src, size, d, nil)
	if err != nil {
		return nil, err
	}
	p0.name = "0 snapshots"
	out = append(out, p0)
	// 10 snapshots, taken while the writer runs (one every d/10).
	i := 0
	p1, err := writePhase(ctx, src, size, d, func() (time.Duration, error) {
		var took time.Duration
		err := tgt.AtPoint(func(p snapshot.Point) error {
			s, err := mgr.Create(fmt.Sprintf("s%02d", i), snapshot.KindManual, p, "")
			took = s.Took
			return err
		})
		i++
		return took, err
	})
	if err != nil {
		return nil, fmt.Errorf("%w (target %+v, source %+v)", err, tgt.Status(), src.Status())
	}
	p1.name = "taking 10 snapshots"
	out = append(out, p1)
	p2, err := writePhase(ctx, src, size, d, nil)
	if err != nil {
		return nil, err
	}
	p2.name = "10 snapshots kept"
	list := mgr.List()
	u := mgr.Usage(list[len(list)-1])
	p2.snapAlloc, p2.snapExcl = u.Allocated, u.Exclusive
	out = append(out, p2)
	return out, mgr.RemoveAll()
}

func waitSynced(src *replstate.Source, tgt *replstate.Target, limit time.Duration) error {
	deadline := time.Now().Add(limit)
	for {
		st := src.Status()
		if st.Connected && st.Synced && !st.ResyncActive && tgt.Status().Data == "consistent" {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("not in sync after %v: %+v", limit, st)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// writePhase writes random 4 KiB blocks for d; snap, when set, is called
// ten times at even intervals from another goroutine.
func writePhase(ctx context.Context, src *replstate.Source, size int64, d time.Duration, snap func() (time.Duration, error)) (phase, error) {
	var p phase
	var lat []time.Duration
	stop := time.Now().Add(d)
	var snapErr error
	var swg sync.WaitGroup
	if snap != nil {
		swg.Add(1)
		go func() {
			defer swg.Done()
			for k := 1; k <= 10; k++ {
				time.Sleep(time.Until(stop.Add(-d + time.Duration(k)*d/11)))
				took, err := snap()
				if err != nil {
					snapErr = err
					return
				}
				p.snapTook = append(p.snapTook, took)
			}
		}()
	}
	buf := make([]byte, 4096)
	var rb [8]byte
	for time.Now().Before(stop) {
		rand.Read(buf)
		rand.Read(rb[:])
		off := int64(binary.LittleEndian.Uint64(rb[:])%uint64(size/4096)) * 4096
		t0 := time.Now()
		if err := src.Apply(ctx, &blockdev.Mutation{Op: blockdev.OpWrite, Offset: off, Length: 4096, Data: buf}); err != nil {
			return p, err
		}
		lat = append(lat, time.Since(t0))
	}
	swg.Wait()
	if snapErr != nil {
		return p, snapErr
	}
	slices.Sort(lat)
	p.writes = len(lat)
	if len(lat) > 0 {
		p.p50, p.p99, p.max = lat[len(lat)/2], lat[len(lat)*99/100], lat[len(lat)-1]
	}
	return p, nil
}
