package kernel

import (
	"io"

	"github.com/doppelha/doppel/blockdev/nbdproto"
)

// The kernel speaks only the transmission phase, so — like nbd-client — the
// handshake is done in userspace, on the socket the kernel will take over:
// fixed newstyle, NBD_OPT_GO for one export (package nbdproto).

// ErrNegotiation wraps a server's refusal or a malformed handshake.
var ErrNegotiation = nbdproto.ErrNegotiation

// negotiate runs the client side of the handshake on rw and leaves it in the
// transmission phase of export name.
func negotiate(rw io.ReadWriter, name string) (nbdproto.Export, error) {
	if _, err := nbdproto.Handshake(rw); err != nil {
		return nbdproto.Export{}, err
	}
	x, err := nbdproto.Info(rw, name, true)
	if err != nil {
		return nbdproto.Export{}, err
	}
	return *x, nil
}
