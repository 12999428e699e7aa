package main

import (
	"errors"

	"github.com/urfave/cli/v2"
)

// nbdAttachCommand is scaffolding: the owner of this command group replaces it.
func nbdAttachCommand() *cli.Command {
	return &cli.Command{
		Name:   "attach",
		Usage:  "attach a file as /dev/nbdN through doppel's NBD server",
		Action: func(*cli.Context) error { return errors.New("attach: not built yet") },
	}
}
