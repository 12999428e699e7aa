package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"strings"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/doppelha/doppel/daemon/monitor"
	"github.com/doppelha/doppel/ebpf/heartbeat"
)

// probeCommand is the failure-detection plumbing: send heartbeats, or watch
// a peer's heartbeats with the XDP probe (or its userspace fallback) and
// the monitor's policy. Heartbeats are authenticated: both ends name the
// job, its secret and the sending host (whose key signs them).
func probeCommand() *cli.Command {
	keyFlags := func(senderUsage string) []cli.Flag {
		return []cli.Flag{
			&cli.StringFlag{Name: "job", Required: true, Usage: "job `NAME` the heartbeats are for"},
			&cli.StringFlag{Name: "secret", Usage: "the job's `SECRET` (or --secret-file)"},
			&cli.StringFlag{Name: "secret-file", Usage: "`FILE` holding the job's secret"},
			&cli.StringFlag{Name: "sender", Required: true, Usage: senderUsage},
		}
	}
	return &cli.Command{
		Name:  "probe",
		Usage: "plumbing: send or watch heartbeats",
		Subcommands: []*cli.Command{
			{
				Name:      "send",
				Usage:     "send heartbeats to a peer on every path until interrupted",
				ArgsUsage: " ",
				Flags: append(keyFlags("this host's `NAME` (the key that signs the heartbeats)"),
					&cli.StringSliceFlag{Name: "to", Usage: "peer `IP` (repeat for several paths)", Required: true},
					&cli.StringSliceFlag{Name: "from", Usage: "local `IP` each path's heartbeats leave from, in --to order (default: the route's)"},
					&cli.UintFlag{Name: "port", Value: heartbeat.Port, Usage: "heartbeat UDP port"},
					&cli.DurationFlag{Name: "interval", Value: monitor.DefaultInterval, Usage: "time between heartbeats"},
					&cli.Uint64Flag{Name: "incarnation", Usage: "sender incarnation `N` (must grow at every start)", DefaultText: "now in unix seconds"},
					&cli.Uint64Flag{Name: "epoch", Usage: "epoch to announce"},
					&cli.IntFlag{Name: "count", Usage: "stop after `N` heartbeats (0: until interrupted)"},
				),
				Action: probeSend,
			},
			{
				Name:      "watch",
				Usage:     "watch a peer's heartbeats and print its state changes",
				ArgsUsage: " ",
				Flags: append(keyFlags("the peer's `NAME` (whose key signs its heartbeats)"),
					&cli.StringSliceFlag{Name: "iface", Usage: "interface `IFACE` to attach the XDP probe to (repeat for several)", DefaultText: "the interface of the route to each peer"},
					&cli.StringSliceFlag{Name: "peer", Usage: "peer `IP` (repeat for several paths)", Required: true},
					&cli.DurationFlag{Name: "interval", Value: monitor.DefaultInterval, Usage: "the peer's heartbeat interval"},
					&cli.IntFlag{Name: "missed", Value: monitor.DefaultMissed, Usage: "intervals of silence on every path before the peer is down"},
					&cli.IntFlag{Name: "rise", Value: monitor.DefaultRise, Usage: "consecutive packets on one path before a down peer is up again"},
					&cli.UintFlag{Name: "port", Value: heartbeat.Port, Usage: "heartbeat UDP port"},
					&cli.StringFlag{Name: "mode", Value: "auto", Usage: "probe mode: auto, xdp-driver, xdp-generic or userspace"},
					&cli.BoolFlag{Name: "exit-on-down", Usage: "exit with status 3 when the peer is declared down"},
				),
				Action: probeWatch,
			},
		},
	}
}

// probeKey is the key of --sender's heartbeats for --job, from the
// job's secret.
func probeKey(c *cli.Context) (heartbeat.JobID, heartbeat.Key, error) {
	secret := c.String("secret")
	if f := c.String("secret-file"); f != "" {
		if secret != "" {
			return heartbeat.JobID{}, heartbeat.Key{}, usageErrorf("--secret and --secret-file exclude each other")
		}
		b, err := os.ReadFile(f)
		if err != nil {
			return heartbeat.JobID{}, heartbeat.Key{}, fmt.Errorf("read --secret-file: %w", err)
		}
		secret = strings.TrimSpace(string(b))
	}
	if secret == "" {
		return heartbeat.JobID{}, heartbeat.Key{}, usageErrorf("the job's secret is required (--secret or --secret-file)")
	}
	k, err := heartbeat.DeriveKey(secret, c.String("job"), c.String("sender"))
	if err != nil {
		return heartbeat.JobID{}, heartbeat.Key{}, usageErrorf("%v", err)
	}
	return heartbeat.JobIDOf(c.String("job")), k, nil
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
	froms, err := parseAddrs("from", c.StringSlice("from"))
	if err != nil {
		return err
	}
	if len(froms) > 0 && len(froms) != len(addrs) {
		return usageErrorf("--from: give one per --to (%d), or none", len(addrs))
	}
	id, key, err := probeKey(c)
	if err != nil {
		return err
	}
	port, interval := c.Uint("port"), c.Duration("interval")
	if port == 0 || port > 65535 || interval <= 0 {
		return usageErrorf("bad --port or --interval")
	}
	dsts := make([]heartbeat.Dest, len(addrs))
	for i, a := range addrs {
		dsts[i].Remote = netip.AddrPortFrom(a, uint16(port))
		if len(froms) > 0 {
			dsts[i].Local = froms[i]
		}
	}
	inc := c.Uint64("incarnation")
	if inc == 0 {
		inc = uint64(time.Now().Unix())
	}
	s, err := heartbeat.NewSender(heartbeat.SenderConfig{Job: id, Key: key, Incarnation: inc, Epoch: c.Uint64("epoch"), Dests: dsts})
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
	id, key, err := probeKey(c)
	if err != nil {
		return err
	}
	mode, err := heartbeat.ParseMode(c.String("mode"))
	if err != nil {
		return usageErrorf("%v", err)
	}
	port := c.Uint("port")
	if port == 0 || port > 65535 {
		return usageErrorf("bad --port")
	}
	cfg := monitor.Config{Interval: c.Duration("interval"), Missed: c.Int("missed"), Rise: c.Int("rise")}
	log := slog.New(slog.NewTextHandler(c.App.ErrWriter, nil))
	p, err := heartbeat.Open(heartbeat.Config{Interfaces: c.StringSlice("iface"), Mode: mode, Port: uint16(port), Logger: log})
	if err != nil {
		return err
	}
	defer p.Close()
	down, err := watchPeer(c.Context, c.App.Writer, p, peers, id, key, cfg, c.Bool("exit-on-down"))
	if err != nil {
		return err
	}
	if down {
		return cli.Exit("peer declared down", exitPeerDown)
	}
	return nil
}

// watchPeer runs the monitor over the probe's view of the job's peer at
// peers (one path per address) and prints the mode and every state
// change. With exitOnDown it returns true as soon as the peer is down.
func watchPeer(ctx context.Context, w io.Writer, p heartbeat.Probe, peers []netip.Addr, id heartbeat.JobID, key heartbeat.Key, cfg monitor.Config, exitOnDown bool) (bool, error) {
	paths := make([]string, len(peers))
	byPath := map[string]heartbeat.Peer{}
	for i, a := range peers {
		pr := heartbeat.Peer{Addr: a, Job: id}
		if err := p.Watch(pr, key); err != nil {
			return false, err
		}
		paths[i] = a.String()
		byPath[paths[i]] = pr
	}
	m, err := monitor.New(cfg, paths, heartbeat.Now())
	if err != nil {
		return false, usageErrorf("%v", err)
	}
	cfg = m.Config()
	fmt.Fprintf(w, "probe mode: %s; peer %s; down after %v of silence (%v × %d), up after %d packets\n",
		p.Mode(), strings.Join(paths, ","), cfg.Timeout(), cfg.Interval, cfg.Missed, cfg.Rise)
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	down := false
	err = monitor.Watch(ctx, m, heartbeat.Now, func(path string) (monitor.Sample, error) {
		s, err := p.Stats(byPath[path])
		return monitor.Sample{LastSeen: s.LastSeen, Packets: s.Heartbeats, PeerEpoch: s.Epoch}, err
	}, func(ch monitor.Change) {
		wall := time.Now().Add(ch.At - heartbeat.Now()).UTC().Format("2006-01-02T15:04:05.000Z07:00")
		var stats []string
		for _, path := range paths {
			if s, err := p.Stats(byPath[path]); err == nil {
				stats = append(stats, fmt.Sprintf("%s: heartbeats %d incarnation %d seq %d epoch %d gaps %d replays %d bad-mac %d",
					path, s.Heartbeats, s.Incarnation, s.Seq, s.Epoch, s.Gaps, s.Replays, s.BadMAC))
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
