package blockdev

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/doppelha/doppel/blockdev/nbdproto"
)

// negotiationTimeout bounds the whole handshake of one connection, so that
// idle or stalled clients do not hold a connection forever.
const negotiationTimeout = 60 * time.Second

// conn is one client connection.
type conn struct {
	s   *Server
	c   net.Conn
	br  *bufio.Reader
	bw  *bufio.Writer // negotiation replies
	log *slog.Logger

	noZeroes bool
	opt      []byte // reusable option data buffer

	dlMu      sync.Mutex
	cancelled bool
	stopped   atomic.Bool // cancelled, readable without dlMu

	// handing: the connection is being handed over (Server.Handover): the
	// reader stops at a request boundary, and pending keeps what it read
	// from the socket without processing it (for the new owner).
	handing atomic.Bool
	pending []byte
}

// handoff makes the reader stop at the next request boundary (a blocked
// read returns at once); replies still go out.
func (cn *conn) handoff() {
	cn.dlMu.Lock()
	defer cn.dlMu.Unlock()
	cn.handing.Store(true)
	cn.c.SetReadDeadline(time.Unix(1, 0))
}

func newConn(s *Server, c net.Conn) *conn {
	return &conn{
		s:   s,
		c:   c,
		br:  bufio.NewReaderSize(c, 64<<10),
		bw:  bufio.NewWriterSize(c, 4<<10),
		log: s.log.With("remote", remoteName(c)),
	}
}

// shutdownGrace bounds how long replies may take to leave once the server
// is shutting down (a client that stopped reading must not hold it).
const shutdownGrace = 10 * time.Second

// cancel makes every pending and future read fail at once, and writes fail
// after shutdownGrace.
func (cn *conn) cancel() {
	cn.dlMu.Lock()
	cn.cancelled = true
	cn.stopped.Store(true)
	cn.c.SetReadDeadline(time.Unix(1, 0))
	cn.c.SetWriteDeadline(time.Now().Add(cn.s.grace))
	cn.dlMu.Unlock()
}

// setDeadlines sets the read and write deadlines unless the connection was
// cancelled.
func (cn *conn) setDeadlines(t time.Time) {
	cn.dlMu.Lock()
	if !cn.cancelled && !cn.handing.Load() {
		cn.c.SetDeadline(t)
	}
	cn.dlMu.Unlock()
}

// errAbort is the client's NBD_OPT_ABORT: a clean end of negotiation.
var errAbort = errors.New("client aborted negotiation")

// negotiate runs the fixed-newstyle handshake and returns the export the
// client chose, or (nil, nil) when the client aborted or hung up cleanly.
func (cn *conn) negotiate() (*export, error) {
	cn.setDeadlines(time.Now().Add(negotiationTimeout))
	x, err := cn.handshake()
	cn.setDeadlines(time.Time{})
	if errors.Is(err, errAbort) {
		return nil, nil
	}
	return x, err
}

func (cn *conn) handshake() (*export, error) {
	var b [18]byte
	binary.BigEndian.PutUint64(b[0:8], nbdproto.NBDMagic)
	binary.BigEndian.PutUint64(b[8:16], nbdproto.OptMagic)
	binary.BigEndian.PutUint16(b[16:18], nbdproto.HandshakeFixedNewstyle|nbdproto.HandshakeNoZeroes)
	if _, err := cn.c.Write(b[:18]); err != nil {
		return nil, fmt.Errorf("send greeting: %w", err)
	}
	if _, err := io.ReadFull(cn.br, b[:4]); err != nil {
		if errors.Is(err, io.EOF) {
			return nil, errAbort // a probe that only read the greeting
		}
		return nil, fmt.Errorf("read client flags: %w", err)
	}
	cf := binary.BigEndian.Uint32(b[:4])
	if cf&^(nbdproto.ClientFixedNewstyle|nbdproto.ClientNoZeroes) != 0 {
		return nil, fmt.Errorf("client flags %#x: unknown bits", cf)
	}
	if cf&nbdproto.ClientFixedNewstyle == 0 {
		return nil, errors.New("client does not speak fixed newstyle negotiation")
	}
	cn.noZeroes = cf&nbdproto.ClientNoZeroes != 0
	for {
		x, err := cn.option()
		if err != nil || x != nil {
			return x, err
		}
	}
}

// option reads and answers one option. It returns the chosen export when
// the client entered transmission.
func (cn *conn) option() (*export, error) {
	var h [16]byte
	if _, err := io.ReadFull(cn.br, h[:]); err != nil {
		if errors.Is(err, io.EOF) {
			return nil, errAbort
		}
		return nil, fmt.Errorf("read option header: %w", err)
	}
	if m := binary.BigEndian.Uint64(h[0:8]); m != nbdproto.OptMagic {
		return nil, fmt.Errorf("bad option magic %#x", m)
	}
	opt := binary.BigEndian.Uint32(h[8:12])
	n := binary.BigEndian.Uint32(h[12:16])
	if n > maxOptionLength {
		// Never allocate or read what the client claims; say why and go.
		cn.reply(opt, nbdproto.RepErrTooBig, []byte("option data too long"))
		cn.bw.Flush()
		return nil, fmt.Errorf("option %d: length %d exceeds %d", opt, n, maxOptionLength)
	}
	if cap(cn.opt) < int(n) {
		cn.opt = make([]byte, n)
	}
	data := cn.opt[:n]
	if _, err := io.ReadFull(cn.br, data); err != nil {
		return nil, fmt.Errorf("read option %d data: %w", opt, err)
	}
	x, err := cn.handleOption(opt, data)
	if ferr := cn.bw.Flush(); ferr != nil && err == nil {
		err = fmt.Errorf("send option reply: %w", ferr)
	}
	return x, err
}

func (cn *conn) handleOption(opt uint32, data []byte) (*export, error) {
	switch opt {
	case nbdproto.OptExportName:
		x := cn.s.lookup(string(data))
		if x == nil {
			// NBD_OPT_EXPORT_NAME has no error reply: the only refusal is
			// to close the connection.
			return nil, fmt.Errorf("NBD_OPT_EXPORT_NAME: unknown export %q", data)
		}
		var b [10 + 124]byte
		binary.BigEndian.PutUint64(b[0:8], x.size)
		binary.BigEndian.PutUint16(b[8:10], x.flags)
		out := b[:]
		if cn.noZeroes {
			out = b[:10]
		}
		if _, err := cn.bw.Write(out); err != nil {
			return nil, err
		}
		return x, nil
	case nbdproto.OptAbort:
		cn.reply(opt, nbdproto.RepAck, nil)
		cn.bw.Flush()
		return nil, errAbort
	case nbdproto.OptList:
		if len(data) != 0 {
			cn.reply(opt, nbdproto.RepErrInvalid, []byte("NBD_OPT_LIST takes no data"))
			return nil, nil
		}
		for _, x := range cn.s.exports {
			var b []byte
			b = binary.BigEndian.AppendUint32(b, uint32(len(x.Name)))
			b = append(b, x.Name...)
			b = append(b, x.Description...)
			cn.reply(opt, nbdproto.RepServer, b)
		}
		cn.reply(opt, nbdproto.RepAck, nil)
		return nil, nil
	case nbdproto.OptInfo, nbdproto.OptGo:
		return cn.infoGo(opt, data)
	case nbdproto.OptStartTLS:
		cn.reply(opt, nbdproto.RepErrUnsup, []byte("TLS is not supported"))
		return nil, nil
	}
	cn.reply(opt, nbdproto.RepErrUnsup, fmt.Appendf(nil, "option %d is not supported", opt))
	return nil, nil
}

// infoGo answers NBD_OPT_INFO and NBD_OPT_GO.
func (cn *conn) infoGo(opt uint32, data []byte) (*export, error) {
	name, reqs, ok := parseInfoRequest(data)
	if !ok {
		cn.reply(opt, nbdproto.RepErrInvalid, []byte("malformed NBD_OPT_INFO/GO request"))
		return nil, nil
	}
	x := cn.s.lookup(string(name))
	if x == nil {
		cn.reply(opt, nbdproto.RepErrUnknown, fmt.Appendf(nil, "no export named %q", name))
		return nil, nil
	}
	var b [18]byte
	binary.BigEndian.PutUint16(b[0:2], nbdproto.InfoExport)
	binary.BigEndian.PutUint64(b[2:10], x.size)
	binary.BigEndian.PutUint16(b[10:12], x.flags)
	cn.reply(opt, nbdproto.RepInfo, b[:12])
	var sentName, sentDesc, sentBlock bool
	for i := 0; i+1 < len(reqs); i += 2 {
		switch binary.BigEndian.Uint16(reqs[i:]) {
		case nbdproto.InfoName:
			if !sentName {
				sentName = true
				cn.reply(opt, nbdproto.RepInfo, append(binary.BigEndian.AppendUint16(nil, nbdproto.InfoName), x.Name...))
			}
		case nbdproto.InfoDescription:
			if !sentDesc && x.Description != "" {
				sentDesc = true
				cn.reply(opt, nbdproto.RepInfo, append(binary.BigEndian.AppendUint16(nil, nbdproto.InfoDescription), x.Description...))
			}
		case nbdproto.InfoBlockSize:
			if !sentBlock {
				sentBlock = true
				binary.BigEndian.PutUint16(b[0:2], nbdproto.InfoBlockSize)
				binary.BigEndian.PutUint32(b[2:6], 1)
				binary.BigEndian.PutUint32(b[6:10], preferredBlock)
				binary.BigEndian.PutUint32(b[10:14], MaxPayload)
				cn.reply(opt, nbdproto.RepInfo, b[:14])
			}
		}
	}
	cn.reply(opt, nbdproto.RepAck, nil)
	if opt == nbdproto.OptGo {
		return x, nil
	}
	return nil, nil
}

// parseInfoRequest splits NBD_OPT_INFO/GO data into the export name and the
// list of requested NBD_INFO types (2 bytes each).
func parseInfoRequest(data []byte) (name, reqs []byte, ok bool) {
	if len(data) < 6 {
		return nil, nil, false
	}
	nl := binary.BigEndian.Uint32(data[0:4])
	if nl > nbdproto.MaxNameLength || uint64(nl)+6 > uint64(len(data)) {
		return nil, nil, false
	}
	name = data[4 : 4+nl]
	rest := data[4+nl:]
	nr := int(binary.BigEndian.Uint16(rest[0:2]))
	if len(rest) != 2+2*nr {
		return nil, nil, false
	}
	return name, rest[2:], true
}

// reply queues one option reply (flushed by the caller).
func (cn *conn) reply(opt, typ uint32, data []byte) {
	var h [20]byte
	binary.BigEndian.PutUint64(h[0:8], nbdproto.OptReplyMagic)
	binary.BigEndian.PutUint32(h[8:12], opt)
	binary.BigEndian.PutUint32(h[12:16], typ)
	binary.BigEndian.PutUint32(h[16:20], uint32(len(data)))
	cn.bw.Write(h[:])
	cn.bw.Write(data)
}
