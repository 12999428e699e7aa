package blockdev

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/doppelha/doppel/blockdev/nbdclient"
	"github.com/doppelha/doppel/blockdev/nbdproto"
)

// memBackend is an in-memory Backend with Trim and WriteZeroes, whose
// operations can be made to fail, block or panic by tests.
type memBackend struct {
	mu    sync.RWMutex
	data  []byte
	syncs atomic.Int64

	// hook, when set, runs before every operation; a non-nil error fails it.
	hook func(op string, off int64, n int) error
}

func newMem(size int) *memBackend { return &memBackend{data: make([]byte, size)} }

func (m *memBackend) run(op string, off int64, n int) error {
	if m.hook != nil {
		return m.hook(op, off, n)
	}
	return nil
}

func (m *memBackend) ReadAt(p []byte, off int64) (int, error) {
	if err := m.run("read", off, len(p)); err != nil {
		return 0, err
	}
	m.mu.RLock()
	defer m.mu.RUnlock()
	return copy(p, m.data[off:]), nil
}

func (m *memBackend) WriteAt(p []byte, off int64) (int, error) {
	if err := m.run("write", off, len(p)); err != nil {
		return 0, err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	return copy(m.data[off:], p), nil
}

func (m *memBackend) Size() int64 { return int64(len(m.data)) }

func (m *memBackend) Sync() error {
	if err := m.run("sync", 0, 0); err != nil {
		return err
	}
	m.syncs.Add(1)
	return nil
}

func (m *memBackend) Trim(off, n int64) error {
	if err := m.run("trim", off, int(n)); err != nil {
		return err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	clear(m.data[off : off+n])
	return nil
}

func (m *memBackend) WriteZeroes(off, n int64, noHole bool) error {
	if err := m.run("zero", off, int(n)); err != nil {
		return err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	clear(m.data[off : off+n])
	return nil
}

func (m *memBackend) bytes(off, n int) []byte {
	m.mu.RLock()
	defer m.mu.RUnlock()
	return append([]byte(nil), m.data[off:off+n]...)
}

// testLogger writes server logs to the test log.
func testLogger(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(tWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type tWriter struct{ t testing.TB }

func (w tWriter) Write(p []byte) (int, error) {
	w.t.Helper()
	w.t.Log(string(p[:len(p)-1]))
	return len(p), nil
}

// served is a server listening on a unix socket for one test.
type served struct {
	srv    *Server
	sock   string
	cancel context.CancelFunc
	done   chan error
}

// serve starts a server for exports on a fresh unix socket; it is shut down
// in t.Cleanup (and must return nil).
func serve(t testing.TB, exports ...Export) *served {
	t.Helper()
	srv, err := NewServer(testLogger(t), exports...)
	if err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(shortTempDir(t), "nbd.sock")
	l, err := Listen("unix:" + sock)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	s := &served{srv: srv, sock: sock, cancel: cancel, done: make(chan error, 1)}
	go func() { s.done <- srv.Serve(ctx, l) }()
	t.Cleanup(func() {
		if err := s.stop(); err != nil {
			t.Errorf("Serve returned %v", err)
		}
	})
	return s
}

func (s *served) stop() error {
	s.cancel()
	select {
	case err := <-s.done:
		s.done <- err
		return err
	case <-time.After(20 * time.Second):
		return errors.New("Serve did not return within 20 s of cancel")
	}
}

// shortTempDir is a temp dir with a path short enough for a unix socket.
func shortTempDir(t testing.TB) string {
	d, err := os.MkdirTemp("", "nbdt")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}

func (s *served) dial(t testing.TB, name string) *nbdclient.Client {
	t.Helper()
	c, err := nbdclient.Dial("unix", s.sock, name)
	if err != nil {
		t.Fatalf("dial %q: %v", name, err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// raw connects and completes the handshake, returning the bare connection.
func (s *served) raw(t testing.TB) net.Conn {
	t.Helper()
	c, err := net.Dial("unix", s.sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(30 * time.Second))
	if _, err := nbdproto.Handshake(c); err != nil {
		t.Fatal(err)
	}
	return c
}

// rawGo is raw plus NBD_OPT_GO for name: the connection is in transmission.
func (s *served) rawGo(t testing.TB, name string) net.Conn {
	t.Helper()
	c := s.raw(t)
	if _, err := nbdproto.Info(c, name, true); err != nil {
		t.Fatal(err)
	}
	return c
}

func wantErrno(t testing.TB, err error, want syscall.Errno) {
	t.Helper()
	var ne *nbdclient.Error
	if !errors.As(err, &ne) || ne.Errno != want {
		t.Fatalf("got error %v, want NBD error %v", err, want)
	}
}

// expectClosed reads from c until EOF (or reset), failing on data or timeout.
func expectClosed(t testing.TB, c net.Conn) {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	var b [64]byte
	for {
		n, err := c.Read(b[:])
		if err != nil {
			if errors.Is(err, os.ErrDeadlineExceeded) {
				t.Fatal("connection not closed by the server")
			}
			return
		}
		if n > 0 {
			t.Fatalf("unexpected %d bytes before close: %x", n, b[:n])
		}
	}
}
