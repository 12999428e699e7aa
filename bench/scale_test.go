package bench

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestScaleSmoke runs the scale benchmark's harness with 4 jobs and a
// short target outage against a freshly built doppel, and checks what it
// must get right, never how fast: every job replicates, resyncs after the
// target's crash to a target equal to its source (doppel verify), fails
// over when the source agent is killed with a write acknowledged on the
// promoted side, and the last write acknowledged on the old source reads
// back there (sync mode). The network namespaces are removed.
func TestScaleSmoke(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: network namespaces, a veth pair, the agents")
	}
	if testing.Short() {
		t.Skip("network-namespace tier skipped in -short mode")
	}
	if _, err := exec.LookPath("ip"); err != nil {
		t.Fatalf("ip not found (make deps installs it): %v", err)
	}
	dir := t.TempDir()
	bin := filepath.Join(dir, "doppel")
	if out, err := exec.Command("go", "build", "-o", bin, "github.com/doppelha/doppel/cmd/doppel").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	before, _ := exec.Command("ip", "netns", "list").Output()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	const jobs = 4
	rep, err := RunScale(ctx, ScaleConfig{Doppel: bin, Dir: filepath.Join(dir, "work"), Jobs: jobs, Size: 64 << 20, Mode: "sync", Rate: 20,
		Idle: time.Second, Load: time.Second, Settle: 500 * time.Millisecond, Outage: 3 * time.Second, Verify: true})
	if err != nil {
		if rep != nil {
			t.Log(rep.Markdown())
		}
		for _, h := range []string{"vm1", "vm2"} {
			logs, _ := filepath.Glob(filepath.Join(dir, "work", h, "agent-*.log"))
			for _, l := range logs {
				b, _ := os.ReadFile(l)
				t.Logf("%s:\n%s", l, b)
			}
		}
		t.Fatal(err)
	}
	if len(rep.ResyncPerJob) != jobs || rep.EqualAfter != jobs {
		t.Errorf("resync: %d jobs back in sync, %d verified equal, want %d", len(rep.ResyncPerJob), rep.EqualAfter, jobs)
	}
	if len(rep.RTO) != jobs || len(rep.Reported) != jobs {
		t.Errorf("failover: %d jobs acknowledged a write on the promoted side, %d reported failed-over, want %d", len(rep.RTO), len(rep.Reported), jobs)
	}
	if rep.Verified+len(rep.Unverified) != jobs || rep.Verified == 0 {
		t.Errorf("last acknowledged writes: %d verified on the promoted side, not checked: %v", rep.Verified, rep.Unverified)
	}
	if rep.Idle.Source.RSS == 0 || rep.Loaded.Writes == 0 || rep.StateAlloc["vm1"] == 0 {
		t.Errorf("figures missing: source RSS %d, writes %d, state %d", rep.Idle.Source.RSS, rep.Loaded.Writes, rep.StateAlloc["vm1"])
	}
	if after, _ := exec.Command("ip", "netns", "list").Output(); strings.Count(string(after), "dsc") > strings.Count(string(before), "dsc") {
		t.Errorf("namespaces left behind:\n%s", after)
	}
}
