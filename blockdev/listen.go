package blockdev

import (
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

// ParseListen splits a listen spec, "unix:PATH" or "tcp:HOST:PORT", into a
// network and an address, checking it.
func ParseListen(spec string) (network, addr string, err error) {
	network, addr, ok := strings.Cut(spec, ":")
	if !ok || addr == "" {
		return "", "", fmt.Errorf("listen address %q: want unix:PATH or tcp:HOST:PORT", spec)
	}
	switch network {
	case "unix":
		if len(addr) > 107 {
			return "", "", fmt.Errorf("listen address %q: unix socket path longer than 107 bytes", spec)
		}
		return network, addr, nil
	case "tcp", "tcp4", "tcp6":
		_, port, err := net.SplitHostPort(addr)
		if err != nil {
			return "", "", fmt.Errorf("listen address %q: %w", spec, err)
		}
		if port == "" {
			return "", "", fmt.Errorf("listen address %q: no port", spec)
		}
		return network, addr, nil
	}
	return "", "", fmt.Errorf("listen address %q: unknown network %q (want unix or tcp)", spec, network)
}

// Listen listens on spec: "unix:PATH" or "tcp:HOST:PORT". For a Unix socket
// the parent directory is created (mode 0755) and a stale socket left by a
// dead server is removed; a socket that still accepts connections is not
// touched (another server owns it). The socket file is removed when the
// listener is closed.
func Listen(spec string) (net.Listener, error) {
	network, addr, err := ParseListen(spec)
	if err != nil {
		return nil, err
	}
	if network != "unix" {
		l, err := net.Listen(network, addr)
		if err != nil {
			return nil, fmt.Errorf("listen %s: %w", spec, err)
		}
		return l, nil
	}
	if err := os.MkdirAll(filepath.Dir(addr), 0o755); err != nil {
		return nil, fmt.Errorf("listen %s: %w", spec, err)
	}
	if fi, err := os.Lstat(addr); err == nil {
		if fi.Mode().Type() != fs.ModeSocket {
			return nil, fmt.Errorf("listen %s: %s exists and is not a socket", spec, addr)
		}
		c, derr := net.DialTimeout("unix", addr, time.Second)
		if derr == nil {
			c.Close()
			return nil, fmt.Errorf("listen %s: another server is listening on %s", spec, addr)
		}
		if !errors.Is(derr, syscall.ECONNREFUSED) {
			return nil, fmt.Errorf("listen %s: cannot tell whether %s is in use: %w", spec, addr, derr)
		}
		if err := os.Remove(addr); err != nil {
			return nil, fmt.Errorf("listen %s: remove stale socket: %w", spec, err)
		}
	}
	l, err := net.Listen("unix", addr)
	if err != nil {
		return nil, fmt.Errorf("listen %s: %w", spec, err)
	}
	return l, nil
}
