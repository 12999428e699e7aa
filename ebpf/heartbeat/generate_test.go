package heartbeat

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// TestGeneratedFilesAreFresh rebuilds the XDP object with the pinned
// compiler, using gen.go's own //go:generate line, into a temporary
// directory, and fails if any committed generated file differs (the same
// check as `make check-generate`, without touching the tree). It skips
// only when clang-14 is not installed (test/deps.sh installs it).
func TestGeneratedFilesAreFresh(t *testing.T) {
	if testing.Short() {
		t.Skip("rebuilds the BPF object; skipped in -short mode")
	}
	const cc, strip = "clang-14", "llvm-strip-14"
	for _, tool := range []string{cc, strip} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s not installed (test/deps.sh installs it): %v", tool, err)
		}
	}
	src, err := os.ReadFile("gen.go")
	if err != nil {
		t.Fatal(err)
	}
	var args []string
	for _, line := range strings.Split(string(src), "\n") {
		if rest, ok := strings.CutPrefix(line, "//go:generate go tool bpf2go "); ok {
			args = strings.Fields(rest)
		}
	}
	if args == nil {
		t.Fatal("no bpf2go //go:generate line in gen.go")
	}
	out := t.TempDir()
	cmd := exec.Command("go", append([]string{"tool", "bpf2go", "-output-dir", out}, args...)...)
	cmd.Env = append(os.Environ(), "GOPACKAGE=heartbeat", "GOFILE=gen.go", "BPF2GO_CC="+cc, "BPF2GO_STRIP="+strip)
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("bpf2go: %v\n%s", err, b)
	}
	fresh, _ := filepath.Glob(filepath.Join(out, "*"))
	if len(fresh) == 0 {
		t.Fatal("bpf2go wrote nothing")
	}
	for _, f := range fresh {
		name := filepath.Base(f)
		want, _ := os.ReadFile(f)
		got, err := os.ReadFile(name)
		if err != nil {
			t.Errorf("%s: generated but not committed: %v", name, err)
			continue
		}
		if !bytes.Equal(got, want) {
			t.Errorf("%s differs from a fresh build with %s: run `make generate` and commit", name, cc)
		}
	}
}
