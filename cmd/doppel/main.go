// Command doppel is real-time block replication and failover for Linux: the
// agent (doppel agent), the operator's CLI (server, job, failover, reverse,
// switchover, failback, verify) and plumbing commands (nbd, repl, probe, ip) in one
// binary. Each command group lives in a file of its own; main only wires them.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"

	"github.com/urfave/cli/v2"
)

// Exit codes beyond 0 (success) and 1 (error). doppel job status has its
// own: 0 protected, 1 degraded, 2 not protected or failed over, 3
// unreachable (daemon/protection).
const (
	exitUsage    = 64 // bad flags or arguments (EX_USAGE, sysexits.h)
	exitPeerDown = 3  // probe watch --exit-on-down: the peer was declared down
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args)
	stop()
	if err != nil && !errors.Is(err, context.Canceled) {
		if msg := err.Error(); msg != "" {
			fmt.Fprintln(os.Stderr, "doppel:", msg)
		}
		var ec cli.ExitCoder
		if errors.As(err, &ec) {
			os.Exit(ec.ExitCode())
		}
		os.Exit(1)
	}
}

// run builds the CLI app and runs it with args (args[0] is the program name).
func run(ctx context.Context, args []string) error {
	return runIO(ctx, args, os.Stdout, os.Stderr)
}

// runIO is run with the app's output and error output.
func runIO(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	return newApp(stdout, stderr).RunContext(ctx, args)
}

// newApp is the command tree, writing to stdout and stderr.
func newApp(stdout, stderr io.Writer) *cli.App {
	app := &cli.App{
		Writer:    stdout,
		ErrWriter: stderr,
		Name:      "doppel",
		Usage:     "real-time block replication and failover",
		Description: "doppel agent runs on each host; every other command is a client of the agents'\n" +
			"control API (servers added with doppel server add). Operator commands: server,\n" +
			"job, failover, reverse, switchover, failback, verify; doppel console serves\n" +
			"them as a web page. Plumbing: nbd, repl, probe, ip. doppel job status exits 0\n" +
			"when the job is protected, 1 degraded, 2 not protected or failed over, 3 when\n" +
			"no agent answered; a usage error exits 64, any other error 1.",
		EnableBashCompletion: true,
		ExitErrHandler:       func(*cli.Context, error) {}, // main reports errors
		Commands: []*cli.Command{
			agentCommand(),
			serverCommand(),
			jobCommand(),
			failoverCommand(),
			reverseCommand(),
			switchoverCommand(),
			failbackCommand(),
			verifyCommand(),
			snapshotCommand(),
			testFailoverCommand(),
			consoleCommand(),
			nbdCommand(),
			replCommand(),
			probeCommand(),
			ipCommand(),
			completionCommand(),
			manCommand(),
		},
	}
	polish(app)
	return app
}

// usageErrorf reports bad command-line input with exit code 64.
func usageErrorf(format string, a ...any) error {
	return cli.Exit(fmt.Sprintf(format, a...), exitUsage)
}
