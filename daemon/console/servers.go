package console

import (
	"context"
	"fmt"
	"net/http"
	"strings"
	"time"

	"github.com/doppelha/doppel/daemon/api"
	"github.com/doppelha/doppel/daemon/client"
	"github.com/doppelha/doppel/daemon/job"
	"github.com/doppelha/doppel/daemon/tlspin"
)

// serverFingerprint connects to an agent and returns the fingerprint of
// the certificate it presents, for the operator to compare with the
// agent's log line "agent ready" before trusting it.
func (c *Console) serverFingerprint(w http.ResponseWriter, r *http.Request, s *session) error {
	var req struct {
		Addr string `json:"addr"`
	}
	if err := readJSON(r, &req); err != nil {
		return err
	}
	addr, err := api.WithPort(strings.TrimSpace(req.Addr))
	if err != nil {
		return errorf(http.StatusBadRequest, "invalid", "%v", err)
	}
	ctx, cancel := context.WithTimeout(r.Context(), 10*time.Second)
	defer cancel()
	fp, err := api.FetchFingerprint(ctx, addr)
	if err != nil {
		return errorf(http.StatusBadGateway, "unreachable", "%v", err)
	}
	writeJSON(w, http.StatusOK, map[string]string{"addr": addr, "fingerprint": fp})
	return nil
}

// addServerRequest is the add-server form, once the operator confirmed
// the fingerprint.
type addServerRequest struct {
	Name        string `json:"name"`
	Addr        string `json:"addr"`
	Fingerprint string `json:"fingerprint"`
	Token       string `json:"token"`
}

// addServer pins the agent's certificate (the fingerprint the operator
// confirmed; the agent must present it now), checks the token with the
// agent and stores the server in the client config.
func (c *Console) addServer(w http.ResponseWriter, r *http.Request, s *session) error {
	var req addServerRequest
	if err := readJSON(r, &req); err != nil {
		return err
	}
	if err := job.ValidName("server", req.Name); err != nil {
		return errorf(http.StatusBadRequest, "invalid", "%v", err)
	}
	addr, err := api.WithPort(strings.TrimSpace(req.Addr))
	if err != nil {
		return errorf(http.StatusBadRequest, "invalid", "%v", err)
	}
	fp, err := tlspin.Parse(req.Fingerprint)
	if err != nil {
		return errorf(http.StatusBadRequest, "invalid", "fingerprint: %v", err)
	}
	token := strings.TrimSpace(req.Token)
	if len(token) < 16 || strings.ContainsAny(token, " \t\r\n") {
		return errorf(http.StatusBadRequest, "invalid", "token: paste the agent's STATE/token (one line, at least 16 characters)")
	}
	entry := client.Server{Name: req.Name, Addr: addr, Fingerprint: fp, Token: token}
	cl, err := entry.Client()
	if err != nil {
		return errorf(http.StatusBadRequest, "invalid", "%v", err)
	}
	ctx, cancel := context.WithTimeout(r.Context(), 10*time.Second)
	defer cancel()
	info, err := cl.Info(ctx)
	if err != nil {
		if api.IsKind(err, "unauthorized") {
			return errorf(http.StatusBadRequest, "unauthorized", "agent %s refused the token: is it that agent's STATE/token?", addr)
		}
		return errorf(http.StatusBadGateway, "unreachable", "%v", err)
	}
	if err := c.cfg.update(func(cfg *client.Config) error {
		cfg.Put(entry)
		return nil
	}); err != nil {
		return err
	}
	c.record(s.who, "", req.Name, fmt.Sprintf("added server %s: %s (host %s, agent %s, %s)", req.Name, addr, info.Hostname, info.Version, fp))
	c.smp.wake(c.bg)
	writeJSON(w, http.StatusCreated, map[string]any{"name": req.Name, "addr": addr, "hostname": info.Hostname, "version": info.Version, "subsystems": info.Subsystems})
	return nil
}

// removeServer forgets a server (its agent and jobs are not touched).
func (c *Console) removeServer(w http.ResponseWriter, r *http.Request, s *session) error {
	name := r.PathValue("name")
	if err := c.cfg.update(func(cfg *client.Config) error { return cfg.Remove(name) }); err != nil {
		return err
	}
	c.record(s.who, "", name, "removed server "+name+" from the console's list")
	c.smp.wake(c.bg)
	writeJSON(w, http.StatusOK, map[string]string{"removed": name})
	return nil
}
