package agent

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/doppelha/doppel/daemon/job"
)

// TestTwoTargetJobsShareTheListener: two jobs from two sources target the
// same agent, whose one replication listener serves both; they replicate
// concurrently and both verify clean. A source pinned for one job cannot
// feed the other: its connections are refused and nothing is applied.
func TestTwoTargetJobsShareTheListener(t *testing.T) {
	if testing.Short() {
		t.Skip("short: replicates two volumes")
	}
	root := t.TempDir()
	vm1 := newPlaneSide(t, root, "vm1", freePort(t))
	vm3 := newPlaneSide(t, root, "vm3", freePort(t))
	vm2 := newPlaneSide(t, root, "vm2", freePort(t))
	ep := func(name string, ps *planeSide) job.Endpoint {
		return job.Endpoint{Name: name, Repl: ps.planes.ReplListen, Fingerprint: ps.fp}
	}
	mk := func(name, srcName string, src *planeSide, mode string) job.Spec {
		return job.Spec{Name: name, Mode: mode, Size: 4 << 20,
			Volume: filepath.Join(root, name+"-src.img"), TargetVolume: filepath.Join(root, name+"-tgt.img"),
			Source: ep(srcName, src), Target: ep("vm2", vm2)}
	}
	specA, specB := mk("a", "vm1", vm1, job.ModeSync), mk("b", "vm3", vm3, job.ModeAsync)
	ta, tb := vm2.open(t, specA, "vm2"), vm2.open(t, specB, "vm2")
	for _, d := range []*replPlane{ta, tb} {
		if err := d.StartTarget(context.Background()); err != nil {
			t.Fatal(err)
		}
	}
	sa, sb := vm1.open(t, specA, "vm1"), vm3.open(t, specB, "vm3")
	var wg sync.WaitGroup
	for i, d := range []*replPlane{sa, sb} {
		m := d.Mutator()
		if err := d.StartSource(context.Background()); err != nil {
			t.Fatal(err)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			for k := range 48 { // 3 MiB of 64 KiB writes, interleaved with the other job's
				writeAt(t, m, int64((k*7+i)%64)<<16, 64<<10)
			}
		}()
	}
	wg.Wait()
	inSync := func(d *replPlane) func() bool {
		return func() bool {
			s, _ := d.source()
			st := s.Status()
			return st.Synced && st.Connected && !st.ResyncActive && st.AckedSeq == st.LastSeq
		}
	}
	waitFor(t, "job a in sync", inSync(sa))
	waitFor(t, "job b in sync", inSync(sb))
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for _, d := range []*replPlane{sa, sb} {
		res, err := d.Verify(ctx)
		if err != nil || !res.Equal {
			t.Fatalf("verify %s: %+v %v", d.rec.Spec.Name, res, err)
		}
	}
	for _, s := range []job.Spec{specA, specB} {
		a, _ := os.ReadFile(s.Volume)
		b, _ := os.ReadFile(s.TargetVolume)
		if !bytes.Equal(a, b) {
			t.Fatalf("job %s: target volume differs from the source's", s.Name)
		}
	}

	// vm1 (pinned by job a) tries to feed job b.
	before, _ := os.ReadFile(specB.TargetVolume)
	appliedBefore := tb.tgt.Status()
	evil := specB
	evil.Source = ep("vm1", vm1)
	evil.Volume = filepath.Join(root, "evil.img")
	de := vm1.open(t, evil, "vm1")
	me := de.Mutator()
	if err := de.StartSource(context.Background()); err != nil {
		t.Fatal(err)
	}
	writeAt(t, me, 0, 1<<20)
	time.Sleep(1500 * time.Millisecond)
	es, _ := de.source()
	if st := es.Status(); st.Connected || st.Synced {
		t.Fatalf("vm1 fed job b: %+v", st)
	}
	appliedAfter := tb.tgt.Status()
	after, _ := os.ReadFile(specB.TargetVolume)
	if appliedAfter.Applied != appliedBefore.Applied || !bytes.Equal(before, after) {
		t.Fatalf("job b's target changed: applied %d -> %d, volume equal %v", appliedBefore.Applied, appliedAfter.Applied, bytes.Equal(before, after))
	}
	if err := de.Close(); err != nil {
		t.Logf("close the refused source: %v", err)
	}
	// Job b still follows its own source.
	writeAt(t, sb.Mutator(), 0, 64<<10)
	waitFor(t, "job b in sync after the refused feed", inSync(sb))
	if res, err := sb.Verify(ctx); err != nil || !res.Equal {
		t.Fatalf("verify b after: %+v %v", res, err)
	}
}
