package agent

import (
	"context"
	"crypto/rand"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"github.com/doppelha/doppel/daemon/ha"
	"github.com/doppelha/doppel/daemon/job"
	"github.com/doppelha/doppel/netident"
)

// lanIdent is a network segment shared by fake hosts: Apply fails with
// netident.ErrConflict while another host holds the address, as
// netident.Manager's ARP probe does.
type lanIdent struct {
	mu      sync.Mutex
	holders map[string]string // address -> host
	applies map[string]int    // host -> Apply calls
}

type hostIdent struct {
	lan  *lanIdent
	host string
}

func (h hostIdent) Apply(_ context.Context, addrs []netident.Addr) error {
	h.lan.mu.Lock()
	defer h.lan.mu.Unlock()
	h.lan.applies[h.host]++
	for _, a := range addrs {
		if o := h.lan.holders[a.String()]; o != "" && o != h.host {
			return fmt.Errorf("apply: %w: %s held by %s", netident.ErrConflict, a, o)
		}
	}
	for _, a := range addrs {
		h.lan.holders[a.String()] = h.host
	}
	return nil
}

func (h hostIdent) Release(_ context.Context, addrs []netident.Addr) error {
	h.lan.mu.Lock()
	defer h.lan.mu.Unlock()
	for _, a := range addrs {
		if h.lan.holders[a.String()] == h.host {
			delete(h.lan.holders, a.String())
		}
	}
	return nil
}

func (l *lanIdent) holder(addr string) string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.holders[addr]
}

// TestServiceIPRetriedAfterConflict: the source's agent dies but its host
// keeps answering for the service IP (kill -9 of the agent: the kernel
// still holds the address), so the promoted target cannot take it. Once
// the old host lets go of it (its agent came back fenced and released
// it), the active source takes it within a few seconds, without an
// operator. Found by the fault suite (test/faults, source-agent-kill):
// without the retry nobody held the service IP after the failover.
func TestServiceIPRetriedAfterConflict(t *testing.T) {
	root := t.TempDir()
	os.WriteFile(filepath.Join(root, "mountinfo"), nil, 0o644)
	lan := &lanIdent{holders: map[string]string{}, applies: map[string]int{}}
	p := &pair{t: t, root: root, agents: map[string]*testAgent{}, live: map[string]*memLiveness{},
		repl: map[string]string{"vm1": freePort(t), "vm2": freePort(t)}, log: pairLog(),
		extra: func(name string, subs *Subsystems) { subs.NetIdent = hostIdent{lan, name} }}
	for _, name := range []string{"vm1", "vm2"} {
		p.live[name] = &memLiveness{alive: map[string]bool{"web": true}, n: map[string]uint64{}}
		p.start(name, "127.0.0.1:0")
	}
	e1, e2 := endpoint("vm1", p.agents["vm1"]), endpoint("vm2", p.agents["vm2"])
	e1.Repl, e2.Repl = p.repl["vm1"], p.repl["vm2"]
	spec := testSpec(t, e1, e2)
	spec.ServiceIPs = []job.ServiceIP{{Prefix: "10.231.1.187/24", Iface: "eth0"}}
	spec.Volume, spec.TargetVolume = filepath.Join(root, "vol1.img"), filepath.Join(root, "vol2.img")
	p.model = make([]byte, pairSize)
	rand.Read(p.model[:1<<20])
	if err := os.WriteFile(spec.Volume, p.model, 0o600); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	spec.Size = 0
	if _, err := p.agents["vm1"].client.CreateJob(ctx, spec); err != nil {
		t.Fatal(err)
	}
	spec.Size = pairSize
	if _, err := p.agents["vm2"].client.CreateJob(ctx, spec); err != nil {
		t.Fatal(err)
	}
	p.spec = spec
	p.waitProtected("vm1")
	const addr = "10.231.1.187/24@eth0"
	if h := lan.holder(addr); h != "vm1" {
		t.Fatalf("service IP held by %q, want vm1", h)
	}

	// vm1's agent dies; its host still answers for the address.
	p.agents["vm1"].stop()
	p.live["vm2"].set("web", false)
	p.waitFor("vm2 failed over", func() bool {
		st := p.status("vm2")
		return st.HA.Role == ha.RoleSource && st.HA.State == ha.StateFailedOver
	})
	p.waitFor("vm2 tried to take the service IP", func() bool {
		lan.mu.Lock()
		defer lan.mu.Unlock()
		return lan.applies["vm2"] > 0
	})
	if h := lan.holder(addr); h != "vm1" {
		t.Fatalf("service IP held by %q while vm1's host answers for it", h)
	}
	// The old host lets go of it: vm2 takes it on its own.
	lan.mu.Lock()
	delete(lan.holders, addr)
	lan.mu.Unlock()
	p.waitFor("vm2 holding the service IP", func() bool { return lan.holder(addr) == "vm2" })
}
