// Package kernel attaches doppel's NBD server to the Linux kernel as
// /dev/nbdN, through the generic-netlink nbd family: several connections,
// each a socket pair whose other end the kernel holds, announced with
// SEND_FLUSH, SEND_FUA, SEND_TRIM, SEND_WRITE_ZEROES and CAN_MULTI_CONN, and
// a dead-connection timeout.
//
// The kernel does not negotiate: from NBD_CMD_CONNECT on, each socket is in
// the transmission phase, so the caller supplies a [ServeFunc] that runs the
// transmission loop of one export on one connection.
//
// The process that serves a device must not do I/O on it (writeback would
// deadlock); [SetIOFlusher] marks the process as an I/O flusher so that the
// kernel does not throttle or recurse into it under memory pressure.
package kernel

import (
	"context"
	"errors"
	"net"
)

// ServeFunc serves the NBD transmission phase on one connection until the
// peer disconnects (NBD_CMD_DISC or EOF) or ctx is cancelled.
type ServeFunc func(ctx context.Context, c net.Conn) error

// Errors callers can test with errors.Is.
var (
	// ErrNoNBD: the running kernel has no nbd driver (built in or module),
	// or it could not be loaded.
	ErrNoNBD = errors.New("kernel has no nbd support")
	// ErrBusy: the requested /dev/nbdN is already connected.
	ErrBusy = errors.New("nbd device is busy")
)
