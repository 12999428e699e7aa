package main

import "github.com/urfave/cli/v2"

// nbdCommand groups the NBD plumbing: serve (nbd_serve.go) and attach
// (nbd_attach.go).
func nbdCommand() *cli.Command {
	return &cli.Command{
		Name:        "nbd",
		Usage:       "plumbing: serve a file over NBD or attach it as /dev/nbdN",
		Subcommands: []*cli.Command{nbdServeCommand(), nbdAttachCommand()},
	}
}
