package repl

import (
	"bytes"
	"context"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/doppelha/doppel/blockdev"
	"github.com/doppelha/doppel/daemon/repl/wire"
)

// liveWriter writes random ranges through src.Apply until stop is closed.
func liveWriter(t *testing.T, src *Stream, size int, seed uint64, stop <-chan struct{}) *sync.WaitGroup {
	var wg sync.WaitGroup
	for w := range 3 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := rand.New(rand.NewPCG(seed, uint64(w)))
			for i := 0; i < 5000; i++ {
				select {
				case <-stop:
					return
				default:
				}
				off := int64(r.IntN(size/4096)) * 4096
				n := min(int64(4096*(1+r.IntN(32))), int64(size)-off)
				m := &blockdev.Mutation{Op: blockdev.OpWrite, Offset: off, Length: n, Data: randBytes(r, int(n))}
				switch r.IntN(8) {
				case 0:
					m = &blockdev.Mutation{Op: blockdev.OpTrim, Offset: off, Length: n}
				case 1:
					m = &blockdev.Mutation{Op: blockdev.OpFlush}
				}
				if err := src.Apply(context.Background(), m); err != nil {
					t.Errorf("apply: %v", err)
					return
				}
				if i%8 == 0 {
					time.Sleep(100 * time.Microsecond)
				}
			}
		}()
	}
	return &wg
}

// slowReads delays large reads (mirror reads, not checksum reads of the
// application path).
type slowReads struct {
	*memBackend
	delay time.Duration
}

func (s slowReads) ReadAt(p []byte, off int64) (int, error) {
	if len(p) >= 256<<10 {
		time.Sleep(s.delay)
	}
	return s.memBackend.ReadAt(p, off)
}

// TestMirrorWhileWriting mirrors a volume with data, zero ranges and a
// garbage-filled target while the application keeps writing: the target
// must end identical (no mirror chunk may overwrite a newer write), be
// inconsistent during the mirror and consistent after.
func TestMirrorWhileWriting(t *testing.T) {
	for _, kind := range []MirrorKind{MirrorFull, MirrorDiff} {
		for _, mode := range []wire.Mode{wire.ModeAsync, wire.ModeSync} {
			t.Run(kind.String()+"/"+mode.String(), func(t *testing.T) {
				const size = 16 << 20
				r := rand.New(rand.NewPCG(7, uint64(kind)))
				srcB, tgtB := newMem(size), newMem(size)
				copy(srcB.data, randBytes(r, size))
				clear(srcB.data[4<<20 : 9<<20]) // a zero range
				copy(tgtB.data, randBytes(r, size))
				if kind == MirrorDiff { // the target holds an older copy
					copy(tgtB.data, srcB.data)
					copy(tgtB.data[1<<20:], randBytes(r, 1<<20))
					clear(tgtB.data[12<<20 : 13<<20])
				}
				// Mirror reads are slowed down so that application writes
				// land between a mirror read and its frame, were they not
				// ordered by the range lock.
				p := newPair(t, slowReads{srcB, time.Millisecond}, tgtB, pairOpts{mode: mode})
				stop := make(chan struct{})
				wg := liveWriter(t, p.src, size, uint64(mode), stop)
				res, err := p.src.Mirror(context.Background(), kind)
				close(stop)
				wg.Wait()
				if err != nil {
					t.Fatal(err)
				}
				p.drain(t)
				if s, g := srcB.snapshot(), tgtB.snapshot(); !bytes.Equal(s, g) {
					t.Fatalf("target differs after %v mirror: %s", kind, firstDiff(s, g))
				}
				st, _, _ := p.tgt.Status()
				if st.State != "consistent" || p.src.Stats().TargetState != "consistent" {
					t.Fatalf("data state after mirror: target %s, source view %s", st.State, p.src.Stats().TargetState)
				}
				if kind == MirrorFull && res.Holes == 0 {
					t.Errorf("no hole sent for the zero range")
				}
				if kind == MirrorDiff && res.Sent > 3<<20 {
					t.Errorf("diff mirror sent %d bytes of data for ~2 MiB of differences (plus live writes)", res.Sent)
				}
				ps := p.src.Stats()
				if ps.MirrorDone != size || ps.MirrorTotal != size {
					t.Errorf("progress %d/%d, want %d/%d", ps.MirrorDone, ps.MirrorTotal, size, size)
				}
				t.Logf("%v: scanned %d, sent %d, holes %d, differing %d, wire %v", kind, res.Scanned, res.Sent, res.Holes, res.DifferingBytes(), ps.SentBytes)
			})
		}
	}
}

// TestTargetInconsistentDuringMirror checks the data state transitions.
func TestTargetInconsistentDuringMirror(t *testing.T) {
	const size = 4 << 20
	srcB, tgtB := newMem(size), newMem(size)
	copy(srcB.data, randBytes(rand.New(rand.NewPCG(1, 1)), size))
	var seen sync.Map
	p := newPair(t, srcB, tgtB, pairOpts{mode: wire.ModeAsync})
	stop := make(chan struct{})
	go func() {
		for {
			select {
			case <-stop:
				return
			default:
			}
			st, _, _ := p.tgt.Status()
			seen.Store(st.State, true)
			time.Sleep(100 * time.Microsecond)
		}
	}()
	if _, err := p.src.Mirror(context.Background(), MirrorFull); err != nil {
		t.Fatal(err)
	}
	close(stop)
	if _, ok := seen.Load("inconsistent"); !ok {
		t.Error("target never reported inconsistent during the mirror")
	}
	data, err := os.ReadFile(p.tgt.cfg.StatePath)
	if err != nil || !bytes.Contains(data, []byte(`"consistent"`)) {
		t.Fatalf("persisted state after mirror: %s %v", data, err)
	}
}

func openFile(t *testing.T, path string, size int64) *blockdev.File {
	t.Helper()
	f, err := blockdev.OpenFile(path, size)
	if err != nil {
		t.Fatal(err)
	}
	return f
}

// TestSparseMirrorAndDiff: a 1 GiB sparse volume holding 100 MiB of data
// mirrors with ≤ 110 MiB on the wire; after 10 MiB change on the source
// while disconnected, a differential mirror sends ≤ 12 MiB of chunk data.
func TestSparseMirrorAndDiff(t *testing.T) {
	if testing.Short() {
		t.Skip("1 GiB sparse mirror: not in -short")
	}
	const size, mib = 1 << 30, 1 << 20
	dir := t.TempDir()
	srcPath, tgtPath := filepath.Join(dir, "src.img"), filepath.Join(dir, "tgt.img")
	src := openFile(t, srcPath, size)
	r := rand.New(rand.NewPCG(3, 3))
	for _, i := range r.Perm(1024)[:100] {
		if _, err := src.WriteAt(randBytes(r, mib), int64(i)*mib); err != nil {
			t.Fatal(err)
		}
	}
	tgt := openFile(t, tgtPath, size)

	p := newPair(t, src, tgt, pairOpts{mode: wire.ModeAsync})
	res, err := p.src.Mirror(context.Background(), MirrorFull)
	if err != nil {
		t.Fatal(err)
	}
	p.drain(t)
	st := p.src.Stats()
	t.Logf("full mirror: %v, wire bytes %v, payload %v", res.Duration, st.SentBytes, st.PayloadBytes)
	if got := st.SentBytes["mirror"]; got > 110*mib || got < 100*mib {
		t.Errorf("full mirror sent %d bytes on the wire, want 100..110 MiB", got)
	}
	p.stop()
	cmpFiles(t, srcPath, tgtPath)

	// Change 10 MiB while nothing replicates, then a diff mirror.
	for range 10 {
		off := int64(r.IntN(size/mib)) * mib
		if _, err := src.WriteAt(randBytes(r, mib), off); err != nil {
			t.Fatal(err)
		}
	}
	tgt2 := openFile(t, tgtPath, size)
	p2 := newPair(t, src, tgt2, pairOpts{mode: wire.ModeAsync})
	res, err = p2.src.Mirror(context.Background(), MirrorDiff)
	if err != nil {
		t.Fatal(err)
	}
	p2.drain(t)
	st = p2.src.Stats()
	t.Logf("diff mirror: %v, differing %d, wire %v, payload %v", res.Duration, res.DifferingBytes(), st.SentBytes, st.PayloadBytes)
	if got := st.PayloadBytes["mirror"]; got > 12*mib || got < 9*mib {
		t.Errorf("diff mirror sent %d bytes of chunk data for 10 MiB changed, want ≤ 12 MiB", got)
	}
	cmpFiles(t, srcPath, tgtPath)
	// Holes stayed holes on the target.
	if blocks := allocated(t, tgtPath); blocks > 130*mib {
		t.Errorf("target allocates %d bytes for ~110 MiB of data", blocks)
	}
}

func allocated(t *testing.T, path string) int64 {
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return fi.Sys().(*syscall.Stat_t).Blocks * 512
}

func cmpFiles(t *testing.T, a, b string) {
	t.Helper()
	if out, err := exec.Command("cmp", a, b).CombinedOutput(); err != nil {
		t.Fatalf("cmp %s %s: %v: %s", a, b, err, out)
	}
}

// TestVerifyFindsAndRepairsCorruption plants corruption on the target,
// verifies online while the application writes elsewhere, and resyncs.
func TestVerifyFindsAndRepairsCorruption(t *testing.T) {
	const size = 16 << 20
	srcB, tgtB := newMem(size), newMem(size)
	r := rand.New(rand.NewPCG(5, 5))
	copy(srcB.data, randBytes(r, size))
	copy(tgtB.data, srcB.data)
	p := newPair(t, srcB, tgtB, pairOpts{mode: wire.ModeAsync})
	if res, err := p.src.Verify(context.Background(), false); err != nil || len(res.Differing) != 0 {
		t.Fatalf("verify of identical volumes: %+v, %v", res.Differing, err)
	}

	// Plant: 10 bytes inside chunk 48 (3 MiB), and a zeroed 4 KiB in chunk 100.
	p.tgt.Quiesce(func(uint64) error {
		tgtB.WriteAt([]byte("corruption"), 3<<20+100)
		tgtB.WriteZeroes(100*DefaultChunkSize+8192, 4096, false)
		return nil
	})
	// Writes in the upper half continue during verify: none of them may be
	// reported as a difference.
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			off := int64(8<<20 + r.IntN(2048)*4096)
			p.src.Apply(context.Background(), &blockdev.Mutation{Op: blockdev.OpWrite, Offset: off, Length: 4096, Data: randBytes(rand.New(rand.NewPCG(uint64(i), 0)), 4096)})
		}
	}()
	res, err := p.src.Verify(context.Background(), false)
	if err != nil {
		t.Fatal(err)
	}
	want := []Range{{3 << 20, DefaultChunkSize}, {100 * DefaultChunkSize, DefaultChunkSize}}
	if len(res.Differing) != 2 || res.Differing[0] != want[0] || res.Differing[1] != want[1] {
		t.Fatalf("verify found %+v, want %+v", res.Differing, want)
	}
	res, err = p.src.Verify(context.Background(), true)
	close(stop)
	wg.Wait()
	if err != nil {
		t.Fatal(err)
	}
	if res.Sent != 2*DefaultChunkSize {
		t.Errorf("resync sent %d bytes, want %d", res.Sent, 2*DefaultChunkSize)
	}
	p.drain(t)
	if s, g := srcB.snapshot(), tgtB.snapshot(); !bytes.Equal(s, g) {
		t.Fatalf("after resync: %s", firstDiff(s, g))
	}
	if res, err := p.src.Verify(context.Background(), false); err != nil || len(res.Differing) != 0 {
		t.Fatalf("verify after resync: %+v, %v", res.Differing, err)
	}
	if st := p.src.Stats(); st.SentBytes["verify"] == 0 || st.PayloadBytes["resync"] != 2*DefaultChunkSize {
		t.Errorf("metrics: sent %v payload %v", st.SentBytes, st.PayloadBytes)
	}
}

// TestDiffMirrorSurvivesReconnect cuts the link twice during a diff
// mirror: checksum requests whose replies were lost are asked again, and
// the mirror completes with the target identical.
func TestDiffMirrorSurvivesReconnect(t *testing.T) {
	const size = 64 << 20
	r := rand.New(rand.NewPCG(11, 11))
	srcB, tgtB := newMem(size), newMem(size)
	copy(srcB.data, randBytes(r, size))
	copy(tgtB.data, srcB.data)
	for range 40 {
		off := r.IntN(size/65536) * 65536
		copy(tgtB.data[off:], randBytes(r, 65536))
	}
	conns := make(chan net.Conn, 16)
	tgt := &countingBackend{slowBackend: slowBackend{tgtB, 200 * time.Microsecond}}
	p := newPair(t, srcB, tgt, pairOpts{mode: wire.ModeAsync,
		dial: func(ctx context.Context, addr string) (net.Conn, error) {
			var d net.Dialer
			c, err := d.DialContext(ctx, "tcp", addr)
			if err == nil {
				conns <- c
			}
			return c, err
		}})
	// Each connection is cut once the target has read 100 more chunks
	// for the comparison (of 1024): during the mirror, whatever the load.
	var done atomic.Bool
	go func() {
		deadline := time.Now().Add(30 * time.Second)
		for range 2 {
			c := <-conns
			from := tgt.reads.Load()
			for tgt.reads.Load() < from+100 && !done.Load() && time.Now().Before(deadline) {
				time.Sleep(time.Millisecond)
			}
			c.Close()
		}
	}()
	res, err := p.src.Mirror(context.Background(), MirrorDiff)
	done.Store(true)
	if err != nil {
		t.Fatal(err)
	}
	p.drain(t)
	if s, g := srcB.snapshot(), tgtB.snapshot(); !bytes.Equal(s, g) {
		t.Fatalf("target differs after diff mirror with reconnects: %s", firstDiff(s, g))
	}
	if c := p.src.Stats().Connects; c < 2 {
		t.Fatalf("only %d connections: the link was not cut during the mirror", c)
	}
	t.Logf("differing %d, sent %d, connects %d", res.DifferingBytes(), res.Sent, p.src.Stats().Connects)
}

// countingBackend counts the chunk-sized reads (checksums) of a
// slowBackend.
type countingBackend struct {
	slowBackend
	reads atomic.Int64
}

func (c *countingBackend) ReadAt(p []byte, off int64) (int, error) {
	if len(p) >= 64<<10 {
		c.reads.Add(1)
	}
	return c.slowBackend.ReadAt(p, off)
}

// TestMirrorBufSized: a mirror or resync frame pins its read buffer until
// acknowledged while the queue counts only the frame's bytes, so the
// buffer of a short range is of that range's size class, not mirrorIO (a
// resync of scattered 64 KiB dirty chunks pinned 1 MiB per chunk: 16 times
// the mirror's queue cap, 849 MiB of heap after bench-scale's 32 resyncs).
func TestMirrorBufSized(t *testing.T) {
	for _, n := range []int64{1, 4096, 4097, 64 << 10, 64<<10 + 1, 300 << 10, mirrorIO} {
		buf, put := getMirrorBuf(n)
		if int64(len(buf)) != n {
			t.Errorf("getMirrorBuf(%d): len %d", n, len(buf))
		}
		if c := int64(cap(buf)); c < n || c > max(2*n, 4096) {
			t.Errorf("getMirrorBuf(%d): cap %d, want at least %d and at most %d", n, c, n, max(2*n, 4096))
		}
		put()
		// A buffer given back is reused for its class only.
		again, put2 := getMirrorBuf(n)
		if int64(len(again)) != n || int64(cap(again)) > max(2*n, 4096) {
			t.Errorf("getMirrorBuf(%d) after a put: len %d cap %d", n, len(again), cap(again))
		}
		put2()
	}
}
