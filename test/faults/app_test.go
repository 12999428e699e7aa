package faults

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/doppelha/doppel/blockdev/nbdclient"
)

// The application's blocks: 4 KiB each, one per 64 KiB chunk at varied
// offsets inside the chunk, on a 16 MiB volume.
const (
	blocks     = 64
	blockSize  = 4096
	volumeSize = 16 << 20
	workers    = 3                       // writes in flight per host
	pace       = 15 * time.Millisecond   // between a worker's writes
	opTimeout  = suspend + 5*time.Second // an answer later than this is a timeout
)

func blockOffset(b int) int64 { return int64(b)<<16 + int64(b%16)*blockSize }

// payload is a block holding value v: v in every 8 bytes (a torn write
// shows as mixed values).
func payload(v uint64) []byte {
	p := make([]byte, blockSize)
	for i := 0; i < blockSize; i += 8 {
		binary.LittleEndian.PutUint64(p[i:], v)
	}
	return p
}

// valueOf decodes a block read back.
func valueOf(p []byte) (uint64, error) {
	v := binary.LittleEndian.Uint64(p)
	for i := 8; i < len(p); i += 8 {
		if w := binary.LittleEndian.Uint64(p[i:]); w != v {
			return v, fmt.Errorf("torn block: value %d at 0, %d at %d", v, w, i)
		}
	}
	return v, nil
}

// recorder is the history of the round in progress.
type recorder struct {
	start time.Time
	next  atomic.Uint64 // the last value handed out
	mu    sync.Mutex
	ops   []Op
}

func (r *recorder) since() time.Duration { return time.Since(r.start) }

func (r *recorder) add(o Op) {
	r.mu.Lock()
	r.ops = append(r.ops, o)
	r.mu.Unlock()
}

func (r *recorder) snapshot() []Op {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]Op(nil), r.ops...)
}

// take returns the ops recorded so far and starts a new list.
func (r *recorder) take() []Op {
	r.mu.Lock()
	defer r.mu.Unlock()
	ops := r.ops
	r.ops = nil
	return ops
}

func (c *cluster) sock(h string) string {
	return filepath.Join(c.dir, h, "state", "run", jobName+".sock")
}

// dial connects to host h's export, bounded in time (a paused agent
// accepts but never negotiates).
func (c *cluster) dial(h string) (*nbdclient.Client, error) {
	conn, err := net.DialTimeout("unix", c.sock(h), time.Second)
	if err != nil {
		return nil, err
	}
	conn.SetDeadline(time.Now().Add(2 * time.Second))
	cl, err := nbdclient.Connect(conn, jobName)
	if err != nil {
		conn.Close()
		return nil, err
	}
	conn.SetDeadline(time.Time{})
	return cl, nil
}

// apps are the applications of both hosts: each writes through its own
// host's export whenever that host serves it (the one on the promoted
// side starts as a post-failover hook would start it; the one on the old
// source keeps trying, as a real application there would).
type apps struct {
	cancel context.CancelFunc
	wg     sync.WaitGroup
}

func (c *cluster) startApps(seed uint64) *apps {
	ctx, cancel := context.WithCancel(context.Background())
	a := &apps{cancel: cancel}
	for i, h := range []string{"vm1", "vm2"} {
		a.wg.Add(1)
		go func() {
			defer a.wg.Done()
			c.app(ctx, h, rand.New(rand.NewPCG(seed, uint64(i))))
		}()
	}
	return a
}

// stop ends the applications and waits for their writes in flight (each
// bounded by opTimeout).
func (a *apps) stop() {
	a.cancel()
	a.wg.Wait()
}

func (c *cluster) app(ctx context.Context, h string, rng *rand.Rand) {
	var mu sync.Mutex // rng
	for ctx.Err() == nil {
		cl, err := c.dial(h)
		if err != nil {
			sleep(ctx, 50*time.Millisecond)
			continue
		}
		var wg sync.WaitGroup
		var broken atomic.Bool
		for range workers {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for ctx.Err() == nil && !broken.Load() {
					mu.Lock()
					b := rng.IntN(blocks)
					mu.Unlock()
					switch c.write(cl, h, b) {
					case Lost, Timeout:
						broken.Store(true)
						cl.Conn().Close()
						return
					case EIO:
						sleep(ctx, 100*time.Millisecond)
					}
					sleep(ctx, pace)
				}
			}()
		}
		wg.Wait()
		cl.Conn().Close()
	}
}

// write writes a fresh value to block b through cl and records it.
func (c *cluster) write(cl *nbdclient.Client, h string, b int) Result {
	v := c.rec.next.Add(1)
	o := Op{Block: b, Value: v, Host: h, Invoke: c.rec.since()}
	done := make(chan error, 1)
	go func() {
		_, err := cl.WriteAt(payload(v), blockOffset(b))
		done <- err
	}()
	var err error
	select {
	case err = <-done:
		o.Return = c.rec.since()
		var nerr *nbdclient.Error
		switch {
		case err == nil:
			o.Result = OK
		case errors.As(err, &nerr):
			o.Result = EIO
		default:
			o.Result = Lost
		}
	case <-time.After(opTimeout):
		o.Return = c.rec.since()
		o.Result = Timeout
		err = fmt.Errorf("no answer within %v", opTimeout)
	}
	if err != nil {
		o.Err = err.Error()
	}
	c.rec.add(o)
	return o.Result
}

// readImage reads every block from host h's export.
func (c *cluster) readImage(h string) ([]uint64, error) {
	cl, err := c.dial(h)
	if err != nil {
		return nil, fmt.Errorf("read image from %s: %w", h, err)
	}
	defer cl.Close()
	img := make([]uint64, blocks)
	p := make([]byte, blockSize)
	for b := range blocks {
		if _, err := cl.ReadAt(p, blockOffset(b)); err != nil {
			return nil, fmt.Errorf("read block %d from %s: %w", b, h, err)
		}
		if img[b], err = valueOf(p); err != nil {
			return nil, fmt.Errorf("read block %d from %s: %w", b, h, err)
		}
	}
	return img, nil
}

func sleep(ctx context.Context, d time.Duration) {
	select {
	case <-ctx.Done():
	case <-time.After(d):
	}
}
