package monitor

import (
	"context"
	"errors"
	"sync"
	"testing"
	"testing/synctest"
	"time"
)

const ms = time.Millisecond

func mustNew(t *testing.T, cfg Config, paths ...string) *Monitor {
	t.Helper()
	m, err := New(cfg, paths, 1000*ms)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

func expect(t *testing.T, m *Monitor, now time.Duration, want State) *Change {
	t.Helper()
	ch := m.Tick(now)
	if got := m.State(); got != want {
		t.Fatalf("at %v: state %v, want %v (change %v)", now, got, want, ch)
	}
	return ch
}

func TestDownExactlyAtTimeout(t *testing.T) {
	m := mustNew(t, Config{Interval: 100 * ms, Missed: 3}, "repl")
	expect(t, m, 1000*ms, Unknown)
	m.Observe("repl", Sample{LastSeen: 1100 * ms, Packets: 1})
	ch := expect(t, m, 1100*ms, Up)
	if ch == nil || ch.From != Unknown || ch.To != Up || ch.Path != "repl" {
		t.Fatalf("change %+v", ch)
	}
	m.Observe("repl", Sample{LastSeen: 1200 * ms, Packets: 2})
	if got := m.TimeToFail(1250 * ms); got != 250*ms {
		t.Fatalf("time to fail %v, want 250ms", got)
	}
	if ch := expect(t, m, 1500*ms-1, Up); ch != nil {
		t.Fatalf("spurious change %v", ch)
	}
	if got := m.TimeToFail(1500*ms - 1); got != 1 {
		t.Fatalf("time to fail %v, want 1ns", got)
	}
	ch = expect(t, m, 1500*ms, Down)
	if ch.From != Up || ch.Silence != 300*ms || ch.LastSeen != 1200*ms || ch.At != 1500*ms {
		t.Fatalf("change %+v", ch)
	}
	if m.TimeToFail(1600*ms) != 0 {
		t.Fatal("time to fail not zero when down")
	}
	if ch := m.Tick(1600 * ms); ch != nil {
		t.Fatalf("second down change %v", ch)
	}
}

func TestNeverSeenIsDownAfterTimeout(t *testing.T) {
	m := mustNew(t, Config{}, "a") // defaults: 250ms × 8
	if got := m.Config().Timeout(); got != 2*time.Second {
		t.Fatalf("default timeout %v", got)
	}
	expect(t, m, 2999*ms, Unknown)
	ch := expect(t, m, 3000*ms, Down)
	if ch.From != Unknown || ch.Silence != 2*time.Second {
		t.Fatalf("change %+v", ch)
	}
}

func TestEveryPathMustBeSilent(t *testing.T) {
	m := mustNew(t, Config{Interval: 50 * ms, Missed: 3}, "repl", "service")
	m.Observe("repl", Sample{LastSeen: 1000 * ms, Packets: 1})
	m.Observe("service", Sample{LastSeen: 1000 * ms, Packets: 1})
	expect(t, m, 1000*ms, Up)
	// The replication path dies; the service path keeps going.
	for now := 1050 * ms; now <= 2000*ms; now += 50 * ms {
		m.Observe("service", Sample{LastSeen: now, Packets: uint64(now / ms)})
		expect(t, m, now+10*ms, Up)
	}
	ps := m.Paths(2000 * ms)
	if !ps[0].Silent || ps[1].Silent || ps[1].LastSeen != 2000*ms {
		t.Fatalf("paths %+v", ps)
	}
	// Now the service path dies too: down 150 ms after its last packet.
	expect(t, m, 2150*ms-1, Up)
	ch := expect(t, m, 2150*ms, Down)
	if ch.Silence != 150*ms {
		t.Fatalf("change %+v", ch)
	}
}

func TestRiseHysteresis(t *testing.T) {
	m := mustNew(t, Config{Interval: 100 * ms, Missed: 3, Rise: 3}, "a", "b")
	m.Observe("a", Sample{LastSeen: 1000 * ms, Packets: 1})
	expect(t, m, 1000*ms, Up)
	expect(t, m, 1300*ms, Down)

	// Two packets, then a gap of more than two intervals: not up, and the
	// run starts again.
	m.Observe("a", Sample{LastSeen: 2000 * ms, Packets: 2})
	expect(t, m, 2000*ms, Down)
	m.Observe("a", Sample{LastSeen: 2100 * ms, Packets: 3})
	expect(t, m, 2100*ms, Down)
	expect(t, m, 2301*ms, Down) // run broken: 201ms without a packet
	m.Observe("a", Sample{LastSeen: 2400 * ms, Packets: 4})
	expect(t, m, 2400*ms, Down)
	m.Observe("a", Sample{LastSeen: 2500 * ms, Packets: 5})
	expect(t, m, 2500*ms, Down)
	// One packet on each path is not a run of three on one path.
	m.Observe("b", Sample{LastSeen: 2550 * ms, Packets: 1})
	expect(t, m, 2550*ms, Down)
	m.Observe("a", Sample{LastSeen: 2600 * ms, Packets: 6})
	ch := expect(t, m, 2600*ms, Up)
	if ch.From != Down || ch.Path != "a" {
		t.Fatalf("change %+v", ch)
	}
}

func TestRiseCountsPacketsBetweenSamples(t *testing.T) {
	m := mustNew(t, Config{Interval: 100 * ms, Missed: 3, Rise: 3}, "a")
	expect(t, m, 1300*ms, Down)
	m.Observe("a", Sample{LastSeen: 2000 * ms, Packets: 3}) // three arrived since the last poll
	expect(t, m, 2000*ms, Up)
}

func TestStaleAndResetSamples(t *testing.T) {
	m := mustNew(t, Config{Interval: 100 * ms, Missed: 3, Rise: 2}, "a")
	m.Observe("a", Sample{LastSeen: 1000 * ms, Packets: 10})
	expect(t, m, 1000*ms, Up)
	expect(t, m, 1300*ms, Down)
	// Replaying the same sample is no traffic.
	for range 5 {
		m.Observe("a", Sample{LastSeen: 1000 * ms, Packets: 10})
	}
	expect(t, m, 1400*ms, Down)
	// The probe restarted: counters start again from 1.
	m.Observe("a", Sample{LastSeen: 1500 * ms, Packets: 1})
	expect(t, m, 1500*ms, Down)
	m.Observe("a", Sample{LastSeen: 1600 * ms, Packets: 2})
	expect(t, m, 1600*ms, Up)
	// A sample newer than the tick's clock (packet between clock read and sample).
	m.Observe("a", Sample{LastSeen: 1905 * ms, Packets: 3})
	expect(t, m, 1900*ms, Up)
	if got := m.TimeToFail(1900 * ms); got != 305*ms {
		t.Fatalf("time to fail %v", got)
	}
}

func TestConfigAndPaths(t *testing.T) {
	for _, c := range []Config{{Interval: ms}, {Missed: -1}, {Rise: -2}} {
		if _, err := New(c, []string{"a"}, 0); err == nil {
			t.Errorf("config %+v accepted", c)
		}
	}
	if _, err := New(Config{}, nil, 0); err == nil {
		t.Error("no path accepted")
	}
	if _, err := New(Config{}, []string{"a", "a"}, 0); err == nil {
		t.Error("duplicate path accepted")
	}
	m := mustNew(t, Config{}, "a")
	if err := m.Observe("b", Sample{}); !errors.Is(err, ErrUnknownPath) {
		t.Errorf("unknown path: %v", err)
	}
}

// TestWatch drives Watch with fake time: heartbeats every 100 ms until 1 s,
// then silence. Watch must wake exactly at the deadline.
func TestWatch(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		t0 := time.Now()
		now := func() time.Duration { return time.Since(t0) + time.Hour } // monotonic-like, non-zero
		m, err := New(Config{Interval: 100 * ms, Missed: 3, Rise: 2}, []string{"p"}, now())
		if err != nil {
			t.Fatal(err)
		}
		var mu sync.Mutex
		var last time.Duration
		var n uint64
		ctx, cancel := context.WithCancel(t.Context())
		go func() { // the peer: heartbeats at 0, 100, ..., 1000 ms
			for i := 0; i <= 10; i++ {
				mu.Lock()
				last, n = now(), n+1
				mu.Unlock()
				time.Sleep(100 * ms)
			}
		}()
		var changes []Change
		done := make(chan error)
		go func() {
			done <- Watch(ctx, m, now, func(string) (Sample, error) {
				mu.Lock()
				defer mu.Unlock()
				return Sample{LastSeen: last, Packets: n}, nil
			}, func(c Change) {
				changes = append(changes, c)
				if c.To == Down {
					cancel()
				}
			})
		}()
		if err := <-done; err != nil {
			t.Fatal(err)
		}
		if len(changes) != 2 || changes[0].To != Up || changes[1].To != Down {
			t.Fatalf("changes %v", changes)
		}
		if got, want := changes[1].At-time.Hour, 1300*ms; got != want {
			t.Fatalf("down at %v, want %v (silence %v)", got, want, changes[1].Silence)
		}
		if changes[1].Silence != 300*ms {
			t.Fatalf("silence %v", changes[1].Silence)
		}
	})
}

// TestPeerEpoch: the monitor keeps the highest epoch any path's samples
// announced, whatever the order and whether or not the sample is new.
func TestPeerEpoch(t *testing.T) {
	m := mustNew(t, Config{Interval: 100 * ms, Missed: 3}, "repl", "app")
	if m.PeerEpoch() != 0 {
		t.Fatalf("epoch %d before any sample", m.PeerEpoch())
	}
	m.Observe("repl", Sample{LastSeen: 1100 * ms, Packets: 1, PeerEpoch: 3})
	m.Observe("app", Sample{LastSeen: 1100 * ms, Packets: 1, PeerEpoch: 4})
	m.Observe("repl", Sample{LastSeen: 1100 * ms, Packets: 1, PeerEpoch: 2})
	if m.PeerEpoch() != 4 {
		t.Fatalf("epoch %d, want 4", m.PeerEpoch())
	}
}
