package kernel

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
	"unsafe"

	"github.com/doppelha/doppel/blockdev"
	"golang.org/x/sys/unix"
)

// TestAttachHost attaches a real /dev/nbdN on hosts whose kernel has nbd
// (the development machines have none: there the VM tier covers it). The
// test process serves the device and does O_DIRECT I/O on it, which a real
// deployment must not do (page-cache writeback could deadlock), but direct
// I/O never goes through that cache.
func TestAttachHost(t *testing.T) {
	if testing.Short() {
		t.Skip("root tier skipped in -short mode")
	}
	if os.Geteuid() != 0 {
		t.Skip("needs root: nbd attach")
	}
	if err := Probe(t.Context()); errors.Is(err, ErrNoNBD) {
		t.Skipf("this kernel cannot attach nbd devices (TestAttachWithoutNBD checks the error; test/vm checks attach): %v", err)
	} else if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "disk")
	f, err := blockdev.OpenFile(path, 16<<20)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	srv, err := blockdev.NewServer(nil, blockdev.Export{Backend: f})
	if err != nil {
		t.Fatal(err)
	}
	d, err := Attach(t.Context(), Config{Serve: srv.ServeConn, Connections: 2, DeadConnTimeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	detached := false
	t.Cleanup(func() {
		if !detached {
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			d.Detach(ctx)
		}
	})
	sys := filepath.Join("/sys/block", filepath.Base(d.Path()))
	if b, _ := os.ReadFile(filepath.Join(sys, "queue", "write_cache")); strings.TrimSpace(string(b)) != "write back" {
		t.Errorf("write_cache %q, want write back", b)
	}
	if s, err := State(d.Index()); err != nil || s.Size != 16<<20 || s.PID == 0 {
		t.Errorf("state %+v, %v", s, err)
	}

	// Aligned buffers for O_DIRECT.
	aligned := func(n int) []byte {
		b := make([]byte, n+4096)
		off := int(-uintptr(unsafe.Pointer(&b[0])) & 4095)
		return b[off : off+n]
	}
	want := aligned(1 << 20)
	for i := range want {
		want[i] = byte(i*7 + i>>12)
	}
	dev, err := os.OpenFile(d.Path(), os.O_RDWR|unix.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := dev.WriteAt(want, 3<<20); err != nil {
		t.Fatal(err)
	}
	if err := dev.Sync(); err != nil {
		t.Fatal(err)
	}
	dev.Close()
	got := make([]byte, len(want))
	if _, err := f.ReadAt(got, 3<<20); err != nil || !bytes.Equal(got, want) {
		t.Errorf("backend does not hold what was written to %s (err %v)", d.Path(), err)
	}
	if st := srv.Stats(); st.Flushes == 0 || st.Writes == 0 {
		t.Errorf("counters after write+fsync: %+v", st)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	if err := d.Detach(ctx); err != nil {
		t.Fatal(err)
	}
	detached = true
	if s, err := State(d.Index()); err != nil || s.Busy() {
		t.Errorf("after detach: %+v, %v", s, err)
	}
}
