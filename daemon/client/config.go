package client

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"

	"github.com/doppelha/doppel/daemon/api"
	"github.com/doppelha/doppel/daemon/statefile"
)

// Server is an agent the operator's tools know: its address, pinned
// certificate and token (the config file is 0600 for that reason).
type Server struct {
	Name        string `json:"name"`
	Addr        string `json:"addr"` // HOST:PORT of the control API
	Fingerprint string `json:"fingerprint"`
	Token       string `json:"token"`
}

// Config is the operator's list of agents: the servers added with doppel
// server add, shared by the CLI and the console.
type Config struct {
	Servers []Server `json:"servers"`
	path    string
}

// ConfigPath is $DOPPEL_CONFIG, else ~/.config/doppel/config.json.
func ConfigPath() (string, error) {
	if p := os.Getenv("DOPPEL_CONFIG"); p != "" {
		return p, nil
	}
	dir, err := os.UserConfigDir()
	if err != nil {
		return "", fmt.Errorf("find the config dir (set DOPPEL_CONFIG): %w", err)
	}
	return filepath.Join(dir, "doppel", "config.json"), nil
}

// LoadConfig reads the config at path (empty when missing).
func LoadConfig(path string) (*Config, error) {
	c := &Config{path: path}
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return c, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read config: %w", err)
	}
	if err := json.Unmarshal(b, c); err != nil {
		return nil, fmt.Errorf("config %s: %w", path, err)
	}
	return c, nil
}

// Save writes the config atomically with mode 0600.
func (c *Config) Save() error {
	if err := os.MkdirAll(filepath.Dir(c.path), 0o700); err != nil {
		return fmt.Errorf("save config: %w", err)
	}
	sort.Slice(c.Servers, func(i, j int) bool { return c.Servers[i].Name < c.Servers[j].Name })
	b, err := json.MarshalIndent(c, "", "  ")
	if err != nil {
		return err
	}
	if err := statefile.Write(c.path, append(b, '\n'), 0o600); err != nil {
		return fmt.Errorf("save config: %w", err)
	}
	return nil
}

// Path is where the config lives.
func (c *Config) Path() string { return c.path }

// ErrUnknownServer is returned for a server name not in the config.
var ErrUnknownServer = errors.New("unknown server")

// Server returns the named server.
func (c *Config) Server(name string) (Server, error) {
	for _, s := range c.Servers {
		if s.Name == name {
			return s, nil
		}
	}
	names := make([]string, len(c.Servers))
	for i, s := range c.Servers {
		names[i] = s.Name
	}
	return Server{}, fmt.Errorf("%w %q (known: %v; add it with doppel server add)", ErrUnknownServer, name, names)
}

// Put adds or replaces a server.
func (c *Config) Put(s Server) {
	for i := range c.Servers {
		if c.Servers[i].Name == s.Name {
			c.Servers[i] = s
			return
		}
	}
	c.Servers = append(c.Servers, s)
}

// Remove deletes a server; ErrUnknownServer when absent.
func (c *Config) Remove(name string) error {
	for i := range c.Servers {
		if c.Servers[i].Name == name {
			c.Servers = append(c.Servers[:i], c.Servers[i+1:]...)
			return nil
		}
	}
	_, err := c.Server(name)
	return err
}

// Client returns a client of the server's control API.
func (s Server) Client() (*api.Client, error) {
	return api.NewClient(s.Addr, s.Token, s.Fingerprint)
}
