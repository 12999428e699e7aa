package repl

import (
	"context"
	"errors"
	"fmt"
	"sync"

	"github.com/doppelha/doppel/daemon/repl/wire"
)

// DefaultBacklogBytes is the default bound of the in-memory backlog.
const DefaultBacklogBytes = 128 << 20

// Entry is one sequenced frame waiting to be sent to (or acknowledged by)
// the target. Frame is plain data (a wire frame), so a queue may serialise it
// with [wire.Append] and read it back with [wire.Decode].
type Entry struct {
	Seq   uint64
	Frame wire.Sequenced
	Size  int64 // bytes the entry accounts for (payload + header)
	// Done, when set, is called once the entry is released: the frame's
	// payload is a buffer lent by the NBD server (blockdev.Mutation.Retain),
	// shared by the entries of one split write up to this one. A queue that
	// copies the frame on Push may call it right away; one that never calls
	// it only forgoes the buffer's reuse.
	Done func()
}

// Backlog holds the sequenced frames between the sequencer and the sender,
// in sequence order, until the target acknowledges them. It is the seam
// where the memory → disk queue (daemon/queue, through daemon/replstate)
// plugs in.
//
// Seqs pushed are consecutive. Entries stay readable after they were read
// (a reconnect re-sends from the target's applied sequence) until Release.
type Backlog interface {
	// Push appends e. The in-memory queue waits while it is full (back
	// pressure) until ctx is done; a spilling queue should not wait. An
	// error means the entry was not queued: the caller treats its range
	// as out of sync (see [Tracker]).
	Push(ctx context.Context, e Entry) error
	// Read returns up to max entries with Seq > after, in order, waiting
	// until at least one exists or ctx is done (entries already there are
	// returned even with ctx done: the sender polls that way). It returns
	// ErrGone when after+1 was already released (the stream cannot be
	// resumed there).
	Read(ctx context.Context, after uint64, max int) ([]Entry, error)
	// Release drops every entry with Seq ≤ seq (the target applied them).
	Release(seq uint64)
	// Len reports the bytes and entries held.
	Len() (bytes int64, entries int)
}

// ErrGone reports that a queue no longer holds the entry a reader asked for.
var ErrGone = errors.New("replication queue: entry already released")

// MemBacklog is the bounded in-memory [Backlog].
type MemBacklog struct {
	limit int64

	mu      sync.Mutex
	pushed  chan struct{} // closed and replaced when an entry is pushed and a reader waits
	freed   chan struct{} // closed and replaced when entries are released and a pusher waits
	readers int           // Reads waiting
	pushers int           // Pushes waiting
	ents    []Entry
	head    int    // ents[head:] are live
	first   uint64 // Seq that ents[head] has (or will have when empty)
	bytes   int64
}

// NewMemBacklog returns an in-memory backlog holding at most limit bytes
// (one entry larger than limit is admitted when the queue is empty).
func NewMemBacklog(limit int64) *MemBacklog {
	if limit <= 0 {
		limit = DefaultBacklogBytes
	}
	return &MemBacklog{limit: limit, pushed: make(chan struct{}), freed: make(chan struct{}), first: 1}
}

// Push implements [Backlog]: it waits while the queue is full.
func (q *MemBacklog) Push(ctx context.Context, e Entry) error {
	q.mu.Lock()
	if err := q.checkSeq(e.Seq); err != nil {
		q.mu.Unlock()
		return err
	}
	for q.bytes > 0 && q.bytes+e.Size > q.limit {
		ch := q.freed
		q.pushers++
		q.mu.Unlock()
		var err error
		select {
		case <-ch:
		case <-ctx.Done():
			err = fmt.Errorf("replication queue full (%d bytes): %w", q.limit, ctx.Err())
		}
		q.mu.Lock()
		q.pushers--
		if err != nil {
			q.mu.Unlock()
			return err
		}
	}
	defer q.mu.Unlock()
	if err := q.checkSeq(e.Seq); err != nil {
		return err
	}
	if len(q.ents) == q.head {
		q.first = e.Seq
	}
	q.ents = append(q.ents, e)
	q.bytes += e.Size
	if q.readers > 0 {
		close(q.pushed)
		q.pushed = make(chan struct{})
	}
	return nil
}

// checkSeq verifies that seq follows the last entry held.
func (q *MemBacklog) checkSeq(seq uint64) error {
	if n := len(q.ents) - q.head; n > 0 {
		if want := q.first + uint64(n); seq != want {
			return fmt.Errorf("replication queue: push seq %d, want %d", seq, want)
		}
	}
	return nil
}

// Read implements [Backlog].
func (q *MemBacklog) Read(ctx context.Context, after uint64, max int) ([]Entry, error) {
	q.mu.Lock()
	for {
		n := len(q.ents) - q.head
		if after+1 < q.first {
			q.mu.Unlock()
			return nil, fmt.Errorf("read after %d, oldest held %d: %w", after, q.first, ErrGone)
		}
		if i := int(after + 1 - q.first); i < n {
			k := min(n-i, max)
			out := make([]Entry, k)
			copy(out, q.ents[q.head+i:q.head+i+k])
			q.mu.Unlock()
			return out, nil
		}
		ch := q.pushed
		q.readers++
		q.mu.Unlock()
		var err error
		select {
		case <-ch:
		case <-ctx.Done():
			err = ctx.Err()
		}
		q.mu.Lock()
		q.readers--
		if err != nil {
			q.mu.Unlock()
			return nil, err
		}
	}
}

// Release implements [Backlog].
func (q *MemBacklog) Release(seq uint64) {
	q.mu.Lock()
	defer q.mu.Unlock()
	changed := false
	for q.head < len(q.ents) && q.ents[q.head].Seq <= seq {
		q.bytes -= q.ents[q.head].Size
		if d := q.ents[q.head].Done; d != nil {
			d()
		}
		q.ents[q.head] = Entry{}
		q.head++
		changed = true
	}
	if q.head == len(q.ents) {
		q.ents, q.head = q.ents[:0], 0
		if seq+1 > q.first {
			q.first = seq + 1
		}
	} else {
		q.first = q.ents[q.head].Seq
		if q.head > 1024 && q.head > len(q.ents)/2 {
			q.ents = append(q.ents[:0:0], q.ents[q.head:]...)
			q.head = 0
		}
	}
	if changed && q.pushers > 0 {
		close(q.freed)
		q.freed = make(chan struct{})
	}
}

// Len implements [Backlog].
func (q *MemBacklog) Len() (int64, int) {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.bytes, len(q.ents) - q.head
}
