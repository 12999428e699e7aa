package nbdproto_test

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"path/filepath"
	"strings"
	"testing"

	"github.com/doppelha/doppel/blockdev"
	"github.com/doppelha/doppel/blockdev/nbdproto"
)

// negotiate is the client side as the kernel attach and nbdclient run it:
// greeting, then NBD_OPT_GO.
func negotiate(rw io.ReadWriter, name string) (nbdproto.Export, error) {
	if _, err := nbdproto.Handshake(rw); err != nil {
		return nbdproto.Export{}, err
	}
	x, err := nbdproto.Info(rw, name, true)
	if err != nil {
		return nbdproto.Export{}, err
	}
	return *x, nil
}

// TestNegotiateWithServer runs the handshake against doppel's own NBD
// server: the flags it reports are what the kernel is told.
func TestNegotiateWithServer(t *testing.T) {
	f, err := blockdev.OpenFile(filepath.Join(t.TempDir(), "disk"), 8<<20)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	srv, err := blockdev.NewServer(nil, blockdev.Export{Name: "vol", Backend: f})
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name, want string
	}{{"vol", ""}, {"nope", "refused (reply 0x80000006)"}} {
		a, b := net.Pipe()
		done := make(chan error, 1)
		go func() { done <- srv.ServeConn(t.Context(), a) }()
		info, err := negotiate(b, tc.name)
		if tc.want != "" {
			if !errors.Is(err, nbdproto.ErrNegotiation) || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("%s: err %v, want %q", tc.name, err, tc.want)
			}
			b.Close()
			<-done
			continue
		}
		if err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		const want = nbdproto.FlagHasFlags | nbdproto.FlagSendFlush | nbdproto.FlagSendFUA | nbdproto.FlagSendTrim | nbdproto.FlagSendWriteZeroes | nbdproto.FlagCanMultiConn
		if info.Size != 8<<20 || info.Flags&want != want || info.Flags&nbdproto.FlagReadOnly != 0 {
			t.Errorf("export info %+v (flags %#x, want at least %#x)", info, info.Flags, want)
		}
		// The connection is now in transmission: a DISC ends it cleanly.
		var disc [28]byte
		binary.BigEndian.PutUint32(disc[0:], 0x25609513)
		binary.BigEndian.PutUint16(disc[6:], 2) // NBD_CMD_DISC
		b.Write(disc[:])
		if err := <-done; err != nil {
			t.Errorf("server after DISC: %v", err)
		}
		b.Close()
	}
}

// scripted plays a server's bytes and swallows what the client writes.
type scripted struct{ io.Reader }

func (scripted) Write(p []byte) (int, error) { return len(p), nil }

func greeting() []byte {
	var b []byte
	b = binary.BigEndian.AppendUint64(b, nbdproto.NBDMagic)
	b = binary.BigEndian.AppendUint64(b, nbdproto.OptMagic)
	return binary.BigEndian.AppendUint16(b, nbdproto.HandshakeFixedNewstyle|nbdproto.HandshakeNoZeroes)
}

func optReply(typ uint32, data []byte) []byte {
	var b []byte
	b = binary.BigEndian.AppendUint64(b, nbdproto.OptReplyMagic)
	b = binary.BigEndian.AppendUint32(b, nbdproto.OptGo)
	b = binary.BigEndian.AppendUint32(b, typ)
	b = binary.BigEndian.AppendUint32(b, uint32(len(data)))
	return append(b, data...)
}

func TestNegotiateMalformed(t *testing.T) {
	export := binary.BigEndian.AppendUint16(binary.BigEndian.AppendUint64([]byte{0, 0}, 1<<20), 0x16d)
	for _, tc := range []struct {
		name   string
		server []byte
		want   string
	}{
		{"oldstyle", append(binary.BigEndian.AppendUint64(nil, nbdproto.NBDMagic), make([]byte, 10)...), "not a newstyle"},
		{"no ack", append(greeting(), optReply(nbdproto.RepInfo, export)...), "read option reply"},
		{"ack without size", append(greeting(), optReply(nbdproto.RepAck, nil)...), "no export size"},
		{"huge reply", append(greeting(), optReply(nbdproto.RepInfo, nil)[:16]...), "read option reply"},
		{"bad info", append(greeting(), optReply(nbdproto.RepInfo, []byte{0, 0, 1})...), "NBD_INFO_EXPORT of 3 bytes"},
	} {
		_, err := negotiate(scripted{bytes.NewReader(tc.server)}, "")
		if !errors.Is(err, nbdproto.ErrNegotiation) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want %q", tc.name, err, tc.want)
		}
	}
	over := append(greeting(), optReply(nbdproto.RepInfo, nil)...)
	binary.BigEndian.PutUint32(over[len(over)-4:], nbdproto.MaxOptionReply+1)
	if _, err := negotiate(scripted{bytes.NewReader(over)}, ""); err == nil || !strings.Contains(err.Error(), "option reply") {
		t.Errorf("oversized reply: %v", err)
	}
	ok := append(greeting(), optReply(nbdproto.RepInfo, export)...)
	ok = append(ok, optReply(nbdproto.RepAck, nil)...)
	info, err := negotiate(scripted{bytes.NewReader(ok)}, "")
	if err != nil || info.Size != 1<<20 || info.Flags != 0x16d {
		t.Errorf("good script: %+v, %v", info, err)
	}
}

// FuzzNegotiate feeds arbitrary server bytes to the client handshake: it
// never panics and never reads past a bounded reply.
func FuzzNegotiate(f *testing.F) {
	export := binary.BigEndian.AppendUint16(binary.BigEndian.AppendUint64([]byte{0, 0}, 1<<20), 0x16d)
	bs := binary.BigEndian.AppendUint32(binary.BigEndian.AppendUint32(binary.BigEndian.AppendUint32([]byte{0, 3}, 512), 4096), 1<<25)
	good := append(greeting(), optReply(nbdproto.RepInfo, export)...)
	good = append(good, optReply(nbdproto.RepInfo, bs)...)
	f.Add(append(good, optReply(nbdproto.RepAck, nil)...))
	f.Add(append(greeting(), optReply(nbdproto.RepErr|6, []byte("no such export"))...))
	f.Add(greeting())
	f.Fuzz(func(t *testing.T, b []byte) {
		info, err := negotiate(scripted{bytes.NewReader(b)}, "x")
		if err != nil && !errors.Is(err, nbdproto.ErrNegotiation) {
			t.Fatalf("error outside nbdproto.ErrNegotiation: %v", err)
		}
		_ = info
	})
}
