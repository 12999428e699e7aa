package blockdev

import (
	"bytes"
	"context"
	"sync"
	"testing"

	"github.com/doppelha/doppel/blockdev/nbdproto"
)

// retainer keeps every write's data past Apply (as a replication queue
// does) and releases it on demand.
type retainer struct {
	next     Mutator
	mu       sync.Mutex
	kept     [][]byte
	release  []func()
	zeroCopy int
}

func (r *retainer) Apply(ctx context.Context, m *Mutation) error {
	if m.Op == OpWrite {
		d, rel := m.Retain()
		r.mu.Lock()
		if len(d) > 0 && &d[0] == &m.Data[0] {
			r.zeroCopy++
		}
		r.kept, r.release = append(r.kept, d), append(r.release, rel)
		r.mu.Unlock()
		if d2, rel2 := m.Retain(); len(d2) > 0 && &d2[0] == &d[0] {
			panic("second Retain returned the lent buffer again")
		} else {
			rel2()
		}
	}
	return r.next.Apply(ctx, m)
}

// TestRetainKeepsTheServerBuffer: a retained write's data is the server's
// own buffer (no copy), and it is not reused for later requests until
// released.
func TestRetainKeepsTheServerBuffer(t *testing.T) {
	m := newMem(1 << 20)
	r := &retainer{next: Direct(m)}
	s := serve(t, Export{Name: "a", Backend: m, Mutator: r})
	cl := s.dial(t, "a")
	var want [][]byte
	for i := range 64 {
		d := bytes.Repeat([]byte{byte(i + 1)}, 4096<<(i%5))
		want = append(want, d)
		if err := cl.Do(nbdproto.CmdWrite, 0, uint64(i)*4096, 0, d); err != nil {
			t.Fatal(err)
		}
		if i == 31 { // half of them back to the pool: later writes may reuse them
			r.mu.Lock()
			for _, rel := range r.release {
				rel()
				rel() // a second call does nothing
			}
			r.kept, r.release, want = nil, nil, nil
			r.mu.Unlock()
		}
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.zeroCopy != 64 {
		t.Errorf("%d of 64 writes were lent without a copy", r.zeroCopy)
	}
	for i, d := range r.kept {
		if !bytes.Equal(d, want[i]) {
			t.Fatalf("retained write %d changed after later requests", i+32)
		}
	}
	// A Mutation built elsewhere: Retain copies.
	mu := Mutation{Op: OpWrite, Length: 3, Data: []byte("abc")}
	d, rel := mu.Retain()
	rel()
	if string(d) != "abc" || &d[0] == &mu.Data[0] {
		t.Fatal("Retain of a Mutation without a server buffer must copy")
	}
}
