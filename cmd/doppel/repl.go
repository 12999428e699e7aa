package main

import (
	"errors"

	"github.com/urfave/cli/v2"
)

// replCommand is scaffolding: the owner of this command group replaces it.
func replCommand() *cli.Command {
	return &cli.Command{
		Name:   "repl",
		Usage:  "plumbing: run a replication source or target",
		Action: func(*cli.Context) error { return errors.New("repl: not built yet") },
	}
}
