package api

import (
	"crypto/rand"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"github.com/doppelha/doppel/daemon/statefile"
	"github.com/doppelha/doppel/daemon/tlspin"
)

// Credentials are an agent's credentials: its self-signed TLS certificate
// (clients pin its fingerprint) and the bearer token clients must present.
// Both are created at first start in the state directory:
//
//	STATE/tls/cert.pem   the certificate (0644)
//	STATE/tls/key.pem    its private key (0600)
//	STATE/token          the API token (0600)
type Credentials struct {
	Cert        tls.Certificate
	Fingerprint string // "sha256:" + hex of the certificate's DER
	Token       string
	TokenPath   string
}

// LoadOrCreateCredentials loads the agent's credentials from stateDir, creating
// what is missing. created reports which files were made.
func LoadOrCreateCredentials(stateDir, hostname string) (id *Credentials, created []string, err error) {
	if err := os.MkdirAll(filepath.Join(stateDir, "tls"), 0o700); err != nil {
		return nil, nil, fmt.Errorf("create state dir: %w", err)
	}
	certPath := filepath.Join(stateDir, "tls", "cert.pem")
	keyPath := filepath.Join(stateDir, "tls", "key.pem")
	tokenPath := filepath.Join(stateDir, "token")

	cert, made, err := tlspin.LoadOrCreate(certPath, keyPath, "doppel agent "+hostname, hostname)
	if err != nil {
		return nil, nil, err
	}
	if made {
		created = append(created, certPath, keyPath)
	}

	if _, err := os.Stat(tokenPath); errors.Is(err, fs.ErrNotExist) {
		b := make([]byte, 32)
		rand.Read(b)
		if err := statefile.Write(tokenPath, []byte(hex.EncodeToString(b)+"\n"), 0o600); err != nil {
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
	return &Credentials{Cert: cert, Fingerprint: tlspin.Fingerprint(cert.Certificate[0]), Token: token, TokenPath: tokenPath}, created, nil
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
