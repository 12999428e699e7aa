package main

import (
	"bytes"
	"context"
	"strings"
	"testing"
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
	if err == nil || !strings.Contains(err.Error(), "unknown flag --bogus") {
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
	return runIO(context.Background(), args, out, out)
}
