package repl

import (
	"crypto/tls"
	"os"
	"path/filepath"

	"github.com/doppelha/doppel/daemon/tlspin"
)

// Certificate file names inside a certificate directory (doppel repl
// --cert-dir).
const (
	CertFile = "repl.crt"
	KeyFile  = "repl.key"
)

// LoadOrCreateCert loads the certificate in dir, creating a self-signed
// certificate (and dir, mode 0700) on first use. It returns the
// certificate and its fingerprint. Pinning itself is package tlspin's.
func LoadOrCreateCert(dir string) (tls.Certificate, string, error) {
	host, _ := os.Hostname()
	cert, _, err := tlspin.LoadOrCreate(filepath.Join(dir, CertFile), filepath.Join(dir, KeyFile), "doppel replication "+host)
	if err != nil {
		return tls.Certificate{}, "", err
	}
	return cert, tlspin.Fingerprint(cert.Certificate[0]), nil
}
