// Package demo runs the end-to-end demo (demo.sh, also make demo) as a
// test: the two-VM lab in network namespaces with a 3-member etcd arbiter:
// protect, a partition that moves nothing, fail over automatically, fence
// the returned source, reverse, fail back, with the script failing at the
// first broken check.
package demo

import (
	"bufio"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

func TestDemo(t *testing.T) {
	if testing.Short() {
		t.Skip("end-to-end demo: slow tier")
	}
	if os.Geteuid() != 0 {
		t.Skip("needs root: network namespaces, loop devices, FUSE")
	}
	for _, tool := range []string{"ip", "nsenter", "nbdfuse", "losetup", "mkfs.ext4", "busybox", "curl", "sha256sum", "etcd", "systemd-socket-activate", "ss"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s not installed (test/deps.sh installs it)", tool)
		}
	}
	if _, err := os.Stat("/dev/fuse"); err != nil {
		t.Skip("no /dev/fuse")
	}
	dir := t.TempDir()
	bin := filepath.Join(dir, "doppel")
	build := exec.Command("go", "build", "-o", bin, "github.com/doppelha/doppel/cmd/doppel")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build: %v\n%s", err, out)
	}
	result := filepath.Join(dir, "result")
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "./demo.sh", bin)
	cmd.Env = append(os.Environ(), "DEMO_FAST=1", "DEMO_RESULT="+result)
	cmd.WaitDelay = 10 * time.Second
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("demo failed: %v\n%s", err, out)
	}
	t.Logf("demo output:\n%s", out)
	for _, want := range []string{"web console (doppel console): https://127.0.0.1:", "log in with the console password ", "or vm1's API token "} {
		if !strings.Contains(string(out), want) {
			t.Errorf("the demo does not print %q", want)
		}
	}
	f, err := os.Open(result)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	res := map[string]float64{}
	for sc.Scan() {
		t.Log(sc.Text())
		k, v, ok := strings.Cut(sc.Text(), "=")
		if !ok {
			continue
		}
		x, err := strconv.ParseFloat(v, 64)
		if err != nil {
			t.Fatalf("result %q: %v", sc.Text(), err)
		}
		res[k] = x
	}
	for _, k := range []string{"RTO_SECONDS", "REVERSE_BYTES", "VM2_CHANGED_BYTES", "VM1_DIRTY_BYTES"} {
		if _, ok := res[k]; !ok {
			t.Fatalf("demo wrote no %s", k)
		}
	}
	// Detection is 200 ms × 5 = 1 s and the lease TTL 3 s: the budget is
	// detection + TTL + 1 s from the kill to a client's new TCP connection
	// succeeding on the target (docs/safety.md).
	rto := res["RTO_SECONDS"]
	t.Logf("RTO %.2f s (detection 1 s, lease TTL 3 s, budget 5 s)", rto)
	if rto > 5 {
		t.Errorf("RTO %.2f s: more than detection + lease TTL + 1 s = 5 s", rto)
	}
	// The reverse bound: the bytes the reverse sent (the payload
	// vm1 applied as the new target) are at most 1.1 × (the bytes vm2
	// changed after the failover + vm1's dirty chunks), each side's
	// figure read from its status before the reverse.
	rev, changed, dirty := res["REVERSE_BYTES"], res["VM2_CHANGED_BYTES"], res["VM1_DIRTY_BYTES"]
	t.Logf("reverse sent %.0f bytes; vm2 changed %.0f, vm1 dirty %.0f: bound %.0f", rev, changed, dirty, 1.1*(changed+dirty))
	if changed <= 0 {
		t.Errorf("vm2 reports %.0f bytes changed after the failover: the measurement is broken (it wrote a file)", changed)
	}
	if rev > 1.1*(changed+dirty) {
		t.Errorf("reverse sent %.0f bytes: more than 1.1 × (%.0f + %.0f)", rev, changed, dirty)
	}
}
