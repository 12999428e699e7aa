package main

import (
	"errors"

	"github.com/urfave/cli/v2"
)

// verifyCommand is scaffolding: the owner of this command group replaces it.
func verifyCommand() *cli.Command {
	return &cli.Command{
		Name:   "verify",
		Usage:  "compare source and target by checksums",
		Action: func(*cli.Context) error { return errors.New("verify: not built yet") },
	}
}
