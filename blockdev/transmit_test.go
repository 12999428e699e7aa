package blockdev

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math/rand/v2"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/doppelha/doppel/blockdev/nbdclient"
	"github.com/doppelha/doppel/blockdev/nbdproto"
)

func pattern(n int, seed byte) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i*7) + seed
	}
	return b
}

func TestReadWrite(t *testing.T) {
	const size = 64 << 20
	m := newMem(size)
	s := serve(t, Export{Name: "a", Backend: m})
	cl := s.dial(t, "a")
	for i, tc := range []struct{ off, n int }{
		{0, 1}, {1, 4096}, {4095, 3}, {1 << 20, 1 << 20}, {size - 512, 512}, {8 << 20, MaxPayload},
	} {
		p := pattern(tc.n, byte(i))
		if _, err := cl.WriteAt(p, int64(tc.off)); err != nil {
			t.Fatalf("write %d@%d: %v", tc.n, tc.off, err)
		}
		if !bytes.Equal(m.bytes(tc.off, tc.n), p) {
			t.Fatalf("backend differs after write %d@%d", tc.n, tc.off)
		}
		got := make([]byte, tc.n)
		if _, err := cl.ReadAt(got, int64(tc.off)); err != nil {
			t.Fatalf("read %d@%d: %v", tc.n, tc.off, err)
		}
		if !bytes.Equal(got, p) {
			t.Fatalf("read back differs %d@%d", tc.n, tc.off)
		}
	}
	st := s.srv.Stats()
	if st.Reads != 6 || st.Writes != 6 || st.Errors != 0 || st.BytesWritten != 1+4096+3+(1<<20)+512+MaxPayload {
		t.Fatalf("stats %+v", st)
	}
}

// recorder is a Mutator that records what it was given, optionally blocks
// on gate, and then applies with Direct.
type recorder struct {
	next Mutator
	gate chan struct{} // when non-nil, Apply waits for a receive... a send
	mu   sync.Mutex
	got  []Mutation
}

func (r *recorder) Apply(ctx context.Context, m *Mutation) error {
	r.mu.Lock()
	c := *m
	c.Data = append([]byte(nil), m.Data...)
	c.lend = nil // the buffer hand-over (Retain) is not part of the request
	r.got = append(r.got, c)
	r.mu.Unlock()
	if r.gate != nil {
		<-r.gate
	}
	return r.next.Apply(ctx, m)
}

func TestMutatorSeesEveryMutation(t *testing.T) {
	m := newMem(1 << 20)
	rec := &recorder{next: Direct(m)}
	s := serve(t, Export{Name: "a", Backend: m, Mutator: rec})
	cl := s.dial(t, "a")
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(cl.Do(nbdproto.CmdWrite, nbdproto.CmdFlagFUA, 10, 0, []byte("xyz")))
	must(cl.Do(nbdproto.CmdTrim, 0, 4096, 8192, nil))
	must(cl.Do(nbdproto.CmdWriteZeroes, nbdproto.CmdFlagNoHole, 0, 100, nil))
	must(cl.Do(nbdproto.CmdWriteZeroes, nbdproto.CmdFlagFUA, 200, 300, nil))
	must(cl.Flush())
	must(cl.Do(nbdproto.CmdRead, 0, 0, 0, make([]byte, 10))) // not a mutation
	want := []Mutation{
		{Op: OpWrite, Offset: 10, Length: 3, Data: []byte("xyz"), FUA: true},
		{Op: OpTrim, Offset: 4096, Length: 8192},
		{Op: OpWriteZeroes, Offset: 0, Length: 100, NoHole: true},
		{Op: OpWriteZeroes, Offset: 200, Length: 300, FUA: true},
		{Op: OpFlush},
	}
	rec.mu.Lock()
	got := rec.got
	rec.mu.Unlock()
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("mutations\n got %+v\nwant %+v", got, want)
	}
	// FUA write, FUA zero and flush each synced.
	if n := m.syncs.Load(); n != 3 {
		t.Fatalf("syncs = %d, want 3", n)
	}
}

func TestAckOnlyAfterApply(t *testing.T) {
	m := newMem(1 << 20)
	rec := &recorder{next: Direct(m), gate: make(chan struct{})}
	s := serve(t, Export{Name: "a", Backend: m, Mutator: rec})
	cl := s.dial(t, "a")
	t.Cleanup(func() { close(rec.gate) }) // before the server stops
	for _, do := range []func() error{
		func() error { _, err := cl.WriteAt([]byte("data"), 0); return err },
		cl.Flush,
		func() error { return cl.Trim(0, 4096) },
	} {
		done := make(chan error, 1)
		go func() { done <- do() }()
		select {
		case err := <-done:
			t.Fatalf("acknowledged before Apply returned (err %v)", err)
		case <-time.After(100 * time.Millisecond):
		}
		rec.gate <- struct{}{}
		if err := <-done; err != nil {
			t.Fatal(err)
		}
	}
}

func TestTrimAndZeroes(t *testing.T) {
	dir := t.TempDir()
	f, err := OpenFile(dir+"/vol", 8<<20)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	s := serve(t, Export{Name: "a", Backend: f})
	cl := s.dial(t, "a")
	p := pattern(8<<20, 1)
	if _, err := cl.WriteAt(p, 0); err != nil {
		t.Fatal(err)
	}
	if err := cl.Flush(); err != nil {
		t.Fatal(err)
	}
	blocks := func() int64 {
		var st syscall.Stat_t
		if err := syscall.Stat(dir+"/vol", &st); err != nil {
			t.Fatal(err)
		}
		return st.Blocks * 512
	}
	full := blocks()
	if err := cl.Trim(1<<20, 1<<20); err != nil {
		t.Fatal(err)
	}
	if err := cl.WriteZeroes(3<<20, 1<<20, false); err != nil {
		t.Fatal(err)
	}
	if err := cl.WriteZeroes(5<<20, 1<<20, true); err != nil {
		t.Fatal(err)
	}
	if err := cl.WriteZeroes(7<<20+1, 100, true); err != nil { // unaligned
		t.Fatal(err)
	}
	got := make([]byte, 8<<20)
	if _, err := cl.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	want := bytes.Clone(p)
	for _, r := range [][2]int{{1 << 20, 1 << 20}, {3 << 20, 1 << 20}, {5 << 20, 1 << 20}, {7<<20 + 1, 100}} {
		clear(want[r[0] : r[0]+r[1]])
	}
	if !bytes.Equal(got, want) {
		t.Fatal("data after trim/write-zeroes differs")
	}
	// Trim and zeroes without NO_HOLE deallocated 2 MiB; NO_HOLE kept its MiB.
	if freed := full - blocks(); freed < 2<<20-64<<10 || freed >= 3<<20-64<<10 {
		t.Fatalf("freed %d bytes, want 2 MiB (trim + zero without NO_HOLE)", freed)
	}
}

func TestRequestsRunConcurrently(t *testing.T) {
	m := newMem(1 << 20)
	secondDone := make(chan struct{})
	m.hook = func(op string, off int64, n int) error {
		if op == "read" && off == 0 {
			select {
			case <-secondDone:
			case <-time.After(5 * time.Second):
				return syscall.ETIMEDOUT
			}
		}
		return nil
	}
	s := serve(t, Export{Name: "a", Backend: m})
	cl := s.dial(t, "a")
	first := make(chan error, 1)
	go func() { _, err := cl.ReadAt(make([]byte, 10), 0); first <- err }()
	time.Sleep(20 * time.Millisecond) // let the first request arrive first
	if _, err := cl.ReadAt(make([]byte, 10), 4096); err != nil {
		t.Fatal(err)
	}
	close(secondDone)
	if err := <-first; err != nil {
		t.Fatalf("first read (blocked until the second finished): %v", err)
	}
}

func TestBackendErrorsBecomeReplies(t *testing.T) {
	m := newMem(1 << 20)
	var inject error
	var mu sync.Mutex
	m.hook = func(op string, off int64, n int) error {
		mu.Lock()
		defer mu.Unlock()
		if off == 8192 || op == "sync" {
			return inject
		}
		return nil
	}
	s := serve(t, Export{Name: "a", Backend: m})
	cl := s.dial(t, "a")
	for _, tc := range []struct {
		err  error
		want syscall.Errno
	}{
		{syscall.EIO, syscall.EIO},
		{syscall.ENOSPC, syscall.ENOSPC},
		{&fs.PathError{Op: "pwrite", Path: "x", Err: syscall.EDQUOT}, syscall.ENOSPC},
		{fmt.Errorf("wrapped: %w", syscall.EPERM), syscall.EPERM},
		{syscall.EROFS, syscall.EPERM},
		{syscall.EOVERFLOW, syscall.EOVERFLOW},
		{syscall.EINVAL, syscall.EINVAL},
		{syscall.ENOMEM, syscall.ENOMEM},
		{errors.New("no errno"), syscall.EIO},
	} {
		mu.Lock()
		inject = tc.err
		mu.Unlock()
		_, err := cl.WriteAt([]byte("x"), 8192)
		wantErrno(t, err, tc.want)
		_, err = cl.ReadAt(make([]byte, 1), 8192)
		wantErrno(t, err, tc.want)
		wantErrno(t, cl.Trim(8192, 1), tc.want)
		wantErrno(t, cl.Flush(), tc.want)
	}
	mu.Lock()
	inject = nil
	mu.Unlock()
	if _, err := cl.WriteAt([]byte("x"), 8192); err != nil {
		t.Fatalf("connection unusable after errors: %v", err)
	}
}

func TestPanicIsContained(t *testing.T) {
	m := newMem(1 << 20)
	m.hook = func(op string, off int64, n int) error {
		if off == 4096 {
			panic("backend bug")
		}
		return nil
	}
	s := serve(t, Export{Name: "a", Backend: m})
	cl := s.dial(t, "a")
	_, err := cl.ReadAt(make([]byte, 1), 4096)
	wantErrno(t, err, syscall.EIO)
	_, err = cl.WriteAt(make([]byte, 1), 4096)
	wantErrno(t, err, syscall.EIO)
	if _, err := cl.ReadAt(make([]byte, 1), 0); err != nil {
		t.Fatalf("after panic: %v", err)
	}
}

// rawRequest sends one request header (and payload) on a transmission
// connection and returns the reply's error value (reading n bytes of data
// on success of a read).
func rawRequest(t *testing.T, c net.Conn, r request, payload []byte) uint32 {
	t.Helper()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Write(append(appendRequest(nil, r), payload...)); err != nil {
		t.Fatalf("send: %v", err)
	}
	var h [16]byte
	if _, err := io.ReadFull(c, h[:]); err != nil {
		t.Fatalf("read reply to %s: %v", cmdName(r.typ), err)
	}
	if binary.BigEndian.Uint32(h[:4]) != nbdproto.SimpleReplyMagic || binary.BigEndian.Uint64(h[8:]) != r.cookie {
		t.Fatalf("bad reply %x", h)
	}
	errno := binary.BigEndian.Uint32(h[4:8])
	if errno == 0 && r.typ == nbdproto.CmdRead {
		if _, err := io.CopyN(io.Discard, c, int64(r.length)); err != nil {
			t.Fatal(err)
		}
	}
	return errno
}

func TestBadRequests(t *testing.T) {
	const size = 1 << 20
	m := newMem(size)
	s := serve(t, Export{Name: "a", Backend: m}, Export{Name: "ro", Backend: newMem(4096), ReadOnly: true})

	// A second client keeps working throughout.
	good := s.dial(t, "a")
	stop := make(chan struct{})
	goodErr := make(chan error, 1)
	go func() {
		p := pattern(4096, 9)
		got := make([]byte, 4096)
		for i := 0; ; i++ {
			select {
			case <-stop:
				goodErr <- nil
				return
			default:
			}
			off := size/2 + int64(i%16)*4096
			if _, err := good.WriteAt(p, off); err != nil {
				goodErr <- err
				return
			}
			if _, err := good.ReadAt(got, off); err != nil || !bytes.Equal(got, p) {
				goodErr <- fmt.Errorf("read back: %v", err)
				return
			}
		}
	}()

	c := s.rawGo(t, "a")
	for _, tc := range []struct {
		name    string
		r       request
		payload []byte
		want    uint32
	}{
		{"read past end", request{typ: nbdproto.CmdRead, offset: size - 1, length: 2}, nil, nbdproto.EINVAL},
		{"read offset past end", request{typ: nbdproto.CmdRead, offset: size + 4096, length: 1}, nil, nbdproto.EINVAL},
		{"read offset overflow", request{typ: nbdproto.CmdRead, offset: 1<<64 - 1, length: 2}, nil, nbdproto.EINVAL},
		{"read 1 GiB", request{typ: nbdproto.CmdRead, length: 1 << 30}, nil, nbdproto.EINVAL},
		{"read 32 MiB + 1", request{typ: nbdproto.CmdRead, length: MaxPayload + 1}, nil, nbdproto.EINVAL},
		{"write past end", request{typ: nbdproto.CmdWrite, offset: size - 1, length: 2}, []byte{1, 2}, nbdproto.ENOSPC},
		{"trim past end", request{typ: nbdproto.CmdTrim, offset: size, length: 1}, nil, nbdproto.EINVAL},
		{"zeroes past end", request{typ: nbdproto.CmdWriteZeroes, offset: size - 1, length: 2}, nil, nbdproto.ENOSPC},
		{"unknown command", request{typ: 99, length: 1}, nil, nbdproto.EINVAL},
		{"cache (not advertised)", request{typ: 5, length: 1}, nil, nbdproto.EINVAL},
		{"unknown flag", request{typ: nbdproto.CmdRead, flags: 1 << 9, length: 1}, nil, nbdproto.EINVAL},
		{"fast zero", request{typ: nbdproto.CmdWriteZeroes, flags: nbdproto.CmdFlagFastZero, length: 1}, nil, nbdproto.ENOTSUP},
		{"write 40 MiB (payload skipped)", request{typ: nbdproto.CmdWrite, length: 40 << 20}, make([]byte, 40<<20), nbdproto.EINVAL},
		{"zero-length read", request{typ: nbdproto.CmdRead}, nil, 0},
		{"zero-length write", request{typ: nbdproto.CmdWrite}, nil, 0},
		{"large trim is fine", request{typ: nbdproto.CmdTrim, length: size / 2}, nil, 0},
	} {
		tc.r.cookie = uint64(len(tc.name))<<32 | 0xc0ffee
		if got := rawRequest(t, c, tc.r, tc.payload); got != tc.want {
			t.Errorf("%s: error %d, want %d", tc.name, got, tc.want)
		}
	}

	ro := s.rawGo(t, "ro")
	for _, r := range []request{
		{typ: nbdproto.CmdWrite, length: 3}, {typ: nbdproto.CmdTrim, length: 3}, {typ: nbdproto.CmdWriteZeroes, length: 3},
	} {
		var payload []byte
		if r.typ == nbdproto.CmdWrite {
			payload = []byte("abc")
		}
		if got := rawRequest(t, ro, r, payload); got != nbdproto.EPERM {
			t.Errorf("read-only %s: error %d, want EPERM", cmdName(r.typ), got)
		}
	}
	if got := rawRequest(t, ro, request{typ: nbdproto.CmdRead, length: 3}, nil); got != 0 {
		t.Errorf("read-only read: error %d", got)
	}

	t.Run("1 GiB write closes", func(t *testing.T) {
		c := s.rawGo(t, "a")
		if got := rawRequest(t, c, request{typ: nbdproto.CmdWrite, length: 1 << 30, cookie: 7}, make([]byte, 4096)); got != nbdproto.EINVAL {
			t.Fatalf("error %d, want EINVAL", got)
		}
		expectClosed(t, c)
	})
	t.Run("bad magic closes", func(t *testing.T) {
		c := s.rawGo(t, "a")
		b := appendRequest(nil, request{typ: nbdproto.CmdRead, length: 1})
		b[0] ^= 0xff
		c.Write(b)
		expectClosed(t, c)
	})
	t.Run("truncated header closes", func(t *testing.T) {
		c := s.rawGo(t, "a")
		c.Write(appendRequest(nil, request{typ: nbdproto.CmdRead, length: 1})[:10])
		c.(*net.UnixConn).CloseWrite()
		expectClosed(t, c)
	})
	t.Run("truncated payload closes", func(t *testing.T) {
		c := s.rawGo(t, "a")
		c.Write(appendRequest(nil, request{typ: nbdproto.CmdWrite, length: 100}))
		c.Write(make([]byte, 50))
		c.(*net.UnixConn).CloseWrite()
		expectClosed(t, c)
	})

	close(stop)
	if err := <-goodErr; err != nil {
		t.Fatalf("second client: %v", err)
	}
	if pf := s.srv.Stats().ProtocolFault; pf != 4 {
		t.Errorf("protocol faults = %d, want 4", pf)
	}
}

func TestGracefulShutdown(t *testing.T) {
	m := newMem(1 << 20)
	rec := &recorder{next: Direct(m), gate: make(chan struct{})}
	s := serve(t, Export{Name: "a", Backend: m, Mutator: rec})
	cl := s.dial(t, "a")
	done := make(chan error, 1)
	go func() { _, err := cl.WriteAt([]byte("in flight"), 0); done <- err }()
	for { // wait until the write reached the Mutator
		rec.mu.Lock()
		n := len(rec.got)
		rec.mu.Unlock()
		if n > 0 {
			break
		}
		time.Sleep(time.Millisecond)
	}
	s.cancel()
	time.Sleep(50 * time.Millisecond)
	select {
	case err := <-s.done:
		t.Fatalf("Serve returned (%v) with a request in flight", err)
	default:
	}
	close(rec.gate)
	if err := <-done; err != nil {
		t.Fatalf("in-flight write: %v", err)
	}
	if err := s.stop(); err != nil {
		t.Fatal(err)
	}
	if string(m.bytes(0, 9)) != "in flight" || m.syncs.Load() == 0 {
		t.Fatalf("data %q, syncs %d", m.bytes(0, 9), m.syncs.Load())
	}
	if _, err := os.Stat(s.sock); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("socket left behind: %v", err)
	}
	if _, err := net.Dial("unix", s.sock); err == nil {
		t.Fatal("still accepting after shutdown")
	}
}

func TestDisconnectSyncs(t *testing.T) {
	m := newMem(1 << 20)
	srv, err := NewServer(testLogger(t), Export{Name: "a", Backend: m})
	if err != nil {
		t.Fatal(err)
	}
	a, b := net.Pipe()
	done := make(chan error, 1)
	go func() { done <- srv.ServeConn(context.Background(), a) }()
	cl, err := nbdclient.Connect(b, "a")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := cl.WriteAt([]byte("x"), 0); err != nil {
		t.Fatal(err)
	}
	cl.Close()
	if err := <-done; err != nil {
		t.Fatalf("ServeConn: %v", err)
	}
	if m.syncs.Load() != 1 {
		t.Fatalf("syncs = %d, want 1 at disconnect", m.syncs.Load())
	}
}

func TestServeConnCancel(t *testing.T) {
	m := newMem(1 << 20)
	srv, err := NewServer(testLogger(t), Export{Name: "a", Backend: m})
	if err != nil {
		t.Fatal(err)
	}
	a, b := net.Pipe()
	defer b.Close()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.ServeConn(ctx, a) }()
	if _, err := nbdclient.Connect(b, "a"); err != nil {
		t.Fatal(err)
	}
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("ServeConn after cancel: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("ServeConn ignored cancellation")
	}
}

func TestManyClients(t *testing.T) {
	const size = 16 << 20
	dir := t.TempDir()
	f, err := OpenFile(dir+"/vol", size)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	s := serve(t, Export{Name: "a", Backend: f})
	// 4 connections x 4 concurrent workers, each on its own region with a
	// model of what it must read back.
	const clients, workers, region = 4, 4, size / 16
	var wg sync.WaitGroup
	errs := make(chan error, clients*workers)
	for ci := range clients {
		cl := s.dial(t, "a")
		for wi := range workers {
			wg.Add(1)
			go func() {
				defer wg.Done()
				model := make([]byte, region)
				base := int64((ci*workers + wi) * region)
				rng := rand.New(rand.NewPCG(uint64(ci), uint64(wi)))
				for i := range 200 {
					off := rng.IntN(region/4096) * 4096
					n := min((1+rng.IntN(32))*512, region-off)
					var err error
					switch rng.IntN(5) {
					case 0, 1:
						p := pattern(n, byte(i))
						_, err = cl.WriteAt(p, base+int64(off))
						copy(model[off:], p)
					case 2:
						err = cl.Trim(base+int64(off), uint32(n))
						clear(model[off : off+n])
					case 3:
						err = cl.WriteZeroes(base+int64(off), uint32(n), i%2 == 0)
						clear(model[off : off+n])
					case 4:
						got := make([]byte, n)
						if _, err = cl.ReadAt(got, base+int64(off)); err == nil && !bytes.Equal(got, model[off:off+n]) {
							err = fmt.Errorf("read %d@%d differs from model", n, off)
						}
					}
					if err != nil {
						errs <- fmt.Errorf("client %d worker %d op %d: %w", ci, wi, i, err)
						return
					}
				}
				errs <- cl.Flush()
			}()
		}
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Error(err)
		}
	}
}

// After a streak of fast requests the reader runs small requests itself;
// once the backend turns slow it must go back to handing them off, so that
// a request blocked in the backend does not hold up the next one.
func TestSlowBackendDisablesInline(t *testing.T) {
	m := newMem(1 << 20)
	var slow atomic.Bool
	secondDone := make(chan struct{})
	m.hook = func(op string, off int64, n int) error {
		if !slow.Load() || op != "read" {
			return nil
		}
		if off == 0 {
			select {
			case <-secondDone:
			case <-time.After(5 * time.Second):
				return syscall.ETIMEDOUT
			}
			return nil
		}
		time.Sleep(2 * time.Millisecond)
		return nil
	}
	s := serve(t, Export{Name: "a", Backend: m})
	cl := s.dial(t, "a")
	buf := make([]byte, 4096)
	for range 64 { // fast: inlining turns on
		if _, err := cl.ReadAt(buf, 8192); err != nil {
			t.Fatal(err)
		}
	}
	slow.Store(true)
	for range 16 { // 2 ms each: inlining turns off
		if _, err := cl.ReadAt(buf, 8192); err != nil {
			t.Fatal(err)
		}
	}
	first := make(chan error, 1)
	go func() { _, err := cl.ReadAt(make([]byte, 10), 0); first <- err }()
	time.Sleep(20 * time.Millisecond)
	if _, err := cl.ReadAt(make([]byte, 10), 4096); err != nil {
		t.Fatal(err)
	}
	close(secondDone)
	if err := <-first; err != nil {
		t.Fatalf("blocked read: %v", err)
	}
}

// A client that pipelines large reads and never reads the replies is
// paused by the server (bounded memory), and does not stop shutdown.
func TestClientNotReadingReplies(t *testing.T) {
	m := newMem(64 << 20)
	var reads atomic.Int64
	m.hook = func(op string, off int64, n int) error {
		if op == "read" {
			reads.Add(1)
		}
		return nil
	}
	s := serve(t, Export{Name: "a", Backend: m})
	s.srv.grace = 500 * time.Millisecond // before any connection
	c := s.rawGo(t, "a")
	go func() { // never reads a reply
		for i := range 10000 {
			if _, err := c.Write(appendRequest(nil, request{typ: nbdproto.CmdRead, cookie: uint64(i), length: 4 << 20})); err != nil {
				return
			}
		}
	}()
	time.Sleep(500 * time.Millisecond)
	// 4 MiB replies: one or two fill the socket buffer; then at most 8
	// requests hold big buffers and the reader stops.
	if n := reads.Load(); n == 0 || n > 12 {
		t.Fatalf("%d reads executed for a client that reads no reply; want 1..12", n)
	}
	start := time.Now()
	if err := s.stop(); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Fatalf("shutdown took %v", d)
	}
}
