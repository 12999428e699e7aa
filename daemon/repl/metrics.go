package repl

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/doppelha/doppel/daemon/repl/wire"
)

var (
	descSent = prometheus.NewDesc("doppel_repl_sent_bytes_total",
		"Bytes written to the replication connection, by kind (write, mirror, resync, verify).", []string{"kind"}, nil)
	descPayload = prometheus.NewDesc("doppel_repl_payload_bytes_total",
		"Data bytes (writes, mirror and resync chunks) sent, before compression, by kind.", []string{"kind"}, nil)
	descRecv = prometheus.NewDesc("doppel_repl_received_bytes_total",
		"Bytes read from the replication connection.", nil, nil)
	descQueueBytes = prometheus.NewDesc("doppel_repl_queue_bytes",
		"Bytes queued for the target and not yet acknowledged.", nil, nil)
	descQueueEntries = prometheus.NewDesc("doppel_repl_queue_entries",
		"Frames queued for the target and not yet acknowledged.", nil, nil)
	descSeq = prometheus.NewDesc("doppel_repl_sequence",
		"Replication sequence numbers: assigned, sent, acknowledged (applied by the target), durable (fsynced by the target).", []string{"stage"}, nil)
	descMirror = prometheus.NewDesc("doppel_repl_mirror_bytes",
		"Mirror progress: bytes of the volume done and total.", []string{"stage"}, nil)
	descMirrorActive = prometheus.NewDesc("doppel_repl_mirror_active",
		"1 while a mirror runs.", nil, nil)
	descConnected = prometheus.NewDesc("doppel_repl_connected",
		"1 while the replication link is established.", nil, nil)
	descTargetState = prometheus.NewDesc("doppel_repl_target_data_state",
		"Target data state: 1 for the current state label.", []string{"state"}, nil)
	descApplied = prometheus.NewDesc("doppel_repl_applied_sequence",
		"Target: last sequence applied / made durable.", []string{"stage"}, nil)
	descApplyBytes = prometheus.NewDesc("doppel_repl_applied_bytes_total",
		"Target: data bytes written to the volume.", nil, nil)
	descRefused = prometheus.NewDesc("doppel_repl_refused_peers_total",
		"Target: connections refused (TLS, protocol, version, volume).", nil, nil)
)

func gauge(d *prometheus.Desc, v float64, labels ...string) prometheus.Metric {
	return prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
}

func counter(d *prometheus.Desc, v float64, labels ...string) prometheus.Metric {
	return prometheus.MustNewConstMetric(d, prometheus.CounterValue, v, labels...)
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

// streamCollector exports a source's StreamStats.
type streamCollector struct{ stats func() StreamStats }

// Collector returns a Prometheus collector for the source's metrics.
func (s *Stream) Collector() prometheus.Collector { return streamCollector{s.Stats} }

// NewStreamCollector returns a collector of the source metrics stats
// reports: for an owner that replaces its Stream (a new stream) and keeps
// the counters (SentBytes, PayloadBytes, RecvBytes) growing across them.
func NewStreamCollector(stats func() StreamStats) prometheus.Collector {
	return streamCollector{stats}
}

func (streamCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descSent, descPayload, descRecv, descQueueBytes, descQueueEntries,
		descSeq, descMirror, descMirrorActive, descConnected, descTargetState} {
		ch <- d
	}
}

func (c streamCollector) Collect(ch chan<- prometheus.Metric) {
	st := c.stats()
	for _, k := range kindNames {
		ch <- counter(descSent, float64(st.SentBytes[k]), k)
		ch <- counter(descPayload, float64(st.PayloadBytes[k]), k)
	}
	ch <- counter(descRecv, float64(st.RecvBytes))
	ch <- gauge(descQueueBytes, float64(st.QueueBytes))
	ch <- gauge(descQueueEntries, float64(st.QueueEntries))
	ch <- gauge(descSeq, float64(st.LastSeq), "assigned")
	ch <- gauge(descSeq, float64(st.SentSeq), "sent")
	ch <- gauge(descSeq, float64(st.AckedSeq), "acknowledged")
	ch <- gauge(descSeq, float64(st.DurableSeq), "durable")
	ch <- gauge(descMirror, float64(st.MirrorDone), "done")
	ch <- gauge(descMirror, float64(st.MirrorTotal), "total")
	ch <- gauge(descMirror, float64(st.MirrorTotal-st.MirrorDone), "remaining")
	ch <- gauge(descMirrorActive, b2f(st.MirrorActive))
	ch <- gauge(descConnected, b2f(st.Connected))
	for _, name := range []string{"consistent", "inconsistent", "unknown"} {
		ch <- gauge(descTargetState, b2f(st.TargetState == name), name)
	}
}

// applierCollector exports an Applier's state.
type applierCollector struct{ t *Applier }

// Collector returns a Prometheus collector for the target's metrics.
func (t *Applier) Collector() prometheus.Collector { return applierCollector{t} }

func (applierCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descRecv, descApplied, descApplyBytes, descConnected, descTargetState, descRefused} {
		ch <- d
	}
}

func (c applierCollector) Collect(ch chan<- prometheus.Metric) {
	st, durable, peer := c.t.Status()
	ch <- counter(descRecv, float64(c.t.tst.recvBytes.Load()))
	ch <- gauge(descApplied, float64(st.Applied), "applied")
	ch <- gauge(descApplied, float64(durable), "durable")
	ch <- counter(descApplyBytes, float64(c.t.tst.appliedBytes.Load()))
	ch <- gauge(descConnected, b2f(peer != ""))
	for _, s := range []uint8{wire.StateConsistent, wire.StateInconsistent} {
		ch <- gauge(descTargetState, b2f(st.State == stateName(s)), stateName(s))
	}
	ch <- counter(descRefused, float64(c.t.tst.refused.Load()))
}
