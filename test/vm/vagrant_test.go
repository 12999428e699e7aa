package vm

import (
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// TestVagrantfile checks the repository's Vagrantfile with `vagrant
// validate` (provider settings aside: no hypervisor is needed) and the
// provisioning script with bash -n.
func TestVagrantfile(t *testing.T) {
	root := repoRoot()
	if out, err := exec.Command("bash", "-n", filepath.Join(root, "test", "vagrant", "provision.sh")).CombinedOutput(); err != nil {
		t.Errorf("provision.sh: %v: %s", err, out)
	}
	vagrant, err := exec.LookPath("vagrant")
	if err != nil {
		t.Skip("vagrant is not installed (test/deps.sh installs it)")
	}
	cmd := exec.Command(vagrant, "validate", "--ignore-provider", "--no-tty")
	cmd.Dir = root
	tmp := t.TempDir()
	// Nothing written to the repository or the user's ~/.vagrant.d.
	cmd.Env = append(cmd.Environ(), "VAGRANT_DOTFILE_PATH="+filepath.Join(tmp, "dot"),
		"VAGRANT_HOME="+filepath.Join(tmp, "home"), "VAGRANT_CHECKPOINT_DISABLE=1")
	out, err := cmd.CombinedOutput()
	if err != nil || !strings.Contains(string(out), "validated successfully") {
		t.Fatalf("vagrant validate: %v\n%s", err, out)
	}
}
