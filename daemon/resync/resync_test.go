package resync

import (
	"bytes"
	"context"
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/doppelha/doppel/daemon/bitmap"
)

const mib = 1 << 20

func TestLimiterPacesExactly(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		l := NewLimiter(20*mib, 0)
		start := time.Now()
		for range 100 {
			if err := l.Wait(context.Background(), mib); err != nil {
				t.Fatal(err)
			}
		}
		// 100 MiB at 20 MiB/s: the last MiB may start at 4.95 s, minus the
		// 50 ms burst allowance.
		if got, want := time.Since(start), 4950*time.Millisecond-burst; got != want {
			t.Fatalf("elapsed %v, want %v", got, want)
		}
	})
}

func TestLimiterFloor(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		l := NewLimiter(mib, 0) // asks for 1 MiB/s: raised to the 10 MiB/s floor
		if l.Rate() != DefaultFloor {
			t.Fatalf("rate %d, want the floor %d", l.Rate(), DefaultFloor)
		}
		start := time.Now()
		for range 20 {
			l.Wait(context.Background(), mib)
		}
		if got, want := time.Since(start), 1900*time.Millisecond-burst; got != want {
			t.Fatalf("elapsed %v at the floor, want %v", got, want)
		}
		if got := l.SetRate(40 * mib); got != 40*mib {
			t.Fatalf("SetRate above the floor gave %d", got)
		}
		if NewLimiter(mib, 512<<10).Rate() != mib {
			t.Fatal("configured floor ignored")
		}
	})
}

func TestLimiterUnlimitedAndCancel(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		l := NewLimiter(0, 0)
		start := time.Now()
		for range 1000 {
			l.Wait(context.Background(), 64*mib)
		}
		if time.Since(start) != 0 {
			t.Fatal("unlimited limiter waited")
		}
		l.SetRate(10 * mib)
		l.Wait(context.Background(), 10*mib) // next is now +1 s
		ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
		defer cancel()
		if err := l.Wait(ctx, 100*mib); !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("wait past deadline: %v", err)
		}
		// The cancelled reservation was returned: the next MiB waits only
		// for the first 10 MiB.
		before := time.Now()
		l.Wait(context.Background(), mib)
		if got, want := time.Since(before), 900*time.Millisecond-burst; got != want {
			t.Fatalf("after cancel waited %v, want %v", got, want)
		}
	})
}

func TestLimiterShared(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		l := NewLimiter(10*mib, 0)
		start := time.Now()
		var wg sync.WaitGroup
		for range 4 {
			wg.Go(func() {
				for range 10 {
					l.Wait(context.Background(), mib)
				}
			})
		}
		wg.Wait()
		// 40 MiB by four senders at 10 MiB/s in total.
		if got, want := time.Since(start), 3900*time.Millisecond-burst; got != want {
			t.Fatalf("elapsed %v, want %v", got, want)
		}
	})
}

func TestCursorRoundTrip(t *testing.T) {
	p := filepath.Join(t.TempDir(), "cursor")
	c, resumed, err := OpenCursor(p, 7, 1<<30)
	if err != nil || resumed || c.Next != 0 {
		t.Fatalf("fresh: %+v %v %v", c, resumed, err)
	}
	c.Advance(64*mib, 3*mib)
	c.Advance(32*mib, mib) // never backwards
	if c.Next != 64*mib || c.Sent != 4*mib {
		t.Fatalf("advance: %+v", c)
	}
	if err := c.Save(); err != nil {
		t.Fatal(err)
	}
	d, resumed, err := OpenCursor(p, 7, 1<<30)
	if err != nil || !resumed || d.Next != 64*mib || d.Sent != 4*mib {
		t.Fatalf("resume: %+v %v %v", d, resumed, err)
	}
	for _, other := range []struct {
		id    uint64
		total int64
	}{{8, 1 << 30}, {7, 2 << 30}} {
		if e, resumed, _ := OpenCursor(p, other.id, other.total); resumed || e.Next != 0 {
			t.Fatalf("cursor of another resync reused: %+v", e)
		}
	}
	b, _ := os.ReadFile(p)
	b[10] ^= 1
	os.WriteFile(p, b, 0o600)
	if e, resumed, err := OpenCursor(p, 7, 1<<30); err != nil || resumed || e.Next != 0 {
		t.Fatalf("damaged cursor: %+v %v %v", e, resumed, err)
	}
	if err := d.Remove(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(p); !errors.Is(err, os.ErrNotExist) {
		t.Fatal("cursor not removed")
	}
	if err := d.Remove(); err != nil {
		t.Fatalf("second remove: %v", err)
	}
}

// TestInterruptedResyncResumes plays the engine's resync loop over a dirty
// bitmap, interrupts it halfway (process killed: only saved state
// survives), resumes, and checks the total sent against the bound:
// at most 1.2 × the dirty bytes.
func TestInterruptedResyncResumes(t *testing.T) {
	dir := t.TempDir()
	const size, chunk = 1 << 30, 64 << 10
	bm, _ := bitmap.New(size, chunk)
	r := rand.New(rand.NewPCG(4, 4))
	for range 300 {
		bm.Set(r.Int64N(size), r.Int64N(512<<10))
	}
	dirty := bm.DirtyBytes()
	target := make(map[int64]bool) // chunks the peer received
	var sent int64
	run := func(stopAfter int64) (finished bool) {
		c, _, err := OpenCursor(filepath.Join(dir, "cursor"), 42, size)
		if err != nil {
			t.Fatal(err)
		}
		var sinceSave int64
		for off, n := range bm.Runs(c.Next, mib) {
			if stopAfter >= 0 && sent >= stopAfter {
				return false // killed: unsaved progress is lost
			}
			for o := off; o < off+n; o += chunk {
				target[o] = true
			}
			sent += n
			c.Advance(off+n, n)
			if sinceSave += n; sinceSave >= 4*mib {
				if err := c.Save(); err != nil {
					t.Fatal(err)
				}
				sinceSave = 0
			}
		}
		return c.Remove() == nil
	}
	if run(dirty / 2) {
		t.Fatal("first run finished; the test must interrupt it")
	}
	if !run(-1) {
		t.Fatal("resumed run did not finish")
	}
	for off := range bm.Runs(0, chunk) {
		if !target[off] {
			t.Fatalf("chunk at %d never sent", off)
		}
	}
	t.Logf("dirty %d MiB, sent %d MiB (%.2fx)", dirty/mib, sent/mib, float64(sent)/float64(dirty))
	if float64(sent) > 1.2*float64(dirty) {
		t.Fatalf("sent %d bytes for %d dirty: more than 1.2x", sent, dirty)
	}
	// Without the cursor the second run would have restarted from 0.
	if sent < dirty {
		t.Fatal("sent less than dirty: test broken")
	}
}

func FuzzCursor(f *testing.F) {
	c := &Cursor{ID: 1, Next: 10, Sent: 20, Total: 30}
	b, _ := c.MarshalBinary()
	f.Add(b)
	f.Fuzz(func(t *testing.T, b []byte) {
		var c Cursor
		if err := c.UnmarshalBinary(b); err != nil {
			return
		}
		again, _ := c.MarshalBinary()
		if !bytes.Equal(again, b) {
			t.Fatal("decode∘encode is not the identity")
		}
	})
}
