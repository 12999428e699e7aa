package agent

import (
	"sync"

	"github.com/doppelha/doppel/daemon/repl"
)

// chunkSet counts the distinct chunks (repl.DefaultChunkSize, the resync
// granularity) a side wrote while not replicating. It is bounded: past
// maxChangedChunks it stops adding and reports what it holds (a lower
// bound; status is then an underestimate of a very large divergence).
type chunkSet struct {
	mu sync.Mutex
	m  map[int64]struct{}
}

const maxChangedChunks = 1 << 20 // 64 GiB of 64 KiB chunks

func (c *chunkSet) add(off, n int64) {
	if n <= 0 {
		return
	}
	const chunk = repl.DefaultChunkSize
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.m == nil {
		c.m = map[int64]struct{}{}
	}
	for i := off / chunk; i <= (off+n-1)/chunk && len(c.m) < maxChangedChunks; i++ {
		c.m[i] = struct{}{}
	}
}

func (c *chunkSet) bytes() int64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return int64(len(c.m)) * repl.DefaultChunkSize
}

func (c *chunkSet) reset() {
	c.mu.Lock()
	c.m = nil
	c.mu.Unlock()
}
