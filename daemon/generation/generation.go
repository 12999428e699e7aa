// Package generation keeps each side's generation state and decides, when two
// sides connect, what must happen: nothing, a resync in one direction, or a
// refusal (split brain, unrelated data, no good copy).
//
// The model follows DRBD's generation identifiers, simplified to what doppel
// needs. A generation is a random 64-bit ID naming one line of writes. A side
// starts a new generation, pushing the old one onto its bounded history,
// whenever it accepts writes its peer will not see in order:
//
//   - on promotion (failover: the target becomes the writer), and
//   - when a source accepts its first write while its peer is unreachable
//     (tracking mode). The engine must call NewGeneration before
//     acknowledging that write, so that the divergence is recorded.
//
// A resync target takes the source's generation and history when the resync
// starts (BeginResync, data inconsistent) and becomes consistent when it ends
// (EndResync). On connect, Decide compares the two states:
//
//	same current ID, both consistent           -> InSync
//	one side's current ID in the other's history -> that side is behind: resync
//	                                              from the other (bitmaps)
//	both moved on from a shared ancestor        -> SplitBrain (never resolved here)
//	no shared ID at all                         -> Unrelated (refuse)
package generation

import (
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"os"
	"slices"

	"github.com/doppelha/doppel/daemon/statefile"
)

// MaxHistory is how many previous generations a state remembers.
const MaxHistory = 16

// Side is the end of the replication a generation state was last on: the
// writer or the receiver. (What the job's agent does, as the operator sees
// it, is ha.Role; the two agree once a role change has completed.)
type Side uint8

// Sides.
const (
	SideTarget Side = iota // receives and applies; not writable by applications
	SideSource             // serves the volume and ships its writes
)

func (r Side) String() string {
	switch r {
	case SideTarget:
		return "target"
	case SideSource:
		return "source"
	}
	return fmt.Sprintf("role(%d)", uint8(r))
}

// DataState says whether a side's volume is usable on its own.
type DataState uint8

// Data states. The zero value is the safe one.
const (
	Inconsistent DataState = iota // mid-mirror or mid-resync: not a prefix of any history
	Consistent                    // a crash-consistent image of its current generation
)

func (d DataState) String() string {
	switch d {
	case Inconsistent:
		return "inconsistent"
	case Consistent:
		return "consistent"
	}
	return fmt.Sprintf("data(%d)", uint8(d))
}

// State is one side's generation state. The zero State is a side that has
// never held data (a fresh target).
type State struct {
	Current    uint64   // current generation; 0: none
	History    []uint64 // previous generations, newest first, at most MaxHistory
	Side       Side
	Data       DataState
	AppliedSeq uint64 // target: last sequence applied in Current
	AckedSeq   uint64 // source: last sequence the peer acknowledged in Current
}

// Errors.
var (
	ErrCorrupt      = errors.New("generation state corrupt")
	ErrInconsistent = errors.New("data is inconsistent")
)

// NewID returns a random, non-zero generation ID.
func NewID() uint64 {
	var b [8]byte
	for {
		_, _ = rand.Read(b[:]) // never fails on Linux (getrandom)
		if id := binary.LittleEndian.Uint64(b[:]); id != 0 {
			return id
		}
	}
}

// NewSource is the state of the side a job is created on: its volume is the
// reference copy, in a fresh generation.
func NewSource() State {
	return State{Current: NewID(), Side: SideSource, Data: Consistent}
}

// Knows reports whether id is the current generation or in the history.
func (s State) Knows(id uint64) bool {
	return id != 0 && (s.Current == id || slices.Contains(s.History, id))
}

// Clone returns a deep copy.
func (s State) Clone() State {
	s.History = slices.Clone(s.History)
	return s
}

// NewGeneration starts generation id (use NewID), pushing the current one
// onto the history (the oldest entry falls off beyond MaxHistory). Sequence
// numbers are per generation and restart at 0.
func (s *State) NewGeneration(id uint64) {
	if s.Current != 0 {
		h := make([]uint64, 0, MaxHistory)
		h = append(h, s.Current)
		for _, g := range s.History {
			if g != s.Current && g != id && len(h) < MaxHistory {
				h = append(h, g)
			}
		}
		s.History = h
	}
	s.Current = id
	s.AppliedSeq, s.AckedSeq = 0, 0
}

// Promote makes this side the source in a new generation (failover). An
// inconsistent side is refused unless force is set.
func (s *State) Promote(id uint64, force bool) error {
	if s.Data != Consistent && !force {
		return fmt.Errorf("promote: %w (a resync was not finished); force to accept a damaged copy", ErrInconsistent)
	}
	s.NewGeneration(id)
	s.Side = SideSource
	if force {
		s.Data = Consistent
	}
	return nil
}

// Demote makes this side a target; its generation is unchanged.
func (s *State) Demote() { s.Side = SideTarget }

// BeginResync is called on the side about to be overwritten by src: it takes
// src's generation and history and is inconsistent until EndResync. If the
// resync is interrupted, Decide sees the same generation (or an older one of
// src's) and resumes it in the same direction.
func (s *State) BeginResync(src State) {
	s.Current = src.Current
	s.History = slices.Clone(src.History)
	s.Data = Inconsistent
	s.AppliedSeq, s.AckedSeq = 0, 0
}

// EndResync marks a completed resync: the data is a consistent image of
// the current generation.
func (s *State) EndResync() { s.Data = Consistent }

// Validate checks the invariants the encoding relies on.
func (s State) Validate() error {
	if len(s.History) > MaxHistory {
		return fmt.Errorf("%w: %d history entries", ErrCorrupt, len(s.History))
	}
	if s.Side > SideSource || s.Data > Consistent {
		return fmt.Errorf("%w: role %d data %d", ErrCorrupt, s.Side, s.Data)
	}
	if s.Current == 0 && len(s.History) > 0 {
		return fmt.Errorf("%w: history without a current generation", ErrCorrupt)
	}
	for i, g := range s.History {
		if g == 0 || g == s.Current || slices.Contains(s.History[:i], g) {
			return fmt.Errorf("%w: bad history entry %016x", ErrCorrupt, g)
		}
	}
	return nil
}

func (s State) String() string {
	return fmt.Sprintf("%016x %v %v history=%d applied=%d acked=%d", s.Current, s.Side, s.Data, len(s.History), s.AppliedSeq, s.AckedSeq)
}

const (
	magic   = "DPGN"
	version = 1
	fixed   = 4 + 2 + 1 + 1 + 8 + 8 + 8 + 1 // magic .. history count
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// MarshalBinary encodes the state: magic, version, role, data, current,
// applied, acked, history count and entries, CRC32C; little endian.
func (s State) MarshalBinary() ([]byte, error) {
	if err := s.Validate(); err != nil {
		return nil, err
	}
	b := make([]byte, 0, fixed+8*len(s.History)+4)
	b = append(b, magic...)
	b = binary.LittleEndian.AppendUint16(b, version)
	b = append(b, byte(s.Side), byte(s.Data))
	b = binary.LittleEndian.AppendUint64(b, s.Current)
	b = binary.LittleEndian.AppendUint64(b, s.AppliedSeq)
	b = binary.LittleEndian.AppendUint64(b, s.AckedSeq)
	b = append(b, byte(len(s.History)))
	for _, g := range s.History {
		b = binary.LittleEndian.AppendUint64(b, g)
	}
	return binary.LittleEndian.AppendUint32(b, crc32.Checksum(b, castagnoli)), nil
}

// UnmarshalBinary decodes and validates the output of MarshalBinary.
func (s *State) UnmarshalBinary(b []byte) error {
	if len(b) < fixed+4 {
		return fmt.Errorf("%w: %d bytes", ErrCorrupt, len(b))
	}
	if string(b[:4]) != magic {
		return fmt.Errorf("%w: bad magic", ErrCorrupt)
	}
	if v := binary.LittleEndian.Uint16(b[4:]); v != version {
		return fmt.Errorf("%w: unsupported version %d", ErrCorrupt, v)
	}
	n := int(b[fixed-1])
	if len(b) != fixed+8*n+4 {
		return fmt.Errorf("%w: %d bytes for %d history entries", ErrCorrupt, len(b), n)
	}
	if crc32.Checksum(b[:len(b)-4], castagnoli) != binary.LittleEndian.Uint32(b[len(b)-4:]) {
		return fmt.Errorf("%w: checksum mismatch", ErrCorrupt)
	}
	st := State{
		Side:       Side(b[6]),
		Data:       DataState(b[7]),
		Current:    binary.LittleEndian.Uint64(b[8:]),
		AppliedSeq: binary.LittleEndian.Uint64(b[16:]),
		AckedSeq:   binary.LittleEndian.Uint64(b[24:]),
	}
	if n > 0 {
		st.History = make([]uint64, n)
		for i := range st.History {
			st.History[i] = binary.LittleEndian.Uint64(b[fixed+8*i:])
		}
	}
	if err := st.Validate(); err != nil {
		return err
	}
	*s = st
	return nil
}

// Load reads a state saved by Save. A missing file is reported with an
// error satisfying errors.Is(err, os.ErrNotExist).
func Load(path string) (State, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return State{}, fmt.Errorf("load generation state: %w", err)
	}
	var s State
	if err := s.UnmarshalBinary(b); err != nil {
		return State{}, fmt.Errorf("load generation state %s: %w", path, err)
	}
	return s, nil
}

// Save writes the state atomically (temp file, fsync, rename, fsync dir).
func Save(path string, s State) error {
	b, err := s.MarshalBinary()
	if err != nil {
		return err
	}
	return statefile.Write(path, b, 0o600)
}
