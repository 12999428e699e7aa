package blockdev

import (
	"context"
	"errors"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/doppelha/doppel/blockdev/nbdclient"
)

// failingListener accepts from a real listener until told to fail.
type failingListener struct {
	net.Listener
	fail chan struct{}
}

func (l *failingListener) Accept() (net.Conn, error) {
	select {
	case <-l.fail:
		return nil, errors.New("listener broke")
	default:
	}
	return l.Listener.Accept()
}

// A fatal accept error ends Serve even while a client stays connected.
func TestServeAcceptFailure(t *testing.T) {
	srv, err := NewServer(testLogger(t), Export{Name: "a", Backend: newMem(4096)})
	if err != nil {
		t.Fatal(err)
	}
	inner, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	l := &failingListener{Listener: inner, fail: make(chan struct{})}
	done := make(chan error, 1)
	go func() { done <- srv.Serve(context.Background(), l) }()
	cl, err := nbdclient.Dial("tcp", inner.Addr().String(), "a")
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	close(l.fail)
	// Wake the blocked Accept so it sees the failure.
	if c, err := net.Dial("tcp", inner.Addr().String()); err == nil {
		defer c.Close()
	}
	select {
	case err := <-done:
		if err == nil || !strings.Contains(err.Error(), "listener broke") {
			t.Fatalf("Serve = %v, want the accept error", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Serve did not return after a fatal accept error with a client connected")
	}
}

// Only a regular file served without a Mutator runs writes on the reader
// (export.serial): a Mutator (replication) or another backend keeps them
// concurrent.
func TestSerialExport(t *testing.T) {
	f, err := OpenFile(t.TempDir()+"/img", 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	s, err := NewServer(nil,
		Export{Name: "file", Backend: f},
		Export{Name: "mutated", Backend: f, Mutator: Direct(f)},
		Export{Name: "mem", Backend: newMem(1 << 20)})
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]bool{"file": true, "mutated": false, "mem": false}
	for _, x := range s.exports {
		if x.serial != want[x.Name] {
			t.Errorf("export %q: serial %v, want %v", x.Name, x.serial, want[x.Name])
		}
	}
}
