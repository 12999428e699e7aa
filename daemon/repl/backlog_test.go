package repl

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/doppelha/doppel/daemon/repl/wire"
)

func TestMemBacklog(t *testing.T) {
	q := NewMemBacklog(300)
	ctx := context.Background()
	push := func(seq uint64) error {
		return q.Push(ctx, Entry{Seq: seq, Frame: &wire.Flush{Seq: seq}, Size: 100})
	}
	for seq := uint64(1); seq <= 3; seq++ {
		if err := push(seq); err != nil {
			t.Fatal(err)
		}
	}
	// Full: the fourth push waits until a release.
	done := make(chan error, 1)
	go func() { done <- push(4) }()
	select {
	case err := <-done:
		t.Fatalf("push into a full queue returned %v", err)
	case <-time.After(50 * time.Millisecond):
	}
	ents, err := q.Read(ctx, 0, 10)
	if err != nil || len(ents) != 3 || ents[0].Seq != 1 {
		t.Fatalf("read: %v %v", ents, err)
	}
	q.Release(2)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if b, n := q.Len(); b != 200 || n != 2 {
		t.Fatalf("len %d/%d", b, n)
	}
	// Re-reading after a reconnect starts at the target's applied seq.
	if ents, err := q.Read(ctx, 2, 10); err != nil || len(ents) != 2 || ents[0].Seq != 3 {
		t.Fatalf("re-read: %v %v", ents, err)
	}
	if _, err := q.Read(ctx, 0, 10); !errors.Is(err, ErrGone) {
		t.Fatalf("read of released entries: %v", err)
	}
	// A reader waits for the next push.
	got := make(chan []Entry, 1)
	go func() { e, _ := q.Read(ctx, 4, 10); got <- e }()
	time.Sleep(20 * time.Millisecond)
	if err := push(5); err != nil {
		t.Fatal(err)
	}
	if e := <-got; len(e) != 1 || e[0].Seq != 5 {
		t.Fatalf("waiting reader got %v", e)
	}
	if err := q.Push(ctx, Entry{Seq: 9, Frame: &wire.Flush{Seq: 9}, Size: 1}); err == nil {
		t.Fatal("a gap in sequences was accepted")
	}
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	if _, err := q.Read(cctx, 5, 1); !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled read: %v", err)
	}
	q.Release(5)
	if b, n := q.Len(); b != 0 || n != 0 {
		t.Fatalf("after releasing all: %d/%d", b, n)
	}
	if err := push(6); err != nil {
		t.Fatal(err)
	}
}

func TestRangeLockOrdersOverlaps(t *testing.T) {
	var l rangeLock
	u1 := l.lock(0, 100)
	u2 := l.lock(200, 100) // disjoint: granted at once
	order := make(chan int, 3)
	go func() { u := l.lock(50, 10); order <- 3; u() }()
	time.Sleep(10 * time.Millisecond)
	go func() { u := l.lock(55, 200); order <- 4; u() }() // overlaps the waiter and u2
	time.Sleep(10 * time.Millisecond)
	select {
	case <-order:
		t.Fatal("overlapping lock granted while held")
	default:
	}
	u1()
	if first := <-order; first != 3 {
		t.Fatalf("lock %d granted first, want arrival order", first)
	}
	select {
	case <-order:
		t.Fatal("lock overlapping a held range granted")
	case <-time.After(10 * time.Millisecond):
	}
	u2()
	if v := <-order; v != 4 {
		t.Fatalf("got %d", v)
	}
}
