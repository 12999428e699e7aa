package heartbeat

import (
	"errors"
	"fmt"
	"net"
	"os/exec"
	"strings"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"
)

// addLoss makes the sender's side of the veth drop pct% of outgoing
// packets at random and returns the function that removes the loss. It
// uses `tc qdisc ... netem loss pct%` where the kernel has netem; kernels
// built without sch_netem (like this machine's) get the same effect from a
// tc (tcx egress) BPF program that drops on bpf_get_prandom_u32() % 100 < pct.
func (l *lab) addLoss(pct int) (remove func() error, how string, err error) {
	out, err := exec.Command("tc", "-n", l.nsA, "qdisc", "add", "dev", l.vethA, "root", "netem", "loss", fmt.Sprintf("%d%%", pct)).CombinedOutput()
	if err == nil {
		return func() error {
			return exec.Command("tc", "-n", l.nsA, "qdisc", "del", "dev", l.vethA, "root").Run()
		}, "tc netem", nil
	}
	if !strings.Contains(string(out), "qdisc kind is unknown") {
		return nil, "", fmt.Errorf("tc netem: %v: %s", err, out)
	}
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Type:    ebpf.SchedCLS,
		License: "GPL",
		Instructions: asm.Instructions{
			asm.FnGetPrandomU32.Call(),
			asm.Mod.Imm(asm.R0, 100),
			asm.JLT.Imm(asm.R0, int32(pct), "drop"),
			asm.Mov.Imm(asm.R0, 0), // TCX_PASS
			asm.Return(),
			asm.Mov.Imm(asm.R0, 2).WithSymbol("drop"), // TCX_DROP
			asm.Return(),
		},
	})
	if err != nil {
		return nil, "", fmt.Errorf("load tc loss program: %w", err)
	}
	var lk link.Link
	err = inNS(l.t, l.nsA, func() error {
		ifc, err := net.InterfaceByName(l.vethA)
		if err != nil {
			return err
		}
		lk, err = link.AttachTCX(link.TCXOptions{Interface: ifc.Index, Program: prog, Attach: ebpf.AttachTCXEgress})
		return err
	})
	if err != nil {
		prog.Close()
		return nil, "", fmt.Errorf("attach tc loss program: %w", err)
	}
	return func() error { return errors.Join(lk.Close(), prog.Close()) }, "tcx BPF drop (no sch_netem in this kernel)", nil
}

func TestLossEmulation(t *testing.T) {
	l := newLab(t)
	remove, how, err := l.addLoss(100)
	if err != nil {
		t.Fatal(err)
	}
	t.Log(how)
	out, err := exec.Command("ip", "netns", "exec", l.nsA, "ping", "-c", "2", "-i", "0.2", "-W", "1", l.addrB.String()).CombinedOutput()
	if err == nil {
		t.Fatalf("ping passed through 100%% loss:\n%s", out)
	}
	if err := remove(); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("ip", "netns", "exec", l.nsA, "ping", "-c", "1", "-W", "2", l.addrB.String()).CombinedOutput(); err != nil {
		t.Fatalf("ping after removing the loss: %v\n%s", err, out)
	}
}
