package main

import (
	"context"
	"fmt"
	"time"

	"github.com/doppelha/doppel/daemon/client"
	"github.com/doppelha/doppel/daemon/protection"
	"github.com/urfave/cli/v2"
)

// verifyCommand compares a job's source and target.
func verifyCommand() *cli.Command {
	return &cli.Command{
		Name:      "verify",
		Usage:     "compare a job's source and target chunk by chunk",
		ArgsUsage: "NAME",
		Flags:     append(connFlags(), &cli.BoolFlag{Name: "json", Usage: "machine-readable output"}),
		Action: func(c *cli.Context) error {
			name, server, cl, err := jobServer(c, "doppel verify NAME", client.ActiveSource)
			if err != nil {
				return err
			}
			ctx, cancel := context.WithTimeout(c.Context, 6*time.Hour)
			defer cancel()
			res, err := cl.Verify(ctx, name)
			if err != nil {
				return fmt.Errorf("verify on %s: %w", server, err)
			}
			if c.Bool("json") {
				return writeJSONOut(c.App.Writer, res)
			}
			fmt.Fprintf(c.App.Writer, "verify %s: %d chunks, %s compared, %d differ\n", name, res.Chunks, protection.BytesHuman(res.Bytes), res.Differing)
			if !res.Equal {
				return fmt.Errorf("job %s: source and target differ in %d chunks", name, res.Differing)
			}
			return nil
		},
	}
}
