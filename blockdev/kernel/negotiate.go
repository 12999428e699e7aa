package kernel

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"

	"github.com/pojntfx/go-nbd/pkg/protocol"
)

// The kernel speaks only the transmission phase, so — like nbd-client — the
// handshake is done here, in userspace, on the socket the kernel will take
// over: fixed newstyle, NBD_OPT_GO for one export.

const (
	nbdMagic      = protocol.NEGOTIATION_MAGIC_OLDSTYLE // "NBDMAGIC"
	optMagic      = protocol.NEGOTIATION_MAGIC_OPTION   // "IHAVEOPT"
	optReplyMagic = protocol.NEGOTIATION_MAGIC_REPLY

	hsFixedNewstyle = 1 << 0
	hsNoZeroes      = 1 << 1

	optGo = protocol.NEGOTIATION_ID_OPTION_GO

	repAck  = protocol.NEGOTIATION_TYPE_REPLY_ACK
	repInfo = protocol.NEGOTIATION_TYPE_REPLY_INFO
	repErr  = 1 << 31

	infoExport    = protocol.NEGOTIATION_TYPE_INFO_EXPORT
	infoBlockSize = protocol.NEGOTIATION_TYPE_INFO_BLOCKSIZE

	maxReplyLen = 64 << 10 // more than any reply to NBD_OPT_GO needs
)

// exportInfo is what the server said about the export.
type exportInfo struct {
	Size     uint64
	Flags    uint16 // transmission flags
	MinBlock uint32 // 0 when the server sent no NBD_INFO_BLOCK_SIZE
	PrefBlock,
	MaxBlock uint32
}

// ErrNegotiation wraps a server's refusal or a malformed handshake.
var ErrNegotiation = errors.New("nbd negotiation failed")

// negotiate runs the client side of the handshake on rw and leaves it in the
// transmission phase of export name.
func negotiate(rw io.ReadWriter, name string) (exportInfo, error) {
	var info exportInfo
	var g [18]byte
	if _, err := io.ReadFull(rw, g[:]); err != nil {
		return info, fmt.Errorf("%w: read greeting: %w", ErrNegotiation, err)
	}
	if binary.BigEndian.Uint64(g[0:8]) != nbdMagic || binary.BigEndian.Uint64(g[8:16]) != optMagic {
		return info, fmt.Errorf("%w: not a newstyle NBD server (greeting %x)", ErrNegotiation, g[:16])
	}
	hs := binary.BigEndian.Uint16(g[16:18])
	if hs&hsFixedNewstyle == 0 {
		return info, fmt.Errorf("%w: server does not speak fixed newstyle", ErrNegotiation)
	}
	if len(name) > 4096 {
		return info, fmt.Errorf("%w: export name longer than 4096 bytes", ErrNegotiation)
	}
	cf := uint32(hsFixedNewstyle)
	if hs&hsNoZeroes != 0 {
		cf |= hsNoZeroes
	}
	var req []byte
	req = binary.BigEndian.AppendUint32(req, cf)
	req = binary.BigEndian.AppendUint64(req, optMagic)
	req = binary.BigEndian.AppendUint32(req, optGo)
	req = binary.BigEndian.AppendUint32(req, uint32(4+len(name)+2+2))
	req = binary.BigEndian.AppendUint32(req, uint32(len(name)))
	req = append(req, name...)
	req = binary.BigEndian.AppendUint16(req, 1) // one information request:
	req = binary.BigEndian.AppendUint16(req, infoBlockSize)
	if _, err := rw.Write(req); err != nil {
		return info, fmt.Errorf("%w: send NBD_OPT_GO: %w", ErrNegotiation, err)
	}
	gotExport := false
	for {
		var h [20]byte
		if _, err := io.ReadFull(rw, h[:]); err != nil {
			return info, fmt.Errorf("%w: read option reply: %w", ErrNegotiation, err)
		}
		if m := binary.BigEndian.Uint64(h[0:8]); m != optReplyMagic {
			return info, fmt.Errorf("%w: bad option reply magic %#x", ErrNegotiation, m)
		}
		if o := binary.BigEndian.Uint32(h[8:12]); o != optGo {
			return info, fmt.Errorf("%w: reply to option %d, want %d", ErrNegotiation, o, optGo)
		}
		typ := binary.BigEndian.Uint32(h[12:16])
		n := binary.BigEndian.Uint32(h[16:20])
		if n > maxReplyLen {
			return info, fmt.Errorf("%w: %d-byte option reply", ErrNegotiation, n)
		}
		data := make([]byte, n)
		if _, err := io.ReadFull(rw, data); err != nil {
			return info, fmt.Errorf("%w: read option reply: %w", ErrNegotiation, err)
		}
		switch {
		case typ&repErr != 0:
			return info, fmt.Errorf("%w: server refused export %q (error %d): %s", ErrNegotiation, name, typ&^repErr, printable(data))
		case typ == repAck:
			if !gotExport {
				return info, fmt.Errorf("%w: server sent no export size", ErrNegotiation)
			}
			return info, nil
		case typ == repInfo:
			if err := info.parse(data); err != nil {
				return info, err
			}
			gotExport = gotExport || (len(data) >= 2 && binary.BigEndian.Uint16(data) == infoExport)
		}
		// Other reply types are skipped, as the protocol allows.
	}
}

// parse reads one NBD_REP_INFO payload.
func (e *exportInfo) parse(b []byte) error {
	if len(b) < 2 {
		return fmt.Errorf("%w: short NBD_REP_INFO", ErrNegotiation)
	}
	switch binary.BigEndian.Uint16(b) {
	case infoExport:
		if len(b) != 12 {
			return fmt.Errorf("%w: NBD_INFO_EXPORT of %d bytes", ErrNegotiation, len(b))
		}
		e.Size = binary.BigEndian.Uint64(b[2:10])
		e.Flags = binary.BigEndian.Uint16(b[10:12])
	case infoBlockSize:
		if len(b) != 14 {
			return fmt.Errorf("%w: NBD_INFO_BLOCK_SIZE of %d bytes", ErrNegotiation, len(b))
		}
		e.MinBlock = binary.BigEndian.Uint32(b[2:6])
		e.PrefBlock = binary.BigEndian.Uint32(b[6:10])
		e.MaxBlock = binary.BigEndian.Uint32(b[10:14])
	}
	return nil
}

func printable(b []byte) string {
	if len(b) > 200 {
		b = b[:200]
	}
	out := make([]rune, 0, len(b))
	for _, r := range string(b) {
		if r < 0x20 || r == 0x7f {
			r = '?'
		}
		out = append(out, r)
	}
	return string(out)
}
