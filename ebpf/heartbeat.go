package ebpf

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// Default ports (DESIGN.md §4).
const (
	HeartbeatPort   = 6326 // UDP, heartbeats
	ReplicationPort = 6325 // TCP, replication stream; its packets count as liveness
)

// Heartbeat wire format, version 1 (48 bytes, integers big-endian):
//
//	off len field
//	  0   4 magic "DPHB"
//	  4   1 version (1)
//	  5   1 flags (0; reserved)
//	  6   2 length of the whole heartbeat (48)
//	  8   8 token (per connection, agreed over the TLS channel)
//	 16   8 sequence number (1, 2, 3... per sender)
//	 24   8 generation of the sender's copy
//	 32  16 job ID
//
// probe.c reads magic, version, token and sequence at these offsets: change
// them together (and bump the version).
const (
	HeartbeatLen     = 48
	HeartbeatVersion = 1
)

var heartbeatMagic = [4]byte{'D', 'P', 'H', 'B'}

// Decoding errors.
var (
	ErrShort     = errors.New("heartbeat: too short")
	ErrMagic     = errors.New("heartbeat: bad magic")
	ErrVersion   = errors.New("heartbeat: unsupported version")
	ErrMalformed = errors.New("heartbeat: malformed")
)

// Heartbeat is one heartbeat message. It holds wire fields only.
type Heartbeat struct {
	Token      uint64
	Seq        uint64
	Generation uint64
	Job        [16]byte
}

// AppendBinary appends the encoded heartbeat to b.
func (h Heartbeat) AppendBinary(b []byte) ([]byte, error) {
	b = append(b, heartbeatMagic[:]...)
	b = append(b, HeartbeatVersion, 0)
	b = binary.BigEndian.AppendUint16(b, HeartbeatLen)
	b = binary.BigEndian.AppendUint64(b, h.Token)
	b = binary.BigEndian.AppendUint64(b, h.Seq)
	b = binary.BigEndian.AppendUint64(b, h.Generation)
	return append(b, h.Job[:]...), nil
}

// MarshalBinary encodes the heartbeat.
func (h Heartbeat) MarshalBinary() ([]byte, error) {
	return h.AppendBinary(make([]byte, 0, HeartbeatLen))
}

// UnmarshalBinary decodes a heartbeat. Decoding is strict (exact length,
// reserved bits zero), so a decoded heartbeat re-encodes to the same bytes.
func (h *Heartbeat) UnmarshalBinary(b []byte) error {
	if len(b) < 8 {
		return ErrShort
	}
	if [4]byte(b[:4]) != heartbeatMagic {
		return ErrMagic
	}
	if b[4] != HeartbeatVersion {
		return fmt.Errorf("%w %d", ErrVersion, b[4])
	}
	if b[5] != 0 {
		return fmt.Errorf("%w: flags %#x", ErrMalformed, b[5])
	}
	if n := binary.BigEndian.Uint16(b[6:]); n != HeartbeatLen {
		return fmt.Errorf("%w: length field %d", ErrMalformed, n)
	}
	if len(b) != HeartbeatLen {
		if len(b) < HeartbeatLen {
			return ErrShort
		}
		return fmt.Errorf("%w: %d trailing bytes", ErrMalformed, len(b)-HeartbeatLen)
	}
	h.Token = binary.BigEndian.Uint64(b[8:])
	h.Seq = binary.BigEndian.Uint64(b[16:])
	h.Generation = binary.BigEndian.Uint64(b[24:])
	h.Job = [16]byte(b[32:48])
	return nil
}
