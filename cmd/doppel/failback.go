package main

import (
	"errors"

	"github.com/urfave/cli/v2"
)

// failbackCommand is scaffolding: the owner of this command group replaces it.
func failbackCommand() *cli.Command {
	return &cli.Command{
		Name:   "failback",
		Usage:  "planned switchover back to the original source",
		Action: func(*cli.Context) error { return errors.New("failback: not built yet") },
	}
}
