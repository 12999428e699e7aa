package blockdev

import (
	"math/bits"
	"sync"
)

// Payload buffers are pooled by power-of-two size class, from 4 KiB up to
// MaxPayload, so that a steady stream of requests allocates nothing.
const (
	minClassShift = 12 // 4 KiB
	maxClassShift = 25 // 32 MiB == MaxPayload
)

var bufPools [maxClassShift - minClassShift + 1]sync.Pool

func sizeClass(n int) int {
	if n <= 1<<minClassShift {
		return 0
	}
	return bits.Len(uint(n-1)) - minClassShift
}

// getBuf returns a buffer of length n (n <= MaxPayload) from the pool.
func getBuf(n int) *[]byte {
	c := sizeClass(n)
	if p, ok := bufPools[c].Get().(*[]byte); ok {
		*p = (*p)[:n]
		return p
	}
	b := make([]byte, n, 1<<(c+minClassShift))
	return &b
}

// putBuf returns a buffer obtained from getBuf.
func putBuf(p *[]byte) {
	if p == nil {
		return
	}
	c := cap(*p)
	if c < 1<<minClassShift || c&(c-1) != 0 {
		return // not ours
	}
	bufPools[sizeClass(c)].Put(p)
}
