package repl

import (
	"bytes"
	"math/rand/v2"
	"testing"

	"github.com/doppelha/doppel/blockdev"
)

// sizeLog records the size of every write that reaches the backend.
type sizeLog struct {
	*memBackend
	sizes []int
}

func (s *sizeLog) WriteAt(p []byte, off int64) (int, error) {
	s.sizes = append(s.sizes, len(p))
	return s.memBackend.WriteAt(p, off)
}

func TestWritesSplitForThePageCache(t *testing.T) {
	b := &sizeLog{memBackend: newMem(4 << 20)}
	data := make([]byte, 1<<20+12345)
	for i := range data {
		data[i] = byte(rand.Uint32())
	}
	if err := applyTo(b, &blockdev.Mutation{Op: blockdev.OpWrite, Offset: 4096, Length: int64(len(data)), Data: data}); err != nil {
		t.Fatal(err)
	}
	if len(b.sizes) != 5 {
		t.Fatalf("%d writes (%v), want 5", len(b.sizes), b.sizes)
	}
	for _, n := range b.sizes {
		if n > pageWriteMax {
			t.Fatalf("a write of %d bytes reached the backend (max %d)", n, pageWriteMax)
		}
	}
	if got := b.snapshot()[4096 : 4096+len(data)]; !bytes.Equal(got, data) {
		t.Fatal("split write stored different bytes")
	}
	b.sizes = nil
	if err := applyTo(b, &blockdev.Mutation{Op: blockdev.OpWrite, Offset: 0, Length: 4096, Data: data[:4096]}); err != nil || len(b.sizes) != 1 {
		t.Fatalf("small write: %v, %d writes", err, len(b.sizes))
	}
}
