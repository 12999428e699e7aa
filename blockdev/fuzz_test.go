package blockdev

import (
	"bytes"
	"context"
	"encoding/binary"
	"net"
	"testing"
	"time"

	"github.com/doppelha/doppel/blockdev/nbdproto"
)

// scriptConn is a net.Conn whose reads come from a fixed client script and
// whose writes are collected.
type scriptConn struct {
	r   *bytes.Reader
	out bytes.Buffer
}

func (c *scriptConn) Read(p []byte) (int, error)       { return c.r.Read(p) }
func (c *scriptConn) Write(p []byte) (int, error)      { return c.out.Write(p) }
func (c *scriptConn) Close() error                     { return nil }
func (c *scriptConn) LocalAddr() net.Addr              { return &net.UnixAddr{Name: "fuzz", Net: "unix"} }
func (c *scriptConn) RemoteAddr() net.Addr             { return &net.UnixAddr{Name: "fuzz", Net: "unix"} }
func (c *scriptConn) SetDeadline(time.Time) error      { return nil }
func (c *scriptConn) SetReadDeadline(time.Time) error  { return nil }
func (c *scriptConn) SetWriteDeadline(time.Time) error { return nil }

// option encodes one client option.
func option(opt uint32, data []byte) []byte {
	b := binary.BigEndian.AppendUint64(nil, nbdproto.OptMagic)
	b = binary.BigEndian.AppendUint32(b, opt)
	b = binary.BigEndian.AppendUint32(b, uint32(len(data)))
	return append(b, data...)
}

func concat(bs ...[]byte) []byte { return bytes.Join(bs, nil) }

var clientFlags = []byte{0, 0, 0, 3}

// runScript serves one scripted client; ServeConn must return promptly.
func runScript(t *testing.T, script []byte) []byte {
	m := newMem(64 << 10)
	srv, err := NewServer(nil, Export{Name: "a", Description: "d", Backend: m}, Export{Name: "ro", Backend: newMem(4096), ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	c := &scriptConn{r: bytes.NewReader(script)}
	done := make(chan struct{})
	go func() {
		srv.ServeConn(context.Background(), c)
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("ServeConn did not return on end of input")
	}
	return c.out.Bytes()
}

func FuzzNegotiation(f *testing.F) {
	f.Add(concat(clientFlags, option(nbdproto.OptList, nil), option(nbdproto.OptAbort, nil)))
	f.Add(concat(clientFlags, option(nbdproto.OptInfo, nbdproto.InfoRequest("a", 0, 1, 2, 3)), option(nbdproto.OptGo, nbdproto.InfoRequest("ro", 3))))
	f.Add(concat(clientFlags, option(nbdproto.OptExportName, []byte("a"))))
	f.Add(concat(clientFlags, option(nbdproto.OptGo, nbdproto.InfoRequest("nope")), option(nbdproto.OptStartTLS, nil), option(77, []byte("x"))))
	f.Add(concat([]byte{0, 0, 0, 1}, option(nbdproto.OptList, []byte("junk")), option(nbdproto.OptGo, []byte{0, 0, 0, 200})))
	f.Add(concat(clientFlags, binary.BigEndian.AppendUint64(nil, nbdproto.OptMagic), []byte{0, 0, 0, 7, 0xff, 0xff, 0xff, 0xff}))
	f.Add([]byte{0, 0, 0, 8})
	f.Fuzz(func(t *testing.T, script []byte) {
		out := runScript(t, script)
		if len(out) < 18 || binary.BigEndian.Uint64(out) != nbdproto.NBDMagic {
			t.Fatalf("no greeting in %x", out)
		}
	})
}

func FuzzRequest(f *testing.F) {
	req := func(typ, flags uint16, off uint64, n uint32) []byte {
		return appendRequest(nil, request{typ: typ, flags: flags, cookie: 1, offset: off, length: n})
	}
	f.Add(concat(req(nbdproto.CmdWrite, nbdproto.CmdFlagFUA, 0, 4), []byte("abcd"), req(nbdproto.CmdRead, 0, 0, 4), req(nbdproto.CmdFlush, 0, 0, 0), req(nbdproto.CmdDisc, 0, 0, 0)))
	f.Add(concat(req(nbdproto.CmdTrim, 0, 4096, 8192), req(nbdproto.CmdWriteZeroes, nbdproto.CmdFlagNoHole, 1, 100), req(nbdproto.CmdWriteZeroes, nbdproto.CmdFlagFastZero, 0, 1)))
	f.Add(concat(req(nbdproto.CmdRead, 0, 1<<40, 1<<30), req(nbdproto.CmdWrite, 0, 65535, 2), []byte{1, 2}, req(99, 0xffff, 0, 0)))
	f.Add(concat(req(nbdproto.CmdWrite, 0, 0, 40<<20), []byte{1}))
	f.Add(req(nbdproto.CmdRead, 0, 0, 10)[:13])
	f.Add([]byte("garbage that is not a request header"))
	goA := concat(clientFlags, option(nbdproto.OptGo, nbdproto.InfoRequest("a")))
	f.Fuzz(func(t *testing.T, stream []byte) {
		// The header decoder alone: never panics; encode(decode(x)) == x.
		if r, err := parseRequest(stream); err == nil {
			if got := appendRequest(nil, r); !bytes.Equal(got, stream[:nbdproto.RequestHeaderLen]) {
				t.Fatalf("round trip %x -> %x", stream[:nbdproto.RequestHeaderLen], got)
			}
		}
		// The whole transmission loop on a connection in transmission.
		out := runScript(t, concat(goA, stream))
		// Every reply that was sent is well formed.
		if i := bytes.Index(out, binary.BigEndian.AppendUint32(nil, nbdproto.SimpleReplyMagic)); i >= 0 && len(out)-i < nbdproto.ReplyHeaderLen {
			t.Fatalf("truncated reply %x", out[i:])
		}
	})
}

func TestScriptEndToEnd(t *testing.T) {
	// The scripted connection itself must work for the fuzzers to mean
	// anything: a write then a read yields the data in the output.
	script := concat(clientFlags, option(nbdproto.OptGo, nbdproto.InfoRequest("a")),
		appendRequest(nil, request{typ: nbdproto.CmdWrite, cookie: 1, offset: 10, length: 5}), []byte("hello"))
	out := runScript(t, script)
	// Second connection on the same fresh backend would not see it, so check
	// the reply to the write: last 16 bytes, error 0, cookie 1.
	if len(out) < 16 {
		t.Fatalf("short output %x", out)
	}
	tail := out[len(out)-16:]
	if binary.BigEndian.Uint32(tail) != nbdproto.SimpleReplyMagic || binary.BigEndian.Uint32(tail[4:]) != 0 || binary.BigEndian.Uint64(tail[8:]) != 1 {
		t.Fatalf("write reply %x", tail)
	}
}
