package agent

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"log/slog"
	"os"

	"github.com/doppelha/doppel/daemon/arbiter"
)

// DialArbiter connects to the arbiter the configuration names (nil, nil
// when it names none).
func DialArbiter(log *slog.Logger, c ArbiterConfig) (*arbiter.Client, error) {
	if len(c.Endpoints) == 0 {
		if c.CA != "" || c.Cert != "" || c.Key != "" {
			return nil, fmt.Errorf("arbiter: TLS files given but no endpoints")
		}
		return nil, nil
	}
	var tc *tls.Config
	if c.CA != "" || c.Cert != "" || c.Key != "" {
		tc = &tls.Config{MinVersion: tls.VersionTLS12}
		if c.CA != "" {
			pem, err := os.ReadFile(c.CA)
			if err != nil {
				return nil, fmt.Errorf("arbiter: read CA: %w", err)
			}
			pool := x509.NewCertPool()
			if !pool.AppendCertsFromPEM(pem) {
				return nil, fmt.Errorf("arbiter: %s holds no PEM certificate", c.CA)
			}
			tc.RootCAs = pool
		}
		if (c.Cert == "") != (c.Key == "") {
			return nil, fmt.Errorf("arbiter: give both cert and key (or neither)")
		}
		if c.Cert != "" {
			kp, err := tls.LoadX509KeyPair(c.Cert, c.Key)
			if err != nil {
				return nil, fmt.Errorf("arbiter: load client certificate: %w", err)
			}
			tc.Certificates = []tls.Certificate{kp}
		}
	}
	return arbiter.Dial(arbiter.Config{Endpoints: c.Endpoints, TLS: tc, Prefix: c.Prefix, Log: log})
}
