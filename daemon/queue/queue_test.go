package queue

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"maps"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"
)

func payload(seq uint64, n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(seq*31 + uint64(i))
	}
	return b
}

func mustOpen(t testing.TB, dir string, opt Options) *Queue {
	t.Helper()
	q, err := Open(dir, opt)
	if err != nil {
		t.Fatal(err)
	}
	return q
}

func segFiles(t *testing.T, dir string) []string {
	t.Helper()
	m, _ := filepath.Glob(filepath.Join(dir, "*"+segSuffix))
	slices.Sort(m)
	return m
}

// TestRandomFIFO drives the queue with random pushes, ships, acks and
// rewinds against a model and checks order, content and the memory and disk
// bounds at every step.
func TestRandomFIFO(t *testing.T) {
	dir := t.TempDir()
	opt := Options{MemLimit: 20 << 10, DiskLimit: 200 << 10, SegmentSize: 16 << 10}
	q := mustOpen(t, dir, opt)
	defer q.Close()
	r := rand.New(rand.NewPCG(1, 2))
	var model []Record // unacknowledged, oldest first
	shipped := 0       // records of model handed out by Next
	seq := uint64(0)
	fulls, spills := 0, 0
	for step := range 20000 {
		switch op := r.IntN(10); {
		case op < 5:
			seq += 1 + uint64(r.IntN(3))
			d := payload(seq, r.IntN(3000))
			diskBefore := q.DiskBytes()
			memBefore := q.MemBytes()
			err := q.Push(seq, d)
			if errors.Is(err, ErrFull) {
				fulls++
				continue
			}
			if err != nil {
				t.Fatal(err)
			}
			if diskBefore > 0 && q.MemBytes() != memBefore {
				t.Fatalf("step %d: record went to memory while a disk backlog exists", step)
			}
			if q.DiskBytes() > diskBefore && diskBefore == 0 {
				spills++
			}
			model = append(model, Record{Seq: seq, Data: d})
		case op < 8:
			got, ok, err := q.Next()
			if err != nil {
				t.Fatal(err)
			}
			if ok != (shipped < len(model)) {
				t.Fatalf("step %d: Next ok=%v with %d/%d shipped", step, ok, shipped, len(model))
			}
			if ok {
				if got.Seq != model[shipped].Seq || !bytes.Equal(got.Data, model[shipped].Data) {
					t.Fatalf("step %d: Next gave seq %d, want %d", step, got.Seq, model[shipped].Seq)
				}
				shipped++
			}
		case op < 9:
			if shipped == 0 {
				continue
			}
			k := r.IntN(shipped) + 1
			if err := q.Ack(model[k-1].Seq); err != nil {
				t.Fatal(err)
			}
			model = model[k:]
			shipped -= k
		default:
			q.Rewind()
			shipped = 0
		}
		if q.MemBytes() > opt.MemLimit || q.DiskBytes() > opt.DiskLimit {
			t.Fatalf("step %d: bounds exceeded: mem %d disk %d", step, q.MemBytes(), q.DiskBytes())
		}
		if q.Len() != len(model) {
			t.Fatalf("step %d: Len %d, want %d", step, q.Len(), len(model))
		}
	}
	if fulls == 0 || spills == 0 {
		t.Fatalf("the run never filled (%d) or spilled (%d): test too weak", fulls, spills)
	}
	// Drain: everything comes out in order and the disk is cleaned.
	q.Rewind()
	for i := range model {
		got, ok, err := q.Pop()
		if err != nil || !ok || got.Seq != model[i].Seq {
			t.Fatalf("drain %d: %v %v %v", i, got.Seq, ok, err)
		}
	}
	if q.Len() != 0 || q.MemBytes() != 0 || q.DiskBytes() != 0 || len(segFiles(t, dir)) != 0 {
		t.Fatalf("after drain: len %d mem %d disk %d files %v", q.Len(), q.MemBytes(), q.DiskBytes(), segFiles(t, dir))
	}
}

func TestFullThenRecovers(t *testing.T) {
	// Segments of two records each; disk room for four of them. Space is
	// reclaimed per segment, once all its records are acknowledged.
	seg := int64(2*(1000+Overhead) + segmentHeader)
	q := mustOpen(t, t.TempDir(), Options{MemLimit: 4 * (1000 + Overhead), DiskLimit: 4 * seg, SegmentSize: seg})
	defer q.Close()
	var seq uint64
	for {
		seq++
		if err := q.Push(seq, payload(seq, 1000)); errors.Is(err, ErrFull) {
			break
		} else if err != nil {
			t.Fatal(err)
		}
	}
	if n := q.Len(); n != 12 {
		t.Fatalf("queued %d records before ErrFull, want 12 (4 in memory, 8 on disk)", n)
	}
	if err := q.Push(seq, payload(seq, 1)); !errors.Is(err, ErrFull) {
		t.Fatalf("push while full: %v", err)
	}
	// The rejected sequence was not taken: pushing it later works.
	if err := q.Ack(11); err != nil {
		t.Fatal(err)
	}
	if err := q.Push(seq, payload(seq, 1000)); err != nil {
		t.Fatalf("push after ack: %v", err)
	}
	if err := q.Push(seq, nil); !errors.Is(err, ErrOrder) {
		t.Fatalf("repeated seq: %v", err)
	}
	if err := q.Push(seq+1, make([]byte, DefaultMaxRecord+1)); !errors.Is(err, ErrTooLarge) {
		t.Fatalf("huge record: %v", err)
	}
	for _, want := range []uint64{12, seq} {
		got, ok, err := q.Pop()
		if err != nil || !ok || got.Seq != want {
			t.Fatalf("pop: %d %v %v, want %d", got.Seq, ok, err, want)
		}
	}
}

func TestShipAckRewind(t *testing.T) {
	q := mustOpen(t, t.TempDir(), Options{MemLimit: 5 * (100 + Overhead)})
	defer q.Close()
	for s := uint64(1); s <= 20; s++ {
		if err := q.Push(s, payload(s, 100)); err != nil {
			t.Fatal(err)
		}
	}
	for want := uint64(1); want <= 12; want++ {
		r, ok, _ := q.Next()
		if !ok || r.Seq != want {
			t.Fatalf("next %d: %v", r.Seq, ok)
		}
	}
	q.Ack(7)
	r, _, _ := q.Next()
	if r.Seq != 13 {
		t.Fatalf("after ack, next %d, want 13", r.Seq)
	}
	q.Rewind()
	r, _, _ = q.Next()
	if r.Seq != 8 {
		t.Fatalf("after rewind, next %d, want 8", r.Seq)
	}
	// Acknowledging past what was shipped skips those records.
	q.Ack(15)
	r, _, _ = q.Next()
	if r.Seq != 16 {
		t.Fatalf("after ack beyond shipped, next %d, want 16", r.Seq)
	}
	if p, _, _ := q.Peek(); p.Seq != 16 || q.Len() != 5 {
		t.Fatalf("peek %d len %d", p.Seq, q.Len())
	}
}

func TestWait(t *testing.T) {
	q := mustOpen(t, t.TempDir(), Options{})
	defer q.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	if _, err := q.Wait(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("wait on empty queue: %v", err)
	}
	go func() {
		time.Sleep(10 * time.Millisecond)
		q.Push(1, []byte("x"))
	}()
	r, err := q.Wait(context.Background())
	if err != nil || r.Seq != 1 {
		t.Fatalf("wait: %v %v", r, err)
	}
}

func TestReopenReplaysDisk(t *testing.T) {
	dir := t.TempDir()
	opt := Options{MemLimit: 3 * (500 + Overhead), SegmentSize: 4 << 10}
	q := mustOpen(t, dir, opt)
	for s := uint64(1); s <= 40; s++ {
		if err := q.Push(s*10, payload(s, 500)); err != nil {
			t.Fatal(err)
		}
	}
	q.Ack(50) // 3 in memory and 2 on disk acknowledged
	if err := q.Close(); err != nil {
		t.Fatal(err)
	}
	if n := len(segFiles(t, dir)); n < 4 {
		t.Fatalf("only %d segments: rotation not exercised", n)
	}
	q = mustOpen(t, dir, opt)
	defer q.Close()
	rec := q.Recovery()
	// Memory records are gone; acks are not persisted, so the disk replays
	// from its first record in the partly acknowledged segment (seq 40).
	if rec.DroppedBytes != 0 || q.LastSeq() != 400 {
		t.Fatalf("recovery %+v last %d", rec, q.LastSeq())
	}
	first, _, _ := q.Peek()
	if first.Seq != 40 || rec.Records != 37 || q.Len() != 37 {
		t.Fatalf("replay starts at %d with %d records (len %d), want 40 and 37", first.Seq, rec.Records, q.Len())
	}
	if err := q.Push(400, nil); !errors.Is(err, ErrOrder) {
		t.Fatalf("push of an old seq after reopen: %v", err)
	}
	// New pushes go after the replayed backlog, on disk.
	if err := q.Push(401, payload(401, 10)); err != nil {
		t.Fatal(err)
	}
	if q.MemBytes() != 0 {
		t.Fatal("push went to memory ahead of the replayed disk backlog")
	}
	var got []uint64
	for {
		r, ok, err := q.Pop()
		if err != nil {
			t.Fatal(err)
		}
		if !ok {
			break
		}
		if r.Seq != 401 && !bytes.Equal(r.Data, payload(r.Seq/10, 500)) {
			t.Fatalf("record %d data differs", r.Seq)
		}
		got = append(got, r.Seq)
	}
	if len(got) != 38 || got[0] != 40 || got[36] != 400 || got[37] != 401 || !slices.IsSorted(got) {
		t.Fatalf("replayed %v", got)
	}
}

// TestTornSegments cuts the last segment at random points or scribbles over
// a middle one, and checks that reopening replays exactly a prefix of the
// pushed records, never a gap, and that the queue keeps working.
func TestTornSegments(t *testing.T) {
	r := rand.New(rand.NewPCG(7, 7))
	for iter := range 40 {
		dir := t.TempDir()
		opt := Options{MemLimit: -1 + 1, DiskLimit: 1 << 20, SegmentSize: 8 << 10}
		opt.MemLimit = 1 // everything on disk
		q := mustOpen(t, dir, opt)
		var pushed []uint64
		for s := uint64(1); s <= uint64(20+r.IntN(40)); s++ {
			if err := q.Push(s, payload(s, r.IntN(1500))); err != nil {
				t.Fatal(err)
			}
			pushed = append(pushed, s)
		}
		q.Close()
		files := segFiles(t, dir)
		var victim string
		if iter%2 == 0 {
			victim = files[len(files)-1]
			fi, _ := os.Stat(victim)
			os.Truncate(victim, r.Int64N(fi.Size()))
		} else {
			victim = files[r.IntN(len(files))]
			fi, _ := os.Stat(victim)
			f, _ := os.OpenFile(victim, os.O_RDWR, 0)
			f.WriteAt([]byte{0xde, 0xad, 0xbe, 0xef}, r.Int64N(fi.Size()-4))
			f.Close()
		}
		q = mustOpen(t, dir, opt)
		rec := q.Recovery()
		var got []uint64
		for {
			rr, ok, err := q.Pop()
			if err != nil {
				t.Fatalf("iter %d: %v", iter, err)
			}
			if !ok {
				break
			}
			if !bytes.Equal(rr.Data, payload(rr.Seq, len(rr.Data))) {
				t.Fatalf("iter %d: record %d data corrupt after replay", iter, rr.Seq)
			}
			got = append(got, rr.Seq)
		}
		if !slices.Equal(got, pushed[:len(got)]) {
			t.Fatalf("iter %d: replay %v is not a prefix of %v", iter, got, pushed)
		}
		if len(got) < len(pushed) && rec.DroppedBytes == 0 {
			t.Fatalf("iter %d: lost %d records without reporting", iter, len(pushed)-len(got))
		}
		if rec.Records != len(got) {
			t.Fatalf("iter %d: Recovery.Records %d, replayed %d", iter, rec.Records, len(got))
		}
		// The queue continues after the replayed prefix.
		next := uint64(1000)
		if err := q.Push(next, payload(next, 10)); err != nil {
			t.Fatal(err)
		}
		if rr, ok, _ := q.Pop(); !ok || rr.Seq != next {
			t.Fatalf("iter %d: push after recovery: %v %v", iter, rr.Seq, ok)
		}
		q.Close()
		q = mustOpen(t, dir, opt)
		if q.Recovery().DroppedBytes != 0 {
			t.Fatalf("iter %d: second open dropped %d bytes", iter, q.Recovery().DroppedBytes)
		}
		q.Close()
	}
}

// TestMemoryBound is the stall scenario in miniature: the consumer
// stops while the producer writes four times the memory queue.
func TestMemoryBound(t *testing.T) {
	dir := t.TempDir()
	opt := Options{MemLimit: 1 << 20, DiskLimit: 2 << 20, SegmentSize: 256 << 10}
	q := mustOpen(t, dir, opt)
	defer q.Close()
	var full int
	for s := uint64(1); s <= 4*256; s++ {
		err := q.Push(s, payload(s, 4096))
		if errors.Is(err, ErrFull) {
			full++
			continue
		}
		if err != nil {
			t.Fatal(err)
		}
		if q.MemBytes() > opt.MemLimit || q.DiskBytes() > opt.DiskLimit {
			t.Fatalf("mem %d disk %d over limits", q.MemBytes(), q.DiskBytes())
		}
	}
	var onDisk int64
	for _, f := range segFiles(t, dir) {
		fi, _ := os.Stat(f)
		onDisk += fi.Size()
	}
	if onDisk != q.DiskBytes() || onDisk > opt.DiskLimit {
		t.Fatalf("files hold %d bytes, DiskBytes %d, limit %d", onDisk, q.DiskBytes(), opt.DiskLimit)
	}
	if full == 0 {
		t.Fatal("4x the queue never hit ErrFull")
	}
	t.Logf("pushed %d, rejected %d; mem %d disk %d", 1024-full, full, q.MemBytes(), q.DiskBytes())
}

func FuzzDecodeRecord(f *testing.F) {
	f.Add(EncodeRecord(nil, Record{Seq: 1, Data: []byte("hello")}))
	f.Add(EncodeRecord(nil, Record{Seq: 1 << 60}))
	f.Add([]byte{0xff, 0xff, 0xff, 0xff})
	f.Fuzz(func(t *testing.T, b []byte) {
		r, n, err := DecodeRecord(b, 1<<16)
		if err != nil {
			return
		}
		if n > len(b) {
			t.Fatalf("consumed %d of %d bytes", n, len(b))
		}
		if again := EncodeRecord(nil, r); !bytes.Equal(again, b[:n]) {
			t.Fatal("decode∘encode is not the identity")
		}
	})
}

func FuzzSegmentFile(f *testing.F) {
	h := make([]byte, segmentHeader)
	copy(h, segMagic)
	h[8] = segVersion
	seg := append(append([]byte(nil), h...), EncodeRecord(nil, Record{Seq: 3, Data: []byte("abc")})...)
	f.Add(seg)
	f.Add(h)
	f.Fuzz(func(t *testing.T, b []byte) {
		dir := t.TempDir()
		if err := os.WriteFile(filepath.Join(dir, segName(1)), b, 0o600); err != nil {
			t.Fatal(err)
		}
		q, err := Open(dir, Options{MaxRecord: 1 << 16})
		if err != nil {
			t.Fatal(err)
		}
		defer q.Close()
		prev := uint64(0)
		for {
			r, ok, err := q.Pop()
			if err != nil {
				t.Fatal(err)
			}
			if !ok {
				break
			}
			if r.Seq <= prev {
				t.Fatalf("replayed seq %d after %d", r.Seq, prev)
			}
			prev = r.Seq
		}
	})
}

func BenchmarkPushPopMemory(b *testing.B) {
	q := mustOpen(b, b.TempDir(), Options{})
	defer q.Close()
	d := payload(1, 4096)
	b.SetBytes(4096)
	b.ReportAllocs()
	seq := uint64(0)
	for b.Loop() {
		seq++
		if err := q.Push(seq, d); err != nil {
			b.Fatal(err)
		}
		if _, ok, _ := q.Next(); !ok {
			b.Fatal("empty")
		}
		q.Ack(seq)
	}
}

func BenchmarkPushDisk(b *testing.B) {
	for _, size := range []int{4096, 1 << 20} {
		b.Run(fmt.Sprint(size), func(b *testing.B) {
			q := mustOpen(b, b.TempDir(), Options{MemLimit: 1, DiskLimit: 1 << 40, SegmentSize: 64 << 20})
			defer q.Close()
			d := payload(1, size)
			b.SetBytes(int64(size))
			b.ReportAllocs()
			seq := uint64(0)
			for b.Loop() {
				seq++
				if err := q.Push(seq, d); err != nil {
					b.Fatal(err)
				}
				if seq%64 == 0 {
					q.Ack(seq) // keep the disk backlog small
				}
			}
		})
	}
}

func TestSeek(t *testing.T) {
	q := mustOpen(t, t.TempDir(), Options{MemLimit: 5 * (100 + Overhead), SegmentSize: 3 * (100 + Overhead)})
	defer q.Close()
	for s := uint64(1); s <= 20; s++ {
		if err := q.Push(s*2, payload(s, 100)); err != nil {
			t.Fatal(err)
		}
	}
	q.Ack(4)
	for _, tc := range []struct{ after, want uint64 }{{0, 6}, {5, 6}, {6, 8}, {9, 10}, {10, 12}, {25, 26}, {39, 40}} {
		if err := q.Seek(tc.after); err != nil {
			t.Fatal(err)
		}
		r, ok, err := q.Next()
		if err != nil || !ok || r.Seq != tc.want {
			t.Fatalf("seek %d: next %d %v %v, want %d", tc.after, r.Seq, ok, err, tc.want)
		}
		if r2, _, _ := q.Next(); tc.want < 40 && r2.Seq != tc.want+2 {
			t.Fatalf("seek %d: then %d", tc.after, r2.Seq)
		}
	}
	q.Seek(40)
	if _, ok, _ := q.Next(); ok {
		t.Fatal("seek past the end still hands out records")
	}
}

// TestSyncTail: the durable point is 0 while memory holds records (they
// are older than the disk part and do not survive a crash), then the last
// sequence pushed; what it covers is there after a reopen without Close.
func TestSyncTail(t *testing.T) {
	dir := t.TempDir()
	opt := Options{MemLimit: 3 * (500 + Overhead), SegmentSize: 4 << 10}
	q := mustOpen(t, dir, opt)
	if d, err := q.SyncTail(); err != nil || d != 0 {
		t.Fatalf("empty queue: %d, %v", d, err)
	}
	for s := uint64(1); s <= 20; s++ {
		if err := q.Push(s, payload(s, 500)); err != nil {
			t.Fatal(err)
		}
	}
	if d, err := q.SyncTail(); err != nil || d != 0 {
		t.Fatalf("memory holds records 1-3: durable point %d (%v), want 0", d, err)
	}
	q.Ack(3)
	d, err := q.SyncTail()
	if err != nil || d != 20 {
		t.Fatalf("memory empty: durable point %d (%v), want 20", d, err)
	}
	// A crash: the files are reopened as they are.
	r := mustOpen(t, dir, opt)
	defer r.Close()
	first, _, _ := r.Peek()
	if first.Seq != 4 || r.LastSeq() != 20 || r.Len() != 17 {
		t.Fatalf("after reopen: first %d last %d len %d, want 4 20 17", first.Seq, r.LastSeq(), r.Len())
	}
	q.Close()
	if _, err := q.SyncTail(); !errors.Is(err, ErrClosed) {
		t.Fatalf("closed: %v", err)
	}
}

// TestPushValue: a record pushed as a value stays in memory unencoded and
// is released when acknowledged; once memory is full the next one is
// encoded to disk and released at once; a record refused is neither
// encoded nor released; Next, Seek and Peek hand out values and disk
// records in order; the disk part survives a reopen.
func TestPushValue(t *testing.T) {
	dir := t.TempDir()
	q := mustOpen(t, dir, Options{MemLimit: 2 * (100 + Overhead), DiskLimit: segmentHeader + 2*(100+Overhead), SegmentSize: 1 << 20})
	type val struct{ seq uint64 }
	encoded := map[uint64]int{}
	released := map[uint64]int{}
	push := func(seq uint64) error {
		return q.PushValue(seq, 100, val{seq},
			func() ([]byte, error) { encoded[seq]++; return payload(seq, 100), nil },
			func() { released[seq]++ })
	}
	for seq := uint64(1); seq <= 4; seq++ {
		if err := push(seq); err != nil {
			t.Fatalf("push %d: %v", seq, err)
		}
	}
	if err := push(5); !errors.Is(err, ErrFull) {
		t.Fatalf("push 5 with memory and disk full: %v", err)
	}
	if want := map[uint64]int{3: 1, 4: 1}; !maps.Equal(encoded, want) {
		t.Errorf("encoded %v, want only the records that went to disk: %v", encoded, want)
	}
	if want := map[uint64]int{3: 1, 4: 1}; !maps.Equal(released, want) {
		t.Errorf("released %v, want the disk records at once: %v", released, want)
	}
	if q.MemBytes() != 2*(100+Overhead) || q.Len() != 4 {
		t.Errorf("mem %d bytes, %d records", q.MemBytes(), q.Len())
	}
	for seq := uint64(1); seq <= 4; seq++ {
		r, ok, err := q.Next()
		if err != nil || !ok || r.Seq != seq {
			t.Fatalf("next: %+v %v %v, want %d", r, ok, err, seq)
		}
		if seq <= 2 && (r.Value != val{seq} || r.Data != nil) {
			t.Errorf("memory record %d: %+v, want its value", seq, r)
		}
		if seq > 2 && (r.Value != nil || !bytes.Equal(r.Data, payload(seq, 100))) {
			t.Errorf("disk record %d: value %v, data %d bytes", seq, r.Value, len(r.Data))
		}
	}
	if err := q.Seek(1); err != nil {
		t.Fatal(err)
	}
	if r, _, _ := q.Next(); r.Value != (val{2}) {
		t.Errorf("after Seek(1): %+v", r)
	}
	if err := q.Ack(1); err != nil {
		t.Fatal(err)
	}
	if released[1] != 1 || released[2] != 0 {
		t.Errorf("after Ack(1): released %v", released)
	}
	if r, ok, _ := q.Peek(); !ok || r.Value != (val{2}) {
		t.Errorf("peek: %+v", r)
	}
	if q.MemBytes() != 100+Overhead {
		t.Errorf("mem %d bytes after one ack", q.MemBytes())
	}
	if err := q.PushValue(9, 100, nil, nil, nil); err == nil {
		t.Error("PushValue of nil accepted")
	}
	if err := q.Close(); err != nil {
		t.Fatal(err)
	}
	q = mustOpen(t, dir, Options{})
	defer q.Close()
	r, ok, err := q.Next()
	if err != nil || !ok || r.Seq != 3 || !bytes.Equal(r.Data, payload(3, 100)) {
		t.Errorf("after reopen: %+v %v %v, want the disk record 3", r, ok, err)
	}
}
