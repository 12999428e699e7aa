package main

import (
	"errors"

	"github.com/urfave/cli/v2"
)

// probeCommand is scaffolding: the owner of this command group replaces it.
func probeCommand() *cli.Command {
	return &cli.Command{
		Name:   "probe",
		Usage:  "plumbing: send or watch heartbeats",
		Action: func(*cli.Context) error { return errors.New("probe: not built yet") },
	}
}
