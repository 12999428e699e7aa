package repl

import (
	"context"
	"errors"
	"fmt"
	"math/bits"
	"sync"
	"time"

	"github.com/doppelha/doppel/daemon/repl/wire"
)

// MirrorKind selects how the initial copy is made.
type MirrorKind int

// Mirror kinds.
const (
	MirrorNone MirrorKind = iota // the operator vouches that the target already matches
	MirrorFull                   // copy every allocated, non-zero range; holes are punched
	MirrorDiff                   // compare chunk checksums, copy differing chunks only
)

// ParseMirrorKind parses "full", "diff" or "none".
func ParseMirrorKind(s string) (MirrorKind, error) {
	switch s {
	case "full":
		return MirrorFull, nil
	case "diff":
		return MirrorDiff, nil
	case "none", "":
		return MirrorNone, nil
	}
	return 0, fmt.Errorf("unknown mirror kind %q (want full, diff or none)", s)
}

func (k MirrorKind) String() string {
	return [...]string{"none", "full", "diff"}[k]
}

// Range is a byte range of the volume.
type Range struct{ Offset, Length int64 }

// MirrorResult summarises a mirror, diff mirror, verify or resync pass.
type MirrorResult struct {
	Scanned   int64   // bytes of the volume covered
	Sent      int64   // payload bytes sent (data chunks)
	Holes     int64   // bytes sent as holes
	Differing []Range // verify / diff: ranges whose checksums differed (coalesced)
	Duration  time.Duration
}

// DifferingBytes sums the lengths of r.Differing.
func (r MirrorResult) DifferingBytes() int64 {
	var n int64
	for _, d := range r.Differing {
		n += d.Length
	}
	return n
}

const (
	mirrorIO     = 1 << 20 // bytes read under one range lock
	sumWindow    = 128     // chunks per checksum request
	sumsInFlight = 4       // checksum requests outstanding
)

// mirrorQueueCap is how full the queue may be before a mirror waits for
// acks, so that mirror traffic never crowds out application writes.
func (s *Stream) mirrorQueueCap() int64 { return 8 << 20 }

// Mirror copies the volume to the target while the application keeps
// writing, and marks the target consistent when done. Every range is read
// under the range lock and its frame sequenced before the lock is released,
// so a mirror chunk can never overtake (and overwrite) a newer application
// write on the target: both travel in the one ordered stream.
func (s *Stream) Mirror(ctx context.Context, kind MirrorKind) (MirrorResult, error) {
	switch kind {
	case MirrorNone:
		return MirrorResult{}, nil
	case MirrorFull, MirrorDiff:
	default:
		return MirrorResult{}, fmt.Errorf("mirror: unknown kind %d", kind)
	}
	if err := s.waitConnected(ctx); err != nil {
		return MirrorResult{}, err
	}
	start := time.Now()
	s.log.Info("mirror started", "kind", kind, "bytes", s.size)
	s.st.mirrorActive.Store(true)
	defer s.st.mirrorActive.Store(false)
	s.st.mirrorDone.Store(0)
	s.st.mirrorTotal.Store(s.size)
	if _, err := s.push(&wire.MirrorState{Phase: wire.PhaseBegin, Purpose: wire.PurposeMirror, Total: uint64(s.size)}); err != nil {
		return MirrorResult{}, err
	}
	s.setTargetState(wire.StateInconsistent)
	var res MirrorResult
	var err error
	if kind == MirrorFull {
		res, err = s.fullPass(ctx)
	} else {
		res, err = s.sumPass(ctx, wire.PurposeMirror, true)
	}
	if err == nil {
		err = s.endPass(ctx, wire.PurposeMirror)
	}
	res.Duration = time.Since(start)
	if err != nil {
		s.log.Error("mirror failed", "kind", kind, "err", err, "scanned", res.Scanned)
		return res, fmt.Errorf("%v mirror: %w", kind, err)
	}
	s.log.Info("mirror done", "kind", kind, "scanned", res.Scanned, "sent", res.Sent, "holes", res.Holes,
		"differing", res.DifferingBytes(), "took", res.Duration.Round(time.Millisecond))
	return res, nil
}

// endPass sequences the end of a pass and waits for the target to apply it.
func (s *Stream) endPass(ctx context.Context, p wire.Purpose) error {
	if s.cfg.Incomplete != nil && s.cfg.Incomplete() {
		// Changes the target lacks are still to come (tracked outside
		// the stream): its copy is not a consistent image yet. The pass
		// still ends with what it sent durable on the target (a barrier
		// instead of the end marker): callers release what covered those
		// ranges only then.
		seq, err := s.push(&wire.Flush{})
		if err != nil {
			return err
		}
		return s.waitAck(ctx, seq)
	}
	seq, err := s.push(&wire.MirrorState{Phase: wire.PhaseEnd, Purpose: p})
	if err != nil {
		return err
	}
	if err := s.waitAck(ctx, seq); err != nil {
		return err
	}
	s.setTargetState(wire.StateConsistent)
	return nil
}

// EndResync ends a resync the target is still inconsistent from (its last
// pass ended while changes were missing): once nothing is missing, the
// target is told its copy is a consistent image again. A no-op when the
// target is not inconsistent or changes are still missing.
func (s *Stream) EndResync(ctx context.Context) error {
	s.ackMu.Lock()
	st := s.tstate
	s.ackMu.Unlock()
	if st != wire.StateInconsistent {
		return nil
	}
	if err := s.waitConnected(ctx); err != nil {
		return err
	}
	return s.endPass(ctx, wire.PurposeResync)
}

// fullPass sends every allocated non-zero range and a hole for the rest.
func (s *Stream) fullPass(ctx context.Context) (MirrorResult, error) {
	var res MirrorResult
	for off := int64(0); off < s.size; {
		if err := s.waitQueueBelow(ctx, s.mirrorQueueCap()); err != nil {
			return res, err
		}
		if d := s.ext.nextData(off, s.size); d > off {
			// A hole: re-check under the lock so that a write landing in
			// it meanwhile is seen (and then ordered before the hole).
			unlock := s.locks.lock(off, d-off)
			d = s.ext.nextData(off, d)
			var err error
			if d > off {
				_, err = s.push(&wire.MirrorHole{Offset: uint64(off), Length: uint64(d - off), Purpose: wire.PurposeMirror})
			}
			unlock()
			if err != nil {
				return res, err
			}
			res.Holes += d - off
			off = d
			res.Scanned = off
			s.st.mirrorDone.Store(off)
			continue
		}
		end := min(s.ext.nextHole(off, s.size), alignUp(off+1, mirrorIO), s.size)
		sent, holes, err := s.sendRange(off, end-off, wire.PurposeMirror)
		if err != nil {
			return res, err
		}
		res.Sent += sent
		res.Holes += holes
		off = end
		res.Scanned = off
		s.st.mirrorDone.Store(off)
	}
	return res, nil
}

func alignUp(v, a int64) int64 { return (v + a - 1) / a * a }

// Mirror read buffers are recycled by power-of-two size class, from
// minMirrorBuf to mirrorIO: a frame pins its read buffer until the target
// acknowledges it, and the queue accounts for the frame's bytes only, so a
// 64 KiB range (a resync of scattered dirty chunks) must not pin a 1 MiB
// buffer (16 times what the mirror's queue cap allows in flight).
const (
	minMirrorShift = 12 // 4 KiB
	maxMirrorShift = 20 // mirrorIO
)

var mirrorBufs [maxMirrorShift - minMirrorShift + 1]sync.Pool

func mirrorClass(n int64) int {
	if n <= 1<<minMirrorShift {
		return 0
	}
	return bits.Len64(uint64(n-1)) - minMirrorShift
}

// getMirrorBuf returns a buffer of at least n bytes (n <= mirrorIO), of
// n's size class, and the function that gives it back.
func getMirrorBuf(n int64) (buf []byte, put func()) {
	c := mirrorClass(n)
	p, ok := mirrorBufs[c].Get().(*[]byte)
	if !ok {
		b := make([]byte, 1<<(c+minMirrorShift))
		p = &b
	}
	return (*p)[:n], func() { mirrorBufs[c].Put(p) }
}

// sendRange reads [off, off+n) under the range lock and sequences it as
// data frames for the non-zero chunks and hole frames for zero ones.
func (s *Stream) sendRange(off, n int64, p wire.Purpose) (sent, holes int64, err error) {
	for n > 0 {
		step := min(n, mirrorIO)
		// Frames keep slices of buf until acknowledged; the queue then
		// gives it back to the pool (Entry.Done of the last frame).
		buf, done := getMirrorBuf(step)
		unlock := s.locks.lock(off, step)
		if err = readFull(s.b, buf, off); err != nil {
			unlock()
			done()
			return sent, holes, fmt.Errorf("read %d+%d: %w", off, step, err)
		}
		var frames []wire.Sequenced
		// Runs of zero / non-zero chunks, on the chunk grid.
		for i := int64(0); i < step; {
			j := min(alignUp(off+i+1, s.chunk)-off, step)
			zero := isZero(buf[i:j])
			k := j
			for k < step {
				next := min(alignUp(off+k+1, s.chunk)-off, step)
				if isZero(buf[k:next]) != zero {
					break
				}
				k = next
			}
			if zero {
				frames = append(frames, &wire.MirrorHole{Offset: uint64(off + i), Length: uint64(k - i), Purpose: p})
				holes += k - i
			} else {
				frames = append(frames, &wire.MirrorData{Offset: uint64(off + i), Purpose: p, Data: buf[i:k:k]})
				sent += k - i
			}
			i = k
		}
		_, err = s.pushDone(done, frames...)
		unlock()
		if err != nil {
			return sent, holes, err
		}
		off += step
		n -= step
	}
	return sent, holes, nil
}

// pendingSums is a checksum request in flight.
type pendingSums struct {
	seq   uint64
	off   int64
	local []wire.Sum
}

// sumPass compares chunk checksums of the whole volume with the target's,
// each pair taken at the same point of the stream. With send, differing
// chunks are sent (purpose p); otherwise they are only reported.
func (s *Stream) sumPass(ctx context.Context, p wire.Purpose, send bool) (MirrorResult, error) {
	var res MirrorResult
	var pending []pendingSums
	defer func() { // abandoned requests (error paths)
		for _, ps := range pending {
			s.sums.Delete(ps.seq)
		}
	}()
	window := s.chunk * sumWindow
	// issue takes the source's checksums of a window and sequences the
	// request for the target's, both under the window's range lock.
	issue := func(off int64) (pendingSums, error) {
		count := int((min(off+window, s.size) - off + s.chunk - 1) / s.chunk)
		unlock := s.locks.lock(off, min(window, s.size-off))
		defer unlock()
		local, err := chunkSums(s.b, s.ext, off, s.chunk, count, s.size)
		if err != nil {
			return pendingSums{}, err
		}
		seq, err := s.push(&wire.SumRequest{Offset: uint64(off), ChunkSize: uint32(s.chunk), Count: uint32(count), Purpose: p})
		return pendingSums{seq: seq, off: off, local: local}, err
	}
	collect := func() error {
		ps := pending[0]
		pending = pending[1:]
		var reply *wire.SumReply
		for retry := 0; ; retry++ {
			box := s.sumBox(ps.seq)
			select {
			case reply = <-box:
			case <-ctx.Done():
				s.sums.Delete(ps.seq)
				return ctx.Err()
			}
			s.sums.Delete(ps.seq)
			if reply != nil {
				break
			}
			// The connection was lost: ask again once it is back.
			s.log.Info("checksum reply lost with the connection; asking again", "offset", ps.off)
			if retry == 5 {
				return errors.New("connection lost while waiting for checksums, 5 times")
			}
			if err := s.waitConnected(ctx); err != nil {
				return err
			}
			var err error
			if ps, err = issue(ps.off); err != nil {
				return err
			}
		}
		if len(reply.Sums) != len(ps.local) || reply.Offset != uint64(ps.off) {
			return fmt.Errorf("checksum reply for %d: %d sums at %d, want %d at %d", ps.seq, len(reply.Sums), reply.Offset, len(ps.local), ps.off)
		}
		for i := 0; i < len(ps.local); {
			if reply.Sums[i] == ps.local[i] {
				i++
				continue
			}
			j := i + 1
			for j < len(ps.local) && reply.Sums[j] != ps.local[j] {
				j++
			}
			off := ps.off + int64(i)*s.chunk
			n := min(int64(j-i)*s.chunk, s.size-off)
			res.Differing = appendRange(res.Differing, Range{off, n})
			if send {
				sent, holes, err := s.sendRange(off, n, p)
				if err != nil {
					return err
				}
				res.Sent += sent
				res.Holes += holes
			}
			i = j
		}
		res.Scanned = min(ps.off+window, s.size)
		if p != wire.PurposeVerify {
			s.st.mirrorDone.Store(res.Scanned)
		}
		return nil
	}
	for off := int64(0); off < s.size; off += window {
		if err := s.waitQueueBelow(ctx, s.mirrorQueueCap()); err != nil {
			return res, err
		}
		ps, err := issue(off)
		if err != nil {
			return res, err
		}
		pending = append(pending, ps)
		if len(pending) >= sumsInFlight {
			if err := collect(); err != nil {
				return res, err
			}
		}
	}
	for len(pending) > 0 {
		if err := collect(); err != nil {
			return res, err
		}
	}
	return res, nil
}

func appendRange(rs []Range, r Range) []Range {
	if n := len(rs); n > 0 && rs[n-1].Offset+rs[n-1].Length == r.Offset {
		rs[n-1].Length += r.Length
		return rs
	}
	return append(rs, r)
}

// Verify compares source and target chunk checksums while the application
// keeps writing (each pair is taken at the same point of the stream, so a
// write in flight is never reported as a difference) and reports the
// differing ranges. With resync, it then sends them, marking the target
// inconsistent for the duration.
func (s *Stream) Verify(ctx context.Context, resync bool) (MirrorResult, error) {
	if err := s.waitConnected(ctx); err != nil {
		return MirrorResult{}, err
	}
	start := time.Now()
	res, err := s.sumPass(ctx, wire.PurposeVerify, false)
	res.Duration = time.Since(start)
	if err != nil {
		return res, fmt.Errorf("verify: %w", err)
	}
	for _, r := range res.Differing {
		s.log.Warn("verify: target differs", "offset", r.Offset, "length", r.Length)
	}
	s.log.Info("verify done", "scanned", res.Scanned, "differing_bytes", res.DifferingBytes(), "ranges", len(res.Differing),
		"took", res.Duration.Round(time.Millisecond))
	if !resync || len(res.Differing) == 0 {
		return res, nil
	}
	rs, err := s.Resync(ctx, res.Differing)
	res.Sent, res.Holes = rs.Sent, rs.Holes
	return res, err
}

// Resync sends the given ranges (e.g. the dirty chunks of a bitmap, in
// disk order) as they are now, each read under the range lock and
// sequenced into the stream, with the target inconsistent until the pass
// ends. Progress is reported like a mirror's.
func (s *Stream) Resync(ctx context.Context, ranges []Range) (MirrorResult, error) {
	var res MirrorResult
	if err := s.waitConnected(ctx); err != nil {
		return res, err
	}
	start := time.Now()
	var total int64
	for _, r := range ranges {
		if r.Offset < 0 || r.Length < 0 || r.Offset+r.Length > s.size {
			return res, fmt.Errorf("resync range %d+%d outside the %d-byte volume", r.Offset, r.Length, s.size)
		}
		total += r.Length
	}
	s.st.mirrorActive.Store(true)
	defer s.st.mirrorActive.Store(false)
	s.st.mirrorDone.Store(0)
	s.st.mirrorTotal.Store(total)
	if _, err := s.push(&wire.MirrorState{Phase: wire.PhaseBegin, Purpose: wire.PurposeResync, Total: uint64(total)}); err != nil {
		return res, err
	}
	s.setTargetState(wire.StateInconsistent)
	for _, r := range ranges {
		if err := s.waitQueueBelow(ctx, s.mirrorQueueCap()); err != nil {
			return res, fmt.Errorf("resync: %w", err)
		}
		sent, holes, err := s.sendRange(r.Offset, r.Length, wire.PurposeResync)
		res.Sent += sent
		res.Holes += holes
		if err != nil {
			return res, fmt.Errorf("resync: %w", err)
		}
		res.Scanned += r.Length
		s.st.mirrorDone.Store(res.Scanned)
	}
	if err := s.endPass(ctx, wire.PurposeResync); err != nil {
		return res, fmt.Errorf("resync: %w", err)
	}
	res.Duration = time.Since(start)
	s.log.Info("resync done", "ranges", len(ranges), "bytes", total, "sent", res.Sent, "holes", res.Holes,
		"took", res.Duration.Round(time.Millisecond))
	return res, nil
}
