package repl

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/doppelha/doppel/blockdev"
	"github.com/doppelha/doppel/blockdev/nbdclient"
	"github.com/doppelha/doppel/daemon/repl/wire"
)

// memBackend is an in-memory Backend with Trim and WriteZeroes.
type memBackend struct {
	mu    sync.RWMutex
	data  []byte
	syncs atomic.Int64
}

func newMem(size int) *memBackend { return &memBackend{data: make([]byte, size)} }

func (m *memBackend) ReadAt(p []byte, off int64) (int, error) {
	m.mu.RLock()
	defer m.mu.RUnlock()
	if off >= int64(len(m.data)) {
		return 0, errors.New("read beyond end")
	}
	n := copy(p, m.data[off:])
	if n < len(p) {
		return n, errors.New("short read")
	}
	return n, nil
}

func (m *memBackend) WriteAt(p []byte, off int64) (int, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if off+int64(len(p)) > int64(len(m.data)) {
		return 0, errors.New("write beyond end")
	}
	return copy(m.data[off:], p), nil
}

func (m *memBackend) Size() int64 { return int64(len(m.data)) }
func (m *memBackend) Sync() error { m.syncs.Add(1); return nil }

func (m *memBackend) Trim(off, length int64) error { return m.WriteZeroes(off, length, false) }

func (m *memBackend) WriteZeroes(off, length int64, _ bool) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	clear(m.data[off : off+length])
	return nil
}

func (m *memBackend) snapshot() []byte {
	m.mu.RLock()
	defer m.mu.RUnlock()
	return bytes.Clone(m.data)
}

// testLog returns a logger that writes to the test log and a copy of the
// lines for assertions.
type logBuf struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (l *logBuf) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.Write(p)
}

func (l *logBuf) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.String()
}

func testLogger(t testing.TB) (*slog.Logger, *logBuf) {
	lb := &logBuf{}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("engine log:\n%s", lb.String())
		}
	})
	return slog.New(slog.NewTextHandler(lb, &slog.HandlerOptions{Level: slog.LevelDebug})), lb
}

// pair is a source and a target connected over loopback TCP.
type pair struct {
	src    *Stream
	tgt    *Applier
	srcB   blockdev.Backend
	tgtB   blockdev.Backend
	addr   string
	log    *logBuf
	cancel context.CancelFunc
	runErr chan error
	once   sync.Once
}

type pairOpts struct {
	mode  wire.Mode
	queue Backlog
	codec string
	chunk int64
	dial  func(ctx context.Context, addr string) (net.Conn, error)
	rate  int64
	// live and tgtLive configure the source's and the target's session
	// liveness.
	live, tgtLive Liveness
	// incomplete is the source's SourceConfig.Incomplete.
	incomplete func() bool
}

func startTarget(t testing.TB, ctx context.Context, b blockdev.Backend, log *slog.Logger, wrap func(net.Listener) net.Listener) (*Applier, string) {
	t.Helper()
	return startTargetLive(t, ctx, b, log, wrap, Liveness{})
}

func startTargetLive(t testing.TB, ctx context.Context, b blockdev.Backend, log *slog.Logger, wrap func(net.Listener) net.Listener, live Liveness) (*Applier, string) {
	t.Helper()
	tgt, err := NewApplier(ApplierConfig{Backend: b, StatePath: filepath.Join(t.TempDir(), "target.json"), Log: log, Liveness: live})
	if err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	if wrap != nil {
		l = wrap(l)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		tgt.Serve(ctx, l)
	}()
	t.Cleanup(func() { <-done })
	return tgt, l.Addr().String()
}

func newPair(t testing.TB, srcB, tgtB blockdev.Backend, o pairOpts) *pair {
	t.Helper()
	log, lb := testLogger(t)
	ctx, cancel := context.WithCancel(context.Background())
	tgt, addr := startTargetLive(t, ctx, tgtB, log.With("side", "target"), nil, o.tgtLive)
	codec, err := wire.NewCodec(o.codec)
	if err != nil {
		t.Fatal(err)
	}
	dial := func(ctx context.Context) (net.Conn, error) {
		if o.dial != nil {
			return o.dial(ctx, addr)
		}
		var d net.Dialer
		return d.DialContext(ctx, "tcp", addr)
	}
	src, err := NewStream(StreamConfig{Backend: srcB, Mode: o.mode, Backlog: o.queue, ChunkSize: o.chunk,
		Dial: dial, Codec: codec, RateLimit: o.rate, Log: log.With("side", "source"), Liveness: o.live, Incomplete: o.incomplete})
	if err != nil {
		t.Fatal(err)
	}
	p := &pair{src: src, tgt: tgt, srcB: srcB, tgtB: tgtB, addr: addr, log: lb, cancel: cancel, runErr: make(chan error, 1)}
	go func() { p.runErr <- src.Run(ctx) }()
	t.Cleanup(p.stop)
	return p
}

// stop stops the source and the target (idempotent).
func (p *pair) stop() {
	p.once.Do(func() {
		p.cancel()
		<-p.runErr
		p.src.Close()
		p.tgt.Close()
	})
}

// serveNBD serves src's backend through the NBD server with src as the
// Mutator on a unix socket, and returns its path.
func serveNBD(t *testing.T, b blockdev.Backend, m blockdev.Mutator) string {
	t.Helper()
	srv, err := blockdev.NewServer(nil, blockdev.Export{Name: "vol", Backend: b, Mutator: m})
	if err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(t.TempDir(), "nbd.sock")
	l, err := blockdev.Listen("unix:" + sock)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		srv.Serve(ctx, l)
	}()
	t.Cleanup(func() { cancel(); <-done })
	return sock
}

func dialNBD(t *testing.T, sock string) *nbdclient.Client {
	t.Helper()
	cl, err := nbdclient.Dial("unix", sock, "vol")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cl.Close() })
	return cl
}

// waitFor polls cond until it holds or d passes.
func waitFor(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// drain waits until the target applied everything the source sequenced.
func (p *pair) drain(t *testing.T) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if err := p.src.WaitAcked(ctx); err != nil {
		t.Fatalf("drain: %v", err)
	}
}

func firstDiff(a, b []byte) string {
	if len(a) != len(b) {
		return fmt.Sprintf("lengths %d and %d", len(a), len(b))
	}
	for i := range a {
		if a[i] != b[i] {
			return fmt.Sprintf("first difference at byte %d (%#x vs %#x)", i, a[i], b[i])
		}
	}
	return "equal"
}

func randBytes(r *rand.Rand, n int) []byte {
	b := make([]byte, n)
	for i := 0; i < n; i += 8 {
		v := r.Uint64()
		for j := 0; j < 8 && i+j < n; j++ {
			b[i+j] = byte(v >> (8 * j))
		}
	}
	return b
}
