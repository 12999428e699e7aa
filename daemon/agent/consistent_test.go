package agent

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"github.com/doppelha/doppel/blockdev"
	"github.com/doppelha/doppel/daemon/ha"
	"github.com/doppelha/doppel/daemon/job"
	"github.com/doppelha/doppel/daemon/repl"
	"github.com/doppelha/doppel/daemon/replstate"
)

// TestTargetRecordFollowsReplstate: the job record's "consistent"
// (ha.HardState.Consistent, stepped by EvResync/EvSynced) is derived from
// replstate's, which is the generation and the applier together. A
// target that crashed inside a resync batch of the stream has a
// consistent generation and an applier that says inconsistent: when it
// starts again, with no source connected, the state machine must be told
// the copy is inconsistent (it used to look at the generation only, and
// an automatic failover would have promoted a half-written copy).
func TestTargetRecordFollowsReplstate(t *testing.T) {
	root := t.TempDir()
	src := newPlaneSide(t, root, "vm1", freePort(t))
	tgt := newPlaneSide(t, root, "vm2", freePort(t))
	spec := job.Spec{Name: "db", Mode: job.ModeSync, Size: 4 << 20,
		Volume: filepath.Join(root, "vol1.img"), TargetVolume: filepath.Join(root, "vol2.img"),
		Source: job.Endpoint{Name: "vm1", Repl: src.planes.ReplListen, Fingerprint: src.fp},
		Target: job.Endpoint{Name: "vm2", Repl: tgt.planes.ReplListen, Fingerprint: tgt.fp}}

	var mu sync.Mutex
	var events []ha.EventType
	openTarget := func() (*replPlane, func()) {
		b, err := blockdev.OpenExclusive(spec.VolumeOn("vm2"), spec.Size)
		if err != nil {
			t.Fatal(err)
		}
		dp, err := tgt.planes.Open(job.Record{Spec: spec, Self: "vm2"}, JobVolume{Backend: b}, Fencing{}, func(ev ha.Event) {
			mu.Lock()
			events = append(events, ev.Type)
			mu.Unlock()
		})
		if err != nil {
			b.Close()
			t.Fatal(err)
		}
		if err := dp.StartTarget(context.Background()); err != nil {
			t.Fatal(err)
		}
		return dp.(*replPlane), func() { dp.Close(); b.Close() }
	}

	dt, closeTarget := openTarget()
	ds := src.open(t, spec, "vm1")
	if err := ds.StartSource(context.Background()); err != nil {
		t.Fatal(err)
	}
	writeAt(t, ds.Mutator(), 0, 64<<10)
	waitFor(t, "target consistent", func() bool { return dt.tgt.Status().Consistent })
	if err := ds.StopSource(); err != nil {
		t.Fatal(err)
	}
	closeTarget()

	// The crash inside a resync batch: the applier persisted
	// "inconsistent" at the batch's begin; the generation is untouched.
	path := filepath.Join(job.ReplStateDir(tgt.dir, spec.Name), replstate.TargetFile)
	raw, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var st repl.ApplierState
	if err := json.Unmarshal(raw, &st); err != nil {
		t.Fatal(err)
	}
	st.State = "inconsistent"
	raw, _ = json.Marshal(st)
	if err := os.WriteFile(path, raw, 0o600); err != nil {
		t.Fatal(err)
	}

	mu.Lock()
	events = nil
	mu.Unlock()
	dt, closeTarget = openTarget()
	defer closeTarget()
	ts := dt.tgt.Status()
	if ts.Data != "consistent" || ts.ApplierState != "inconsistent" || ts.Consistent {
		t.Fatalf("reopened target: generation %s, applier %s, consistent %t", ts.Data, ts.ApplierState, ts.Consistent)
	}
	mu.Lock()
	defer mu.Unlock()
	for _, ev := range events {
		if ev == ha.EvResync {
			return
		}
	}
	t.Fatalf("target started with an inconsistent applier: the state machine was told %v, not %s", events, ha.EvResync)
}
