package wire

import (
	"bytes"
	"errors"
	"io"
	"reflect"
	"testing"
)

var testCodecs = func() map[string]*Codec {
	m := map[string]*Codec{}
	for _, name := range []string{"none", "zstd", "lz4"} {
		c, err := NewCodec(name)
		if err != nil {
			panic(err)
		}
		m[name] = c
	}
	return m
}()

func sampleFrames() []Frame {
	data := bytes.Repeat([]byte("doppel replicates "), 300)
	return []Frame{
		&Hello{MinVersion: 1, MaxVersion: 3, Mode: ModeSync, StreamID: 0xfeed, BaseSeq: 7, VolumeSize: 1 << 30, ChunkSize: 65536},
		&Hello{MinVersion: 1, MaxVersion: 1, Mode: ModeAsync, ChunkSize: 4096},
		&Welcome{Version: 1, StreamID: 9, Applied: 41, VolumeSize: 1 << 20, State: StateConsistent},
		&Welcome{Version: 1, State: StateInconsistent},
		&Write{Seq: 1, Offset: 4096, FUA: true, Data: []byte{1, 2, 3}},
		&Write{Seq: 2, Offset: 0, Data: data},
		&Write{Seq: 3, Data: []byte{}},
		&Trim{Seq: 4, Offset: 8192, Length: 1 << 20, FUA: true},
		&Zeroes{Seq: 5, Offset: 1, Length: 2, NoHole: true},
		&Zeroes{Seq: 6, Offset: 1, Length: 2, FUA: true, NoHole: true},
		&Flush{Seq: 7},
		&Ack{Applied: 7, Durable: 6},
		&MirrorData{Seq: 8, Offset: 65536, Purpose: PurposeMirror, Data: data},
		&MirrorData{Seq: 9, Offset: 0, Purpose: PurposeResync, Data: []byte{9}},
		&MirrorHole{Seq: 10, Offset: 0, Length: 1 << 30, Purpose: PurposeMirror},
		&MirrorState{Seq: 11, Phase: PhaseBegin, Purpose: PurposeMirror, Total: 1 << 30},
		&MirrorState{Seq: 12, Phase: PhaseEnd, Purpose: PurposeResync},
		&SumRequest{Seq: 13, Offset: 1 << 20, ChunkSize: 65536, Count: 128, Purpose: PurposeVerify},
		&SumReply{Seq: 13, Offset: 1 << 20, ChunkSize: 65536, Sums: []Sum{{1, 2, 3}, {15: 0xff}}},
		&SumReply{Seq: 14, ChunkSize: 512, Sums: []Sum{}},
		&Error{Code: CodeVersion, Message: "no common protocol version"},
		&Bye{Reason: "shutting down"},
		&Bye{},
		&Keepalive{Seq: 1},
		&Keepalive{Seq: ^uint64(0)},
	}
}

// roundTrip checks that f survives encode → decode with every codec and
// that the raw encoding is canonical.
func roundTrip(t *testing.T, f Frame) {
	t.Helper()
	raw, err := Encode(f)
	if err != nil {
		t.Fatalf("encode %#v: %v", f, err)
	}
	for _, name := range []string{"none", "zstd", "lz4"} {
		c := testCodecs[name]
		b, err := Append(nil, f, c)
		if err != nil {
			t.Fatalf("encode %v with %s: %v", f.Type(), name, err)
		}
		g, err := Decode(b)
		if err != nil {
			t.Fatalf("decode %v (%s): %v", f.Type(), name, err)
		}
		if !reflect.DeepEqual(f, g) {
			t.Fatalf("%s: decode(encode(f)) = %#v, want %#v", name, g, f)
		}
		again, err := Encode(g)
		if err != nil || !bytes.Equal(again, raw) {
			t.Fatalf("%s: re-encoding differs (%v)", name, err)
		}
	}
}

func TestRoundTrip(t *testing.T) {
	for _, f := range sampleFrames() {
		roundTrip(t, f)
	}
}

func TestCompressionShrinks(t *testing.T) {
	data := bytes.Repeat([]byte("abcdefgh"), 8192)
	raw, _ := Encode(&Write{Seq: 1, Data: data})
	for _, name := range []string{"zstd", "lz4"} {
		c, _ := NewCodec(name)
		b, err := Append(nil, &Write{Seq: 1, Data: data}, c)
		if err != nil {
			t.Fatal(err)
		}
		if len(b) >= len(raw)/4 {
			t.Errorf("%s: %d bytes for %d of repetitive data", name, len(b), len(data))
		}
	}
}

func TestReaderStream(t *testing.T) {
	var buf bytes.Buffer
	frames := sampleFrames()
	c, _ := NewCodec("lz4")
	for _, f := range frames {
		b, err := Append(nil, f, c)
		if err != nil {
			t.Fatal(err)
		}
		buf.Write(b)
	}
	total := int64(buf.Len())
	r := NewReader(&buf)
	for _, want := range frames {
		got, err := r.Read()
		if err != nil {
			t.Fatal(err)
		}
		if !reflect.DeepEqual(got, want) {
			t.Fatalf("read %#v, want %#v", got, want)
		}
	}
	if _, err := r.Read(); err != io.EOF {
		t.Fatalf("after last frame: %v, want EOF", err)
	}
	if r.N != total {
		t.Fatalf("N = %d, want %d", r.N, total)
	}
}

func TestRejects(t *testing.T) {
	hello, _ := Encode(&Hello{MinVersion: 1, MaxVersion: 1, Mode: ModeSync, ChunkSize: 65536})
	badMagic := append([]byte(nil), hello...)
	copy(badMagic[5:], "HTTP/1.1")
	trailing := append(append([]byte(nil), hello...), 0)
	trailing[3]++
	badChunk, _ := Encode(&Hello{MinVersion: 1, MaxVersion: 1, Mode: ModeSync, ChunkSize: 3000})
	write, _ := Encode(&Write{Seq: 1, Data: []byte{1, 2}})
	badFlags := append([]byte(nil), write...)
	badFlags[5+16] = 0x80
	huge := []byte{0xff, 0xff, 0xff, 0xff, byte(TypeWrite)}
	for name, b := range map[string][]byte{
		"magic": badMagic, "trailing": trailing, "chunk": badChunk, "flags": badFlags,
		"huge": huge, "short": {0, 0}, "type": {0, 0, 0, 1, 99}, "empty-hello": {0, 0, 0, 1, 1},
		"short-keepalive": {0, 0, 0, 8, 15, 0, 0, 0, 0, 0, 0, 1}, "long-keepalive": {0, 0, 0, 10, 15, 0, 0, 0, 0, 0, 0, 0, 1, 0},
	} {
		if _, err := Decode(b); !errors.Is(err, ErrMalformed) {
			t.Errorf("%s: err = %v, want ErrMalformed", name, err)
		}
	}
	if _, err := NewReader(bytes.NewReader(huge)).Read(); !errors.Is(err, ErrTooLarge) {
		t.Errorf("reader huge: %v", err)
	}
	if _, err := Encode(&Write{Data: make([]byte, MaxData+1)}); !errors.Is(err, ErrTooLarge) {
		t.Errorf("encode oversize write: %v", err)
	}
}

func FuzzDecode(f *testing.F) {
	for _, fr := range sampleFrames() {
		for _, name := range []string{"none", "zstd", "lz4"} {
			c, _ := NewCodec(name)
			b, err := Append(nil, fr, c)
			if err != nil {
				f.Fatal(err)
			}
			f.Add(b)
		}
	}
	f.Add([]byte("GET / HTTP/1.1\r\n\r\n"))
	f.Fuzz(func(t *testing.T, b []byte) {
		fr, err := Decode(b)
		if err != nil {
			if fr != nil {
				t.Fatal("frame returned with error")
			}
			return
		}
		roundTrip(t, fr)
		// A frame that was sent raw re-encodes to the very same bytes.
		if again, _ := Encode(fr); !bytes.Equal(again, b) && !compressed(b) {
			t.Fatalf("non-canonical raw encoding accepted: %x vs %x", b, again)
		}
	})
}

func FuzzReader(f *testing.F) {
	var stream []byte
	for _, fr := range sampleFrames() {
		b, _ := Encode(fr)
		stream = append(stream, b...)
	}
	f.Add(stream)
	f.Add([]byte{0, 0, 0, 5, 6, 0, 0, 0, 0})
	f.Fuzz(func(t *testing.T, b []byte) {
		r := NewReader(bytes.NewReader(b))
		for range 1000 {
			fr, err := r.Read()
			if err != nil {
				return
			}
			roundTrip(t, fr)
		}
	})
}

// compressed reports whether a Write or MirrorData frame carries a
// compressed payload.
func compressed(b []byte) bool {
	var off int
	switch Type(b[4]) {
	case TypeWrite:
		off = 5 + 17
	case TypeMirrorData:
		off = 5 + 17
	default:
		return false
	}
	return len(b) > off && b[off] != codecNone
}

func BenchmarkEncodeWrite(b *testing.B) {
	f := &Write{Seq: 1, Offset: 4096, Data: make([]byte, 64<<10)}
	buf := make([]byte, 0, 128<<10)
	b.SetBytes(int64(len(f.Data)))
	b.ReportAllocs()
	for b.Loop() {
		buf, _ = Append(buf[:0], f, nil)
	}
}

func TestReaderReuse(t *testing.T) {
	var buf bytes.Buffer
	for _, f := range sampleFrames() {
		b, _ := Encode(f)
		buf.Write(b)
	}
	r := NewReader(&buf)
	r.Reuse = true
	for _, want := range sampleFrames() {
		got, err := r.Read()
		if err != nil {
			t.Fatal(err)
		}
		if !reflect.DeepEqual(got, want) {
			t.Fatalf("read %#v, want %#v", got, want)
		}
	}
}

func TestAppendParts(t *testing.T) {
	for _, f := range sampleFrames() {
		for name, c := range testCodecs {
			whole, err := Append([]byte("prefix"), f, c)
			if err != nil {
				t.Fatal(err)
			}
			b, tail, err := AppendParts([]byte("prefix"), f, c)
			if err != nil {
				t.Fatal(err)
			}
			if got := append(append([]byte(nil), b...), tail...); !bytes.Equal(got, whole) {
				t.Fatalf("%v/%s: parts differ from Append", f.Type(), name)
			}
		}
	}
}
