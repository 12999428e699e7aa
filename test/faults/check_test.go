package faults

import (
	"strings"
	"testing"
	"time"
)

const ms = time.Millisecond

// op is a write of value v to block b by host h over [inv, ret] ms.
func op(h string, b int, v uint64, inv, ret int, res Result) Op {
	return Op{Host: h, Block: b, Value: v, Invoke: time.Duration(inv) * ms, Return: time.Duration(ret) * ms, Result: res}
}

// failover is vm1 → vm2: epoch 2 granted at 5000 ms, announced at 5100 ms.
var failover = []Promotion{{Epoch: 2, Holder: "vm2", Granted: 5000 * ms, Announced: 5100 * ms}}

func round(mode string, ops []Op, ps []Promotion, finalHost string, final ...uint64) *Round {
	return &Round{Mode: mode, StartHolder: "vm1", Initial: make([]uint64, len(final)), Ops: ops, Promotions: ps, FinalHost: finalHost, Final: final}
}

func TestCheck(t *testing.T) {
	for _, tc := range []struct {
		name string
		r    *Round
		want string // "" or the property and a fragment of the violation
	}{
		{"sync failover, nothing lost", round("sync", []Op{
			op("vm1", 0, 1, 0, 10, OK),
			op("vm1", 1, 2, 10, 20, OK),
			op("vm1", 0, 3, 3000, 8000, EIO), // held, failed when superseded
			op("vm2", 1, 4, 6000, 6010, OK),
		}, failover, "vm2", 1, 4), ""},
		{"sync: an unanswered write may land late", round("sync", []Op{
			op("vm1", 0, 1, 0, 10, OK),
			op("vm1", 0, 2, 20, 9000, Lost),
			op("vm1", 0, 3, 30, 40, OK),
		}, nil, "vm1", 2), ""},
		{"sync: a failed write may have landed before it failed", round("sync", []Op{
			op("vm1", 0, 1, 0, 10, OK),
			op("vm1", 0, 2, 20, 5000, EIO),
		}, nil, "vm1", 2), ""},
		{"sync: acknowledged write lost", round("sync", []Op{
			op("vm1", 0, 1, 0, 10, OK),
			op("vm1", 0, 2, 20, 30, OK),
		}, failover, "vm2", 1), "(b) acknowledged write lost: vm1 block 0 value 2"},
		{"sync: acknowledged write lost to the initial value", round("sync", []Op{
			op("vm1", 0, 1, 0, 10, OK),
		}, failover, "vm2", 0), "(b) acknowledged write lost"},
		{"sync: a failed write cannot overwrite a later acknowledged one", round("sync", []Op{
			op("vm1", 0, 1, 0, 10, EIO),
			op("vm1", 0, 2, 20, 30, OK),
		}, nil, "vm1", 1), "(b) acknowledged write lost: vm1 block 0 value 2"},
		{"a value nobody wrote", round("sync", []Op{
			op("vm1", 0, 1, 0, 10, OK),
		}, nil, "vm1", 77), "(b) block 0 holds value 77"},
		{"split brain: the old source acknowledges after the promotion", round("async", []Op{
			op("vm1", 0, 1, 0, 10, OK),
			op("vm2", 1, 2, 5200, 5210, OK),
			op("vm1", 0, 3, 5300, 5310, OK),
		}, failover, "vm2", 1, 2), "(a) vm1 block 0 value 3 [5.3s, 5.31s] ok: acknowledged while vm1 held no epoch"},
		{"the new source acknowledges before its grant", round("sync", []Op{
			op("vm1", 0, 1, 0, 10, OK),
			op("vm2", 1, 2, 4000, 4010, OK),
		}, failover, "vm2", 1, 2), "(a) vm2 block 1 value 2 [4s, 4.01s] ok: acknowledged while vm2 held no epoch"},
		{"a paused source answers long after the promotion", round("async", []Op{
			op("vm1", 0, 1, 4000, 9000, OK),
		}, failover, "vm2", 0), "(a) vm1 block 0 value 1 [4s, 9s] ok: answered 3.9s after epoch 2 was granted to vm2"},
		{"sync: a paused source answers late what its target acknowledged", round("sync", []Op{
			op("vm1", 0, 1, 4000, 9000, OK),
			op("vm2", 1, 2, 5200, 5210, OK),
		}, failover, "vm2", 1, 2), ""},
		{"sync: a paused source's late answer of a write the promoted side lacks", round("sync", []Op{
			op("vm1", 0, 1, 4000, 9000, OK),
		}, failover, "vm2", 0), "(b) acknowledged write lost: vm1 block 0 value 1"},
		{"sync: a superseded source acknowledges a write begun after the promotion", round("sync", []Op{
			op("vm1", 0, 1, 5300, 5310, OK),
		}, failover, "vm2", 1), "(a) vm1 block 0 value 1 [5.3s, 5.31s] ok: acknowledged while vm1 held no epoch"},
		{"an answer seen within the grace is not late", round("sync", []Op{
			op("vm1", 0, 1, 4000, 5300, OK),
		}, failover, "vm2", 1), ""},
		{"interleaved acknowledgements without any epoch record", round("sync", []Op{
			op("vm1", 0, 1, 0, 10, OK),
			op("vm2", 1, 2, 20, 30, OK),
			op("vm1", 2, 3, 40, 50, OK),
		}, nil, "vm1", 1, 2, 3), "(a) acknowledgements interleave"},
		{"async failover: the tail lost, a prefix kept", round("async", []Op{
			op("vm1", 0, 1, 0, 10, OK),
			op("vm1", 1, 2, 20, 30, OK),
			op("vm1", 2, 3, 40, 50, OK),
			op("vm2", 3, 4, 6000, 6010, OK),
		}, failover, "vm2", 1, 2, 0, 4), ""},
		{"async: not a causal prefix", round("async", []Op{
			op("vm1", 0, 1, 0, 10, OK),
			op("vm1", 1, 2, 20, 30, OK),
			op("vm1", 2, 3, 40, 50, OK),
		}, failover, "vm2", 1, 0, 3), "(c) not a causal prefix: the image reflects vm1 block 2 value 3 [40ms, 50ms] ok but lost vm1 block 1 value 2"},
		{"async: concurrent writes may land in either order", round("async", []Op{
			op("vm1", 0, 1, 0, 30, OK),
			op("vm1", 1, 2, 10, 40, OK),
		}, failover, "vm2", 0, 2), ""},
		{"async: the new source's acknowledged write lost", round("async", []Op{
			op("vm1", 0, 1, 0, 10, OK),
			op("vm2", 0, 2, 6000, 6010, OK),
		}, failover, "vm2", 1), "(c) acknowledged write lost: vm2 block 0 value 2"},
		{"async without failover: every acknowledged write is there", round("async", []Op{
			op("vm1", 0, 1, 0, 10, OK),
			op("vm1", 1, 2, 20, 30, OK),
		}, nil, "vm1", 1, 0), "(c) acknowledged write lost: vm1 block 1 value 2"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			vs := Check(tc.r, time.Second)
			if tc.want == "" {
				for _, v := range vs {
					t.Errorf("unexpected violation %v", v)
				}
				return
			}
			for _, v := range vs {
				if strings.Contains(v.String(), tc.want) {
					return
				}
			}
			t.Errorf("want a violation containing %q, got %v", tc.want, vs)
		})
	}
}
