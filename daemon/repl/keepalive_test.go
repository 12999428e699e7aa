package repl

import (
	"context"
	"errors"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/doppelha/doppel/blockdev"
	"github.com/doppelha/doppel/daemon/repl/wire"
)

// blackholeProxy forwards TCP between the source and the target until it
// is frozen; from then on it reads and discards everything in both
// directions. Both TCP connections stay up (the proxy's kernel keeps
// acknowledging), so only the application's keepalive can notice: the
// silent peer of a blackholed link as the endpoints see it.
type blackholeProxy struct {
	addr   string
	frozen atomic.Bool
}

func startBlackholeProxy(t *testing.T, target string) *blackholeProxy {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &blackholeProxy{addr: l.Addr().String()}
	var wg sync.WaitGroup
	var mu sync.Mutex
	var conns []net.Conn
	t.Cleanup(func() {
		l.Close()
		mu.Lock()
		for _, c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	pipe := func(dst, src net.Conn) {
		defer wg.Done()
		buf := make([]byte, 64<<10)
		for {
			n, err := src.Read(buf)
			if n > 0 && !p.frozen.Load() {
				if _, werr := dst.Write(buf[:n]); werr != nil {
					return
				}
			}
			if err != nil {
				if !p.frozen.Load() {
					dst.Close()
				}
				return
			}
		}
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			u, err := net.Dial("tcp", target)
			if err != nil {
				c.Close()
				continue
			}
			mu.Lock()
			conns = append(conns, c, u)
			mu.Unlock()
			wg.Add(2)
			go pipe(u, c)
			go pipe(c, u)
		}
	}()
	return p
}

// recvCount counts OnRecv calls.
type recvCount struct{ n atomic.Int64 }

func (c *recvCount) inc() { c.n.Add(1) }

// TestKeepaliveBlackhole: after the link between source and target turns
// into a blackhole (nothing delivered, every TCP connection still up),
// both ends drop the session within the keepalive timeout. Without
// keepalives neither would ever notice.
func TestKeepaliveBlackhole(t *testing.T) {
	const timeout = 400 * time.Millisecond
	live := Liveness{Interval: 50 * time.Millisecond, Timeout: timeout}
	var proxy *blackholeProxy
	p := newPair(t, newMem(1<<20), newMem(1<<20), pairOpts{mode: wire.ModeSync, live: live, tgtLive: live,
		dial: func(ctx context.Context, addr string) (net.Conn, error) {
			if proxy == nil {
				proxy = startBlackholeProxy(t, addr)
			}
			var d net.Dialer
			return d.DialContext(ctx, "tcp", proxy.addr)
		}})
	waitFor(t, 5*time.Second, "connected", p.src.Connected)
	data := make([]byte, 4096)
	if err := p.src.Apply(context.Background(), &blockdev.Mutation{Op: blockdev.OpWrite, Length: 4096, Data: data}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 5*time.Second, "target session", func() bool { _, _, peer := p.tgt.Status(); return peer != "" })
	time.Sleep(3 * live.Interval) // idle: only keepalives flow

	// The clock is read before the freeze: a test descheduled in between
	// measures longer, never shorter.
	cut := time.Now()
	proxy.frozen.Store(true)
	var srcDown, tgtDown time.Duration
	for deadline := cut.Add(timeout + 5*time.Second); (srcDown == 0 || tgtDown == 0) && time.Now().Before(deadline); time.Sleep(2 * time.Millisecond) {
		if srcDown == 0 && !p.src.Connected() {
			srcDown = time.Since(cut)
		}
		if _, _, peer := p.tgt.Status(); tgtDown == 0 && peer == "" {
			tgtDown = time.Since(cut)
		}
	}
	t.Logf("blackhole detected after %v (source), %v (target); timeout %v", srcDown, tgtDown, timeout)
	for side, d := range map[string]time.Duration{"source": srcDown, "target": tgtDown} {
		switch {
		case d == 0:
			t.Errorf("%s: session still up %v after the blackhole (timeout %v)", side, timeout+5*time.Second, timeout)
		case d < timeout/2:
			t.Errorf("%s: session dropped %v after the blackhole, before half the %v timeout", side, d, timeout)
		case d > timeout+2*time.Second:
			t.Errorf("%s: session dropped %v after the blackhole, want within %v + 2 s of scheduling slack", side, d, timeout)
		}
	}
}

// TestKeepaliveIdleStaysUp: an idle healthy session is kept alive by
// keepalives (counted on both sides by OnRecv) and never dropped.
func TestKeepaliveIdleStaysUp(t *testing.T) {
	var srcRecv, tgtRecv recvCount
	p := newPair(t, newMem(1<<20), newMem(1<<20), pairOpts{mode: wire.ModeAsync,
		live:    Liveness{Interval: 50 * time.Millisecond, Timeout: time.Second, OnRecv: srcRecv.inc},
		tgtLive: Liveness{Interval: 50 * time.Millisecond, Timeout: time.Second, OnRecv: tgtRecv.inc}})
	waitFor(t, 5*time.Second, "connected", p.src.Connected)
	time.Sleep(3 * time.Second)
	if st := p.src.Stats(); !st.Connected || st.Connects != 1 {
		t.Fatalf("idle session: connected %v after %d connects; want one session kept up", st.Connected, st.Connects)
	}
	// 3 s at one keepalive per 50-100 ms: at least 20 each way.
	if s, g := srcRecv.n.Load(), tgtRecv.n.Load(); s < 20 || g < 20 {
		t.Fatalf("frames read in 3 s of idle session: source %d, target %d; want keepalives both ways", s, g)
	}
}

// TestKeepaliveVersion1Target: a target that speaks only protocol
// version 1 never receives a keepalive, and its silence is not taken for
// a dead session.
func TestKeepaliveVersion1Target(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	got := make(chan error, 1)
	go func() {
		c, err := l.Accept()
		if err != nil {
			got <- err
			return
		}
		defer c.Close()
		r := wire.NewReader(c)
		f, err := r.Read()
		if err != nil {
			got <- err
			return
		}
		h := f.(*wire.Hello)
		b, _ := wire.Encode(&wire.Welcome{Version: 1, VolumeSize: h.VolumeSize, State: wire.StateConsistent})
		c.Write(b)
		for {
			f, err := r.Read()
			if err != nil {
				got <- err
				return
			}
			if f.Type() == wire.TypeKeepalive {
				got <- errors.New("keepalive sent to a version 1 target")
				return
			}
		}
	}()
	log, _ := testLogger(t)
	src, err := NewStream(StreamConfig{Backend: newMem(1 << 20), Mode: wire.ModeAsync, Log: log,
		Liveness: Liveness{Interval: 20 * time.Millisecond, Timeout: 200 * time.Millisecond},
		Dial: func(ctx context.Context) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "tcp", l.Addr().String())
		}})
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- src.Run(ctx) }()
	waitFor(t, 5*time.Second, "connected", src.Connected)
	select {
	case err := <-got:
		t.Fatalf("fake version 1 target: %v", err)
	case <-time.After(time.Second): // five timeouts
	}
	if st := src.Stats(); !st.Connected || st.Connects != 1 {
		t.Fatalf("version 1 session: connected %v, %d connects", st.Connected, st.Connects)
	}
	cancel()
	<-done
	if err := <-got; err != nil && !errors.Is(err, io.EOF) && !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Fatalf("fake version 1 target: %v", err)
	}
}
