package main

import (
	"errors"

	"github.com/urfave/cli/v2"
)

// reverseCommand is scaffolding: the owner of this command group replaces it.
func reverseCommand() *cli.Command {
	return &cli.Command{
		Name:   "reverse",
		Usage:  "reverse protection after a failover",
		Action: func(*cli.Context) error { return errors.New("reverse: not built yet") },
	}
}
