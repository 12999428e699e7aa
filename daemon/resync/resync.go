// Package resync holds the two pieces of a resync that outlive one
// connection: a rate limiter that never throttles below a floor, and a
// persistent cursor ("everything below byte K is resynced") so that an
// interrupted resync resumes where it stopped instead of restarting at 0%.
//
// The engine walks the chunks to resync (the union of both sides' dirty
// bitmaps) in disk order from Cursor.Next to the end, then once more from 0,
// calling Limiter.Wait before sending each run. When the peer acknowledges a
// run, the engine clears it in both bitmaps and calls Cursor.Advance; every
// few MiB it flushes the bitmaps and then saves the cursor (in that order,
// so the cursor never passes a clear that is not durable). A chunk below the
// cursor that is dirtied again (a write while disconnected) is set in the
// bitmap, so the pass from 0 picks it up: resuming never skips a change, and
// never resends what was already sent (sim_test.go plays this with crashes,
// partitions, failovers and split brains).
package resync

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"os"
	"sync"
	"time"

	"github.com/doppelha/doppel/daemon/statefile"
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

// Cursor is the persistent position of one resync.
type Cursor struct {
	path string
	// ID names the resync this cursor belongs to; a cursor found on disk with
	// another ID (or another Total) is ignored. The engine uses e.g. the
	// sync source's generation when the resync first started.
	ID uint64
	// Next: every chunk below this byte offset has been resynced.
	Next int64
	// Sent counts the bytes sent so far, across interruptions.
	Sent int64
	// Total is the volume size; progress is reported against the bytes to
	// resync, which the engine knows from the bitmap.
	Total int64
}

// ErrCorrupt reports an unreadable cursor file.
var ErrCorrupt = errors.New("resync cursor corrupt")

const (
	cursorMagic   = "DPRC"
	cursorVersion = 1
	cursorLen     = 4 + 4 + 8*4 + 4
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// OpenCursor loads the cursor at path if it belongs to resync id over a
// volume of total bytes, and reports whether it resumed one; otherwise (no
// file, another resync, a damaged file) it returns a cursor at 0.
func OpenCursor(path string, id uint64, total int64) (*Cursor, bool, error) {
	c := &Cursor{path: path, ID: id, Total: total}
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return c, false, nil
	}
	if err != nil {
		return nil, false, fmt.Errorf("read resync cursor: %w", err)
	}
	var old Cursor
	if err := old.UnmarshalBinary(b); err != nil || old.ID != id || old.Total != total {
		return c, false, nil
	}
	c.Next, c.Sent = old.Next, old.Sent
	return c, true, nil
}

// Advance records that everything below next is resynced, sent bytes later.
// The cursor never moves backwards.
func (c *Cursor) Advance(next, sent int64) {
	c.Next = min(max(c.Next, next), c.Total)
	c.Sent += sent
}

// Save persists the cursor atomically.
func (c *Cursor) Save() error {
	b, _ := c.MarshalBinary()
	if err := statefile.Write(c.path, b, 0o600); err != nil {
		return fmt.Errorf("save resync cursor: %w", err)
	}
	return nil
}

// Remove deletes the cursor file once the resync is complete.
func (c *Cursor) Remove() error {
	if err := os.Remove(c.path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove resync cursor: %w", err)
	}
	return nil
}

// MarshalBinary encodes the cursor (magic, version, id, next, sent, total,
// CRC32C; little endian).
func (c *Cursor) MarshalBinary() ([]byte, error) {
	b := make([]byte, 0, cursorLen)
	b = append(b, cursorMagic...)
	b = binary.LittleEndian.AppendUint32(b, cursorVersion)
	b = binary.LittleEndian.AppendUint64(b, c.ID)
	b = binary.LittleEndian.AppendUint64(b, uint64(c.Next))
	b = binary.LittleEndian.AppendUint64(b, uint64(c.Sent))
	b = binary.LittleEndian.AppendUint64(b, uint64(c.Total))
	return binary.LittleEndian.AppendUint32(b, crc32.Checksum(b, castagnoli)), nil
}

// UnmarshalBinary decodes the output of MarshalBinary.
func (c *Cursor) UnmarshalBinary(b []byte) error {
	if len(b) != cursorLen || string(b[:4]) != cursorMagic {
		return fmt.Errorf("%w: bad length or magic", ErrCorrupt)
	}
	if binary.LittleEndian.Uint32(b[4:]) != cursorVersion {
		return fmt.Errorf("%w: unsupported version", ErrCorrupt)
	}
	if crc32.Checksum(b[:cursorLen-4], castagnoli) != binary.LittleEndian.Uint32(b[cursorLen-4:]) {
		return fmt.Errorf("%w: checksum mismatch", ErrCorrupt)
	}
	next := int64(binary.LittleEndian.Uint64(b[16:]))
	sent := int64(binary.LittleEndian.Uint64(b[24:]))
	total := int64(binary.LittleEndian.Uint64(b[32:]))
	if total < 0 || next < 0 || next > total || sent < 0 {
		return fmt.Errorf("%w: next %d sent %d total %d", ErrCorrupt, next, sent, total)
	}
	c.ID = binary.LittleEndian.Uint64(b[8:])
	c.Next, c.Sent, c.Total = next, sent, total
	return nil
}
