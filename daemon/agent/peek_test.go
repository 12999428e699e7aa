package agent

import "testing"

func TestChunkSet(t *testing.T) {
	var c chunkSet
	c.add(0, 1)
	c.add(4096, 4096)    // same chunk
	c.add(65536-1, 2)    // chunks 0 and 1
	c.add(10<<16, 3<<16) // chunks 10, 11, 12
	c.add(20<<16, 0)     // nothing
	if got := c.bytes(); got != 5<<16 {
		t.Fatalf("%d bytes, want 5 chunks", got)
	}
	c.reset()
	if c.bytes() != 0 {
		t.Fatal("reset kept chunks")
	}
}
