package api

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

	"github.com/doppelha/doppel/daemon/job"
)

// Identity is an agent's credentials: its self-signed TLS certificate
// (clients pin its fingerprint) and the bearer token clients must present.
// Both are created at first start in the state directory:
//
//	STATE/tls/cert.pem   the certificate (0644)
//	STATE/tls/key.pem    its private key (0600)
//	STATE/token          the API token (0600)
type Identity struct {
	Cert        tls.Certificate
	Fingerprint string // "sha256:" + hex of the certificate's DER
	Token       string
	TokenPath   string
}

// LoadOrCreateIdentity loads the agent's identity from stateDir, creating
// what is missing. created reports which files were made.
func LoadOrCreateIdentity(stateDir, hostname string) (id *Identity, created []string, err error) {
	if err := os.MkdirAll(filepath.Join(stateDir, "tls"), 0o700); err != nil {
		return nil, nil, fmt.Errorf("create state dir: %w", err)
	}
	certPath := filepath.Join(stateDir, "tls", "cert.pem")
	keyPath := filepath.Join(stateDir, "tls", "key.pem")
	tokenPath := filepath.Join(stateDir, "token")

	if _, err := os.Stat(certPath); errors.Is(err, fs.ErrNotExist) {
		certPEM, keyPEM, err := newSelfSigned(hostname)
		if err != nil {
			return nil, nil, err
		}
		if err := job.WriteFileAtomic(keyPath, keyPEM, 0o600); err != nil {
			return nil, nil, fmt.Errorf("write key: %w", err)
		}
		if err := job.WriteFileAtomic(certPath, certPEM, 0o644); err != nil {
			return nil, nil, fmt.Errorf("write certificate: %w", err)
		}
		created = append(created, certPath, keyPath)
	}
	cert, err := tls.LoadX509KeyPair(certPath, keyPath)
	if err != nil {
		return nil, nil, fmt.Errorf("load certificate: %w", err)
	}

	if _, err := os.Stat(tokenPath); errors.Is(err, fs.ErrNotExist) {
		b := make([]byte, 32)
		rand.Read(b)
		if err := job.WriteFileAtomic(tokenPath, []byte(hex.EncodeToString(b)+"\n"), 0o600); err != nil {
			return nil, nil, fmt.Errorf("write token: %w", err)
		}
		created = append(created, tokenPath)
	}
	fi, err := os.Stat(tokenPath)
	if err != nil {
		return nil, nil, fmt.Errorf("token: %w", err)
	}
	if fi.Mode().Perm()&0o077 != 0 {
		return nil, nil, fmt.Errorf("token %s has mode %v: it must not be readable by group or others (chmod 600)", tokenPath, fi.Mode().Perm())
	}
	token, err := ReadToken(tokenPath)
	if err != nil {
		return nil, nil, err
	}
	return &Identity{Cert: cert, Fingerprint: Fingerprint(cert.Certificate[0]), Token: token, TokenPath: tokenPath}, created, nil
}

// ReadToken reads a token file (one line).
func ReadToken(path string) (string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return "", fmt.Errorf("read token: %w", err)
	}
	t := strings.TrimSpace(string(b))
	if len(t) < 16 || strings.ContainsAny(t, " \t\r\n") {
		return "", fmt.Errorf("token file %s does not hold a token (one line, at least 16 characters)", path)
	}
	return t, nil
}

// Fingerprint is the pinned form of a certificate: "sha256:" + hex(SHA-256(DER)).
func Fingerprint(der []byte) string {
	sum := sha256.Sum256(der)
	return "sha256:" + hex.EncodeToString(sum[:])
}

// NormalizeFingerprint accepts "sha256:HEX", bare HEX, or colon-separated
// HEX pairs, in any case.
func NormalizeFingerprint(s string) (string, error) {
	t := strings.ToLower(strings.TrimSpace(s))
	t = strings.TrimPrefix(t, "sha256:")
	t = strings.ReplaceAll(t, ":", "")
	if b, err := hex.DecodeString(t); err != nil || len(b) != sha256.Size {
		return "", fmt.Errorf("fingerprint %q is not a SHA-256 (64 hex digits, optionally prefixed sha256:)", s)
	}
	return "sha256:" + t, nil
}

func fingerprintEqual(a, b string) bool {
	return subtle.ConstantTimeCompare([]byte(a), []byte(b)) == 1
}

func newSelfSigned(hostname string) (certPEM, keyPEM []byte, err error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, fmt.Errorf("generate key: %w", err)
	}
	serial, _ := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: "doppel agent " + hostname},
		DNSNames:              []string{hostname},
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
	kder, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return nil, nil, fmt.Errorf("encode key: %w", err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder}), nil
}
