package resync

import (
	"context"
	"errors"
	"sync"
	"testing"
	"testing/synctest"
	"time"
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
