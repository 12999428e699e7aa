package kernel

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// The kernel's generic-netlink nbd family (include/uapi/linux/nbd-netlink.h).
const (
	genlFamily  = "nbd"
	genlVersion = 1

	cmdConnect    = 1
	cmdDisconnect = 2
	cmdStatus     = 5

	attrIndex           = 1 // u32
	attrSizeBytes       = 2 // u64
	attrBlockSizeBytes  = 3 // u64
	attrTimeout         = 4 // u64, seconds
	attrServerFlags     = 5 // u64
	attrClientFlags     = 6 // u64
	attrSockets         = 7 // nested: sockItem{sockFD}
	attrDeadConnTimeout = 8 // u64, seconds
	attrDeviceList      = 9 // nested: deviceItem{deviceIndex, deviceConnected}
	attrBackendID       = 10

	sockItem = 1 // nested
	sockFD   = 1 // u32

	deviceItem      = 1 // nested
	deviceIndex     = 1 // u32
	deviceConnected = 2 // u8
)

// nlAttr is one netlink attribute: its type (without the nested and
// byte-order bits) and its payload.
type nlAttr struct {
	typ  uint16
	data []byte
}

const nlaHdrLen = 4

func nlaAlign(n int) int { return (n + 3) &^ 3 }

// appendAttr appends one attribute (header, payload, padding) to b.
func appendAttr(b []byte, typ uint16, data []byte) []byte {
	b = binary.NativeEndian.AppendUint16(b, uint16(nlaHdrLen+len(data)))
	b = binary.NativeEndian.AppendUint16(b, typ)
	b = append(b, data...)
	for len(b)%4 != 0 {
		b = append(b, 0)
	}
	return b
}

func appendU32(b []byte, typ uint16, v uint32) []byte {
	return appendAttr(b, typ, binary.NativeEndian.AppendUint32(nil, v))
}

func appendU64(b []byte, typ uint16, v uint64) []byte {
	return appendAttr(b, typ, binary.NativeEndian.AppendUint64(nil, v))
}

func appendNested(b []byte, typ uint16, inner []byte) []byte {
	const nlaFNested = 1 << 15
	return appendAttr(b, typ|nlaFNested, inner)
}

var errMalformed = errors.New("malformed netlink attributes")

// parseAttrs splits b into attributes. It never panics on any input.
func parseAttrs(b []byte) ([]nlAttr, error) {
	var out []nlAttr
	for len(b) > 0 {
		if len(b) < nlaHdrLen {
			return nil, fmt.Errorf("%w: %d trailing bytes", errMalformed, len(b))
		}
		l := int(binary.NativeEndian.Uint16(b))
		typ := binary.NativeEndian.Uint16(b[2:]) & 0x3fff
		if l < nlaHdrLen || l > len(b) {
			return nil, fmt.Errorf("%w: attribute %d has length %d of %d", errMalformed, typ, l, len(b))
		}
		out = append(out, nlAttr{typ: typ, data: b[nlaHdrLen:l]})
		b = b[min(nlaAlign(l), len(b)):]
	}
	return out, nil
}

func attrU32(a nlAttr) (uint32, error) {
	if len(a.data) < 4 {
		return 0, fmt.Errorf("%w: attribute %d: %d bytes for a u32", errMalformed, a.typ, len(a.data))
	}
	return binary.NativeEndian.Uint32(a.data), nil
}

// connectRequest is what NBD_CMD_CONNECT carries. It is a wire struct: no
// runtime state.
type connectRequest struct {
	Index           int32 // -1: the kernel picks a free device
	Size            uint64
	BlockSize       uint64
	ServerFlags     uint64
	TimeoutSec      uint64 // 0: not sent (the kernel waits forever)
	DeadConnTimeout uint64 // seconds; 0: not sent
	FDs             []uint32
	BackendID       string
}

// encode renders the attributes of the request (after the genl header).
func (r *connectRequest) encode() []byte {
	var b []byte
	if r.Index >= 0 {
		b = appendU32(b, attrIndex, uint32(r.Index))
	}
	b = appendU64(b, attrSizeBytes, r.Size)
	b = appendU64(b, attrBlockSizeBytes, r.BlockSize)
	b = appendU64(b, attrServerFlags, r.ServerFlags)
	if r.TimeoutSec > 0 {
		b = appendU64(b, attrTimeout, r.TimeoutSec)
	}
	if r.DeadConnTimeout > 0 {
		b = appendU64(b, attrDeadConnTimeout, r.DeadConnTimeout)
	}
	var socks []byte
	for _, fd := range r.FDs {
		socks = appendNested(socks, sockItem, appendU32(nil, sockFD, fd))
	}
	b = appendNested(b, attrSockets, socks)
	if r.BackendID != "" {
		b = appendAttr(b, attrBackendID, append([]byte(r.BackendID), 0))
	}
	return b
}

// decodeConnectRequest is the inverse of encode (used by the tests and the
// fuzzer to check that encoding is lossless).
func decodeConnectRequest(b []byte) (*connectRequest, error) {
	attrs, err := parseAttrs(b)
	if err != nil {
		return nil, err
	}
	r := &connectRequest{Index: -1}
	for _, a := range attrs {
		switch a.typ {
		case attrIndex:
			v, err := attrU32(a)
			if err != nil {
				return nil, err
			}
			if v > 1<<31-1 {
				return nil, fmt.Errorf("%w: device index %d", errMalformed, v)
			}
			r.Index = int32(v)
		case attrSizeBytes, attrBlockSizeBytes, attrServerFlags, attrTimeout, attrDeadConnTimeout:
			if len(a.data) < 8 {
				return nil, fmt.Errorf("%w: attribute %d: %d bytes for a u64", errMalformed, a.typ, len(a.data))
			}
			v := binary.NativeEndian.Uint64(a.data)
			switch a.typ {
			case attrSizeBytes:
				r.Size = v
			case attrBlockSizeBytes:
				r.BlockSize = v
			case attrServerFlags:
				r.ServerFlags = v
			case attrTimeout:
				r.TimeoutSec = v
			case attrDeadConnTimeout:
				r.DeadConnTimeout = v
			}
		case attrSockets:
			items, err := parseAttrs(a.data)
			if err != nil {
				return nil, err
			}
			for _, it := range items {
				inner, err := parseAttrs(it.data)
				if err != nil {
					return nil, err
				}
				for _, f := range inner {
					if f.typ == sockFD {
						fd, err := attrU32(f)
						if err != nil {
							return nil, err
						}
						r.FDs = append(r.FDs, fd)
					}
				}
			}
		case attrBackendID:
			s := a.data
			for len(s) > 0 && s[len(s)-1] == 0 {
				s = s[:len(s)-1]
			}
			r.BackendID = string(s)
		}
	}
	return r, nil
}

// decodeIndexReply reads NBD_ATTR_INDEX from the attributes of a
// NBD_CMD_CONNECT reply (after the genl header).
func decodeIndexReply(b []byte) (uint32, error) {
	attrs, err := parseAttrs(b)
	if err != nil {
		return 0, err
	}
	for _, a := range attrs {
		if a.typ == attrIndex {
			return attrU32(a)
		}
	}
	return 0, fmt.Errorf("%w: no device index in the reply", errMalformed)
}

// deviceStatus is one entry of a NBD_CMD_STATUS reply.
type deviceStatus struct {
	Index     uint32
	Connected bool
}

// decodeStatusReply reads the device list of a NBD_CMD_STATUS reply.
func decodeStatusReply(b []byte) ([]deviceStatus, error) {
	attrs, err := parseAttrs(b)
	if err != nil {
		return nil, err
	}
	var out []deviceStatus
	for _, a := range attrs {
		if a.typ != attrDeviceList {
			continue
		}
		items, err := parseAttrs(a.data)
		if err != nil {
			return nil, err
		}
		for _, it := range items {
			if it.typ != deviceItem {
				continue
			}
			fields, err := parseAttrs(it.data)
			if err != nil {
				return nil, err
			}
			var d deviceStatus
			for _, f := range fields {
				switch f.typ {
				case deviceIndex:
					if d.Index, err = attrU32(f); err != nil {
						return nil, err
					}
				case deviceConnected:
					if len(f.data) < 1 {
						return nil, fmt.Errorf("%w: empty connected flag", errMalformed)
					}
					d.Connected = f.data[0] != 0
				}
			}
			out = append(out, d)
		}
	}
	return out, nil
}

// genlHeader is the 4-byte generic netlink header that starts every message.
func genlHeader(cmd uint8) []byte { return []byte{cmd, genlVersion, 0, 0} }

// stripGenlHeader returns the attributes that follow a genl header.
func stripGenlHeader(msg []byte) ([]byte, error) {
	if len(msg) < 4 {
		return nil, fmt.Errorf("%w: %d-byte generic netlink message", errMalformed, len(msg))
	}
	return msg[4:], nil
}
