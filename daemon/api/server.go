package api

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/doppelha/doppel/daemon/ha"
	"github.com/doppelha/doppel/daemon/job"
	"github.com/doppelha/doppel/daemon/tlspin"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Agent is what the API serves: the agent implements it.
type Agent interface {
	Info() Info
	Jobs(ctx context.Context) ([]JobStatus, error)
	Job(ctx context.Context, name string) (JobStatus, error)
	CreateJob(ctx context.Context, spec job.Spec) (JobStatus, error)
	// Preflight reports what creating spec would find on this agent,
	// changing nothing.
	Preflight(ctx context.Context, spec job.Spec) Preflight
	DeleteJob(ctx context.Context, name string, opts DeleteOptions) (DeleteResult, error)
	// StopAgent stops the agent (refused while volumes are in use,
	// unless forced).
	StopAgent(ctx context.Context, opts StopOptions) (StopResult, error)
	// RestartAgent hands the agent's state to a new agent process (the
	// binary now installed) without taking the volumes away.
	RestartAgent(ctx context.Context) (RestartResult, error)
	Command(ctx context.Context, name string, cmd ha.EventType, opts CommandOptions) (JobStatus, error)
	Verify(ctx context.Context, name string) (VerifyResult, error)
	// Events is the job's recent history on this agent, oldest first.
	Events(ctx context.Context, name string) ([]Event, error)
	// PeerSecret returns the job's peer secret (job.ErrNotFound if none).
	PeerSecret(name string) (string, error)
	PeerMessage(ctx context.Context, name string, m ha.Message) error
}

// Server is the control API's HTTPS server.
type Server struct {
	// Limits; NewServer sets the defaults, change them before Serve.
	MaxConns          int           // connections served at once; beyond, HTTP 503 (kind busy)
	ReadHeaderTimeout time.Duration // TLS handshake and request header
	BodyTimeout       time.Duration // request body
	IdleTimeout       time.Duration // keep-alive connection without a request

	log      *slog.Logger
	id       *Credentials
	b        Agent
	reg      *prometheus.Registry
	requests *prometheus.CounterVec
	mux      *http.ServeMux

	// Handing the listener over (StopAccepting, ResumeAccepting).
	lmu    sync.Mutex
	ln     net.Listener
	paused bool
	resume chan net.Listener
}

// maxBody bounds request bodies.
const maxBody = 1 << 20

// NewServer returns the API for b, authenticated by id. Metrics are
// registered on reg and served, with reg's other collectors, on /metrics.
func NewServer(log *slog.Logger, id *Credentials, b Agent, reg *prometheus.Registry) (*Server, error) {
	s := &Server{log: log, id: id, b: b, reg: reg, mux: http.NewServeMux(),
		MaxConns: DefaultMaxConns, ReadHeaderTimeout: DefaultReadHeaderTimeout, BodyTimeout: DefaultBodyTimeout, IdleTimeout: DefaultIdleTimeout}
	s.requests = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "doppel_api_requests_total",
		Help: "Control API requests by route and HTTP status.",
	}, []string{"route", "code"})
	if err := reg.Register(s.requests); err != nil {
		return nil, fmt.Errorf("register api metrics: %w", err)
	}
	s.handle("GET /v1/info", s.auth(func(w http.ResponseWriter, r *http.Request) error {
		return writeJSON(w, http.StatusOK, b.Info())
	}))
	s.handle("GET /v1/jobs", s.auth(func(w http.ResponseWriter, r *http.Request) error {
		jobs, err := b.Jobs(r.Context())
		if err != nil {
			return err
		}
		if jobs == nil {
			jobs = []JobStatus{}
		}
		return writeJSON(w, http.StatusOK, jobs)
	}))
	s.handle("POST /v1/jobs", s.auth(func(w http.ResponseWriter, r *http.Request) error {
		var spec job.Spec
		if err := s.readJSON(w, r, &spec); err != nil {
			return err
		}
		st, err := b.CreateJob(r.Context(), spec)
		if err != nil {
			return err
		}
		return writeJSON(w, http.StatusCreated, st)
	}))
	s.handle("POST /v1/agent/stop", s.auth(func(w http.ResponseWriter, r *http.Request) error {
		var opts StopOptions
		if err := s.readJSON(w, r, &opts); err != nil {
			return err
		}
		res, err := b.StopAgent(r.Context(), opts)
		if err != nil {
			return err
		}
		return writeJSON(w, http.StatusAccepted, res)
	}))
	s.handle("POST /v1/agent/restart", s.auth(func(w http.ResponseWriter, r *http.Request) error {
		res, err := b.RestartAgent(r.Context())
		if err != nil {
			return err
		}
		return writeJSON(w, http.StatusOK, res)
	}))
	s.handle("POST /v1/preflight", s.auth(func(w http.ResponseWriter, r *http.Request) error {
		var spec job.Spec
		if err := s.readJSON(w, r, &spec); err != nil {
			return err
		}
		return writeJSON(w, http.StatusOK, b.Preflight(r.Context(), spec))
	}))
	s.handle("GET /v1/jobs/{name}", s.auth(func(w http.ResponseWriter, r *http.Request) error {
		st, err := b.Job(r.Context(), r.PathValue("name"))
		if err != nil {
			return err
		}
		return writeJSON(w, http.StatusOK, st)
	}))
	s.handle("GET /v1/jobs/{name}/events", s.auth(func(w http.ResponseWriter, r *http.Request) error {
		evs, err := b.Events(r.Context(), r.PathValue("name"))
		if err != nil {
			return err
		}
		return writeJSON(w, http.StatusOK, evs)
	}))
	s.handle("DELETE /v1/jobs/{name}", s.auth(func(w http.ResponseWriter, r *http.Request) error {
		var opts DeleteOptions
		q := r.URL.Query()
		for k, dst := range map[string]*bool{"force": &opts.Force, "keep_state": &opts.KeepState, "undo": &opts.Undo} {
			if v := q.Get(k); v != "" {
				b, err := strconv.ParseBool(v)
				if err != nil {
					return &httpError{http.StatusBadRequest, "invalid", fmt.Sprintf("query %s=%q: want true or false", k, v)}
				}
				*dst = b
			}
		}
		res, err := b.DeleteJob(r.Context(), r.PathValue("name"), opts)
		if err != nil {
			return err
		}
		return writeJSON(w, http.StatusOK, res)
	}))
	s.handle("POST /v1/jobs/{name}/verify", s.auth(func(w http.ResponseWriter, r *http.Request) error {
		res, err := b.Verify(r.Context(), r.PathValue("name"))
		if err != nil {
			return err
		}
		return writeJSON(w, http.StatusOK, res)
	}))
	s.snapshotRoutes(b)
	s.handle("POST /v1/jobs/{name}/{command}", s.auth(func(w http.ResponseWriter, r *http.Request) error {
		cmd := ha.EventType(r.PathValue("command"))
		switch cmd {
		case ha.CmdFailover, ha.CmdReverse, ha.CmdSwitchover, ha.CmdFailback, ha.CmdPause, ha.CmdResume:
		default:
			return &httpError{http.StatusNotFound, "not_found", fmt.Sprintf("unknown command %q: use failover, reverse, switchover, failback, pause, resume or verify", cmd)}
		}
		var opts CommandOptions
		if err := s.readJSON(w, r, &opts); err != nil {
			return err
		}
		st, err := b.Command(r.Context(), r.PathValue("name"), cmd, opts)
		if err != nil {
			return err
		}
		return writeJSON(w, http.StatusOK, st)
	}))
	s.handle("POST /v1/peer/jobs/{name}/message", func(w http.ResponseWriter, r *http.Request) error {
		// An unknown job and a wrong secret get the same answer, after
		// the same comparison: the route does not tell which jobs exist.
		name := r.PathValue("name")
		secret, err := b.PeerSecret(name)
		known := err == nil
		switch {
		case errors.Is(err, job.ErrNotFound):
			secret = unknownJobSecret
		case err != nil:
			return err
		}
		if !bearerOK(r, secret) || !known {
			return errPeerUnauthorized
		}
		var m ha.Message
		if err := s.readJSON(w, r, &m); err != nil {
			return err
		}
		if err := b.PeerMessage(r.Context(), name, m); err != nil {
			return err
		}
		w.WriteHeader(http.StatusNoContent)
		return nil
	})
	// Metrics need the API token here (a Prometheus scrape config sets
	// it as its bearer token); ServeMetrics serves them without one on a
	// listener of their own (doppel agent --metrics-listen).
	metrics := s.MetricsHandler()
	s.handle("GET /metrics", s.auth(func(w http.ResponseWriter, r *http.Request) error {
		metrics.ServeHTTP(w, r)
		return nil
	}))
	s.mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		s.writeError(w, r, &httpError{http.StatusNotFound, "not_found", fmt.Sprintf("no route %s %s", r.Method, r.URL.Path)})
	})
	return s, nil
}

// Handler returns the API's HTTP handler (without TLS), for tests.
func (s *Server) Handler() http.Handler { return s.mux }

// MetricsHandler serves the registry's metrics, without authentication.
func (s *Server) MetricsHandler() http.Handler {
	return promhttp.HandlerFor(s.reg, promhttp.HandlerOpts{})
}

// ServeMetrics serves /metrics in plain HTTP, without a token, on l until
// ctx is done (a listener on a monitoring network: --metrics-listen).
func (s *Server) ServeMetrics(ctx context.Context, l net.Listener) error {
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", s.MetricsHandler())
	hs := &http.Server{Handler: mux, ReadHeaderTimeout: s.ReadHeaderTimeout, ReadTimeout: s.BodyTimeout, WriteTimeout: time.Minute,
		IdleTimeout: s.IdleTimeout, ErrorLog: slog.NewLogLogger(s.log.Handler(), slog.LevelDebug)}
	stop := context.AfterFunc(ctx, func() { hs.Close() })
	defer stop()
	if err := hs.Serve(newLimitListener(l, make(chan struct{}, s.MaxConns), func(c net.Conn) { c.Close() })); err != nil && ctx.Err() == nil {
		return fmt.Errorf("serve metrics: %w", err)
	}
	return nil
}

// TLSConfig returns the server-side TLS configuration.
func (s *Server) TLSConfig() *tls.Config {
	return &tls.Config{Certificates: []tls.Certificate{s.id.Cert}, MinVersion: tls.VersionTLS13}
}

// Serve serves HTTPS on l until ctx is cancelled, then shuts down
// gracefully and returns nil.
func (s *Server) Serve(ctx context.Context, l net.Listener) error {
	// No ReadTimeout or WriteTimeout: a command (failback, verify) may
	// run for minutes. The body has its own deadline (readJSON), idle
	// connections are closed, and their number is capped.
	hs := &http.Server{
		Handler:           s.mux,
		ReadHeaderTimeout: s.ReadHeaderTimeout,
		IdleTimeout:       s.IdleTimeout,
		ErrorLog:          slog.NewLogLogger(s.log.Handler(), slog.LevelDebug),
		BaseContext:       func(net.Listener) context.Context { return ctx },
	}
	cfg := s.TLSConfig()
	slots := make(chan struct{}, s.MaxConns) // shared by the listeners a resumed server serves
	shutdown := func() {
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		hs.Shutdown(sctx)
	}
	for {
		s.lmu.Lock()
		s.ln, s.paused = l, false
		if s.resume == nil {
			s.resume = make(chan net.Listener, 1)
		}
		resume := s.resume
		s.lmu.Unlock()
		errc := make(chan error, 1)
		ll := newLimitListener(l, slots, rejectBusy(cfg, s.MaxConns))
		go func() { errc <- hs.Serve(tls.NewListener(ll, cfg)) }()
		select {
		case err := <-errc:
			s.lmu.Lock()
			paused := s.paused
			s.lmu.Unlock()
			if !paused {
				return fmt.Errorf("serve control API: %w", err)
			}
			// Handed over: requests in progress finish; new ones go to
			// the listener's new owner, or here again (ResumeAccepting).
			select {
			case l = <-resume:
				continue
			case <-ctx.Done():
				shutdown()
				return nil
			}
		case <-ctx.Done():
			shutdown()
			return nil
		}
	}
}

// StopAccepting closes the server's listener without ending the requests
// in progress: a restarting agent hands a duplicate of it to its
// successor, which accepts from then on. Serve keeps running until its
// context ends, or serves again on the listener ResumeAccepting gives.
func (s *Server) StopAccepting() {
	s.lmu.Lock()
	defer s.lmu.Unlock()
	if s.ln == nil || s.paused {
		return
	}
	s.paused = true
	s.ln.Close()
}

// ResumeAccepting makes a server that stopped accepting serve l (the
// successor failed: this agent takes its listener back).
func (s *Server) ResumeAccepting(l net.Listener) {
	s.lmu.Lock()
	r := s.resume
	s.lmu.Unlock()
	if r != nil {
		r <- l
	}
}

type handlerFunc func(http.ResponseWriter, *http.Request) error

func (s *Server) handle(pattern string, h handlerFunc) {
	route := pattern
	s.mux.HandleFunc(pattern, func(w http.ResponseWriter, r *http.Request) {
		rw := &statusWriter{ResponseWriter: w, code: http.StatusOK}
		if err := h(rw, r); err != nil {
			s.writeError(rw, r, err)
		}
		s.requests.WithLabelValues(route, strconv.Itoa(rw.code)).Inc()
	})
}

func (s *Server) auth(h handlerFunc) handlerFunc {
	return func(w http.ResponseWriter, r *http.Request) error {
		if !bearerOK(r, s.id.Token) {
			return errUnauthorized
		}
		return h(w, r)
	}
}

func bearerOK(r *http.Request, want string) bool {
	got, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
	return ok && want != "" && tlspin.Equal(got, want)
}

type httpError struct {
	code int
	kind string
	msg  string
}

func (e *httpError) Error() string { return e.msg }

var errUnauthorized = &httpError{http.StatusUnauthorized, "unauthorized", "wrong or missing API token (the agent's token is in its state dir, file token)"}

// errPeerUnauthorized answers a peer message for an unknown job and one
// with a wrong job secret alike.
var errPeerUnauthorized = &httpError{http.StatusUnauthorized, "unauthorized", "wrong job secret, or no such job on this agent"}

// unknownJobSecret is compared with the token of a peer message for an
// unknown job, so that it takes the time of a real comparison.
const unknownJobSecret = "doppel: no such job; this secret is never accepted"

// classify maps an error to an HTTP status and kind.
func classify(err error) (int, string) {
	var he *httpError
	switch {
	case errors.As(err, &he):
		return he.code, he.kind
	}
	if code, kind, ok := classifySnapshot(err); ok {
		return code, kind
	}
	switch {
	case errors.Is(err, job.ErrNotFound):
		return http.StatusNotFound, "not_found"
	case errors.Is(err, job.ErrExists):
		return http.StatusConflict, "exists"
	case ha.IsRefused(err):
		return http.StatusConflict, "refused"
	case errors.Is(err, job.ErrVolumeInUse), errors.Is(err, ErrInUse):
		return http.StatusConflict, "in_use"
	case errors.Is(err, ErrRestarting):
		return http.StatusConflict, "restarting"
	case errors.Is(err, job.ErrInvalid), errors.Is(err, job.ErrVolumeMissing), errors.Is(err, job.ErrVolumeMounted), errors.Is(err, job.ErrVolumeSize):
		return http.StatusBadRequest, "invalid"
	case errors.Is(err, ErrNotWired):
		return http.StatusNotImplemented, "not_wired"
	}
	return http.StatusInternalServerError, "internal"
}

func (s *Server) writeError(w http.ResponseWriter, r *http.Request, err error) {
	code, kind := classify(err)
	if code >= 500 {
		s.log.Error("api request failed", "method", r.Method, "path", r.URL.Path, "err", err)
	} else {
		s.log.Info("api request refused", "method", r.Method, "path", r.URL.Path, "code", code, "err", err)
	}
	writeJSON(w, code, errorBody{Error: err.Error(), Kind: kind})
}

func writeJSON(w http.ResponseWriter, code int, v any) error {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	return json.NewEncoder(w).Encode(v)
}

// readJSON reads the request body (at most maxBody bytes, within
// BodyTimeout) into v.
func (s *Server) readJSON(w http.ResponseWriter, r *http.Request, v any) error {
	rc := http.NewResponseController(w)
	if s.BodyTimeout > 0 {
		rc.SetReadDeadline(time.Now().Add(s.BodyTimeout))
	}
	body, err := io.ReadAll(io.LimitReader(r.Body, maxBody+1))
	if err != nil {
		// The deadline stays: the connection closes after the answer
		// instead of waiting for the rest of the body.
		w.Header().Set("Connection", "close")
		return &httpError{http.StatusBadRequest, "invalid", "read request: " + err.Error()}
	}
	if s.BodyTimeout > 0 {
		rc.SetReadDeadline(time.Time{})
	}
	if len(body) > maxBody {
		return &httpError{http.StatusRequestEntityTooLarge, "invalid", "request body over 1 MiB"}
	}
	if len(strings.TrimSpace(string(body))) == 0 {
		return nil
	}
	dec := json.NewDecoder(strings.NewReader(string(body)))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return &httpError{http.StatusBadRequest, "invalid", "decode request: " + err.Error()}
	}
	return nil
}

type statusWriter struct {
	http.ResponseWriter
	code int
}

// Unwrap lets http.ResponseController reach the connection (readJSON's
// body deadline).
func (w *statusWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

func (w *statusWriter) WriteHeader(code int) {
	w.code = code
	w.ResponseWriter.WriteHeader(code)
}
