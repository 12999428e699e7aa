package replstate

import (
	"bytes"
	"context"
	"math/rand/v2"
	"path/filepath"
	"testing"
	"time"

	"github.com/doppelha/doppel/blockdev"
	"github.com/doppelha/doppel/daemon/repl"
	"github.com/doppelha/doppel/daemon/repl/wire"
)

// TestSyncTimeoutTracking: sync mode with the target gone: writes wait
// SyncTimeout, then the source continues in tracking mode (status and
// metrics say so) and catches up when the target is back.
func TestSyncTimeoutTracking(t *testing.T) {
	const size = 4 << 20
	dir := t.TempDir()
	aFile, bFile := filepath.Join(dir, "a.img"), filepath.Join(dir, "b.img")
	rng := rand.New(rand.NewPCG(6, 6))
	p := &pair{t: t, nw: &memNet{up: true}, size: size}
	p.startTarget(filepath.Join(dir, "b"), bFile, "")
	p.startSource(SourceConfig{Dir: filepath.Join(dir, "a"), Mode: wire.ModeSync, SyncTimeout: 300 * time.Millisecond}, aFile)
	p.converge(20 * time.Second)
	start := time.Now()
	p.write(0, randBytes(rng, 4096))
	if d := time.Since(start); d > 2*time.Second {
		t.Fatalf("a sync write with the target up took %v", d)
	}
	p.nw.set(false)
	start = time.Now()
	p.write(8192, randBytes(rng, 4096))
	waited := time.Since(start)
	if waited < 250*time.Millisecond || waited > 3*time.Second {
		t.Fatalf("first write without the target returned after %v, want about the 300ms sync timeout", waited)
	}
	st := p.src.Status()
	if !st.Tracking || st.State != "tracking" {
		t.Fatalf("status after the timeout: %+v", st)
	}
	start = time.Now()
	for i := range 20 {
		p.write(int64(i)*65536, randBytes(rng, 65536))
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Fatalf("writes in tracking mode took %v: they wait for the target", d)
	}
	p.nw.set(true)
	st = p.converge(20 * time.Second)
	if st.Tracking {
		t.Fatalf("still tracking after reconnect: %+v", st)
	}
	p.stopSource()
	p.stopTarget()
	sameFiles(t, aFile, bFile)
}

// TestPlainSourceToStateTarget: a source without a state dir still
// replicates to a target with one (the handshake is optional).
func TestPlainSourceToStateTarget(t *testing.T) {
	const size = 1 << 20
	dir := t.TempDir()
	nw := &memNet{up: true}
	p := &pair{t: t, nw: nw, size: size}
	bFile := filepath.Join(dir, "b.img")
	p.startTarget(filepath.Join(dir, "b"), bFile, "")
	a := openFile(t, filepath.Join(dir, "a.img"), size)
	src, err := repl.NewStream(repl.StreamConfig{Backend: a, Mode: wire.ModeSync, Dial: nw.dial})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- src.Run(ctx) }()
	data := bytes.Repeat([]byte{7}, 8192)
	wctx, wcancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer wcancel()
	if err := src.Apply(wctx, &blockdev.Mutation{Op: blockdev.OpWrite, Offset: 4096, Length: 8192, Data: data}); err != nil {
		t.Fatal(err)
	}
	cancel()
	<-done
	src.Close()
	p.stopTarget()
	got := make([]byte, 8192)
	b := openFile(t, bFile, size)
	b.ReadAt(got, 4096)
	if !bytes.Equal(got, data) {
		t.Fatal("target did not apply the plain source's write")
	}
}

// FuzzReadMsg: the handshake decoder never panics and refuses oversized
// lengths.
func FuzzReadMsg(f *testing.F) {
	var buf bytes.Buffer
	writeMsg(&buf, hello{VolumeSize: 1 << 20, ChunkSize: 4096, Gen: []byte{1, 2}, Notify: true})
	f.Add(buf.Bytes())
	buf.Reset()
	writeMsg(&buf, commit{Outcome: "in-sync", Resync: true})
	f.Add(buf.Bytes())
	f.Add([]byte{0xff, 0xff, 0xff, 0xff})
	f.Add([]byte{0, 0, 0, 2, '{', '}'})
	f.Fuzz(func(t *testing.T, b []byte) {
		var h hello
		if err := readMsg(bytes.NewReader(b), &h); err == nil {
			var again bytes.Buffer
			if err := writeMsg(&again, h); err != nil {
				t.Fatal(err)
			}
			var h2 hello
			if err := readMsg(&again, &h2); err != nil {
				t.Fatalf("re-decode: %v", err)
			}
		}
		var r reply
		readMsg(bytes.NewReader(b), &r)
		var c commit
		readMsg(bytes.NewReader(b), &c)
	})
}

// TestManyRestartsDuringOutage: a source restarted more often than the
// generation history is long while the target is away still finds the
// target's generation in its history (one new generation per outage).
func TestManyRestartsDuringOutage(t *testing.T) {
	const size = 1 << 20
	dir := t.TempDir()
	aFile, bFile := filepath.Join(dir, "a.img"), filepath.Join(dir, "b.img")
	rng := rand.New(rand.NewPCG(7, 7))
	p := &pair{t: t, nw: &memNet{up: true}, size: size}
	p.startTarget(filepath.Join(dir, "b"), bFile, "")
	cfg := SourceConfig{Dir: filepath.Join(dir, "a")}
	p.startSource(cfg, aFile)
	p.converge(20 * time.Second)
	p.nw.set(false)
	for i := range 20 {
		p.write(int64(i)*4096, randBytes(rng, 4096))
		p.srcStop() // kill -9
		<-p.srcErr
		p.startSource(cfg, aFile)
	}
	if h := len(p.src.Status().History); h > 3 {
		t.Fatalf("%d generations in the history after one outage", h)
	}
	p.nw.set(true)
	p.converge(20 * time.Second)
	p.stopSource()
	p.stopTarget()
	sameFiles(t, aFile, bFile)
}

// TestStopWithSyncWriteWaiting: a sync write waits for a target that is
// gone (the peer was promoted) and the source is stopped meanwhile (the
// agent fences it, or hands the role over): the write stops waiting (its
// change is tracked for the next start) and Close returns. Close used to
// wait for the write, and the write for an acknowledgement nobody would
// send: the agent hung.
func TestStopWithSyncWriteWaiting(t *testing.T) {
	const size = 1 << 20
	dir := t.TempDir()
	aFile, bFile := filepath.Join(dir, "a.img"), filepath.Join(dir, "b.img")
	p := &pair{t: t, nw: &memNet{up: true}, size: size}
	p.startTarget(filepath.Join(dir, "b"), bFile, "")
	p.startSource(SourceConfig{Dir: filepath.Join(dir, "a"), Mode: wire.ModeSync, SyncTimeout: time.Hour}, aFile)
	p.converge(20 * time.Second)
	p.nw.set(false)
	wrote := make(chan error, 1)
	go func() {
		wrote <- p.src.Apply(t.Context(), &blockdev.Mutation{Op: blockdev.OpWrite, Offset: 0, Length: 4096, Data: bytes.Repeat([]byte{9}, 4096)})
	}()
	time.Sleep(100 * time.Millisecond) // the write waits for the target
	stopped := make(chan error, 1)
	go func() { stopped <- p.stopSource() }()
	select {
	case err := <-stopped:
		if err != nil {
			t.Fatalf("stop: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("stopping the source hangs on a sync write waiting for a gone target")
	}
	if err := <-wrote; err != nil {
		t.Fatalf("the waiting write: %v", err)
	}
	p.stopTarget()
}
