package heartbeat

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"os"
	"strings"
	"testing"
)

// TestSipHashVectors checks sipHash against the 64 reference vectors
// (testdata/siphash24-vectors.txt), every length from 0 to 63 bytes.
func TestSipHashVectors(t *testing.T) {
	f, err := os.Open("testdata/siphash24-vectors.txt")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var key Key
	for i := range key {
		key[i] = byte(i)
	}
	k0, k1 := key.halves()
	n := 0
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		want, err := hex.DecodeString(line)
		if err != nil || len(want) != 8 {
			t.Fatalf("vector %d: %q", n, line)
		}
		msg := make([]byte, n)
		for i := range msg {
			msg[i] = byte(i)
		}
		got := binary.LittleEndian.AppendUint64(nil, sipHash(k0, k1, msg))
		if !bytes.Equal(got, want) {
			t.Errorf("SipHash-2-4 of %d bytes = %x, want %x", n, got, want)
		}
		n++
	}
	if n != 64 {
		t.Fatalf("%d vectors, want 64", n)
	}
}

// testKey derives a key or fails.
func testKey(t testing.TB, secret, job, sender string) Key {
	t.Helper()
	k, err := DeriveKey(secret, job, sender)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// TestPacketGolden pins the version 2 encoding, the key derivation and the
// MAC: one heartbeat, byte for byte (testdata/heartbeat-v2.txt).
func TestPacketGolden(t *testing.T) {
	p := Packet{Job: JobIDOf("web"), Incarnation: 1_760_000_000, Seq: 42, Epoch: 7}
	p.Sign(testKey(t, "s3cret", "web", "vm1"))
	b, err := p.MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	golden, err := os.ReadFile("testdata/heartbeat-v2.txt")
	if err != nil {
		t.Fatal(err)
	}
	var want string
	for _, l := range strings.Split(string(golden), "\n") {
		if l = strings.TrimSpace(l); l != "" && !strings.HasPrefix(l, "#") {
			want += l
		}
	}
	if got := hex.EncodeToString(b); got != want {
		t.Fatalf("heartbeat\n got %s\nwant %s", got, want)
	}
	if b[4] != Version || binary.BigEndian.Uint16(b[6:]) != Len || len(b) != Len {
		t.Fatalf("header %x", b[:8])
	}
}

func TestPacketVerify(t *testing.T) {
	k := testKey(t, "s3cret", "web", "vm1")
	p := Packet{Job: JobIDOf("web"), Incarnation: 5, Seq: 9, Epoch: 2}
	p.Sign(k)
	if !p.Verify(k) {
		t.Fatal("signed packet does not verify")
	}
	for name, other := range map[string]Key{
		"other direction": testKey(t, "s3cret", "web", "vm2"),
		"other job":       testKey(t, "s3cret", "db", "vm1"),
		"other secret":    testKey(t, "s3cret2", "web", "vm1"),
	} {
		if other == k {
			t.Fatalf("%s: same key", name)
		}
		if p.Verify(other) {
			t.Errorf("verified under the %s's key", name)
		}
	}
	for name, mod := range map[string]func(*Packet){
		"job": func(q *Packet) { q.Job[0]++ }, "incarnation": func(q *Packet) { q.Incarnation++ },
		"seq": func(q *Packet) { q.Seq++ }, "epoch": func(q *Packet) { q.Epoch++ }, "mac": func(q *Packet) { q.MAC[7]++ },
	} {
		q := p
		mod(&q)
		if q.Verify(k) {
			t.Errorf("changed %s still verifies", name)
		}
	}
	if _, err := DeriveKey("", "web", "vm1"); err == nil {
		t.Error("DeriveKey accepted an empty secret")
	}
}

func TestPacketDecodeErrors(t *testing.T) {
	good, _ := Packet{Seq: 1}.MarshalBinary()
	mod := func(f func(b []byte) []byte) []byte { return f(bytes.Clone(good)) }
	for _, tc := range []struct {
		name string
		b    []byte
		want error
	}{
		{"empty", nil, ErrShort},
		{"header only", good[:8], ErrShort},
		{"truncated", good[:Len-1], ErrShort},
		{"trailing", append(bytes.Clone(good), 0), ErrMalformed},
		{"magic", mod(func(b []byte) []byte { b[0] = 'X'; return b }), ErrMagic},
		{"version 1", mod(func(b []byte) []byte { b[4] = 1; return b }), ErrVersion},
		{"version 3", mod(func(b []byte) []byte { b[4] = 3; return b }), ErrVersion},
		{"flags", mod(func(b []byte) []byte { b[5] = 1; return b }), ErrMalformed},
		{"length field", mod(func(b []byte) []byte { b[7] = Len + 1; return b }), ErrMalformed},
	} {
		var p Packet
		if err := p.UnmarshalBinary(tc.b); !errors.Is(err, tc.want) {
			t.Errorf("%s: got %v, want %v", tc.name, err, tc.want)
		}
	}
}

// FuzzPacket: decoding never panics, and whatever decodes re-encodes to
// the same bytes (decode∘encode is identity in both directions); a
// decoded packet verifies exactly when its MAC is the one its key gives.
func FuzzPacket(f *testing.F) {
	k := testKey(f, "s3cret", "web", "vm1")
	for _, p := range []Packet{{}, {Job: JobIDOf("web"), Incarnation: 1, Seq: 2, Epoch: 3}, {Incarnation: ^uint64(0), Seq: ^uint64(0), Epoch: ^uint64(0)}} {
		p.Sign(k)
		b, _ := p.MarshalBinary()
		f.Add(b)
	}
	f.Add([]byte("DPHB"))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, b []byte) {
		var p Packet
		if err := p.UnmarshalBinary(b); err != nil {
			return
		}
		out, err := p.MarshalBinary()
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(out, b) {
			t.Fatalf("re-encoded %x, input %x", out, b)
		}
		var p2 Packet
		if err := p2.UnmarshalBinary(out); err != nil || p2 != p {
			t.Fatalf("round trip %+v %v, want %+v", p2, err, p)
		}
		signed := p
		signed.Sign(k)
		if p.Verify(k) != (signed.MAC == p.MAC) {
			t.Fatalf("Verify disagrees with Sign for %x", b)
		}
	})
}

func BenchmarkSignVerify(b *testing.B) {
	k := testKey(b, "s3cret", "web", "vm1")
	p := Packet{Job: JobIDOf("web"), Incarnation: 1, Epoch: 3}
	b.ReportAllocs()
	for b.Loop() {
		p.Seq++
		p.Sign(k)
		if !p.Verify(k) {
			b.Fatal("does not verify")
		}
	}
}

// BenchmarkVerify is the receiving side's MAC check of one heartbeat (what
// the userspace fallback does per heartbeat besides the decode).
func BenchmarkVerify(b *testing.B) {
	k := testKey(b, "s3cret", "web", "vm1")
	p := Packet{Job: JobIDOf("web"), Incarnation: 1, Seq: 1, Epoch: 3}
	p.Sign(k)
	b.ReportAllocs()
	for b.Loop() {
		if !p.Verify(k) {
			b.Fatal("does not verify")
		}
	}
}
