package main

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/urfave/cli/v2"
)

// TestNbdAttachRejectsBadInput: bad flags are usage errors (exit 2) and
// create nothing.
func TestNbdAttachRejectsBadInput(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "x")
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--file", file, "--size", "lots"}, "--size"},
		{[]string{"--file", file, "--device", "/dev/sda"}, "not an nbd device"},
		{[]string{"--file", file, "--connections", "0"}, "--connections 0"},
		{[]string{"--file", file, "--connections", "65"}, "--connections 65"},
		{[]string{"--file", file, "--reclaim"}, "--reclaim needs --device"},
		{[]string{"--file", file, "--timeout", "-1s"}, "must not be negative"},
		{[]string{"--file", file, "extra"}, "unexpected argument"},
	} {
		err := run(t.Context(), append([]string{"doppel", "nbd", "attach"}, tc.args...))
		var ec cli.ExitCoder
		if !errors.As(err, &ec) || ec.ExitCode() != exitUsage || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%v: %v, want a usage error with %q", tc.args, err, tc.want)
		}
		if _, err := os.Stat(file); err == nil {
			t.Fatalf("%v created %s", tc.args, file)
		}
	}
}
