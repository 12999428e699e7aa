package agent

import (
	"testing"

	"github.com/doppelha/doppel/daemon/api"
	"github.com/doppelha/doppel/daemon/ha"
)

// TestPromotedAfterFailbackAcceptsWrites: a failback quiesces the source
// that hands the role back; when that host is later promoted again (here
// by a forced failover), its volume must take writes. The quiesce used to
// outlive the handover, so every write of the promoted host failed (EIO).
func TestPromotedAfterFailbackAcceptsWrites(t *testing.T) {
	p := newPair(t, ha.FailoverManual)
	p.write("vm1", 32)
	p.command("vm2", ha.CmdFailover, api.CommandOptions{Force: true})
	p.waitFor("vm1 fenced", func() bool { return p.status("vm1").HA.State == ha.StateSuperseded })
	p.write("vm2", 32)
	p.commandWhen("vm2", ha.CmdReverse, api.CommandOptions{})
	p.waitProtected("vm2")
	p.write("vm2", 32)
	p.command("vm2", ha.CmdFailback, api.CommandOptions{})
	p.waitProtected("vm1") // vm2 was quiesced, handed over, is the target
	p.write("vm1", 32)
	p.verify("vm1")
	p.command("vm2", ha.CmdFailover, api.CommandOptions{Force: true})
	p.waitFor("vm2 serving", func() bool { return p.status("vm2").Data.Device != "" })
	p.write("vm2", 32)
	p.check("vm2")
}
