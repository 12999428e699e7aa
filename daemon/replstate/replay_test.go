package replstate

import (
	"math/rand/v2"
	"path/filepath"
	"testing"
	"time"

	"github.com/doppelha/doppel/daemon/bitmap"
)

// TestRestartReplaysDiskQueue: a source killed with a backlog in its disk
// queue (the target connected but slow: the memory part shipped, the disk
// part waiting) resumes the same stream after the restart and replays the
// queue after the target's applied sequence: it sends about the queued
// bytes, and resyncs nothing, where a bitmap resync would resend every
// extent the backlog touched. Images identical after.
func TestRestartReplaysDiskQueue(t *testing.T) {
	const size = 32 << 20
	dir := t.TempDir()
	aFile, bFile := filepath.Join(dir, "a.img"), filepath.Join(dir, "b.img")
	rng := rand.New(rand.NewPCG(8, 8))
	p := &pair{t: t, nw: &memNet{up: true}, size: size}
	p.startTarget(filepath.Join(dir, "b"), bFile, "")
	cfg := SourceConfig{Dir: filepath.Join(dir, "a"), MemQueue: 512 << 10, DiskQueue: 64 << 20,
		LogOptions: bitmap.LogOptions{ExtentSize: 1 << 20, Slots: 64}} // the burst fits: no spill to the bitmap
	slow := cfg
	slow.RateLimit = 2 << 20 // the link: 2 MiB/s
	p.startSource(slow, aFile)
	p.converge(20 * time.Second)

	// 16 MiB of writes (256 KiB each, spread over the volume): the memory
	// queue fills at once, the rest spills to disk.
	for i := 0; i < 64; i++ {
		p.write(rng.Int64N(size/(256<<10))*(256<<10), randBytes(rng, 256<<10))
	}
	// Wait until the memory part shipped and the disk records stand in for
	// the activity log: the extents still hot are those of records the
	// target applied before that, not yet durably (at most a few).
	var st Status
	const extent = 1 << 20
	for deadline := time.Now().Add(20 * time.Second); ; {
		st = p.src.Status()
		if st.QueueMemBytes == 0 && st.HotExtents <= 4 && st.DirtyBytes == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the backlog never settled on disk: %+v", st)
		}
		time.Sleep(20 * time.Millisecond)
	}
	stream := p.src.engine().StreamID()
	queued := st.QueueDiskBytes
	if queued < 4<<20 {
		t.Fatalf("only %d bytes in the disk queue: the link drained it", queued)
	}

	// kill -9: no Close.
	p.srcStop()
	<-p.srcErr
	p.startSource(cfg, aFile)
	if got := p.src.engine().StreamID(); got != stream {
		t.Fatalf("restart started stream %016x, want the queued stream %016x resumed", got, stream)
	}
	open := p.src.Status()
	end := p.converge(30 * time.Second)
	var sent int64
	for _, n := range p.src.engine().Stats().PayloadBytes {
		sent += n
	}
	resumedStream := p.src.engine().StreamID() == stream
	p.stopSource()
	p.stopTarget()
	sameFiles(t, aFile, bFile)
	replayed := sent - end.ResyncSent
	t.Logf("disk queue at the kill %d bytes (%d hot extents of %d bytes); at open: %d dirty+hot bytes; after the restart: replayed %d bytes (%.2f × queued), resynced %d bytes",
		queued, st.HotExtents, extent, open.OpenDirtyBytes, replayed, float64(replayed)/float64(queued), end.ResyncSent)
	// (a barrier's flush record may have been queued after the snapshot)
	if !resumedStream || open.OpenQueueBytes < queued || open.OpenQueueBytes > queued+4096 {
		t.Fatalf("the stream was restarted (bitmap resync) instead of resumed (%d queue bytes at open, %d queued)", open.OpenQueueBytes, queued)
	}
	// Only the extents still hot at the kill are resynced (a bitmap
	// restart would resync every extent the 16 MiB backlog touched).
	if end.ResyncSent > open.OpenDirtyBytes || open.OpenDirtyBytes > int64(st.HotExtents)*extent {
		t.Fatalf("resynced %d bytes, %d dirty+hot at open: more than the %d hot extents", end.ResyncSent, open.OpenDirtyBytes, st.HotExtents)
	}
	// The replay starts at the target's applied sequence: at most what was
	// queued (records already applied are skipped), and most of it.
	if replayed > queued || replayed < queued/2 {
		t.Fatalf("replayed %d bytes after the restart for %d queued", replayed, queued)
	}
}

// TestKeptQueueDrainsUnderPressure: records kept in the disk queue for the
// target's durable point must not stop the queue from draining when it
// overflows (no flush fits then, so that point would never move): their
// changes go to the bitmap and the pair converges.
func TestKeptQueueDrainsUnderPressure(t *testing.T) {
	const size = 16 << 20
	dir := t.TempDir()
	aFile, bFile := filepath.Join(dir, "a.img"), filepath.Join(dir, "b.img")
	rng := rand.New(rand.NewPCG(9, 9))
	p := &pair{t: t, nw: &memNet{up: true}, size: size}
	p.startTarget(filepath.Join(dir, "b"), bFile, "")
	p.startSource(SourceConfig{Dir: filepath.Join(dir, "a"), MemQueue: 256 << 10, DiskQueue: 4 << 20, RateLimit: 2 << 20,
		LogOptions: bitmap.LogOptions{ExtentSize: 1 << 20, Slots: 64}}, aFile)
	p.converge(20 * time.Second)
	for i := 0; i < 8; i++ { // a 2 MiB backlog on disk
		p.write(rng.Int64N(size/(256<<10))*(256<<10), randBytes(rng, 256<<10))
	}
	for deadline := time.Now().Add(10 * time.Second); p.src.q.Load().keptAbove(0) == 0; {
		if time.Now().After(deadline) {
			t.Fatalf("the disk records never stood in for the activity log: %+v", p.src.Status())
		}
		time.Sleep(10 * time.Millisecond)
	}
	// Link down (no barrier can be sent): more records stand in, beyond
	// any barrier already queued; then the queue overflows.
	p.nw.set(false)
	first := p.src.q.Load().keptAbove(0)
	for i := 0; i < 4; i++ {
		p.write(rng.Int64N(size/(256<<10))*(256<<10), randBytes(rng, 256<<10))
	}
	for deadline := time.Now().Add(10 * time.Second); p.src.q.Load().keptAbove(first) == 0; {
		if time.Now().After(deadline) {
			t.Fatalf("the records written while partitioned never stood in: %+v", p.src.Status())
		}
		time.Sleep(10 * time.Millisecond)
	}
	for i := 0; i < 32; i++ { // 8 MiB more: the queue overflows
		p.write(rng.Int64N(size/(256<<10))*(256<<10), randBytes(rng, 256<<10))
	}
	if !p.src.Status().QueueOverflow {
		t.Fatal("the queue did not overflow")
	}
	p.nw.set(true)
	st := p.converge(40 * time.Second)
	p.stopSource()
	p.stopTarget()
	sameFiles(t, aFile, bFile)
	t.Logf("converged after the overflow: resync sent %d bytes", st.ResyncSent)
}

// TestDemotedSourceQueueInUnion: a source killed with writes only its disk
// queue covers (the target never got them), then run as the target of its
// promoted peer (a reverse): those writes' chunks are part of its own
// bitmap in the union resync, so the images end identical.
func TestDemotedSourceQueueInUnion(t *testing.T) {
	const size = 16 << 20
	dir := t.TempDir()
	aDir, bDir := filepath.Join(dir, "a"), filepath.Join(dir, "b")
	aFile, bFile := filepath.Join(dir, "a.img"), filepath.Join(dir, "b.img")
	rng := rand.New(rand.NewPCG(10, 10))
	p := &pair{t: t, nw: &memNet{up: true}, size: size}
	p.startTarget(bDir, bFile, "")
	p.startSource(SourceConfig{Dir: aDir, MemQueue: 256 << 10, DiskQueue: 16 << 20, RateLimit: 1 << 20,
		LogOptions: bitmap.LogOptions{ExtentSize: 1 << 20, Slots: 64}}, aFile)
	p.converge(20 * time.Second)
	for i := 0; i < 16; i++ { // a 4 MiB backlog on disk
		p.write(rng.Int64N(size/(256<<10))*(256<<10), randBytes(rng, 256<<10))
	}
	for deadline := time.Now().Add(10 * time.Second); p.src.q.Load().keptAbove(0) == 0 || p.src.Status().HotExtents > 4; {
		if time.Now().After(deadline) {
			t.Fatalf("the disk records never stood in for the activity log: %+v", p.src.Status())
		}
		time.Sleep(10 * time.Millisecond)
	}
	// kill -9 A and B; B is promoted (a failover), A returns as its target.
	p.srcStop()
	<-p.srcErr
	p.stopTarget()
	p.startTarget(aDir, aFile, "")
	p.startSource(SourceConfig{Dir: bDir}, bFile)
	p.converge(30 * time.Second)
	p.stopSource()
	p.stopTarget()
	sameFiles(t, aFile, bFile)
}
