package bench

import (
	"context"
	"log/slog"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"testing"

	"github.com/doppelha/doppel/blockdev"
	"github.com/doppelha/doppel/blockdev/nbdclient"
	gonbdbackend "github.com/pojntfx/go-nbd/pkg/backend"
	gonbdserver "github.com/pojntfx/go-nbd/pkg/server"
)

// These benchmarks drive doppel's NBD server and go-nbd v0.3.2's stock
// server in-process with the same pipelined client over a Unix socket, on a
// file in the test's temporary directory: the per-request cost of each
// server without fio, quick to profile:
//
//	go test -run '^$' -bench Server -cpuprofile cpu.prof ./bench/
//
// "qd32" keeps 32 requests in flight (goroutines sharing one connection).

const benchVolume = 64 << 20

func benchFile(b *testing.B) string {
	b.Helper()
	path := filepath.Join(b.TempDir(), "vol.img")
	if err := PrepareVolume(path, benchVolume, true, 3); err != nil {
		b.Fatal(err)
	}
	return path
}

// serveDoppel serves path with blockdev and returns a connected client.
func serveDoppel(b *testing.B, path string) *nbdclient.Client {
	b.Helper()
	f, err := blockdev.OpenFile(path, 0)
	if err != nil {
		b.Fatal(err)
	}
	srv, err := blockdev.NewServer(slog.New(slog.DiscardHandler), blockdev.Export{Name: "", Backend: f})
	if err != nil {
		b.Fatal(err)
	}
	sock := filepath.Join(b.TempDir(), "s")
	l, err := net.Listen("unix", sock)
	if err != nil {
		b.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { srv.Serve(ctx, l); close(done) }()
	cl, err := nbdclient.Dial("unix", sock, "")
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { cl.Close(); cancel(); <-done; f.Close() })
	return cl
}

// serveGoNBD serves path with go-nbd's stock server and file backend.
func serveGoNBD(b *testing.B, path string) *nbdclient.Client {
	b.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		b.Fatal(err)
	}
	sock := filepath.Join(b.TempDir(), "s")
	l, err := net.Listen("unix", sock)
	if err != nil {
		b.Fatal(err)
	}
	exports := []*gonbdserver.Export{{Name: "", Backend: gonbdbackend.NewFileBackend(f)}}
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() { defer c.Close(); gonbdserver.Handle(c, exports, &gonbdserver.Options{SupportsMultiConn: true}) }()
		}
	}()
	cl, err := nbdclient.Dial("unix", sock, "")
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { cl.Close(); l.Close(); f.Close() })
	return cl
}

func BenchmarkServer(b *testing.B) {
	servers := []struct {
		name  string
		serve func(*testing.B, string) *nbdclient.Client
	}{{"doppel", serveDoppel}, {"go-nbd", serveGoNBD}}
	for _, s := range servers {
		for _, op := range []string{"read", "write"} {
			for _, bs := range []int{4 << 10, 1 << 20} {
				for _, qd := range []int{1, 32} {
					if bs == 1<<20 && qd == 32 {
						continue // 1 MiB rows are about bandwidth; depth 1 shows it
					}
					name := s.name + "/" + op + "-" + map[int]string{4 << 10: "4k", 1 << 20: "1m"}[bs] + "-qd" + map[int]string{1: "1", 32: "32"}[qd]
					b.Run(name, func(b *testing.B) {
						cl := s.serve(b, benchFile(b))
						benchIO(b, cl, op == "write", bs, qd)
					})
				}
			}
		}
	}
}

func benchIO(b *testing.B, cl *nbdclient.Client, write bool, bs, qd int) {
	blocks := int64(benchVolume / bs)
	do := func(buf []byte, rng *rand.Rand) {
		off := rng.Int64N(blocks) * int64(bs)
		var err error
		if write {
			_, err = cl.WriteAt(buf, off)
		} else {
			_, err = cl.ReadAt(buf, off)
		}
		if err != nil {
			b.Fatal(err)
		}
	}
	b.SetBytes(int64(bs))
	b.ReportAllocs()
	if qd == 1 {
		buf := make([]byte, bs)
		rng := rand.New(rand.NewPCG(1, 2))
		for b.Loop() {
			do(buf, rng)
		}
	} else {
		b.SetParallelism((qd + 1) / 2) // × GOMAXPROCS goroutines
		b.RunParallel(func(pb *testing.PB) {
			buf := make([]byte, bs)
			rng := rand.New(rand.NewPCG(rand.Uint64(), 2))
			for pb.Next() {
				do(buf, rng)
			}
		})
	}
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "IOPS")
}
