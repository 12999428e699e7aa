package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"strconv"
	"strings"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/doppelha/doppel/daemon/monitor"
	"github.com/doppelha/doppel/ebpf"
)

// probeCommand is the failure-detection plumbing: send heartbeats, or watch
// a peer's heartbeats with the XDP probe (or its userspace fallback) and
// the monitor's policy.
func probeCommand() *cli.Command {
	return &cli.Command{
		Name:  "probe",
		Usage: "plumbing: send or watch heartbeats",
		Subcommands: []*cli.Command{
			{
				Name:      "send",
				Usage:     "send heartbeats to a peer on every path until interrupted",
				ArgsUsage: " ",
				Flags: []cli.Flag{
					&cli.StringSliceFlag{Name: "to", Usage: "peer `IP` (repeat for several paths)", Required: true},
					&cli.UintFlag{Name: "port", Value: ebpf.HeartbeatPort, Usage: "heartbeat UDP port"},
					&cli.DurationFlag{Name: "interval", Value: monitor.DefaultInterval, Usage: "time between heartbeats"},
					&cli.StringFlag{Name: "token", Value: "0", Usage: "connection token `T` (decimal or 0x hex, 64 bits)"},
					&cli.Uint64Flag{Name: "generation", Usage: "generation to announce"},
					&cli.IntFlag{Name: "count", Usage: "stop after `N` heartbeats (0: until interrupted)"},
				},
				Action: probeSend,
			},
			{
				Name:      "watch",
				Usage:     "watch a peer's heartbeats and print its state changes",
				ArgsUsage: " ",
				Flags: []cli.Flag{
					&cli.StringSliceFlag{Name: "iface", Usage: "interface `IFACE` to attach the XDP probe to (repeat for several; none: userspace mode)"},
					&cli.StringSliceFlag{Name: "peer", Usage: "peer `IP` (repeat for several paths)", Required: true},
					&cli.DurationFlag{Name: "interval", Value: monitor.DefaultInterval, Usage: "the peer's heartbeat interval"},
					&cli.IntFlag{Name: "missed", Value: monitor.DefaultMissed, Usage: "intervals of silence on every path before the peer is down"},
					&cli.IntFlag{Name: "rise", Value: monitor.DefaultRise, Usage: "consecutive packets on one path before a down peer is up again"},
					&cli.StringFlag{Name: "token", Value: "0", Usage: "expected connection token `T`"},
					&cli.UintFlag{Name: "port", Value: ebpf.HeartbeatPort, Usage: "heartbeat UDP port"},
					&cli.UintFlag{Name: "repl-port", Value: ebpf.ReplicationPort, Usage: "replication port whose traffic counts as liveness (0: none)"},
					&cli.StringFlag{Name: "mode", Value: "auto", Usage: "probe mode: auto, xdp-driver, xdp-generic or userspace"},
					&cli.BoolFlag{Name: "exit-on-down", Usage: "exit with status 3 when the peer is declared down"},
				},
				Action: probeWatch,
			},
		},
	}
}

func parseToken(s string) (uint64, error) {
	t, err := strconv.ParseUint(s, 0, 64)
	if err != nil {
		return 0, usageErrorf("bad --token %q: want a 64-bit number", s)
	}
	return t, nil
}

func parseAddrs(flag string, vs []string) ([]netip.Addr, error) {
	var out []netip.Addr
	for _, v := range vs {
		for _, s := range strings.Split(v, ",") {
			a, err := netip.ParseAddr(strings.TrimSpace(s))
			if err != nil {
				return nil, usageErrorf("bad --%s %q: %v", flag, s, err)
			}
			out = append(out, a)
		}
	}
	return out, nil
}

func probeSend(c *cli.Context) error {
	addrs, err := parseAddrs("to", c.StringSlice("to"))
	if err != nil {
		return err
	}
	token, err := parseToken(c.String("token"))
	if err != nil {
		return err
	}
	port, interval := c.Uint("port"), c.Duration("interval")
	if port == 0 || port > 65535 || interval <= 0 {
		return usageErrorf("bad --port or --interval")
	}
	dsts := make([]netip.AddrPort, len(addrs))
	for i, a := range addrs {
		dsts[i] = netip.AddrPortFrom(a, uint16(port))
	}
	s, err := ebpf.NewSender(dsts, ebpf.Heartbeat{Token: token, Generation: c.Uint64("generation")})
	if err != nil {
		return err
	}
	defer s.Close()
	if c.Int("count") < 0 {
		return usageErrorf("--count must be 0 (until interrupted) or more")
	}
	log := slog.New(slog.NewTextHandler(c.App.ErrWriter, nil))
	var lastErr time.Time
	err = s.Run(c.Context, interval, c.Int("count"), func(err error) {
		if time.Since(lastErr) > 5*time.Second { // a cut link fails every send
			log.Warn("heartbeat send failed", "err", err)
			lastErr = time.Now()
		}
	})
	seq, sent, failed := s.Counts()
	fmt.Fprintf(c.App.Writer, "sent %d heartbeats (seq %d, %d failed writes)\n", sent, seq, failed)
	return err
}

func probeWatch(c *cli.Context) error {
	peers, err := parseAddrs("peer", c.StringSlice("peer"))
	if err != nil {
		return err
	}
	token, err := parseToken(c.String("token"))
	if err != nil {
		return err
	}
	mode, err := ebpf.ParseMode(c.String("mode"))
	if err != nil {
		return usageErrorf("%v", err)
	}
	port, replPort := c.Uint("port"), c.Uint("repl-port")
	if port == 0 || port > 65535 || replPort > 65535 {
		return usageErrorf("bad --port or --repl-port")
	}
	cfg := monitor.Config{Interval: c.Duration("interval"), Missed: c.Int("missed"), Rise: c.Int("rise")}
	log := slog.New(slog.NewTextHandler(c.App.ErrWriter, nil))
	p, err := ebpf.Open(ebpf.Config{
		Interfaces:      c.StringSlice("iface"),
		Mode:            mode,
		HeartbeatPort:   uint16(port),
		ReplicationPort: uint16(replPort),
		NoReplication:   replPort == 0,
		Logger:          log,
	})
	if err != nil {
		return err
	}
	defer p.Close()
	down, err := watchPeer(c.Context, c.App.Writer, p, peers, token, cfg, c.Bool("exit-on-down"))
	if err != nil {
		return err
	}
	if down {
		return cli.Exit("peer declared down", exitPeerDown)
	}
	return nil
}

// watchPeer runs the monitor over the probe's view of peers (one path per
// address) and prints the mode and every state change. With exitOnDown it
// returns true as soon as the peer is down.
func watchPeer(ctx context.Context, w io.Writer, p ebpf.Probe, peers []netip.Addr, token uint64, cfg monitor.Config, exitOnDown bool) (bool, error) {
	paths := make([]string, len(peers))
	byPath := map[string]netip.Addr{}
	for i, a := range peers {
		if err := p.SetPeer(a, token); err != nil {
			return false, err
		}
		paths[i] = a.String()
		byPath[paths[i]] = a
	}
	m, err := monitor.New(cfg, paths, ebpf.Now())
	if err != nil {
		return false, usageErrorf("%v", err)
	}
	cfg = m.Config()
	fmt.Fprintf(w, "probe mode: %s; peer %s; down after %v of silence (%v × %d), up after %d packets\n",
		p.Mode(), strings.Join(paths, ","), cfg.Timeout(), cfg.Interval, cfg.Missed, cfg.Rise)
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	down := false
	err = monitor.Watch(ctx, m, ebpf.Now, func(path string) (monitor.Sample, error) {
		s, err := p.Stats(byPath[path])
		return monitor.Sample{LastSeen: s.LastSeen(), Packets: s.Packets()}, err
	}, func(ch monitor.Change) {
		wall := time.Now().Add(ch.At - ebpf.Now()).UTC().Format("2006-01-02T15:04:05.000Z07:00")
		var stats []string
		for _, a := range peers {
			if s, err := p.Stats(a); err == nil {
				stats = append(stats, fmt.Sprintf("%s: heartbeats %d seq %d gaps %d repl %d bad-token %d",
					a, s.Heartbeats, s.LastSeq, s.Gaps, s.ReplicationPackets, s.BadToken))
			}
		}
		fmt.Fprintf(w, "%s peer %s: %s [%s]\n", wall, ch.To, ch, strings.Join(stats, "; "))
		if ch.To == monitor.Down && exitOnDown {
			down = true
			cancel()
		}
	})
	return down, err
}
