package replstate

import (
	"context"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"testing"

	"github.com/doppelha/doppel/blockdev"
	"github.com/doppelha/doppel/daemon/generation"
	"github.com/doppelha/doppel/daemon/repl"
	"github.com/doppelha/doppel/daemon/repl/wire"
)

// TestRollbackTarget: the chunks a rollback rewrites are this side's dirty
// chunks when it opens as the promoted source (what the reverse resyncs
// to the old source), marked before the volume is written (a roll that
// fails after marking keeps them marked, and the generation
// inconsistent); a target interrupted inside a resync is consistent
// after the rollback, and the promoted source opens without force.
func TestRollbackTarget(t *testing.T) {
	const size, chunk = 8 << 20, repl.DefaultChunkSize
	dir := filepath.Join(t.TempDir(), "web.repl")
	src := generation.NewSource()
	mid := generation.State{}
	mid.BeginResync(src) // a target inside a resync
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := saveGen(dir, mid); err != nil {
		t.Fatal(err)
	}
	err := RollbackTarget(dir, size, chunk, 0, func(mark func([]int64) error) error {
		if err := mark([]int64{3}); err != nil {
			return err
		}
		return errors.New("write failed")
	})
	if err == nil {
		t.Fatal("a failed roll was not reported")
	}
	if st, _, _ := loadGen(dir); st.Data != generation.Inconsistent {
		t.Fatalf("after a failed roll: %v, want inconsistent", st)
	}
	if err := RollbackTarget(dir, size, chunk, 0, func(mark func([]int64) error) error { return mark([]int64{5, 9}) }); err != nil {
		t.Fatal(err)
	}
	st, _, _ := loadGen(dir)
	if st.Data != generation.Consistent || st.Current != src.Current {
		t.Fatalf("after the rollback: %v, want %016x consistent", st, src.Current)
	}
	vol := filepath.Join(t.TempDir(), "vol.img")
	b, err := blockdev.Open(vol, size)
	if err != nil {
		t.Fatal(err)
	}
	defer b.(io.Closer).Close()
	s, err := OpenSource(SourceConfig{Dir: dir, Backend: b, Mode: wire.ModeAsync,
		Dial: func(context.Context) (net.Conn, error) { return nil, net.ErrClosed }})
	if err != nil {
		t.Fatalf("promote after the rollback (no force): %v", err)
	}
	defer s.Close()
	for _, c := range []int64{3, 5, 9} {
		if !s.bm.IsDirty(c*chunk, chunk) {
			t.Errorf("chunk %d is not dirty in the promoted source's bitmap", c)
		}
	}
	if got := s.bm.DirtyChunks(); got != 3 {
		t.Errorf("%d dirty chunks, want 3", got)
	}
	if !s.gens.state.Knows(src.Current) {
		t.Errorf("the promoted generation %v lost the old source's %016x", s.gens.state, src.Current)
	}

	// A consistent target whose roll fails after its first mark is
	// inconsistent until a roll completes.
	if err := saveGen(dir, generation.State{Current: src.Current, Side: generation.SideTarget, Data: generation.Consistent}); err != nil {
		t.Fatal(err)
	}
	err = RollbackTarget(dir, size, chunk, 0, func(mark func([]int64) error) error {
		if err := mark([]int64{1}); err != nil {
			return err
		}
		return errors.New("write failed halfway")
	})
	if err == nil {
		t.Fatal("a failed roll was not reported")
	}
	if st, _, _ := loadGen(dir); st.Data != generation.Inconsistent {
		t.Fatalf("a consistent target after a failed roll: %v, want inconsistent", st)
	}
	if err := RollbackTarget(dir, size, chunk, 0, func(mark func([]int64) error) error { return mark([]int64{1}) }); err != nil {
		t.Fatal(err)
	}
	if st, _, _ := loadGen(dir); st.Data != generation.Consistent {
		t.Fatalf("after the retry: %v, want consistent", st)
	}
}
