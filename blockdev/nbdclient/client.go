// Package nbdclient is a small NBD client (fixed newstyle negotiation,
// simple replies, several requests in flight) for tests and tools that need
// to talk to an NBD server without an external program: doppel's own tests,
// replication end-to-end checks, and negotiation before a kernel attach.
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
)

// Protocol constants used by the client (NetworkBlockDevice doc/proto.md).
const (
	nbdMagic      = 0x4e42444d41474943
	optMagic      = 0x49484156454F5054
	optReplyMagic = 0x3e889045565a9
	reqMagic      = 0x25609513
	replyMagic    = 0x67446698

	OptExportName = 1
	OptAbort      = 2
	OptList       = 3
	OptStartTLS   = 5
	OptInfo       = 6
	OptGo         = 7

	RepAck    = 1
	RepServer = 2
	RepInfo   = 3
	RepErr    = 1 << 31

	InfoExport      = 0
	InfoName        = 1
	InfoDescription = 2
	InfoBlockSize   = 3

	FlagHasFlags        = 1 << 0
	FlagReadOnly        = 1 << 1
	FlagSendFlush       = 1 << 2
	FlagSendFUA         = 1 << 3
	FlagSendTrim        = 1 << 5
	FlagSendWriteZeroes = 1 << 6
	FlagCanMultiConn    = 1 << 8
	FlagSendFastZero    = 1 << 11

	CmdRead        = 0
	CmdWrite       = 1
	CmdDisc        = 2
	CmdFlush       = 3
	CmdTrim        = 4
	CmdWriteZeroes = 6

	CmdFlagFUA      = 1 << 0
	CmdFlagNoHole   = 1 << 1
	CmdFlagFastZero = 1 << 4
)

// Export describes the export chosen by NBD_OPT_GO.
type Export struct {
	Name        string
	Description string
	Size        uint64
	Flags       uint16 // transmission flags
	MinBlock    uint32
	PrefBlock   uint32
	MaxBlock    uint32
}

// Error is an NBD error reply to a request.
type Error struct {
	Cmd   uint16
	Errno syscall.Errno
}

func (e *Error) Error() string { return fmt.Sprintf("nbd command %d: %v", e.Cmd, e.Errno) }

// Unwrap lets errors.Is(err, syscall.EINVAL) work.
func (e *Error) Unwrap() error { return e.Errno }

// OptionError is an error reply to a negotiation option.
type OptionError struct {
	Option  uint32
	Type    uint32 // NBD_REP_ERR_*
	Message string
}

func (e *OptionError) Error() string {
	return fmt.Sprintf("nbd option %d refused (reply %#x): %s", e.Option, e.Type, e.Message)
}

// Handshake reads the server greeting and sends the client flags
// (fixed newstyle, no zeroes). It returns the server's handshake flags.
func Handshake(rw io.ReadWriter) (uint16, error) {
	var b [18]byte
	if _, err := io.ReadFull(rw, b[:]); err != nil {
		return 0, fmt.Errorf("read greeting: %w", err)
	}
	if binary.BigEndian.Uint64(b[0:8]) != nbdMagic || binary.BigEndian.Uint64(b[8:16]) != optMagic {
		return 0, errors.New("not a newstyle NBD server")
	}
	hf := binary.BigEndian.Uint16(b[16:18])
	if hf&1 == 0 {
		return 0, errors.New("server does not speak fixed newstyle")
	}
	cf := uint32(1)
	if hf&2 != 0 {
		cf |= 2
	}
	if _, err := rw.Write(binary.BigEndian.AppendUint32(nil, cf)); err != nil {
		return 0, fmt.Errorf("send client flags: %w", err)
	}
	return hf, nil
}

// SendOption sends one option with its data.
func SendOption(w io.Writer, opt uint32, data []byte) error {
	b := binary.BigEndian.AppendUint64(nil, optMagic)
	b = binary.BigEndian.AppendUint32(b, opt)
	b = binary.BigEndian.AppendUint32(b, uint32(len(data)))
	_, err := w.Write(append(b, data...))
	return err
}

// ReadOptionReply reads one option reply (data at most 1 MiB).
func ReadOptionReply(r io.Reader) (opt, typ uint32, data []byte, err error) {
	var h [20]byte
	if _, err := io.ReadFull(r, h[:]); err != nil {
		return 0, 0, nil, fmt.Errorf("read option reply: %w", err)
	}
	if binary.BigEndian.Uint64(h[0:8]) != optReplyMagic {
		return 0, 0, nil, errors.New("bad option reply magic")
	}
	n := binary.BigEndian.Uint32(h[16:20])
	if n > 1<<20 {
		return 0, 0, nil, fmt.Errorf("option reply of %d bytes", n)
	}
	data = make([]byte, n)
	if _, err := io.ReadFull(r, data); err != nil {
		return 0, 0, nil, fmt.Errorf("read option reply data: %w", err)
	}
	return binary.BigEndian.Uint32(h[8:12]), binary.BigEndian.Uint32(h[12:16]), data, nil
}

// InfoRequest encodes NBD_OPT_INFO/GO data: the name and the info types.
func InfoRequest(name string, infos ...uint16) []byte {
	b := binary.BigEndian.AppendUint32(nil, uint32(len(name)))
	b = append(b, name...)
	b = binary.BigEndian.AppendUint16(b, uint16(len(infos)))
	for _, i := range infos {
		b = binary.BigEndian.AppendUint16(b, i)
	}
	return b
}

// Info sends NBD_OPT_INFO (go false) or NBD_OPT_GO (go true) for name and
// collects the replies.
func Info(rw io.ReadWriter, name string, goOpt bool) (*Export, error) {
	opt := uint32(OptInfo)
	if goOpt {
		opt = OptGo
	}
	if err := SendOption(rw, opt, InfoRequest(name, InfoName, InfoDescription, InfoBlockSize)); err != nil {
		return nil, err
	}
	x := &Export{Name: name}
	for {
		_, typ, data, err := ReadOptionReply(rw)
		if err != nil {
			return nil, err
		}
		switch {
		case typ == RepAck:
			return x, nil
		case typ&RepErr != 0:
			return nil, &OptionError{Option: opt, Type: typ, Message: string(data)}
		case typ == RepInfo && len(data) >= 2:
			switch binary.BigEndian.Uint16(data) {
			case InfoExport:
				if len(data) != 12 {
					return nil, errors.New("bad NBD_INFO_EXPORT")
				}
				x.Size = binary.BigEndian.Uint64(data[2:10])
				x.Flags = binary.BigEndian.Uint16(data[10:12])
			case InfoName:
				x.Name = string(data[2:])
			case InfoDescription:
				x.Description = string(data[2:])
			case InfoBlockSize:
				if len(data) != 14 {
					return nil, errors.New("bad NBD_INFO_BLOCK_SIZE")
				}
				x.MinBlock = binary.BigEndian.Uint32(data[2:6])
				x.PrefBlock = binary.BigEndian.Uint32(data[6:10])
				x.MaxBlock = binary.BigEndian.Uint32(data[10:14])
			}
		}
	}
}

// List returns the export names of NBD_OPT_LIST.
func List(rw io.ReadWriter) ([]string, error) {
	if err := SendOption(rw, OptList, nil); err != nil {
		return nil, err
	}
	var names []string
	for {
		_, typ, data, err := ReadOptionReply(rw)
		if err != nil {
			return nil, err
		}
		switch {
		case typ == RepAck:
			return names, nil
		case typ&RepErr != 0:
			return nil, &OptionError{Option: OptList, Type: typ, Message: string(data)}
		case typ == RepServer && len(data) >= 4:
			n := binary.BigEndian.Uint32(data)
			if int(n) > len(data)-4 {
				return nil, errors.New("bad NBD_REP_SERVER")
			}
			names = append(names, string(data[4:4+n]))
		}
	}
}

// Client is a connection in the transmission phase. Its methods are safe
// for concurrent use; requests are pipelined and matched by cookie.
type Client struct {
	Export Export

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
	if _, err := Handshake(c); err != nil {
		return nil, err
	}
	x, err := Info(c, name, true)
	if err != nil {
		return nil, err
	}
	return NewTransmission(c, *x), nil
}

// NewTransmission wraps a connection already in the transmission phase.
func NewTransmission(c net.Conn, x Export) *Client {
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
		if binary.BigEndian.Uint32(h[0:4]) != replyMagic {
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
		if ca.cmd == CmdRead {
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

// Do sends one request and waits for its reply. For CmdRead, buf receives
// the data; for CmdWrite it is the payload; length is used for the other
// commands.
func (cl *Client) Do(cmd, flags uint16, off uint64, length uint32, buf []byte) error {
	ca := &call{cmd: cmd, buf: buf, done: make(chan error, 1)}
	if cmd == CmdRead || cmd == CmdWrite {
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

	h := make([]byte, 0, 28)
	h = binary.BigEndian.AppendUint32(h, reqMagic)
	h = binary.BigEndian.AppendUint16(h, flags)
	h = binary.BigEndian.AppendUint16(h, cmd)
	h = binary.BigEndian.AppendUint64(h, cookie)
	h = binary.BigEndian.AppendUint64(h, off)
	h = binary.BigEndian.AppendUint32(h, length)
	cl.wmu.Lock()
	bufs := net.Buffers{h}
	if cmd == CmdWrite {
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
	if err := cl.Do(CmdRead, 0, uint64(off), 0, p); err != nil {
		return 0, err
	}
	return len(p), nil
}

// WriteAt writes p at off.
func (cl *Client) WriteAt(p []byte, off int64) (int, error) {
	if err := cl.Do(CmdWrite, 0, uint64(off), 0, p); err != nil {
		return 0, err
	}
	return len(p), nil
}

// Flush sends NBD_CMD_FLUSH.
func (cl *Client) Flush() error { return cl.Do(CmdFlush, 0, 0, 0, nil) }

// Trim sends NBD_CMD_TRIM.
func (cl *Client) Trim(off int64, length uint32) error {
	return cl.Do(CmdTrim, 0, uint64(off), length, nil)
}

// WriteZeroes sends NBD_CMD_WRITE_ZEROES (NO_HOLE when noHole).
func (cl *Client) WriteZeroes(off int64, length uint32, noHole bool) error {
	var f uint16
	if noHole {
		f = CmdFlagNoHole
	}
	return cl.Do(CmdWriteZeroes, f, uint64(off), length, nil)
}

// Close sends NBD_CMD_DISC and closes the connection.
func (cl *Client) Close() error {
	h := make([]byte, 0, 28)
	h = binary.BigEndian.AppendUint32(h, reqMagic)
	h = binary.BigEndian.AppendUint16(h, 0)
	h = binary.BigEndian.AppendUint16(h, CmdDisc)
	h = append(h, make([]byte, 20)...)
	cl.wmu.Lock()
	_, werr := cl.c.Write(h)
	cl.wmu.Unlock()
	return errors.Join(werr, cl.c.Close())
}
