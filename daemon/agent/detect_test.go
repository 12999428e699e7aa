package agent

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/doppelha/doppel/daemon/ha"
)

// TestDetectorWindowAndRise: the agent's detector is daemon/monitor's
// policy. A target whose source goes silent shows a countdown and declares
// it down no sooner than interval × missed after its last packet (and not
// much later: it wakes at the deadline); one packet does not bring it
// back up (rise hysteresis), a run of them does.
func TestDetectorWindowAndRise(t *testing.T) {
	root := t.TempDir()
	os.WriteFile(filepath.Join(root, "mountinfo"), nil, 0o644)
	live := &memLiveness{alive: map[string]bool{"web": true}, n: map[string]uint64{}}
	a1 := startAgent(t, filepath.Join(root, "vm1"), Subsystems{})
	a2 := startAgent(t, filepath.Join(root, "vm2"), Subsystems{Liveness: live})
	ctx := context.Background()
	spec := testSpec(t, endpoint("vm1", a1), endpoint("vm2", a2))
	spec.Volume = filepath.Join(root, "vol.img")
	spec.Failover = ha.FailoverManual
	spec.Monitor.Interval, spec.Monitor.Missed = 100*time.Millisecond, 5
	timeout := 500 * time.Millisecond
	if _, err := a2.client.CreateJob(ctx, spec); err != nil {
		t.Fatal(err)
	}
	time.Sleep(3 * spec.Monitor.Interval)
	if st, _ := a2.client.Job(ctx, "web"); st.Probe.TimeToFail != -1 || st.HA.State == ha.StateSourceDown {
		t.Fatalf("countdown %v / state %s while the source is heard", st.Probe.TimeToFail, st.HA.State)
	}
	live.set("web", false)
	silent := time.Now()
	sawCountdown := false
	var downAt time.Time
	for time.Since(silent) < 5*time.Second {
		st, _ := a2.client.Job(ctx, "web")
		if st.HA.State == ha.StateSourceDown {
			downAt = time.Now()
			break
		}
		if st.Probe.TimeToFail > 0 && st.Probe.TimeToFail < timeout {
			sawCountdown = true
		}
		time.Sleep(10 * time.Millisecond)
	}
	if downAt.IsZero() {
		t.Fatal("source never declared down")
	}
	// The last packet was sampled at most a poll (interval/4) before
	// the silence began.
	took := downAt.Sub(silent)
	t.Logf("declared down %v after the source went silent (timeout %v)", took.Round(time.Millisecond), timeout)
	if took < timeout-spec.Monitor.Interval/4 || took > timeout+400*time.Millisecond {
		t.Fatalf("declared down after %v, want within [%v, %v]", took, timeout-spec.Monitor.Interval/4, timeout+400*time.Millisecond)
	}
	if !sawCountdown {
		t.Error("status never showed the countdown")
	}
	// Rise: packets again; the detector needs a run of them (3, at one
	// or two per poll here), so source-down outlasts the first poll.
	live.set("web", true)
	back := time.Now()
	waitFor(t, "source up again", func() bool {
		st, _ := a2.client.Job(ctx, "web")
		return st.HA.State != ha.StateSourceDown
	})
	t.Logf("up again %v after packets resumed", time.Since(back).Round(time.Millisecond))
	if time.Since(back) < spec.Monitor.Interval/4 {
		t.Fatalf("up again after %v: no rise hysteresis", time.Since(back))
	}
}
