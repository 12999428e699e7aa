package generation

import "fmt"

// Outcome is what a connection handshake concludes. Directions are relative
// to the side calling Decide (local), because after a failover the job
// roles alone do not say which copy is newer.
type Outcome uint8

// Outcomes.
const (
	// InSync: same generation, both consistent. Only the queue (sequences
	// after the peer's applied one) and the bitmaps remain to be sent.
	InSync Outcome = iota + 1
	// ResyncToPeer: local is ahead; resync local → peer (the dirty chunks
	// of both sides' bitmaps, or the whole volume when Full).
	ResyncToPeer
	// ResyncFromPeer: peer is ahead; resync peer → local.
	ResyncFromPeer
	// SplitBrain: both sides wrote after a shared ancestor. Replication
	// stops until an operator picks the side to discard; its divergent
	// chunks are saved before anything is overwritten.
	SplitBrain
	// Unrelated: no generation in common: not the same data. Refused.
	Unrelated
	// NoGoodData: the side that would be the resync source is itself
	// inconsistent (an interrupted resync on both, or on the newer side).
	// Refused; an operator must force one side.
	NoGoodData
)

func (o Outcome) String() string {
	switch o {
	case InSync:
		return "in-sync"
	case ResyncToPeer:
		return "resync-to-peer"
	case ResyncFromPeer:
		return "resync-from-peer"
	case SplitBrain:
		return "split-brain"
	case Unrelated:
		return "unrelated"
	case NoGoodData:
		return "no-good-data"
	}
	return fmt.Sprintf("outcome(%d)", uint8(o))
}

// Decision is the result of Decide.
type Decision struct {
	Outcome Outcome
	// Full: the resync target holds no generation at all (a new target):
	// copy the whole volume (a mirror) rather than the bitmaps.
	Full bool
	// Ancestor is the most recent generation both sides share (SplitBrain;
	// for a resync, the behind side's current generation).
	Ancestor uint64
	// Reason explains the outcome in an operator's words.
	Reason string
}

// Refused reports whether the outcome stops replication.
func (d Decision) Refused() bool {
	return d.Outcome == SplitBrain || d.Outcome == Unrelated || d.Outcome == NoGoodData
}

// Decide compares the local state with the peer's. It is symmetric: with the
// arguments swapped, ResyncToPeer and ResyncFromPeer swap and everything else
// is the same.
func Decide(local, peer State) Decision {
	l, p := local.Current, peer.Current
	switch {
	case l == 0 && p == 0:
		return Decision{Outcome: Unrelated, Reason: "neither side holds a generation: create the job on the side with the data"}
	case p == 0:
		if local.Data != Consistent {
			return Decision{Outcome: NoGoodData, Reason: "peer is empty and local data is inconsistent"}
		}
		return Decision{Outcome: ResyncToPeer, Full: true, Reason: "peer holds no generation: full mirror to it"}
	case l == 0:
		if peer.Data != Consistent {
			return Decision{Outcome: NoGoodData, Reason: "local is empty and peer data is inconsistent"}
		}
		return Decision{Outcome: ResyncFromPeer, Full: true, Reason: "local holds no generation: full mirror from peer"}
	case l == p:
		switch {
		case local.Data == Consistent && peer.Data == Consistent:
			return Decision{Outcome: InSync, Ancestor: l, Reason: fmt.Sprintf("same generation %016x", l)}
		case local.Data == Consistent:
			return Decision{Outcome: ResyncToPeer, Ancestor: l, Reason: "same generation, peer inconsistent: resume resync to peer"}
		case peer.Data == Consistent:
			return Decision{Outcome: ResyncFromPeer, Ancestor: l, Reason: "same generation, local inconsistent: resume resync from peer"}
		}
		return Decision{Outcome: NoGoodData, Ancestor: l, Reason: "same generation but both sides are inconsistent: force one side"}
	}
	localBehind := peer.Knows(l)
	peerBehind := local.Knows(p)
	switch {
	case localBehind && peerBehind:
		return Decision{Outcome: SplitBrain, Reason: fmt.Sprintf("histories cross: each side's generation (%016x, %016x) is in the other's history", l, p)}
	case localBehind:
		if peer.Data != Consistent {
			return Decision{Outcome: NoGoodData, Ancestor: l, Reason: fmt.Sprintf("peer moved on from %016x to %016x but its data is inconsistent", l, p)}
		}
		return Decision{Outcome: ResyncFromPeer, Ancestor: l, Reason: fmt.Sprintf("peer moved on from %016x to %016x: resync from peer", l, p)}
	case peerBehind:
		if local.Data != Consistent {
			return Decision{Outcome: NoGoodData, Ancestor: p, Reason: fmt.Sprintf("local moved on from %016x to %016x but its data is inconsistent", p, l)}
		}
		return Decision{Outcome: ResyncToPeer, Ancestor: p, Reason: fmt.Sprintf("local moved on from %016x to %016x: resync to peer", p, l)}
	}
	for _, g := range local.History {
		if peer.Knows(g) {
			return Decision{Outcome: SplitBrain, Ancestor: g, Reason: fmt.Sprintf(
				"split brain: both sides wrote after generation %016x (local now %016x, peer now %016x)", g, l, p)}
		}
	}
	return Decision{Outcome: Unrelated, Reason: fmt.Sprintf("no common generation between local %016x and peer %016x: unrelated data", l, p)}
}
