// Package nbdclient is a small NBD client (simple replies, several requests
// in flight, matched by cookie) for tests and tools that need to talk to an
// NBD server without an external program: doppel's own tests and the
// replication end-to-end checks. Negotiation is package nbdproto's.
package nbdclient

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"syscall"

	"github.com/doppelha/doppel/blockdev/nbdproto"
)

// Error is an NBD error reply to a request.
type Error struct {
	Cmd   uint16
	Errno syscall.Errno
}

func (e *Error) Error() string { return fmt.Sprintf("nbd command %d: %v", e.Cmd, e.Errno) }

// Unwrap lets errors.Is(err, syscall.EINVAL) work.
func (e *Error) Unwrap() error { return e.Errno }

// Client is a connection in the transmission phase. Its methods are safe
// for concurrent use; requests are pipelined and matched by cookie.
type Client struct {
	Export nbdproto.Export

	c  net.Conn
	br *bufio.Reader

	wmu sync.Mutex // request writes
	mu  sync.Mutex
	cur uint64
	in  map[uint64]*call
	err error // reader failure: every later call fails with it
}

type call struct {
	cmd  uint16
	buf  []byte
	done chan error
}

// Dial connects to network/addr ("unix" or "tcp") and enters transmission
// for export name with NBD_OPT_GO.
func Dial(network, addr, name string) (*Client, error) {
	c, err := net.Dial(network, addr)
	if err != nil {
		return nil, err
	}
	cl, err := Connect(c, name)
	if err != nil {
		c.Close()
		return nil, err
	}
	return cl, nil
}

// Connect negotiates on an open connection and enters transmission.
func Connect(c net.Conn, name string) (*Client, error) {
	if _, err := nbdproto.Handshake(c); err != nil {
		return nil, err
	}
	x, err := nbdproto.Info(c, name, true)
	if err != nil {
		return nil, err
	}
	return NewTransmission(c, *x), nil
}

// NewTransmission wraps a connection already in the transmission phase.
func NewTransmission(c net.Conn, x nbdproto.Export) *Client {
	cl := &Client{Export: x, c: c, br: bufio.NewReaderSize(c, 256<<10), in: map[uint64]*call{}}
	go cl.readLoop()
	return cl
}

// Conn is the underlying connection (tests write raw bytes to it).
func (cl *Client) Conn() net.Conn { return cl.c }

func (cl *Client) readLoop() {
	var h [16]byte
	var err error
	for {
		if _, err = io.ReadFull(cl.br, h[:]); err != nil {
			break
		}
		if binary.BigEndian.Uint32(h[0:4]) != nbdproto.SimpleReplyMagic {
			err = errors.New("bad reply magic")
			break
		}
		errno := binary.BigEndian.Uint32(h[4:8])
		cookie := binary.BigEndian.Uint64(h[8:16])
		cl.mu.Lock()
		ca := cl.in[cookie]
		delete(cl.in, cookie)
		cl.mu.Unlock()
		if ca == nil {
			err = fmt.Errorf("reply for unknown cookie %d", cookie)
			break
		}
		if errno != 0 {
			ca.done <- &Error{Cmd: ca.cmd, Errno: syscall.Errno(errno)}
			continue
		}
		if ca.cmd == nbdproto.CmdRead {
			if _, err = io.ReadFull(cl.br, ca.buf); err != nil {
				ca.done <- err
				break
			}
		}
		ca.done <- nil
	}
	if errors.Is(err, io.EOF) {
		err = io.ErrUnexpectedEOF
	}
	cl.mu.Lock()
	cl.err = fmt.Errorf("nbd client: connection lost: %w", err)
	for k, ca := range cl.in {
		ca.done <- cl.err
		delete(cl.in, k)
	}
	cl.mu.Unlock()
}

// Do sends one request and waits for its reply. For nbdproto.CmdRead, buf receives
// the data; for nbdproto.CmdWrite it is the payload; length is used for the other
// commands.
func (cl *Client) Do(cmd, flags uint16, off uint64, length uint32, buf []byte) error {
	ca := &call{cmd: cmd, buf: buf, done: make(chan error, 1)}
	if cmd == nbdproto.CmdRead || cmd == nbdproto.CmdWrite {
		length = uint32(len(buf))
	}
	cl.mu.Lock()
	if cl.err != nil {
		cl.mu.Unlock()
		return cl.err
	}
	cl.cur++
	cookie := cl.cur
	cl.in[cookie] = ca
	cl.mu.Unlock()

	h := make([]byte, 0, nbdproto.RequestHeaderLen)
	h = binary.BigEndian.AppendUint32(h, nbdproto.RequestMagic)
	h = binary.BigEndian.AppendUint16(h, flags)
	h = binary.BigEndian.AppendUint16(h, cmd)
	h = binary.BigEndian.AppendUint64(h, cookie)
	h = binary.BigEndian.AppendUint64(h, off)
	h = binary.BigEndian.AppendUint32(h, length)
	cl.wmu.Lock()
	bufs := net.Buffers{h}
	if cmd == nbdproto.CmdWrite {
		bufs = append(bufs, buf)
	}
	_, err := bufs.WriteTo(cl.c)
	cl.wmu.Unlock()
	if err != nil {
		cl.mu.Lock()
		delete(cl.in, cookie)
		cl.mu.Unlock()
		return fmt.Errorf("nbd client: send: %w", err)
	}
	return <-ca.done
}

// ReadAt reads len(p) bytes at off.
func (cl *Client) ReadAt(p []byte, off int64) (int, error) {
	if err := cl.Do(nbdproto.CmdRead, 0, uint64(off), 0, p); err != nil {
		return 0, err
	}
	return len(p), nil
}

// WriteAt writes p at off.
func (cl *Client) WriteAt(p []byte, off int64) (int, error) {
	if err := cl.Do(nbdproto.CmdWrite, 0, uint64(off), 0, p); err != nil {
		return 0, err
	}
	return len(p), nil
}

// Flush sends NBD_CMD_FLUSH.
func (cl *Client) Flush() error { return cl.Do(nbdproto.CmdFlush, 0, 0, 0, nil) }

// Trim sends NBD_CMD_TRIM.
func (cl *Client) Trim(off int64, length uint32) error {
	return cl.Do(nbdproto.CmdTrim, 0, uint64(off), length, nil)
}

// WriteZeroes sends NBD_CMD_WRITE_ZEROES (NO_HOLE when noHole).
func (cl *Client) WriteZeroes(off int64, length uint32, noHole bool) error {
	var f uint16
	if noHole {
		f = nbdproto.CmdFlagNoHole
	}
	return cl.Do(nbdproto.CmdWriteZeroes, f, uint64(off), length, nil)
}

// Close sends NBD_CMD_DISC and closes the connection.
func (cl *Client) Close() error {
	h := make([]byte, 0, nbdproto.RequestHeaderLen)
	h = binary.BigEndian.AppendUint32(h, nbdproto.RequestMagic)
	h = binary.BigEndian.AppendUint16(h, 0)
	h = binary.BigEndian.AppendUint16(h, nbdproto.CmdDisc)
	h = append(h, make([]byte, 20)...)
	cl.wmu.Lock()
	_, werr := cl.c.Write(h)
	cl.wmu.Unlock()
	return errors.Join(werr, cl.c.Close())
}
