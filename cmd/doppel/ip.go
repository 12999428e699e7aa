package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"

	"github.com/doppelha/doppel/netident"
	"github.com/urfave/cli/v2"
	"github.com/vishvananda/netns"
)

// ipCommand is `doppel ip`: plumbing to take over and release service IPs
// by hand, with what failover does (netident).
func ipCommand() *cli.Command {
	common := []cli.Flag{
		&cli.StringFlag{Name: "iface", Usage: "interface `IFACE` of every --addr"},
		&cli.StringSliceFlag{Name: "addr", Usage: "service address `CIDR` on --iface (repeatable)"},
		&cli.StringSliceFlag{Name: "service-ip", Usage: "service address with its interface, `CIDR@IFACE` (repeatable)"},
		&cli.StringFlag{Name: "netns", Usage: "act in the named network namespace `NAME` (ip netns)"},
		&cli.BoolFlag{Name: "verbose", Aliases: []string{"v"}, Usage: "log each step"},
	}
	return &cli.Command{
		Name:  "ip",
		Usage: "plumbing: take over or release service IPs",
		Subcommands: []*cli.Command{
			{
				Name:  "apply",
				Usage: "add service IPs (after probing that nobody else answers for them) and announce them",
				Description: "Probes each missing address (ARP probe / IPv6 duplicate-address solicitation,\n" +
					"150 ms) and refuses if another host answers, naming its MAC, unless --force.\n" +
					"Adds the addresses (IPv6 without kernel DAD, so they are usable at once),\n" +
					"sends gratuitous ARP request+reply / unsolicited NA with Override 5 times\n" +
					"200 ms apart and again 5 s later, then exits. Addresses already present\n" +
					"are left alone; other addresses are never touched.",
				ArgsUsage: " ",
				Flags: append([]cli.Flag{
					&cli.BoolFlag{Name: "force", Usage: "add even if another host answers for an address, or the interface is down"},
					&cli.StringFlag{Name: "hostname", Usage: "also set the kernel's host name to `NAME` (sethostname; /etc/hostname untouched)"},
					&cli.DurationFlag{Name: "probe-wait", Value: netident.DefaultProbeWait, Usage: "how long to listen for another holder (`D`; 0: no probe)"},
					&cli.BoolFlag{Name: "no-wait", Usage: "exit after the first announcement instead of sending the whole schedule"},
				}, common...),
				Action: func(c *cli.Context) error {
					id, err := ipIdentity(c)
					if err != nil {
						return err
					}
					id.Hostname = c.String("hostname")
					conf := netident.Config{ProbeWait: c.Duration("probe-wait")}
					if conf.ProbeWait == 0 {
						conf.ProbeWait = -1
					}
					return ipRun(c, conf, func(ctx context.Context, m *netident.Manager) error {
						r, err := m.Apply(ctx, id, netident.ApplyOptions{Force: c.Bool("force")})
						fmt.Fprint(c.App.Writer, r)
						if err != nil {
							return err
						}
						if c.Bool("no-wait") {
							return nil
						}
						fmt.Fprintln(c.App.ErrWriter, "announcing: 5 rounds 200 ms apart, again 5 s later (Ctrl-C stops)")
						return m.Wait(ctx)
					})
				},
			},
			{
				Name:      "release",
				Usage:     "remove service IPs (absent ones are not an error)",
				ArgsUsage: " ",
				Flags:     common,
				Action: func(c *cli.Context) error {
					id, err := ipIdentity(c)
					if err != nil {
						return err
					}
					return ipRun(c, netident.Config{}, func(ctx context.Context, m *netident.Manager) error {
						r, err := m.Release(ctx, id)
						fmt.Fprint(c.App.Writer, r)
						return err
					})
				},
			},
		},
	}
}

// ipIdentity reads --iface/--addr and --service-ip into an identity.
func ipIdentity(c *cli.Context) (netident.Identity, error) {
	if c.NArg() > 0 {
		return netident.Identity{}, usageErrorf("ip %s: unexpected argument %q", c.Command.Name, c.Args().First())
	}
	var id netident.Identity
	iface := c.String("iface")
	addrs := c.StringSlice("addr")
	if len(addrs) > 0 && iface == "" {
		return id, usageErrorf("ip %s: --addr needs --iface", c.Command.Name)
	}
	for _, a := range addrs {
		sa, err := netident.ParseServiceIP(a + "@" + iface)
		if err != nil {
			return id, usageErrorf("ip %s: --addr: %v", c.Command.Name, err)
		}
		id.Addrs = append(id.Addrs, sa)
	}
	for _, s := range c.StringSlice("service-ip") {
		sa, err := netident.ParseServiceIP(s)
		if err != nil {
			return id, usageErrorf("ip %s: --service-ip: %v", c.Command.Name, err)
		}
		id.Addrs = append(id.Addrs, sa)
	}
	if len(id.Addrs) == 0 && c.String("hostname") == "" {
		return id, usageErrorf("ip %s: nothing to do: give --iface and --addr, or --service-ip", c.Command.Name)
	}
	if err := id.Validate(); err != nil {
		return id, usageErrorf("ip %s: %v", c.Command.Name, err)
	}
	return id, nil
}

// ipRun opens the host (or --netns) and runs fn with a Manager on it.
func ipRun(c *cli.Context, conf netident.Config, fn func(context.Context, *netident.Manager) error) error {
	level := slog.LevelWarn
	if c.Bool("verbose") {
		level = slog.LevelDebug
	}
	log := slog.New(slog.NewTextHandler(c.App.ErrWriter, &slog.HandlerOptions{Level: level}))
	ns := netns.None()
	if name := c.String("netns"); name != "" {
		var err error
		if ns, err = netns.GetFromName(name); err != nil {
			return fmt.Errorf("netns %s: %w", name, err)
		}
		defer ns.Close()
	}
	sys, err := netident.OpenLinux(nil, ns)
	if err != nil {
		return err
	}
	defer sys.Close()
	m := netident.New(log, sys, sys, conf)
	defer m.Close()
	err = fn(c.Context, m)
	if errors.Is(err, context.Canceled) {
		return nil // interrupted: what was done is printed
	}
	return err
}
