package main

import (
	"bytes"
	"context"
	"strings"
	"testing"
	"time"

	"github.com/doppelha/doppel/daemon/api"
	"github.com/doppelha/doppel/daemon/ha"
	"github.com/doppelha/doppel/daemon/job"
)

// TestFlagsAfterArguments: the documented syntax puts flags after NAME.
func TestFlagsAfterArguments(t *testing.T) {
	t.Setenv("DOPPEL_CONFIG", t.TempDir()+"/config.json")
	var out bytes.Buffer
	// No servers: the command must get past flag parsing to say so.
	err := runWith(&out, "doppel", "failover", "web", "--force", "--discard-queue")
	if err == nil || !strings.Contains(err.Error(), "no servers configured") {
		t.Fatalf("failover web --force: %v", err)
	}
	err = runWith(&out, "doppel", "failover", "web", "--apply-queue", "--discard-queue")
	if err == nil || !strings.Contains(err.Error(), "exclude each other") {
		t.Fatalf("conflicting flags after NAME not parsed: %v", err)
	}
	err = runWith(&out, "doppel", "failover", "web", "--bogus")
	if err == nil || !strings.Contains(err.Error(), "not defined") {
		t.Fatalf("unknown flag: %v", err)
	}
	err = runWith(&out, "doppel", "job", "create", "web", "--source", "vm1")
	if err == nil || !strings.Contains(err.Error(), "--target, --volume") {
		t.Fatalf("missing required flags: %v", err)
	}
	err = runWith(&out, "doppel", "server", "add", "vm1", "10.0.0.1")
	if err == nil || !strings.Contains(err.Error(), "--token-file") {
		t.Fatalf("server add without token: %v", err)
	}
	err = runWith(&out, "doppel", "job", "status", "Bad Name")
	if err == nil || !strings.Contains(err.Error(), "job name") {
		t.Fatalf("bad job name: %v", err)
	}
	err = runWith(&out, "doppel", "job", "create", "web", "--source", "vm1", "--target", "vm2", "--volume", "/dev/vdb", "--service-ip", "1.2.3.4@eth0")
	if err == nil || !strings.Contains(err.Error(), "CIDR@IFACE") {
		t.Fatalf("bad service IP: %v", err)
	}
}

func runWith(out *bytes.Buffer, args ...string) error {
	out.Reset()
	return run(context.Background(), args)
}

func TestRenderStatus(t *testing.T) {
	spec := job.Spec{Name: "web", Source: job.Endpoint{Name: "vm1"}, Target: job.Endpoint{Name: "vm2"}, Volume: "/dev/vdb", Mode: "sync", Failover: ha.FailoverAuto,
		ServiceIPs: []job.ServiceIP{{Prefix: "172.17.22.187/24", Iface: "eth0"}}}
	src := &api.JobStatus{Spec: spec, HA: ha.Status{Role: ha.RoleSource, State: ha.StateMirroring, Epoch: 1, LinkUp: true,
		Paths: []ha.PathStatus{{Name: "repl", Up: true}}}, Probe: api.ProbeStatus{Mode: "xdp-generic", Interval: 250 * time.Millisecond, Missed: 8, TimeToFail: -1},
		Data: api.DataStatus{Known: true, Device: "/dev/nbd0", SyncTotal: 4 << 30, SyncDone: 1 << 30, BytesRemaining: 3 << 30, RPO: 0}}
	tgt := &api.JobStatus{Spec: spec, HA: ha.Status{Role: ha.RoleTarget, State: ha.StateSourceDown, Epoch: 1, Reason: "source vm1 is down: run doppel failover",
		Paths: []ha.PathStatus{{Name: "repl"}}}, Probe: api.ProbeStatus{Mode: "userspace", TimeToFail: -1}}
	var b bytes.Buffer
	renderStatus(&b, []view{{Server: "vm1", Status: src}, {Server: "vm2", Status: tgt}}, time.Date(2026, 1, 1, 12, 0, 0, 0, time.UTC))
	for _, want := range []string{
		"job web  vm1:/dev/vdb -> vm2:/dev/vdb  mode sync  failover auto",
		"service IP 172.17.22.187/24@eth0",
		"vm1    source  mirroring",
		"volume served at /dev/nbd0",
		"[#######-----------------------] 25.0% 3.0 GiB remaining",
		"vm2    target  source-down",
		"target data inconsistent",
		"! source vm1 is down: run doppel failover",
		"peer repl SILENT",
	} {
		if !strings.Contains(b.String(), want) {
			t.Errorf("status lacks %q:\n%s", want, b.String())
		}
	}
}
