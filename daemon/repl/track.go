package repl

import (
	"slices"
	"sync"
)

// Tracker records which ranges of the source volume may differ from the
// target. It is the seam where the persistent dirty bitmap and
// activity log (daemon/bitmap) plug in; the engine calls it from the write
// path, so its methods must be fast and safe for concurrent use.
type Tracker interface {
	// Mark is called before the local write of [off, off+length) and
	// returns when the range is recorded (durably, for a persistent
	// tracker: the activity log). An error fails the write.
	Mark(off, length int64) error
	// Sequenced tells the tracker that the change to [off, off+length)
	// got sequence seq, or seq 0 when it could not be queued: the range
	// then stays dirty until a resync sends it.
	Sequenced(seq uint64, off, length int64)
	// Acked tells the tracker that the target applied every sequence up
	// to seq: ranges whose last change is ≤ seq are clean again.
	Acked(seq uint64)
}

// nopTracker tracks nothing: without a persistent bitmap a lost frame
// means a full or differential mirror.
type nopTracker struct{}

func (nopTracker) Mark(int64, int64) error        { return nil }
func (nopTracker) Sequenced(uint64, int64, int64) {}
func (nopTracker) Acked(uint64)                   {}

// rangeLock serialises overlapping byte ranges in arrival order: a request
// is granted when no earlier request (held or waiting) overlaps it, so
// overlapping writes, mirror reads and checksum snapshots reach the
// sequencer in the order they reach the local disk. Non-overlapping ranges
// proceed concurrently.
type rangeLock struct {
	mu   sync.Mutex
	reqs []*rangeReq // arrival order
}

type rangeReq struct {
	off, end int64
	granted  bool
	ch       chan struct{}
}

func (r *rangeReq) overlaps(o *rangeReq) bool { return r.off < o.end && o.off < r.end }

// lock acquires [off, off+length) and returns the release function.
func (l *rangeLock) lock(off, length int64) func() {
	if length <= 0 {
		length = 1
	}
	r := &rangeReq{off: off, end: off + length}
	l.mu.Lock()
	free := true
	for _, o := range l.reqs {
		if o.overlaps(r) {
			free = false
			break
		}
	}
	l.reqs = append(l.reqs, r)
	if free {
		r.granted = true
		l.mu.Unlock()
	} else {
		r.ch = make(chan struct{})
		l.mu.Unlock()
		<-r.ch
	}
	return func() { l.unlock(r) }
}

func (l *rangeLock) unlock(r *rangeReq) {
	l.mu.Lock()
	defer l.mu.Unlock()
	i := slices.Index(l.reqs, r)
	l.reqs = slices.Delete(l.reqs, i, i+1)
	for j, w := range l.reqs {
		if w.granted || !w.overlaps(r) {
			continue
		}
		free := true
		for _, o := range l.reqs[:j] {
			if o.overlaps(w) {
				free = false
				break
			}
		}
		if free {
			w.granted = true
			close(w.ch)
		}
	}
}
