package repl

import (
	"context"
	"testing"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/doppelha/doppel/blockdev"
	"github.com/doppelha/doppel/daemon/repl/wire"
)

func TestMetrics(t *testing.T) {
	const size = 1 << 20
	p := newPair(t, newMem(size), newMem(size), pairOpts{mode: wire.ModeSync})
	for i := range 8 {
		if err := p.src.Apply(context.Background(), &blockdev.Mutation{Op: blockdev.OpWrite, Offset: int64(i) * 4096, Length: 4096, Data: make([]byte, 4096)}); err != nil {
			t.Fatal(err)
		}
	}
	reg := prometheus.NewPedanticRegistry()
	if err := reg.Register(p.src.Collector()); err != nil {
		t.Fatal(err)
	}
	treg := prometheus.NewPedanticRegistry()
	if err := treg.Register(p.tgt.Collector()); err != nil {
		t.Fatal(err)
	}
	check := func(reg *prometheus.Registry, want map[string]float64) {
		t.Helper()
		mfs, err := reg.Gather() // the pedantic registry checks descriptions and labels
		if err != nil {
			t.Fatal(err)
		}
		got := map[string]float64{}
		for _, mf := range mfs {
			for _, m := range mf.GetMetric() {
				name := mf.GetName()
				for _, l := range m.GetLabel() {
					name += "{" + l.GetName() + "=" + l.GetValue() + "}"
				}
				if m.Gauge != nil {
					got[name] = m.GetGauge().GetValue()
				} else {
					got[name] = m.GetCounter().GetValue()
				}
			}
		}
		for k, v := range want {
			if g, ok := got[k]; !ok || g != v {
				t.Errorf("%s = %v (present %v), want %v", k, g, ok, v)
			}
		}
	}
	check(reg, map[string]float64{
		"doppel_repl_payload_bytes_total{kind=write}":     32768,
		"doppel_repl_payload_bytes_total{kind=mirror}":    0,
		"doppel_repl_sequence{stage=assigned}":            8,
		"doppel_repl_sequence{stage=acknowledged}":        8,
		"doppel_repl_queue_entries":                       0,
		"doppel_repl_connected":                           1,
		"doppel_repl_target_data_state{state=consistent}": 1,
	})
	check(treg, map[string]float64{
		"doppel_repl_applied_sequence{stage=applied}": 8,
		"doppel_repl_applied_bytes_total":             32768,
		"doppel_repl_refused_peers_total":             0,
	})
}
