package blockdev

import (
	"encoding/binary"
	"errors"
	"io"
	"net"
	"slices"
	"testing"
	"time"

	"github.com/doppelha/doppel/blockdev/nbdclient"
	"github.com/doppelha/doppel/blockdev/nbdproto"
)

func TestNewServerValidates(t *testing.T) {
	m := newMem(4096)
	for name, exports := range map[string][]Export{
		"none":       nil,
		"no backend": {{Name: "a"}},
		"duplicate":  {{Name: "a", Backend: m}, {Name: "a", Backend: m}},
		"zero size":  {{Name: "a", Backend: newMem(0)}},
		"long name":  {{Name: string(make([]byte, 4097)), Backend: m}},
	} {
		if _, err := NewServer(nil, exports...); err == nil {
			t.Errorf("%s: NewServer accepted %v", name, exports)
		}
	}
}

func TestOptList(t *testing.T) {
	s := serve(t, Export{Name: "a", Description: "first", Backend: newMem(4096)}, Export{Name: "b", Backend: newMem(8192)})
	c := s.raw(t)
	names, err := nbdproto.List(c)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(names, []string{"a", "b"}) {
		t.Fatalf("NBD_OPT_LIST = %q, want [a b]", names)
	}
	// LIST with data is invalid; the connection stays usable.
	if err := nbdproto.SendOption(c, nbdproto.OptList, []byte("x")); err != nil {
		t.Fatal(err)
	}
	if _, typ, _, err := nbdproto.ReadOptionReply(c); err != nil || typ != nbdproto.RepErrInvalid {
		t.Fatalf("LIST with data: reply %#x, %v; want NBD_REP_ERR_INVALID", typ, err)
	}
	if names, err := nbdproto.List(c); err != nil || len(names) != 2 {
		t.Fatalf("second LIST: %q, %v", names, err)
	}
}

func TestOptInfoAndGo(t *testing.T) {
	s := serve(t,
		Export{Name: "rw", Description: "read-write volume", Backend: newMem(1 << 20)},
		Export{Name: "ro", Backend: newMem(4096), ReadOnly: true})
	c := s.raw(t)
	x, err := nbdproto.Info(c, "rw", false)
	if err != nil {
		t.Fatal(err)
	}
	want := nbdproto.Export{Name: "rw", Description: "read-write volume", Size: 1 << 20,
		Flags: nbdproto.FlagHasFlags | nbdproto.FlagSendFlush | nbdproto.FlagSendFUA | nbdproto.FlagSendTrim |
			nbdproto.FlagSendWriteZeroes | nbdproto.FlagCanMultiConn,
		MinBlock: 1, PrefBlock: 4096, MaxBlock: MaxPayload}
	if *x != want {
		t.Fatalf("NBD_OPT_INFO rw = %+v\nwant %+v", *x, want)
	}
	x, err = nbdproto.Info(c, "ro", false)
	if err != nil {
		t.Fatal(err)
	}
	if x.Flags != nbdproto.FlagHasFlags|nbdproto.FlagReadOnly|nbdproto.FlagSendFlush|nbdproto.FlagCanMultiConn {
		t.Fatalf("read-only flags = %#x", x.Flags)
	}
	// Unknown export: NBD_REP_ERR_UNKNOWN, and a two-export server does not
	// answer the default name.
	for _, name := range []string{"nope", ""} {
		_, err = nbdproto.Info(c, name, true)
		var oe *nbdproto.OptionError
		if !errors.As(err, &oe) || oe.Type != nbdproto.RepErrUnknown {
			t.Fatalf("GO %q: %v, want NBD_REP_ERR_UNKNOWN", name, err)
		}
	}
	// Malformed INFO data: NBD_REP_ERR_INVALID.
	for _, data := range [][]byte{
		{0, 0, 0},
		{0, 0, 0, 9, 'a', 0, 0},             // name longer than data
		{0, 0, 0, 1, 'a', 0, 2, 0, 1},       // 2 requests announced, 1 sent
		{0, 0, 0, 1, 'a', 0, 0, 0, 1, 0, 3}, // trailing bytes
	} {
		if err := nbdproto.SendOption(c, nbdproto.OptInfo, data); err != nil {
			t.Fatal(err)
		}
		if _, typ, _, err := nbdproto.ReadOptionReply(c); err != nil || typ != nbdproto.RepErrInvalid {
			t.Fatalf("INFO %x: reply %#x, %v; want NBD_REP_ERR_INVALID", data, typ, err)
		}
	}
	// GO enters transmission.
	x, err = nbdproto.Info(c, "rw", true)
	if err != nil || x.Size != 1<<20 {
		t.Fatalf("GO rw: %+v, %v", x, err)
	}
	cl := nbdclient.NewTransmission(c, *x)
	if err := cl.Flush(); err != nil {
		t.Fatal(err)
	}
}

func TestDefaultExportName(t *testing.T) {
	m := newMem(4096)
	s := serve(t, Export{Name: "only", Backend: m})
	for _, name := range []string{"only", ""} {
		cl := s.dial(t, name)
		if cl.Export.Size != 4096 {
			t.Fatalf("%q: size %d", name, cl.Export.Size)
		}
		if _, err := cl.WriteAt([]byte("hi"), 0); err != nil {
			t.Fatal(err)
		}
	}
	c := s.raw(t)
	if _, err := nbdproto.Info(c, "other", false); err == nil {
		t.Fatal("unknown name accepted by a one-export server")
	}
}

func TestUnsupportedOptions(t *testing.T) {
	s := serve(t, Export{Name: "a", Backend: newMem(4096)})
	c := s.raw(t)
	for _, opt := range []uint32{nbdproto.OptStartTLS, nbdproto.OptStructuredReply, 9, 10, 11, 42, 1 << 30} {
		if err := nbdproto.SendOption(c, opt, []byte("payload")); err != nil {
			t.Fatal(err)
		}
		o, typ, msg, err := nbdproto.ReadOptionReply(c)
		if err != nil || o != opt || typ != nbdproto.RepErrUnsup {
			t.Fatalf("option %d: reply opt %d type %#x (%s), %v; want NBD_REP_ERR_UNSUP", opt, o, typ, msg, err)
		}
	}
	if _, err := nbdproto.Info(c, "a", true); err != nil {
		t.Fatalf("GO after refused options: %v", err)
	}
}

func TestOptAbort(t *testing.T) {
	s := serve(t, Export{Name: "a", Backend: newMem(4096)})
	c := s.raw(t)
	if err := nbdproto.SendOption(c, nbdproto.OptAbort, nil); err != nil {
		t.Fatal(err)
	}
	if _, typ, _, err := nbdproto.ReadOptionReply(c); err != nil || typ != nbdproto.RepAck {
		t.Fatalf("ABORT: reply %#x, %v; want ACK", typ, err)
	}
	expectClosed(t, c)
	if pf := s.srv.Stats().ProtocolFault; pf != 0 {
		t.Fatalf("abort counted as protocol fault (%d)", pf)
	}
}

func TestOptExportName(t *testing.T) {
	m := newMem(8192)
	s := serve(t, Export{Name: "vol", Backend: m})
	for _, noZeroes := range []bool{false, true} {
		c, err := net.Dial("unix", s.sock)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		var g [18]byte
		if _, err := io.ReadFull(c, g[:]); err != nil {
			t.Fatal(err)
		}
		if binary.BigEndian.Uint16(g[16:]) != nbdproto.HandshakeFixedNewstyle|nbdproto.HandshakeNoZeroes {
			t.Fatalf("handshake flags %#x", g[16:])
		}
		cf := nbdproto.ClientFixedNewstyle
		if noZeroes {
			cf |= nbdproto.ClientNoZeroes
		}
		c.Write(binary.BigEndian.AppendUint32(nil, cf))
		nbdproto.SendOption(c, nbdproto.OptExportName, []byte("vol"))
		n := 10
		if !noZeroes {
			n += 124
		}
		b := make([]byte, n)
		if _, err := io.ReadFull(c, b); err != nil {
			t.Fatal(err)
		}
		if binary.BigEndian.Uint64(b) != 8192 || binary.BigEndian.Uint16(b[8:])&nbdproto.FlagSendFlush == 0 {
			t.Fatalf("EXPORT_NAME reply %x", b[:10])
		}
		if !noZeroes && !slices.Equal(b[10:], make([]byte, 124)) {
			t.Fatal("124 zero bytes missing")
		}
		cl := nbdclient.NewTransmission(c, nbdproto.Export{Size: 8192})
		if _, err := cl.WriteAt([]byte("abc"), 100); err != nil {
			t.Fatal(err)
		}
		if got := string(m.bytes(100, 3)); got != "abc" {
			t.Fatalf("data %q", got)
		}
	}
	// Unknown name: NBD_OPT_EXPORT_NAME can only be refused by closing.
	c := s.raw(t)
	nbdproto.SendOption(c, nbdproto.OptExportName, []byte("nope"))
	expectClosed(t, c)
}

func TestNegotiationFaultsCloseConnection(t *testing.T) {
	s := serve(t, Export{Name: "a", Backend: newMem(4096)})
	good := s.dial(t, "a") // served throughout

	cases := map[string]func(c net.Conn){
		"unknown client flags": func(c net.Conn) { c.Write([]byte{0, 0, 0, 5}) },
		"not fixed newstyle":   func(c net.Conn) { c.Write([]byte{0, 0, 0, 0}) },
		"bad option magic": func(c net.Conn) {
			c.Write([]byte{0, 0, 0, 1})
			c.Write(make([]byte, 16))
		},
		"truncated option": func(c net.Conn) {
			c.Write([]byte{0, 0, 0, 1})
			b := binary.BigEndian.AppendUint64(nil, nbdproto.OptMagic)
			b = binary.BigEndian.AppendUint32(b, nbdproto.OptGo)
			b = binary.BigEndian.AppendUint32(b, 100)
			c.Write(append(b, 1, 2, 3))
			c.(*net.UnixConn).CloseWrite()
		},
	}
	for name, send := range cases {
		t.Run(name, func(t *testing.T) {
			c, err := net.Dial("unix", s.sock)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			var g [18]byte
			if _, err := io.ReadFull(c, g[:]); err != nil {
				t.Fatal(err)
			}
			send(c)
			expectClosed(t, c)
		})
	}
	t.Run("absurd option length", func(t *testing.T) {
		c := s.raw(t)
		b := binary.BigEndian.AppendUint64(nil, nbdproto.OptMagic)
		b = binary.BigEndian.AppendUint32(b, nbdproto.OptGo)
		b = binary.BigEndian.AppendUint32(b, 0xffffffff)
		c.Write(b)
		if _, typ, _, err := nbdproto.ReadOptionReply(c); err != nil || typ != nbdproto.RepErrTooBig {
			t.Fatalf("reply %#x, %v; want NBD_REP_ERR_TOO_BIG", typ, err)
		}
		expectClosed(t, c)
	})
	if _, err := good.WriteAt([]byte("still here"), 0); err != nil {
		t.Fatalf("first client broken by the others' faults: %v", err)
	}
	if pf := s.srv.Stats().ProtocolFault; pf < 5 {
		t.Fatalf("protocol faults = %d, want >= 5", pf)
	}
}

func TestParseInfoRequest(t *testing.T) {
	name, reqs, ok := parseInfoRequest(nbdproto.InfoRequest("vol", 1, 3))
	if !ok || string(name) != "vol" || len(reqs) != 4 {
		t.Fatalf("got %q %x %v", name, reqs, ok)
	}
	if _, _, ok := parseInfoRequest(nbdproto.InfoRequest(string(make([]byte, 4097)))); ok {
		t.Fatal("accepted a 4097-byte name")
	}
}
