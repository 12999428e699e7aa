// Package wire is doppel's replication protocol: versioned, length-prefixed
// binary frames exchanged between a replication source and its target over
// one TCP (normally TLS 1.3) connection.
//
// Every frame is
//
//	length uint32 (big endian; bytes that follow: type + body)
//	type   uint8
//	body   (type specific, big-endian integers, no padding)
//
// The first frame on a connection is [Hello] (source → target), answered by
// [Welcome] or [Error]. After that the source sends sequenced frames
// ([Write], [Trim], [Zeroes], [Flush], [MirrorData], [MirrorHole],
// [MirrorState], [SumRequest]) whose Seq numbers increase by exactly one, and
// the target answers with [Ack] and [SumReply]. Either side may send [Error]
// or [Bye] and close.
//
// Version 2 adds [Keepalive]: in a session that negotiated version 2 or
// later, each side sends one when it has sent nothing for a keepalive
// interval, so that a peer that hears nothing for its timeout knows the
// session is dead (a blackholed link) instead of waiting for TCP to give
// up. Version 1 peers never receive one.
//
// Decoding is strict: unknown types, unknown flag bits, trailing bytes and
// lengths beyond the fixed bounds ([MaxFrame], [MaxData], [MaxSums],
// [MaxText]) are errors, so that for every frame f accepted by [Decode],
// encoding it again yields the same bytes. Frame structs are plain data: they
// hold no connections, buffers or locks.
package wire

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

// Magic opens every Hello: it tells a doppel replication peer from anything
// else that connects to the port.
const Magic = "DOPPELRP"

// Protocol versions this package speaks.
const (
	MinVersion uint16 = 1
	MaxVersion uint16 = 2
)

// KeepaliveVersion is the first protocol version with [Keepalive] frames.
const KeepaliveVersion uint16 = 2

// Bounds enforced by the decoder.
const (
	MaxData  = 4 << 20             // bytes of payload in one Write or MirrorData
	MaxSums  = 16384               // checksums in one SumReply
	MaxText  = 1024                // bytes of an Error or Bye message
	MaxFrame = MaxData + 64        // bytes after the length prefix
	SumSize  = 16                  // bytes of one chunk checksum (xxh3-128)
	headerSz = 5                   // length + type
	maxChunk = 1 << 24             // largest chunk size a peer may ask for
	maxCount = MaxSums             // chunks in one SumRequest
	minChunk = 512                 // smallest chunk size
	_        = maxChunk * maxCount // keep the product in int range
)

// Type identifies a frame.
type Type uint8

// Frame types. Values are part of the protocol: never renumber.
const (
	TypeHello       Type = 1
	TypeWelcome     Type = 2
	TypeWrite       Type = 3
	TypeTrim        Type = 4
	TypeZeroes      Type = 5
	TypeFlush       Type = 6
	TypeAck         Type = 7
	TypeMirrorData  Type = 8
	TypeMirrorHole  Type = 9
	TypeMirrorState Type = 10
	TypeSumRequest  Type = 11
	TypeSumReply    Type = 12
	TypeError       Type = 13
	TypeBye         Type = 14
	TypeKeepalive   Type = 15 // version 2
)

func (t Type) String() string {
	switch t {
	case TypeHello:
		return "hello"
	case TypeWelcome:
		return "welcome"
	case TypeWrite:
		return "write"
	case TypeTrim:
		return "trim"
	case TypeZeroes:
		return "zeroes"
	case TypeFlush:
		return "flush"
	case TypeAck:
		return "ack"
	case TypeMirrorData:
		return "mirror-data"
	case TypeMirrorHole:
		return "mirror-hole"
	case TypeMirrorState:
		return "mirror-state"
	case TypeSumRequest:
		return "sum-request"
	case TypeSumReply:
		return "sum-reply"
	case TypeError:
		return "error"
	case TypeBye:
		return "bye"
	case TypeKeepalive:
		return "keepalive"
	}
	return fmt.Sprintf("type(%d)", uint8(t))
}

// Frame is one protocol message.
type Frame interface {
	Type() Type
	// appendBody appends the body encoding (without length and type).
	appendBody(b []byte, c *Codec) ([]byte, error)
}

// Sequenced is a frame that occupies a slot in the replication stream.
type Sequenced interface {
	Frame
	Sequence() uint64
}

// Errors returned by the decoder. Every decode error wraps ErrMalformed.
var (
	ErrMalformed = errors.New("malformed frame")
	ErrTooLarge  = fmt.Errorf("%w: too large", ErrMalformed)
)

// Mode is the replication mode announced in Hello.
type Mode uint8

// Replication modes.
const (
	ModeSync  Mode = 1 // ack after the target applied (DRBD protocol C)
	ModeAsync Mode = 2 // ack after queued locally (DRBD protocol A)
)

func (m Mode) String() string {
	switch m {
	case ModeSync:
		return "sync"
	case ModeAsync:
		return "async"
	}
	return fmt.Sprintf("mode(%d)", uint8(m))
}

// Hello opens a connection (source → target).
type Hello struct {
	MinVersion, MaxVersion uint16
	Mode                   Mode
	StreamID               uint64 // identifies the source's sequence stream
	BaseSeq                uint64 // first sequence the source can (re)send, minus one
	VolumeSize             uint64
	ChunkSize              uint32 // checksum / mirror chunk size
}

// Data state of a target volume.
const (
	StateConsistent   uint8 = 1 // a prefix of the source's history
	StateInconsistent uint8 = 2 // mid mirror or resync
)

// Welcome accepts a Hello (target → source).
type Welcome struct {
	Version    uint16 // chosen version
	StreamID   uint64 // the stream the target last applied from (0: none)
	Applied    uint64 // last sequence of StreamID applied
	VolumeSize uint64
	State      uint8 // StateConsistent or StateInconsistent
}

// Write is an application write.
type Write struct {
	Seq    uint64
	Offset uint64
	FUA    bool
	Data   []byte
}

// Trim is an application discard.
type Trim struct {
	Seq, Offset, Length uint64
	FUA                 bool
}

// Zeroes is an application write-zeroes.
type Zeroes struct {
	Seq, Offset, Length uint64
	FUA, NoHole         bool
}

// Flush is a barrier: everything before it must be durable on the target
// before it is acknowledged.
type Flush struct{ Seq uint64 }

// Ack reports the target's progress (target → source): every sequenced frame
// up to Applied is applied, and up to Durable is also fsynced.
type Ack struct{ Applied, Durable uint64 }

// Purpose says why a mirror frame or checksum request was sent.
type Purpose uint8

// Purposes (and metric kinds).
const (
	PurposeMirror Purpose = 1 // initial full or differential mirror
	PurposeResync Purpose = 2 // repairing ranges (after verify, or by bitmap)
	PurposeVerify Purpose = 3 // checksum compare only
)

func (p Purpose) String() string {
	switch p {
	case PurposeMirror:
		return "mirror"
	case PurposeResync:
		return "resync"
	case PurposeVerify:
		return "verify"
	}
	return fmt.Sprintf("purpose(%d)", uint8(p))
}

func (p Purpose) valid() bool { return p >= PurposeMirror && p <= PurposeVerify }

// MirrorData carries a range read from the source during a mirror or resync.
type MirrorData struct {
	Seq     uint64
	Offset  uint64
	Purpose Purpose
	Data    []byte
}

// MirrorHole says a range is zero on the source (the target punches a hole).
type MirrorHole struct {
	Seq, Offset, Length uint64
	Purpose             Purpose
}

// MirrorState phases.
const (
	PhaseBegin uint8 = 1 // target becomes inconsistent
	PhaseEnd   uint8 = 2 // target fsyncs and becomes consistent
)

// MirrorState marks the start or end of a mirror/resync pass.
type MirrorState struct {
	Seq     uint64
	Phase   uint8
	Purpose Purpose
	Total   uint64 // bytes the pass covers (informational)
}

// SumRequest asks the target for checksums of Count chunks starting at
// Offset, taken at this point of the stream.
type SumRequest struct {
	Seq       uint64
	Offset    uint64
	ChunkSize uint32
	Count     uint32
	Purpose   Purpose
}

// Sum is the xxh3-128 checksum of one chunk (big endian hi, lo).
type Sum [SumSize]byte

// SumReply answers a SumRequest (target → source). A chunk that extends past
// the end of the volume is hashed up to the end.
type SumReply struct {
	Seq       uint64 // the request's sequence
	Offset    uint64
	ChunkSize uint32
	Sums      []Sum
}

// Error codes.
const (
	CodeProtocol uint16 = 1 // malformed or unexpected frame
	CodeVersion  uint16 = 2 // no common protocol version
	CodeVolume   uint16 = 3 // volume size or chunk size mismatch
	CodeIO       uint16 = 4 // the target failed to apply
	CodeStream   uint16 = 5 // sequence stream cannot be resumed
	CodeBusy     uint16 = 6 // another source is connected
)

// Error reports a fatal condition; the sender closes the connection after it.
type Error struct {
	Code    uint16
	Message string
}

func (e *Error) Error() string { return fmt.Sprintf("peer error %d: %s", e.Code, e.Message) }

// Bye closes a connection cleanly.
type Bye struct{ Reason string }

// Keepalive (either direction, protocol version 2) proves the session
// alive when its sender has nothing else to send. Seq counts the sender's
// keepalives in the session from 1 (informational).
type Keepalive struct{ Seq uint64 }

func (*Hello) Type() Type       { return TypeHello }
func (*Welcome) Type() Type     { return TypeWelcome }
func (*Write) Type() Type       { return TypeWrite }
func (*Trim) Type() Type        { return TypeTrim }
func (*Zeroes) Type() Type      { return TypeZeroes }
func (*Flush) Type() Type       { return TypeFlush }
func (*Ack) Type() Type         { return TypeAck }
func (*MirrorData) Type() Type  { return TypeMirrorData }
func (*MirrorHole) Type() Type  { return TypeMirrorHole }
func (*MirrorState) Type() Type { return TypeMirrorState }
func (*SumRequest) Type() Type  { return TypeSumRequest }
func (*SumReply) Type() Type    { return TypeSumReply }
func (*Error) Type() Type       { return TypeError }
func (*Bye) Type() Type         { return TypeBye }
func (*Keepalive) Type() Type   { return TypeKeepalive }

func (f *Write) Sequence() uint64       { return f.Seq }
func (f *Trim) Sequence() uint64        { return f.Seq }
func (f *Zeroes) Sequence() uint64      { return f.Seq }
func (f *Flush) Sequence() uint64       { return f.Seq }
func (f *MirrorData) Sequence() uint64  { return f.Seq }
func (f *MirrorHole) Sequence() uint64  { return f.Seq }
func (f *MirrorState) Sequence() uint64 { return f.Seq }
func (f *SumRequest) Sequence() uint64  { return f.Seq }

// Append appends the encoding of f (length prefix included) to dst, with
// payloads compressed by c when that makes them smaller.
func Append(dst []byte, f Frame, c *Codec) ([]byte, error) {
	start := len(dst)
	dst = append(dst, 0, 0, 0, 0, byte(f.Type()))
	dst, err := f.appendBody(dst, c)
	if err != nil {
		return dst[:start], err
	}
	n := len(dst) - start - 4
	if n > MaxFrame {
		return dst[:start], fmt.Errorf("encode %v: %w", f.Type(), ErrTooLarge)
	}
	binary.BigEndian.PutUint32(dst[start:], uint32(n))
	return dst, nil
}

// AppendParts is Append without copying a raw payload: the encoding of f
// is b followed by tail (tail aliases the frame's data; it is empty unless
// f is a Write or MirrorData sent uncompressed).
func AppendParts(dst []byte, f Frame, c *Codec) (b, tail []byte, err error) {
	var data []byte
	switch f := f.(type) {
	case *Write:
		if c == nil {
			data = f.Data
			g := *f
			g.Data = nil
			b, err = Append(dst, &g, nil)
		}
	case *MirrorData:
		if c == nil {
			data = f.Data
			g := *f
			g.Data = nil
			b, err = Append(dst, &g, nil)
		}
	}
	if data == nil {
		b, err = Append(dst, f, c)
		return b, nil, err
	}
	if err != nil {
		return b, nil, err
	}
	start := len(dst)
	n := binary.BigEndian.Uint32(b[start:]) + uint32(len(data))
	if len(data) > MaxData || n > MaxFrame {
		return dst, nil, fmt.Errorf("encode %v: %w", f.Type(), ErrTooLarge)
	}
	binary.BigEndian.PutUint32(b[start:], n)
	binary.BigEndian.PutUint32(b[len(b)-4:], uint32(len(data)))
	return b, data, nil
}

// Encode returns the encoding of f without compression.
func Encode(f Frame) ([]byte, error) { return Append(nil, f, nil) }

// Decode decodes one whole frame (length prefix included). Payloads alias b.
func Decode(b []byte) (Frame, error) {
	if len(b) < headerSz {
		return nil, fmt.Errorf("%w: short header", ErrMalformed)
	}
	n := binary.BigEndian.Uint32(b)
	if n > MaxFrame {
		return nil, ErrTooLarge
	}
	if int(n) != len(b)-4 {
		return nil, fmt.Errorf("%w: length %d, have %d bytes", ErrMalformed, n, len(b)-4)
	}
	return decodeBody(Type(b[4]), b[headerSz:])
}

// Reader reads frames from a stream.
type Reader struct {
	r   *bufio.Reader
	hdr [headerSz]byte
	// N counts the bytes read so far.
	N int64
	// Reuse makes Read decode every frame into one buffer: a frame's
	// payload is then valid only until the next Read.
	Reuse bool
	buf   []byte
}

// NewReader returns a frame reader on r.
func NewReader(r io.Reader) *Reader { return &Reader{r: bufio.NewReaderSize(r, 256<<10)} }

// Buffered reports how many bytes are read ahead (0: the next Read may
// wait for the network).
func (r *Reader) Buffered() int { return r.r.Buffered() }

// Read reads the next frame. Unless Reuse is set, each frame's payload is
// freshly allocated, so it stays valid after later reads.
func (r *Reader) Read() (Frame, error) {
	if _, err := io.ReadFull(r.r, r.hdr[:]); err != nil {
		return nil, err
	}
	n := binary.BigEndian.Uint32(r.hdr[:])
	if n > MaxFrame {
		return nil, fmt.Errorf("frame of %d bytes: %w", n, ErrTooLarge)
	}
	if n < 1 {
		return nil, fmt.Errorf("%w: empty frame", ErrMalformed)
	}
	var body []byte
	if r.Reuse {
		if cap(r.buf) < int(n-1) {
			r.buf = make([]byte, n-1)
		}
		body = r.buf[:n-1]
	} else {
		body = make([]byte, n-1)
	}
	if _, err := io.ReadFull(r.r, body); err != nil {
		return nil, fmt.Errorf("read %v body: %w", Type(r.hdr[4]), noEOF(err))
	}
	r.N += int64(n) + 4
	return decodeBody(Type(r.hdr[4]), body)
}

func noEOF(err error) error {
	if err == io.EOF {
		return io.ErrUnexpectedEOF
	}
	return err
}

// body is a cursor over a frame body.
type body struct {
	b   []byte
	err error
}

func (d *body) fail(format string, a ...any) {
	if d.err == nil {
		d.err = fmt.Errorf("%w: %s", ErrMalformed, fmt.Sprintf(format, a...))
	}
}

func (d *body) take(n int) []byte {
	if d.err != nil {
		return nil
	}
	if n < 0 || len(d.b) < n {
		d.fail("short body")
		return nil
	}
	v := d.b[:n:n]
	d.b = d.b[n:]
	return v
}

func (d *body) u8() uint8 {
	if v := d.take(1); v != nil {
		return v[0]
	}
	return 0
}

func (d *body) u16() uint16 {
	if v := d.take(2); v != nil {
		return binary.BigEndian.Uint16(v)
	}
	return 0
}

func (d *body) u32() uint32 {
	if v := d.take(4); v != nil {
		return binary.BigEndian.Uint32(v)
	}
	return 0
}

func (d *body) u64() uint64 {
	if v := d.take(8); v != nil {
		return binary.BigEndian.Uint64(v)
	}
	return 0
}

func (d *body) text() string {
	n := d.u16()
	if n > MaxText {
		d.fail("text of %d bytes", n)
		return ""
	}
	return string(d.take(int(n)))
}

func (d *body) flags(allowed uint8) uint8 {
	f := d.u8()
	if f&^allowed != 0 {
		d.fail("unknown flags %#x", f&^allowed)
	}
	return f
}

func (d *body) purpose() Purpose {
	p := Purpose(d.u8())
	if d.err == nil && !p.valid() {
		d.fail("unknown purpose %d", p)
	}
	return p
}

func (d *body) end() error {
	if d.err == nil && len(d.b) != 0 {
		d.fail("%d trailing bytes", len(d.b))
	}
	return d.err
}

const (
	flagFUA    = 1 << 0
	flagNoHole = 1 << 1
)

func boolFlag(v bool, f uint8) uint8 {
	if v {
		return f
	}
	return 0
}

func be16(b []byte, v uint16) []byte { return binary.BigEndian.AppendUint16(b, v) }
func be32(b []byte, v uint32) []byte { return binary.BigEndian.AppendUint32(b, v) }
func be64(b []byte, v uint64) []byte { return binary.BigEndian.AppendUint64(b, v) }

func appendText(b []byte, s string) ([]byte, error) {
	if len(s) > MaxText {
		return b, fmt.Errorf("text of %d bytes: %w", len(s), ErrTooLarge)
	}
	return append(be16(b, uint16(len(s))), s...), nil
}

func (f *Hello) appendBody(b []byte, _ *Codec) ([]byte, error) {
	b = append(b, Magic...)
	b = be16(b, f.MinVersion)
	b = be16(b, f.MaxVersion)
	b = append(b, byte(f.Mode))
	b = be64(b, f.StreamID)
	b = be64(b, f.BaseSeq)
	b = be64(b, f.VolumeSize)
	return be32(b, f.ChunkSize), nil
}

func (f *Welcome) appendBody(b []byte, _ *Codec) ([]byte, error) {
	b = be16(b, f.Version)
	b = be64(b, f.StreamID)
	b = be64(b, f.Applied)
	b = be64(b, f.VolumeSize)
	return append(b, f.State), nil
}

func (f *Write) appendBody(b []byte, c *Codec) ([]byte, error) {
	if len(f.Data) > MaxData {
		return b, fmt.Errorf("write of %d bytes: %w", len(f.Data), ErrTooLarge)
	}
	b = be64(b, f.Seq)
	b = be64(b, f.Offset)
	b = append(b, boolFlag(f.FUA, flagFUA))
	return appendPayload(b, f.Data, c), nil
}

func (f *Trim) appendBody(b []byte, _ *Codec) ([]byte, error) {
	b = be64(b, f.Seq)
	b = be64(b, f.Offset)
	b = be64(b, f.Length)
	return append(b, boolFlag(f.FUA, flagFUA)), nil
}

func (f *Zeroes) appendBody(b []byte, _ *Codec) ([]byte, error) {
	b = be64(b, f.Seq)
	b = be64(b, f.Offset)
	b = be64(b, f.Length)
	return append(b, boolFlag(f.FUA, flagFUA)|boolFlag(f.NoHole, flagNoHole)), nil
}

func (f *Flush) appendBody(b []byte, _ *Codec) ([]byte, error) { return be64(b, f.Seq), nil }

func (f *Ack) appendBody(b []byte, _ *Codec) ([]byte, error) {
	return be64(be64(b, f.Applied), f.Durable), nil
}

func (f *MirrorData) appendBody(b []byte, c *Codec) ([]byte, error) {
	if len(f.Data) > MaxData {
		return b, fmt.Errorf("mirror data of %d bytes: %w", len(f.Data), ErrTooLarge)
	}
	if !f.Purpose.valid() {
		return b, fmt.Errorf("encode mirror data: %w: purpose %d", ErrMalformed, f.Purpose)
	}
	b = be64(b, f.Seq)
	b = be64(b, f.Offset)
	b = append(b, byte(f.Purpose))
	return appendPayload(b, f.Data, c), nil
}

func (f *MirrorHole) appendBody(b []byte, _ *Codec) ([]byte, error) {
	if !f.Purpose.valid() {
		return b, fmt.Errorf("encode mirror hole: %w: purpose %d", ErrMalformed, f.Purpose)
	}
	b = be64(b, f.Seq)
	b = be64(b, f.Offset)
	b = be64(b, f.Length)
	return append(b, byte(f.Purpose)), nil
}

func (f *MirrorState) appendBody(b []byte, _ *Codec) ([]byte, error) {
	if !f.Purpose.valid() || (f.Phase != PhaseBegin && f.Phase != PhaseEnd) {
		return b, fmt.Errorf("encode mirror state: %w", ErrMalformed)
	}
	b = be64(b, f.Seq)
	b = append(b, f.Phase, byte(f.Purpose))
	return be64(b, f.Total), nil
}

func (f *SumRequest) appendBody(b []byte, _ *Codec) ([]byte, error) {
	if !f.Purpose.valid() {
		return b, fmt.Errorf("encode sum request: %w: purpose %d", ErrMalformed, f.Purpose)
	}
	b = be64(b, f.Seq)
	b = be64(b, f.Offset)
	b = be32(b, f.ChunkSize)
	b = be32(b, f.Count)
	return append(b, byte(f.Purpose)), nil
}

func (f *SumReply) appendBody(b []byte, _ *Codec) ([]byte, error) {
	if len(f.Sums) > MaxSums {
		return b, fmt.Errorf("%d sums: %w", len(f.Sums), ErrTooLarge)
	}
	b = be64(b, f.Seq)
	b = be64(b, f.Offset)
	b = be32(b, f.ChunkSize)
	b = be32(b, uint32(len(f.Sums)))
	for _, s := range f.Sums {
		b = append(b, s[:]...)
	}
	return b, nil
}

func (f *Error) appendBody(b []byte, _ *Codec) ([]byte, error) {
	return appendText(be16(b, f.Code), f.Message)
}

func (f *Bye) appendBody(b []byte, _ *Codec) ([]byte, error) { return appendText(b, f.Reason) }

func (f *Keepalive) appendBody(b []byte, _ *Codec) ([]byte, error) { return be64(b, f.Seq), nil }

func validChunk(d *body, c uint32) {
	if d.err == nil && (c < minChunk || c > maxChunk || c&(c-1) != 0) {
		d.fail("chunk size %d", c)
	}
}

func decodeBody(t Type, b []byte) (Frame, error) {
	d := &body{b: b}
	var f Frame
	switch t {
	case TypeHello:
		if m := d.take(len(Magic)); d.err == nil && string(m) != Magic {
			return nil, fmt.Errorf("%w: not a doppel replication peer (bad magic %q)", ErrMalformed, m)
		}
		h := &Hello{MinVersion: d.u16(), MaxVersion: d.u16(), Mode: Mode(d.u8()),
			StreamID: d.u64(), BaseSeq: d.u64(), VolumeSize: d.u64(), ChunkSize: d.u32()}
		if d.err == nil && (h.Mode != ModeSync && h.Mode != ModeAsync) {
			d.fail("unknown mode %d", h.Mode)
		}
		if d.err == nil && h.MinVersion > h.MaxVersion {
			d.fail("version range %d-%d", h.MinVersion, h.MaxVersion)
		}
		validChunk(d, h.ChunkSize)
		f = h
	case TypeWelcome:
		w := &Welcome{Version: d.u16(), StreamID: d.u64(), Applied: d.u64(), VolumeSize: d.u64(), State: d.u8()}
		if d.err == nil && w.State != StateConsistent && w.State != StateInconsistent {
			d.fail("unknown data state %d", w.State)
		}
		f = w
	case TypeWrite:
		w := &Write{Seq: d.u64(), Offset: d.u64()}
		w.FUA = d.flags(flagFUA) != 0
		w.Data = d.payload()
		f = w
	case TypeTrim:
		f = &Trim{Seq: d.u64(), Offset: d.u64(), Length: d.u64(), FUA: d.flags(flagFUA) != 0}
	case TypeZeroes:
		z := &Zeroes{Seq: d.u64(), Offset: d.u64(), Length: d.u64()}
		fl := d.flags(flagFUA | flagNoHole)
		z.FUA, z.NoHole = fl&flagFUA != 0, fl&flagNoHole != 0
		f = z
	case TypeFlush:
		f = &Flush{Seq: d.u64()}
	case TypeAck:
		f = &Ack{Applied: d.u64(), Durable: d.u64()}
	case TypeMirrorData:
		m := &MirrorData{Seq: d.u64(), Offset: d.u64(), Purpose: d.purpose()}
		m.Data = d.payload()
		f = m
	case TypeMirrorHole:
		f = &MirrorHole{Seq: d.u64(), Offset: d.u64(), Length: d.u64(), Purpose: d.purpose()}
	case TypeMirrorState:
		m := &MirrorState{Seq: d.u64(), Phase: d.u8()}
		if d.err == nil && m.Phase != PhaseBegin && m.Phase != PhaseEnd {
			d.fail("unknown phase %d", m.Phase)
		}
		m.Purpose = d.purpose()
		m.Total = d.u64()
		f = m
	case TypeSumRequest:
		r := &SumRequest{Seq: d.u64(), Offset: d.u64(), ChunkSize: d.u32(), Count: d.u32(), Purpose: d.purpose()}
		validChunk(d, r.ChunkSize)
		if d.err == nil && r.Count > maxCount {
			d.fail("%d chunks", r.Count)
		}
		f = r
	case TypeSumReply:
		r := &SumReply{Seq: d.u64(), Offset: d.u64(), ChunkSize: d.u32()}
		validChunk(d, r.ChunkSize)
		n := d.u32()
		if d.err == nil && n > MaxSums {
			d.fail("%d sums", n)
		}
		if d.err == nil && len(d.b) != int(n)*SumSize {
			d.fail("%d sums in %d bytes", n, len(d.b))
		}
		if d.err == nil {
			r.Sums = make([]Sum, n)
			for i := range r.Sums {
				copy(r.Sums[i][:], d.take(SumSize))
			}
		}
		f = r
	case TypeError:
		f = &Error{Code: d.u16(), Message: d.text()}
	case TypeBye:
		f = &Bye{Reason: d.text()}
	case TypeKeepalive:
		f = &Keepalive{Seq: d.u64()}
	default:
		return nil, fmt.Errorf("%w: unknown frame type %d", ErrMalformed, uint8(t))
	}
	if err := d.end(); err != nil {
		return nil, fmt.Errorf("decode %v: %w", t, err)
	}
	return f, nil
}
