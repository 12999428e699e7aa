package replstate

import (
	"bytes"
	"context"
	"io"
	"net"
	"os"
	"path/filepath"
	"testing"

	"github.com/doppelha/doppel/blockdev"
	"github.com/doppelha/doppel/daemon/repl/wire"
)

// TestPeekDirty: the dirty bytes read from a closed state are what the
// engine counts when it opens that state again, and reading them changes
// no file of it.
func TestPeekDirty(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "web.repl")
	if n, err := PeekDirty(dir); n != 0 || err != nil {
		t.Fatalf("no state: %d, %v", n, err)
	}
	vol := filepath.Join(t.TempDir(), "vol.img")
	open := func() (*Source, blockdev.Backend) {
		b, err := blockdev.Open(vol, 8<<20)
		if err != nil {
			t.Fatal(err)
		}
		s, err := OpenSource(SourceConfig{Dir: dir, Backend: b, Mode: wire.ModeAsync, Force: true,
			Dial: func(context.Context) (net.Conn, error) { return nil, net.ErrClosed }})
		if err != nil {
			t.Fatal(err)
		}
		return s, b
	}
	s, b := open()
	// Not running: writes are tracked for a later resync.
	for _, off := range []int64{0, 1 << 20, 5<<20 + 4096} {
		if err := s.Apply(context.Background(), &blockdev.Mutation{Op: blockdev.OpWrite, Offset: off, Length: 8192, Data: make([]byte, 8192)}); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	b.(io.Closer).Close()
	files := func() map[string][]byte {
		m := map[string][]byte{}
		for _, f := range []string{BitmapFile, LogFile} {
			m[f], _ = os.ReadFile(filepath.Join(dir, f))
		}
		return m
	}
	before := files()
	n, err := PeekDirty(dir)
	if err != nil {
		t.Fatal(err)
	}
	for f, b := range files() {
		if !bytes.Equal(b, before[f]) {
			t.Fatalf("peek changed %s", f)
		}
	}
	s, b = open()
	defer b.(io.Closer).Close()
	defer s.Close()
	want := s.Status().OpenDirtyBytes
	t.Logf("peeked %d dirty bytes; the engine counts %d at open", n, want)
	if n != want || n < 3*(64<<10) {
		t.Fatalf("peeked %d dirty bytes, the engine counts %d (want ≥ 3 chunks)", n, want)
	}
}
