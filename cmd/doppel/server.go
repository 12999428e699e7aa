package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"sort"
	"strings"
	"sync"
	"text/tabwriter"
	"time"

	"github.com/doppelha/doppel/daemon/api"
	"github.com/doppelha/doppel/daemon/client"
	"github.com/doppelha/doppel/daemon/job"
	"github.com/doppelha/doppel/daemon/tlspin"
	"github.com/urfave/cli/v2"
)

// serverCommand manages the agents this CLI talks to (client-side config in
// $DOPPEL_CONFIG or ~/.config/doppel/config.json, mode 0600).
func serverCommand() *cli.Command {
	return &cli.Command{
		Name:  "server",
		Usage: "manage the agents this CLI talks to",
		Subcommands: []*cli.Command{
			{
				Name:      "add",
				Usage:     "pin an agent's certificate and store its token",
				ArgsUsage: "NAME HOST[:PORT]",
				Description: "Connects to the agent, shows its certificate fingerprint for confirmation\n" +
					"(or checks it against --fingerprint), checks the token, and stores the\n" +
					"server. Compare the fingerprint with the agent's log line \"agent ready\".",
				Flags: []cli.Flag{
					&cli.StringFlag{Name: "token-file", Usage: "the agent's token (its STATE/token)", EnvVars: []string{"DOPPEL_TOKEN_FILE"}},
					&cli.StringFlag{Name: "fingerprint", Usage: "expected certificate fingerprint (sha256:HEX): pin without asking"},
				},
				Action: serverAdd,
			},
			{
				Name:   "list",
				Usage:  "list the servers and whether they answer",
				Action: serverList,
			},
			{
				Name:      "remove",
				Usage:     "forget a server",
				ArgsUsage: "NAME",
				Action:    serverRemove,
			},
		},
	}
}

func serverAdd(c *cli.Context) error {
	args, err := positional(c)
	if err != nil {
		return err
	}
	if len(args) != 2 {
		return usageErrorf("usage: doppel server add NAME HOST[:PORT] --token-file FILE")
	}
	if err := required(c, "token-file"); err != nil {
		return err
	}
	name, host := args[0], args[1]
	if err := job.ValidName("server", name); err != nil {
		return usageErrorf("%v", err)
	}
	addr, err := api.WithPort(host)
	if err != nil {
		return usageErrorf("%v", err)
	}
	token, err := api.ReadToken(c.String("token-file"))
	if err != nil {
		return usageErrorf("--token-file: %v", err)
	}
	cfg, err := loadConfig()
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(c.Context, 10*time.Second)
	defer cancel()
	fp, err := api.FetchFingerprint(ctx, addr)
	if err != nil {
		return err
	}
	out := c.App.Writer
	fmt.Fprintf(out, "agent %s presents certificate %s\n", addr, fp)
	if want := c.String("fingerprint"); want != "" {
		norm, err := tlspin.Parse(want)
		if err != nil {
			return usageErrorf("--fingerprint: %v", err)
		}
		if norm != fp {
			return fmt.Errorf("%w: expected %s: not adding %s", api.ErrFingerprintMismatch, norm, name)
		}
	} else {
		ok, err := confirm(c.App.Reader, out, "Trust this agent? [y/N] ")
		if err != nil {
			return err
		}
		if !ok {
			return errors.New("not added")
		}
	}
	s := client.Server{Name: name, Addr: addr, Fingerprint: fp, Token: token}
	cl, err := s.Client()
	if err != nil {
		return err
	}
	info, err := cl.Info(ctx)
	if err != nil {
		if api.IsKind(err, "unauthorized") {
			return fmt.Errorf("agent %s refused the token in %s: is it that agent's STATE/token?", addr, c.String("token-file"))
		}
		return err
	}
	cfg.Put(s)
	if err := cfg.Save(); err != nil {
		return err
	}
	fmt.Fprintf(out, "added %s: %s (host %s, agent %s)\n", name, addr, info.Hostname, info.Version)
	for _, k := range sortedKeys(info.Subsystems) {
		if v := info.Subsystems[k]; v != "ok" && !strings.HasPrefix(v, "ok:") {
			fmt.Fprintf(out, "  note: %s %s\n", k, v)
		}
	}
	return nil
}

// confirm asks a yes/no question on a terminal; without one it refuses.
func confirm(in io.Reader, out io.Writer, prompt string) (bool, error) {
	if f, ok := in.(*os.File); ok {
		if fi, err := f.Stat(); err != nil || fi.Mode()&os.ModeCharDevice == 0 {
			return false, usageErrorf("no terminal to confirm the fingerprint: pass --fingerprint to pin it non-interactively")
		}
	}
	fmt.Fprint(out, prompt)
	line, err := bufio.NewReader(in).ReadString('\n')
	if err != nil && line == "" {
		return false, fmt.Errorf("read answer: %w", err)
	}
	a := strings.ToLower(strings.TrimSpace(line))
	return a == "y" || a == "yes", nil
}

func serverList(c *cli.Context) error {
	cfg, err := loadConfig()
	if err != nil {
		return err
	}
	if len(cfg.Servers) == 0 {
		fmt.Fprintf(c.App.Writer, "no servers (config %s): add one with doppel server add NAME HOST --token-file FILE\n", cfg.Path())
		return nil
	}
	type row struct{ status string }
	rows := make([]row, len(cfg.Servers))
	var wg sync.WaitGroup
	for i, s := range cfg.Servers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx, cancel := context.WithTimeout(c.Context, 5*time.Second)
			defer cancel()
			cl, err := s.Client()
			if err == nil {
				var jobs []api.JobStatus
				if jobs, err = cl.Jobs(ctx); err == nil {
					rows[i].status = fmt.Sprintf("ok, %d job(s)", len(jobs))
					return
				}
			}
			rows[i].status = "unreachable: " + err.Error()
		}()
	}
	wg.Wait()
	tw := tabwriter.NewWriter(c.App.Writer, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NAME\tADDRESS\tFINGERPRINT\tSTATUS")
	for i, s := range cfg.Servers {
		fmt.Fprintf(tw, "%s\t%s\t%s…\t%s\n", s.Name, s.Addr, s.Fingerprint[:min(len(s.Fingerprint), 23)], rows[i].status)
	}
	return tw.Flush()
}

func serverRemove(c *cli.Context) error {
	args, err := positional(c)
	if err != nil {
		return err
	}
	if len(args) != 1 {
		return usageErrorf("usage: doppel server remove NAME")
	}
	cfg, err := loadConfig()
	if err != nil {
		return err
	}
	if err := cfg.Remove(args[0]); err != nil {
		return err
	}
	if err := cfg.Save(); err != nil {
		return err
	}
	fmt.Fprintf(c.App.Writer, "removed %s\n", args[0])
	return nil
}

func loadConfig() (*client.Config, error) {
	p, err := client.ConfigPath()
	if err != nil {
		return nil, err
	}
	return client.LoadConfig(p)
}

// connFlags are accepted by every client command.
func connFlags() []cli.Flag {
	return []cli.Flag{
		&cli.StringFlag{Name: "server", Usage: "talk to this server only (a name from doppel server list)", EnvVars: []string{"DOPPEL_SERVER"}},
		&cli.StringFlag{Name: "token-file", Usage: "use this token instead of the stored one", EnvVars: []string{"DOPPEL_TOKEN_FILE"}},
		&cli.DurationFlag{Name: "timeout", Value: client.DefaultTimeout, Usage: "how long to wait for each server's answer to a query (servers are asked in parallel)"},
	}
}

// fleet is the set of servers the command of c talks to (--server,
// --token-file, --timeout).
func fleet(c *cli.Context) (*client.Fleet, error) {
	return client.Open(client.Options{Only: c.String("server"), TokenFile: c.String("token-file"), Timeout: c.Duration("timeout")})
}

func sortedKeys[V any](m map[string]V) []string {
	ks := make([]string, 0, len(m))
	for k := range m {
		ks = append(ks, k)
	}
	sort.Strings(ks)
	return ks
}

// positional returns the command's positional arguments, applying the
// flags that follow them: urfave/cli v2 stops parsing flags at the first
// argument, and the documented syntax puts flags after NAME
// ("doppel server add vm1 HOST --token-file F").
func positional(c *cli.Context) ([]string, error) {
	args := c.Args().Slice()
	var pos []string
	for i := 0; i < len(args); i++ {
		a := args[i]
		if a == "--" {
			pos = append(pos, args[i+1:]...)
			break
		}
		if len(a) < 2 || a[0] != '-' {
			pos = append(pos, a)
			continue
		}
		name, value, hasValue := strings.Cut(strings.TrimLeft(a, "-"), "=")
		f := lookupFlag(c.Command, name)
		if f == nil {
			return nil, onUsageError(c, fmt.Errorf("flag provided but not defined: -%s", name), true)
		}
		if _, isBool := f.(*cli.BoolFlag); isBool {
			if !hasValue {
				value = "true"
			}
		} else if !hasValue {
			if i+1 >= len(args) {
				return nil, usageErrorf("flag needs an argument: -%s", name)
			}
			i++
			value = args[i]
		}
		if err := c.Set(name, value); err != nil {
			return nil, usageErrorf("invalid value %q for flag -%s: %v", value, name, err)
		}
	}
	return pos, nil
}

func lookupFlag(cmd *cli.Command, name string) cli.Flag {
	for _, f := range cmd.Flags {
		for _, n := range f.Names() {
			if n == name {
				return f
			}
		}
	}
	return nil
}

// required checks flags that must be given (checked here, not by
// urfave/cli, because they may follow the positional arguments).
func required(c *cli.Context, names ...string) error {
	var missing []string
	for _, n := range names {
		if !c.IsSet(n) {
			missing = append(missing, "--"+n)
		}
	}
	if len(missing) > 0 {
		return usageErrorf("missing %s", strings.Join(missing, ", "))
	}
	return nil
}
