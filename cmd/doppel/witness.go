package main

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"os"

	"github.com/urfave/cli/v2"

	"github.com/doppelha/doppel/daemon/agent"
	"github.com/doppelha/doppel/ebpf/heartbeat"
)

func witnessCommand() *cli.Command {
	return &cli.Command{
		Name:  "witness",
		Usage: "a third party for automatic failover: records the agents' heartbeats and tells a target whether it lost the source too",
		Description: `Run it on a host that sees both agents from the clients' side (not on
either agent). Jobs created with --witness IP[:PORT] send their heartbeats
to IP on the heartbeat port; when a target's detector declares its source
down, the target asks the witness, and fails over automatically only if the
witness lost the source too (silent for interval × missed, or never heard).
A target that cannot reach the witness does not fail over automatically.`,
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "listen", Value: fmt.Sprintf(":%d", agent.DefaultWitnessPort), Usage: "HOST:PORT for the targets' queries (TCP)"},
			&cli.IntFlag{Name: "heartbeat-port", Value: heartbeat.Port, Usage: "UDP port the agents' heartbeats arrive on (on the --listen host)"},
			&cli.BoolFlag{Name: "log-json", Usage: "structured logs as JSON"},
		},
		Action: func(c *cli.Context) error {
			var h slog.Handler = slog.NewTextHandler(os.Stderr, nil)
			if c.Bool("log-json") {
				h = slog.NewJSONHandler(os.Stderr, nil)
			}
			log := slog.New(h)
			host, _, err := net.SplitHostPort(c.String("listen"))
			if err != nil {
				return usageErrorf("--listen %q: %v", c.String("listen"), err)
			}
			l, err := net.Listen("tcp", c.String("listen"))
			if err != nil {
				return err
			}
			pc, err := net.ListenPacket("udp", net.JoinHostPort(host, fmt.Sprint(c.Int("heartbeat-port"))))
			if err != nil {
				l.Close()
				return err
			}
			w := &agent.Witness{Log: log}
			log.Info("witness ready", "queries", l.Addr().String(), "heartbeats", pc.LocalAddr().String())
			ctx, cancel := context.WithCancel(c.Context)
			defer cancel()
			errc := make(chan error, 2)
			go func() { errc <- w.ServeHeartbeats(ctx, pc) }()
			go func() { errc <- w.ServeQueries(ctx, l) }()
			err = <-errc
			cancel()
			err2 := <-errc
			if err == nil {
				err = err2
			}
			return err
		},
	}
}
