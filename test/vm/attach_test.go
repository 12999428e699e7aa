package vm

import (
	"encoding/json"
	"strings"
	"testing"
	"time"
)

// attachScript starts `doppel nbd attach` in the background of the guest
// (its exit code lands in /run/attach.rc) and waits until the device is
// connected.
func attachScript(flags string) string {
	return `
rm -f /run/attach.rc /run/attach.out /run/attach.log
( doppel nbd attach --file /var/lib/doppel/disk.img --size 128M --device /dev/nbd0 ` + flags + ` \
	--connections 2 --stats-file /run/stats.json >/run/attach.out 2>/run/attach.log
  echo $? >/run/attach.rc ) &
for i in $(seq 300); do
	[ -e /sys/block/nbd0/pid ] && [ -s /run/attach.out ] && break
	[ -e /run/attach.rc ] && break
	sleep 0.1
done
if ! [ -e /sys/block/nbd0/pid ]; then
	echo "not attached:"; cat /run/attach.log; exit 1
fi
cat /run/attach.out
`
}

// detachScript sends SIGTERM and waits for the process to exit.
const detachScript = `
pid=$(pidof doppel)
[ -n "$pid" ] || { echo "doppel is not running"; cat /run/attach.log; exit 1; }
kill -TERM $pid
for i in $(seq 600); do [ -e /run/attach.rc ] && break; sleep 0.1; done
[ -e /run/attach.rc ] || { echo "doppel did not exit"; cat /run/attach.log; exit 1; }
rc=$(cat /run/attach.rc)
[ "$rc" = 0 ] || { echo "doppel exited $rc"; cat /run/attach.log; exit 1; }
echo "size=$(cat /sys/block/nbd0/size)"
[ -e /sys/block/nbd0/pid ] && echo "pid=$(cat /sys/block/nbd0/pid)"
exit 0
`

// stats asks the running doppel for its counters (SIGUSR1).
func stats(t *testing.T, g *Guest) map[string]uint64 {
	t.Helper()
	out := g.MustRun(t, 30*time.Second, `
rm -f /run/stats.json
kill -USR1 $(pidof doppel)
for i in $(seq 100); do [ -s /run/stats.json ] && break; sleep 0.1; done
cat /run/stats.json`)
	var m map[string]uint64
	if err := json.Unmarshal([]byte(out), &m); err != nil {
		t.Fatalf("stats %q: %v", out, err)
	}
	return m
}

// TestNBDAttach is the kernel path end to end in a guest whose kernel has
// the nbd module: attach with the flags (write-back cache, FUA, trim),
// FLUSH requests on sync, a filesystem that survives fsck, fio with
// verification, a clean detach, and the bad inputs: no module, a busy
// device, a bad device name.
func TestNBDAttach(t *testing.T) {
	kernelTests := GoTestBinary(t, "./blockdev/kernel")
	l := NewLab(t, GuestConfig{Name: "vm1", Bundles: []Bundle{FioBundle}, Files: map[string]string{"/bin/kernel.test": kernelTests}})
	g := l.Guests[0]
	long := 3 * time.Minute

	t.Run("missing module", func(t *testing.T) {
		// Hide nbd.ko: attach must say so and create nothing.
		out, rc, err := g.Run(t.Context(), `
ko=$(find /lib/modules -name nbd.ko)
mv $ko /run/nbd.ko.hidden
doppel nbd attach --file /var/lib/doppel/none.img --size 16M --device /dev/nbd0 2>&1
rc=$?
mv /run/nbd.ko.hidden $ko
[ -e /var/lib/doppel/none.img ] && echo "file created"
[ -e /sys/module/nbd ] && echo "module loaded"
exit $rc`)
		if err != nil {
			t.Fatal(err)
		}
		if rc != 1 || !strings.Contains(out, "kernel has no nbd support: modprobe nbd failed:") ||
			strings.Contains(out, "file created") || strings.Contains(out, "module loaded") {
			t.Errorf("exit %d:\n%s", rc, out)
		}
	})

	t.Run("attach", func(t *testing.T) {
		out := g.MustRun(t, long, attachScript(""))
		if strings.TrimSpace(out) != "/dev/nbd0" {
			t.Fatalf("attach printed %q", out)
		}
		out = g.MustRun(t, 30*time.Second, `
[ -e /sys/module/nbd ] && echo module=loaded
echo write_cache=$(cat /sys/block/nbd0/queue/write_cache)
echo fua=$(cat /sys/block/nbd0/queue/fua)
echo discard=$(cat /sys/block/nbd0/queue/discard_max_bytes)
echo write_zeroes=$(cat /sys/block/nbd0/queue/write_zeroes_max_bytes)
echo size=$(cat /sys/block/nbd0/size)
echo backend=$(cat /sys/block/nbd0/backend)
# The pid file names a live thread of the server.
tgid=$(awk '/^Tgid/ {print $2}' /proc/$(cat /sys/block/nbd0/pid)/status)
[ "$tgid" = "$(pidof doppel)" ] && echo pid=doppel
# PF_MEMALLOC_NOIO|PF_LOCAL_THROTTLE (PR_SET_IO_FLUSHER) on every thread.
for f in /proc/$(pidof doppel)/task/*/stat; do
	awk '{ if (and($9, 1572864) != 1572864) print "not an io flusher: " FILENAME }' $f
done`)
		for _, want := range []string{"module=loaded", "write_cache=write back", "fua=1", "size=262144", "backend=doppel:/var/lib/doppel/disk.img", "pid=doppel"} {
			if !strings.Contains(out, want+"\n") {
				t.Errorf("want %q in:\n%s", want, out)
			}
		}
		t.Logf("queue limits:\n%s", out)
		if strings.Contains(out, "not an io flusher") {
			t.Errorf("PR_SET_IO_FLUSHER missing:\n%s", out)
		}
		if strings.Contains(out, "discard=0\n") {
			t.Errorf("no discard (SEND_TRIM not applied):\n%s", out)
		}
	})
	if t.Failed() {
		t.FailNow()
	}

	t.Run("flush on sync", func(t *testing.T) {
		before := stats(t, g)
		g.MustRun(t, long, "dd if=/dev/urandom of=/dev/nbd0 bs=64k count=16 conv=fsync 2>&1")
		after := stats(t, g)
		if after["Flushes"] <= before["Flushes"] || after["Writes"] <= before["Writes"] {
			t.Errorf("dd conv=fsync: flushes %d -> %d, writes %d -> %d", before["Flushes"], after["Flushes"], before["Writes"], after["Writes"])
		}
	})

	t.Run("fio verify", func(t *testing.T) {
		out := g.MustRun(t, 5*time.Minute, `
fio --name=verify --filename=/dev/nbd0 --rw=randwrite --bs=4k --size=16M \
	--ioengine=libaio --iodepth=16 --direct=1 --verify=crc32c --verify_fatal=1 \
	--do_verify=1 --group_reporting --minimal 2>&1`)
		t.Logf("fio: %s", strings.TrimSpace(out))
	})

	t.Run("ext4", func(t *testing.T) {
		before := stats(t, g)
		g.MustRun(t, long, `set -e
mkfs.ext4 -q -F /dev/nbd0
mkdir -p /mnt/v
mount -t ext4 /dev/nbd0 /mnt/v
for i in 1 2 3 4 5 6 7 8; do dd if=/dev/urandom of=/mnt/v/f$i bs=64k count=$((i*4)) 2>/dev/null; done
md5sum /mnt/v/f* >/run/sums
sync`)
		mid := stats(t, g)
		if mid["Flushes"] <= before["Flushes"] {
			t.Errorf("sync on ext4: flushes %d -> %d", before["Flushes"], mid["Flushes"])
		}
		if mid["FUA"] == 0 {
			t.Errorf("ext4 journal commits sent no FUA writes: %v", mid)
		}
		out := g.MustRun(t, long, `set -e
rm /mnt/v/f1 /mnt/v/f2
fstrim -v /mnt/v
umount /mnt/v
fsck.ext4 -f -n /dev/nbd0
mount -t ext4 /dev/nbd0 /mnt/v
grep -v -e /f1 -e /f2 /run/sums | md5sum -c
umount /mnt/v`)
		t.Logf("%s", out)
		st := stats(t, g)
		if st["Trims"] == 0 {
			t.Errorf("fstrim sent no TRIM: %v", st)
		}
		if st["Errors"] != 0 {
			t.Errorf("the server answered errors: %v", st)
		}
	})

	t.Run("busy device", func(t *testing.T) {
		out, rc, err := g.Run(t.Context(), `
before=$(cat /sys/block/nbd0/pid)
doppel nbd attach --file /var/lib/doppel/other.img --size 16M --device /dev/nbd0 2>&1
rc=$?
[ -e /var/lib/doppel/other.img ] && echo "file created"
[ "$(cat /sys/block/nbd0/pid)" = "$before" ] || echo "nbd0 changed"
[ "$(cat /sys/block/nbd0/size)" = 262144 ] || echo "nbd0 size changed"
for d in /sys/block/nbd*; do [ -e $d/pid ] && echo "connected: ${d##*/}"; done
dd if=/dev/nbd0 of=/dev/null bs=4k count=1 iflag=direct 2>/dev/null || echo "nbd0 broken"
exit $rc`)
		if err != nil {
			t.Fatal(err)
		}
		if rc != 1 || !strings.Contains(out, "nbd device is busy: /dev/nbd0 is connected (134217728 bytes, served by pid") ||
			strings.Contains(out, "file created") || strings.Contains(out, "changed") || strings.Contains(out, "broken") ||
			strings.Count(out, "connected: ") != 1 {
			t.Errorf("exit %d:\n%s", rc, out)
		}
		out, rc, _ = g.Run(t.Context(), "doppel nbd attach --file /var/lib/doppel/x.img --size 16M --device /dev/sda 2>&1")
		if rc != 64 || !strings.Contains(out, "not an nbd device") {
			t.Errorf("--device /dev/sda: exit %d: %s", rc, out)
		}
	})

	t.Run("detach", func(t *testing.T) {
		out := g.MustRun(t, long, detachScript)
		if strings.TrimSpace(out) != "size=0" {
			t.Errorf("after detach:\n%s", out)
		}
		// The device is reusable at once, and the data survived.
		out = g.MustRun(t, long, attachScript("")+`
mount -t ext4 /dev/nbd0 /mnt/v && grep -v -e /f1 -e /f2 /run/sums | md5sum -c && umount /mnt/v`)
		if !strings.Contains(out, "/mnt/v/f8: OK") {
			t.Errorf("re-attach:\n%s", out)
		}
		out = g.MustRun(t, long, detachScript)
		if strings.TrimSpace(out) != "size=0" {
			t.Errorf("after second detach:\n%s", out)
		}
		var final map[string]uint64
		if err := json.Unmarshal([]byte(g.MustRun(t, 30*time.Second, "cat /run/stats.json")), &final); err != nil {
			t.Fatal(err)
		}
		if final["Errors"] != 0 || final["ProtocolFault"] != 0 || final["Reads"] == 0 {
			t.Errorf("final counters: %v", final)
		}
		out = g.MustRun(t, 30*time.Second, "dmesg | grep -i -E 'nbd|BUG|WARNING|blocked for more|error' || true")
		for _, bad := range []string{"BUG", "WARNING", "blocked for more", "Dead connection", "timed out", "I/O error", "returned error"} {
			if strings.Contains(out, bad) {
				t.Errorf("kernel log has %q:\n%s", bad, out)
			}
		}
		t.Logf("kernel log:\n%s", out)
	})

	t.Run("crash and reclaim", func(t *testing.T) {
		g.MustRun(t, long, attachScript(""))
		// The server dies: the kernel keeps the device, with dead sockets.
		out, _, err := g.Run(t.Context(), `
kill -KILL $(pidof doppel)
for i in $(seq 100); do [ -e /run/attach.rc ] && break; sleep 0.1; done
[ -e /sys/block/nbd0/pid ] && echo "still connected"
doppel nbd attach --file /var/lib/doppel/disk.img --device /dev/nbd0 2>&1
echo "rc=$?"`)
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(out, "still connected") || !strings.Contains(out, "is gone: the device is stale") || !strings.Contains(out, "rc=1") {
			t.Fatalf("after kill -9:\n%s", out)
		}
		out = g.MustRun(t, long, attachScript("--reclaim")+`
grep -q "reclaiming a stale nbd device" /run/attach.log || { echo "no reclaim logged"; cat /run/attach.log; exit 1; }
mount -t ext4 /dev/nbd0 /mnt/v && grep -v -e /f1 -e /f2 /run/sums | md5sum -c && umount /mnt/v`)
		if !strings.Contains(out, "/mnt/v/f8: OK") {
			t.Errorf("after reclaim:\n%s", out)
		}
		if out := g.MustRun(t, long, detachScript); strings.TrimSpace(out) != "size=0" {
			t.Errorf("after detach:\n%s", out)
		}
	})

	// blockdev/kernel's own root test, which needs a kernel with nbd.
	t.Run("package tests", func(t *testing.T) {
		out := g.MustRun(t, long, "cd /tmp && kernel.test -test.v -test.run 'TestAttachHost' 2>&1")
		if !strings.Contains(out, "--- PASS: TestAttachHost") {
			t.Errorf("TestAttachHost did not pass:\n%s", out)
		}
		t.Logf("in the guest:\n%s", out)
	})
}
