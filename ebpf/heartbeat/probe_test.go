package heartbeat

import (
	"strings"
	"testing"
)

func TestOpenUnknownInterface(t *testing.T) {
	_, err := Open(Config{Interfaces: []string{"doppel-no-such0"}})
	if err == nil || !strings.Contains(err.Error(), "doppel-no-such0") {
		t.Fatalf("Open with a missing interface: %v", err)
	}
}

func TestParseMode(t *testing.T) {
	for in, want := range map[string]Mode{"auto": ModeAuto, "": ModeAuto, "xdp-driver": ModeXDPDriver, "xdp-generic": ModeXDPGeneric, "userspace": ModeUserspace} {
		if got, err := ParseMode(in); err != nil || got != want {
			t.Errorf("ParseMode(%q) = %q, %v", in, got, err)
		}
	}
	if _, err := ParseMode("xdp"); err == nil {
		t.Error("ParseMode accepted xdp")
	}
}
