package main

import (
	"errors"

	"github.com/urfave/cli/v2"
)

// ipCommand is scaffolding: the owner of this command group replaces it.
func ipCommand() *cli.Command {
	return &cli.Command{
		Name:   "ip",
		Usage:  "plumbing: take over or release service IPs",
		Action: func(*cli.Context) error { return errors.New("ip: not built yet") },
	}
}
