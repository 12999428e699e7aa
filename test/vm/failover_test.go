package vm

import (
	"encoding/json"
	"fmt"
	"regexp"
	"strings"
	"testing"
	"time"
)

// The failover scenario's settings. The monitor is shorter than the
// default (250ms × 8 = 2 s) to keep the test short, but not as short as
// it goes (50ms × 3): guests under software emulation on a loaded machine
// can stall for a few hundred milliseconds, which must not look like a
// dead source.
const (
	foJob     = "web"
	foVolume  = "/var/lib/doppel/web.img"
	foState   = "/var/lib/doppel/agent"
	foMonitor = "interval=100ms,missed=10"
	foPort    = "8080"
	// cliEnv prefixes the client guest's CLI commands: its config, and
	// doppel() bounding every call and logging its start, end and exit
	// code (guest uptime) in /run/cli.log, shown when the test fails.
	cliEnv = `export DOPPEL_CONFIG=/run/doppel-cli.json
doppel() {
	echo "$(cut -d' ' -f1 /proc/uptime) start doppel $*" >>/run/cli.log
	timeout 45 /bin/doppel "$@"
	rc=$?
	echo "$(cut -d' ' -f1 /proc/uptime) end rc=$rc" >>/run/cli.log
	return $rc
}
`
)

// jobView is the part of `doppel job status --json` the test reads.
type jobView struct {
	Server string `json:"server"`
	Err    string `json:"error"`
	Status *struct {
		HA struct {
			Role       string `json:"role"`
			State      string `json:"state"`
			Epoch      uint64 `json:"epoch"`
			Consistent bool   `json:"target_consistent"`
			Reason     string `json:"reason"`
			LastError  string `json:"last_error"`
		} `json:"ha"`
		Data struct {
			Device string `json:"device"`
		} `json:"data"`
		Probe struct {
			Mode string `json:"mode"`
		} `json:"probe"`
	} `json:"status"`
}

func (v jobView) String() string {
	if v.Status == nil {
		return v.Server + ": " + v.Err
	}
	s := v.Status
	return fmt.Sprintf("%s: %s %s epoch %d consistent=%v device=%q probe=%q reason=%q error=%q",
		v.Server, s.HA.Role, s.HA.State, s.HA.Epoch, s.HA.Consistent, s.Data.Device, s.Probe.Mode, s.HA.Reason, s.HA.LastError)
}

// jobStatus runs `doppel job status --json` on the client guest (extra
// flags: --server NAME) and returns the views by server.
func jobStatus(t *testing.T, client *Guest, flags string) (map[string]jobView, string) {
	t.Helper()
	// Exit 0-3 are the headline's (protected ... unreachable).
	out := client.MustRun(t, time.Minute, cliEnv+"doppel job status "+foJob+" --json "+flags+"; [ $? -le 3 ]")
	var st struct {
		Headline string    `json:"headline"`
		Sides    []jobView `json:"sides"`
	}
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		t.Fatalf("job status --json: %v\n%s", err, out)
	}
	m := map[string]jobView{}
	var sb strings.Builder
	sb.WriteString(st.Headline + "\n")
	for _, v := range st.Sides {
		m[v.Server] = v
		sb.WriteString(v.String() + "\n")
	}
	return m, sb.String()
}

// waitStatus polls the job's status until ok accepts it.
func waitStatus(t *testing.T, client *Guest, flags, what string, timeout time.Duration, ok func(map[string]jobView) bool) map[string]jobView {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		m, text := jobStatus(t, client, flags)
		if ok(m) {
			return m
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not after %v; status:\n%s", what, timeout, text)
		}
		time.Sleep(500 * time.Millisecond)
	}
}

func is(m map[string]jobView, server, role, state string) bool {
	v, ok := m[server]
	return ok && v.Status != nil && v.Status.HA.Role == role && v.Status.HA.State == state
}

// slogTime finds the time= of the first line of log matching re.
func slogTime(log string, re *regexp.Regexp) (time.Time, bool) {
	for _, line := range strings.Split(log, "\n") {
		if !re.MatchString(line) {
			continue
		}
		for _, f := range strings.Fields(line) {
			if v, ok := strings.CutPrefix(f, "time="); ok {
				ts, err := time.Parse(time.RFC3339Nano, v)
				return ts, err == nil
			}
		}
	}
	return time.Time{}, false
}

var tokenRE = regexp.MustCompile(`^[A-Za-z0-9_.+/=-]{16,}$`)
var fingerprintRE = regexp.MustCompile(`^sha256:[0-9a-f]{64}$`)

// TestFailover is the two-guest failover cycle with the real agent: agents
// on vm1 and vm2, the servers added and the job created from the client
// guest's CLI (sync mode, service IP 172.17.22.187/24 on app, automatic
// failover); vm1's agent serves the volume as the kernel's /dev/nbd0;
// ext4 on it, files written with fsync; vm1's qemu is killed; vm2's XDP
// probe (in the guest kernel) finds vm1 silent, vm2 fails over and takes
// the service IP; the client guest reaches a TCP service there; on vm2 the
// volume, served as /dev/nbd0, holds the files with the same checksums and
// a clean filesystem. It logs detection -> reachable (the RTO measured from
// the guests' logs, their clocks corrected against the host's).
func TestFailover(t *testing.T) {
	start := time.Now()
	// vm1's state and volume are on a disk: it comes back after the kill.
	l := NewLab(t, GuestConfig{Name: "vm1", DiskMB: 256}, GuestConfig{Name: "vm2"}, GuestConfig{Name: "client"})
	vm1, vm2, client := l.Guests[0], l.Guests[1], l.Guests[2]
	t.Logf("3 guests booted in %v", time.Since(start).Round(time.Millisecond))

	// A tiny TCP service on every host: it names the host that answers.
	service := func(g *Guest) {
		g.MustRun(t, 30*time.Second, `printf '#!/bin/sh\necho "hello from $(hostname)"\n' >/run/svc.sh; chmod +x /run/svc.sh`)
		g.Start(t, "svc", "exec nc -ll -p "+foPort+" -e /run/svc.sh")
	}
	// The agents: control API on the application network, replication on
	// its own; the XDP probe on both NICs.
	agent := func(g *Guest) {
		g.Start(t, "agent", fmt.Sprintf("exec doppel agent --state-dir %s --control-listen %s:6320 --repl-listen %s:6325 --probe-iface app --probe-iface repl",
			foState, g.AppIP, g.ReplIP))
	}
	for _, g := range []*Guest{vm1, vm2} {
		service(g)
	}

	// 1. Start the agents.
	for _, g := range []*Guest{vm1, vm2} {
		agent(g)
	}
	type cred struct{ token, fingerprint string }
	creds := map[string]cred{}
	for _, g := range []*Guest{vm1, vm2} {
		out := g.MustRun(t, 2*time.Minute, `
for i in $(seq 1200); do
	grep -q "agent ready" /run/agent.log && [ -s `+foState+`/token ] && break
	pidof doppel >/dev/null || { echo "agent exited:"; cat /run/agent.log; exit 1; }
	sleep 0.1
done
grep -o 'fingerprint=sha256:[0-9a-f]*' /run/agent.log | head -n 1 | cut -d= -f2
cat `+foState+`/token
stat -c %a `+foState+`/token`)
		f := strings.Fields(out)
		if len(f) != 3 || !fingerprintRE.MatchString(f[0]) || !tokenRE.MatchString(f[1]) || f[2] != "600" {
			t.Fatalf("%s: want fingerprint, token and mode 600, got:\n%s", g.Name, out)
		}
		creds[g.Name] = cred{token: f[1], fingerprint: f[0]}
	}

	// 2. The console (the client guest): pin both agents, create the job.
	for _, g := range []*Guest{vm1, vm2} {
		c := creds[g.Name]
		out := client.MustRun(t, time.Minute, fmt.Sprintf(cliEnv+`set -e
umask 077
echo %s >/run/%s.token
doppel server add %s %s --token-file /run/%s.token --fingerprint %s`, c.token, g.Name, g.Name, g.AppIP, g.Name, c.fingerprint))
		t.Logf("server add %s: %s", g.Name, strings.TrimSpace(out))
	}
	out := client.MustRun(t, 2*time.Minute, cliEnv+"doppel job create "+foJob+" --source vm1 --target vm2 --volume "+foVolume+
		" --size 64M --mode sync --service-ip "+ServiceIP+"/24@app --failover auto --monitor "+foMonitor)
	t.Logf("job create: %s", strings.TrimSpace(out))

	// 3. vm1 serves the volume as /dev/nbd0 and holds the service IP; vm2
	// replicates with a consistent copy, its probe in XDP.
	m := waitStatus(t, client, "", "vm1 serving /dev/nbd0 and vm2 replicating", 3*time.Minute, func(m map[string]jobView) bool {
		return is(m, "vm1", "source", "replicating") && is(m, "vm2", "target", "replicating") &&
			m["vm2"].Status.HA.Consistent && strings.HasPrefix(m["vm1"].Status.Data.Device, "/dev/nbd")
	})
	dev := m["vm1"].Status.Data.Device
	for _, s := range []string{"vm1", "vm2"} {
		if mode := m[s].Status.Probe.Mode; mode != "xdp-generic" && mode != "xdp-driver" {
			t.Errorf("%s: probe mode %q, want XDP (xdp-generic or xdp-driver) in the guest kernel", s, mode)
		}
	}
	t.Logf("protected: vm1 serves %s, probe modes vm1 %s, vm2 %s", dev, m["vm1"].Status.Probe.Mode, m["vm2"].Status.Probe.Mode)
	out = vm1.MustRun(t, 30*time.Second, "cat /sys/block/"+strings.TrimPrefix(dev, "/dev/")+"/queue/write_cache; ip addr show app")
	if !strings.Contains(out, "write back") || !strings.Contains(out, ServiceIP+"/24") {
		t.Fatalf("vm1: want %s write back and %s on app:\n%s", dev, ServiceIP, out)
	}
	if out := client.MustRun(t, 30*time.Second, "nc -w 5 "+ServiceIP+" "+foPort+" </dev/null"); strings.TrimSpace(out) != "hello from vm1" {
		t.Fatalf("client -> %s:%s before the failover: %q", ServiceIP, foPort, out)
	}
	if out := vm2.MustRun(t, 30*time.Second, "ip addr show app; [ -e /sys/block/nbd0/pid ] && echo nbd0 connected; true"); strings.Contains(out, ServiceIP+"/") || strings.Contains(out, "nbd0 connected") {
		t.Fatalf("vm2, the target, holds the service IP or serves the volume before any failover:\n%s", out)
	}

	// 4. ext4 on /dev/nbd0 on vm1, files written with fsync: in sync mode
	// each is on vm2 when its fsync returns.
	sums := vm1.MustRun(t, 3*time.Minute, `set -e
mkfs.ext4 -q -F `+dev+`
mkdir -p /mnt/v
mount -t ext4 `+dev+` /mnt/v
for i in 1 2 3 4 5 6 7 8; do
	dd if=/dev/urandom of=/mnt/v/f$i bs=64k count=$((i*3)) conv=fsync 2>/dev/null
done
mkdir /mnt/v/dir
echo "written on vm1" >/mnt/v/dir/note
sync -d /mnt/v/dir/note; sync -f /mnt/v
cd /mnt/v && md5sum f* dir/note`)
	if strings.Count(sums, "\n") != 9 {
		t.Fatalf("checksums on vm1:\n%s", sums)
	}
	m, text := jobStatus(t, client, "")
	if !is(m, "vm1", "source", "replicating") || !is(m, "vm2", "target", "replicating") || !m["vm2"].Status.HA.Consistent {
		t.Fatalf("after the writes, want replicating with a consistent target:\n%s", text)
	}

	// 5. Kill vm1's qemu. The client polls the service IP until vm2
	// answers; the guests' clocks are measured against the host's to put
	// their timestamps on one time line.
	clkVM2, clkClient := vm2.Clock(t), client.Clock(t)
	// A new connection every 100 ms (each waits up to 1 s: busybox nc has
	// no shorter timeout), so that the time of the first answer from vm2
	// is known to about 100 ms.
	client.Start(t, "reach", `
now() { `+guestNow+`; }
for i in $(seq 900); do
	[ -s /run/reach.t ] && exit 0
	( out=$(nc -w 1 `+ServiceIP+` `+foPort+` </dev/null 2>/dev/null)
	  case "$out" in *"hello from vm2"*) now >>/run/reach.t ;; esac ) &
	sleep 0.1
done
echo "gave up"; exit 1`)
	killed := time.Now()
	vm1.Kill()
	t.Logf("vm1 killed %v into the test", killed.Sub(start).Round(time.Millisecond))

	// 6. vm2 fails over by itself and takes the service IP.
	m = waitStatus(t, client, "--server vm2", "automatic failover on vm2", 2*time.Minute, func(m map[string]jobView) bool {
		return is(m, "vm2", "source", "failed-over")
	})
	if mode := m["vm2"].Status.Probe.Mode; mode != "xdp-generic" && mode != "xdp-driver" {
		t.Errorf("vm2: probe mode %q after the failover, want XDP", mode)
	}
	if m["vm2"].Status.HA.Epoch < 2 {
		t.Errorf("vm2: epoch %d after the failover, want a new generation", m["vm2"].Status.HA.Epoch)
	}
	dev2 := m["vm2"].Status.Data.Device
	if !strings.HasPrefix(dev2, "/dev/nbd") {
		t.Fatalf("vm2 serves the volume at %q after the failover, want /dev/nbdN", dev2)
	}
	reach := client.MustRun(t, 2*time.Minute, `
for i in $(seq 600); do [ -s /run/reach.t ] && break; sleep 0.1; done
sleep 1.5  # the connections in flight
sort -n /run/reach.t | head -n 1`)
	reachedGuest, err := parseGuestTime(reach)
	if err != nil {
		t.Fatalf("the client never reached %s on vm2: %v\n%s", ServiceIP, err, client.MustRun(t, 30*time.Second, "cat /run/reach.log"))
	}
	if out := client.MustRun(t, 30*time.Second, "nc -w 5 "+ServiceIP+" "+foPort+" </dev/null"); strings.TrimSpace(out) != "hello from vm2" {
		t.Errorf("client -> %s:%s after the failover: %q", ServiceIP, foPort, out)
	}
	agentLog := vm2.MustRun(t, 30*time.Second, "cat /run/agent.log; ip addr show app >&2")
	if !strings.Contains(agentLog, ServiceIP+"/24") {
		t.Errorf("vm2 does not hold %s on app:\n%s", ServiceIP, agentLog)
	}
	// The failover decision: its first action runs the pre-failover hook.
	detected, ok1 := slogTime(agentLog, regexp.MustCompile(`msg="action done".*run-script pre-failover`))
	ipUp, ok2 := slogTime(agentLog, regexp.MustCompile(`msg="action done".*apply-identity`))
	if !ok1 || !ok2 {
		t.Errorf("vm2's log lacks the failover actions:\n%s", agentLog)
	}
	reached := clkClient.Host(reachedGuest)
	detectedH, ipUpH := clkVM2.Host(detected), clkVM2.Host(ipUp)
	clockErr := clkVM2.Error + clkClient.Error
	t.Logf("RTO: kill -> detected %v, detected -> IP on vm2 %v, detected -> client reached %s %v, kill -> reached %v (clock error ±%v; monitor %s)",
		detectedH.Sub(killed).Round(time.Millisecond), ipUpH.Sub(detectedH).Round(time.Millisecond), ServiceIP,
		reached.Sub(detectedH).Round(time.Millisecond), reached.Sub(killed).Round(time.Millisecond), clockErr.Round(time.Millisecond), foMonitor)
	if d := detectedH.Sub(killed); ok1 && d < -clockErr {
		t.Errorf("vm2 decided to fail over %v before vm1 was killed", -d)
	}
	// Generous: software emulation on a shared machine. The RTO bound
	// (interval × missed + 1 s) is checked by the namespace tier.
	if d := reached.Sub(killed); d > 30*time.Second {
		t.Errorf("the client reached the service %v after the kill, want under 30 s", d)
	}

	// 7. The data on vm2: the same files, a clean filesystem.
	out = vm2.MustRun(t, 3*time.Minute, `set -e
mkdir -p /mnt/v
cat >/run/sums <<'EOF'
`+sums+`EOF
mount -t ext4 `+dev2+` /mnt/v
cd /mnt/v && md5sum -c /run/sums && cd /
# The promoted copy takes writes.
echo "written on vm2 after the failover" >/mnt/v/after
sync -f /mnt/v
umount /mnt/v
fsck.ext4 -f -n `+dev2+` 2>&1`)
	if strings.Count(out, ": OK") != 9 {
		t.Errorf("checksums on vm2:\n%s", out)
	}
	t.Logf("on vm2:\n%s", out)
	if t.Failed() {
		t.FailNow()
	}

	// 8. vm1 comes back (its disk kept the agent's state and the volume):
	// it finds it was superseded and stays fenced.
	l.Restart(vm1)
	service(vm1)
	agent(vm1)
	waitStatus(t, client, "", "vm1 back and fenced", 2*time.Minute, func(m map[string]jobView) bool {
		return is(m, "vm1", "source", "superseded") && is(m, "vm2", "source", "failed-over")
	})
	if out := vm1.MustRun(t, 30*time.Second, "ip addr show app; [ -e /sys/block/nbd0/pid ] && echo nbd0 connected; true"); strings.Contains(out, ServiceIP+"/") || strings.Contains(out, "nbd0 connected") {
		t.Fatalf("vm1, superseded, holds the service IP or serves the volume:\n%s", out)
	}
	if out := client.MustRun(t, 30*time.Second, "nc -w 5 "+ServiceIP+" "+foPort+" </dev/null"); strings.TrimSpace(out) != "hello from vm2" {
		t.Fatalf("client -> %s:%s with vm1 back: %q", ServiceIP, foPort, out)
	}

	// 9. doppel reverse: vm1 becomes the target of vm2 and resyncs.
	out = client.MustRun(t, 3*time.Minute, cliEnv+"doppel reverse "+foJob)
	t.Logf("reverse: %s", strings.TrimSpace(out))
	waitStatus(t, client, "", "protection reversed (vm2 -> vm1)", 3*time.Minute, func(m map[string]jobView) bool {
		return is(m, "vm2", "source", "replicating") && is(m, "vm1", "target", "replicating") && m["vm1"].Status.HA.Consistent
	})

	// 10. doppel failback: vm1 is the source again, with vm2's writes,
	// serving /dev/nbd0 and holding the service IP; vm2 is its target.
	out = client.MustRun(t, 3*time.Minute, cliEnv+"doppel failback "+foJob)
	t.Logf("failback: %s", strings.TrimSpace(out))
	m = waitStatus(t, client, "", "failed back (vm1 -> vm2)", 3*time.Minute, func(m map[string]jobView) bool {
		return is(m, "vm1", "source", "replicating") && is(m, "vm2", "target", "replicating") && m["vm2"].Status.HA.Consistent &&
			strings.HasPrefix(m["vm1"].Status.Data.Device, "/dev/nbd")
	})
	dev1 := m["vm1"].Status.Data.Device
	if out := vm2.MustRun(t, 30*time.Second, "ip addr show app; [ -e /sys/block/nbd0/pid ] && echo nbd0 connected; true"); strings.Contains(out, ServiceIP+"/") || strings.Contains(out, "nbd0 connected") {
		t.Errorf("vm2, the target again, holds the service IP or serves the volume:\n%s", out)
	}
	client.MustRun(t, time.Minute, `
for i in $(seq 100); do
	out=$(nc -w 1 `+ServiceIP+` `+foPort+` </dev/null 2>/dev/null)
	[ "$out" = "hello from vm1" ] && { echo "$out"; exit 0; }
	sleep 0.2
done
echo "last answer: $out"; exit 1`)
	out = vm1.MustRun(t, 3*time.Minute, `set -e
mkdir -p /mnt/v
cat >/run/sums <<'EOF'
`+sums+`EOF
mount -t ext4 `+dev1+` /mnt/v
cd /mnt/v && md5sum -c /run/sums && cat after && cd /
umount /mnt/v
fsck.ext4 -f -n `+dev1+` 2>&1`)
	if strings.Count(out, ": OK") != 9 || !strings.Contains(out, "written on vm2 after the failover") {
		t.Errorf("data on vm1 after the failback:\n%s", out)
	}
	t.Logf("TestFailover took %v", time.Since(start).Round(time.Millisecond))
}
