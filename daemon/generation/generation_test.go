package generation

import (
	"bytes"
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func st(cur uint64, data DataState, hist ...uint64) State {
	return State{Current: cur, History: hist, Data: data}
}

// TestDecideTable covers every branch of Decide, both ways round.
func TestDecideTable(t *testing.T) {
	C, I := Consistent, Inconsistent
	for _, tc := range []struct {
		name        string
		local, peer State
		want        Outcome
		full        bool
		ancestor    uint64
	}{
		{"both empty", State{}, State{}, Unrelated, false, 0},
		{"new target", st(1, C), State{}, ResyncToPeer, true, 0},
		{"new target, local inconsistent", st(1, I), State{}, NoGoodData, false, 0},
		{"local empty", State{}, st(1, C), ResyncFromPeer, true, 0},
		{"local empty, peer inconsistent", State{}, st(1, I), NoGoodData, false, 0},
		{"same generation", st(1, C, 9), st(1, C, 9), InSync, false, 1},
		{"same generation, different histories", st(1, C, 9), st(1, C), InSync, false, 1},
		{"same, peer mid-resync", st(1, C), st(1, I), ResyncToPeer, false, 1},
		{"same, local mid-resync", st(1, I), st(1, C), ResyncFromPeer, false, 1},
		{"same, both inconsistent", st(1, I), st(1, I), NoGoodData, false, 1},
		{"peer ahead", st(1, C), st(2, C, 1), ResyncFromPeer, false, 1},
		{"peer far ahead", st(1, C), st(4, C, 3, 2, 1), ResyncFromPeer, false, 1},
		{"peer ahead, local inconsistent", st(1, I), st(2, C, 1), ResyncFromPeer, false, 1},
		{"peer ahead but inconsistent", st(1, C), st(2, I, 1), NoGoodData, false, 1},
		{"local ahead", st(2, C, 1), st(1, C), ResyncToPeer, false, 1},
		{"local ahead but inconsistent", st(2, I, 1), st(1, C), NoGoodData, false, 1},
		{"split brain", st(2, C, 1), st(3, C, 1), SplitBrain, false, 1},
		{"split brain, older ancestor", st(5, C, 4, 2, 1), st(6, C, 3, 2, 1), SplitBrain, false, 2},
		{"histories cross", st(2, C, 1), st(1, C, 2), SplitBrain, false, 0},
		{"unrelated", st(1, C, 7), st(2, C, 8), Unrelated, false, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := Decide(tc.local, tc.peer)
			if d.Outcome != tc.want || d.Full != tc.full || d.Ancestor != tc.ancestor || d.Reason == "" {
				t.Fatalf("Decide = %+v, want %v full=%v ancestor=%d", d, tc.want, tc.full, tc.ancestor)
			}
			// Symmetry.
			r := Decide(tc.peer, tc.local)
			want := map[Outcome]Outcome{ResyncToPeer: ResyncFromPeer, ResyncFromPeer: ResyncToPeer}[tc.want]
			if want == 0 {
				want = tc.want
			}
			if r.Outcome != want || r.Full != d.Full {
				t.Fatalf("swapped: %+v, want %v", r, want)
			}
			if d.Refused() != (tc.want == SplitBrain || tc.want == Unrelated || tc.want == NoGoodData) {
				t.Fatalf("Refused() = %v for %v", d.Refused(), d.Outcome)
			}
		})
	}
}

// pair is a two-node job driven through the operations the engine performs.
type pair struct {
	t    *testing.T
	a, b State
}

func (p *pair) decide() Decision { return Decide(p.a, p.b) }

func (p *pair) expect(step string, want Outcome) Decision {
	p.t.Helper()
	d := p.decide()
	if d.Outcome != want {
		p.t.Fatalf("%s: a=%v b=%v: %v (%s), want %v", step, p.a, p.b, d.Outcome, d.Reason, want)
	}
	return d
}

// resync runs a complete resync in the direction the decision says.
func (p *pair) resync(d Decision) {
	switch d.Outcome {
	case ResyncToPeer:
		p.b.BeginResync(p.a)
		p.b.EndResync()
	case ResyncFromPeer:
		p.a.BeginResync(p.b)
		p.a.EndResync()
	case InSync:
	default:
		p.t.Fatalf("cannot resync on %v", d.Outcome)
	}
}

func TestFailoverReverseFailback(t *testing.T) {
	p := &pair{t: t, a: NewSource()}
	p.b.Demote()
	// Job creation: full mirror a → b.
	d := p.expect("create", ResyncToPeer)
	if !d.Full {
		t.Fatal("first sync not full")
	}
	p.b.BeginResync(p.a)
	p.expect("mirror interrupted", ResyncToPeer) // resumes, same direction
	p.b.EndResync()
	p.expect("mirrored", InSync)
	g1 := p.a.Current

	// a crashes; b is promoted (failover) and writes.
	if err := p.b.Promote(NewID(), false); err != nil {
		t.Fatal(err)
	}
	// a comes back without having written: it is behind, not split.
	d = p.expect("old source returns", ResyncFromPeer)
	if d.Ancestor != g1 || d.Full {
		t.Fatalf("reverse: %+v", d)
	}
	// Reverse protection: a becomes the target, resyncs from b.
	p.a.Demote()
	p.a.BeginResync(p.b)
	p.expect("reverse interrupted", ResyncFromPeer)
	p.a.EndResync()
	p.expect("reversed", InSync)

	// Failback: planned switchover, b demoted, a promoted.
	p.b.Demote()
	if err := p.a.Promote(NewID(), false); err != nil {
		t.Fatal(err)
	}
	p.resync(p.expect("failback", ResyncToPeer))
	p.expect("failed back", InSync)
	if p.a.Side != SideSource || p.b.Side != SideTarget || !p.b.Knows(g1) {
		t.Fatalf("after failback: a=%v b=%v", p.a, p.b)
	}
}

func TestSourceWritesWhileDisconnected(t *testing.T) {
	p := &pair{t: t, a: NewSource()}
	p.resync(p.expect("create", ResyncToPeer))
	// Link drops; the source keeps writing: tracking mode starts a generation.
	p.a.NewGeneration(NewID())
	p.resync(p.expect("reconnect", ResyncToPeer))
	p.expect("caught up", InSync)

	// Disconnect again; the target is promoted (failover) while the source,
	// still alive, also writes: split brain.
	p.a.NewGeneration(NewID())
	if err := p.b.Promote(NewID(), false); err != nil {
		t.Fatal(err)
	}
	d := p.expect("both wrote", SplitBrain)
	if !strings.Contains(d.Reason, "split brain") {
		t.Fatalf("reason %q", d.Reason)
	}
	// Resolution: discard a (after saving its divergent chunks): a resyncs
	// from b; an interrupted resync still resumes in that direction.
	p.a.Demote()
	p.a.BeginResync(p.b)
	p.expect("resolution interrupted", ResyncFromPeer)
	// b moves on again meanwhile (disconnect + writes): still from b.
	p.b.NewGeneration(NewID())
	p.resync(p.expect("resolution resumed", ResyncFromPeer))
	p.expect("resolved", InSync)
}

func TestInconsistentCannotBePromoted(t *testing.T) {
	var s State
	s.BeginResync(NewSource())
	if err := s.Promote(NewID(), false); !errors.Is(err, ErrInconsistent) {
		t.Fatalf("promote inconsistent: %v", err)
	}
	if err := s.Promote(NewID(), true); err != nil || s.Data != Consistent || s.Side != SideSource {
		t.Fatalf("forced promote: %v %v", err, s)
	}
}

func TestHistoryBounded(t *testing.T) {
	s := NewSource()
	first := s.Current
	var ids []uint64
	for range 40 {
		ids = append(ids, s.Current)
		s.NewGeneration(NewID())
		if err := s.Validate(); err != nil {
			t.Fatal(err)
		}
	}
	if len(s.History) != MaxHistory || s.Knows(first) {
		t.Fatalf("history %d entries, knows first: %v", len(s.History), s.Knows(first))
	}
	if s.History[0] != ids[len(ids)-1] || s.History[MaxHistory-1] != ids[len(ids)-MaxHistory] {
		t.Fatal("history not newest-first")
	}
	// A peer more than MaxHistory generations behind is unrelated: refuse
	// rather than guess.
	if d := Decide(s, State{Current: first, Data: Consistent}); d.Outcome != Unrelated {
		t.Fatalf("far behind: %v", d.Outcome)
	}
}

func TestSaveLoad(t *testing.T) {
	p := filepath.Join(t.TempDir(), "gen")
	if _, err := Load(p); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("missing: %v", err)
	}
	s := NewSource()
	s.NewGeneration(NewID())
	s.AckedSeq = 42
	if err := Save(p, s); err != nil {
		t.Fatal(err)
	}
	got, err := Load(p)
	if err != nil {
		t.Fatal(err)
	}
	if got.Current != s.Current || got.AckedSeq != 42 || len(got.History) != 1 || got.History[0] != s.History[0] || got.Side != SideSource {
		t.Fatalf("loaded %v, want %v", got, s)
	}
	// Torn or damaged files are refused, never misread.
	b, _ := os.ReadFile(p)
	for cut := range len(b) {
		os.WriteFile(p, b[:cut], 0o600)
		if _, err := Load(p); !errors.Is(err, ErrCorrupt) {
			t.Fatalf("truncated at %d: %v", cut, err)
		}
	}
	for i := range len(b) {
		c := bytes.Clone(b)
		c[i] ^= 0x10
		os.WriteFile(p, c, 0o600)
		if _, err := Load(p); !errors.Is(err, ErrCorrupt) {
			t.Fatalf("bit flip at %d: %v", i, err)
		}
	}
	if _, err := (State{History: []uint64{1}}).MarshalBinary(); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("invalid state encoded: %v", err)
	}
}

func FuzzUnmarshal(f *testing.F) {
	s := NewSource()
	s.NewGeneration(NewID())
	b, _ := s.MarshalBinary()
	f.Add(b)
	e, _ := State{}.MarshalBinary()
	f.Add(e)
	f.Fuzz(func(t *testing.T, b []byte) {
		var s State
		if err := s.UnmarshalBinary(b); err != nil {
			return
		}
		again, err := s.MarshalBinary()
		if err != nil || !bytes.Equal(again, b) {
			t.Fatalf("decode∘encode is not the identity: %v", err)
		}
	})
}

// FuzzDecide drives two sides through random operations and checks the
// safety properties: Decide never calls "in sync" or a one-way resync when
// both sides wrote independently, and is symmetric.
func FuzzDecide(f *testing.F) {
	f.Add(uint64(1), []byte{0, 1, 2, 3})
	f.Add(uint64(2), []byte{4, 4, 5, 6, 7, 0})
	f.Fuzz(func(t *testing.T, seed uint64, ops []byte) {
		r := rand.New(rand.NewPCG(seed, 1))
		a, b := NewSource(), State{}
		b.BeginResync(a)
		b.EndResync()
		// wroteA/B: a side started a generation the other never saw.
		wroteA, wroteB := false, false
		for _, op := range ops {
			switch op % 6 {
			case 0:
				a.NewGeneration(r.Uint64() | 1)
				wroteA = true
			case 1:
				b.NewGeneration(r.Uint64() | 1)
				wroteB = true
			case 2, 3, 4, 5:
				d := Decide(a, b)
				if wroteA && wroteB && !d.Refused() {
					t.Fatalf("both sides wrote but Decide says %v (%s)", d.Outcome, d.Reason)
				}
				if sw := Decide(b, a); sw.Refused() != d.Refused() {
					t.Fatalf("asymmetric: %v vs %v", d.Outcome, sw.Outcome)
				}
				switch d.Outcome {
				case ResyncToPeer:
					b.BeginResync(a)
					if op%6 != 2 {
						b.EndResync()
					}
					wroteA, wroteB = false, false
				case ResyncFromPeer:
					a.BeginResync(b)
					if op%6 != 2 {
						a.EndResync()
					}
					wroteA, wroteB = false, false
				case InSync:
					if wroteA || wroteB {
						t.Fatalf("in sync after unseen writes")
					}
				}
			}
		}
	})
}
