package main

import (
	"bufio"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/doppelha/doppel/daemon/client"
	"github.com/doppelha/doppel/daemon/console"
	"github.com/doppelha/doppel/daemon/tlspin"
	"github.com/urfave/cli/v2"
)

// consoleCommand serves the web console.
func consoleCommand() *cli.Command {
	return &cli.Command{
		Name:  "console",
		Usage: "serve the web console (HTTPS): every operator command in a browser",
		Description: "A web page over HTTPS from which the whole job lifecycle runs: add servers, create\n" +
			"jobs (with the pre-flight), watch mirror and replication, fail over, reverse,\n" +
			"fail back. The console talks to the agents like the CLI, with the CLI's server\n" +
			"list ($DOPPEL_CONFIG or ~/.config/doppel/config.json). First run creates a\n" +
			"self-signed certificate (its fingerprint is printed) and a console password\n" +
			"(printed once, stored hashed); an agent's API token logs in too. With socket\n" +
			"activation (LISTEN_FDS, e.g. a systemd .socket unit) it serves the socket passed.\n" +
			"docs/console.md.",
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "listen", Value: "127.0.0.1:6330", Usage: "HTTPS address (use :6330 to serve other hosts)"},
			&cli.StringFlag{Name: "state-dir", Usage: "the console's certificate (tls/) and password hash (password)", DefaultText: "console/ next to the client config"},
			&cli.StringFlag{Name: "init-password", Usage: "set the console password from the first line of `FILE` (then stored hashed)"},
			&cli.BoolFlag{Name: "reset-password", Usage: "replace the console password with a new random one, printed once"},
			&cli.DurationFlag{Name: "interval", Value: time.Second, Usage: "how often the agents are asked for their jobs"},
			&cli.StringFlag{Name: "log-level", Value: "info", Usage: "debug, info, warn or error"},
		},
		Action: runConsole,
	}
}

func runConsole(c *cli.Context) error {
	if c.Args().Len() > 0 {
		return usageErrorf("usage: doppel console [--listen ADDR] [--state-dir DIR]")
	}
	if c.Duration("interval") < 100*time.Millisecond {
		return usageErrorf("--interval %v: at least 100ms", c.Duration("interval"))
	}
	var level slog.Level
	if err := level.UnmarshalText([]byte(c.String("log-level"))); err != nil {
		return usageErrorf("--log-level: %v", err)
	}
	log := slog.New(slog.NewTextHandler(c.App.ErrWriter, &slog.HandlerOptions{Level: level}))
	cfgPath, err := client.ConfigPath()
	if err != nil {
		return err
	}
	dir := c.String("state-dir")
	if dir == "" {
		dir = filepath.Join(filepath.Dir(cfgPath), "console")
	}
	if err := os.MkdirAll(filepath.Join(dir, "tls"), 0o700); err != nil {
		return fmt.Errorf("create console state dir: %w", err)
	}
	host, _ := os.Hostname()
	cert, made, err := tlspin.LoadOrCreate(filepath.Join(dir, "tls", "cert.pem"), filepath.Join(dir, "tls", "key.pem"), "doppel console "+host, host, "localhost")
	if err != nil {
		return err
	}
	pwFile := filepath.Join(dir, "password")
	newPassword := ""
	switch {
	case c.String("init-password") != "":
		pw, err := readFirstLine(c.String("init-password"))
		if err != nil {
			return usageErrorf("--init-password: %v", err)
		}
		if len(pw) < 8 {
			return usageErrorf("--init-password: the password needs at least 8 characters")
		}
		if err := console.WritePasswordFile(pwFile, pw); err != nil {
			return err
		}
	case c.Bool("reset-password"):
		newPassword = console.NewPassword()
	default:
		if _, err := os.Stat(pwFile); errors.Is(err, os.ErrNotExist) {
			newPassword = console.NewPassword()
		}
	}
	if newPassword != "" {
		if err := console.WritePasswordFile(pwFile, newPassword); err != nil {
			return err
		}
	}
	l, activated, err := consoleListener(c.String("listen"))
	if err != nil {
		return err
	}
	defer l.Close()
	con, err := console.New(console.Options{Log: log, ConfigPath: cfgPath, PasswordFile: pwFile, Interval: c.Duration("interval"), Version: version})
	if err != nil {
		return err
	}
	w := c.App.Writer
	fmt.Fprintf(w, "doppel console: %s\n", consoleURL(l.Addr()))
	if activated {
		fmt.Fprintf(w, "  (socket activation: serving the listener passed in LISTEN_FDS)\n")
	}
	fmt.Fprintf(w, "  certificate %s (self-signed%s: compare it with what your browser shows)\n", tlspin.Fingerprint(cert.Certificate[0]), createdNote(made))
	if newPassword != "" {
		fmt.Fprintf(w, "  console password: %s (shown once; stored hashed in %s)\n", newPassword, pwFile)
	}
	fmt.Fprintf(w, "  log in with the console password or an agent's API token; servers from %s\n", cfgPath)
	log.Info("console ready", "url", consoleURL(l.Addr()), "fingerprint", tlspin.Fingerprint(cert.Certificate[0]), "config", cfgPath)
	return con.Run(c.Context, l, cert)
}

func createdNote(made bool) string {
	if made {
		return ", created now in the state dir"
	}
	return ""
}

// consoleListener is the socket passed by socket activation (LISTEN_PID
// is this process, LISTEN_FDS at least 1: fd 3), else a new listener on
// addr.
func consoleListener(addr string) (net.Listener, bool, error) {
	if pid, err := strconv.Atoi(os.Getenv("LISTEN_PID")); err == nil && pid == os.Getpid() {
		if n, err := strconv.Atoi(os.Getenv("LISTEN_FDS")); err == nil && n >= 1 {
			f := os.NewFile(3, "LISTEN_FD_3")
			l, err := net.FileListener(f)
			f.Close()
			if err != nil {
				return nil, false, fmt.Errorf("socket activation: fd 3: %w", err)
			}
			os.Unsetenv("LISTEN_PID")
			os.Unsetenv("LISTEN_FDS")
			os.Unsetenv("LISTEN_FDNAMES")
			return l, true, nil
		}
	}
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, false, fmt.Errorf("console listener: %w", err)
	}
	return l, false, nil
}

func consoleURL(a net.Addr) string {
	host, port, err := net.SplitHostPort(a.String())
	if err != nil {
		return "https://" + a.String() + "/"
	}
	if ip := net.ParseIP(host); ip != nil && ip.IsUnspecified() {
		if h, err := os.Hostname(); err == nil {
			host = h
		}
	}
	return "https://" + net.JoinHostPort(host, port) + "/"
}

func readFirstLine(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	line, err := bufio.NewReader(f).ReadString('\n')
	if err != nil && line == "" {
		return "", fmt.Errorf("read %s: %w", path, err)
	}
	return strings.TrimRight(line, "\r\n"), nil
}
