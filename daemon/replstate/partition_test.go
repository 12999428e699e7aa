package replstate

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/doppelha/doppel/blockdev"
	"github.com/doppelha/doppel/daemon/bitmap"
	"github.com/doppelha/doppel/daemon/repl"
	"github.com/doppelha/doppel/daemon/repl/wire"
)

// memNet is an in-memory transport: Dial hands one end of a net.Pipe to
// the listener while the link is up; Disconnect cuts every connection.
type memNet struct {
	mu    sync.Mutex
	up    bool
	l     *memListener
	conns []net.Conn
}

type memListener struct {
	ch     chan net.Conn
	closed chan struct{}
	once   sync.Once
}

func (l *memListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.ch:
		return c, nil
	case <-l.closed:
		return nil, net.ErrClosed
	}
}
func (l *memListener) Close() error   { l.once.Do(func() { close(l.closed) }); return nil }
func (l *memListener) Addr() net.Addr { return pipeAddr{} }

type pipeAddr struct{}

func (pipeAddr) Network() string { return "pipe" }
func (pipeAddr) String() string  { return "pipe" }

func (n *memNet) listen() *memListener {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.l = &memListener{ch: make(chan net.Conn), closed: make(chan struct{})}
	return n.l
}

func (n *memNet) dial(ctx context.Context) (net.Conn, error) {
	n.mu.Lock()
	l, up := n.l, n.up
	if !up || l == nil {
		n.mu.Unlock()
		return nil, errors.New("memnet: link down")
	}
	a, b := net.Pipe()
	n.conns = append(n.conns, a, b)
	n.mu.Unlock()
	select {
	case l.ch <- b:
		return a, nil
	case <-l.closed:
	case <-ctx.Done():
	case <-time.After(time.Second):
	}
	a.Close()
	b.Close()
	return nil, errors.New("memnet: nobody listening")
}

func (n *memNet) set(up bool) {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.up = up
	if !up {
		for _, c := range n.conns {
			c.Close()
		}
		n.conns = nil
	}
}

type side struct {
	stop context.CancelFunc
	done chan struct{}
}

func (sd *side) kill() {
	if sd != nil && sd.stop != nil {
		sd.stop()
		<-sd.done
	}
}

// TestPartitionRandomized drives the real Source and Target over an
// in-memory transport through thousands of seeded steps (writes, link
// down/up, either side crashing and restarting from its state dir) and
// checks that every acknowledged write is on both sides at the end.
func TestPartitionRandomized(t *testing.T) {
	steps := 3000
	if testing.Short() {
		steps = 600
	}
	seeds := []uint64{1, 2}
	if env := os.Getenv("DOPPEL_PARTITION_SEEDS"); env != "" {
		// e.g. DOPPEL_PARTITION_SEEDS=3,4,5 to try other interleavings.
		seeds = nil
		for f := range strings.SplitSeq(env, ",") {
			n, err := strconv.ParseUint(strings.TrimSpace(f), 10, 64)
			if err != nil {
				t.Fatalf("DOPPEL_PARTITION_SEEDS: %v", err)
			}
			seeds = append(seeds, n)
		}
	}
	for _, seed := range seeds {
		t.Run(fmt.Sprint("seed", seed), func(t *testing.T) { runPartition(t, seed, steps) })
	}
}

func runPartition(t *testing.T, seed uint64, steps int) {
	const size, chunk = 16 << 20, 4 << 10
	rng := rand.New(rand.NewPCG(seed, seed*7919))
	dir := t.TempDir()
	srcDir, tgtDir := filepath.Join(dir, "src"), filepath.Join(dir, "tgt")
	srcFile, tgtFile := filepath.Join(dir, "src.img"), filepath.Join(dir, "tgt.img")
	model := make([]byte, size)
	nw := &memNet{up: true}
	ctx := t.Context()

	var src *Source
	var srcSide, tgtSide *side
	var srcB, tgtB *blockdev.File
	startSrc := func() {
		b, err := blockdev.OpenFile(srcFile, size)
		if err != nil {
			t.Fatal(err)
		}
		srcB = b
		s, err := OpenSource(SourceConfig{Dir: srcDir, Backend: b, Mode: wire.ModeAsync, ChunkSize: chunk,
			MemQueue: 1 << 20, DiskQueue: 12 << 20, Dial: nw.dial, Mirror: repl.MirrorFull,
			LogOptions: bitmap.LogOptions{ExtentSize: 64 << 10, Slots: 8}})
		if err != nil {
			t.Fatalf("open source: %v", err)
		}
		src = s
		c, stop := context.WithCancel(ctx)
		srcSide = &side{stop: stop, done: make(chan struct{})}
		go func() {
			defer close(srcSide.done)
			if err := s.Run(c); err != nil {
				t.Errorf("source run: %v", err)
			}
		}()
	}
	startTgt := func() {
		b, err := blockdev.OpenFile(tgtFile, size)
		if err != nil {
			t.Fatal(err)
		}
		tgtB = b
		tg, err := OpenTarget(TargetConfig{Dir: tgtDir, Backend: b})
		if err != nil {
			t.Fatalf("open target: %v", err)
		}
		l := nw.listen()
		c, stop := context.WithCancel(ctx)
		tgtSide = &side{stop: stop, done: make(chan struct{})}
		go func() {
			defer close(tgtSide.done)
			tg.Serve(c, l)
		}()
	}
	var sent, sched, passes, mirrors int64
	crashSrc := func() { // no Close: what the process had not written is lost
		srcSide.kill()
		st := src.Status()
		sent, sched, passes = sent+st.ResyncSent, sched+st.ResyncScheduled, passes+st.ResyncPasses
		nw.set(false)
		nw.set(true)
		srcB.Close()
	}
	crashTgt := func() {
		tgtSide.kill()
		nw.set(false)
		nw.set(true)
		tgtB.Close()
	}
	startTgt()
	startSrc()
	// The first full mirror completes before the faults start, so that
	// what follows exercises the bitmaps.
	for deadline := time.Now().Add(20 * time.Second); !src.Status().Synced; {
		if time.Now().After(deadline) {
			t.Fatalf("initial mirror: %+v", src.Status())
		}
		time.Sleep(10 * time.Millisecond)
	}
	mirrors = src.Status().ResyncSent
	var crashes, parts, writes, resumed int
	for i := 0; i < steps; i++ {
		switch p := rng.IntN(100); {
		case p < 75:
			off := int64(rng.IntN(size/512)) * 512
			n := min(int64(512*(1+rng.IntN(64))), size-off)
			data := make([]byte, n)
			for j := range data {
				data[j] = byte(rng.Uint32())
			}
			if err := src.Apply(ctx, &blockdev.Mutation{Op: blockdev.OpWrite, Offset: off, Length: n, Data: data}); err != nil {
				t.Fatalf("step %d: write [%d,+%d): %v", i, off, n, err)
			}
			copy(model[off:], data)
			writes++
		case p < 80:
			if err := src.Apply(ctx, &blockdev.Mutation{Op: blockdev.OpFlush}); err != nil {
				t.Fatalf("step %d: flush: %v", i, err)
			}
		case p < 86:
			nw.set(!nw.up)
			parts++
		case p < 89:
			crashSrc()
			startSrc()
			crashes++
			if src.atOpen.queue > 0 {
				resumed++
			}
		case p < 92:
			crashTgt()
			startTgt()
			crashes++
		default:
			time.Sleep(time.Duration(rng.IntN(30)) * time.Millisecond)
		}
	}
	nw.set(true)
	deadline := time.Now().Add(60 * time.Second)
	var st Status
	for {
		st = src.Status()
		eng := src.engine()
		a, _ := eng.Progress()
		if st.Connected && st.DirtyBytes == 0 && !st.ResyncActive && a == eng.LastSeq() && !st.QueueOverflow {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no convergence: %+v acked %d of %d", st, a, eng.LastSeq())
		}
		time.Sleep(20 * time.Millisecond)
	}
	srcSide.kill()
	tgtSide.kill()
	got, _ := os.ReadFile(srcFile)
	if !bytes.Equal(got, model) {
		t.Fatalf("source image lacks acknowledged writes (first difference at %d)", firstDiff(got, model))
	}
	tg, _ := os.ReadFile(tgtFile)
	if !bytes.Equal(tg, model) {
		t.Fatalf("target image differs from the acknowledged writes at %d", firstDiff(tg, model))
	}
	sent, sched, passes = sent+st.ResyncSent-mirrors, sched+st.ResyncScheduled, passes+st.ResyncPasses
	t.Logf("seed %d: %d steps, %d writes, %d link flips, %d crashes (%d source restarts resumed their disk queue); bitmap resyncs: %d passes, %d dirty bytes scheduled, %d sent",
		seed, steps, writes, parts, crashes, resumed, passes, sched, sent)
	if passes == 0 {
		t.Fatal("no bitmap resync ran: the test did not exercise the bitmaps")
	}
}

func firstDiff(a, b []byte) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}
