package resync

// A randomized simulation of two nodes built from the resilience blocks the
// way the replication engine is meant to use them: a Tracker on every
// write, the async queue while connected, bitmap-only tracking (and a new
// generation) while disconnected, generation.Decide on reconnect, a resync of the
// union of both bitmaps (the bitmap is the cursor), split-brain saves, and
// crashes that discard everything not yet in the state files. It checks
// that the blocks compose: both images converge, split-brain saves hold the
// loser's divergent chunks, and resyncs send no more than the dirty bytes.

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"

	"github.com/doppelha/doppel/daemon/bitmap"
	"github.com/doppelha/doppel/daemon/generation"
	"github.com/doppelha/doppel/daemon/queue"
	"github.com/doppelha/doppel/daemon/splitbrain"
)

const (
	simSize  = 32 << 20
	simChunk = 64 << 10
)

type node struct {
	t       *testing.T
	name    string
	dir     string
	vol     []byte // the backing volume: survives crashes
	bm      *bitmap.Bitmap
	al      *bitmap.ActivityLog
	tr      *bitmap.Tracker
	q       *queue.Queue
	g       generation.State
	seq     uint64 // last sequence assigned (source) or applied (target)
	tracked bool   // wrote without the peer in the current generation
}

func (n *node) open() {
	t := n.t
	var err error
	if n.bm, err = bitmap.Open(filepath.Join(n.dir, "bitmap"), simSize, simChunk); err != nil {
		t.Fatal(err)
	}
	if n.al, err = bitmap.OpenLog(filepath.Join(n.dir, "al"), n.bm, bitmap.LogOptions{Slots: 4}); err != nil {
		t.Fatal(err)
	}
	n.tr = bitmap.NewTracker(n.bm, n.al)
	if n.q, err = queue.Open(filepath.Join(n.dir, "queue"), queue.Options{MemLimit: 64 << 10, DiskLimit: 256 << 10, SegmentSize: 32 << 10}); err != nil {
		t.Fatal(err)
	}
	// The disk queue's records are not replayed after a crash: the bitmap
	// (with the hot extents) covers them, and replaying a tail whose head
	// was in memory would break the order.
	n.q.Ack(n.q.LastSeq())
	if n.g, err = generation.Load(filepath.Join(n.dir, "gen")); err != nil && !errors.Is(err, os.ErrNotExist) {
		t.Fatal(err)
	}
	n.seq = max(n.g.AckedSeq, n.g.AppliedSeq, n.q.LastSeq())
	n.tracked = false
}

// crash drops every in-memory structure without flushing anything.
func (n *node) crash() {
	n.al.Close() // the file handle only; no Clean, no bitmap flush
	n.q.Close()
	n.open()
}

func (n *node) save() {
	if err := generation.Save(filepath.Join(n.dir, "gen"), n.g); err != nil {
		n.t.Fatal(err)
	}
}

type sim struct {
	t         *testing.T
	r         *rand.Rand
	a, b      *node
	connected bool
	resync    *resyncRun
	saves     int
	sent      int64 // resync bytes
	dirtySum  int64 // sum of the resync sets at each (re)connect
}

type resyncRun struct {
	from, to *node
	set      *bitmap.Bitmap // what to send: union of both bitmaps; cleared as it is sent
}

func (s *sim) peer(n *node) *node {
	if n == s.a {
		return s.b
	}
	return s.a
}

func (s *sim) write(n *node) {
	off := s.r.Int64N(simSize - 8192)
	data := make([]byte, 1+s.r.IntN(3*simChunk))
	if off+int64(len(data)) > simSize {
		data = data[:simSize-off]
	}
	for i := range data {
		data[i] = byte(s.r.Uint32())
	}
	if err := n.tr.Mark(off, int64(len(data))); err != nil {
		s.t.Fatal(err)
	}
	copy(n.vol[off:], data)
	p := s.peer(n)
	if s.connected && p.g.Side == generation.SideTarget && s.resync == nil || s.connected && s.resync != nil && s.resync.from == n {
		n.seq++
		rec := binary.LittleEndian.AppendUint64(nil, uint64(off))
		if err := n.q.Push(n.seq, append(rec, data...)); err != nil {
			n.seq--
			n.tr.Sequenced(0, off, int64(len(data))) // queue full: bitmap-only
			return
		}
		n.tr.Sequenced(n.seq, off, int64(len(data)))
		return
	}
	// Tracking mode: writes the peer will not see in order.
	if !n.tracked {
		n.g.NewGeneration(generation.NewID())
		n.save()
		n.tracked = true
	}
	n.tr.Sequenced(0, off, int64(len(data)))
}

func (s *sim) ship(n *node, k int) {
	p := s.peer(n)
	for range k {
		r, ok, err := n.q.Next()
		if err != nil {
			s.t.Fatal(err)
		}
		if !ok {
			return
		}
		off := int64(binary.LittleEndian.Uint64(r.Data))
		data := r.Data[8:]
		if err := p.al.Begin(off, int64(len(data))); err != nil {
			s.t.Fatal(err)
		}
		copy(p.vol[off:], data)
		p.al.End(off, int64(len(data)))
		p.seq = r.Seq
		n.q.Ack(r.Seq)
		n.tr.Acked(r.Seq)
	}
}

func (s *sim) disconnect() {
	if !s.connected {
		return
	}
	s.connected = false
	for _, n := range []*node{s.a, s.b} {
		n.tr.Disconnected() // queued changes → bitmap
		n.q.Ack(n.q.LastSeq())
	}
}

func (s *sim) connect() {
	if s.connected {
		return
	}
	s.connected = true
	s.resync = nil
	for _, n := range []*node{s.a, s.b} {
		n.tracked = false
	}
	d := generation.Decide(s.a.g, s.b.g)
	var from, to *node
	switch d.Outcome {
	case generation.InSync:
		// Same generation: the source side still sends its dirty and hot
		// chunks (a crash may have left some).
		from, to = s.a, s.b
		if s.b.g.Side == generation.SideSource {
			from, to = s.b, s.a
		}
	case generation.ResyncToPeer:
		from, to = s.a, s.b
	case generation.ResyncFromPeer:
		from, to = s.b, s.a
	case generation.SplitBrain:
		// The operator discards the side that is not a source, or b.
		from, to = s.a, s.b
		if s.a.g.Side != generation.SideSource {
			from, to = s.b, s.a
		}
		s.splitBrain(from, to)
	default:
		s.t.Fatalf("decide: %v (%s): a=%v b=%v", d.Outcome, d.Reason, s.a.g, s.b.g)
	}
	to.g.Demote()
	to.g.BeginResync(from.g)
	to.save()
	set := from.bm.Clone()
	if err := set.Union(to.bm); err != nil {
		s.t.Fatal(err)
	}
	if d.Full {
		set.SetAll()
	}
	if set.DirtyChunks() == 0 {
		to.g.EndResync()
		to.save()
		return
	}
	s.dirtySum += set.DirtyBytes()
	s.resync = &resyncRun{from: from, to: to, set: set}
}

func (s *sim) splitBrain(winner, loser *node) {
	div := winner.bm.Clone()
	div.Union(loser.bm)
	path := filepath.Join(loser.dir, fmt.Sprintf("splitbrain-%d.img", s.saves))
	s.saves++
	saved, err := splitbrain.Save(path, bytes.NewReader(loser.vol), div)
	if err != nil {
		s.t.Fatal(err)
	}
	got, _ := os.ReadFile(path)
	for off, n := range div.Runs(0, 0) {
		if !bytes.Equal(got[off:off+n], loser.vol[off:off+n]) {
			s.t.Fatalf("split-brain save differs from the loser at %d", off)
		}
	}
	if saved.Bytes != div.DirtyBytes() {
		s.t.Fatalf("saved %d bytes, divergence %d", saved.Bytes, div.DirtyBytes())
	}
}

// resyncStep sends up to k runs of what is left to send, in disk order.
func (s *sim) resyncStep(k int) {
	rs := s.resync
	for off, n := range rs.set.Runs(0, 4*simChunk) {
		if k == 0 {
			// The clears of what was sent become durable.
			rs.from.bm.Flush()
			rs.to.bm.Flush()
			return
		}
		k--
		copy(rs.to.vol[off:off+n], rs.from.vol[off:off+n])
		s.sent += n
		rs.set.Clear(off, n)
		rs.from.bm.Clear(off, n)
		rs.to.bm.Clear(off, n)
	}
	// Finished: drain what was queued meanwhile, then mark consistent.
	s.ship(rs.from, 1<<30)
	rs.to.g.EndResync()
	rs.to.save()
	rs.from.al.Clean()
	rs.to.al.Clean()
	s.resync = nil
}

func (s *sim) writer() *node {
	var w []*node
	for _, n := range []*node{s.a, s.b} {
		if n.g.Side == generation.SideSource {
			w = append(w, n)
		}
	}
	if len(w) == 0 {
		return nil
	}
	return w[s.r.IntN(len(w))]
}

func TestSimulatedFailures(t *testing.T) {
	seeds := 10
	if testing.Short() {
		seeds = 3
	}
	for seed := range uint64(seeds) {
		t.Run(fmt.Sprint(seed), func(t *testing.T) { runSim(t, seed) })
	}
}

func runSim(t *testing.T, seed uint64) {
	root := t.TempDir()
	s := &sim{t: t, r: rand.New(rand.NewPCG(seed, 99))}
	s.a = &node{t: t, name: "a", dir: filepath.Join(root, "a"), vol: make([]byte, simSize)}
	s.b = &node{t: t, name: "b", dir: filepath.Join(root, "b"), vol: make([]byte, simSize)}
	for _, n := range []*node{s.a, s.b} {
		os.MkdirAll(n.dir, 0o700)
		n.open()
	}
	s.a.g = generation.NewSource()
	s.a.save()
	s.b.g.Demote()
	s.connect()
	for range 1500 {
		switch op := s.r.IntN(100); {
		case op < 50:
			if w := s.writer(); w != nil {
				s.write(w)
			}
		case op < 70:
			if s.connected {
				if s.resync != nil {
					s.resyncStep(1 + s.r.IntN(4))
				} else if w := s.writer(); w != nil {
					s.ship(w, 1+s.r.IntN(8))
				}
			}
		case op < 77:
			s.disconnect()
		case op < 87:
			s.connect()
		case op < 92:
			n := []*node{s.a, s.b}[s.r.IntN(2)]
			s.disconnect()
			s.resync = nil
			n.crash()
		case op < 95:
			// Failover: the target is promoted while the link is down.
			if !s.connected {
				for _, n := range []*node{s.a, s.b} {
					if n.g.Side == generation.SideTarget && n.g.Data == generation.Consistent {
						if err := n.g.Promote(generation.NewID(), false); err != nil {
							t.Fatal(err)
						}
						n.save()
						if s.r.IntN(2) == 0 {
							s.peer(n).g.Demote() // the old source is fenced
							s.peer(n).save()
						}
					}
				}
			}
		}
	}
	// Heal: connect, finish the resync, drain the queue.
	s.disconnect()
	s.connect()
	for s.resync != nil {
		s.resyncStep(1 << 30)
	}
	if w := s.writer(); w != nil {
		s.ship(w, 1<<30)
	}
	if !bytes.Equal(s.a.vol, s.b.vol) {
		for c := int64(0); c < simSize; c += simChunk {
			if !bytes.Equal(s.a.vol[c:c+simChunk], s.b.vol[c:c+simChunk]) {
				t.Fatalf("images differ at chunk %d (a=%v b=%v)", c/simChunk, s.a.g, s.b.g)
			}
		}
	}
	if d := generation.Decide(s.a.g, s.b.g); d.Outcome != generation.InSync {
		t.Fatalf("after healing: %v (%s)", d.Outcome, d.Reason)
	}
	if s.sent > s.dirtySum {
		t.Fatalf("resyncs sent %d bytes for %d dirty", s.sent, s.dirtySum)
	}
	t.Logf("split-brain saves %d, resync sent %d MiB; resync sets at connects summed to %d MiB", s.saves, s.sent>>20, s.dirtySum>>20)
}
