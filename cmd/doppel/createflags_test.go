package main

import (
	"io"
	"testing"

	"github.com/doppelha/doppel/daemon/job"
	"github.com/urfave/cli/v2"
)

// TestCreateQueueAndRateFlags: job create's queue and rate flags land in
// the spec (none: no disk queue); a bad size is refused (the bounds are
// the spec's: job.TestValidate).
func TestCreateQueueAndRateFlags(t *testing.T) {
	create := jobCommand().Subcommands[0]
	parse := func(args ...string) (job.Spec, error) {
		var spec job.Spec
		var err error
		app := &cli.App{Name: "doppel", Writer: io.Discard, ErrWriter: io.Discard, Commands: []*cli.Command{{
			Name: "create", Flags: create.Flags,
			Action: func(c *cli.Context) error { spec, err = buildSpec(c, "web"); return nil },
		}}}
		if rerr := app.Run(append([]string{"doppel", "create"}, args...)); rerr != nil {
			t.Fatalf("%v: %v", args, rerr)
		}
		return spec, err
	}
	s, err := parse()
	if err != nil || s.QueueMemory != 0 || s.QueueDisk != 0 || s.RateLimit != 0 {
		t.Fatalf("defaults: %d %d %d %v", s.QueueMemory, s.QueueDisk, s.RateLimit, err)
	}
	s, err = parse("--queue-size", "64M", "--disk-queue-size", "none", "--rate-limit", "50M")
	if err != nil || s.QueueMemory != 64<<20 || s.QueueDisk != -1 || s.RateLimit != 50<<20 {
		t.Fatalf("set: %d %d %d %v", s.QueueMemory, s.QueueDisk, s.RateLimit, err)
	}
	for _, bad := range [][]string{{"--queue-size", "lots"}, {"--rate-limit", "none"}, {"--disk-queue-size", "0"}} {
		if _, err := parse(bad...); err == nil {
			t.Errorf("%v accepted", bad)
		}
	}
}
