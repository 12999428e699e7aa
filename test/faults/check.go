package faults

import (
	"fmt"
	"math"
	"sort"
	"time"
)

const never = time.Duration(math.MaxInt64)

// window is a span during which a host may have held the epoch.
type window struct {
	from, to time.Duration
	epoch    uint64 // 0: the round's first holder's epoch
	endedBy  *Promotion
}

// windows returns, per host, when it may have held an epoch: the round's
// first holder until the first promotion was announced, each promoted
// holder from its grant until the next promotion was announced.
func (r *Round) windows() map[string][]window {
	w := map[string][]window{}
	ps := append([]Promotion(nil), r.Promotions...)
	sort.Slice(ps, func(i, j int) bool { return ps[i].Epoch < ps[j].Epoch })
	holder, from, epoch := r.StartHolder, time.Duration(math.MinInt64), uint64(0)
	for i := range ps {
		p := &ps[i]
		w[holder] = append(w[holder], window{from: from, to: p.Announced, epoch: epoch, endedBy: p})
		holder, from, epoch = p.Holder, p.Granted, p.Epoch
	}
	w[holder] = append(w[holder], window{from: from, to: never, epoch: epoch})
	return w
}

// Check returns every violation of the round's history of properties
// (a) one acknowledging host per epoch, (b) sync: no acknowledged write
// missing from the final image, (c) async: the final image is a causal
// prefix of what the superseded hosts acknowledged plus everything the
// final host acknowledged in its epoch. grace is how late the application
// may see an answer sent before a promotion was announced.
func Check(r *Round, grace time.Duration) []Violation {
	var vs []Violation
	vs = append(vs, checkEpochs(r, grace)...)
	vs = append(vs, checkInterleave(r)...)
	if r.Final == nil {
		return vs
	}
	switch r.Mode {
	case "sync":
		vs = append(vs, checkRegisters(r, func(Op) bool { return true }, "b")...)
	default:
		vs = append(vs, checkAsync(r)...)
	}
	return vs
}

// checkEpochs: every acknowledged write was answered while its host may
// have held the epoch (a), and, in async mode, not seen by the
// application more than grace after that host's epoch was announced
// superseded. In sync mode a superseded host may answer late a write
// begun in its epoch: a sync source acknowledges only what its target
// acknowledged (on the promoted side before its promotion) or, under its
// lease, with the target recorded out of sync (then no automatic
// promotion follows), so its process stopped with the target's
// acknowledgement unanswered answers on waking; whether such a write
// holds is (b)'s question.
func checkEpochs(r *Round, grace time.Duration) []Violation {
	var vs []Violation
	ws := r.windows()
	for _, o := range r.Ops {
		if o.Result != OK {
			continue
		}
		in := false
		for _, w := range ws[o.Host] {
			if o.Invoke <= w.to && o.Return >= w.from {
				in = true
				if r.Mode != "sync" && w.endedBy != nil && o.Invoke <= w.to && o.Return > w.to+grace {
					vs = append(vs, Violation{"a", fmt.Sprintf("%v: answered %v after epoch %d was granted to %s (announced at %v): an acknowledgement of a superseded host",
						o, o.Return-w.to, w.endedBy.Epoch, w.endedBy.Holder, w.to)})
				}
			}
		}
		if !in {
			vs = append(vs, Violation{"a", fmt.Sprintf("%v: acknowledged while %s held no epoch (holders: %s)", o, o.Host, describe(ws))})
		}
	}
	return vs
}

func describe(ws map[string][]window) string {
	var s string
	hosts := make([]string, 0, len(ws))
	for h := range ws {
		hosts = append(hosts, h)
	}
	sort.Strings(hosts)
	for _, h := range hosts {
		for _, w := range ws[h] {
			from, to := "start", "end"
			if w.from != time.Duration(math.MinInt64) {
				from = w.from.String()
			}
			if w.to != never {
				to = w.to.String()
			}
			s += fmt.Sprintf(" %s[%s, %s]", h, from, to)
		}
	}
	return s
}

// checkInterleave: acknowledgements of two hosts never interleave in
// time: no host acknowledges a write begun after another host's
// acknowledgement that itself began after the first host's
// acknowledgement (X, then Y, then X again, each strictly after the
// previous one). It needs no epoch record.
func checkInterleave(r *Round) []Violation {
	first := map[string]Op{} // per host, its earliest-returning ack
	for _, o := range r.Ops {
		if o.Result != OK {
			continue
		}
		if f, ok := first[o.Host]; !ok || o.Return < f.Return {
			first[o.Host] = o
		}
	}
	var vs []Violation
	for x, a := range first {
		// b: the earliest-returning ack of another host begun after a.
		for _, b := range r.Ops {
			if b.Result != OK || b.Host == x || b.Invoke <= a.Return {
				continue
			}
			for _, c := range r.Ops {
				if c.Result == OK && c.Host == x && c.Invoke > b.Return {
					vs = append(vs, Violation{"a", fmt.Sprintf("acknowledgements interleave: %v, then %v, then %v", a, b, c)})
					return vs
				}
			}
		}
	}
	return vs
}

// finalOps indexes the round's writes by value and reports final values
// that are neither the block's initial value nor written to that block.
func finalOps(r *Round) (map[uint64]Op, []Violation) {
	byValue := map[uint64]Op{}
	for _, o := range r.Ops {
		byValue[o.Value] = o
	}
	var vs []Violation
	for b, v := range r.Final {
		if v == r.Initial[b] {
			continue
		}
		if o, ok := byValue[v]; !ok || o.Block != b {
			vs = append(vs, Violation{"b", fmt.Sprintf("block %d holds value %d, never written there in this round (initial %d)", b, v, r.Initial[b])})
		}
	}
	return byValue, vs
}

// checkRegisters: each block is a register; its final value must be one
// written by a write that no acknowledged write (selected by must) had to
// follow: an acknowledged write begun after that write's last possible
// effect (its answer, or never without one) would have overwritten it.
// The initial value is allowed only when no selected write was
// acknowledged.
func checkRegisters(r *Round, must func(Op) bool, prop string) []Violation {
	byValue, vs := finalOps(r)
	if len(vs) > 0 {
		for i := range vs {
			vs[i].Property = prop
		}
		return vs
	}
	for _, w := range r.Ops {
		if w.Result != OK || !must(w) || w.Block >= len(r.Final) {
			continue
		}
		v := r.Final[w.Block]
		if v == w.Value {
			continue
		}
		if v == r.Initial[w.Block] {
			vs = append(vs, Violation{prop, fmt.Sprintf("acknowledged write lost: %v; block %d holds the round's initial value %d", w, w.Block, v)})
			continue
		}
		if x := byValue[v]; w.Invoke > x.end() {
			vs = append(vs, Violation{prop, fmt.Sprintf("acknowledged write lost: %v; block %d holds %v, which ended before it began", w, w.Block, x)})
		}
	}
	return vs
}

// checkAsync: what the final host acknowledged in its last epoch is all
// there (as in sync mode); of what the hosts before it acknowledged, the
// final image holds a causal prefix: if it reflects a write B of theirs,
// it reflects every acknowledged write of theirs that returned before B
// began (replication is in order).
func checkAsync(r *Round) []Violation {
	start := time.Duration(math.MinInt64)
	for _, p := range r.Promotions {
		if p.Holder == r.FinalHost && p.Granted > start {
			start = p.Granted
		}
	}
	final := func(o Op) bool { return o.Host == r.FinalHost && o.Return >= start }
	vs := checkRegisters(r, final, "c")
	byValue, bad := finalOps(r)
	if len(bad) > 0 {
		return vs
	}
	// T: the latest begin of an earlier-epoch write the image reflects.
	var T time.Duration = math.MinInt64
	var tOp Op
	for b, v := range r.Final {
		if o, ok := byValue[v]; ok && o.Block == b && v != r.Initial[b] && !final(o) && o.Invoke > T {
			T, tOp = o.Invoke, o
		}
	}
	for _, a := range r.Ops {
		if a.Result != OK || final(a) || a.Return >= T || a.Block >= len(r.Final) {
			continue
		}
		v := r.Final[a.Block]
		if v == a.Value {
			continue
		}
		if v == r.Initial[a.Block] || a.Invoke > byValue[v].end() {
			vs = append(vs, Violation{"c", fmt.Sprintf("not a causal prefix: the image reflects %v but lost %v, which returned before it began (block %d holds %d)", tOp, a, a.Block, v)})
		}
	}
	return vs
}
