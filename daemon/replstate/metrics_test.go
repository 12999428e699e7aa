package replstate

import (
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// TestEngineCountersMonotonic: the engine's counters grow for the life of
// the Source, across the streams it starts. Here the target loses its
// record of the stream (its TargetFile), so the source restarts the
// stream from the bitmap with a new engine; doppel_repl_sent_bytes_total
// and doppel_repl_payload_bytes_total must go on from where they were
// (they restarted at 0: Prometheus's rate() read a counter reset).
func TestEngineCountersMonotonic(t *testing.T) {
	p, bDir, bFile := startPair(t, 4<<20)
	reg := prometheus.NewRegistry()
	reg.MustRegister(p.src.EngineCollector())
	total := func(name string) float64 {
		t.Helper()
		mfs, err := reg.Gather()
		if err != nil {
			t.Fatal(err)
		}
		var v float64
		for _, mf := range mfs {
			if mf.GetName() == name {
				for _, m := range mf.GetMetric() {
					v += m.GetCounter().GetValue()
				}
			}
		}
		return v
	}
	names := []string{"doppel_repl_sent_bytes_total", "doppel_repl_payload_bytes_total"}

	// The mirror of the new target, then 1 MiB of writes.
	for off := int64(0); off < 1<<20; off += 64 << 10 {
		p.write(off, make([]byte, 64<<10))
	}
	p.converge(20 * time.Second)
	first := p.src.Status().Stream
	before := map[string]float64{}
	for _, n := range names {
		before[n] = total(n)
		if before[n] < 1<<20 {
			t.Fatalf("%s is %.0f after 1 MiB of writes", n, before[n])
		}
	}

	p.stopTarget()
	if err := os.Remove(filepath.Join(bDir, TargetFile)); err != nil {
		t.Fatal(err)
	}
	p.startTarget(bDir, bFile, "")
	last := map[string]float64{}
	for deadline := time.Now().Add(20 * time.Second); p.src.Status().Stream == first; {
		if time.Now().After(deadline) {
			t.Fatalf("the stream did not restart: %+v", p.src.Status())
		}
		for _, n := range names {
			v := total(n)
			if v < last[n] {
				t.Fatalf("%s went down from %.0f to %.0f", n, last[n], v)
			}
			last[n] = v
		}
		time.Sleep(2 * time.Millisecond)
	}
	p.write(2<<20, make([]byte, 64<<10))
	p.converge(20 * time.Second)
	for _, n := range names {
		if after := total(n); after < before[n]+64<<10 {
			t.Errorf("%s: %.0f before the new stream, %.0f after it sent more (a counter reset)", n, before[n], after)
		}
	}
	if err := p.stopSource(); err != nil {
		t.Fatal(err)
	}
	p.stopTarget()
}
