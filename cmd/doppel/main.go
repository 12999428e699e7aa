// Command doppel is real-time block replication and failover for Linux: the
// agent (doppel agent), the operator's CLI (server, job, failover, reverse,
// switchover, failback, verify) and plumbing commands (nbd, repl, probe, ip) in one
// binary. Each command group lives in a file of its own; main only wires them.
package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/urfave/cli/v2"
)

// Exit codes beyond 0 (success) and 1 (error).
const (
	exitUsage    = 2 // bad flags or arguments
	exitPeerDown = 3 // probe watch --exit-on-down: the peer was declared down
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args)
	stop()
	if err != nil && !errors.Is(err, context.Canceled) {
		fmt.Fprintln(os.Stderr, "doppel:", err)
		var ec cli.ExitCoder
		if errors.As(err, &ec) {
			os.Exit(ec.ExitCode())
		}
		os.Exit(1)
	}
}

// run builds the CLI app and runs it with args (args[0] is the program name).
func run(ctx context.Context, args []string) error {
	app := &cli.App{
		Name:                 "doppel",
		Usage:                "real-time block replication and failover",
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
			nbdCommand(),
			replCommand(),
			probeCommand(),
			ipCommand(),
			witnessCommand(),
		},
	}
	return app.RunContext(ctx, args)
}

// usageErrorf reports bad command-line input with exit code 2.
func usageErrorf(format string, a ...any) error {
	return cli.Exit(fmt.Sprintf(format, a...), exitUsage)
}
