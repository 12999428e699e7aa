package agent

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"time"
)

// errNoLease: a record needs the lease, and this side does not hold it
// now (not an error worth reporting: the caller waits for it).
var errNoLease = errors.New("the lease is not held")

// syncMarks keeps the arbiter's record of whether a sync source's target
// holds every acknowledged write (docs/safety.md). Out of sync is
// recorded before the first write the target did not acknowledge is
// acknowledged; in sync again once the source reports that the target
// holds everything, checked again while the record is made, so that a
// write acknowledged without the target in between is never covered by
// an in-sync record. An in-sync record owed is retried until made: the
// target is never left recorded out of sync while it holds everything.
type syncMarks struct {
	// record writes the record under the lease (errNoLease when it is
	// not held); note tells the job's history; report keeps the last
	// error for status.
	record func(ctx context.Context, inSync bool) error
	note   func(inSync bool)
	report func(err error)
	every  time.Duration // retry interval of an owed in-sync record

	// mu: a record being made (write lock) excludes a write acknowledged
	// under the current record (read lock, outOfSync).
	mu       sync.RWMutex
	out      atomic.Bool                 // this side recorded the target out of sync
	owed     atomic.Bool                 // an in-sync record is owed once the target holds everything
	holds    atomic.Pointer[func() bool] // the source's check (TargetInSync)
	watching atomic.Bool
}

// outOfSync reports whether a write the target did not acknowledge may be
// acknowledged under the record as it stands. The write must already be
// tracked (in the bitmap, or beyond what the target acknowledged) so that
// the source's check sees it.
func (m *syncMarks) outOfSync() bool {
	m.mu.RLock()
	defer m.mu.RUnlock()
	return m.out.Load()
}

// markOut records the target out of sync (once); from then on an in-sync
// record is owed, made once the target holds everything again.
func (m *syncMarks) markOut(ctx context.Context) error {
	m.mu.Lock()
	if m.out.Load() {
		m.mu.Unlock()
		return nil
	}
	if err := m.record(ctx, false); err != nil {
		m.mu.Unlock()
		return err
	}
	m.out.Store(true)
	m.owed.Store(true)
	m.mu.Unlock()
	m.note(false)
	return nil
}

// targetInSync is the source's report (replstate.Authority.TargetInSync):
// an in-sync record is owed, made while holds is true.
func (m *syncMarks) targetInSync(ctx context.Context, holds func() bool) {
	m.holds.Store(&holds)
	m.owed.Store(true)
	m.watch(ctx)
}

// watch makes the owed in-sync record in one goroutine, retried every
// m.every until made or ctx ends.
func (m *syncMarks) watch(ctx context.Context) {
	if !m.watching.CompareAndSwap(false, true) {
		return
	}
	go func() {
		for {
			for ctx.Err() == nil && m.owed.Load() {
				if done, err := m.markIn(ctx); done {
					break
				} else if err != nil && !errors.Is(err, errNoLease) {
					m.report(err)
				}
				select {
				case <-ctx.Done():
				case <-time.After(m.every):
				}
			}
			m.watching.Store(false)
			// A record owed after the loop ended and before watching was
			// cleared found it still set: take it over.
			if ctx.Err() != nil || !m.owed.Load() || !m.watching.CompareAndSwap(false, true) {
				return
			}
		}
	}()
}

// markIn makes the owed in-sync record if the target holds everything;
// done: nothing more owed.
func (m *syncMarks) markIn(ctx context.Context) (done bool, err error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if !m.owed.Load() {
		return true, nil
	}
	hp := m.holds.Load()
	if hp == nil || !(*hp)() {
		return false, nil
	}
	if err := m.record(ctx, true); err != nil {
		return false, err
	}
	m.out.Store(false)
	m.owed.Store(false)
	m.note(true)
	return true, nil
}
