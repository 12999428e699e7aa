package repl

import (
	"context"
	"sync"
	"testing"

	"github.com/doppelha/doppel/blockdev"
	"github.com/doppelha/doppel/daemon/repl/wire"
)

func benchApply(b *testing.B, mode wire.Mode, bs, depth int) {
	const size = 256 << 20
	srcB, tgtB := newMem(size), newMem(size)
	p := newPair(b, srcB, tgtB, pairOpts{mode: mode})
	defer p.stop()
	data := make([]byte, bs)
	b.SetBytes(int64(bs))
	b.ReportAllocs()
	var mu sync.Mutex
	next := 0
	b.ResetTimer()
	var wg sync.WaitGroup
	for range depth {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				mu.Lock()
				if next >= b.N {
					mu.Unlock()
					return
				}
				off := int64(next*bs) % size
				next++
				mu.Unlock()
				if err := p.src.Apply(context.Background(), &blockdev.Mutation{Op: blockdev.OpWrite, Offset: off, Length: int64(bs), Data: data}); err != nil {
					b.Error(err)
					return
				}
			}
		}()
	}
	wg.Wait()
	ctx := context.Background()
	p.src.WaitAcked(ctx)
}

func BenchmarkAsync1M(b *testing.B)     { benchApply(b, wire.ModeAsync, 1<<20, 16) }
func BenchmarkSync1M(b *testing.B)      { benchApply(b, wire.ModeSync, 1<<20, 16) }
func BenchmarkSync4KQD1(b *testing.B)   { benchApply(b, wire.ModeSync, 4096, 1) }
func BenchmarkAsync4KQD32(b *testing.B) { benchApply(b, wire.ModeAsync, 4096, 32) }
