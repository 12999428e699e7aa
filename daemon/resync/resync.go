// Package resync paces resync traffic: a rate limiter that never throttles
// below a floor (a resync of a busy volume must finish).
//
// The engine (daemon/replstate) walks the chunks to resync (the union of
// both sides' dirty bitmaps) in disk order, calling Limiter.Wait before
// sending each batch. The bitmap is the resync's own cursor: a batch's
// chunks are cleared once the peer holds them durably, so an interrupted
// resync resumes where it stopped, and a chunk dirtied again meanwhile is
// set again and picked up by the next pass: resuming never skips a change
// and never resends what was already sent (sim_test.go plays this with
// crashes, partitions, failovers and split brains).
package resync

import (
	"context"
	"sync"
	"time"
)

// DefaultFloor is the lowest rate a Limiter ever throttles to: below it a
// resync of a busy volume may never finish.
const DefaultFloor = 10 << 20

// burst is how far ahead of the ideal schedule a sender may run.
const burst = 50 * time.Millisecond

// Limiter paces resync traffic to a rate in bytes per second. Rate 0 means
// unlimited. SetRate never lowers the rate below the floor. It is safe for
// concurrent use.
type Limiter struct {
	mu    sync.Mutex
	rate  int64
	floor int64
	next  time.Time // when the bytes reserved so far will have been "spent"
}

// NewLimiter returns a limiter at rate bytes/s (0: unlimited) that never
// goes below floor bytes/s (0: DefaultFloor).
func NewLimiter(rate, floor int64) *Limiter {
	if floor <= 0 {
		floor = DefaultFloor
	}
	l := &Limiter{floor: floor}
	l.SetRate(rate)
	return l
}

// SetRate changes the rate (0: unlimited). A positive rate below the floor
// is raised to the floor. Returns the rate in effect.
func (l *Limiter) SetRate(rate int64) int64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	if rate > 0 {
		rate = max(rate, l.floor)
	}
	l.rate = max(rate, 0)
	return l.rate
}

// Rate is the rate in effect, bytes/s (0: unlimited).
func (l *Limiter) Rate() int64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.rate
}

// Floor is the lowest rate the limiter throttles to.
func (l *Limiter) Floor() int64 { return l.floor }

// Wait blocks until n more bytes may be sent, or ctx is done (the
// reservation is then returned).
func (l *Limiter) Wait(ctx context.Context, n int) error {
	if n <= 0 {
		return ctx.Err()
	}
	l.mu.Lock()
	if l.rate == 0 {
		l.mu.Unlock()
		return ctx.Err()
	}
	now := time.Now()
	if l.next.Before(now) {
		l.next = now
	}
	cost := time.Duration(float64(n) / float64(l.rate) * float64(time.Second))
	start := l.next
	l.next = l.next.Add(cost)
	wait := start.Sub(now) - burst
	l.mu.Unlock()
	if wait <= 0 {
		return ctx.Err()
	}
	t := time.NewTimer(wait)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		l.mu.Lock()
		l.next = l.next.Add(-cost)
		l.mu.Unlock()
		return ctx.Err()
	}
}
