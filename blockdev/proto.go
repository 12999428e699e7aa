package blockdev

import (
	"encoding/binary"
	"syscall"

	"github.com/pojntfx/go-nbd/pkg/protocol"
)

// NBD wire constants (NetworkBlockDevice/nbd doc/proto.md). Those that
// go-nbd v0.3.2's protocol package defines are taken from it; the rest are
// spelled out here.
const (
	nbdMagic         = protocol.NEGOTIATION_MAGIC_OLDSTYLE // "NBDMAGIC"
	optMagic         = protocol.NEGOTIATION_MAGIC_OPTION   // "IHAVEOPT"
	optReplyMagic    = protocol.NEGOTIATION_MAGIC_REPLY
	requestMagic     = protocol.TRANSMISSION_MAGIC_REQUEST
	simpleReplyMagic = protocol.TRANSMISSION_MAGIC_REPLY

	// Handshake flags (server) and client flags.
	flagFixedNewstyle = protocol.NEGOTIATION_HANDSHAKE_FLAG_FIXED_NEWSTYLE
	flagNoZeroes      = uint16(1 << 1)
	clientFixed       = uint32(1 << 0)
	clientNoZeroes    = uint32(1 << 1)

	// Options.
	optExportName      = uint32(1)
	optAbort           = protocol.NEGOTIATION_ID_OPTION_ABORT
	optList            = protocol.NEGOTIATION_ID_OPTION_LIST
	optStartTLS        = uint32(5)
	optInfo            = protocol.NEGOTIATION_ID_OPTION_INFO
	optGo              = protocol.NEGOTIATION_ID_OPTION_GO
	optStructuredReply = uint32(8)

	// Option replies.
	repAck        = protocol.NEGOTIATION_TYPE_REPLY_ACK
	repServer     = protocol.NEGOTIATION_TYPE_REPLY_SERVER
	repInfo       = protocol.NEGOTIATION_TYPE_REPLY_INFO
	repErrUnsup   = protocol.NEGOTIATION_TYPE_REPLY_ERR_UNSUPPORTED
	repErrPolicy  = uint32(2 | 1<<31)
	repErrInvalid = uint32(3 | 1<<31)
	repErrUnknown = protocol.NEGOTIATION_TYPE_REPLY_ERR_UNKNOWN
	repErrTooBig  = uint32(9 | 1<<31)

	// NBD_INFO_* types in NBD_REP_INFO.
	infoExport      = protocol.NEGOTIATION_TYPE_INFO_EXPORT
	infoName        = protocol.NEGOTIATION_TYPE_INFO_NAME
	infoDescription = protocol.NEGOTIATION_TYPE_INFO_DESCRIPTION
	infoBlockSize   = protocol.NEGOTIATION_TYPE_INFO_BLOCKSIZE

	// Transmission flags.
	tflagHasFlags        = protocol.NEGOTIATION_REPLY_FLAGS_HAS_FLAGS
	tflagReadOnly        = uint16(1 << 1)
	tflagSendFlush       = uint16(1 << 2)
	tflagSendFUA         = uint16(1 << 3)
	tflagSendTrim        = uint16(1 << 5)
	tflagSendWriteZeroes = uint16(1 << 6)
	tflagCanMultiConn    = protocol.NEGOTIATION_REPLY_FLAGS_CAN_MULTI_CONN
	tflagSendFastZero    = uint16(1 << 11)

	// Commands.
	cmdRead        = protocol.TRANSMISSION_TYPE_REQUEST_READ
	cmdWrite       = protocol.TRANSMISSION_TYPE_REQUEST_WRITE
	cmdDisc        = protocol.TRANSMISSION_TYPE_REQUEST_DISC
	cmdFlush       = uint16(3)
	cmdTrim        = uint16(4)
	cmdWriteZeroes = uint16(6)

	// Command flags.
	cmdFlagFUA      = uint16(1 << 0)
	cmdFlagNoHole   = uint16(1 << 1)
	cmdFlagDF       = uint16(1 << 2)
	cmdFlagFastZero = uint16(1 << 4)
	knownCmdFlags   = cmdFlagFUA | cmdFlagNoHole | cmdFlagDF | cmdFlagFastZero

	// NBD error values (proto.md "Error values").
	nbdEPERM     = protocol.TRANSMISSION_ERROR_EPERM
	nbdEIO       = uint32(5)
	nbdENOMEM    = uint32(12)
	nbdEINVAL    = protocol.TRANSMISSION_ERROR_EINVAL
	nbdENOSPC    = uint32(28)
	nbdEOVERFLOW = uint32(75)
	nbdENOTSUP   = uint32(95)
	nbdESHUTDOWN = uint32(108)
)

// Limits.
const (
	// MaxPayload is the largest READ or WRITE the server accepts (32 MiB, the
	// size proto.md says clients may always assume is not a denial of service).
	MaxPayload = 32 << 20
	// maxOptionLength bounds one negotiation option's data. The longest
	// legitimate option is NBD_OPT_GO/INFO: 4 + 4096 (name) + 2 + 2*n
	// info requests; anything much larger is refused without reading it.
	maxOptionLength = 16 << 10
	// maxNameLength is proto.md's hard limit for strings.
	maxNameLength = 4096
	// preferredBlock is advertised in NBD_INFO_BLOCK_SIZE.
	preferredBlock = 4096

	requestHeaderLen = 28
	replyHeaderLen   = 16
)

// request is a decoded transmission request header.
type request struct {
	flags  uint16
	typ    uint16
	cookie uint64
	offset uint64
	length uint32
}

// errBadMagic is returned when a transmission request does not start with
// the request magic: the stream cannot be resynchronised.
var errBadMagic = errorString("nbd: bad request magic")

type errorString string

func (e errorString) Error() string { return string(e) }

// parseRequest decodes a 28-byte request header.
func parseRequest(b []byte) (request, error) {
	if len(b) < requestHeaderLen {
		return request{}, errorString("nbd: short request header")
	}
	if binary.BigEndian.Uint32(b[0:4]) != requestMagic {
		return request{}, errBadMagic
	}
	return request{
		flags:  binary.BigEndian.Uint16(b[4:6]),
		typ:    binary.BigEndian.Uint16(b[6:8]),
		cookie: binary.BigEndian.Uint64(b[8:16]),
		offset: binary.BigEndian.Uint64(b[16:24]),
		length: binary.BigEndian.Uint32(b[24:28]),
	}, nil
}

// appendRequest encodes r (used by tests and the test client).
func appendRequest(b []byte, r request) []byte {
	b = binary.BigEndian.AppendUint32(b, requestMagic)
	b = binary.BigEndian.AppendUint16(b, r.flags)
	b = binary.BigEndian.AppendUint16(b, r.typ)
	b = binary.BigEndian.AppendUint64(b, r.cookie)
	b = binary.BigEndian.AppendUint64(b, r.offset)
	return binary.BigEndian.AppendUint32(b, r.length)
}

// putReply encodes a simple reply header into b[:16].
func putReply(b []byte, errno uint32, cookie uint64) {
	binary.BigEndian.PutUint32(b[0:4], simpleReplyMagic)
	binary.BigEndian.PutUint32(b[4:8], errno)
	binary.BigEndian.PutUint64(b[8:16], cookie)
}

// nbdError maps a Go error from a backend or Mutator to an NBD error value.
func nbdError(err error) uint32 {
	switch Errno(err) {
	case syscall.EPERM, syscall.EACCES, syscall.EROFS:
		return nbdEPERM
	case syscall.ENOMEM:
		return nbdENOMEM
	case syscall.EINVAL:
		return nbdEINVAL
	case syscall.ENOSPC, syscall.EDQUOT, syscall.EFBIG:
		return nbdENOSPC
	case syscall.EOVERFLOW:
		return nbdEOVERFLOW
	case syscall.ENOTSUP:
		return nbdENOTSUP
	case syscall.ESHUTDOWN:
		return nbdESHUTDOWN
	}
	return nbdEIO
}

func cmdName(t uint16) string {
	switch t {
	case cmdRead:
		return "read"
	case cmdWrite:
		return "write"
	case cmdDisc:
		return "disc"
	case cmdFlush:
		return "flush"
	case cmdTrim:
		return "trim"
	case cmdWriteZeroes:
		return "write-zeroes"
	}
	return "unknown"
}
