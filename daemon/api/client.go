package api

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"time"

	"github.com/doppelha/doppel/daemon/ha"
	"github.com/doppelha/doppel/daemon/job"
	"github.com/doppelha/doppel/daemon/tlspin"
)

// Error is an error response from an agent.
type Error struct {
	Status  int
	Kind    string // not_found, refused, invalid, in_use, restarting, unauthorized, not_wired, exists, internal
	Message string
}

func (e *Error) Error() string { return e.Message }

// IsKind reports whether err is an API error of the given kind.
func IsKind(err error, kind string) bool {
	var e *Error
	return errors.As(err, &e) && e.Kind == kind
}

// ErrFingerprintMismatch is returned when an agent presents a certificate
// other than the pinned one.
var ErrFingerprintMismatch = errors.New("agent certificate does not match the pinned fingerprint")

// Client talks to one agent's control API, pinning its certificate.
type Client struct {
	addr  string
	token string
	hc    *http.Client
}

// WithPort returns HOST:PORT for HOST or HOST:PORT (port defaulting to
// DefaultPort).
func WithPort(hostport string) (string, error) {
	if hostport == "" {
		return "", errors.New("empty address")
	}
	if _, _, err := net.SplitHostPort(hostport); err == nil {
		return hostport, nil
	}
	if ip := net.ParseIP(hostport); ip != nil || !containsColon(hostport) {
		return net.JoinHostPort(hostport, strconv.Itoa(DefaultPort)), nil
	}
	return "", fmt.Errorf("address %q: want HOST or HOST:PORT ([v6]:PORT)", hostport)
}

func containsColon(s string) bool {
	for i := range len(s) {
		if s[i] == ':' {
			return true
		}
	}
	return false
}

// NewClient returns a client for the agent at addr (HOST:PORT) presenting
// token and accepting only the certificate with the given fingerprint.
func NewClient(addr, token, fingerprint string) (*Client, error) {
	fp, err := tlspin.Parse(fingerprint)
	if err != nil {
		return nil, err
	}
	tr := &http.Transport{
		TLSClientConfig:     pinnedTLS(fp),
		TLSHandshakeTimeout: 10 * time.Second,
		DialContext:         (&net.Dialer{Timeout: 5 * time.Second}).DialContext,
		// A connection per request: callers make a Client per command
		// or query (the console several a second, for hours), and idle
		// keep-alive connections of dropped Clients stay open at the
		// agent until it refuses more (its limit on control API
		// connections).
		DisableKeepAlives: true,
	}
	return &Client{addr: addr, token: token, hc: &http.Client{Transport: tr, Timeout: 60 * time.Second}}, nil
}

func pinnedTLS(fp string) *tls.Config {
	return &tls.Config{
		MinVersion: tls.VersionTLS13,
		// The certificate is self-signed: trust is the pinned fingerprint,
		// checked below, not a CA chain or a host name.
		InsecureSkipVerify: true,
		VerifyPeerCertificate: func(raw [][]byte, _ [][]*x509.Certificate) error {
			if len(raw) == 0 {
				return ErrFingerprintMismatch
			}
			if got := tlspin.Fingerprint(raw[0]); !tlspin.Equal(got, fp) {
				return fmt.Errorf("%w: pinned %s, agent presented %s (agent reinstalled? run doppel server add again to re-pin)", ErrFingerprintMismatch, fp, got)
			}
			return nil
		},
	}
}

// FetchFingerprint connects to addr and returns the fingerprint of the
// certificate it presents, without trusting it: the operator confirms it.
func FetchFingerprint(ctx context.Context, addr string) (string, error) {
	d := &tls.Dialer{
		NetDialer: &net.Dialer{Timeout: 5 * time.Second},
		Config:    &tls.Config{MinVersion: tls.VersionTLS13, InsecureSkipVerify: true},
	}
	c, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return "", fmt.Errorf("connect to %s: %w", addr, err)
	}
	defer c.Close()
	certs := c.(*tls.Conn).ConnectionState().PeerCertificates
	if len(certs) == 0 {
		return "", fmt.Errorf("%s presented no certificate", addr)
	}
	return tlspin.Fingerprint(certs[0].Raw), nil
}

// Addr is the agent's address.
func (c *Client) Addr() string { return c.addr }

func (c *Client) do(ctx context.Context, method, path string, in, out any) error {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return err
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, "https://"+c.addr+path, body)
	if err != nil {
		return err
	}
	req.Header.Set("Authorization", "Bearer "+c.token)
	if in != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		var ue *url.Error
		if errors.As(err, &ue) {
			err = ue.Err
		}
		return fmt.Errorf("agent %s: %w", c.addr, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	if err != nil {
		return fmt.Errorf("agent %s: read response: %w", c.addr, err)
	}
	if resp.StatusCode >= 300 {
		var eb errorBody
		if json.Unmarshal(data, &eb) != nil || eb.Error == "" {
			eb = errorBody{Error: fmt.Sprintf("%s %s: HTTP %d", method, path, resp.StatusCode), Kind: "internal"}
		}
		return &Error{Status: resp.StatusCode, Kind: eb.Kind, Message: eb.Error}
	}
	if out != nil && len(data) > 0 {
		if err := json.Unmarshal(data, out); err != nil {
			return fmt.Errorf("agent %s: decode response: %w", c.addr, err)
		}
	}
	return nil
}

// Info returns the agent's description.
func (c *Client) Info(ctx context.Context) (Info, error) {
	var i Info
	return i, c.do(ctx, http.MethodGet, "/v1/info", nil, &i)
}

// Jobs returns every job's status on the agent.
func (c *Client) Jobs(ctx context.Context) ([]JobStatus, error) {
	var js []JobStatus
	return js, c.do(ctx, http.MethodGet, "/v1/jobs", nil, &js)
}

// Job returns one job's status.
func (c *Client) Job(ctx context.Context, name string) (JobStatus, error) {
	var st JobStatus
	return st, c.do(ctx, http.MethodGet, "/v1/jobs/"+url.PathEscape(name), nil, &st)
}

// CreateJob creates a job on the agent.
func (c *Client) CreateJob(ctx context.Context, spec job.Spec) (JobStatus, error) {
	var st JobStatus
	return st, c.do(ctx, http.MethodPost, "/v1/jobs", spec, &st)
}

// RestartAgent asks the agent to restart, keeping the volumes served.
func (c *Client) RestartAgent(ctx context.Context) (RestartResult, error) {
	var res RestartResult
	return res, c.do(ctx, http.MethodPost, "/v1/agent/restart", nil, &res)
}

// StopAgent asks the agent to stop.
func (c *Client) StopAgent(ctx context.Context, opts StopOptions) (StopResult, error) {
	var res StopResult
	return res, c.do(ctx, http.MethodPost, "/v1/agent/stop", opts, &res)
}

// Preflight runs the dry run of creating spec on the agent.
func (c *Client) Preflight(ctx context.Context, spec job.Spec) (Preflight, error) {
	var p Preflight
	return p, c.do(ctx, http.MethodPost, "/v1/preflight", spec, &p)
}

// DeleteJob deletes a job on the agent (its replication state too).
func (c *Client) DeleteJob(ctx context.Context, name string) error {
	_, err := c.DeleteJobWith(ctx, name, DeleteOptions{})
	return err
}

// DeleteJobWith deletes a job on the agent with options.
func (c *Client) DeleteJobWith(ctx context.Context, name string, opts DeleteOptions) (DeleteResult, error) {
	q := url.Values{}
	if opts.Force {
		q.Set("force", "true")
	}
	if opts.KeepState {
		q.Set("keep_state", "true")
	}
	if opts.Undo {
		q.Set("undo", "true")
	}
	path := "/v1/jobs/" + url.PathEscape(name)
	if len(q) > 0 {
		path += "?" + q.Encode()
	}
	var res DeleteResult
	return res, c.do(ctx, http.MethodDelete, path, nil, &res)
}

// Command runs an operator command (failover, reverse, switchover, failback, pause,
// resume) on the agent.
func (c *Client) Command(ctx context.Context, name string, cmd ha.EventType, opts CommandOptions) (JobStatus, error) {
	var st JobStatus
	return st, c.do(ctx, http.MethodPost, "/v1/jobs/"+url.PathEscape(name)+"/"+url.PathEscape(string(cmd)), opts, &st)
}

// Verify compares the job's source and target.
func (c *Client) Verify(ctx context.Context, name string) (VerifyResult, error) {
	var v VerifyResult
	return v, c.do(ctx, http.MethodPost, "/v1/jobs/"+url.PathEscape(name)+"/verify", nil, &v)
}

// Events returns a job's history on this agent, oldest first.
func (c *Client) Events(ctx context.Context, name string) ([]Event, error) {
	var evs []Event
	return evs, c.do(ctx, http.MethodGet, "/v1/jobs/"+url.PathEscape(name)+"/events", nil, &evs)
}

// PeerMessage delivers a state-machine message; the client's token must be
// the job's peer secret.
func (c *Client) PeerMessage(ctx context.Context, name string, m ha.Message) error {
	return c.do(ctx, http.MethodPost, "/v1/peer/jobs/"+url.PathEscape(name)+"/message", m, nil)
}
