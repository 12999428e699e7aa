package blockdev

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"time"

	"github.com/doppelha/doppel/blockdev/nbdproto"
)

// op is one request in flight. ops are pooled; an op's buffer holds the
// write payload or the read data.
type op struct {
	cn     *tconn
	req    request
	buf    *[]byte // payload (write) or data (read); nil otherwise
	errno  uint32
	big    bool // holds a slot of tconn.big
	m      Mutation
	lendFn func() ([]byte, func()) // o.lend, made once per op
	header [nbdproto.ReplyHeaderLen]byte
}

var opPool = sync.Pool{New: func() any {
	o := new(op)
	o.lendFn = o.lend
	return o
}}

// lend hands o's payload buffer over to a Mutator (Mutation.Retain): o
// forgets it, and the returned release puts it back in the pool (once).
func (o *op) lend() ([]byte, func()) {
	p := o.buf
	if p == nil {
		return nil, nil
	}
	o.buf = nil
	var done atomic.Bool
	return *p, func() {
		if done.CompareAndSwap(false, true) {
			putBuf(p)
		}
	}
}

// tconn is the transmission phase of one connection.
//
// Requests are served by a pool of worker goroutines in leader/follower
// fashion (as nbdkit's threads do): the worker holding the read lock reads
// one request (and a write's payload), passes the lock on and processes the
// request itself, then queues for the lock again. At queue depth 1 a
// request is therefore read, executed and answered by one goroutine with
// no hand-off; under load up to MaxInFlight requests run at once. Workers
// start on demand: when the reader finds nobody queued behind it.
type tconn struct {
	*conn
	ctx      context.Context // requests run under it (not cancelled by shutdown)
	x        *export
	max      int32
	nwrk     atomic.Int32 // workers started
	waiting  atomic.Int32 // workers queued for the read lock
	wg       sync.WaitGroup
	w        replyWriter
	wrot     atomic.Bool  // a write, trim or zero was applied: sync at disconnect
	slowFrac atomic.Int64 // moving fraction of slow small reads/writes (x slowScale)
	wslow    atomic.Int64 // moving fraction of writes over serialSlow (x slowScale; serial exports)
	samples  atomic.Int32
	pipeFrac int64         // moving fraction of requests read with others alive (x slowScale); under rmu
	lend     *time.Timer   // passes the read role on when a request run by the reader is slow
	lent     chan struct{} // lendRead has released the read role

	slots chan struct{} // one per request alive (read, running or replying)
	big   chan struct{} // one per request with a buffer over bigBuffer

	rmu  sync.Mutex // the reading role; guards the fields below and cn.br
	done bool       // no more requests: DISC, EOF, error
	err  error      // why reading ended, when it is a failure
	hb   [nbdproto.RequestHeaderLen]byte
	// handedOver: reading stopped for a handover (cn.pending holds the
	// bytes read and not processed).
	handedOver bool
}

// errHandedOver ends transmit when the connection was handed over.
var errHandedOver = errors.New("connection handed over")

// stopForHandover ends reading for a handover: what was read of the next
// request (prefix) and what the read buffer holds go to cn.pending.
// Called by the reader, with rmu held.
func (t *tconn) stopForHandover(prefix ...[]byte) {
	t.done, t.handedOver = true, true
	var p []byte
	for _, b := range prefix {
		p = append(p, b...)
	}
	if n := t.br.Buffered(); n > 0 {
		b, _ := t.br.Peek(n)
		p = append(p, b...)
	}
	t.pending = p
}

// transmit runs the transmission phase until the client disconnects, the
// connection fails or is cancelled.
func (cn *conn) transmit(ctx context.Context, x *export) error {
	n := cn.s.MaxInFlight
	if n <= 0 {
		n = 128
	}
	t := &tconn{conn: cn, ctx: context.WithoutCancel(ctx), x: x, max: int32(n),
		slots: make(chan struct{}, n), big: make(chan struct{}, maxBig)}
	t.w.c = cn.c
	t.lent = make(chan struct{}, 1)
	t.lend = time.AfterFunc(time.Hour, t.lendRead)
	t.lend.Stop()
	// Large socket buffers let a 1 MiB reply leave in one writev instead of
	// several partial writes with a poller wake-up between each (the kernel
	// caps them at net.core.wmem_max/rmem_max).
	if sb, ok := cn.c.(interface {
		SetWriteBuffer(int) error
		SetReadBuffer(int) error
	}); ok {
		sb.SetWriteBuffer(socketBuffer)
		sb.SetReadBuffer(socketBuffer)
	}
	t.nwrk.Store(1)
	t.wg.Add(1)
	go t.worker()
	// Every request read gets its reply before the workers exit.
	t.wg.Wait()
	if t.handedOver {
		t.w.flush()
		if werr := t.w.failed(); werr != nil {
			return fmt.Errorf("send reply: %w", werr)
		}
		return errHandedOver
	}
	if t.wrot.Load() {
		if serr := x.mut.Apply(t.ctx, &Mutation{Op: OpFlush}); serr != nil {
			cn.log.Warn("nbd: sync at disconnect failed", "export", x.Name, "err", serr)
		}
	}
	err := t.err
	if werr := t.w.failed(); werr != nil && err == nil {
		err = fmt.Errorf("send reply: %w", werr)
	}
	return err
}

// isReadInterrupt reports whether err is the read deadline set by cancel.
func isReadInterrupt(err error) bool {
	return errors.Is(err, os.ErrDeadlineExceeded)
}

func (t *tconn) worker() {
	defer t.wg.Done()
	for {
		t.waiting.Add(1)
		t.rmu.Lock()
		t.waiting.Add(-1)
		var o *op
		lent := false
		for !t.done {
			o = t.next()
			if o == nil {
				break
			}
			if t.inline(o) {
				// Small and recently fast: run it while keeping the read
				// role (no goroutine wake-up); its reply leaves with the
				// others read in the same batch (see next).
				t.handle(o, true)
				o = nil
				continue
			}
			if t.serialInline(o) {
				// A write to a file, which takes writes one at a time:
				// run it here too (see serialInline).
				t.handle(o, true)
				o = nil
				continue
			}
			if t.lendable(o) {
				// Slow, but the client sends one request at a time: run
				// it here too, passing the read role on only if it runs
				// long (see handleLent).
				lent = !t.handleLent(o)
				o = nil
				if lent {
					break
				}
				continue
			}
			break
		}
		if lent {
			continue // the read role was passed on while o ran
		}
		t.w.flush()
		if o != nil && !t.done && t.waiting.Load() == 0 && t.nwrk.Load() < t.max {
			t.spawn()
		}
		t.rmu.Unlock()
		if o == nil {
			return
		}
		t.handle(o, false)
	}
}

// spawn starts one more worker. Called by the holder of the read role.
func (t *tconn) spawn() {
	t.nwrk.Add(1)
	t.wg.Add(1)
	go t.worker()
}

// Inline execution. Waking another goroutine to take over reading costs a
// thread switch, which on small requests is most of the time spent (page
// cache reads and writes take a few microseconds). So the reader runs a
// request itself when it is a plain READ or WRITE of at most inlineMaxLen
// bytes and such requests have recently been fast: fewer than a quarter of
// the last dozen or so took over inlineSlow. Their replies are held and
// written together (one writev) when no further request is buffered. That
// is one read, one pread/pwrite per request and one writev per batch, with
// no hand-off. A slow backend or Mutator (disk cache misses, synchronous
// replication) turns inlining off, and requests then run concurrently on
// the workers, so that a slow request never holds up the next one. Counting
// slow requests rather than averaging durations keeps a busy machine's
// occasional preemption from flipping the decision.
const (
	inlineMaxLen     = 256 << 10
	inlineSlow       = 50 * time.Microsecond
	inlineMinSamples = 16
	slowScale        = 1024 // slowFrac fixed point: 1024 = every request slow
)

// A client that waits for each reply before sending the next request (queue
// depth 1) gains nothing from concurrency however slow its requests are:
// there is never a second request to start, and handing the read role over
// only adds goroutine (and thread) wake-ups per request. So when recently
// almost every request arrived alone (no other request alive on the
// connection, nothing further buffered), a small request that is not
// inlined is still run by the reader, under a timer: should it run longer
// than lendAfter, the timer passes the read role on (as the concurrent path
// does at once), so that a request sent meanwhile is neither held up by a
// slow one nor left unread. A client that starts pipelining is noticed at
// its next request, and a few such requests bring the concurrent path back.
const lendAfter = 500 * time.Microsecond

func (t *tconn) inline(o *op) bool {
	return t.small(o) && t.slowFrac.Load() < slowScale/4
}

// small reports whether o is a plain READ or WRITE eligible for running on
// the reader, once enough requests have been timed.
func (t *tconn) small(o *op) bool {
	r := &o.req
	return (r.typ == nbdproto.CmdRead || r.typ == nbdproto.CmdWrite && r.flags == 0) && r.length <= inlineMaxLen &&
		o.errno == 0 && t.samples.Load() >= inlineMinSamples
}

// Writes to a regular file (x.serial, Direct backend) run one at a time
// anyway: File.WriteAt serialises them, as the kernel's inode lock would.
// Handing each to a worker then buys only the overlap of reading the next
// request with the write, and costs goroutine and thread wake-ups on every
// request (1 MiB writes at iodepth 16: 6 futex calls per write against
// 1.1 for go-nbd's one-at-a-time loop). So the reader runs plain writes of
// any size itself, as long as they stay fast: when over a quarter of the
// recent ones took more than serialSlow (dirty-page throttling, a loaded
// disk), they go to the workers again, so that reads sent meanwhile are
// not held up behind them.
const serialSlow = 2 * time.Millisecond

func (t *tconn) serialInline(o *op) bool {
	r := &o.req
	return t.x.serial && r.typ == nbdproto.CmdWrite && r.flags == 0 && o.errno == 0 &&
		t.wslow.Load() < slowScale/4
}

// lendable reports whether o, not inlined, should still run on the reader
// under the lendAfter timer: the client has recently sent requests one at a
// time. Called under rmu.
func (t *tconn) lendable(o *op) bool {
	return t.pipeFrac < slowScale/4 && t.small(o)
}

// observe folds one small read or write into the moving fraction of slow
// requests (weight 1/8).
func (t *tconn) observe(d time.Duration) {
	var x int64
	if d > inlineSlow {
		x = slowScale
	}
	f := t.slowFrac.Load()
	t.slowFrac.Store(f + (x-f)/8)
	if t.samples.Load() < inlineMinSamples {
		t.samples.Add(1)
	}
}

// observePipe folds whether the request just read arrived alone into
// pipeFrac (weight 1/8). Called under rmu.
func (t *tconn) observePipe() {
	var x int64
	if len(t.slots) > 1 || t.br.Buffered() > 0 {
		x = slowScale
	}
	t.pipeFrac += (x - t.pipeFrac) / 8
}

// handleLent runs o on the goroutine holding the read role, with the lend
// timer armed. It reports whether that goroutine still holds the role
// (the reply is then held, as an inlined one); when the timer passed the
// role on, the reply is sent at once and the caller queues for the role.
func (t *tconn) handleLent(o *op) bool {
	t.lend.Reset(lendAfter)
	t.exec(o)
	if t.lend.Stop() {
		t.reply(o, true)
		return true
	}
	<-t.lent // lendRead has released the role
	t.reply(o, false)
	return false
}

// lendRead runs on the lend timer: the request running on the reader is
// slow, so the read role passes to a queued worker (one is started if none
// is queued), on the reader's behalf.
func (t *tconn) lendRead() {
	if t.waiting.Load() == 0 && t.nwrk.Load() < t.max {
		t.spawn()
	}
	t.rmu.Unlock()
	t.lent <- struct{}{}
}

// next reads one request under the read lock. It returns nil and sets done
// (and err for a failure) when the connection ends; an oversized write
// that ends the connection is returned with done set so that it is answered.
func (t *tconn) next() *op {
	if t.handing.Load() && t.w.failed() == nil {
		t.stopForHandover()
		return nil
	}
	if t.stopped.Load() || t.w.failed() != nil {
		// Shutting down, or the client is gone: requests still sitting in
		// the read buffer are not started.
		t.done = true
		return nil
	}
	if t.br.Buffered() < nbdproto.RequestHeaderLen {
		t.w.flush() // held replies go out before the reader may block
	}
	if n, err := io.ReadFull(t.br, t.hb[:]); err != nil {
		if t.handing.Load() && isReadInterrupt(err) {
			t.stopForHandover(t.hb[:n])
			return nil
		}
		t.done = true
		switch {
		case errors.Is(err, io.EOF): // hung up between requests
			t.s.removeClient(t.conn) // gone: the requests it left finish
		case errors.Is(err, io.ErrUnexpectedEOF):
			t.err = errors.New("truncated request header")
		case t.w.failed() != nil: // the writer closed the connection; it reports
		default:
			t.err = fmt.Errorf("read request: %w", err)
		}
		return nil
	}
	req, err := parseRequest(t.hb[:])
	if err != nil {
		t.done, t.err = true, err
		return nil
	}
	if req.typ == nbdproto.CmdDisc {
		t.done = true
		t.s.removeClient(t.conn) // gone: the requests it left finish
		return nil
	}
	// Bound the requests alive on this connection, replies not yet sent
	// included: a client that sends without reading replies is paused
	// here instead of growing the server's memory.
	select {
	case t.slots <- struct{}{}:
	default:
		t.w.flush()
		t.slots <- struct{}{}
	}
	o := opPool.Get().(*op)
	o.cn, o.req, o.errno = t, req, 0
	if req.typ == nbdproto.CmdWrite {
		if err := t.readPayload(o); err != nil {
			if errors.Is(err, errHandedOver) {
				t.release(o)
				return nil
			}
			t.done, t.err = true, err
			if o.errno != 0 {
				return o // oversized beyond skipping: answer, then close
			}
			t.release(o)
			return nil
		}
	}
	t.observePipe()
	return o
}

// Requests with buffers over bigBuffer also take one of maxBig slots, so
// that one connection holds at most maxBig*MaxPayload (256 MiB) of payload
// buffers however its client pipelines.
const (
	socketBuffer = 4 << 20
	bigBuffer    = 1 << 20
	maxBig       = 8
)

func (t *tconn) bigSlot(o *op) {
	if o.req.length > bigBuffer && !o.big {
		select {
		case t.big <- struct{}{}:
		default:
			t.w.flush()
			t.big <- struct{}{}
		}
		o.big = true
	}
}

// readPayload reads a write's payload into o.buf. An oversized write is
// answered with EINVAL; its payload is skipped when it is at most twice the
// limit and the connection is closed otherwise (re-synchronising would mean
// reading up to 4 GiB from a misbehaving client).
func (t *tconn) readPayload(o *op) error {
	n := int64(o.req.length)
	if n > MaxPayload {
		o.errno = nbdproto.EINVAL
		t.s.stats.writes.Add(1)
		if n > 2*MaxPayload {
			return fmt.Errorf("write of %d bytes exceeds the %d-byte limit", n, MaxPayload)
		}
		t.w.flush()
		if _, err := io.CopyN(io.Discard, t.br, n); err != nil {
			return fmt.Errorf("skip oversized write payload: %w", err)
		}
		return nil
	}
	t.bigSlot(o)
	o.buf = getBuf(int(n))
	if t.br.Buffered() < int(n) {
		t.w.flush()
	}
	if m, err := io.ReadFull(t.br, *o.buf); err != nil {
		if t.handing.Load() && isReadInterrupt(err) {
			// The request goes to the new owner whole: its header
			// (still in hb: the reader has not read another) and what
			// came of its payload.
			t.stopForHandover(t.hb[:], (*o.buf)[:m])
			return errHandedOver
		}
		return fmt.Errorf("read write payload (%d bytes): %w", n, err)
	}
	return nil
}

// handle processes one request and sends its reply.
func (t *tconn) handle(o *op, hold bool) {
	t.exec(o)
	t.reply(o, hold)
}

// exec performs o, timing small reads and writes for the inline decision.
func (t *tconn) exec(o *op) {
	if o.errno == 0 {
		r := &o.req
		small := (r.typ == nbdproto.CmdRead || r.typ == nbdproto.CmdWrite) && r.length <= inlineMaxLen
		if small || t.x.serial && r.typ == nbdproto.CmdWrite {
			start := time.Now()
			o.errno = t.do(o)
			d := time.Since(start)
			if small {
				t.observe(d)
			}
			if t.x.serial && r.typ == nbdproto.CmdWrite {
				var x int64
				if d > serialSlow {
					x = slowScale
				}
				f := t.wslow.Load()
				t.wslow.Store(f + (x-f)/8)
			}
		} else {
			o.errno = t.do(o)
		}
	}
}

// reply encodes o's reply and queues it (see replyWriter.send).
func (t *tconn) reply(o *op, hold bool) {
	if o.errno != 0 {
		t.s.stats.errors.Add(1)
		if o.buf != nil {
			putBuf(o.buf)
			o.buf = nil
		}
	}
	putReply(o.header[:], o.errno, o.req.cookie)
	t.w.send(o, hold)
}

// do performs o and returns its NBD error (0 on success). A panic in a
// backend or Mutator is contained here and answered with EIO.
func (t *tconn) do(o *op) (errno uint32) {
	defer func() {
		if r := recover(); r != nil {
			t.log.Error("nbd: request handler panicked", "op", cmdName(o.req.typ), "panic", r, "stack", string(debug.Stack()))
			errno = nbdproto.EIO
		}
	}()
	x, r := t.x, &o.req
	st := &t.s.stats
	if r.flags&^nbdproto.KnownCmdFlags != 0 {
		return nbdproto.EINVAL
	}
	fua := r.flags&nbdproto.CmdFlagFUA != 0
	if fua {
		st.fua.Add(1)
	}
	end := r.offset + uint64(r.length)
	inRange := end >= r.offset && end <= x.size
	switch r.typ {
	case nbdproto.CmdRead:
		st.reads.Add(1)
		if r.length > MaxPayload || !inRange {
			return nbdproto.EINVAL
		}
		t.bigSlot(o)
		o.buf = getBuf(int(r.length))
		if _, err := x.Backend.ReadAt(*o.buf, int64(r.offset)); err != nil {
			t.log.Debug("nbd: read failed", "off", r.offset, "len", r.length, "err", err)
			return nbdError(err)
		}
		st.bytesRead.Add(uint64(r.length))
		return 0
	case nbdproto.CmdWrite:
		st.writes.Add(1)
		defer func() { putBuf(o.buf); o.buf = nil }()
		switch {
		case x.ReadOnly:
			return nbdproto.EPERM
		case !inRange:
			return nbdproto.ENOSPC
		}
		o.m = Mutation{Op: OpWrite, Offset: int64(r.offset), Length: int64(r.length), Data: *o.buf, FUA: fua, lend: o.lendFn}
		if errno := t.apply(o); errno != 0 {
			return errno
		}
		st.bytesWritten.Add(uint64(r.length))
		return 0
	case nbdproto.CmdFlush:
		st.flushes.Add(1)
		o.m = Mutation{Op: OpFlush}
		if errno := t.apply(o); errno != 0 {
			return errno
		}
		return 0
	case nbdproto.CmdTrim:
		st.trims.Add(1)
		switch {
		case x.ReadOnly:
			return nbdproto.EPERM
		case !inRange:
			return nbdproto.EINVAL
		}
		o.m = Mutation{Op: OpTrim, Offset: int64(r.offset), Length: int64(r.length), FUA: fua}
		if errno := t.apply(o); errno != 0 {
			return errno
		}
		st.bytesTrimmed.Add(uint64(r.length))
		return 0
	case nbdproto.CmdWriteZeroes:
		st.zeroes.Add(1)
		switch {
		case x.ReadOnly:
			return nbdproto.EPERM
		case !inRange:
			return nbdproto.ENOSPC
		case r.flags&nbdproto.CmdFlagFastZero != 0 && !x.fast:
			return nbdproto.ENOTSUP
		}
		o.m = Mutation{Op: OpWriteZeroes, Offset: int64(r.offset), Length: int64(r.length), FUA: fua, NoHole: r.flags&nbdproto.CmdFlagNoHole != 0}
		if errno := t.apply(o); errno != 0 {
			return errno
		}
		st.bytesZeroed.Add(uint64(r.length))
		return 0
	}
	return nbdproto.EINVAL
}

// apply passes o.m through the export's Mutator.
func (t *tconn) apply(o *op) uint32 {
	if o.m.Length == 0 && o.m.Op != OpFlush {
		return 0
	}
	err := t.x.mut.Apply(t.ctx, &o.m)
	o.m.Data = nil
	if err != nil {
		t.log.Debug("nbd: mutation failed", "op", o.m.Op, "off", o.m.Offset, "len", o.m.Length, "err", err)
		return nbdError(err)
	}
	if o.m.Op != OpFlush {
		t.wrot.Store(true)
	}
	return 0
}

// release returns o (and its buffer) to the pools.
func (t *tconn) release(o *op) {
	if o.buf != nil {
		putBuf(o.buf)
		o.buf = nil
	}
	if o.big {
		o.big = false
		<-t.big
	}
	<-t.slots
	o.cn = nil
	o.m = Mutation{}
	opPool.Put(o)
}

// replyWriter serialises replies on the connection. The goroutine that
// finds it idle becomes the writer and keeps writing until no reply is
// queued, so at queue depth 1 a reply goes out from the request's own
// goroutine, and under load several replies leave in one writev.
type replyWriter struct {
	c       net.Conn
	mu      sync.Mutex
	pending []*op
	spare   []*op
	writing bool
	err     error
	iov     net.Buffers // reused vector of the batch
	bufs    net.Buffers // what WriteTo consumes (a field: no escape)
}

func (w *replyWriter) failed() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.err
}

// send queues o's reply (the header already encoded) and, unless hold is
// set, writes everything queued. A caller that holds replies must call
// flush before it may block.
func (w *replyWriter) send(o *op, hold bool) {
	w.mu.Lock()
	w.pending = append(w.pending, o)
	if w.writing || hold {
		w.mu.Unlock()
		return
	}
	w.drain()
}

// flush writes the replies queued, unless another goroutine is writing
// (it will write them).
func (w *replyWriter) flush() {
	w.mu.Lock()
	if w.writing || len(w.pending) == 0 {
		w.mu.Unlock()
		return
	}
	w.drain()
}

// drain is called with mu held and releases it: it writes batches until
// none is queued.
func (w *replyWriter) drain() {
	w.writing = true
	for len(w.pending) > 0 {
		batch := w.pending
		w.pending = w.spare[:0]
		err := w.err
		w.mu.Unlock()

		if err == nil {
			iov := w.iov[:0]
			for _, b := range batch {
				iov = append(iov, b.header[:])
				if b.errno == 0 && b.req.typ == nbdproto.CmdRead && b.buf != nil {
					iov = append(iov, *b.buf)
				}
			}
			w.iov = iov[:0]
			w.bufs = iov
			if _, err = w.bufs.WriteTo(w.c); err != nil {
				// The client is gone: stop the reader too.
				w.c.Close()
			}
			clear(iov)
			w.bufs = nil
		}
		for i, b := range batch {
			b.cn.release(b)
			batch[i] = nil
		}

		w.mu.Lock()
		if err != nil && w.err == nil {
			w.err = err
		}
		w.spare = batch[:0]
	}
	w.writing = false
	w.mu.Unlock()
}
