// Package console is doppel's web console (doppel console): one page, over
// HTTPS, from which an operator adds servers, creates jobs, watches
// mirror and replication, and runs failover, reverse, switchover and
// failback, as in a Double-Take console.
//
// The console is a client of the agents, like the CLI: it reads the CLI's
// server list (api.ClientConfig: addresses, pinned fingerprints, tokens)
// and talks to every agent over its control API. It asks each agent for
// its jobs once per interval (in parallel, each bounded), judges every
// job with protection.Assess (the headline doppel job status prints),
// keeps an hour of samples per job for the charts, and pushes each new
// snapshot to the browsers on a server-sent event stream.
//
// Security: HTTPS with a self-signed certificate (created on first run;
// its fingerprint is printed); a login with the console password (stored
// as a PBKDF2 hash) or the API token of any configured agent; sessions in
// memory with Secure, HttpOnly, SameSite=Strict cookies; every request
// that changes something carries the session's CSRF token in a header and
// must come from the console's own origin; wrong logins are rate limited.
// The page's script and style are embedded in the binary (no CDN, no
// build step) and a strict Content-Security-Policy allows nothing else.
package console

import (
	"context"
	"crypto/tls"
	"embed"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net"
	"net/http"
	"os"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/doppelha/doppel/daemon/api"
	"github.com/doppelha/doppel/daemon/client"
)

//go:embed web
var webFS embed.FS

// Options configure a console.
type Options struct {
	Log *slog.Logger
	// ConfigPath is the client config holding the servers (the CLI's:
	// $DOPPEL_CONFIG or ~/.config/doppel/config.json). Servers added in
	// the console are saved there; the CLI's changes are picked up.
	ConfigPath string
	// PasswordFile holds the console password's hash ("" or missing: only
	// agents' API tokens log in).
	PasswordFile string
	// Interval between two rounds of queries to the agents (default 1 s).
	Interval time.Duration
	// Version is shown in the page footer.
	Version string
}

// Console is the web console: the server list, the sampler that follows
// the agents, the sessions of the logged-in browsers, and the operators'
// actions.
type Console struct {
	log  *slog.Logger
	opts Options
	cfg  *configStore
	smp  *sampler
	ss   *sessions
	mux  *http.ServeMux
	// audit is the console's own log of the actions operators ran.
	auditMu sync.Mutex
	audit   []auditEntry
	// bg is the context of the console's background work (rounds woken
	// by actions, switchover followers).
	bg context.Context
}

// auditEntry is one action an operator ran from the console.
type auditEntry struct {
	Time   time.Time `json:"time"`
	Who    string    `json:"who"`
	Job    string    `json:"job"`
	Server string    `json:"server"`
	Msg    string    `json:"msg"`
}

// maxAudit bounds the console's own log.
const maxAudit = 1000

// New returns a console; Run serves it.
func New(opts Options) (*Console, error) {
	if opts.Log == nil {
		opts.Log = slog.New(slog.DiscardHandler)
	}
	if opts.Interval <= 0 {
		opts.Interval = time.Second
	}
	if opts.ConfigPath == "" {
		return nil, errors.New("console: no client config path")
	}
	c := &Console{log: opts.Log, opts: opts, cfg: &configStore{path: opts.ConfigPath}, ss: newSessions(), mux: http.NewServeMux(), bg: context.Background()}
	if _, err := c.cfg.load(); err != nil {
		return nil, err
	}
	c.smp = newSampler(opts.Log, c.cfg.current, opts.Interval)
	c.routes()
	return c, nil
}

// Handler is the console's HTTP handler (served over TLS by Run).
func (c *Console) Handler() http.Handler { return c.mux }

// Sample runs one round of queries to the agents now (tests; Run samples
// on its own).
func (c *Console) Sample(ctx context.Context) { c.smp.round(ctx) }

// Run samples the agents and serves HTTPS on l with cert until ctx ends.
func (c *Console) Run(ctx context.Context, l net.Listener, cert tls.Certificate) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	c.bg = ctx
	go c.smp.run(ctx)
	hs := &http.Server{
		Handler:           c.mux,
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       2 * time.Minute,
		ErrorLog:          slog.NewLogLogger(c.log.Handler(), slog.LevelDebug),
		BaseContext:       func(net.Listener) context.Context { return ctx },
		TLSConfig:         &tls.Config{MinVersion: tls.VersionTLS12, Certificates: []tls.Certificate{cert}},
	}
	errc := make(chan error, 1)
	go func() { errc <- hs.ServeTLS(l, "", "") }()
	select {
	case err := <-errc:
		return fmt.Errorf("serve console: %w", err)
	case <-ctx.Done():
		sctx, scancel := context.WithTimeout(context.Background(), 3*time.Second)
		defer scancel()
		hs.Shutdown(sctx)
		return nil
	}
}

// configStore is the servers' configuration (client.Config), read again
// when the file changes (the CLI may add servers while the console runs).
type configStore struct {
	path string
	mu   sync.Mutex
	cfg  *client.Config
	mod  time.Time
	size int64
}

// load returns the config, reading the file again when it changed.
func (cs *configStore) load() (*client.Config, error) {
	cs.mu.Lock()
	defer cs.mu.Unlock()
	return cs.loadLocked()
}

func (cs *configStore) loadLocked() (*client.Config, error) {
	fi, err := os.Stat(cs.path)
	if err == nil && cs.cfg != nil && fi.ModTime().Equal(cs.mod) && fi.Size() == cs.size {
		return cs.cfg, nil
	}
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("read config: %w", err)
	}
	cfg, err := client.LoadConfig(cs.path)
	if err != nil {
		return nil, err
	}
	cs.cfg = cfg
	if fi != nil {
		cs.mod, cs.size = fi.ModTime(), fi.Size()
	}
	return cfg, nil
}

// current returns a copy of the config (the last good one when the file
// cannot be read now; nil before any).
func (cs *configStore) current() *client.Config {
	cs.mu.Lock()
	defer cs.mu.Unlock()
	cfg, err := cs.loadLocked()
	if err != nil {
		cfg = cs.cfg
	}
	if cfg == nil {
		return nil
	}
	cp := *cfg
	cp.Servers = slices.Clone(cfg.Servers)
	return &cp
}

// update changes the config under the lock and saves it.
func (cs *configStore) update(f func(*client.Config) error) error {
	cs.mu.Lock()
	defer cs.mu.Unlock()
	cfg, err := cs.loadLocked()
	if err != nil {
		return err
	}
	if err := f(cfg); err != nil {
		return err
	}
	if err := cfg.Save(); err != nil {
		return err
	}
	cs.cfg = nil // read back (and stat) at the next load
	return nil
}

// queryTimeout bounds each agent's answer to the console's queries.
const queryTimeout = client.DefaultTimeout

// fleet is every configured server, as the client package drives them.
func (c *Console) fleet() (*client.Fleet, error) {
	cfg := c.cfg.current()
	if cfg == nil {
		return nil, errorf(http.StatusConflict, "no_servers", "no servers: add them first")
	}
	f, err := client.New(cfg, client.Options{Timeout: queryTimeout})
	if err != nil {
		return nil, errorf(http.StatusConflict, "no_servers", "%v", err)
	}
	return f, nil
}

func (c *Console) record(who, jobName, server, msg string) {
	c.auditMu.Lock()
	defer c.auditMu.Unlock()
	c.audit = append(c.audit, auditEntry{Time: time.Now(), Who: who, Job: jobName, Server: server, Msg: msg})
	if len(c.audit) > maxAudit {
		c.audit = append([]auditEntry(nil), c.audit[len(c.audit)-maxAudit:]...)
	}
	c.log.Info("console action", "who", who, "job", jobName, "server", server, "msg", msg)
}

func (c *Console) auditOf(jobName string) []auditEntry {
	c.auditMu.Lock()
	defer c.auditMu.Unlock()
	var out []auditEntry
	for _, e := range c.audit {
		if e.Job == jobName {
			out = append(out, e)
		}
	}
	return out
}

// httpError is an error with its HTTP status and kind.
type httpError struct {
	status int
	kind   string
	msg    string
}

func (e *httpError) Error() string { return e.msg }

func errorf(status int, kind, format string, a ...any) error {
	return &httpError{status: status, kind: kind, msg: fmt.Sprintf(format, a...)}
}

// writeErr answers err as JSON {error, kind}: an agent's error keeps its
// status and kind.
func writeErr(w http.ResponseWriter, err error) {
	status, kind := http.StatusInternalServerError, "internal"
	var he *httpError
	var ae *api.Error
	switch {
	case errors.As(err, &he):
		status, kind = he.status, he.kind
	case errors.As(err, &ae):
		status, kind = ae.Status, ae.Kind
		if status == http.StatusUnauthorized {
			// The agent refused the console's stored token: not the
			// browser's session.
			status = http.StatusBadGateway
		}
	case errors.Is(err, client.ErrUnknownServer):
		status, kind = http.StatusNotFound, "not_found"
	}
	writeJSON(w, status, map[string]string{"error": err.Error(), "kind": kind})
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(status)
	w.Write(mustJSON(v))
}

func mustJSON(v any) []byte {
	b, err := json.Marshal(v)
	if err != nil {
		panic(fmt.Sprintf("console: encode %T: %v", v, err))
	}
	return b
}

// readJSON decodes a request body of at most 1 MiB.
func readJSON(r *http.Request, v any) error {
	dec := json.NewDecoder(io.LimitReader(r.Body, 1<<20))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return errorf(http.StatusBadRequest, "invalid", "request body: %v", err)
	}
	return nil
}

// securityHeaders go on every answer: nothing but the console's own
// script and style, no framing, no referrer to other sites.
func securityHeaders(w http.ResponseWriter) {
	h := w.Header()
	h.Set("Content-Security-Policy", "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
	h.Set("X-Content-Type-Options", "nosniff")
	h.Set("Referrer-Policy", "same-origin") // no-referrer would make the browser send "Origin: null" on our own forms
	h.Set("X-Frame-Options", "DENY")
}

// routes wires the console's pages and API.
func (c *Console) routes() {
	static, _ := fs.Sub(webFS, "web/static")
	fileServer := http.StripPrefix("/static/", http.FileServerFS(static))
	c.mux.Handle("GET /static/", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		securityHeaders(w)
		w.Header().Set("Cache-Control", "no-cache")
		fileServer.ServeHTTP(w, r)
	}))
	c.mux.HandleFunc("GET /login", c.loginPage)
	c.mux.HandleFunc("POST /login", c.login)
	c.mux.HandleFunc("POST /logout", c.api(c.logout))
	c.mux.HandleFunc("GET /{$}", c.page)
	c.mux.HandleFunc("GET /api/session", c.api(func(w http.ResponseWriter, r *http.Request, s *session) error {
		writeJSON(w, http.StatusOK, map[string]string{"csrf": s.csrf, "who": s.who, "version": c.opts.Version})
		return nil
	}))
	c.mux.HandleFunc("GET /api/state", c.api(func(w http.ResponseWriter, r *http.Request, s *session) error {
		js, _ := c.smp.snapshot()
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("Cache-Control", "no-store")
		w.Write(js)
		return nil
	}))
	c.mux.HandleFunc("GET /api/stream", c.api(c.stream))
	c.mux.HandleFunc("GET /api/jobs/{name}/history", c.api(func(w http.ResponseWriter, r *http.Request, s *session) error {
		writeJSON(w, http.StatusOK, orEmpty(c.smp.samples(r.PathValue("name"))))
		return nil
	}))
	c.mux.HandleFunc("GET /api/jobs/{name}/events", c.api(c.events))
	c.mux.HandleFunc("GET /api/jobs/{name}/plan/{action}", c.api(c.plan))
	c.mux.HandleFunc("GET /api/jobs/{name}/snapshots", c.api(c.snapshots))
	c.mux.HandleFunc("POST /api/jobs/{name}/actions/{action}", c.api(c.act))
	c.mux.HandleFunc("POST /api/jobs", c.api(c.createJob))
	c.mux.HandleFunc("POST /api/servers/fingerprint", c.api(c.serverFingerprint))
	c.mux.HandleFunc("POST /api/servers", c.api(c.addServer))
	c.mux.HandleFunc("DELETE /api/servers/{name}", c.api(c.removeServer))
	c.mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		securityHeaders(w)
		if strings.HasPrefix(r.URL.Path, "/api/") {
			writeErr(w, errorf(http.StatusNotFound, "not_found", "no route %s %s", r.Method, r.URL.Path))
			return
		}
		http.NotFound(w, r)
	})
}

func orEmpty[T any](s []T) []T {
	if s == nil {
		return []T{}
	}
	return s
}

// api wraps an API handler: a session is required (401 without one); a
// request that changes something must come from the console's origin and
// carry the session's CSRF token (403 otherwise).
func (c *Console) api(h func(http.ResponseWriter, *http.Request, *session) error) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		securityHeaders(w)
		s := c.ss.get(r)
		if s == nil {
			writeErr(w, errorf(http.StatusUnauthorized, "unauthorized", "not logged in"))
			return
		}
		if r.Method != http.MethodGet && r.Method != http.MethodHead {
			if err := sameOrigin(r); err != nil {
				writeErr(w, errorf(http.StatusForbidden, "csrf", "refused: %v", err))
				return
			}
			if !csrfOK(r, s) {
				writeErr(w, errorf(http.StatusForbidden, "csrf", "refused: missing or wrong CSRF token (reload the page)"))
				return
			}
		}
		if err := h(w, r, s); err != nil {
			writeErr(w, err)
		}
	}
}

// page serves the single page (the login page without a session).
func (c *Console) page(w http.ResponseWriter, r *http.Request) {
	securityHeaders(w)
	if c.ss.get(r) == nil {
		http.Redirect(w, r, "/login", http.StatusSeeOther)
		return
	}
	b, err := webFS.ReadFile("web/index.html")
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	w.Header().Set("Cache-Control", "no-store")
	w.Write(b)
}

// stream sends the snapshot as server-sent events: one "state" event at
// once and at every new round, a comment every 15 s to keep proxies from
// closing an idle stream.
func (c *Console) stream(w http.ResponseWriter, r *http.Request, s *session) error {
	fl, ok := w.(http.Flusher)
	if !ok {
		return errorf(http.StatusInternalServerError, "internal", "streaming unsupported")
	}
	w.Header().Set("Content-Type", "text/event-stream")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(http.StatusOK)
	keep := time.NewTicker(15 * time.Second)
	defer keep.Stop()
	for {
		js, changed := c.smp.snapshot()
		if _, err := fmt.Fprintf(w, "event: state\ndata: %s\n\n", js); err != nil {
			return nil
		}
		fl.Flush()
	wait:
		select {
		case <-r.Context().Done():
			return nil
		case <-changed:
		case <-keep.C:
			if c.ss.get(r) == nil {
				return nil // logged out
			}
			if _, err := io.WriteString(w, ": keep-alive\n\n"); err != nil {
				return nil
			}
			fl.Flush()
			goto wait
		}
	}
}

// maxEvents bounds the events the job page shows.
const maxEvents = 300

// events merges the job's history from its agents (client's
// Fleet.Events) with the console's own log of the operators' actions,
// oldest first.
func (c *Console) events(w http.ResponseWriter, r *http.Request, s *session) error {
	name := r.PathValue("name")
	var all []client.ServerEvent
	var missed []string
	f, err := c.fleet()
	if err == nil {
		all, missed, err = f.Events(r.Context(), name, maxEvents)
	}
	if err != nil && len(missed) == 0 {
		missed = append(missed, err.Error())
	}
	for _, a := range c.auditOf(name) {
		msg := a.Who + ": " + a.Msg
		if a.Server != "" {
			msg += " (sent to " + a.Server + ")"
		}
		all = append(all, client.ServerEvent{Server: "console", Event: api.Event{Time: a.Time, Kind: "console", Msg: msg}})
	}
	sort.SliceStable(all, func(i, j int) bool { return all[i].Time.Before(all[j].Time) })
	if len(all) > maxEvents {
		all = all[len(all)-maxEvents:]
	}
	sort.Strings(missed)
	writeJSON(w, http.StatusOK, map[string]any{"events": orEmpty(all), "errors": orEmpty(missed)})
	return nil
}
