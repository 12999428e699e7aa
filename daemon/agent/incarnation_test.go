package agent

import (
	"os"
	"path/filepath"
	"testing"
	"time"
)

// TestNextIncarnation: the incarnation grows at every start, with the
// clock and past it when the clock stands still or steps back, and is
// persisted; a corrupt file is an error, not a reset.
func TestNextIncarnation(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "state") // created at first start
	t0 := time.Unix(1_760_000_000, 0)
	for i, tc := range []struct {
		now  time.Time
		want uint64
	}{
		{t0, 1_760_000_000},
		{t0, 1_760_000_001},                       // same second: persisted + 1
		{t0.Add(-time.Hour), 1_760_000_002},       // clock stepped back
		{t0.Add(time.Hour), 1_760_000_000 + 3600}, // clock ahead of the file
	} {
		got, err := NextIncarnation(dir, tc.now)
		if err != nil || got != tc.want {
			t.Fatalf("start %d: %d, %v; want %d", i, got, err, tc.want)
		}
	}
	if fi, err := os.Stat(filepath.Join(dir, IncarnationFile)); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("incarnation file: %v %v", fi, err)
	}
	os.WriteFile(filepath.Join(dir, IncarnationFile), []byte("garbage\n"), 0o600)
	if _, err := NextIncarnation(dir, t0); err == nil {
		t.Fatal("a corrupt incarnation file was accepted")
	}
}
