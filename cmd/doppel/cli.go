package main

import (
	"fmt"
	"io"
	"runtime"
	"runtime/debug"
	"strings"
	"sync"

	"github.com/urfave/cli/v2"
)

// What makes the CLI behave like a Linux tool: --version with the git
// revision, "did you mean" for a mistyped command or flag, a usage error
// that prints the usage line and one hint (exit 64) instead of the whole
// help page, defaults shown once, shell completion scripts and a man page
// generated from the command tree.

// versionString is the version (set at build time with -ldflags -X
// main.version=...) with the git revision and Go version the binary was
// built from.
func versionString() string {
	v := version
	rev, modified := "", false
	goVersion := runtime.Version()
	if bi, ok := debug.ReadBuildInfo(); ok {
		goVersion = bi.GoVersion
		for _, s := range bi.Settings {
			switch s.Key {
			case "vcs.revision":
				rev = s.Value
			case "vcs.modified":
				modified = s.Value == "true"
			}
		}
		if v == "dev" && bi.Main.Version != "" && bi.Main.Version != "(devel)" {
			v = bi.Main.Version
		}
	}
	if rev != "" {
		v += " (git " + rev[:min(len(rev), 12)]
		if modified {
			v += ", modified"
		}
		v += ")"
	}
	return v + ", " + goVersion
}

var setCLIGlobals sync.Once

// polish configures the app and every command: suggestions, usage errors,
// unknown subcommands.
func polish(app *cli.App) {
	app.Version = versionString()
	app.OnUsageError = onUsageError
	app.Action = unknownCommand
	setCLIGlobals.Do(func() { // urfave/cli's package variables: once per process
		cli.VersionPrinter = func(c *cli.Context) { fmt.Fprintf(c.App.Writer, "%s %s\n", c.App.Name, c.App.Version) }
		cli.FlagStringer = flagString
	})
	var walk func([]*cli.Command)
	walk = func(cmds []*cli.Command) {
		for _, c := range cmds {
			c.OnUsageError = onUsageError
			if len(c.Subcommands) > 0 {
				if c.Action == nil {
					c.Action = unknownCommand
				}
				walk(c.Subcommands)
			}
		}
	}
	walk(app.Commands)
}

// defaultFlagString is urfave's own rendering of a flag in help.
var defaultFlagString = cli.FlagStringer

// flagString renders a flag in help once: "(default: false)" of a boolean
// switch says nothing and is left out.
func flagString(f cli.Flag) string {
	s := defaultFlagString(f)
	if b, ok := f.(*cli.BoolFlag); ok && !b.Value {
		s = strings.TrimSuffix(s, " (default: false)")
	}
	return s
}

// isRoot reports whether c is the app's own context (no command).
func isRoot(c *cli.Context) bool {
	return c.Command == nil || c.Command.Name == "" || c.Command.HelpName == c.App.Name
}

// usageLine is "usage: doppel job status [options] NAME" for the command
// of c (the app's when c has none).
func usageLine(c *cli.Context) string {
	if isRoot(c) {
		return "usage: " + c.App.Name + " [--version] [--help] COMMAND [options] [ARGS]"
	}
	line := "usage: " + strings.TrimSpace(c.Command.HelpName)
	if len(commandNames(c.Command.Subcommands)) > 0 {
		line += " COMMAND"
	}
	if len(c.Command.VisibleFlags()) > 0 {
		line += " [options]"
	}
	if c.Command.ArgsUsage != "" {
		line += " " + c.Command.ArgsUsage
	}
	return line
}

// helpHint points at the full help of c's command.
func helpHint(c *cli.Context) string {
	name := c.App.Name
	if !isRoot(c) {
		name = c.Command.HelpName
	}
	return "Run '" + name + " --help' for the options."
}

// onUsageError replaces urfave's whole help page after a bad flag with
// the error, the usage line and one hint (a close flag name, or where the
// help is), exit 64.
func onUsageError(c *cli.Context, err error, _ bool) error {
	msg := err.Error()
	hint := helpHint(c)
	if name, ok := strings.CutPrefix(msg, "flag provided but not defined: -"); ok {
		msg = "unknown flag --" + strings.TrimLeft(name, "-")
		if s := suggestFlag(c, name); s != "" {
			hint = fmt.Sprintf("Did you mean %s?", s)
		}
	}
	return cli.Exit(msg+"\n"+usageLine(c)+"\n"+hint, exitUsage)
}

// suggestFlag returns the flag of c's command closest to name, as
// --NAME ("" none).
func suggestFlag(c *cli.Context, name string) string {
	flags := c.App.Flags
	if !isRoot(c) {
		flags = c.Command.Flags
	}
	var names []string
	for _, f := range flags {
		for _, n := range f.Names() {
			if len(n) > 1 {
				names = append(names, n)
			}
		}
	}
	if s := closest(strings.TrimLeft(name, "-"), names); s != "" {
		return "--" + s
	}
	return ""
}

// commandNames are the visible commands' names (not help).
func commandNames(cmds []*cli.Command) []string {
	var out []string
	for _, c := range cmds {
		if !c.Hidden && c.Name != "help" {
			out = append(out, c.Name)
		}
	}
	return out
}

// closest returns the candidate closest to s: the one it is a prefix of,
// else the nearest within an edit distance of a third of its length
// (at least 2); "" when none is close.
func closest(s string, candidates []string) string {
	best, bestD := "", max(2, len(s)/3)+1
	for _, c := range candidates {
		if strings.HasPrefix(c, s) && s != "" {
			return c
		}
		if d := editDistance(s, c); d < bestD {
			best, bestD = c, d
		}
	}
	return best
}

// editDistance is the Damerau-Levenshtein distance (adjacent
// transpositions count one).
func editDistance(a, b string) int {
	d := make([][]int, len(a)+1)
	for i := range d {
		d[i] = make([]int, len(b)+1)
		d[i][0] = i
	}
	for j := range d[0] {
		d[0][j] = j
	}
	for i := 1; i <= len(a); i++ {
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			d[i][j] = min(d[i-1][j]+1, d[i][j-1]+1, d[i-1][j-1]+cost)
			if i > 1 && j > 1 && a[i-1] == b[j-2] && a[i-2] == b[j-1] {
				d[i][j] = min(d[i][j], d[i-2][j-2]+1)
			}
		}
	}
	return d[len(a)][len(b)]
}

// unknownCommand is the action of the app and of every command group: no
// argument shows the help; an unknown command name is a usage error with
// the closest command, exit 64.
func unknownCommand(c *cli.Context) error {
	cmds, where := c.App.Commands, c.App.Name
	if !isRoot(c) {
		cmds, where = c.Command.Subcommands, c.Command.HelpName
	}
	if c.NArg() == 0 {
		if isRoot(c) {
			return cli.ShowAppHelp(c)
		}
		return cli.ShowSubcommandHelp(c)
	}
	name := c.Args().First()
	msg := fmt.Sprintf("%q is not a %s command", name, where)
	hint := "Run '" + where + " --help' for the commands."
	if s := closest(name, commandNames(cmds)); s != "" {
		hint = fmt.Sprintf("Did you mean '%s %s'?", where, s)
	}
	return cli.Exit(msg+"\n"+hint, exitUsage)
}

// completionCommand prints a shell completion script.
func completionCommand() *cli.Command {
	return &cli.Command{
		Name:      "completion",
		Usage:     "print the shell completion script for bash, zsh or fish",
		ArgsUsage: "bash|zsh|fish",
		Description: "Completes commands, subcommands and flags by asking doppel itself\n" +
			"(--generate-bash-completion). Install, or let make install do it:\n" +
			"  doppel completion bash > /usr/share/bash-completion/completions/doppel\n" +
			"  doppel completion zsh  > /usr/share/zsh/site-functions/_doppel\n" +
			"  doppel completion fish > /usr/share/fish/vendor_completions.d/doppel.fish",
		Action: func(c *cli.Context) error {
			args, err := positional(c)
			if err != nil {
				return err
			}
			if len(args) != 1 {
				return usageErrorf("usage: doppel completion bash|zsh|fish")
			}
			script, err := completionScript(c.App, args[0])
			if err != nil {
				return err
			}
			_, err = io.WriteString(c.App.Writer, script)
			return err
		},
	}
}

func completionScript(app *cli.App, shell string) (string, error) {
	switch shell {
	case "bash":
		return bashCompletion, nil
	case "zsh":
		return zshCompletion, nil
	case "fish":
		s, err := app.ToFishCompletion()
		if err != nil {
			return "", fmt.Errorf("generate the fish completion: %w", err)
		}
		return s, nil
	}
	return "", usageErrorf("no completion for shell %q: bash, zsh or fish", shell)
}

// bashCompletion asks doppel for the words that may follow the command
// line so far (urfave's --generate-bash-completion).
const bashCompletion = `# bash completion for doppel (generated by: doppel completion bash)
_doppel() {
	local cur words cword
	if declare -F _init_completion >/dev/null 2>&1; then
		_init_completion -n "=:" || return
	else
		COMPREPLY=()
		cur="${COMP_WORDS[COMP_CWORD]}"
		words=("${COMP_WORDS[@]}")
		cword=$COMP_CWORD
	fi
	local IFS=$'\n'
	local opts
	if [[ "$cur" == -* ]]; then
		opts=$("${words[@]:0:$cword}" "$cur" --generate-bash-completion 2>/dev/null)
	else
		opts=$("${words[@]:0:$cword}" --generate-bash-completion 2>/dev/null)
	fi
	COMPREPLY=($(compgen -W "$opts" -- "$cur"))
}
complete -o bashdefault -o default -F _doppel doppel
`

// zshCompletion: the same protocol, with zsh's descriptions.
const zshCompletion = `#compdef doppel
# zsh completion for doppel (generated by: doppel completion zsh)
_doppel() {
	local -a opts
	local cur=${words[-1]}
	if [[ "$cur" == -* ]]; then
		opts=("${(@f)$(${words[@]:0:#words[@]-1} ${cur} --generate-bash-completion 2>/dev/null)}")
	else
		opts=("${(@f)$(${words[@]:0:#words[@]-1} --generate-bash-completion 2>/dev/null)}")
	fi
	if [[ "${opts[1]}" != "" ]]; then
		_describe 'values' opts
	else
		_files
	fi
}
if [[ "$funcstack[1]" == "_doppel" ]]; then
	_doppel "$@"
else
	compdef _doppel doppel
fi
`

// manCommand prints the man page, generated from the command tree.
func manCommand() *cli.Command {
	return &cli.Command{
		Name:  "man",
		Usage: "print the doppel(1) man page (roff)",
		Description: "Generated from the commands, their descriptions and flags. Install, or let\n" +
			"make install do it:  doppel man > /usr/share/man/man1/doppel.1",
		Action: func(c *cli.Context) error {
			if c.NArg() > 0 {
				return usageErrorf("usage: doppel man")
			}
			page, err := c.App.ToManWithSection(1)
			if err != nil {
				return fmt.Errorf("generate the man page: %w", err)
			}
			_, err = io.WriteString(c.App.Writer, page)
			return err
		},
	}
}
