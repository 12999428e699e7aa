package replstate

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"time"

	"github.com/doppelha/doppel/daemon/bitmap"
	"github.com/doppelha/doppel/daemon/generation"
	"github.com/doppelha/doppel/daemon/repl"
	"github.com/doppelha/doppel/daemon/statefile"
	"github.com/doppelha/doppel/daemon/tlspin"
)

// bumpGeneration is called before a write the target may not see in
// order (not connected, tracking, closing with dirty chunks): when the peer
// may hold the current generation, it starts a new one (DRBD's new current
// UUID), so a promotion of the target meanwhile is detected as split brain
// and the write is never silently overwritten. When the current generation
// is already unknown to the peer, the write joins it (one new generation
// per outage, so the peer's stays in the bounded history).
func (s *Source) bumpGeneration() error {
	s.gens.mu.Lock()
	defer s.gens.mu.Unlock()
	if s.gens.state.Current != s.gens.shared {
		return nil
	}
	st := s.gens.state.Clone()
	st.NewGeneration(generation.NewID())
	// The generation first, then the marker: a crash between them leaves
	// a generation taken for shared (another one at the next restart),
	// never a shared one taken for unshared.
	if err := saveGen(s.cfg.Dir, st); err != nil {
		return err
	}
	if err := s.markUnshared(true); err != nil {
		return err
	}
	s.gens.state = st
	s.hs.synced.Store(false)
	s.log.Info("writing without the target: new generation", "generation", fmt.Sprintf("%016x", st.Current))
	return nil
}

// markUnshared records durably whether the current generation is unknown
// to the peer (so a restart during a long outage does not start yet another
// one and push the peer's generation out of the bounded history).
func (s *Source) markUnshared(on bool) error {
	p := filepath.Join(s.cfg.Dir, UnsharedFile)
	if !on {
		if err := os.Remove(p); err != nil {
			if os.IsNotExist(err) {
				return nil
			}
			return err
		}
		return statefile.SyncDir(s.cfg.Dir)
	}
	return statefile.Write(p, nil, 0o600)
}

// share records that the peer may hold local, the current generation (it
// is about to be sent in a state hello), durably before it is sent. The
// caller holds genMu.
func (s *Source) share(local generation.State) error {
	if s.gens.shared == local.Current {
		return nil
	}
	if err := s.markUnshared(false); err != nil {
		return err
	}
	s.gens.shared = local.Current
	return nil
}

// dial connects and runs the state handshake (repl.Stream calls it for
// every connection).
func (s *Source) dial(ctx context.Context) (net.Conn, error) {
	conn, err := s.cfg.Dial(ctx)
	if err != nil {
		return nil, err
	}
	dec, err := s.handshake(ctx, conn, false)
	if err != nil {
		conn.Close()
		return nil, err
	}
	_ = dec
	select {
	case s.hs.connected <- struct{}{}:
	default:
	}
	return conn, nil
}

// handshake runs the state handshake on conn. notify only tells the target
// that a resync completed.
func (s *Source) handshake(ctx context.Context, conn net.Conn, notify bool) (generation.Decision, error) {
	var dec generation.Decision
	conn.SetDeadline(time.Now().Add(30 * time.Second))
	defer conn.SetDeadline(time.Time{})
	if tc, ok := conn.(*tls.Conn); ok {
		if err := tc.HandshakeContext(ctx); err != nil {
			if errors.Is(err, tlspin.ErrNotPinned) {
				return dec, &repl.FatalError{Err: err}
			}
			return dec, fmt.Errorf("TLS handshake: %w", err)
		}
	}
	cur := s.cur.Load()
	applied, _ := cur.Progress()
	s.gens.mu.Lock()
	local := s.gens.state.Clone()
	err := s.share(local)
	s.gens.mu.Unlock()
	if err != nil {
		return dec, err
	}
	s.at("snapshot")
	if _, err := conn.Write(metaMagic[:]); err != nil {
		return dec, err
	}
	h := hello{VolumeSize: s.size, ChunkSize: s.cfg.ChunkSize, Gen: encodeGen(local), StreamID: cur.StreamID(),
		Acked: applied, Discard: s.cfg.Discard, Notify: notify, Job: s.cfg.Binding.Owner.Job, Epoch: s.epoch()}
	if err := writeMsg(conn, h); err != nil {
		return dec, fmt.Errorf("send state hello: %w", err)
	}
	var rp reply
	if err := readMsg(conn, &rp); err != nil {
		if errors.Is(err, ErrMalformed) {
			return dec, &repl.FatalError{Err: fmt.Errorf("target: %w", err)}
		}
		return dec, fmt.Errorf("read state reply: %w", err)
	}
	if mine := s.epoch(); mine > 0 && rp.Epoch > mine {
		// The target knows a newer epoch: another side was promoted.
		if s.cfg.Superseded != nil {
			s.cfg.Superseded(rp.Epoch)
		}
		return dec, s.refuse(fmt.Errorf("%w: %w: the target knows epoch %d, this source is at %d", ErrRefused, ErrSuperseded, rp.Epoch, mine))
	}
	if rp.Error != "" {
		return dec, s.refuse(fmt.Errorf("%w by the target: %s", ErrRefused, rp.Error))
	}
	if notify {
		s.gens.mu.Lock()
		s.hs.synced.Store(s.gens.state.Current == local.Current)
		s.gens.mu.Unlock()
		return dec, nil
	}
	peer, err := decodeGen(rp.Gen)
	if err != nil {
		return dec, &repl.FatalError{Err: err}
	}
	s.gens.peer.Store(peer.Current)
	dec = generation.Decide(local, peer)
	discard := s.cfg.Discard == "target" || rp.Discard == "target"
	c := commit{Outcome: dec.Outcome.String(), Reason: dec.Reason, Gen: encodeGen(local)}
	switch dec.Outcome {
	case generation.InSync, generation.ResyncToPeer:
	case generation.SplitBrain:
		if !discard {
			c.Refused = true
		}
		c.Discard = discard
	case generation.ResyncFromPeer:
		c.Refused = true
		dec.Reason += ": the peer is newer (it was promoted); run this side as the target"
		c.Reason = dec.Reason
	default:
		c.Refused = true
	}
	if c.Refused {
		writeMsg(conn, c)
		msg := fmt.Sprintf("%s: %s", dec.Outcome, dec.Reason)
		if dec.Outcome == generation.SplitBrain {
			msg += fmt.Sprintf("; local %d dirty bytes since the split, target %s; resolve with --discard-on target (the target's divergent chunks are saved first), "+
				"or keep the target's data with --discard-on source (it prints the commands that swap the roles)",
				s.bm.DirtyBytes(), peerDirty(rp.Bitmap, s.size, s.cfg.ChunkSize))
		}
		return dec, s.refuse(fmt.Errorf("%w: %s", ErrRefused, msg))
	}
	// The peer's dirty chunks become ours (durably) before the target
	// forgets them.
	if len(rp.Bitmap) > 0 {
		pb, err := bitmap.Decode(rp.Bitmap, s.size, s.cfg.ChunkSize)
		if err != nil {
			return dec, &repl.FatalError{Err: fmt.Errorf("target bitmap: %w", err)}
		}
		if err := s.bm.Union(pb); err != nil {
			return dec, &repl.FatalError{Err: err}
		}
		if err := s.bm.Flush(); err != nil {
			return dec, err
		}
	}
	if (rp.StreamID == cur.StreamID() && (rp.Applied < applied || rp.Applied > cur.LastSeq())) || (rp.StreamID != cur.StreamID() && applied > 0) {
		// The target lost what it had not synced, or the stream (or is
		// past it): the queue, folded into the bitmap, plus the extents
		// still hot cover it.
		return dec, &repl.FatalError{Err: fmt.Errorf("target at stream %016x seq %d, source at %016x seq %d: %w",
			rp.StreamID, rp.Applied, cur.StreamID(), applied, errRestream)}
	}
	full := dec.Full
	if full {
		s.rsy.needFull.Store(true)
	}
	resyncing := full || s.bm.DirtyChunks() > 0 || s.rsy.needFull.Load()
	c.Resync = resyncing
	c.Full = s.rsy.needFull.Load()
	c.Adopt = !resyncing
	s.hs.synced.Store(false)
	if err := writeMsg(conn, c); err != nil {
		return dec, fmt.Errorf("send state commit: %w", err)
	}
	var d done
	if err := readMsg(conn, &d); err != nil {
		return dec, fmt.Errorf("read state commit reply: %w", err)
	}
	if d.Error != "" {
		return dec, s.refuse(fmt.Errorf("%w by the target: %s", ErrRefused, d.Error))
	}
	if d.Saved != "" {
		s.log.Warn("split brain resolved against the target: its divergent chunks were saved there", "path", d.Saved)
	}
	str := dec.Outcome.String() + ": " + dec.Reason
	s.hs.decision.Store(&str)
	if c.Adopt {
		s.gens.mu.Lock()
		s.hs.synced.Store(s.gens.state.Current == local.Current)
		s.gens.mu.Unlock()
	}
	s.at("committed")
	s.log.Info("state handshake", "decision", dec.Outcome, "reason", dec.Reason, "dirty_bytes", s.bm.DirtyBytes(), "full", full)
	return dec, nil
}

// epoch is this side's failover epoch (0: unknown).
func (s *Source) epoch() uint64 {
	if s.cfg.Epoch == nil {
		return 0
	}
	return s.cfg.Epoch()
}

func (s *Source) at(point string) {
	if s.hs.hook != nil {
		s.hs.hook(point)
	}
}

func peerDirty(b []byte, size, chunk int64) string {
	pb, err := bitmap.Decode(b, size, chunk)
	if err != nil || len(b) == 0 {
		return "unknown"
	}
	return fmt.Sprintf("%d dirty bytes", pb.DirtyBytes())
}

func (s *Source) refuse(err error) error {
	msg := err.Error()
	s.hs.refusal.Store(&msg)
	s.log.Error("replication refused", "reason", msg)
	return &repl.FatalError{Err: err}
}

// notify tells the target that the resync is complete: it takes this
// side's generation and is consistent again.
func (s *Source) notify(ctx context.Context) {
	conn, err := s.cfg.Dial(ctx)
	if err != nil {
		s.log.Warn("notify target of the finished resync", "err", err)
		return
	}
	defer conn.Close()
	if _, err := s.handshake(ctx, conn, true); err != nil {
		s.log.Warn("notify target of the finished resync", "err", err)
		return
	}
	s.al.Clean()
}
