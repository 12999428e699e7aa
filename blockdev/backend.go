// Package blockdev is doppel's block layer: the NBD server that fronts a
// protected volume (fixed-newstyle negotiation and a concurrent transmission
// loop), the storage backends behind it, the kernel attach of /dev/nbdN, and
// the write-interception seam that replication plugs into.
//
// blockdev knows nothing about peers or networks: every mutating request goes
// through a [Mutator] before it is acknowledged, and replication is a Mutator
// that wraps [Direct].
package blockdev

import (
	"context"
	"errors"
	"fmt"
	"io"
	"syscall"
)

// Backend is the storage behind an export. It is deliberately small (go-nbd's
// four-method backend is the model); optional capabilities are separate
// interfaces ([Trimmer], [Zeroer]) discovered with a type assertion.
//
// ReadAt and WriteAt must be safe for concurrent use on any ranges.
type Backend interface {
	io.ReaderAt
	io.WriterAt
	// Size is the export size in bytes. It does not change while served.
	Size() int64
	// Sync makes every completed write durable (fdatasync).
	Sync() error
}

// Trimmer is implemented by backends that can discard a range (punch a hole,
// BLKDISCARD). After Trim the range reads as zeroes.
type Trimmer interface {
	Trim(off, length int64) error
}

// Zeroer is implemented by backends that can zero a range faster than by
// writing zero bytes. With noHole false the backend may deallocate the range
// (punch a hole); with noHole true the range must stay allocated.
type Zeroer interface {
	WriteZeroes(off, length int64, noHole bool) error
}

// Op is the kind of a mutating request.
type Op uint8

// The mutating operations that pass through a Mutator.
const (
	OpWrite Op = iota + 1
	OpTrim
	OpWriteZeroes
	OpFlush
)

func (o Op) String() string {
	switch o {
	case OpWrite:
		return "write"
	case OpTrim:
		return "trim"
	case OpWriteZeroes:
		return "write-zeroes"
	case OpFlush:
		return "flush"
	}
	return fmt.Sprintf("op(%d)", uint8(o))
}

// Mutation is one mutating request as the NBD server received it.
type Mutation struct {
	Op     Op
	Offset int64  // byte offset; 0 for OpFlush
	Length int64  // bytes affected; len(Data) for OpWrite; 0 for OpFlush
	Data   []byte // OpWrite only; owned by the caller, valid until Apply returns
	FUA    bool   // forced unit access: durable before acknowledged
	NoHole bool   // OpWriteZeroes: the range must stay allocated

	// lend, set by the NBD server for a write, hands Data's buffer over
	// (see Retain).
	lend func() (data []byte, release func())
}

// Retain lets a Mutator keep a write's Data after Apply returns (a
// replication queue). It returns the data and a function to call once,
// when the data is no longer used. When the NBD server received the write,
// that is the server's own buffer, handed over without a copy: the server
// no longer reuses it, and release gives it back to the server's pool
// (never calling release only forgoes that reuse). Otherwise (a Mutation
// built elsewhere, or Retain called again) it is a copy and release does
// nothing. Call it only during Apply.
func (m *Mutation) Retain() (data []byte, release func()) {
	if f := m.lend; f != nil && m.Op == OpWrite {
		m.lend = nil
		if d, rel := f(); rel != nil && len(d) == len(m.Data) && (len(d) == 0 || &d[0] == &m.Data[0]) {
			return d, rel
		}
	}
	return append([]byte(nil), m.Data...), func() {}
}

// Durable reports whether the request must be durable (locally and, in sync
// replication, on the target) before it is acknowledged: a flush, or any
// request carrying FUA.
func (m *Mutation) Durable() bool { return m.Op == OpFlush || m.FUA }

// Mutator is the write-interception seam. The NBD server passes every
// mutating request (write, trim, write-zeroes, flush, and the FUA flag)
// through Apply and acknowledges it to the client only when Apply returns
// nil. Apply is called concurrently for requests in flight; an
// implementation that needs an order (replication) assigns it on entry.
//
// An error returned by Apply is sent to the client as an NBD error reply; a
// [syscall.Errno] anywhere in its chain selects the NBD error code (see
// [Errno]).
type Mutator interface {
	Apply(ctx context.Context, m *Mutation) error
}

// Direct returns the Mutator that applies mutations to b and nothing else:
// the unreplicated path. Trim and write-zeroes fall back to writing zeroes
// when b does not implement [Trimmer] or [Zeroer]; FUA is honoured with Sync.
func Direct(b Backend) Mutator { return direct{b} }

type direct struct{ b Backend }

func (d direct) Apply(_ context.Context, m *Mutation) error {
	if err := ApplyTo(d.b, m); err != nil {
		return err
	}
	if m.FUA && m.Op != OpFlush {
		return d.b.Sync()
	}
	return nil
}

// ApplyTo performs m on b without the FUA sync: the write, trim,
// write-zeroes or Sync itself. Replication uses it for the local half of a
// request and on the target to apply a shipped one.
func ApplyTo(b Backend, m *Mutation) error {
	switch m.Op {
	case OpWrite:
		_, err := b.WriteAt(m.Data, m.Offset)
		return err
	case OpTrim:
		if t, ok := b.(Trimmer); ok {
			return t.Trim(m.Offset, m.Length)
		}
		return writeZeroes(b, m.Offset, m.Length)
	case OpWriteZeroes:
		if z, ok := b.(Zeroer); ok {
			return z.WriteZeroes(m.Offset, m.Length, m.NoHole)
		}
		return writeZeroes(b, m.Offset, m.Length)
	case OpFlush:
		return b.Sync()
	}
	return fmt.Errorf("apply %v: %w", m.Op, syscall.EINVAL)
}

var zeroBuf [1 << 20]byte

func writeZeroes(b Backend, off, length int64) error {
	for length > 0 {
		n := min(length, int64(len(zeroBuf)))
		if _, err := b.WriteAt(zeroBuf[:n], off); err != nil {
			return err
		}
		off += n
		length -= n
	}
	return nil
}

// Errno returns the errno that best describes err for an NBD error reply:
// the first syscall.Errno in err's chain, or EIO.
func Errno(err error) syscall.Errno {
	var e syscall.Errno
	if errors.As(err, &e) && e != 0 {
		return e
	}
	return syscall.EIO
}
