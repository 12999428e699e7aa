package repl

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// Certificate file names inside a certificate directory.
const (
	CertFile = "repl.crt"
	KeyFile  = "repl.key"
)

// ErrNotPinned reports a peer certificate whose fingerprint is not the
// pinned one.
var ErrNotPinned = errors.New("peer certificate is not pinned")

// Fingerprint returns "sha256:" + the hex SHA-256 of a DER certificate.
func Fingerprint(der []byte) string {
	h := sha256.Sum256(der)
	return "sha256:" + hex.EncodeToString(h[:])
}

// ParseFingerprint normalises a fingerprint given as hex (with or without
// colons, with or without the "sha256:" prefix).
func ParseFingerprint(s string) (string, error) {
	s = strings.ToLower(strings.TrimSpace(s))
	s = strings.TrimPrefix(s, "sha256:")
	s = strings.ReplaceAll(s, ":", "")
	b, err := hex.DecodeString(s)
	if err != nil || len(b) != sha256.Size {
		return "", fmt.Errorf("fingerprint %q: want 64 hex digits (SHA-256)", s)
	}
	return "sha256:" + s, nil
}

// LoadOrCreateCert loads the certificate in dir, creating a self-signed
// ECDSA P-256 certificate (and dir, mode 0700) on first use. It returns the
// certificate and its fingerprint.
func LoadOrCreateCert(dir string) (tls.Certificate, string, error) {
	certPath, keyPath := filepath.Join(dir, CertFile), filepath.Join(dir, KeyFile)
	if _, err := os.Stat(certPath); errors.Is(err, os.ErrNotExist) {
		if err := createCert(dir, certPath, keyPath); err != nil {
			return tls.Certificate{}, "", err
		}
	}
	cert, err := tls.LoadX509KeyPair(certPath, keyPath)
	if err != nil {
		return tls.Certificate{}, "", fmt.Errorf("load certificate: %w", err)
	}
	return cert, Fingerprint(cert.Certificate[0]), nil
}

func createCert(dir, certPath, keyPath string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("create certificate dir: %w", err)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return err
	}
	host, _ := os.Hostname()
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: "doppel replication " + host},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().AddDate(20, 0, 0),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return fmt.Errorf("create certificate: %w", err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return err
	}
	if err := writeFileAtomic(keyPath, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER})); err != nil {
		return err
	}
	if err := os.Chmod(keyPath, 0o600); err != nil {
		return err
	}
	return writeFileAtomic(certPath, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}))
}

// verifyPin returns a VerifyPeerCertificate function accepting only the
// certificate with fingerprint pin.
func verifyPin(pin string) func([][]byte, [][]*x509.Certificate) error {
	return func(raw [][]byte, _ [][]*x509.Certificate) error {
		if len(raw) == 0 {
			return fmt.Errorf("%w: peer sent no certificate", ErrNotPinned)
		}
		if got := Fingerprint(raw[0]); got != pin {
			return fmt.Errorf("%w: got %s, want %s", ErrNotPinned, got, pin)
		}
		return nil
	}
}

// ServerTLS is the target's TLS 1.3 configuration: it presents cert and
// accepts only a client certificate with fingerprint peerPin.
func ServerTLS(cert tls.Certificate, peerPin string) (*tls.Config, error) {
	pin, err := ParseFingerprint(peerPin)
	if err != nil {
		return nil, err
	}
	return &tls.Config{
		MinVersion:            tls.VersionTLS13,
		Certificates:          []tls.Certificate{cert},
		ClientAuth:            tls.RequireAnyClientCert,
		VerifyPeerCertificate: verifyPin(pin),
	}, nil
}

// ClientTLS is the source's TLS 1.3 configuration: it presents cert and
// accepts only a server certificate with fingerprint peerPin (the chain is
// not checked against CAs: the pin is the trust).
func ClientTLS(cert tls.Certificate, peerPin string) (*tls.Config, error) {
	pin, err := ParseFingerprint(peerPin)
	if err != nil {
		return nil, err
	}
	return &tls.Config{
		MinVersion:            tls.VersionTLS13,
		Certificates:          []tls.Certificate{cert},
		InsecureSkipVerify:    true, // replaced by the pin check below
		VerifyPeerCertificate: verifyPin(pin),
	}, nil
}
