package main

import (
	"errors"

	"github.com/urfave/cli/v2"
)

// nbdServeCommand is scaffolding: the owner of this command group replaces it.
func nbdServeCommand() *cli.Command {
	return &cli.Command{
		Name:   "serve",
		Usage:  "serve a file or block device as an NBD export",
		Action: func(*cli.Context) error { return errors.New("serve: not built yet") },
	}
}
