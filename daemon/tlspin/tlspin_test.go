package tlspin

import (
	"context"
	"crypto/tls"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestParse(t *testing.T) {
	want := "sha256:" + strings.Repeat("ab", 32)
	for _, in := range []string{
		want,
		strings.Repeat("AB", 32),
		"SHA256:" + strings.Repeat("ab", 32),
		strings.TrimSuffix(strings.Repeat("ab:", 32), ":"),
		"  " + want + "\n",
	} {
		got, err := Parse(in)
		if err != nil || got != want {
			t.Errorf("Parse(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	for _, in := range []string{"", "sha256:", "sha256:abc", strings.Repeat("zz", 32), strings.Repeat("ab", 33)} {
		if got, err := Parse(in); err == nil {
			t.Errorf("Parse(%q) = %q, want an error", in, got)
		}
	}
}

func TestLoadOrCreate(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "tls")
	cp, kp := filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	c1, created, err := LoadOrCreate(cp, kp, "doppel test", "host1")
	if err != nil || !created {
		t.Fatalf("first LoadOrCreate: created=%v err=%v", created, err)
	}
	fi, err := os.Stat(kp)
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("key mode %v (%v), want 0600", fi.Mode().Perm(), err)
	}
	c2, created, err := LoadOrCreate(cp, kp, "doppel test")
	if err != nil || created {
		t.Fatalf("second LoadOrCreate: created=%v err=%v", created, err)
	}
	if Fingerprint(c1.Certificate[0]) != Fingerprint(c2.Certificate[0]) {
		t.Fatal("the certificate changed between loads")
	}
}

// handshake runs a TLS handshake between a server and a client config over
// a socket pair and returns the client's and the server's errors.
func handshake(t *testing.T, server, client *tls.Config) (cerr, serr error) {
	t.Helper()
	// Loopback TCP, not net.Pipe: both sides may write at once (an alert
	// against the peer's flight), which an unbuffered pipe deadlocks on.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	b, err := net.Dial("tcp", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	a, err := l.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	done := make(chan error, 1)
	go func() {
		ts := tls.Server(a, server)
		err := ts.HandshakeContext(context.Background())
		a.Close()
		done <- err
	}()
	tc := tls.Client(b, client)
	cerr = tc.HandshakeContext(context.Background())
	if cerr == nil {
		// TLS 1.3: the client may finish before the server has checked
		// its certificate; a read surfaces the server's verdict.
		tc.Read(make([]byte, 1))
	}
	b.Close()
	serr = <-done
	return cerr, serr
}

func TestPinnedHandshake(t *testing.T) {
	dir := t.TempDir()
	load := func(name string) (tls.Certificate, string) {
		c, _, err := LoadOrCreate(filepath.Join(dir, name+".crt"), filepath.Join(dir, name+".key"), name)
		if err != nil {
			t.Fatal(err)
		}
		return c, Fingerprint(c.Certificate[0])
	}
	srv, srvFP := load("server")
	cli, cliFP := load("client")
	other, otherFP := load("other")

	sc, err := ServerConfig(srv, cliFP)
	if err != nil {
		t.Fatal(err)
	}
	cc, err := ClientConfig(&cli, srvFP)
	if err != nil {
		t.Fatal(err)
	}
	if cerr, serr := handshake(t, sc, cc); cerr != nil || serr != nil {
		t.Fatalf("pinned pair: client %v, server %v", cerr, serr)
	}
	// The server pins the client: another client certificate is refused.
	oc, _ := ClientConfig(&other, srvFP)
	if _, serr := handshake(t, sc, oc); !errors.Is(serr, ErrNotPinned) {
		t.Fatalf("server accepted an unpinned client: %v", serr)
	}
	// The client pins the server: a server with another certificate is refused.
	osc, _ := ServerConfig(other, cliFP)
	if cerr, _ := handshake(t, osc, cc); !errors.Is(cerr, ErrNotPinned) {
		t.Fatalf("client accepted an unpinned server: %v", cerr)
	}
	_ = otherFP
}
