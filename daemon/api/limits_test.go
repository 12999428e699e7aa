package api

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/doppelha/doppel/daemon/ha"
	"github.com/doppelha/doppel/daemon/job"
	"github.com/prometheus/client_golang/prometheus"
)

// oneJob is an Agent with one job, "web", whose peer secret is "s3cret".
type oneJob struct{}

func (oneJob) Info() Info                                      { return Info{} }
func (oneJob) Events(context.Context, string) ([]Event, error) { return nil, nil }
func (oneJob) Jobs(context.Context) ([]JobStatus, error) {
	return []JobStatus{}, nil
}
func (b oneJob) Job(_ context.Context, name string) (JobStatus, error) {
	if name != "web" {
		return JobStatus{}, job.ErrNotFound
	}
	return JobStatus{}, nil
}
func (oneJob) CreateJob(context.Context, job.Spec) (JobStatus, error) {
	return JobStatus{}, ErrNotWired
}
func (oneJob) Preflight(context.Context, job.Spec) Preflight { return Preflight{} }
func (oneJob) DeleteJob(context.Context, string, DeleteOptions) (DeleteResult, error) {
	return DeleteResult{}, ErrNotWired
}
func (oneJob) StopAgent(context.Context, StopOptions) (StopResult, error) {
	return StopResult{}, ErrNotWired
}
func (oneJob) RestartAgent(context.Context) (RestartResult, error) {
	return RestartResult{}, ErrNotWired
}
func (oneJob) Command(context.Context, string, ha.EventType, CommandOptions) (JobStatus, error) {
	return JobStatus{}, ErrNotWired
}
func (oneJob) Verify(context.Context, string) (VerifyResult, error) {
	return VerifyResult{}, ErrNotWired
}
func (oneJob) PeerSecret(name string) (string, error) {
	if name != "web" {
		return "", job.ErrNotFound
	}
	return "s3cret", nil
}
func (oneJob) PeerMessage(context.Context, string, ha.Message) error { return nil }

// testServer serves the API for oneJob on loopback; configure changes its
// limits before it serves.
func testServer(t *testing.T, configure func(*Server)) (s *Server, addr string, id *Credentials) {
	t.Helper()
	id, _, err := LoadOrCreateCredentials(t.TempDir(), "vm1")
	if err != nil {
		t.Fatal(err)
	}
	s, err = NewServer(slog.New(slog.DiscardHandler), id, oneJob{}, prometheus.NewRegistry())
	if err != nil {
		t.Fatal(err)
	}
	if configure != nil {
		configure(s)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); s.Serve(ctx, l) }()
	t.Cleanup(func() { cancel(); <-done })
	return s, l.Addr().String(), id
}

// rawGet does one request on a fresh TLS connection and returns status and body.
func rawGet(t *testing.T, addr, method, path, token string) (int, string) {
	t.Helper()
	tr := &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}, DisableKeepAlives: true}
	defer tr.CloseIdleConnections()
	req, _ := http.NewRequest(method, "https://"+addr+path, strings.NewReader("{}"))
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := (&http.Client{Transport: tr, Timeout: 5 * time.Second}).Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// TestNoEnumeration: an unknown job and a known job with a bad secret
// (peer route) or a bad token (operator route) get the same status and
// body.
func TestNoEnumeration(t *testing.T) {
	_, addr, id := testServer(t, nil)
	for _, tc := range []struct {
		name           string
		known, unknown [3]string // method, path, token
	}{
		{name: "peer message", known: [3]string{"POST", "/v1/peer/jobs/web/message", "wrong"}, unknown: [3]string{"POST", "/v1/peer/jobs/nope/message", "wrong"}},
		{name: "peer message, the known job's secret", known: [3]string{"POST", "/v1/peer/jobs/web/message", "wrong"}, unknown: [3]string{"POST", "/v1/peer/jobs/nope/message", "s3cret"}},
		{name: "job status", known: [3]string{"GET", "/v1/jobs/web", "wrong"}, unknown: [3]string{"GET", "/v1/jobs/nope", "wrong"}},
		{name: "job command", known: [3]string{"POST", "/v1/jobs/web/failover", ""}, unknown: [3]string{"POST", "/v1/jobs/nope/failover", ""}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			kc, kb := rawGet(t, addr, tc.known[0], tc.known[1], tc.known[2])
			uc, ub := rawGet(t, addr, tc.unknown[0], tc.unknown[1], tc.unknown[2])
			if kc != http.StatusUnauthorized || kc != uc || kb != ub {
				t.Fatalf("known job: %d %q\nunknown job: %d %q\nwant the same 401 answer", kc, kb, uc, ub)
			}
		})
	}
	// The right secret still works, and the operator still learns that a
	// job does not exist once authenticated.
	if c, b := rawGet(t, addr, "POST", "/v1/peer/jobs/web/message", "s3cret"); c != http.StatusNoContent {
		t.Fatalf("peer message with the right secret: %d %s", c, b)
	}
	if c, b := rawGet(t, addr, "GET", "/v1/jobs/nope", id.Token); c != http.StatusNotFound {
		t.Fatalf("unknown job with the API token: %d %s", c, b)
	}
}

// TestMetricsNeedToken: /metrics on the control port answers only with
// the API token; ServeMetrics serves them without one on its own listener.
func TestMetricsNeedToken(t *testing.T) {
	s, addr, id := testServer(t, nil)
	if c, _ := rawGet(t, addr, "GET", "/metrics", ""); c != http.StatusUnauthorized {
		t.Fatalf("/metrics without a token: %d, want 401", c)
	}
	if c, _ := rawGet(t, addr, "GET", "/metrics", "wrong"); c != http.StatusUnauthorized {
		t.Fatalf("/metrics with a wrong token: %d, want 401", c)
	}
	c, b := rawGet(t, addr, "GET", "/metrics", id.Token)
	if c != http.StatusOK || !strings.Contains(b, "doppel_api_requests_total") {
		t.Fatalf("/metrics with the token: %d %.200q", c, b)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.ServeMetrics(ctx, l) }()
	resp, err := http.Get("http://" + l.Addr().String() + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	mb, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || !strings.Contains(string(mb), "doppel_api_requests_total") {
		t.Fatalf("metrics listener: %d %.200q", resp.StatusCode, mb)
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

// tlsConn opens a TLS connection with its handshake done and no request.
func tlsConn(t *testing.T, addr string) *tls.Conn {
	t.Helper()
	c, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", addr, &tls.Config{InsecureSkipVerify: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// TestConnectionCap: beyond MaxConns open connections, a new one gets a
// clear 503 (kind busy) at once instead of waiting; a freed slot serves
// again.
func TestConnectionCap(t *testing.T) {
	_, addr, id := testServer(t, func(s *Server) { s.MaxConns = 2 })
	a, b := tlsConn(t, addr), tlsConn(t, addr)
	_ = b
	c, err := NewClient(addr, id.Token, id.Fingerprint)
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	_, err = c.Info(context.Background())
	var ae *Error
	if !errors.As(err, &ae) || ae.Status != http.StatusServiceUnavailable || ae.Kind != "busy" || !strings.Contains(ae.Message, "2 control API connections") {
		t.Fatalf("request beyond the cap: %v, want a 503 busy error naming the cap", err)
	}
	if d := time.Since(start); d > 3*time.Second {
		t.Fatalf("the refusal took %v", d)
	}
	a.Close()
	deadline := time.Now().Add(5 * time.Second)
	for {
		if _, err = c.Info(context.Background()); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("after a slot was freed: %v", err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestTimeouts: a connection that sends no request header, one that
// stalls in its body, and an idle keep-alive connection are all closed by
// the server.
func TestTimeouts(t *testing.T) {
	_, addr, id := testServer(t, func(s *Server) {
		s.ReadHeaderTimeout, s.BodyTimeout, s.IdleTimeout = 300*time.Millisecond, 300*time.Millisecond, 300*time.Millisecond
	})
	closedWithin := func(c net.Conn, d time.Duration) error {
		c.SetReadDeadline(time.Now().Add(d))
		buf := make([]byte, 4096)
		for {
			if _, err := c.Read(buf); err != nil {
				var ne net.Error
				if errors.As(err, &ne) && ne.Timeout() {
					return errors.New("still open")
				}
				return nil // EOF or reset: closed by the server
			}
		}
	}
	t.Run("no header", func(t *testing.T) {
		c := tlsConn(t, addr)
		io.WriteString(c, "GET /v1/info HTTP/1.1\r\nHost: x\r\n") // never ends
		if err := closedWithin(c, 5*time.Second); err != nil {
			t.Fatal("a connection stalled in its header: ", err)
		}
	})
	t.Run("stalled body", func(t *testing.T) {
		c := tlsConn(t, addr)
		io.WriteString(c, "POST /v1/jobs/web/pause HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "+id.Token+"\r\nContent-Length: 100\r\n\r\n{")
		if err := closedWithin(c, 5*time.Second); err != nil {
			t.Fatal("a connection stalled in its body: ", err)
		}
	})
	t.Run("idle keep-alive", func(t *testing.T) {
		c := tlsConn(t, addr)
		io.WriteString(c, "GET /v1/info HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "+id.Token+"\r\n\r\n")
		var got bytes.Buffer
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		buf := make([]byte, 4096)
		for !strings.Contains(got.String(), "\r\n\r\n") {
			n, err := c.Read(buf)
			if err != nil {
				t.Fatalf("response: %v", err)
			}
			got.Write(buf[:n])
		}
		if !strings.HasPrefix(got.String(), "HTTP/1.1 200") {
			t.Fatalf("response %q", got.String())
		}
		if err := closedWithin(c, 5*time.Second); err != nil {
			t.Fatal("an idle keep-alive connection: ", err)
		}
	})
}
