package agent

import (
	"context"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"
)

// fakeRecord is an arbiter's in-sync record behind a lease that can be
// taken away.
type fakeRecord struct {
	mu      sync.Mutex
	lease   bool
	records []bool
}

func (f *fakeRecord) record(_ context.Context, inSync bool) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if !f.lease {
		return errNoLease
	}
	f.records = append(f.records, inSync)
	return nil
}

func (f *fakeRecord) setLease(held bool) {
	f.mu.Lock()
	f.lease = held
	f.mu.Unlock()
}

func (f *fakeRecord) got() []bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.records)
}

func newMarks(f *fakeRecord) *syncMarks {
	return &syncMarks{record: f.record, note: func(bool) {}, report: func(error) {}, every: 200 * time.Millisecond}
}

// A write acknowledged without the target after the source reported its
// target in sync (its data reached the target by the resync) records the
// target out of sync; the in-sync record must follow once the target
// holds everything, not stay out of sync until the next disconnection
// (the fault suite found a target left unpromotable that way).
func TestSyncMarksOutAfterInSyncReportIsCleared(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		ctx, cancel := context.WithCancel(t.Context())
		defer cancel()
		f := &fakeRecord{}
		m := newMarks(f)
		// The target came back while the lease was lost: the report waits.
		m.targetInSync(ctx, func() bool { return true })
		// Between two of the watcher's retries (every 200 ms), so the
		// lease and the out-of-sync record below come before its next.
		time.Sleep(1100 * time.Millisecond)
		if got := f.got(); len(got) != 0 {
			t.Fatalf("records without the lease: %v", got)
		}
		// The lease is back; the write held meanwhile records out of sync
		// first (the ordering the fault suite hit).
		f.setLease(true)
		if err := m.markOut(ctx); err != nil {
			t.Fatal(err)
		}
		m.watch(ctx)
		time.Sleep(2 * time.Second)
		synctest.Wait()
		if got := f.got(); !slices.Equal(got, []bool{false, true}) {
			t.Fatalf("records %v: the target holds everything, want [false true] (in sync last)", got)
		}
		if m.out.Load() || m.owed.Load() {
			t.Fatalf("out %v owed %v after the in-sync record", m.out.Load(), m.owed.Load())
		}
	})
}

// An out-of-sync record made while the source reports nothing new (no
// disconnection since its last in-sync report) is cleared once the
// source's check says the target holds everything.
func TestSyncMarksOwedUntilTargetHolds(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		ctx, cancel := context.WithCancel(t.Context())
		defer cancel()
		f := &fakeRecord{lease: true}
		m := newMarks(f)
		var holds atomic.Bool
		holds.Store(true)
		m.targetInSync(ctx, holds.Load)
		time.Sleep(time.Second)
		if got := f.got(); !slices.Equal(got, []bool{true}) {
			t.Fatalf("records %v, want [true]", got)
		}
		holds.Store(false) // a write went to the bitmap
		if err := m.markOut(ctx); err != nil {
			t.Fatal(err)
		}
		m.watch(ctx)
		time.Sleep(10 * time.Second)
		if got := f.got(); !slices.Equal(got, []bool{true, false}) {
			t.Fatalf("records %v while the target misses a write, want [true false]", got)
		}
		holds.Store(true) // resynced
		time.Sleep(time.Second)
		if got := f.got(); !slices.Equal(got, []bool{true, false, true}) {
			t.Fatalf("records %v after the resync, want [true false true]", got)
		}
	})
}

// The source's check runs while the record is made, with writes that
// would be acknowledged under the old record held off: a write tracked
// after the check waits and then records out of sync itself.
func TestSyncMarksCheckExcludesAcks(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		ctx, cancel := context.WithCancel(t.Context())
		defer cancel()
		f := &fakeRecord{lease: true}
		m := newMarks(f)
		if err := m.markOut(ctx); err != nil {
			t.Fatal(err)
		}
		var ackedDuringCheck atomic.Bool
		m.targetInSync(ctx, func() bool {
			if m.mu.TryRLock() {
				m.mu.RUnlock()
				ackedDuringCheck.Store(true)
			}
			return true
		})
		time.Sleep(time.Second)
		if ackedDuringCheck.Load() {
			t.Fatal("a write could be acknowledged under the out-of-sync record while the in-sync check ran")
		}
		if m.outOfSync() {
			t.Fatal("still out of sync after the in-sync record")
		}
		if got := f.got(); !slices.Equal(got, []bool{false, true}) {
			t.Fatalf("records %v, want [false true]", got)
		}
	})
}
