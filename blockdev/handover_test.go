package blockdev

import (
	"bytes"
	"context"
	"encoding/binary"
	"io"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/doppelha/doppel/blockdev/nbdproto"
	"golang.org/x/sys/unix"
)

func socketPair(t *testing.T) (net.Conn, net.Conn) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	conn := func(fd int) net.Conn {
		f := os.NewFile(uintptr(fd), "pair")
		defer f.Close()
		c, err := net.FileConn(f)
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	return conn(fds[0]), conn(fds[1])
}

func hoRequest(typ uint16, cookie, off uint64, data []byte, length uint32) []byte {
	b := make([]byte, nbdproto.RequestHeaderLen, nbdproto.RequestHeaderLen+len(data))
	binary.BigEndian.PutUint32(b[0:], nbdproto.RequestMagic)
	binary.BigEndian.PutUint16(b[6:], typ)
	binary.BigEndian.PutUint64(b[8:], cookie)
	binary.BigEndian.PutUint64(b[16:], off)
	binary.BigEndian.PutUint32(b[24:], length)
	return append(b, data...)
}

func readReply(t *testing.T, c net.Conn, cookie uint64, data []byte) {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	var h [16]byte
	if _, err := io.ReadFull(c, h[:]); err != nil {
		t.Fatalf("reply %d: %v", cookie, err)
	}
	if m, e, ck := binary.BigEndian.Uint32(h[0:]), binary.BigEndian.Uint32(h[4:]), binary.BigEndian.Uint64(h[8:]); m != nbdproto.SimpleReplyMagic || e != 0 || ck != cookie {
		t.Fatalf("reply %x error %d cookie %d, want cookie %d", m, e, ck, cookie)
	}
	if data != nil {
		if _, err := io.ReadFull(c, data); err != nil {
			t.Fatalf("reply %d data: %v", cookie, err)
		}
	}
}

// TestHandoverMidRequest: a server hands its client over while the next
// request is partly read (nothing, part of its header, its header, part
// of its payload); another server resumes the connection without
// renegotiating, with the bytes the first one read, and the request
// completes as if nothing happened.
func TestHandoverMidRequest(t *testing.T) {
	for _, cut := range []int{0, 10, nbdproto.RequestHeaderLen, nbdproto.RequestHeaderLen + 2048} {
		f, err := OpenFile(filepath.Join(t.TempDir(), "vol"), 1<<20)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		a, _ := NewServer(nil, Export{Name: "vol", Backend: f})
		srv, cli := socketPair(t)
		defer cli.Close()
		ctx := context.Background()
		aDone := make(chan error, 1)
		go func() { aDone <- a.ServeConn(ctx, srv) }()
		if _, err := nbdproto.Handshake(cli); err != nil {
			t.Fatal(err)
		}
		if _, err := nbdproto.Info(cli, "vol", true); err != nil {
			t.Fatal(err)
		}
		first := bytes.Repeat([]byte{0xaa}, 4096)
		cli.Write(hoRequest(nbdproto.CmdWrite, 1, 0, first, 4096))
		readReply(t, cli, 1, nil)
		second := bytes.Repeat([]byte{0xbb}, 4096)
		req := hoRequest(nbdproto.CmdWrite, 2, 8192, second, 4096)
		cli.Write(req[:cut])
		time.Sleep(50 * time.Millisecond) // the server reads what was sent
		a.Handover()
		select {
		case err := <-aDone:
			if err != nil {
				t.Fatalf("cut %d: the first server ended with %v", cut, err)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("cut %d: the first server did not hand over", cut)
		}
		h := a.Handed()
		if len(h) != 1 || h[0].Export != "vol" || !bytes.Equal(h[0].Pending, req[:cut]) {
			t.Fatalf("cut %d: handed %d connections, pending %d bytes", cut, len(h), len(h[0].Pending))
		}
		b, _ := NewServer(nil, Export{Name: "vol", Backend: f})
		c2, err := net.FileConn(h[0].Conn)
		h[0].Conn.Close()
		if err != nil {
			t.Fatal(err)
		}
		bDone := make(chan error, 1)
		go func() { bDone <- b.ResumeConn(ctx, c2, h[0].Export, h[0].Pending) }()
		cli.Write(req[cut:])
		readReply(t, cli, 2, nil)
		got := make([]byte, 4096)
		cli.Write(hoRequest(nbdproto.CmdRead, 3, 8192, nil, 4096))
		readReply(t, cli, 3, got)
		if !bytes.Equal(got, second) {
			t.Fatalf("cut %d: read back %x..., want bb", cut, got[:4])
		}
		cli.Write(hoRequest(nbdproto.CmdDisc, 4, 0, nil, 0))
		if err := <-bDone; err != nil {
			t.Fatalf("cut %d: the second server: %v", cut, err)
		}
		if a.Stats().Writes != 1 || b.Stats().Writes != 1 {
			t.Errorf("cut %d: writes %d then %d", cut, a.Stats().Writes, b.Stats().Writes)
		}
	}
}
