package vm

import (
	"os"
	"testing"
)

func TestMain(m *testing.M) {
	code := m.Run()
	CleanupAssets()
	os.Exit(code)
}
