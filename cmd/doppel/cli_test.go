package main

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"runtime"
	"strings"
	"testing"

	"github.com/doppelha/doppel/daemon/agent"
	"github.com/urfave/cli/v2"
)

// runCLI runs doppel with args and returns its output and exit code as
// main would report them (64 usage, 0 success...).
func runCLI(t *testing.T, args ...string) (out string, code int, err error) {
	t.Helper()
	var b bytes.Buffer
	err = runIO(context.Background(), append([]string{"doppel"}, args...), &b, &b)
	return b.String(), exitCode(err), err
}

// TestHelpGolden: the help pages, as generated from the command tree
// (go test -update rewrites them). The version line is normalised.
func TestHelpGolden(t *testing.T) {
	for name, args := range map[string][]string{
		"help_doppel":     {"--help"},
		"help_job_status": {"job", "status", "--help"},
		"help_switchover": {"switchover", "--help"},
		"help_failover":   {"failover", "--help"},
	} {
		out, code, err := runCLI(t, args...)
		if code != 0 {
			t.Fatalf("%v: exit %d: %v", args, code, err)
		}
		golden(t, name, strings.ReplaceAll(out, versionString(), "VERSION"))
	}
}

// TestUsageErrors: a mistyped command or flag is exit 64 with the usage
// line and one hint (the closest name when there is one), never the whole
// help page.
func TestUsageErrors(t *testing.T) {
	t.Setenv("DOPPEL_CONFIG", filepath.Join(t.TempDir(), "config.json"))
	for _, tc := range []struct {
		args []string
		want []string
	}{
		{[]string{"falover", "web"}, []string{`"falover" is not a doppel command`, "Did you mean 'doppel failover'?"}},
		{[]string{"swithcover", "web"}, []string{"Did you mean 'doppel switchover'?"}},
		{[]string{"job", "stats", "web"}, []string{`"stats" is not a doppel job command`, "Did you mean 'doppel job status'?"}},
		{[]string{"xyzzy"}, []string{"Run 'doppel --help' for the commands."}},
		{[]string{"failover", "--forse", "web"}, []string{"unknown flag --forse", "usage: doppel failover [options] NAME", "Did you mean --force?"}},
		// After NAME (our own parsing of flags that follow arguments).
		{[]string{"failover", "web", "--forse"}, []string{"unknown flag --forse", "usage: doppel failover [options] NAME", "Did you mean --force?"}},
		{[]string{"job", "status", "web", "--jsn"}, []string{"unknown flag --jsn", "usage: doppel job status [options] NAME", "Did you mean --json?"}},
		{[]string{"failover", "--bogus", "web"}, []string{"unknown flag --bogus", "Run 'doppel failover --help' for the options."}},
		{[]string{"--bogus"}, []string{"unknown flag --bogus", "usage: doppel [--version] [--help] COMMAND"}},
		{[]string{"job", "status"}, []string{"usage: doppel job status NAME"}},
		{[]string{"completion", "tcsh"}, []string{`no completion for shell "tcsh"`}},
	} {
		out, code, err := runCLI(t, tc.args...)
		msg := ""
		if err != nil {
			msg = err.Error()
		}
		if code != exitUsage {
			t.Errorf("%v: exit %d, want %d (%s)", tc.args, code, exitUsage, msg)
		}
		for _, w := range tc.want {
			if !strings.Contains(msg, w) {
				t.Errorf("%v: %q lacks %q", tc.args, msg, w)
			}
		}
		if strings.Contains(out+msg, "OPTIONS:") || strings.Contains(out+msg, "NAME:") {
			t.Errorf("%v printed the whole help page:\n%s%s", tc.args, out, msg)
		}
	}
}

func TestVersion(t *testing.T) {
	out, code, _ := runCLI(t, "--version")
	if code != 0 || !strings.HasPrefix(out, "doppel ") || !strings.Contains(out, runtime.Version()) {
		t.Fatalf("--version: exit %d, %q", code, out)
	}
}

// TestNoDoubledDefaults: a flag's default is shown once, by urfave's
// "(default: X)", never also in the usage text; a boolean switch shows
// none.
func TestNoDoubledDefaults(t *testing.T) {
	app := newApp(&bytes.Buffer{}, &bytes.Buffer{})
	var walk func(path string, cmds []*cli.Command)
	n := 0
	walk = func(path string, cmds []*cli.Command) {
		for _, c := range cmds {
			for _, f := range c.Flags {
				n++
				s := cli.FlagStringer(f)
				usage := strings.ToLower(reflect.ValueOf(f).Elem().FieldByName("Usage").String())
				added := strings.Count(strings.ToLower(s), "(default") - strings.Count(usage, "(default")
				if added > 0 && strings.Contains(usage, "default") {
					t.Errorf("%s%s: default shown twice: %s", path, c.Name, s)
				}
				if strings.HasSuffix(s, "(default: false)") {
					t.Errorf("%s%s: a switch shows (default: false): %s", path, c.Name, s)
				}
			}
			walk(path+c.Name+" ", c.Subcommands)
		}
	}
	walk("doppel ", app.Commands)
	if n < 50 {
		t.Fatalf("walked only %d flags", n)
	}
}

// TestCompletionScripts: the scripts parse in their shells (when the
// shell is installed) and drive the completion protocol, which lists
// commands, subcommands and flags.
func TestCompletionScripts(t *testing.T) {
	for shell, want := range map[string][]string{
		"bash": {"complete -o bashdefault -o default -F _doppel doppel", "--generate-bash-completion"},
		"zsh":  {"#compdef doppel", "--generate-bash-completion"},
		"fish": {"complete -c doppel", "switchover", "failback", "-l timeout"},
	} {
		out, code, err := runCLI(t, "completion", shell)
		if code != 0 {
			t.Fatalf("completion %s: %v", shell, err)
		}
		for _, w := range want {
			if !strings.Contains(out, w) {
				t.Errorf("%s script lacks %q", shell, w)
			}
		}
		if _, err := exec.LookPath(shell); err != nil {
			t.Logf("%s not installed: its script's syntax is not checked", shell)
			continue
		}
		f := filepath.Join(t.TempDir(), "doppel."+shell)
		os.WriteFile(f, []byte(out), 0o644)
		if b, err := exec.Command(shell, "-n", f).CombinedOutput(); err != nil {
			t.Errorf("%s -n: %v\n%s", shell, err, b)
		}
	}
	for args, want := range map[string][]string{
		"--generate-bash-completion":                {"switchover", "failback", "job", "completion"},
		"job --generate-bash-completion":            {"status", "create", "list"},
		"failover --f --generate-bash-completion":   {"--force"},
		"job status --w --generate-bash-completion": {"--watch"},
	} {
		// urfave's completion reads os.Args (as a completing shell runs
		// the binary), not the arguments given to Run.
		argv := append([]string{"doppel"}, strings.Fields(args)...)
		saved := os.Args
		os.Args = argv
		out, _, _ := runCLI(t, argv[1:]...)
		os.Args = saved
		for _, w := range want {
			if !strings.Contains(out, w) {
				t.Errorf("doppel %s: %q lacks %s", args, out, w)
			}
		}
	}
}

func TestManPage(t *testing.T) {
	out, code, err := runCLI(t, "man")
	if code != 0 {
		t.Fatal(err)
	}
	for _, w := range []string{".TH doppel 1", ".SH NAME", "switchover", "failback", "--timeout", "job status exits 0"} {
		if !strings.Contains(out, w) {
			t.Errorf("man page lacks %q", w)
		}
	}
}

// TestAgentConfigExample: the example /etc/doppel/agent.yaml documents
// every key of the agent's config, holds exactly the defaults, and loads
// with the agent's strict decoder; an unknown key is refused.
func TestAgentConfigExample(t *testing.T) {
	cfg, err := loadAgentConfig("agent.yaml")
	if err != nil {
		t.Fatal(err)
	}
	defaults := agent.Config{}
	defaults.Defaults()
	cfg.MountInfo, defaults.MountInfo = "", ""
	if cfg.ProbeIfaces == nil {
		cfg.ProbeIfaces = defaults.ProbeIfaces
	}
	if len(cfg.ProbeIfaces) == 0 {
		cfg.ProbeIfaces, defaults.ProbeIfaces = nil, nil
	}
	if len(cfg.Arbiter.Endpoints) == 0 {
		cfg.Arbiter.Endpoints = nil
	}
	if !reflect.DeepEqual(cfg, defaults) {
		t.Errorf("the example's values are not the defaults:\n got %+v\nwant %+v", cfg, defaults)
	}
	text, _ := os.ReadFile("agent.yaml")
	ty := reflect.TypeOf(agent.Config{})
	for i := range ty.NumField() {
		key := ty.Field(i).Tag.Get("yaml")
		if key == "" || key == "-" {
			continue
		}
		if !strings.Contains(string(text), "\n"+key+":") {
			t.Errorf("agent.yaml does not document key %s", key)
		}
	}
	bad := filepath.Join(t.TempDir(), "bad.yaml")
	os.WriteFile(bad, []byte("state_dir: /x\nrepl_lsten: :1\n"), 0o644)
	if _, err := loadAgentConfig(bad); err == nil || !strings.Contains(err.Error(), "repl_lsten") {
		t.Errorf("unknown key: %v", err)
	}
	empty := filepath.Join(t.TempDir(), "empty.yaml")
	os.WriteFile(empty, []byte("# nothing\n"), 0o644)
	if _, err := loadAgentConfig(empty); err != nil {
		t.Errorf("a config of comments only: %v", err)
	}
}

// TestMakeInstall: make install with PREFIX and DESTDIR puts the binary,
// the man page, the three completion scripts, the systemd unit (pointing
// at PREFIX's binary) and the example config in place, keeps an existing
// config, and the installed bash completion completes a command.
func TestMakeInstall(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binary with make")
	}
	if _, err := exec.LookPath("make"); err != nil {
		t.Skip("make not installed")
	}
	dest, gen := t.TempDir(), t.TempDir()
	install := func() string {
		cmd := exec.Command("make", "-C", "../..", "install", "DESTDIR="+dest, "PREFIX=/usr", "BIN="+filepath.Join(gen, "doppel"), "GENDIR="+gen)
		b, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("make install: %v\n%s", err, b)
		}
		return string(b)
	}
	install()
	for _, f := range []string{"usr/bin/doppel", "usr/share/man/man1/doppel.1", "usr/share/bash-completion/completions/doppel",
		"usr/share/zsh/site-functions/_doppel", "usr/share/fish/vendor_completions.d/doppel.fish",
		"usr/lib/systemd/system/doppel-agent.service", "etc/doppel/agent.yaml"} {
		if _, err := os.Stat(filepath.Join(dest, f)); err != nil {
			t.Errorf("not installed: %v", err)
		}
	}
	unit, _ := os.ReadFile(filepath.Join(dest, "usr/lib/systemd/system/doppel-agent.service"))
	if !strings.Contains(string(unit), "ExecStart=/usr/bin/doppel agent --config /etc/doppel/agent.yaml") {
		t.Errorf("unit does not run PREFIX's binary:\n%s", unit)
	}
	bin := filepath.Join(dest, "usr/bin/doppel")
	out, err := exec.Command(bin, "--version").CombinedOutput()
	if err != nil || !strings.HasPrefix(string(out), "doppel ") {
		t.Errorf("installed --version: %v %s", err, out)
	}
	// From a git checkout the revision is in the version: from git
	// describe (the Makefile's -X main.version), and in a clone also from
	// the binary's VCS stamp (debug.ReadBuildInfo; not in a worktree).
	if rev, err := exec.Command("git", "rev-parse", "--short=7", "HEAD").Output(); err == nil && !strings.Contains(string(out), strings.TrimSpace(string(rev))) {
		t.Errorf("--version of a build from a git checkout lacks revision %s: %s", rev, out)
	}
	if fi, err := os.Stat("../../.git"); err == nil && fi.IsDir() && !strings.Contains(string(out), "(git ") {
		t.Errorf("--version of a build from a clone lacks the VCS stamp: %s", out)
	}
	// An existing config is kept.
	conf := filepath.Join(dest, "etc/doppel/agent.yaml")
	os.WriteFile(conf, []byte("state_dir: /srv/doppel\n"), 0o644)
	if o := install(); !strings.Contains(o, "kept") {
		t.Errorf("second install did not say it kept the config:\n%s", o)
	}
	if b, _ := os.ReadFile(conf); string(b) != "state_dir: /srv/doppel\n" {
		t.Errorf("make install overwrote the config: %q", b)
	}
	// The installed bash completion, driven as bash would.
	if _, err := exec.LookPath("bash"); err == nil {
		script := filepath.Join(dest, "usr/share/bash-completion/completions/doppel")
		cmd := exec.Command("bash", "-c", `source "$1"; COMP_WORDS=(doppel swi); COMP_CWORD=1; _doppel; echo "${COMPREPLY[@]}"`, "bash", script)
		cmd.Env = append(os.Environ(), "PATH="+filepath.Dir(bin)+":"+os.Getenv("PATH"))
		b, err := cmd.CombinedOutput()
		if err != nil || strings.TrimSpace(string(b)) != "switchover" {
			t.Errorf("bash completion of 'doppel swi': %v %q", err, b)
		}
	}
}
