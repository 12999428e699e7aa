package blockdev

import (
	"encoding/binary"
	"syscall"

	"github.com/doppelha/doppel/blockdev/nbdproto"
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
	// preferredBlock is advertised in NBD_INFO_BLOCK_SIZE.
	preferredBlock = 4096
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
	if len(b) < nbdproto.RequestHeaderLen {
		return request{}, errorString("nbd: short request header")
	}
	if binary.BigEndian.Uint32(b[0:4]) != nbdproto.RequestMagic {
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
	b = binary.BigEndian.AppendUint32(b, nbdproto.RequestMagic)
	b = binary.BigEndian.AppendUint16(b, r.flags)
	b = binary.BigEndian.AppendUint16(b, r.typ)
	b = binary.BigEndian.AppendUint64(b, r.cookie)
	b = binary.BigEndian.AppendUint64(b, r.offset)
	return binary.BigEndian.AppendUint32(b, r.length)
}

// putReply encodes a simple reply header into b[:16].
func putReply(b []byte, errno uint32, cookie uint64) {
	binary.BigEndian.PutUint32(b[0:4], nbdproto.SimpleReplyMagic)
	binary.BigEndian.PutUint32(b[4:8], errno)
	binary.BigEndian.PutUint64(b[8:16], cookie)
}

// nbdError maps a Go error from a backend or Mutator to an NBD error value.
func nbdError(err error) uint32 {
	switch Errno(err) {
	case syscall.EPERM, syscall.EACCES, syscall.EROFS:
		return nbdproto.EPERM
	case syscall.ENOMEM:
		return nbdproto.ENOMEM
	case syscall.EINVAL:
		return nbdproto.EINVAL
	case syscall.ENOSPC, syscall.EDQUOT, syscall.EFBIG:
		return nbdproto.ENOSPC
	case syscall.EOVERFLOW:
		return nbdproto.EOVERFLOW
	case syscall.ENOTSUP:
		return nbdproto.ENOTSUP
	case syscall.ESHUTDOWN:
		return nbdproto.ESHUTDOWN
	}
	return nbdproto.EIO
}

func cmdName(t uint16) string {
	switch t {
	case nbdproto.CmdRead:
		return "read"
	case nbdproto.CmdWrite:
		return "write"
	case nbdproto.CmdDisc:
		return "disc"
	case nbdproto.CmdFlush:
		return "flush"
	case nbdproto.CmdTrim:
		return "trim"
	case nbdproto.CmdWriteZeroes:
		return "write-zeroes"
	}
	return "unknown"
}
