package heartbeat

import (
	"crypto/hkdf"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/binary"
	"errors"
	"fmt"
)

// Port is the default heartbeat port (UDP; DESIGN.md §4).
const Port = 6326

// Heartbeat wire format, version 2 (56 bytes, integers big-endian):
//
//	off len field
//	  0   4 magic "DPHB"
//	  4   1 version (2)
//	  5   1 flags (0; reserved)
//	  6   2 length of the whole heartbeat (56)
//	  8  16 job ID (JobIDOf: the first 16 bytes of SHA-256 of the job name)
//	 24   8 sender incarnation (grows at every start of the sending agent)
//	 32   8 sequence number (1, 2, 3... per incarnation)
//	 40   8 the sender's epoch (failover fencing token)
//	 48   8 MAC: SipHash-2-4 of bytes 0-47 under the sender's key for the
//	        job (DeriveKey), as the reference implementation outputs it
//	        (the 64-bit value, little-endian)
//
// probe.c reads these offsets: change them together (and the version).
const (
	Len     = 56
	Version = 2
	macOff  = 48
)

var magic = [4]byte{'D', 'P', 'H', 'B'}

// Decoding errors.
var (
	ErrShort     = errors.New("heartbeat: too short")
	ErrMagic     = errors.New("heartbeat: bad magic")
	ErrVersion   = errors.New("heartbeat: unsupported version")
	ErrMalformed = errors.New("heartbeat: malformed")
)

// JobID identifies a job in heartbeats.
type JobID [16]byte

// JobIDOf is the job ID of the named job.
func JobIDOf(name string) JobID {
	h := sha256.Sum256([]byte(name))
	return JobID(h[:16])
}

// Key is a SipHash-2-4 key: one per job and direction (sender).
type Key [16]byte

func (k Key) halves() (k0, k1 uint64) {
	return binary.LittleEndian.Uint64(k[:8]), binary.LittleEndian.Uint64(k[8:])
}

// keySalt separates heartbeat keys from anything else derived from a
// job's secret.
const keySalt = "doppel heartbeat v2"

// DeriveKey is the key with which sender's heartbeats for job are
// authenticated: HKDF-SHA256 of the job's secret, info naming the job and
// the sender. Each side derives its own sending key and its peer's, so a
// heartbeat reflected back to its sender, or sent for another job, fails
// verification.
func DeriveKey(secret, job, sender string) (Key, error) {
	if secret == "" {
		return Key{}, errors.New("heartbeat key: the job has no secret")
	}
	b, err := hkdf.Key(sha256.New, []byte(secret), []byte(keySalt), "job="+job+"\x00sender="+sender, len(Key{}))
	if err != nil {
		return Key{}, fmt.Errorf("derive heartbeat key: %w", err)
	}
	return Key(b), nil
}

// Packet is one heartbeat. It holds wire fields only.
type Packet struct {
	Job         JobID
	Incarnation uint64
	Seq         uint64
	Epoch       uint64
	MAC         [8]byte
}

// header encodes the fields the MAC covers.
func (p *Packet) header() [macOff]byte {
	var b [macOff]byte
	copy(b[:], magic[:])
	b[4] = Version
	binary.BigEndian.PutUint16(b[6:], Len)
	copy(b[8:], p.Job[:])
	binary.BigEndian.PutUint64(b[24:], p.Incarnation)
	binary.BigEndian.PutUint64(b[32:], p.Seq)
	binary.BigEndian.PutUint64(b[40:], p.Epoch)
	return b
}

func (p *Packet) mac(k Key) [8]byte {
	h := p.header()
	k0, k1 := k.halves()
	var m [8]byte
	binary.LittleEndian.PutUint64(m[:], sipHash(k0, k1, h[:]))
	return m
}

// Sign sets the MAC for key k.
func (p *Packet) Sign(k Key) { p.MAC = p.mac(k) }

// Verify reports whether the MAC is the one key k gives (in constant time).
func (p *Packet) Verify(k Key) bool {
	m := p.mac(k)
	return subtle.ConstantTimeCompare(m[:], p.MAC[:]) == 1
}

// AppendBinary appends the encoded heartbeat (with its MAC as it is) to b.
func (p Packet) AppendBinary(b []byte) ([]byte, error) {
	h := p.header()
	b = append(b, h[:]...)
	return append(b, p.MAC[:]...), nil
}

// MarshalBinary encodes the heartbeat.
func (p Packet) MarshalBinary() ([]byte, error) { return p.AppendBinary(make([]byte, 0, Len)) }

// UnmarshalBinary decodes a heartbeat without verifying it. Decoding is
// strict (exact length, reserved bits zero), so a decoded heartbeat
// re-encodes to the same bytes.
func (p *Packet) UnmarshalBinary(b []byte) error {
	if len(b) < 8 {
		return ErrShort
	}
	if [4]byte(b[:4]) != magic {
		return ErrMagic
	}
	if b[4] != Version {
		return fmt.Errorf("%w %d", ErrVersion, b[4])
	}
	if b[5] != 0 {
		return fmt.Errorf("%w: flags %#x", ErrMalformed, b[5])
	}
	if n := binary.BigEndian.Uint16(b[6:]); n != Len {
		return fmt.Errorf("%w: length field %d", ErrMalformed, n)
	}
	if len(b) != Len {
		if len(b) < Len {
			return ErrShort
		}
		return fmt.Errorf("%w: %d trailing bytes", ErrMalformed, len(b)-Len)
	}
	p.Job = JobID(b[8:24])
	p.Incarnation = binary.BigEndian.Uint64(b[24:])
	p.Seq = binary.BigEndian.Uint64(b[32:])
	p.Epoch = binary.BigEndian.Uint64(b[40:])
	p.MAC = [8]byte(b[macOff:Len])
	return nil
}
