package vm

import (
	"fmt"
	"strings"
	"testing"
	"time"
)

// TestBootAndNetwork boots three guests (source, target, client) on the
// lab network and checks that each reaches the others on both subnets.
func TestBootAndNetwork(t *testing.T) {
	start := time.Now()
	l := NewLab(t, GuestConfig{Name: "vm1"}, GuestConfig{Name: "vm2"}, GuestConfig{Name: "client"})
	t.Logf("3 guests booted in %v", time.Since(start).Round(time.Millisecond))
	for _, g := range l.Guests {
		out := g.MustRun(t, 30*time.Second, "uname -r; hostname; ip addr show app; ip addr show repl")
		if !strings.Contains(out, g.Name) || !strings.Contains(out, g.AppIP+"/24") || !strings.Contains(out, g.ReplIP+"/24") {
			t.Errorf("%s: unexpected identity:\n%s", g.Name, out)
		}
		var sb strings.Builder
		for _, p := range l.Guests {
			if p != g {
				fmt.Fprintf(&sb, "ping -c 1 -W 5 %s && ping -c 1 -W 5 %s || exit 1\n", p.AppIP, p.ReplIP)
			}
		}
		g.MustRun(t, time.Minute, sb.String())
	}
	// What the agent needs in a guest: BTF for the XDP probe, bpffs, entropy.
	out := l.Guests[0].MustRun(t, 30*time.Second, `
[ -e /sys/kernel/btf/vmlinux ] && echo btf
grep -q ' /sys/fs/bpf bpf' /proc/mounts && echo bpffs
cat /proc/sys/kernel/random/entropy_avail >/dev/null && head -c 16 /dev/random | wc -c`)
	if !strings.Contains(out, "btf\n") || !strings.Contains(out, "bpffs\n") || !strings.Contains(out, "16") {
		t.Errorf("guest features:\n%s", out)
	}
	// Background processes log to /run/NAME.log.
	l.Guests[1].Start(t, "sleeper", `echo "it's started"; sleep 600`)
	if out := l.Guests[1].MustRun(t, 30*time.Second, "sleep 0.5; cat /run/sleeper.log; pidof sleep"); !strings.Contains(out, "it's started") {
		t.Errorf("background process:\n%s", out)
	}
	// A failing command reports its exit code and output.
	out, rc, err := l.Guests[0].Run(t.Context(), "echo oops >&2; exit 7")
	if err != nil || rc != 7 || out != "oops\n" {
		t.Errorf("exit code path: out %q rc %d err %v", out, rc, err)
	}
}
