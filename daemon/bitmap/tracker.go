package bitmap

import (
	"slices"
	"sync"
)

// Tracker joins a Bitmap and an ActivityLog into the write-path hooks of the
// replication source (the shape of daemon/repl's Tracker seam):
//
//	Mark(off, n)            before the local write: the extents are made hot
//	Sequenced(seq, off, n)  the change got sequence seq (0: not queued)
//	Acked(seq)              the peer applied everything up to seq
//
// A change that could not be queued (seq 0) is set in the bitmap at once. A
// queued change keeps its extents hot until acknowledged; if the log runs
// out of slots because too many queued changes wait for a slow or absent
// peer, the oldest are marked in the bitmap and released, so Mark never
// waits on the peer. Every Mark must be followed by one Sequenced for the
// same range, also when the local write fails (seq 0), or its extents stay
// held. After a crash, bitmap + hot extents cover every change
// the peer may lack. It is safe for concurrent use.
type Tracker struct {
	bm *Bitmap
	al *ActivityLog

	mu      sync.Mutex
	pending []pendingRange // queued, not yet acknowledged, in sequence order
	sorted  bool
}

type pendingRange struct {
	seq    uint64
	off, n int64
}

// NewTracker returns a Tracker over bm and al (al tracks bm).
func NewTracker(bm *Bitmap, al *ActivityLog) *Tracker {
	return &Tracker{bm: bm, al: al, sorted: true}
}

// Mark makes the extents of [off, off+n) durably hot. A range larger than
// the activity log (a whole-device discard, say) is instead set in the
// bitmap and flushed; it stays dirty until a resync sends it or the engine
// clears it.
func (t *Tracker) Mark(off, n int64) error {
	if !t.al.Fits(off, n) {
		t.bm.Set(off, n)
		return t.bm.Flush()
	}
	ok, err := t.al.TryBegin(off, n)
	if err != nil || ok {
		return err
	}
	// Every slot is held by queued changes: move them to the bitmap.
	t.spill()
	return t.al.Begin(off, n)
}

// spill marks every pending range in the bitmap, makes that durable and
// releases their extents.
func (t *Tracker) spill() {
	t.mu.Lock()
	p := t.pending
	t.pending, t.sorted = nil, true
	t.mu.Unlock()
	for _, r := range p {
		t.bm.Set(r.off, r.n)
	}
	// The activity log flushes the bitmap before a released extent leaves it.
	for _, r := range p {
		t.al.End(r.off, r.n)
	}
}

// Sequenced records that the change to [off, off+n) has sequence seq, or,
// with seq 0, that it was not queued (queue full, or the local write failed)
// and must be resynced from the bitmap.
func (t *Tracker) Sequenced(seq uint64, off, n int64) {
	if !t.al.Fits(off, n) {
		return // already in the bitmap, no extent held
	}
	if seq == 0 {
		t.bm.Set(off, n)
		t.al.End(off, n)
		return
	}
	t.mu.Lock()
	if k := len(t.pending); k > 0 && t.pending[k-1].seq > seq {
		t.sorted = false
	}
	t.pending = append(t.pending, pendingRange{seq, off, n})
	t.mu.Unlock()
}

// Acked releases the extents of every change with sequence <= seq.
func (t *Tracker) Acked(seq uint64) {
	t.mu.Lock()
	if !t.sorted {
		slices.SortStableFunc(t.pending, func(a, b pendingRange) int {
			switch {
			case a.seq < b.seq:
				return -1
			case a.seq > b.seq:
				return 1
			}
			return 0
		})
		t.sorted = true
	}
	i := 0
	for i < len(t.pending) && t.pending[i].seq <= seq {
		i++
	}
	done := slices.Clone(t.pending[:i])
	t.pending = slices.Delete(t.pending, 0, i)
	t.mu.Unlock()
	for _, r := range done {
		t.al.End(r.off, r.n)
	}
}

// Covered releases the extents of the changes with after < seq <= upTo:
// something else covers them now (their frames are durable in a disk queue
// that keeps them until the peer holds them durably). Changes with a
// sequence <= after stay until Acked.
func (t *Tracker) Covered(after, upTo uint64) {
	t.mu.Lock()
	var done []pendingRange
	kept := t.pending[:0]
	for _, r := range t.pending {
		if r.seq > after && r.seq <= upTo {
			done = append(done, r)
		} else {
			kept = append(kept, r)
		}
	}
	clear(t.pending[len(kept):])
	t.pending = kept
	t.mu.Unlock()
	for _, r := range done {
		t.al.End(r.off, r.n)
	}
}

// Disconnected moves every queued, unacknowledged change into the bitmap
// (call it when the queue is dropped, e.g. the source restarts the stream
// from a resync instead of replaying it).
func (t *Tracker) Disconnected() { t.spill() }

// Pending is the number of queued changes holding extents.
func (t *Tracker) Pending() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return len(t.pending)
}
