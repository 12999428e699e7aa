package wire

import (
	"fmt"
	"strings"
	"sync"

	"github.com/klauspost/compress/zstd"
	"github.com/pierrec/lz4/v4"
)

// Payload encoding (the last field of Write and MirrorData):
//
//	codec  uint8  (0 none, 1 zstd, 2 lz4)
//	rawLen uint32 (bytes after decompression, ≤ MaxData)
//	bytes         (the rest of the body)
const (
	codecNone uint8 = 0
	codecZstd uint8 = 1
	codecLZ4  uint8 = 2
)

// Codec compresses payloads on encode. A nil *Codec sends them raw. The
// decoder accepts every codec whatever the local setting. A Codec is safe
// for concurrent use.
type Codec struct {
	id   uint8
	zenc *zstd.Encoder
}

// NewCodec returns the codec named "zstd", "lz4", or nil for "" / "none".
func NewCodec(name string) (*Codec, error) {
	switch strings.ToLower(name) {
	case "", "none", "off":
		return nil, nil
	case "zstd":
		enc, err := zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.SpeedFastest), zstd.WithEncoderConcurrency(1))
		if err != nil {
			return nil, fmt.Errorf("zstd encoder: %w", err)
		}
		return &Codec{id: codecZstd, zenc: enc}, nil
	case "lz4":
		return &Codec{id: codecLZ4}, nil
	}
	return nil, fmt.Errorf("unknown compression %q (want none, zstd or lz4)", name)
}

// String names the codec.
func (c *Codec) String() string {
	if c == nil {
		return "none"
	}
	if c.id == codecZstd {
		return "zstd"
	}
	return "lz4"
}

func appendPayload(b, data []byte, c *Codec) []byte {
	if c != nil && len(data) >= 512 {
		start := len(b)
		b = append(b, c.id)
		b = be32(b, uint32(len(data)))
		hdr := len(b)
		switch c.id {
		case codecZstd:
			b = c.zenc.EncodeAll(data, b)
		case codecLZ4:
			bound := lz4.CompressBlockBound(len(data))
			b = growTo(b, hdr+bound)
			n, err := lz4.CompressBlock(data, b[hdr:hdr+bound], nil)
			if err != nil || n == 0 {
				n = bound // incompressible: falls back to raw below
			}
			b = b[:hdr+n]
		}
		if len(b)-hdr < len(data) {
			return b
		}
		b = b[:start] // incompressible: send raw
	}
	b = append(b, codecNone)
	b = be32(b, uint32(len(data)))
	return append(b, data...)
}

func growTo(b []byte, n int) []byte {
	if cap(b) < n {
		nb := make([]byte, len(b), n)
		copy(nb, b)
		b = nb
	}
	return b[:n]
}

var zstdDecoder = sync.OnceValues(func() (*zstd.Decoder, error) {
	return zstd.NewReader(nil, zstd.WithDecoderConcurrency(0), zstd.WithDecoderMaxMemory(MaxData),
		zstd.WithDecoderMaxWindow(MaxData))
})

// payload decodes the payload encoding; it is the last field of a body.
func (d *body) payload() []byte {
	codec := d.u8()
	raw := d.u32()
	if d.err != nil {
		return nil
	}
	if raw > MaxData {
		d.fail("payload of %d bytes", raw)
		return nil
	}
	rest := d.take(len(d.b))
	switch codec {
	case codecNone:
		if len(rest) != int(raw) {
			d.fail("payload length %d, have %d", raw, len(rest))
			return nil
		}
		return rest
	case codecZstd:
		dec, err := zstdDecoder()
		if err != nil {
			d.fail("zstd: %v", err)
			return nil
		}
		out, err := dec.DecodeAll(rest, make([]byte, 0, raw))
		if err != nil || len(out) != int(raw) {
			d.fail("zstd payload: %v (got %d bytes, want %d)", err, len(out), raw)
			return nil
		}
		return out
	case codecLZ4:
		out := make([]byte, raw)
		n, err := lz4.UncompressBlock(rest, out)
		if err != nil || n != int(raw) {
			d.fail("lz4 payload: %v (got %d bytes, want %d)", err, n, raw)
			return nil
		}
		return out
	}
	d.fail("unknown codec %d", codec)
	return nil
}
