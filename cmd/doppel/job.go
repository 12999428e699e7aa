package main

import (
	"errors"

	"github.com/urfave/cli/v2"
)

// jobCommand is scaffolding: the owner of this command group replaces it.
func jobCommand() *cli.Command {
	return &cli.Command{
		Name:   "job",
		Usage:  "create and manage protection jobs",
		Action: func(*cli.Context) error { return errors.New("job: not built yet") },
	}
}
