package replstate

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestBindSetsAsideForeignState: state of another job incarnation, of
// another volume, or without an identity is renamed aside (never
// deleted, never used); state of the same identity is kept.
func TestBindSetsAsideForeignState(t *testing.T) {
	log := testLog(t, "bind")
	id := Owner{Job: "job-1", Volume: "vol-1", Device: "file fsid=1 ino=2"}
	for _, tc := range []struct {
		name    string
		found   *Owner // nil: no identity file
		adopt   bool
		aside   bool
		wantWhy string
	}{
		{name: "same", found: &id},
		{name: "other job", found: &Owner{Job: "job-0", Volume: "vol-1", Device: id.Device}, aside: true},
		{name: "other volume", found: &Owner{Job: "job-1", Volume: "vol-0", Device: id.Device}, aside: true},
		{name: "other device", found: &Owner{Job: "job-1", Volume: "vol-1", Device: "file fsid=1 ino=3"}, aside: true},
		{name: "unbound", aside: true},
		{name: "unbound adopted", adopt: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			root := t.TempDir()
			dir := filepath.Join(root, "web.repl")
			os.MkdirAll(dir, 0o700)
			os.WriteFile(filepath.Join(dir, GenerationFile), []byte("old"), 0o600)
			if tc.found != nil {
				if err := saveOwner(dir, *tc.found); err != nil {
					t.Fatal(err)
				}
			}
			asideTo := filepath.Join(root, "archive")
			aside, err := bind(dir, Binding{Owner: id, AdoptUnbound: tc.adopt, SetAsideTo: asideTo}, log)
			if err != nil {
				t.Fatal(err)
			}
			got, ok, err := LoadOwner(dir)
			if err != nil || !ok || got != id {
				t.Fatalf("after bind the identity is %+v (found %t, %v), want %+v", got, ok, err, id)
			}
			_, genErr := os.Stat(filepath.Join(dir, GenerationFile))
			if !tc.aside {
				if aside != "" || genErr != nil {
					t.Fatalf("state of the same identity was set aside (%q) or lost (%v)", aside, genErr)
				}
				return
			}
			if genErr == nil {
				t.Fatal("foreign state is still in the state directory")
			}
			if !strings.HasPrefix(aside, filepath.Join(asideTo, "web.repl.stale-")) {
				t.Fatalf("set aside to %q, want under %s", aside, asideTo)
			}
			if b, err := os.ReadFile(filepath.Join(aside, GenerationFile)); err != nil || string(b) != "old" {
				t.Fatalf("set-aside state lost its files: %q, %v", b, err)
			}
		})
	}
	// No identity configured: no check, nothing moved.
	dir := filepath.Join(t.TempDir(), "plain")
	os.MkdirAll(dir, 0o700)
	os.WriteFile(filepath.Join(dir, GenerationFile), []byte("old"), 0o600)
	if aside, err := bind(dir, Binding{}, log); err != nil || aside != "" {
		t.Fatalf("unbound open: %q, %v", aside, err)
	}
	if _, ok, _ := LoadOwner(dir); ok {
		t.Fatal("an unbound open wrote an identity")
	}
}

// TestStaleStateIsNotTrusted: a pair replicates, both sides' state is
// left behind, and a new job incarnation opens it with a fresh target
// volume: the state is set aside on both sides, the target holds no
// generation, and it becomes consistent only through a mirror.
func TestStaleStateIsNotTrusted(t *testing.T) {
	const size = 1 << 20
	dir := t.TempDir()
	aFile, bFile := filepath.Join(dir, "a.img"), filepath.Join(dir, "b.img")
	data := bytes.Repeat([]byte("doppel!!"), size/8)
	os.WriteFile(aFile, data, 0o600)
	old := func(side string) Binding {
		return Binding{Owner: Owner{Job: "inc-1", Volume: "vol-" + side, Device: "d-" + side}}
	}
	p := &pair{t: t, nw: &memNet{up: true}, size: size}
	tb := old("b")
	p.startTargetWith(TargetConfig{Dir: filepath.Join(dir, "b"), Binding: tb}, bFile)
	p.startSource(SourceConfig{Dir: filepath.Join(dir, "a"), Binding: old("a")}, aFile)
	p.converge(20 * time.Second)
	p.stopSource()
	p.stopTarget()
	sameFiles(t, aFile, bFile)

	// A new incarnation, a fresh (empty) target volume.
	os.Remove(bFile)
	nb := tb
	nb.Owner.Job, nb.Owner.Volume = "inc-2", "vol-b2"
	p.startTargetWith(TargetConfig{Dir: filepath.Join(dir, "b"), Binding: nb}, bFile)
	if st := p.tgt.Status(); st.Generation != 0 || st.Data != "inconsistent" || st.SetAside == "" {
		t.Fatalf("a new incarnation's target trusts the old state: %+v", st)
	}
	na := old("a")
	na.Owner.Job = "inc-2"
	p.startSource(SourceConfig{Dir: filepath.Join(dir, "a"), Binding: na}, aFile)
	if st := p.src.Status(); st.SetAside == "" {
		t.Fatal("the source kept the old incarnation's state")
	}
	p.converge(20 * time.Second)
	p.stopSource()
	p.stopTarget()
	sameFiles(t, aFile, bFile)
}

// TestTargetRefusesOtherIncarnation: a source of another job incarnation
// (the job was created again on one side only) is refused with the
// reason, and nothing is applied.
func TestTargetRefusesOtherIncarnation(t *testing.T) {
	const size = 1 << 20
	dir := t.TempDir()
	aFile, bFile := filepath.Join(dir, "a.img"), filepath.Join(dir, "b.img")
	os.WriteFile(aFile, bytes.Repeat([]byte{7}, size), 0o600)
	p := &pair{t: t, nw: &memNet{up: true}, size: size}
	p.startTargetWith(TargetConfig{Dir: filepath.Join(dir, "b"), Binding: Binding{Owner: Owner{Job: "inc-2", Volume: "v", Device: "d"}}}, bFile)
	p.startSource(SourceConfig{Dir: filepath.Join(dir, "a"), Binding: Binding{Owner: Owner{Job: "inc-1", Volume: "v", Device: "d"}}}, aFile)
	deadline := time.Now().Add(10 * time.Second)
	for p.src.Status().Refusal == "" {
		if time.Now().After(deadline) {
			t.Fatal("a source of another incarnation was not refused")
		}
		time.Sleep(20 * time.Millisecond)
	}
	if r := p.src.Status().Refusal; !strings.Contains(r, "incarnation") {
		t.Fatalf("refusal %q does not name the incarnation", r)
	}
	p.stopSource()
	p.stopTarget()
	if b, _ := os.ReadFile(bFile); !bytes.Equal(b, make([]byte, size)) {
		t.Fatal("the refused source wrote to the target")
	}
}

// FuzzOwner: the identity decoder never panics, and what it accepts
// encodes and decodes to itself.
func FuzzOwner(f *testing.F) {
	b, _ := json.Marshal(Owner{Job: "j", Volume: "v", Device: "file fsid=1 ino=2"})
	f.Add(b)
	f.Add([]byte(`{}`))
	f.Add([]byte(`{"job":1}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		id, err := decodeOwner(b)
		if err != nil {
			return
		}
		again, err := json.Marshal(id)
		if err != nil {
			t.Fatal(err)
		}
		id2, err := decodeOwner(again)
		if err != nil || id2 != id {
			t.Fatalf("round trip: %+v -> %+v, %v", id, id2, err)
		}
	})
}
