package main

import (
	"errors"

	"github.com/urfave/cli/v2"
)

// failoverCommand is scaffolding: the owner of this command group replaces it.
func failoverCommand() *cli.Command {
	return &cli.Command{
		Name:   "failover",
		Usage:  "fail a job over to its target",
		Action: func(*cli.Context) error { return errors.New("failover: not built yet") },
	}
}
