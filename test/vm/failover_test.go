package vm

import "testing"

// TestFailover is issue 8's two-guest scenario: attach /dev/nbd0 on vm1
// through the agent, mkfs.ext4, mount, write files with fsync; replicate to
// vm2; kill vm1 (qemu quit); vm2's XDP probe (in the guest kernel) detects
// it, vm2 fails over and takes the service IP 172.17.22.187; the client
// guest reaches it and the files are intact.
//
// The lab it runs on (vm1, vm2, client on both subnets) is
// TestBootAndNetwork's. The scenario itself needs the agent (doppel agent,
// job create, failover), and is written in the integration step, against
// the agent's real commands.
func TestFailover(t *testing.T) {
	Need(t)
	t.Skip("not written yet: needs the agent; added in the integration step (issue 8)")
}
