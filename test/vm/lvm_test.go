package vm

import (
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"
)

// lvmSnap is the part of a snapshot in `doppel snapshot list --json`
// and `snapshot create --json` the test reads.
type lvmSnap struct {
	Name      string `json:"name"`
	Mechanism string `json:"mechanism"`
	Location  string `json:"location"`
	Size      int64  `json:"size"`
	Usage     struct {
		Allocated int64  `json:"allocated"`
		Exclusive int64  `json:"exclusive"`
		How       string `json:"how"`
	} `json:"usage"`
}

// TestLVMThinSnapshots: a job whose target volume is an LVM thin LV (a
// thin pool on vm2's virtio disk, LVM and the dm modules of the Debian
// kernel in the guest): snapshots are LVM thin snapshots (lvcreate
// --snapshot, activation skipped), created, listed with the space lvs
// reports, and deleted (the LV is gone); a failover to a snapshot
// promotes exactly its bytes, and the newer data is kept as a thin
// snapshot of its own.
func TestLVMThinSnapshots(t *testing.T) {
	start := time.Now()
	l := NewLab(t, GuestConfig{Name: "vm1"}, GuestConfig{Name: "vm2", RawDiskMB: 256, Bundles: []Bundle{LVMBundle}})
	vm1, vm2 := l.Guests[0], l.Guests[1]
	t.Logf("2 guests booted in %v", time.Since(start).Round(time.Millisecond))

	// The thin pool and the thin LV on vm2's raw disk.
	out := vm2.MustRun(t, 3*time.Minute, `set -e
modprobe dm_thin_pool
modprobe dm_snapshot
disk=`+RawDisk+`
[ -b "$disk" ]
pvcreate -qq -y $disk
vgcreate -qq vgd $disk
lvcreate -qq -y --type thin-pool -L 160M -n pool vgd
lvcreate -qq -y -V 64M --thinpool vgd/pool -n data vgd
lvs --noheadings -o lv_name,segtype,pool_lv,lv_size --units m vgd
set -- $(stat -L -c '%t %T' /dev/vgd/data)
cat /sys/dev/block/$(printf '%d:%d' 0x$1 0x$2)/dm/uuid`)
	t.Logf("vm2's LVM:\n%s", out)
	if !strings.Contains(out, "LVM-") || !strings.Contains(out, "thin ") {
		t.Fatalf("no thin LV on vm2:\n%s", out)
	}

	creds := map[string][2]string{}
	for _, g := range []*Guest{vm1, vm2} {
		g.Start(t, "agent", fmt.Sprintf("exec doppel agent --state-dir %s --control-listen %s:6320 --repl-listen %s:6325 --probe-iface app --probe-iface repl",
			foState, g.AppIP, g.ReplIP))
	}
	for _, g := range []*Guest{vm1, vm2} {
		out := g.MustRun(t, 2*time.Minute, `
for i in $(seq 1200); do
	grep -q "agent ready" /run/agent.log && [ -s `+foState+`/token ] && break
	pidof doppel >/dev/null || { echo "agent exited:"; cat /run/agent.log; exit 1; }
	sleep 0.1
done
grep -o 'fingerprint=sha256:[0-9a-f]*' /run/agent.log | head -n 1 | cut -d= -f2
cat `+foState+`/token`)
		f := strings.Fields(out)
		if len(f) != 2 || !fingerprintRE.MatchString(f[0]) || !tokenRE.MatchString(f[1]) {
			t.Fatalf("%s: want fingerprint and token, got:\n%s", g.Name, out)
		}
		creds[g.Name] = [2]string{f[0], f[1]}
	}
	// The CLI runs on vm1.
	for _, g := range []*Guest{vm1, vm2} {
		c := creds[g.Name]
		vm1.MustRun(t, time.Minute, fmt.Sprintf(cliEnv+`set -e
umask 077
echo %s >/run/%s.token
doppel server add %s %s --token-file /run/%s.token --fingerprint %s`, c[1], g.Name, g.Name, g.AppIP, g.Name, c[0]))
	}
	vm1.MustRun(t, 3*time.Minute, cliEnv+"doppel job create "+foJob+" --source vm1 --target vm2 --volume "+foVolume+
		" --target-volume /dev/vgd/data --size 64M --mode sync --monitor "+foMonitor)
	m := waitStatus(t, vm1, "", "vm1 serving /dev/nbd0 and vm2 replicating", 4*time.Minute, func(m map[string]jobView) bool {
		return is(m, "vm1", "source", "replicating") && is(m, "vm2", "target", "replicating") &&
			m["vm2"].Status.HA.Consistent && strings.HasPrefix(m["vm1"].Status.Data.Device, "/dev/nbd")
	})
	dev := m["vm1"].Status.Data.Device

	// Data A, synced (sync mode: on vm2's thin LV when dd returns).
	const region = "bs=1M count=8"
	sum := func(g *Guest, dev string) string {
		t.Helper()
		out := g.MustRun(t, 2*time.Minute, "dd if="+dev+" "+region+" iflag=direct 2>/dev/null | md5sum")
		return strings.Fields(out)[0]
	}
	vm1.MustRun(t, 2*time.Minute, "dd if=/dev/urandom of="+dev+" "+region+" oflag=direct conv=fsync 2>&1")
	sumA := sum(vm1, dev)

	snapJSON := func(cmd string) string {
		t.Helper()
		return vm1.MustRun(t, 2*time.Minute, cliEnv+"doppel snapshot "+cmd)
	}
	var s1 lvmSnap
	out = snapJSON("create " + foJob + " s1 --json")
	if err := json.Unmarshal([]byte(out), &s1); err != nil {
		t.Fatalf("snapshot create --json: %v\n%s", err, out)
	}
	if s1.Mechanism != "lvm-thin" || s1.Location != "vgd/data_snap_s1" || s1.Size != 64<<20 {
		t.Fatalf("snapshot s1: want lvm-thin at vgd/data_snap_s1 of 64 MiB: %s", out)
	}
	// An LVM thin snapshot of the LV, its activation skipped (attr k).
	out = vm2.MustRun(t, time.Minute, "lvs --noheadings -o lv_name,origin,pool_lv,lv_attr,lv_tags vgd/data_snap_s1")
	if f := strings.Fields(out); len(f) != 5 || f[1] != "data" || f[2] != "pool" || !strings.HasPrefix(f[3], "V") || f[3][9] != 'k' || f[3][4] == 'a' || f[4] != "doppel" {
		t.Fatalf("vgd/data_snap_s1 is not an inactive thin snapshot of data tagged doppel: %q", out)
	}

	// Data B over A.
	vm1.MustRun(t, 2*time.Minute, "dd if=/dev/urandom of="+dev+" "+region+" oflag=direct conv=fsync 2>&1")
	sumB := sum(vm1, dev)
	if sumA == sumB {
		t.Fatal("data B is data A")
	}

	// A second snapshot, listed, then deleted.
	snapJSON("create " + foJob + " s2")
	list := func() (string, map[string]lvmSnap) {
		t.Helper()
		out := snapJSON("list " + foJob + " --json")
		var l struct {
			Mechanism string    `json:"mechanism"`
			Describe  string    `json:"describe"`
			Snapshots []lvmSnap `json:"snapshots"`
		}
		if err := json.Unmarshal([]byte(out), &l); err != nil {
			t.Fatalf("snapshot list --json: %v\n%s", err, out)
		}
		if l.Mechanism != "lvm-thin" || !strings.Contains(l.Describe, "vgd/data") {
			t.Fatalf("snapshot list: mechanism %q (%s)", l.Mechanism, l.Describe)
		}
		m := map[string]lvmSnap{}
		for _, s := range l.Snapshots {
			m[s.Name] = s
		}
		return out, m
	}
	out, snaps := list()
	for _, n := range []string{"s1", "s2"} {
		s, ok := snaps[n]
		if !ok {
			t.Fatalf("%s not listed:\n%s", n, out)
		}
		// Data A and B (8 MiB each) are mapped in the pool: s1 maps A's
		// 8 MiB (of 64), s2 B's.
		if s.Usage.Allocated < 8<<20 || s.Usage.Allocated > 16<<20 || s.Usage.Exclusive != -1 || !strings.Contains(s.Usage.How, "lvs") {
			t.Errorf("%s: space %+v, want 8-16 MiB from lvs", n, s.Usage)
		}
	}
	t.Logf("snapshot list:\n%s", snapJSON("list "+foJob))
	snapJSON("delete " + foJob + " s2")
	if out, snaps = list(); snaps["s2"].Name != "" || snaps["s1"].Name == "" {
		t.Fatalf("after delete s2:\n%s", out)
	}
	if out := vm2.MustRun(t, time.Minute, "lvs --noheadings -o lv_name vgd"); strings.Contains(out, "data_snap_s2") || !strings.Contains(out, "data_snap_s1") {
		t.Fatalf("after delete s2, vgd holds:\n%s", out)
	}

	// A leftover of an interrupted create (an LV of the name, tagged by
	// doppel, not in the catalog) is replaced; an LV doppel did not make
	// is refused and kept.
	vm2.MustRun(t, time.Minute, "lvcreate -qq -s -n data_snap_left --addtag doppel vgd/data && lvcreate -qq -s -n data_snap_theirs vgd/data")
	snapJSON("create " + foJob + " left")
	out, rc, err := vm1.Run(t.Context(), cliEnv+"doppel snapshot create "+foJob+" theirs 2>&1")
	if err != nil || rc == 0 || !strings.Contains(out, "was not made by doppel") {
		t.Fatalf("snapshot create over an LV doppel did not make: exit %d %v\n%s", rc, err, out)
	}
	snapJSON("delete " + foJob + " left")
	if out := vm2.MustRun(t, time.Minute, "lvs --noheadings -o lv_name vgd"); strings.Contains(out, "data_snap_left") || !strings.Contains(out, "data_snap_theirs") {
		t.Fatalf("after the leftover cases, vgd holds:\n%s", out)
	}

	// Failover to s1: vm2 serves s1's bytes.
	out = vm1.MustRun(t, 5*time.Minute, cliEnv+"doppel failover "+foJob+" --snapshot s1 --force --yes 2>&1")
	t.Logf("failover --snapshot s1:\n%s", out)
	m = waitStatus(t, vm1, "--server vm2", "vm2 failed over", 3*time.Minute, func(m map[string]jobView) bool {
		return is(m, "vm2", "source", "failed-over") && strings.HasPrefix(m["vm2"].Status.Data.Device, "/dev/nbd")
	})
	if got := sum(vm2, m["vm2"].Status.Data.Device); got != sumA {
		t.Fatalf("vm2 serves %s after the failover to s1, want s1's data %s (data B: %s)", got, sumA, sumB)
	}
	// The newer data (B) is kept as a thin snapshot.
	out = vm2.MustRun(t, 2*time.Minute, `set -e
lv=data_snap_before-failover-epoch-2
echo $lv
lvchange -qq -ay -K vgd/$lv
dd if=/dev/vgd/$lv `+region+` iflag=direct 2>/dev/null | md5sum
lvchange -qq -an vgd/$lv`)
	if !strings.Contains(out, sumB) {
		t.Fatalf("the data before the rollback (%s) is not kept as a thin snapshot:\n%s", sumB, out)
	}
	t.Logf("kept: %s", strings.Fields(out)[0])
}
