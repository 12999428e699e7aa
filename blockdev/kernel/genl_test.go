package kernel

import (
	"bytes"
	"encoding/binary"
	"reflect"
	"testing"
)

func TestConnectRequestRoundTrip(t *testing.T) {
	for _, r := range []connectRequest{
		{Index: -1, Size: 1 << 30, BlockSize: 4096, ServerFlags: 0x16d, FDs: []uint32{7}},
		{Index: 3, Size: 512, BlockSize: 512, ServerFlags: 1, TimeoutSec: 30, DeadConnTimeout: 10, FDs: []uint32{3, 4, 5, 6}, BackendID: "doppel:/var/lib/x"},
	} {
		got, err := decodeConnectRequest(r.encode())
		if err != nil {
			t.Fatal(err)
		}
		if !reflect.DeepEqual(*got, r) {
			t.Errorf("round trip:\n got %+v\nwant %+v", *got, r)
		}
	}
}

// TestConnectRequestLayout pins the exact bytes of one request against the
// kernel's nbd-netlink.h numbering.
func TestConnectRequestLayout(t *testing.T) {
	r := connectRequest{Index: 2, Size: 4096, BlockSize: 4096, ServerFlags: 0x16d, FDs: []uint32{9}}
	b := r.encode()
	u16 := func(v uint16) []byte { return binary.NativeEndian.AppendUint16(nil, v) }
	u32 := func(v uint32) []byte { return binary.NativeEndian.AppendUint32(nil, v) }
	u64 := func(v uint64) []byte { return binary.NativeEndian.AppendUint64(nil, v) }
	var want []byte
	want = append(want, u16(8)...)
	want = append(want, u16(1)...) // NBD_ATTR_INDEX
	want = append(want, u32(2)...)
	for _, a := range []struct {
		typ uint16
		v   uint64
	}{{2, 4096}, {3, 4096}, {5, 0x16d}} { // SIZE_BYTES, BLOCK_SIZE_BYTES, SERVER_FLAGS
		want = append(want, u16(12)...)
		want = append(want, u16(a.typ)...)
		want = append(want, u64(a.v)...)
	}
	want = append(want, u16(4+4+8)...)
	want = append(want, u16(7|1<<15)...) // NBD_ATTR_SOCKETS, nested
	want = append(want, u16(4+8)...)
	want = append(want, u16(1|1<<15)...) // NBD_SOCK_ITEM, nested
	want = append(want, u16(8)...)
	want = append(want, u16(1)...) // NBD_SOCK_FD
	want = append(want, u32(9)...)
	if !bytes.Equal(b, want) {
		t.Errorf("encoding:\n got %x\nwant %x", b, want)
	}
}

func TestDecodeStatusReply(t *testing.T) {
	item := func(i uint32, c byte) []byte {
		var in []byte
		in = appendU32(in, deviceIndex, i)
		in = appendAttr(in, deviceConnected, []byte{c})
		return appendNested(nil, deviceItem, in)
	}
	b := appendNested(nil, attrDeviceList, append(item(0, 1), item(5, 0)...))
	got, err := decodeStatusReply(b)
	if err != nil {
		t.Fatal(err)
	}
	want := []deviceStatus{{0, true}, {5, false}}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("got %+v, want %+v", got, want)
	}
	idx, err := decodeIndexReply(appendU32(nil, attrIndex, 7))
	if err != nil || idx != 7 {
		t.Errorf("index reply: %d, %v", idx, err)
	}
	if _, err := decodeIndexReply(nil); err == nil {
		t.Error("empty index reply accepted")
	}
}

func TestParseAttrsMalformed(t *testing.T) {
	for _, b := range [][]byte{
		{1},                       // short header
		{3, 0, 1, 0},              // length below header
		{12, 0, 1, 0, 0, 0, 0, 0}, // length beyond buffer
	} {
		if _, err := parseAttrs(b); err == nil {
			t.Errorf("%x: accepted", b)
		}
	}
}

// FuzzDecode: the reply and request decoders never panic, and a decoded
// request re-encodes to something that decodes the same.
func FuzzDecode(f *testing.F) {
	f.Add((&connectRequest{Index: 1, Size: 1 << 20, BlockSize: 512, ServerFlags: 0x16d, FDs: []uint32{3, 4}, BackendID: "x"}).encode())
	f.Add(appendNested(nil, attrDeviceList, appendNested(nil, deviceItem, appendU32(nil, deviceIndex, 1))))
	f.Add(appendU32(nil, attrIndex, 0))
	f.Add([]byte{4, 0, 0x87, 0})
	f.Fuzz(func(t *testing.T, b []byte) {
		decodeStatusReply(b)
		decodeIndexReply(b)
		r, err := decodeConnectRequest(b)
		if err != nil {
			return
		}
		r2, err := decodeConnectRequest(r.encode())
		if err != nil {
			t.Fatalf("re-decode: %v", err)
		}
		if r.BackendID != "" && bytes.IndexByte([]byte(r.BackendID), 0) >= 0 {
			return // an embedded NUL legitimately truncates on the wire
		}
		if len(r.FDs) == 0 && len(r2.FDs) == 0 {
			r.FDs, r2.FDs = nil, nil
		}
		if !reflect.DeepEqual(r, r2) {
			t.Fatalf("re-encode changed the request:\n%+v\n%+v", r, r2)
		}
	})
}
