package blockdev

import (
	"bufio"
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/doppelha/doppel/blockdev/nbdproto"
)

// Benchmarks of the request path: one connection over a unix socket pair,
// a pipelined raw client keeping depth requests in flight, and a backend
// that is either in memory (the server's own cost) or a file in /dev/shm.

func benchServer(b *testing.B, backend Backend) net.Conn {
	b.Helper()
	srv, err := NewServer(nil, Export{Name: "b", Backend: backend})
	if err != nil {
		b.Fatal(err)
	}
	fds, err := socketpair()
	if err != nil {
		b.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { srv.ServeConn(ctx, fds[0]); close(done) }()
	b.Cleanup(func() { fds[1].Close(); cancel(); <-done })
	if _, err := nbdproto.Handshake(fds[1]); err != nil {
		b.Fatal(err)
	}
	if _, err := nbdproto.Info(fds[1], "b", true); err != nil {
		b.Fatal(err)
	}
	return fds[1]
}

func socketpair() ([2]net.Conn, error) {
	var cs [2]net.Conn
	a, b, err := unixSocketpair()
	if err != nil {
		return cs, err
	}
	for i, f := range []*os.File{a, b} {
		c, err := net.FileConn(f)
		f.Close()
		if err != nil {
			return cs, err
		}
		cs[i] = c
	}
	return cs, nil
}

// runPipelined issues b.N requests of cmd with size bytes at depth, over
// the first span bytes of the export, with a simple xorshift offset walk.
func runPipelined(b *testing.B, c net.Conn, cmd uint16, size, depth int, span int64) {
	b.SetBytes(int64(size))
	b.ReportAllocs()
	br := bufio.NewReaderSize(c, 1<<20)
	bw := bufio.NewWriterSize(c, 1<<20)
	payload := make([]byte, size)
	data := make([]byte, size)
	slots := span / int64(size)
	x := uint64(88172645463325252)
	hdr := make([]byte, 0, 28)
	send := func(i int) {
		x ^= x << 13
		x ^= x >> 7
		x ^= x << 17
		off := int64(x%uint64(slots)) * int64(size)
		hdr = appendRequest(hdr[:0], request{typ: cmd, cookie: uint64(i), offset: uint64(off), length: uint32(size)})
		bw.Write(hdr)
		if cmd == nbdproto.CmdWrite {
			bw.Write(payload)
		}
	}
	var h [16]byte
	recv := func() {
		if _, err := io.ReadFull(br, h[:]); err != nil {
			b.Fatal(err)
		}
		if e := binary.BigEndian.Uint32(h[4:]); e != 0 {
			b.Fatalf("error reply %d", e)
		}
		if cmd == nbdproto.CmdRead {
			if _, err := io.ReadFull(br, data); err != nil {
				b.Fatal(err)
			}
		}
	}
	sent, got := 0, 0
	for b.Loop() {
		for sent-got < depth {
			send(sent)
			sent++
		}
		bw.Flush()
		recv()
		got++
	}
	for got < sent {
		recv()
		got++
	}
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "IOPS")
}

func BenchmarkRequestPath(b *testing.B) {
	const span = 64 << 20
	backends := map[string]func(b *testing.B) Backend{
		"mem": func(*testing.B) Backend { return newMem(span) },
		"shm": func(b *testing.B) Backend {
			dir := "/dev/shm"
			if _, err := os.Stat(dir); err != nil {
				dir = b.TempDir()
			}
			p := filepath.Join(dir, fmt.Sprintf("doppel-bench-%d", os.Getpid()))
			f, err := OpenFile(p, span)
			if err != nil {
				b.Fatal(err)
			}
			os.Remove(p)
			b.Cleanup(func() { f.Close() })
			// Allocate it, so reads are not of holes.
			f.WriteAt(make([]byte, 1<<20), 0)
			return f
		},
	}
	for _, be := range []string{"mem", "shm"} {
		for _, tc := range []struct {
			name     string
			cmd      uint16
			size, qd int
		}{
			{"read-4k-qd1", nbdproto.CmdRead, 4096, 1},
			{"read-4k-qd32", nbdproto.CmdRead, 4096, 32},
			{"write-4k-qd1", nbdproto.CmdWrite, 4096, 1},
			{"write-4k-qd32", nbdproto.CmdWrite, 4096, 32},
			{"read-1m-qd16", nbdproto.CmdRead, 1 << 20, 16},
			{"write-1m-qd16", nbdproto.CmdWrite, 1 << 20, 16},
		} {
			b.Run(be+"/"+tc.name, func(b *testing.B) {
				c := benchServer(b, backends[be](b))
				runPipelined(b, c, tc.cmd, tc.size, tc.qd, span)
			})
		}
	}
}

func unixSocketpair() (*os.File, *os.File, error) {
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, nil, err
	}
	return os.NewFile(uintptr(fds[0]), "nbd-server"), os.NewFile(uintptr(fds[1]), "nbd-client"), nil
}
