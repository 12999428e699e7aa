package repl

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"io"
	"log/slog"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/doppelha/doppel/daemon/tlspin"
)

func TestRouteRoundTrip(t *testing.T) {
	for _, name := range []string{"a", "web", strings.Repeat("x", 255)} {
		var b bytes.Buffer
		if err := WriteRoute(&b, name); err != nil {
			t.Fatal(err)
		}
		b.WriteString("rest")
		got, err := ReadRoute(&b)
		if err != nil || got != name || b.String() != "rest" {
			t.Fatalf("%q: got %q, %v, rest %q", name, got, err, b.String())
		}
	}
	for _, name := range []string{"", strings.Repeat("x", 256)} {
		if err := WriteRoute(io.Discard, name); !errors.Is(err, ErrRoute) {
			t.Fatalf("name of %d bytes: %v", len(name), err)
		}
	}
}

func FuzzReadRoute(f *testing.F) {
	var b bytes.Buffer
	WriteRoute(&b, "web")
	f.Add(b.Bytes())
	f.Add([]byte("DMUX\x01\x00"))
	f.Add([]byte("DMUX\x02\x03web"))
	f.Add([]byte("DMUX\x01\xffab"))
	f.Add([]byte("DPRS{}"))
	f.Fuzz(func(t *testing.T, in []byte) {
		name, err := ReadRoute(bytes.NewReader(in))
		if err != nil {
			if !errors.Is(err, ErrRoute) {
				t.Fatalf("error %v does not wrap ErrRoute", err)
			}
			return
		}
		var out bytes.Buffer
		if err := WriteRoute(&out, name); err != nil || !bytes.HasPrefix(in, out.Bytes()) {
			t.Fatalf("%q decoded as %q, which encodes as %q (%v)", in, name, out.Bytes(), err)
		}
	})
}

type muxPeer struct {
	cert tls.Certificate
	fp   string
}

func newMuxPeer(t *testing.T) muxPeer {
	cert, fp, err := LoadOrCreateCert(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	return muxPeer{cert, fp}
}

// TestMuxRoutesByJobAndPin: one listener, two jobs pinning different
// sources; a connection reaches a job's target only when it names the job
// and comes from the peer that job pins.
func TestMuxRoutesByJobAndPin(t *testing.T) {
	agent, srcA, srcB, stranger := newMuxPeer(t), newMuxPeer(t), newMuxPeer(t), newMuxPeer(t)
	var logs bytes.Buffer
	var logMu sync.Mutex
	log := slog.New(slog.NewTextHandler(writerFunc(func(p []byte) (int, error) {
		logMu.Lock()
		defer logMu.Unlock()
		return logs.Write(p)
	}), nil))
	m := NewMux(agent.cert, log)
	got := make(chan string, 16)
	serve := func(job string) func(context.Context, net.Conn) error {
		return func(ctx context.Context, c net.Conn) error {
			defer c.Close()
			b := make([]byte, 5)
			if _, err := io.ReadFull(c, b); err != nil {
				return err
			}
			got <- job + ":" + string(b)
			c.Write([]byte("ok"))
			<-ctx.Done() // a session lasts until its job stops
			return nil
		}
	}
	removeA, err := m.Handle("a", srcA.fp, serve("a"))
	if err != nil {
		t.Fatal(err)
	}
	removeB, err := m.Handle("b", srcB.fp, serve("b"))
	if err != nil {
		t.Fatal(err)
	}
	defer removeB()
	if _, err := m.Handle("a", srcB.fp, serve("a")); err == nil {
		t.Fatal("a second target for job a was accepted")
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- m.Serve(ctx, l) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
	}()

	dial := func(p muxPeer, route string, payload string) (net.Conn, error) {
		cfg, err := tlspin.ClientConfig(&p.cert, agent.fp)
		if err != nil {
			t.Fatal(err)
		}
		c, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", l.Addr().String(), cfg)
		if err != nil {
			return nil, err
		}
		if route != "" {
			if err := WriteRoute(c, route); err != nil {
				c.Close()
				return nil, err
			}
		}
		c.Write([]byte(payload))
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		b := make([]byte, 2)
		if _, err := io.ReadFull(c, b); err != nil {
			c.Close()
			return nil, err
		}
		return c, nil
	}
	expect := func(want string) {
		t.Helper()
		select {
		case g := <-got:
			if g != want {
				t.Fatalf("served %q, want %q", g, want)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("nothing served, want %q", want)
		}
	}
	ca, err := dial(srcA, "a", "hello")
	if err != nil {
		t.Fatalf("A to job a: %v", err)
	}
	expect("a:hello")
	cb, err := dial(srcB, "b", "world")
	if err != nil {
		t.Fatalf("B to job b: %v", err)
	}
	expect("b:world")
	// Refused, nothing served: A feeding job b, an unknown job, a
	// stranger's certificate.
	for _, tc := range []struct {
		name  string
		p     muxPeer
		route string
		log   string
	}{
		{"A to job b", srcA, "b", "not the one this job pins"},
		{"unknown job", srcA, "nope", "no target job of that name"},
		{"stranger", stranger, "a", ""},
	} {
		if c, err := dial(tc.p, tc.route, "XXXXX"); err == nil {
			c.Close()
			t.Fatalf("%s: served", tc.name)
		}
		if tc.log != "" {
			logMu.Lock()
			l := logs.String()
			logMu.Unlock()
			if !strings.Contains(l, tc.log) || !strings.Contains(l, "nothing applied") {
				t.Fatalf("%s: log lacks %q:\n%s", tc.name, tc.log, l)
			}
		}
	}
	select {
	case g := <-got:
		t.Fatalf("a refused connection was served: %q", g)
	default:
	}
	// No preamble (doppel repl source): the job pinning the peer.
	cl, err := dial(srcB, "", "plain")
	if err != nil {
		t.Fatalf("B without a preamble: %v", err)
	}
	expect("b:plain")
	cl.Close()
	// Removing job a ends its session and waits for it; b's goes on.
	removed := make(chan struct{})
	go func() { removeA(); close(removed) }()
	select {
	case <-removed:
	case <-time.After(5 * time.Second):
		t.Fatal("remove did not end job a's session")
	}
	ca.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := ca.Read(make([]byte, 1)); err == nil {
		t.Fatal("job a's session still open after remove")
	}
	ca.Close()
	if m.Routes() != 1 {
		t.Fatalf("%d routes after removing a", m.Routes())
	}
	cb.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
	if _, err := cb.Read(make([]byte, 1)); !isTimeout(err) {
		t.Fatalf("job b's session ended with job a: %v", err)
	}
	cb.Close()
	if c, err := dial(srcA, "a", "again"); err == nil {
		c.Close()
		t.Fatal("job a served after remove")
	}
}

type writerFunc func([]byte) (int, error)

func (f writerFunc) Write(p []byte) (int, error) { return f(p) }

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}
