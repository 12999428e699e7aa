package repl

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"time"

	"github.com/doppelha/doppel/daemon/tlspin"
)

// One replication listener serves every target job of an agent: the
// source's dialer writes a route preamble naming its job right after the
// TLS handshake, and the Mux hands the connection, positioned after the
// preamble, to that job's target — once it checked that the connecting
// peer's certificate is the one that job pins. The TLS layer accepts the
// union of the pinned peers; the per-job check happens here, before any
// byte of the stream reaches a target.
//
// Routing is by job name, not by stream ID: a fresh target has no stream
// yet, and a source starts a new stream at every restart.
//
// Preamble: "DMUX", version 1 (one byte), name length (one byte, 1..255),
// the name.

var muxMagic = [4]byte{'D', 'M', 'U', 'X'}

const muxVersion = 1

// ErrRoute reports a malformed route preamble.
var ErrRoute = errors.New("malformed replication route preamble")

// WriteRoute writes the route preamble for job name on w (the source side,
// right after the TLS handshake).
func WriteRoute(w io.Writer, name string) error {
	if len(name) == 0 || len(name) > 255 {
		return fmt.Errorf("%w: job name of %d bytes", ErrRoute, len(name))
	}
	b := make([]byte, 0, 6+len(name))
	b = append(b, muxMagic[:]...)
	b = append(b, muxVersion, byte(len(name)))
	b = append(b, name...)
	_, err := w.Write(b)
	return err
}

// readRoute reads the rest of a preamble whose magic was read.
func readRoute(r io.Reader) (string, error) {
	var h [2]byte
	if _, err := io.ReadFull(r, h[:]); err != nil {
		return "", fmt.Errorf("%w: %w", ErrRoute, err)
	}
	if h[0] != muxVersion {
		return "", fmt.Errorf("%w: version %d (this agent speaks %d)", ErrRoute, h[0], muxVersion)
	}
	if h[1] == 0 {
		return "", fmt.Errorf("%w: empty job name", ErrRoute)
	}
	name := make([]byte, h[1])
	if _, err := io.ReadFull(r, name); err != nil {
		return "", fmt.Errorf("%w: %w", ErrRoute, err)
	}
	return string(name), nil
}

// ReadRoute reads a whole route preamble (magic included).
func ReadRoute(r io.Reader) (string, error) {
	var m [4]byte
	if _, err := io.ReadFull(r, m[:]); err != nil {
		return "", fmt.Errorf("%w: %w", ErrRoute, err)
	}
	if m != muxMagic {
		return "", fmt.Errorf("%w: bad magic %q", ErrRoute, m[:])
	}
	return readRoute(r)
}

// Mux routes replication connections to the target of their job.
type Mux struct {
	log  *slog.Logger
	cert tls.Certificate

	mu        sync.Mutex
	routes    map[string]*muxRoute
	refusedAt map[string]time.Time // last error log per refusal
}

type muxRoute struct {
	pin    string
	serve  func(context.Context, net.Conn) error
	ctx    context.Context
	cancel context.CancelFunc

	mu     sync.Mutex
	closed bool
	wg     sync.WaitGroup // sessions; Add only while !closed
}

// enter counts a session in, unless the route was removed.
func (r *muxRoute) enter() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return false
	}
	r.wg.Add(1)
	return true
}

// NewMux returns a mux presenting cert to every source.
func NewMux(cert tls.Certificate, log *slog.Logger) *Mux {
	return &Mux{log: log, cert: cert, routes: map[string]*muxRoute{}}
}

// Handle routes job name's connections from the peer pinned by peerPin to
// serve. The returned remove stops routing to it, cancels the context of
// its sessions and waits for them to end.
func (m *Mux) Handle(name, peerPin string, serve func(context.Context, net.Conn) error) (remove func(), err error) {
	if len(name) == 0 || len(name) > 255 {
		return nil, fmt.Errorf("job name of %d bytes cannot be routed", len(name))
	}
	pin, err := tlspin.Parse(peerPin)
	if err != nil {
		return nil, err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if _, ok := m.routes[name]; ok {
		return nil, fmt.Errorf("job %s already has a replication target on this agent", name)
	}
	ctx, cancel := context.WithCancel(context.Background())
	r := &muxRoute{pin: pin, serve: serve, ctx: ctx, cancel: cancel}
	m.routes[name] = r
	var once sync.Once
	return func() {
		once.Do(func() {
			m.mu.Lock()
			if m.routes[name] == r {
				delete(m.routes, name)
			}
			m.mu.Unlock()
			r.mu.Lock()
			r.closed = true
			r.mu.Unlock()
			cancel()
			r.wg.Wait()
		})
	}, nil
}

// Routes is the number of jobs routed.
func (m *Mux) Routes() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return len(m.routes)
}

// TLSConfig is the listener's TLS 1.3 configuration: it presents the
// agent's certificate and accepts a client certificate pinned by any
// routed job (the mux then checks it is that job's).
func (m *Mux) TLSConfig() *tls.Config {
	return &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{m.cert},
		ClientAuth:   tls.RequireAnyClientCert,
		VerifyPeerCertificate: func(raw [][]byte, _ [][]*x509.Certificate) error {
			if len(raw) == 0 {
				return fmt.Errorf("%w: peer sent no certificate", tlspin.ErrNotPinned)
			}
			fp := tlspin.Fingerprint(raw[0])
			m.mu.Lock()
			defer m.mu.Unlock()
			for _, r := range m.routes {
				if r.pin == fp {
					return nil
				}
			}
			return fmt.Errorf("%w: %s is pinned by no job on this agent", tlspin.ErrNotPinned, fp)
		},
	}
}

// Serve accepts TLS connections on l (a plain TCP listener) until ctx is
// done and routes each; it returns once every session ended.
func (m *Mux) Serve(ctx context.Context, l net.Listener) error {
	return ServeConns(ctx, tls.NewListener(l, m.TLSConfig()), m.log, m.ServeConn)
}

// ServeConn routes one connection (a *tls.Conn, handshake done or not).
// A connection for an unknown job, or from a peer that job does not pin,
// is closed with a log line: nothing reaches a target.
func (m *Mux) ServeConn(ctx context.Context, c net.Conn) error {
	tc, ok := c.(*tls.Conn)
	if !ok {
		c.Close()
		return errors.New("replication mux: not a TLS connection")
	}
	remote := c.RemoteAddr().String()
	c.SetDeadline(time.Now().Add(30 * time.Second))
	// Until routed, the mux's end ends the wait for the peer.
	unblock := context.AfterFunc(ctx, func() { c.SetDeadline(time.Now()) })
	if err := tc.HandshakeContext(ctx); err != nil {
		c.Close()
		return fmt.Errorf("TLS handshake: %w", err)
	}
	cs := tc.ConnectionState()
	if len(cs.PeerCertificates) == 0 {
		c.Close()
		return errors.New("replication mux: peer sent no certificate")
	}
	fp := tlspin.Fingerprint(cs.PeerCertificates[0].Raw)
	var magic [4]byte
	if _, err := io.ReadFull(c, magic[:]); err != nil {
		c.Close()
		return fmt.Errorf("replication mux: read route: %w", err)
	}
	var conn net.Conn = c
	var name string
	var r *muxRoute
	if magic == muxMagic {
		var err error
		if name, err = readRoute(c); err != nil {
			m.log.Error("replication connection refused", "peer", remote, "fingerprint", fp, "err", err)
			c.Close()
			return err
		}
		m.mu.Lock()
		r = m.routes[name]
		m.mu.Unlock()
		if r == nil {
			return m.refuse(c, remote, fp, name, "no target job of that name on this agent")
		}
		if r.pin != fp {
			return m.refuse(c, remote, fp, name, "the peer's certificate is not the one this job pins for its source")
		}
	} else {
		// A source that writes no preamble (doppel repl source): the
		// job whose pin matches, when exactly one does.
		conn = &prefixConn{Conn: tc, r: io.MultiReader(bytes.NewReader(magic[:]), c)}
		n := 0
		m.mu.Lock()
		for k, v := range m.routes {
			if v.pin == fp {
				name, r = k, v
				n++
			}
		}
		m.mu.Unlock()
		if n != 1 {
			return m.refuse(c, remote, fp, "", fmt.Sprintf("no route preamble and %d jobs pin this peer", n))
		}
	}
	if !unblock() {
		c.Close()
		return ctx.Err()
	}
	if !r.enter() { // removed meanwhile
		return m.refuse(c, remote, fp, name, "the job's target stopped")
	}
	defer r.wg.Done()
	sctx, cancel := context.WithCancel(r.ctx)
	defer cancel()
	stop := context.AfterFunc(ctx, cancel)
	defer stop()
	c.SetDeadline(time.Time{})
	return r.serve(sctx, conn)
}

func (m *Mux) refuse(c net.Conn, remote, fp, job, why string) error {
	// A refused source retries every few hundred milliseconds: the
	// first refusal of a (peer, job, reason) in a minute is an error, the
	// repeats are debug lines.
	key := fp + "\x00" + job + "\x00" + why
	now := time.Now()
	m.mu.Lock()
	if m.refusedAt == nil {
		m.refusedAt = map[string]time.Time{}
	}
	level := slog.LevelDebug
	if last, ok := m.refusedAt[key]; !ok || now.Sub(last) > time.Minute {
		level = slog.LevelError
		m.refusedAt[key] = now
		if len(m.refusedAt) > 1024 {
			clear(m.refusedAt)
		}
	}
	m.mu.Unlock()
	m.log.Log(context.Background(), level, "replication connection refused: nothing applied", "peer", remote, "fingerprint", fp, "job", job, "reason", why)
	c.Close()
	if job != "" {
		return fmt.Errorf("job %s: %s", job, why)
	}
	return errors.New(why)
}

// prefixConn replays bytes already read before the connection's own.
type prefixConn struct {
	*tls.Conn
	r io.Reader
}

func (p *prefixConn) Read(b []byte) (int, error) { return p.r.Read(b) }

// Received reports what t took from its sources since it was opened: wire
// bytes read and payload bytes applied (writes, mirror and resync data).
// (Kept here, by the mux, as the agent's accessor to the target's counters.)
func (t *Applier) Received() (wireBytes, payload int64) {
	return t.tst.recvBytes.Load(), t.tst.appliedBytes.Load()
}
