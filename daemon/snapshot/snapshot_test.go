package snapshot

import (
	"bytes"
	"crypto/rand"
	"errors"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/doppelha/doppel/daemon/snapshot/fstest"
)

// writeAt writes n bytes of pattern at off into path.
func writeAt(t *testing.T, path string, off int64, p []byte) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt(p, off); err != nil {
		t.Fatal(err)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
}

func randBytes(n int) []byte {
	b := make([]byte, n)
	rand.Read(b)
	return b
}

// TestReflink, on real XFS and btrfs: a snapshot keeps the volume's data
// as of its point while the volume changes; its space is reported; the
// extent comparison finds every changed chunk; a clone is writable and
// independent of both; a rollback restores the snapshot's data and
// returns exactly the chunks that changed; delete removes the image.
func TestReflink(t *testing.T) {
	for _, fs := range []string{"xfs", "btrfs"} {
		t.Run(fs, func(t *testing.T) {
			mnt := fstest.Mount(t, fs)
			vol := filepath.Join(mnt, "vol.img")
			const size, chunk = 8 << 20, 64 << 10
			orig := randBytes(size)
			if err := os.WriteFile(vol, orig, 0o600); err != nil {
				t.Fatal(err)
			}
			m, err := Open(Config{Dir: filepath.Join(t.TempDir(), "snaps"), Volume: vol, Job: "web"})
			if err != nil {
				t.Fatal(err)
			}
			mech, err := m.Mechanism()
			if err != nil {
				t.Fatalf("mechanism on %s: %v", fs, err)
			}
			if mech.Name() != "reflink" || !strings.Contains(mech.Describe(), fs) {
				t.Fatalf("mechanism %s (%s)", mech.Name(), mech.Describe())
			}
			s, err := m.Create("s1", KindManual, Point{Generation: 7, Stream: 9, Seq: 42}, "")
			if err != nil {
				t.Fatal(err)
			}
			if s.Size != size || s.Point.Seq != 42 || s.Mechanism != "reflink" {
				t.Fatalf("snapshot %+v", s)
			}
			if _, err := m.Create("s1", KindManual, Point{}, ""); !errors.Is(err, ErrExists) {
				t.Fatalf("second s1: %v", err)
			}
			u0 := m.Usage(s)
			if u0.Allocated < size || u0.Exclusive != 0 {
				t.Fatalf("fresh snapshot usage %+v: want all blocks shared", u0)
			}
			// Change chunks 3 and 100 (partly) and 127.
			changed := []int64{3, 100, 127}
			cur := slices.Clone(orig)
			for _, c := range changed {
				p := randBytes(4096)
				writeAt(t, vol, c*chunk+8192, p)
				copy(cur[c*chunk+8192:], p)
			}
			img, err := os.ReadFile(s.Location)
			if err != nil || !bytes.Equal(img, orig) {
				t.Fatalf("snapshot image changed with the volume (%v)", err)
			}
			// XFS shares per block: the 3 overwritten blocks are the
			// snapshot's own. btrfs shares per extent and frees an extent
			// only when no part of it is referenced: the volume still
			// references the rest of the 8 MiB extents, so deleting the
			// snapshot would free nothing, and FIEMAP says so.
			u := m.Usage(s)
			switch {
			case fs == "xfs" && (u.Exclusive < 3*4096 || u.Exclusive > 3*chunk*2):
				t.Fatalf("usage after 3 writes %+v: want the overwritten blocks as exclusive", u)
			case fs == "btrfs" && (u.Exclusive < 0 || u.Exclusive > size):
				t.Fatalf("usage after 3 writes %+v", u)
			}
			cands, all, err := mech.Differs(s.Location, chunk)
			if err != nil || all {
				t.Fatalf("differs: %v %v", all, err)
			}
			for _, c := range changed {
				if !slices.Contains(cands, c) {
					t.Fatalf("chunk %d changed but not among the candidates %v", c, cands)
				}
			}
			if len(cands) > 8 {
				t.Fatalf("candidates %v: the extent map should narrow them to the written ones", cands)
			}
			// A clone of the snapshot is writable and independent.
			cl, err := m.Clone("s1", "test")
			if err != nil {
				t.Fatal(err)
			}
			writeAt(t, cl, 0, randBytes(chunk))
			if img, _ := os.ReadFile(s.Location); !bytes.Equal(img, orig) {
				t.Fatal("writing the clone changed the snapshot")
			}
			if v, _ := os.ReadFile(vol); !bytes.Equal(v, cur) {
				t.Fatal("writing the clone changed the volume")
			}
			if err := m.RemoveClone(cl); err != nil {
				t.Fatal(err)
			}
			// Rollback through a file handle of the volume.
			f, err := os.OpenFile(vol, os.O_RDWR, 0)
			if err != nil {
				t.Fatal(err)
			}
			// mark sees the changed chunks before any of them is
			// written: the volume still holds the newer data then.
			var marked []int64
			mark := func(c []int64) error {
				if v, _ := os.ReadFile(vol); !bytes.Equal(v, cur) {
					t.Error("the volume was written before the changed chunks were marked")
				}
				marked = slices.Clone(c)
				return nil
			}
			// A failing mark writes nothing.
			if _, err := m.Rollback("s1", f, f, size, chunk, f.Sync, func([]int64) error { return errors.New("disk full") }); err == nil {
				t.Fatal("rollback went on after mark failed")
			}
			if v, _ := os.ReadFile(vol); !bytes.Equal(v, cur) {
				t.Fatal("rollback wrote the volume after mark failed")
			}
			got, err := m.Rollback("s1", f, f, size, chunk, f.Sync, mark)
			f.Close()
			if err != nil {
				t.Fatal(err)
			}
			if !slices.Equal(got, changed) || !slices.Equal(marked, changed) {
				t.Fatalf("rollback changed chunks %v, marked %v, want %v", got, marked, changed)
			}
			if v, _ := os.ReadFile(vol); !bytes.Equal(v, orig) {
				t.Fatal("volume does not hold the snapshot's data after the rollback")
			}
			if got := m.List(); len(got) != 1 || got[0].Name != "s1" {
				t.Fatalf("list %+v", got)
			}
			// The catalog survives a reopen.
			m2, err := Open(Config{Dir: m.cfg.Dir, Volume: vol, Job: "web"})
			if err != nil || len(m2.List()) != 1 || m2.List()[0].Point.Seq != 42 {
				t.Fatalf("reopen: %v %+v", err, m2.List())
			}
			if err := m2.Delete("s1"); err != nil {
				t.Fatal(err)
			}
			if _, err := os.Stat(s.Location); !errors.Is(err, os.ErrNotExist) {
				t.Fatalf("image still there after delete: %v", err)
			}
			if err := m2.Delete("s1"); !errors.Is(err, ErrNotFound) {
				t.Fatalf("delete twice: %v", err)
			}
			if err := m2.RemoveAll(); err != nil {
				t.Fatal(err)
			}
			if _, err := os.Stat(filepath.Join(mnt, ".doppel-snapshots")); !errors.Is(err, os.ErrNotExist) {
				t.Fatalf("snapshot dir left behind: %v", err)
			}
		})
	}
}

// TestRefusedOnExt4: a file volume on ext4 gets a refusal that says
// what to do, and every operation is refused with it.
func TestRefusedOnExt4(t *testing.T) {
	mnt := fstest.Mount(t, "ext4")
	vol := filepath.Join(mnt, "vol.img")
	os.WriteFile(vol, make([]byte, 1<<20), 0o600)
	m, err := Open(Config{Dir: t.TempDir(), Volume: vol, Job: "web"})
	if err != nil {
		t.Fatal(err)
	}
	_, err = m.Mechanism()
	if !errors.Is(err, ErrUnsupported) || !strings.Contains(err.Error(), "no reflink on ext4") ||
		!strings.Contains(err.Error(), "XFS or btrfs, or use an LVM thin LV") {
		t.Fatalf("ext4: %v", err)
	}
	if _, err := m.Create("s", KindManual, Point{}, ""); !errors.Is(err, ErrUnsupported) {
		t.Fatalf("create on ext4: %v", err)
	}
}

// TestRefusedPlainFile: without root, a volume on whatever /tmp is
// (ext4, tmpfs, overlay) is refused with the reason (not an XFS/btrfs
// machine's tmp).
func TestRefusedElsewhere(t *testing.T) {
	dir := t.TempDir()
	vol := filepath.Join(dir, "vol.img")
	os.WriteFile(vol, make([]byte, 4096), 0o600)
	_, err := Detect(vol, "web")
	if err == nil {
		t.Skip("the test directory is on a file system with reflinks")
	}
	if !errors.Is(err, ErrUnsupported) || !strings.Contains(err.Error(), "no reflink on") {
		t.Fatalf("refusal: %v", err)
	}
	if _, err := Detect(filepath.Join(dir, "missing"), "web"); err == nil {
		t.Fatal("a missing volume was accepted")
	}
}

func TestDifferingChunks(t *testing.T) {
	const k = 64 << 10
	a := []extent{{logical: 0, physical: 1000 * k, length: 4 * k}, {logical: 4 * k, physical: 50 * k, length: 4 * k}}
	// b: same first extent cut in two, second chunk 5 remapped, chunk 7
	// a hole.
	b := []extent{{logical: 0, physical: 1000 * k, length: 2 * k}, {logical: 2 * k, physical: 1002 * k, length: 2 * k},
		{logical: 4 * k, physical: 50 * k, length: k}, {logical: 5 * k, physical: 9 * k, length: k}, {logical: 6 * k, physical: 52 * k, length: k}}
	got := differingChunks(a, b, 8*k, k)
	if want := []int64{5, 7}; !slices.Equal(got, want) {
		t.Fatalf("got %v want %v", got, want)
	}
	// Delayed allocation counts as different; holes in both do not.
	got = differingChunks([]extent{{logical: 0, physical: 0, length: k, flags: fiemapExtentDelay}}, nil, 4*k, k)
	if want := []int64{0}; !slices.Equal(got, want) {
		t.Fatalf("delayed: got %v want %v", got, want)
	}
	// Sub-chunk differences mark the chunk.
	got = differingChunks([]extent{{logical: 4096, physical: 10, length: 4096}}, nil, 4*k, k)
	if want := []int64{0}; !slices.Equal(got, want) {
		t.Fatalf("sub-chunk: got %v want %v", got, want)
	}
}

func TestRetain(t *testing.T) {
	day := 24 * time.Hour
	base := time.Date(2026, 3, 2, 0, 0, 0, 0, time.UTC) // a Monday
	var snaps []Snapshot
	// Scheduled every 6 h for 15 days: 60 snapshots, s00 oldest.
	for i := range 60 {
		snaps = append(snaps, Snapshot{Name: nameOf("s", i), Kind: KindScheduled, Created: base.Add(time.Duration(i) * 6 * time.Hour)})
	}
	snaps = append(snaps,
		Snapshot{Name: "m", Kind: KindManual, Created: base},
		Snapshot{Name: "r1", Kind: KindBeforeResync, Created: base.Add(day)},
		Snapshot{Name: "r2", Kind: KindBeforeResync, Created: base.Add(2 * day)},
	)
	drop := Retain(snaps, Schedule{Every: 6 * time.Hour, Keep: 4, KeepDaily: 3, KeepWeekly: 2}, 1)
	kept := map[string]bool{}
	for _, s := range snaps {
		kept[s.Name] = !slices.Contains(drop, s.Name)
	}
	// Newest 4: s56..s59. Daily: newest of the last 3 days: s59 (day 14),
	// s55 (day 13), s51 (day 12). Weekly: s59 (week of day 14), s55's
	// week? days 7-13 are week 2: its newest is s55. So the set is
	// s51, s55..s59.
	want := map[string]bool{"s51": true, "s55": true, "s56": true, "s57": true, "s58": true, "s59": true, "m": true, "r2": true}
	for n, k := range kept {
		if k != want[n] {
			t.Errorf("%s kept %t, want %t", n, k, want[n])
		}
	}
	if d := Retain(snaps, Schedule{}, 0); slices.Contains(d, "m") || !slices.Contains(d, "r2") {
		t.Fatalf("keepAuto 0: %v", d)
	}
}

func nameOf(p string, i int) string {
	return p + string(rune('0'+i/10)) + string(rune('0'+i%10))
}

func TestScheduleValidate(t *testing.T) {
	for _, s := range []Schedule{{Every: time.Second, Keep: 1}, {Every: time.Hour}, {Keep: -1}} {
		if err := s.Validate(); !errors.Is(err, ErrInvalid) {
			t.Errorf("%+v accepted", s)
		}
	}
	if err := (Schedule{Every: time.Hour, KeepDaily: 7}).Validate(); err != nil {
		t.Fatal(err)
	}
	s := Schedule{Every: time.Hour, Keep: 3}
	now := time.Now()
	if !s.Due(time.Time{}, now) || s.Due(now.Add(-time.Minute), now) || !s.Due(now.Add(-time.Hour), now) {
		t.Fatal("due")
	}
}

func FuzzCatalog(f *testing.F) {
	good, _ := MarshalCatalog(Catalog{Version: 1, Snapshots: []Snapshot{{Name: "a", Kind: KindManual, Created: time.Unix(1, 0).UTC(),
		Point: Point{Generation: 1, Stream: 2, Seq: 3, AppConsistent: true}, Mechanism: "reflink", Location: "/x/a.img", Size: 10, Took: time.Millisecond}}})
	f.Add(good)
	f.Add([]byte(`{"version":1,"snapshots":[]}`))
	f.Add([]byte(`{"version":2}`))
	f.Add([]byte(`{"version":1,"snapshots":[{"name":"../x","kind":"manual"}]}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		c, err := UnmarshalCatalog(b)
		if err != nil {
			return
		}
		enc, err := MarshalCatalog(c)
		if err != nil {
			t.Fatalf("a decoded catalog does not encode: %v", err)
		}
		c2, err := UnmarshalCatalog(enc)
		if err != nil {
			t.Fatalf("decode(encode(x)): %v", err)
		}
		enc2, _ := MarshalCatalog(c2)
		if !bytes.Equal(enc, enc2) {
			t.Fatalf("decode(encode(x)) != x:\n%s\n%s", enc, enc2)
		}
	})
}

// failingWriter fails every write after the first n.
type failingWriter struct {
	w io.WriterAt
	n int
}

func (f *failingWriter) WriteAt(p []byte, off int64) (int, error) {
	if f.n <= 0 {
		return 0, errors.New("injected write error")
	}
	f.n--
	return f.w.WriteAt(p, off)
}

// TestRollbackInterrupted, on real XFS: a rollback whose writes fail
// halfway reports it and leaves a volume that is neither the snapshot
// nor the newer data; running it again rewrites only the chunks still
// differing and leaves the volume byte-identical to the snapshot.
func TestRollbackInterrupted(t *testing.T) {
	mnt := fstest.Mount(t, "xfs")
	vol := filepath.Join(mnt, "vol.img")
	const size, chunk = 8 << 20, 64 << 10
	orig := randBytes(size)
	if err := os.WriteFile(vol, orig, 0o600); err != nil {
		t.Fatal(err)
	}
	m, err := Open(Config{Dir: filepath.Join(t.TempDir(), "snaps"), Volume: vol, Job: "web"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := m.Create("s1", KindManual, Point{Seq: 1}, ""); err != nil {
		t.Fatal(err)
	}
	changed := []int64{2, 9, 17, 40, 41, 77, 100, 127}
	cur := slices.Clone(orig)
	for _, c := range changed {
		p := randBytes(chunk)
		writeAt(t, vol, c*chunk, p)
		copy(cur[c*chunk:], p)
	}
	f, err := os.OpenFile(vol, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	got, err := m.Rollback("s1", &failingWriter{w: f, n: 3}, f, size, chunk, f.Sync, nil)
	if err == nil || !strings.Contains(err.Error(), "injected write error") {
		t.Fatalf("a rollback whose fourth write failed: %v", err)
	}
	if !slices.Equal(got, changed) {
		t.Fatalf("the failed rollback's chunks %v, want %v", got, changed)
	}
	// An image left by a Create interrupted before its catalog entry
	// (the agent killed in between) does not stop a new one.
	mech, _ := m.Mechanism()
	left := filepath.Join(mech.(*reflink).dir, "kept.img")
	if err := os.WriteFile(left, []byte("half a clone"), 0o600); err != nil {
		t.Fatal(err)
	}
	if k, err := m.Create("kept", KindBeforeRollback, Point{}, ""); err != nil {
		t.Fatalf("snapshot over a leftover image: %v", err)
	} else if img, _ := os.ReadFile(k.Location); len(img) != size {
		t.Fatalf("the snapshot over a leftover image holds %d bytes, want %d", len(img), size)
	}
	v, _ := os.ReadFile(vol)
	if bytes.Equal(v, orig) || bytes.Equal(v, cur) {
		t.Fatal("the interrupted rollback left the volume whole (snapshot or newer data): nothing was interrupted halfway")
	}
	got, err = m.Rollback("s1", f, f, size, chunk, f.Sync, nil)
	if err != nil {
		t.Fatal(err)
	}
	if want := changed[3:]; !slices.Equal(got, want) {
		t.Fatalf("the redo rewrote %v, want only the chunks not yet rewritten %v", got, want)
	}
	if v, _ := os.ReadFile(vol); !bytes.Equal(v, orig) {
		t.Fatal("the volume is not byte-identical to the snapshot after the redo")
	}
}
