// Package nbdproto is the NBD protocol as doppel speaks it (NetworkBlockDevice
// doc/proto.md): wire constants, and the client side of fixed-newstyle
// negotiation (greeting, options, NBD_OPT_INFO/GO, NBD_OPT_LIST). doppel's
// NBD server (package blockdev), its client (blockdev/nbdclient) and the
// kernel attach (blockdev/kernel, which negotiates in userspace as
// nbd-client does before handing the socket to the kernel) all use it.
//
// Constants that go-nbd v0.3.2's protocol package defines are taken from
// it; the rest are spelled out here.
package nbdproto

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"

	"github.com/pojntfx/go-nbd/pkg/protocol"
)

// Magics.
const (
	NBDMagic         = protocol.NEGOTIATION_MAGIC_OLDSTYLE // "NBDMAGIC"
	OptMagic         = protocol.NEGOTIATION_MAGIC_OPTION   // "IHAVEOPT"
	OptReplyMagic    = protocol.NEGOTIATION_MAGIC_REPLY
	RequestMagic     = protocol.TRANSMISSION_MAGIC_REQUEST
	SimpleReplyMagic = protocol.TRANSMISSION_MAGIC_REPLY
)

// Handshake flags (server) and client flags.
const (
	HandshakeFixedNewstyle = protocol.NEGOTIATION_HANDSHAKE_FLAG_FIXED_NEWSTYLE
	HandshakeNoZeroes      = uint16(1 << 1)
	ClientFixedNewstyle    = uint32(1 << 0)
	ClientNoZeroes         = uint32(1 << 1)
)

// Options.
const (
	OptExportName      = uint32(1)
	OptAbort           = protocol.NEGOTIATION_ID_OPTION_ABORT
	OptList            = protocol.NEGOTIATION_ID_OPTION_LIST
	OptStartTLS        = uint32(5)
	OptInfo            = protocol.NEGOTIATION_ID_OPTION_INFO
	OptGo              = protocol.NEGOTIATION_ID_OPTION_GO
	OptStructuredReply = uint32(8)
)

// Option replies. An error reply has RepErr set.
const (
	RepAck        = protocol.NEGOTIATION_TYPE_REPLY_ACK
	RepServer     = protocol.NEGOTIATION_TYPE_REPLY_SERVER
	RepInfo       = protocol.NEGOTIATION_TYPE_REPLY_INFO
	RepErr        = uint32(1 << 31)
	RepErrUnsup   = protocol.NEGOTIATION_TYPE_REPLY_ERR_UNSUPPORTED
	RepErrPolicy  = uint32(2 | 1<<31)
	RepErrInvalid = uint32(3 | 1<<31)
	RepErrUnknown = protocol.NEGOTIATION_TYPE_REPLY_ERR_UNKNOWN
	RepErrTooBig  = uint32(9 | 1<<31)
)

// NBD_INFO_* types in an NBD_REP_INFO.
const (
	InfoExport      = protocol.NEGOTIATION_TYPE_INFO_EXPORT
	InfoName        = protocol.NEGOTIATION_TYPE_INFO_NAME
	InfoDescription = protocol.NEGOTIATION_TYPE_INFO_DESCRIPTION
	InfoBlockSize   = protocol.NEGOTIATION_TYPE_INFO_BLOCKSIZE
)

// Transmission flags.
const (
	FlagHasFlags        = protocol.NEGOTIATION_REPLY_FLAGS_HAS_FLAGS
	FlagReadOnly        = uint16(1 << 1)
	FlagSendFlush       = uint16(1 << 2)
	FlagSendFUA         = uint16(1 << 3)
	FlagSendTrim        = uint16(1 << 5)
	FlagSendWriteZeroes = uint16(1 << 6)
	FlagCanMultiConn    = protocol.NEGOTIATION_REPLY_FLAGS_CAN_MULTI_CONN
	FlagSendFastZero    = uint16(1 << 11)
)

// Commands.
const (
	CmdRead        = protocol.TRANSMISSION_TYPE_REQUEST_READ
	CmdWrite       = protocol.TRANSMISSION_TYPE_REQUEST_WRITE
	CmdDisc        = protocol.TRANSMISSION_TYPE_REQUEST_DISC
	CmdFlush       = uint16(3)
	CmdTrim        = uint16(4)
	CmdWriteZeroes = uint16(6)
)

// Command flags.
const (
	CmdFlagFUA      = uint16(1 << 0)
	CmdFlagNoHole   = uint16(1 << 1)
	CmdFlagDF       = uint16(1 << 2)
	CmdFlagFastZero = uint16(1 << 4)
	KnownCmdFlags   = CmdFlagFUA | CmdFlagNoHole | CmdFlagDF | CmdFlagFastZero
)

// Error values in simple replies (proto.md "Error values").
const (
	EPERM     = protocol.TRANSMISSION_ERROR_EPERM
	EIO       = uint32(5)
	ENOMEM    = uint32(12)
	EINVAL    = protocol.TRANSMISSION_ERROR_EINVAL
	ENOSPC    = uint32(28)
	EOVERFLOW = uint32(75)
	ENOTSUP   = uint32(95)
	ESHUTDOWN = uint32(108)
)

// Sizes.
const (
	RequestHeaderLen = 28
	ReplyHeaderLen   = 16
	// MaxNameLength is proto.md's limit for strings (export names).
	MaxNameLength = 4096
	// MaxOptionReply bounds an option reply's data: more than any reply to
	// LIST, INFO or GO needs.
	MaxOptionReply = 64 << 10
)

// ErrNegotiation wraps a server's refusal or a malformed handshake.
var ErrNegotiation = errors.New("nbd negotiation failed")

// Export is what a server said about an export in NBD_OPT_INFO/GO.
type Export struct {
	Name        string
	Description string
	Size        uint64
	Flags       uint16 // transmission flags
	MinBlock    uint32 // 0 when the server sent no NBD_INFO_BLOCK_SIZE
	PrefBlock   uint32
	MaxBlock    uint32
}

// OptionError is an error reply to a negotiation option.
type OptionError struct {
	Option  uint32
	Type    uint32 // NBD_REP_ERR_*
	Message string
}

func (e *OptionError) Error() string {
	return fmt.Sprintf("nbd option %d refused (reply %#x): %s", e.Option, e.Type, printable(e.Message))
}

// Unwrap makes errors.Is(err, ErrNegotiation) hold.
func (e *OptionError) Unwrap() error { return ErrNegotiation }

// Handshake reads the server's greeting and sends the client flags (fixed
// newstyle, and no zeroes when the server offers it). It returns the
// server's handshake flags.
func Handshake(rw io.ReadWriter) (uint16, error) {
	var g [18]byte
	if _, err := io.ReadFull(rw, g[:]); err != nil {
		return 0, fmt.Errorf("%w: read greeting: %w", ErrNegotiation, err)
	}
	if binary.BigEndian.Uint64(g[0:8]) != NBDMagic || binary.BigEndian.Uint64(g[8:16]) != OptMagic {
		return 0, fmt.Errorf("%w: not a newstyle NBD server (greeting %x)", ErrNegotiation, g[:16])
	}
	hs := binary.BigEndian.Uint16(g[16:18])
	if hs&HandshakeFixedNewstyle == 0 {
		return 0, fmt.Errorf("%w: server does not speak fixed newstyle", ErrNegotiation)
	}
	cf := ClientFixedNewstyle
	if hs&HandshakeNoZeroes != 0 {
		cf |= ClientNoZeroes
	}
	if _, err := rw.Write(binary.BigEndian.AppendUint32(nil, cf)); err != nil {
		return 0, fmt.Errorf("%w: send client flags: %w", ErrNegotiation, err)
	}
	return hs, nil
}

// SendOption sends one option with its data.
func SendOption(w io.Writer, opt uint32, data []byte) error {
	b := binary.BigEndian.AppendUint64(nil, OptMagic)
	b = binary.BigEndian.AppendUint32(b, opt)
	b = binary.BigEndian.AppendUint32(b, uint32(len(data)))
	if _, err := w.Write(append(b, data...)); err != nil {
		return fmt.Errorf("%w: send option %d: %w", ErrNegotiation, opt, err)
	}
	return nil
}

// ReadOptionReply reads one option reply (data at most MaxOptionReply).
func ReadOptionReply(r io.Reader) (opt, typ uint32, data []byte, err error) {
	var h [20]byte
	if _, err := io.ReadFull(r, h[:]); err != nil {
		return 0, 0, nil, fmt.Errorf("%w: read option reply: %w", ErrNegotiation, err)
	}
	if m := binary.BigEndian.Uint64(h[0:8]); m != OptReplyMagic {
		return 0, 0, nil, fmt.Errorf("%w: bad option reply magic %#x", ErrNegotiation, m)
	}
	n := binary.BigEndian.Uint32(h[16:20])
	if n > MaxOptionReply {
		return 0, 0, nil, fmt.Errorf("%w: %d-byte option reply", ErrNegotiation, n)
	}
	data = make([]byte, n)
	if _, err := io.ReadFull(r, data); err != nil {
		return 0, 0, nil, fmt.Errorf("%w: read option reply data: %w", ErrNegotiation, err)
	}
	return binary.BigEndian.Uint32(h[8:12]), binary.BigEndian.Uint32(h[12:16]), data, nil
}

// InfoRequest encodes the data of NBD_OPT_INFO/GO: the export name and the
// information types asked for.
func InfoRequest(name string, infos ...uint16) []byte {
	b := binary.BigEndian.AppendUint32(nil, uint32(len(name)))
	b = append(b, name...)
	b = binary.BigEndian.AppendUint16(b, uint16(len(infos)))
	for _, i := range infos {
		b = binary.BigEndian.AppendUint16(b, i)
	}
	return b
}

// Info sends NBD_OPT_INFO (goOpt false) or NBD_OPT_GO (goOpt true) for
// name, asking for its name, description and block sizes, and collects the
// replies. After a successful GO the connection is in the transmission
// phase. A reply to another option, an export without a size, or a
// malformed NBD_REP_INFO is an error wrapping ErrNegotiation; a refusal is
// an *OptionError.
func Info(rw io.ReadWriter, name string, goOpt bool) (*Export, error) {
	if len(name) > MaxNameLength {
		return nil, fmt.Errorf("%w: export name longer than %d bytes", ErrNegotiation, MaxNameLength)
	}
	opt := OptInfo
	if goOpt {
		opt = OptGo
	}
	if err := SendOption(rw, opt, InfoRequest(name, InfoName, InfoDescription, InfoBlockSize)); err != nil {
		return nil, err
	}
	x := &Export{Name: name}
	gotExport := false
	for {
		o, typ, data, err := ReadOptionReply(rw)
		if err != nil {
			return nil, err
		}
		if o != opt {
			return nil, fmt.Errorf("%w: reply to option %d, want %d", ErrNegotiation, o, opt)
		}
		switch {
		case typ&RepErr != 0:
			return nil, &OptionError{Option: opt, Type: typ, Message: string(data)}
		case typ == RepAck:
			if !gotExport {
				return nil, fmt.Errorf("%w: server sent no export size", ErrNegotiation)
			}
			return x, nil
		case typ == RepInfo:
			if err := x.parseInfo(data); err != nil {
				return nil, err
			}
			gotExport = gotExport || binary.BigEndian.Uint16(data) == InfoExport
		}
		// Other reply types are skipped, as the protocol allows.
	}
}

// parseInfo reads one NBD_REP_INFO payload into x.
func (x *Export) parseInfo(b []byte) error {
	if len(b) < 2 {
		return fmt.Errorf("%w: short NBD_REP_INFO", ErrNegotiation)
	}
	switch binary.BigEndian.Uint16(b) {
	case InfoExport:
		if len(b) != 12 {
			return fmt.Errorf("%w: NBD_INFO_EXPORT of %d bytes", ErrNegotiation, len(b))
		}
		x.Size = binary.BigEndian.Uint64(b[2:10])
		x.Flags = binary.BigEndian.Uint16(b[10:12])
	case InfoName:
		x.Name = string(b[2:])
	case InfoDescription:
		x.Description = string(b[2:])
	case InfoBlockSize:
		if len(b) != 14 {
			return fmt.Errorf("%w: NBD_INFO_BLOCK_SIZE of %d bytes", ErrNegotiation, len(b))
		}
		x.MinBlock = binary.BigEndian.Uint32(b[2:6])
		x.PrefBlock = binary.BigEndian.Uint32(b[6:10])
		x.MaxBlock = binary.BigEndian.Uint32(b[10:14])
	}
	return nil
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
			if int64(n) > int64(len(data)-4) {
				return nil, fmt.Errorf("%w: bad NBD_REP_SERVER", ErrNegotiation)
			}
			names = append(names, string(data[4:4+n]))
		}
	}
}

// printable makes a server-supplied message safe to log: at most 200
// bytes, control characters replaced.
func printable(s string) string {
	if len(s) > 200 {
		s = s[:200]
	}
	out := make([]rune, 0, len(s))
	for _, r := range s {
		if r < 0x20 || r == 0x7f {
			r = '?'
		}
		out = append(out, r)
	}
	return string(out)
}
