package main

import (
	"errors"

	"github.com/urfave/cli/v2"
)

// agentCommand is scaffolding: the owner of this command group replaces it.
func agentCommand() *cli.Command {
	return &cli.Command{
		Name:   "agent",
		Usage:  "run the doppel agent (daemon)",
		Action: func(*cli.Context) error { return errors.New("agent: not built yet") },
	}
}
