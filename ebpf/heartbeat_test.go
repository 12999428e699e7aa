package ebpf

import (
	"bytes"
	"errors"
	"testing"
)

func TestHeartbeatLayout(t *testing.T) {
	h := Heartbeat{Token: 0x0102030405060708, Seq: 9, Generation: 0xaabb, Job: [16]byte{15: 0x77}}
	b, err := h.MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	want := []byte{
		'D', 'P', 'H', 'B', 1, 0, 0, 48,
		1, 2, 3, 4, 5, 6, 7, 8,
		0, 0, 0, 0, 0, 0, 0, 9,
		0, 0, 0, 0, 0, 0, 0xaa, 0xbb,
		0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x77,
	}
	if !bytes.Equal(b, want) {
		t.Fatalf("encoded\n%x\nwant\n%x", b, want)
	}
	var got Heartbeat
	if err := got.UnmarshalBinary(b); err != nil || got != h {
		t.Fatalf("decoded %+v, %v; want %+v", got, err, h)
	}
}

func TestHeartbeatDecodeErrors(t *testing.T) {
	good, _ := Heartbeat{Seq: 1}.MarshalBinary()
	mod := func(f func(b []byte) []byte) []byte { return f(bytes.Clone(good)) }
	for _, tc := range []struct {
		name string
		b    []byte
		want error
	}{
		{"empty", nil, ErrShort},
		{"header only", good[:8], ErrShort},
		{"truncated", good[:47], ErrShort},
		{"trailing", append(bytes.Clone(good), 0), ErrMalformed},
		{"magic", mod(func(b []byte) []byte { b[0] = 'X'; return b }), ErrMagic},
		{"version 2", mod(func(b []byte) []byte { b[4] = 2; return b }), ErrVersion},
		{"flags", mod(func(b []byte) []byte { b[5] = 1; return b }), ErrMalformed},
		{"length field", mod(func(b []byte) []byte { b[7] = 49; return b }), ErrMalformed},
	} {
		var h Heartbeat
		if err := h.UnmarshalBinary(tc.b); !errors.Is(err, tc.want) {
			t.Errorf("%s: got %v, want %v", tc.name, err, tc.want)
		}
	}
}

// FuzzHeartbeat: decoding never panics, and whatever decodes re-encodes to
// the same bytes (decode∘encode is identity in both directions).
func FuzzHeartbeat(f *testing.F) {
	for _, h := range []Heartbeat{{}, {Token: 1, Seq: 2, Generation: 3, Job: [16]byte{1, 2, 3}}, {Token: ^uint64(0), Seq: ^uint64(0)}} {
		b, _ := h.MarshalBinary()
		f.Add(b)
	}
	f.Add([]byte("DPHB"))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, b []byte) {
		var h Heartbeat
		if err := h.UnmarshalBinary(b); err != nil {
			return
		}
		out, err := h.MarshalBinary()
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(out, b) {
			t.Fatalf("re-encoded %x, input %x", out, b)
		}
		var h2 Heartbeat
		if err := h2.UnmarshalBinary(out); err != nil || h2 != h {
			t.Fatalf("round trip %+v %v, want %+v", h2, err, h)
		}
	})
}
