package replstate

import (
	"encoding/json"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/doppelha/doppel/daemon/generation"
	"github.com/doppelha/doppel/daemon/repl"
)

// startPair starts a target (state in bDir, volume bFile) and a source of
// size bytes, each in a directory of its own under a temporary one.
func startPair(t *testing.T, size int64) (p *pair, bDir, bFile string) {
	dir := t.TempDir()
	bDir, bFile = filepath.Join(dir, "b"), filepath.Join(dir, "b.img")
	p = &pair{t: t, nw: &memNet{up: true}, size: size}
	p.startTarget(bDir, bFile, "")
	p.startSource(SourceConfig{Dir: filepath.Join(dir, "a")}, filepath.Join(dir, "a.img"))
	return p, bDir, bFile
}

// TestTargetConsistentIsBothHalves: a target's copy is consistent only
// when its generation (GenerationFile) and its applier (TargetFile) both
// say so. After a crash either alone can say inconsistent (a resync the
// handshake began; a mirror or resync batch inside the stream), and
// TargetStatus.Consistent, the answer the agent derives the job record's
// flag from, must then say inconsistent too.
func TestTargetConsistentIsBothHalves(t *testing.T) {
	const size = 1 << 20
	p, bDir, bFile := startPair(t, size)
	p.write(0, make([]byte, 4096))
	p.converge(20 * time.Second)
	if err := p.stopSource(); err != nil {
		t.Fatal(err)
	}
	p.stopTarget()
	gen, ok, err := loadGen(bDir)
	if err != nil || !ok {
		t.Fatalf("target generation: %v (found %t)", err, ok)
	}
	var applier repl.ApplierState
	raw, err := os.ReadFile(filepath.Join(bDir, TargetFile))
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(raw, &applier); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		gen, applier bool
	}{{true, true}, {false, true}, {true, false}, {false, false}} {
		g, a := gen.Clone(), applier
		g.Data, a.State = generation.Inconsistent, "inconsistent"
		if c.gen {
			g.Data = generation.Consistent
		}
		if c.applier {
			a.State = "consistent"
		}
		if err := saveGen(bDir, g); err != nil {
			t.Fatal(err)
		}
		b, _ := json.Marshal(a)
		if err := os.WriteFile(filepath.Join(bDir, TargetFile), b, 0o600); err != nil {
			t.Fatal(err)
		}
		tg, err := OpenTarget(TargetConfig{Dir: bDir, Backend: openFile(t, bFile, size)})
		if err != nil {
			t.Fatal(err)
		}
		st := tg.Status()
		tg.Close()
		if want := c.gen && c.applier; st.Consistent != want {
			t.Errorf("generation %s, applier %s: Consistent %t, want %t", st.Data, st.ApplierState, st.Consistent, want)
		}
		if st.Data != g.Data.String() || st.ApplierState != a.State {
			t.Errorf("status halves %s/%s, the files say %s/%s", st.Data, st.ApplierState, g.Data, a.State)
		}
	}
}
