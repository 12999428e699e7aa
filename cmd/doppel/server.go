package main

import (
	"errors"

	"github.com/urfave/cli/v2"
)

// serverCommand is scaffolding: the owner of this command group replaces it.
func serverCommand() *cli.Command {
	return &cli.Command{
		Name:   "server",
		Usage:  "manage the agents this CLI talks to",
		Action: func(*cli.Context) error { return errors.New("server: not built yet") },
	}
}
