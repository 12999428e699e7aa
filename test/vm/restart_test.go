package vm

import (
	"fmt"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"
)

// TestRestartKeepsDevice restarts the source agent (doppel agent
// restart) twice while ext4 on the kernel's /dev/nbd0 is written with
// fsync: the new agent process takes over the server ends of the
// kernel's NBD connections (SCM_RIGHTS) and the device stays connected.
// No write fails, the kernel logs no I/O error, the file system stays
// read-write and fsck finds it clean, and doppel verify finds no
// difference. It logs the longest gap between two fsynced writes around
// each restart and elsewhere.
func TestRestartKeepsDevice(t *testing.T) {
	l := NewLab(t, GuestConfig{Name: "vm1"}, GuestConfig{Name: "vm2"})
	vm1, vm2 := l.Guests[0], l.Guests[1]
	const state = "/var/lib/doppel/agent"
	for _, g := range []*Guest{vm1, vm2} {
		g.Start(t, "agent", fmt.Sprintf("exec doppel agent --state-dir %s --control-listen %s:6320 --repl-listen %s:6325 --probe-mode userspace",
			state, g.AppIP, g.ReplIP))
	}
	creds := map[string][2]string{}
	for _, g := range []*Guest{vm1, vm2} {
		out := g.MustRun(t, 2*time.Minute, `
for i in $(seq 1200); do
	grep -q "agent ready" /run/agent.log && [ -s `+state+`/token ] && break
	pidof doppel >/dev/null || { echo "agent exited:"; cat /run/agent.log; exit 1; }
	sleep 0.1
done
grep -o 'fingerprint=sha256:[0-9a-f]*' /run/agent.log | head -n 1 | cut -d= -f2
cat `+state+`/token`)
		f := strings.Fields(out)
		if len(f) != 2 || !fingerprintRE.MatchString(f[0]) {
			t.Fatalf("%s: want fingerprint and token, got:\n%s", g.Name, out)
		}
		creds[g.Name] = [2]string{f[0], f[1]}
	}
	// The console is vm1.
	for _, g := range []*Guest{vm1, vm2} {
		vm1.MustRun(t, time.Minute, fmt.Sprintf(cliEnv+`set -e
umask 077
echo %s >/run/%s.token
doppel server add %s %s --token-file /run/%s.token --fingerprint %s`, creds[g.Name][1], g.Name, g.Name, g.AppIP, g.Name, creds[g.Name][0]))
	}
	vm1.MustRun(t, 3*time.Minute, cliEnv+"doppel job create "+foJob+" --source vm1 --target vm2 --volume /var/lib/doppel/web.img --size 64M --mode sync --monitor interval=250ms,missed=8 --wait 2m")
	m := waitStatus(t, vm1, "", "vm1 serving /dev/nbd0 and vm2 replicating", 3*time.Minute, func(m map[string]jobView) bool {
		return is(m, "vm1", "source", "replicating") && is(m, "vm2", "target", "replicating") &&
			m["vm2"].Status.HA.Consistent && strings.HasPrefix(m["vm1"].Status.Data.Device, "/dev/nbd")
	})
	dev := m["vm1"].Status.Data.Device

	// ext4 on the device; the application writes 64 KiB files with fsync
	// and logs the time each write returned.
	vm1.MustRun(t, 3*time.Minute, `set -e
dmesg -c >/dev/null
mkfs.ext4 -q -F `+dev+`
mkdir -p /mnt/v
mount -t ext4 `+dev+` /mnt/v`)
	vm1.Start(t, "writer", `
now() { `+guestNow+`; }
i=0
while [ ! -e /run/writer.stop ]; do
	if out=$(dd if=/dev/urandom of=/mnt/v/f$((i % 64)) bs=64k count=1 conv=fsync 2>&1); then
		now >>/run/writer.t
	else
		echo "write $i failed: $out" >>/run/writer.err; exit 1
	fi
	i=$((i+1))
done`)
	guestTime := func(s string) float64 {
		v, err := strconv.ParseFloat(strings.TrimSpace(s), 64)
		if err != nil {
			t.Fatalf("guest time %q: %v", s, err)
		}
		return v
	}
	var windows [][2]float64
	for i := range 2 {
		time.Sleep(3 * time.Second)
		out := vm1.MustRun(t, 2*time.Minute, cliEnv+`
now() { `+guestNow+`; }
now
doppel agent restart --server vm1 || exit 1
now`)
		lines := strings.Split(strings.TrimSpace(out), "\n")
		if len(lines) < 3 {
			t.Fatalf("restart %d: %s", i+1, out)
		}
		windows = append(windows, [2]float64{guestTime(lines[0]), guestTime(lines[len(lines)-1])})
		t.Logf("restart %d: %s", i+1, strings.Join(lines[1:len(lines)-1], " "))
	}
	time.Sleep(3 * time.Second)
	out := vm1.MustRun(t, time.Minute, `touch /run/writer.stop; sleep 2
cat /run/writer.err 2>/dev/null | head -5; echo ---
cat /run/writer.t; echo ---
dmesg | grep -iE 'I/O error|EXT4-fs (error|warning)|Remounting|nbd' ; echo ---
grep ' /mnt/v ' /proc/mounts`)
	parts := strings.Split(out, "---")
	if len(parts) != 4 {
		t.Fatalf("writer output:\n%s", out)
	}
	if e := strings.TrimSpace(parts[0]); e != "" {
		t.Fatalf("the application's writes failed across the restarts:\n%s\nkernel:\n%s", e, parts[2])
	}
	if k := parts[2]; strings.Contains(k, "I/O error") || strings.Contains(k, "EXT4-fs error") || strings.Contains(k, "Remounting") {
		t.Fatalf("the kernel logged errors:\n%s", k)
	}
	if !strings.Contains(parts[3], " rw,") {
		t.Fatalf("the file system is not read-write: %s", parts[3])
	}
	var times []float64
	for _, l := range strings.Fields(parts[1]) {
		times = append(times, guestTime(l))
	}
	sort.Float64s(times)
	var around, other float64
	for i := 1; i < len(times); i++ {
		gap, hit := times[i]-times[i-1], false
		for _, w := range windows {
			hit = hit || times[i] >= w[0] && times[i-1] <= w[1]
		}
		if hit {
			around = max(around, gap)
		} else {
			other = max(other, gap)
		}
	}
	t.Logf("%d fsynced 64 KiB writes; the longest gap between two across a restart %.3f s, elsewhere %.3f s", len(times), around, other)
	t.Logf("vm1's agents during the restarts:\n%s", vm1.MustRun(t, time.Minute,
		`grep -E 'restart|handed|adopted|taking over|job state|released|action done|nbd device' /run/agent.log | tail -60`))
	vm1.MustRun(t, 2*time.Minute, "set -e; umount /mnt/v; fsck.ext4 -n -f "+dev)
	// MustRun fails on a non-zero exit: verify exits 1 when they differ.
	out = vm1.MustRun(t, 2*time.Minute, cliEnv+"doppel verify "+foJob)
	if !strings.Contains(out, ", 0 differ") {
		t.Fatalf("verify:\n%s", out)
	}
	t.Logf("%s", strings.TrimSpace(out))
}
