package api

import (
	"strings"
	"testing"

	"github.com/doppelha/doppel/daemon/tlspin"
)

func TestNormalizeFingerprint(t *testing.T) {
	hex := strings.Repeat("ab", 32)
	colons := strings.ToUpper(strings.Join(strings.SplitAfterN(strings.Repeat("ab:", 32), ":", 32), ""))
	for _, in := range []string{hex, "sha256:" + hex, "SHA256:" + strings.ToUpper(hex), strings.TrimSuffix(colons, ":")} {
		if got, err := tlspin.Parse(in); err != nil || got != "sha256:"+hex {
			t.Errorf("tlspin.Parse(%q) = %q, %v", in, got, err)
		}
	}
	for _, bad := range []string{"", "sha256:", "md5:" + hex, hex[:62], hex + "00", strings.Repeat("zz", 32)} {
		if _, err := tlspin.Parse(bad); err == nil {
			t.Errorf("tlspin.Parse(%q) accepted", bad)
		}
	}
}

func TestWithPort(t *testing.T) {
	for in, want := range map[string]string{
		"vm1":             "vm1:6320",
		"172.17.22.11":    "172.17.22.11:6320",
		"172.17.22.11:99": "172.17.22.11:99",
		"fd00::1":         "[fd00::1]:6320",
		"[fd00::1]:7":     "[fd00::1]:7",
	} {
		if got, err := WithPort(in); err != nil || got != want {
			t.Errorf("WithPort(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	if _, err := WithPort(""); err == nil {
		t.Error("WithPort accepted an empty address")
	}
}

func TestIdentityFiles(t *testing.T) {
	dir := t.TempDir()
	id, created, err := LoadOrCreateCredentials(dir, "vm1")
	if err != nil || len(created) != 3 {
		t.Fatalf("first start: created %v, %v", created, err)
	}
	id2, created, err := LoadOrCreateCredentials(dir, "vm1")
	if err != nil || len(created) != 0 || id2.Fingerprint != id.Fingerprint || id2.Token != id.Token {
		t.Fatalf("second start changed the identity (created %v, %v)", created, err)
	}
	if got := tlspin.Fingerprint(id.Cert.Certificate[0]); got != id.Fingerprint {
		t.Fatalf("fingerprint %s != %s", got, id.Fingerprint)
	}
}
