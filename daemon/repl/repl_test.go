package repl

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/doppelha/doppel/blockdev"
	"github.com/doppelha/doppel/blockdev/nbdproto"
	"github.com/doppelha/doppel/daemon/repl/wire"
)

// TestSyncAckedWritesAreOnTarget drives concurrent random writes, trims,
// write-zeroes and flushes through the NBD server into a sync source, and
// checks at every acknowledgement that the target already holds the data
// (each worker owns a region, so its model is exact), and after every
// flush that the target made everything before it durable.
func TestSyncAckedWritesAreOnTarget(t *testing.T) {
	const workers, region = 4, 1 << 20
	srcB, tgtB := newMem(workers*region), newMem(workers*region)
	p := newPair(t, srcB, tgtB, pairOpts{mode: wire.ModeSync})
	sock := serveNBD(t, srcB, p.src)

	deadline := time.Now().Add(2 * time.Second)
	var wg sync.WaitGroup
	errs := make(chan error, workers)
	var ops atomic.Int64
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			cl := dialNBD(t, sock)
			r := rand.New(rand.NewPCG(uint64(w), 1))
			base := int64(w * region)
			model := make([]byte, region)
			for i := 0; i < 600 && time.Now().Before(deadline); i++ {
				off := int64(r.IntN(region/512)) * 512
				n := min(int64(512*(1+r.IntN(128))), region-off)
				var fua uint16
				if r.IntN(5) == 0 {
					fua = nbdproto.CmdFlagFUA
				}
				var err error
				switch k := r.IntN(10); {
				case k < 7:
					data := randBytes(r, int(n))
					err = cl.Do(nbdproto.CmdWrite, fua, uint64(base+off), uint32(n), data)
					copy(model[off:], data)
				case k == 7:
					err = cl.Do(nbdproto.CmdTrim, fua, uint64(base+off), uint32(n), nil)
					clear(model[off : off+n])
				case k == 8:
					err = cl.Do(nbdproto.CmdWriteZeroes, fua|nbdproto.CmdFlagNoHole, uint64(base+off), uint32(n), nil)
					clear(model[off : off+n])
				default:
					before := p.src.LastSeq()
					err = cl.Flush()
					if err == nil {
						if d := p.src.Stats().DurableSeq; d < before {
							errs <- fmt.Errorf("flush acknowledged but target durable sequence %d < %d", d, before)
							return
						}
					}
				}
				if err != nil {
					errs <- err
					return
				}
				ops.Add(1)
				got := make([]byte, region)
				tgtB.ReadAt(got, base)
				if !bytes.Equal(got, model) {
					errs <- fmt.Errorf("worker %d op %d: acknowledged but target region differs: %s", w, i, firstDiff(got, model))
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	if ops.Load() < 50 {
		t.Fatalf("only %d operations ran", ops.Load())
	}
	if tgtB.syncs.Load() == 0 {
		t.Fatal("target never synced despite flushes and FUA")
	}
	if !bytes.Equal(srcB.snapshot(), tgtB.snapshot()) {
		t.Fatal("source and target differ at the end")
	}
	t.Logf("%d operations, %d target syncs", ops.Load(), tgtB.syncs.Load())
}

// recQueue records every entry pushed, in sequence order.
type recQueue struct {
	*MemBacklog
	mu   sync.Mutex
	ents []Entry
}

func (q *recQueue) Push(ctx context.Context, e Entry) error {
	if err := q.MemBacklog.Push(ctx, e); err != nil {
		return err
	}
	// The log outlives the entry's release (its payload may be the NBD
	// server's buffer, reused after Done): keep a copy of the frame.
	b, err := wire.Encode(e.Frame)
	if err != nil {
		return err
	}
	f, err := wire.Decode(b)
	if err != nil {
		return err
	}
	e.Frame, e.Done = f.(wire.Sequenced), nil
	q.mu.Lock()
	q.ents = append(q.ents, e)
	q.mu.Unlock()
	return nil
}

func (q *recQueue) upTo(seq uint64) []Entry {
	q.mu.Lock()
	defer q.mu.Unlock()
	i := 0
	for i < len(q.ents) && q.ents[i].Seq <= seq {
		i++
	}
	return q.ents[:i:i]
}

// replay applies sequenced frames to img.
func replay(img []byte, ents []Entry) {
	for _, e := range ents {
		switch f := e.Frame.(type) {
		case *wire.Write:
			copy(img[f.Offset:], f.Data)
		case *wire.Trim:
			clear(img[f.Offset : f.Offset+f.Length])
		case *wire.Zeroes:
			clear(img[f.Offset : f.Offset+f.Length])
		case *wire.MirrorData:
			copy(img[f.Offset:], f.Data)
		case *wire.MirrorHole:
			clear(img[f.Offset : f.Offset+f.Length])
		}
	}
}

// slowBackend delays writes so that an async target lags behind.
type slowBackend struct {
	*memBackend
	delay time.Duration
}

func (s slowBackend) WriteAt(p []byte, off int64) (int, error) {
	time.Sleep(s.delay)
	return s.memBackend.WriteAt(p, off)
}

// ReadAt delays chunk-sized reads (checksums) too.
func (s slowBackend) ReadAt(p []byte, off int64) (int, error) {
	if len(p) >= 64<<10 {
		time.Sleep(s.delay)
	}
	return s.memBackend.ReadAt(p, off)
}

// TestAsyncTargetIsAlwaysAPrefix is the write-log oracle: while workers
// write overlapping ranges through the NBD server into an async source, the
// target is snapshotted at random points; every snapshot must equal the
// replay of exactly the first k frames of the sequence stream (k = its
// applied sequence), the stream order must respect real time (a write
// acknowledged before another was issued is sequenced first), and at the
// end source, target and the replay of the whole stream are identical.
func TestAsyncTargetIsAlwaysAPrefix(t *testing.T) {
	const size = 2 << 20
	srcB, tgtMem := newMem(size), newMem(size)
	q := &recQueue{MemBacklog: NewMemBacklog(8 << 20)}
	p := newPair(t, srcB, slowBackend{tgtMem, 100 * time.Microsecond}, pairOpts{mode: wire.ModeAsync, queue: q})
	sock := serveNBD(t, srcB, p.src)

	type opTimes struct{ issue, ack int64 }
	var (
		tick    atomic.Int64
		timesMu sync.Mutex
		times   = map[uint64]opTimes{} // write tag → times
		tagSeq  atomic.Uint64
	)
	stop := make(chan struct{})
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for w := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			cl := dialNBD(t, sock)
			r := rand.New(rand.NewPCG(uint64(w), 2))
			for i := 0; i < 800; i++ {
				select {
				case <-stop:
					return
				default:
				}
				off := int64(r.IntN(size/512)) * 512
				n := min(int64(512*(1+r.IntN(64))), size-off)
				var err error
				switch k := r.IntN(10); {
				case k < 7:
					data := randBytes(r, int(n))
					tag := tagSeq.Add(1)
					binary.LittleEndian.PutUint64(data, tag)
					issue := tick.Add(1)
					_, err = cl.WriteAt(data, off)
					ack := tick.Add(1)
					timesMu.Lock()
					times[tag] = opTimes{issue, ack}
					timesMu.Unlock()
				case k == 7:
					err = cl.Trim(off, uint32(n))
				case k == 8:
					err = cl.WriteZeroes(off, uint32(n), r.IntN(2) == 0)
				default:
					err = cl.Flush()
				}
				if err != nil {
					errs <- err
					return
				}
			}
		}()
	}

	// Snapshots, checked against the replay as they are taken.
	img := make([]byte, size)
	var replayed uint64
	snaps, lagged := 0, 0
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
loop:
	for snaps < 200 {
		select {
		case <-done:
			break loop
		case <-time.After(time.Duration(1+rand.IntN(10)) * time.Millisecond):
		}
		var snap []byte
		var k uint64
		p.tgt.Quiesce(func(applied uint64) error {
			k, snap = applied, tgtMem.snapshot()
			return nil
		})
		if k < p.src.LastSeq() {
			lagged++
		}
		ents := q.upTo(k)
		replay(img, ents[min(int(replayed), len(ents)):])
		replayed = uint64(len(ents))
		if uint64(len(ents)) != k {
			t.Fatalf("target applied %d but only %d frames were sequenced", k, len(ents))
		}
		if !bytes.Equal(snap, img) {
			close(stop)
			t.Fatalf("snapshot at applied=%d is not the stream prefix: %s", k, firstDiff(snap, img))
		}
		snaps++
	}
	<-done
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	p.drain(t)

	// Real-time order of writes.
	seqOf := map[uint64]uint64{}
	for _, e := range q.upTo(p.src.LastSeq()) {
		if w, ok := e.Frame.(*wire.Write); ok {
			seqOf[binary.LittleEndian.Uint64(w.Data)] = e.Seq
		}
	}
	type wr struct {
		seq uint64
		opTimes
	}
	var ws []wr
	for tag, tm := range times {
		seq, ok := seqOf[tag]
		if !ok {
			t.Fatalf("write %d was acknowledged but never sequenced", tag)
		}
		ws = append(ws, wr{seq, tm})
	}
	for _, a := range ws {
		for _, b := range ws {
			if a.ack < b.issue && a.seq > b.seq {
				t.Fatalf("write acknowledged at tick %d (seq %d) sequenced after a write issued at tick %d (seq %d)", a.ack, a.seq, b.issue, b.seq)
			}
		}
	}

	final := make([]byte, size)
	replay(final, q.upTo(p.src.LastSeq()))
	if s := srcB.snapshot(); !bytes.Equal(s, final) {
		t.Fatalf("source differs from the replay of its own stream: %s", firstDiff(s, final))
	}
	if tg := tgtMem.snapshot(); !bytes.Equal(tg, final) {
		t.Fatalf("target differs from the source after drain: %s", firstDiff(tg, final))
	}
	if snaps < 10 || lagged == 0 {
		t.Fatalf("oracle too weak: %d snapshots, %d behind the source", snaps, lagged)
	}
	t.Logf("%d snapshots (%d behind the source), %d writes, %d frames", snaps, lagged, len(ws), p.src.LastSeq())
}

var _ blockdev.Mutator = (*Stream)(nil)

// TestLentBufferOutlivesSlowLocalWrite: a write's frame shares the NBD
// server's buffer with the local write, and an async target acknowledges
// long before a slow local disk has read it. The buffer must not go back to
// the server's pool (and be refilled by the next request) until both are
// done with it: every byte on the source and the target is what the client
// wrote.
func TestLentBufferOutlivesSlowLocalWrite(t *testing.T) {
	const (
		size    = 1 << 20
		bs      = 4096
		writers = 8
		each    = 16
	)
	srcMem, tgtMem := newMem(size), newMem(size)
	src := slowBackend{srcMem, 3 * time.Millisecond}
	p := newPair(t, src, tgtMem, pairOpts{mode: wire.ModeAsync})
	sock := serveNBD(t, src, p.src)
	want := make([]byte, size)
	var wg sync.WaitGroup
	errs := make(chan error, writers)
	for w := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			cl := dialNBD(t, sock)
			for i := range each {
				off := (w*each + i) * bs
				data := want[off : off+bs]
				for j := range data {
					data[j] = byte(w*each + i + j/512 + 1)
				}
				if _, err := cl.WriteAt(data, int64(off)); err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := p.src.WaitAcked(ctx); err != nil {
		t.Fatal(err)
	}
	if got := srcMem.snapshot(); !bytes.Equal(got, want) {
		t.Fatalf("source image differs from the writes: %s", firstDiff(got, want))
	}
	if got := tgtMem.snapshot(); !bytes.Equal(got, want) {
		t.Fatalf("target image differs from the writes: %s", firstDiff(got, want))
	}
}
