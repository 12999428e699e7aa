// Package tlspin is doppel's one home for certificate pinning. Agents
// present self-signed certificates; a peer is trusted by the SHA-256
// fingerprint of its certificate, pinned when the operator adds the server
// (control API) or when a job is created (replication stream). The package
// makes those certificates, computes and parses fingerprints, compares them
// in constant time, and builds TLS 1.3 configurations that accept exactly
// the pinned peer.
package tlspin

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/doppelha/doppel/daemon/statefile"
)

// ErrNotPinned reports a peer certificate whose fingerprint is not pinned.
var ErrNotPinned = errors.New("peer certificate is not pinned")

// Fingerprint is the pinned form of a certificate: "sha256:" followed by
// the hex SHA-256 of its DER encoding.
func Fingerprint(der []byte) string {
	sum := sha256.Sum256(der)
	return "sha256:" + hex.EncodeToString(sum[:])
}

// Parse normalises a fingerprint given as "sha256:HEX", bare HEX, or
// colon-separated HEX pairs, in any case.
func Parse(s string) (string, error) {
	t := strings.ToLower(strings.TrimSpace(s))
	t = strings.TrimPrefix(t, "sha256:")
	t = strings.ReplaceAll(t, ":", "")
	if b, err := hex.DecodeString(t); err != nil || len(b) != sha256.Size {
		return "", fmt.Errorf("fingerprint %q is not a SHA-256 (64 hex digits, optionally prefixed sha256:)", s)
	}
	return "sha256:" + t, nil
}

// Equal compares two secrets or fingerprints in constant time.
func Equal(a, b string) bool {
	return subtle.ConstantTimeCompare([]byte(a), []byte(b)) == 1
}

// Verifier returns a tls.Config.VerifyPeerCertificate function that calls
// accept with the fingerprint of the peer's leaf certificate.
func Verifier(accept func(fingerprint string) error) func([][]byte, [][]*x509.Certificate) error {
	return func(raw [][]byte, _ [][]*x509.Certificate) error {
		if len(raw) == 0 {
			return fmt.Errorf("%w: peer sent no certificate", ErrNotPinned)
		}
		return accept(Fingerprint(raw[0]))
	}
}

// Pinned returns a verifier accepting only the certificate with
// fingerprint pin (already normalised by Parse).
func Pinned(pin string) func([][]byte, [][]*x509.Certificate) error {
	return Verifier(func(got string) error {
		if !Equal(got, pin) {
			return fmt.Errorf("%w: got %s, want %s", ErrNotPinned, got, pin)
		}
		return nil
	})
}

// ServerConfig is a TLS 1.3 server configuration presenting cert and
// accepting only a client certificate with fingerprint peerPin.
func ServerConfig(cert tls.Certificate, peerPin string) (*tls.Config, error) {
	pin, err := Parse(peerPin)
	if err != nil {
		return nil, err
	}
	return &tls.Config{
		MinVersion:            tls.VersionTLS13,
		Certificates:          []tls.Certificate{cert},
		ClientAuth:            tls.RequireAnyClientCert,
		VerifyPeerCertificate: Pinned(pin),
	}, nil
}

// ClientConfig is a TLS 1.3 client configuration accepting only a server
// certificate with fingerprint peerPin and presenting cert (when it has
// one). The chain is not checked against CAs: the pin is the trust.
func ClientConfig(cert *tls.Certificate, peerPin string) (*tls.Config, error) {
	pin, err := Parse(peerPin)
	if err != nil {
		return nil, err
	}
	c := &tls.Config{
		MinVersion:            tls.VersionTLS13,
		InsecureSkipVerify:    true, // replaced by the pin check
		VerifyPeerCertificate: Pinned(pin),
	}
	if cert != nil {
		c.Certificates = []tls.Certificate{*cert}
	}
	return c, nil
}

// SelfSigned makes a self-signed ECDSA P-256 certificate, valid for 20
// years, for server and client authentication. It returns PEM blocks.
func SelfSigned(commonName string, dnsNames ...string) (certPEM, keyPEM []byte, err error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, fmt.Errorf("generate key: %w", err)
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return nil, nil, fmt.Errorf("generate serial: %w", err)
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: commonName},
		DNSNames:              dnsNames,
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.AddDate(20, 0, 0),
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		BasicConstraintsValid: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, nil, fmt.Errorf("create certificate: %w", err)
	}
	kder, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, nil, fmt.Errorf("encode key: %w", err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kder}), nil
}

// LoadOrCreate loads the certificate and key at certPath and keyPath,
// first creating a self-signed pair (and their directory, mode 0700) when
// the certificate is missing. The key is written mode 0600, the
// certificate 0644, each atomically. created reports whether it made them.
func LoadOrCreate(certPath, keyPath, commonName string, dnsNames ...string) (cert tls.Certificate, created bool, err error) {
	if _, err := os.Stat(certPath); errors.Is(err, fs.ErrNotExist) {
		if err := os.MkdirAll(filepath.Dir(certPath), 0o700); err != nil {
			return tls.Certificate{}, false, fmt.Errorf("create certificate dir: %w", err)
		}
		certPEM, keyPEM, err := SelfSigned(commonName, dnsNames...)
		if err != nil {
			return tls.Certificate{}, false, err
		}
		if err := statefile.Write(keyPath, keyPEM, 0o600); err != nil {
			return tls.Certificate{}, false, fmt.Errorf("write key: %w", err)
		}
		if err := statefile.Write(certPath, certPEM, 0o644); err != nil {
			return tls.Certificate{}, false, fmt.Errorf("write certificate: %w", err)
		}
		created = true
	}
	cert, err = tls.LoadX509KeyPair(certPath, keyPath)
	if err != nil {
		return tls.Certificate{}, false, fmt.Errorf("load certificate: %w", err)
	}
	return cert, created, nil
}
