package agent

import (
	"bytes"
	"context"
	"net"
	"os"
	"path/filepath"
	"testing"

	"github.com/doppelha/doppel/blockdev"
	"github.com/doppelha/doppel/daemon/repl/wire"
	"github.com/doppelha/doppel/daemon/replstate"
)

// TestPeekDirty: the dirty bytes read from a closed state are what the
// engine counts when it opens that state again, and reading them changes
// no file of it.
func TestPeekDirty(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "web.repl")
	if n, err := peekDirty(dir); n != 0 || err != nil {
		t.Fatalf("no state: %d, %v", n, err)
	}
	vol := filepath.Join(t.TempDir(), "vol.img")
	open := func() (*replstate.Source, blockdev.Backend) {
		b, err := blockdev.Open(vol, 8<<20)
		if err != nil {
			t.Fatal(err)
		}
		s, err := replstate.OpenSource(replstate.SourceConfig{Dir: dir, Backend: b, Mode: wire.ModeAsync, Force: true,
			Dial: func(context.Context) (net.Conn, error) { return nil, net.ErrClosed }})
		if err != nil {
			t.Fatal(err)
		}
		return s, b
	}
	s, b := open()
	// Not running: writes are tracked for a later resync.
	for _, off := range []int64{0, 1 << 20, 5<<20 + 4096} {
		writeAt(t, s, off, 8192)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	closeBackend(b)
	files := func() map[string][]byte {
		m := map[string][]byte{}
		for _, f := range []string{replstate.BitmapFile, replstate.LogFile} {
			m[f], _ = os.ReadFile(filepath.Join(dir, f))
		}
		return m
	}
	before := files()
	n, err := peekDirty(dir)
	if err != nil {
		t.Fatal(err)
	}
	for f, b := range files() {
		if !bytes.Equal(b, before[f]) {
			t.Fatalf("peek changed %s", f)
		}
	}
	s, b = open()
	defer closeBackend(b)
	defer s.Close()
	want := s.Status().OpenDirtyBytes
	t.Logf("peeked %d dirty bytes; the engine counts %d at open", n, want)
	if n != want || n < 3*(64<<10) {
		t.Fatalf("peeked %d dirty bytes, the engine counts %d (want ≥ 3 chunks)", n, want)
	}
}

func TestChunkSet(t *testing.T) {
	var c chunkSet
	c.add(0, 1)
	c.add(4096, 4096)    // same chunk
	c.add(65536-1, 2)    // chunks 0 and 1
	c.add(10<<16, 3<<16) // chunks 10, 11, 12
	c.add(20<<16, 0)     // nothing
	if got := c.bytes(); got != 5<<16 {
		t.Fatalf("%d bytes, want 5 chunks", got)
	}
	c.reset()
	if c.bytes() != 0 {
		t.Fatal("reset kept chunks")
	}
}
