package replstate

import (
	"fmt"

	"github.com/prometheus/client_golang/prometheus"
)

// Status is the state layer's view of a source.
type Status struct {
	State        string // connecting | replicating | resyncing | tracking | refused
	Tracking     bool   // changes are recorded locally for a later resync, the target is not following
	Connected    bool
	DirtyBytes   int64 // bitmap
	HotExtents   int
	ResyncActive bool
	ResyncTotal  int64 // dirty bytes at the start of the current/last pass
	ResyncDone   int64
	ResyncSent   int64 // payload bytes sent by resyncs and mirrors since start
	ResyncPasses int64
	// ResyncScheduled sums the dirty bytes each resync pass set out to
	// send (the denominator of resync efficiency).
	ResyncScheduled int64
	// At open: dirty bytes (the bitmap with the hot extents of a crash
	// folded in) and the number of hot extents found.
	OpenDirtyBytes int64
	OpenHotExtents int
	// OpenQueueBytes: disk queue bytes of the stream resumed at start
	// (replayed after the target's applied sequence); 0 when a new
	// stream started.
	OpenQueueBytes int64
	QueueMemBytes  int64
	QueueDiskBytes int64
	QueueOverflow  bool
	Generation     uint64
	History        []uint64
	PeerGeneration uint64
	Decision       string
	Refusal        string
	// Synced: the target took this side's generation with nothing left
	// to resync (queued writes may still be in flight).
	Synced bool
	// SetAside is where state of another job or volume was moved at
	// open ("" when none was).
	SetAside string
	// The current stream (a new one starts when the stream cannot be
	// resumed): its ID, the last sequence assigned and the last the
	// target applied.
	Stream, LastSeq, AckedSeq uint64
	// BacklogBytes and BacklogEntries are what the stream sequenced and
	// the target has not acknowledged (memory and disk).
	BacklogBytes   int64
	BacklogEntries int
	// A full or diff mirror: running, bytes of the volume done and total
	// (the current or last one).
	MirrorActive            bool
	MirrorDone, MirrorTotal int64
}

// Status returns a snapshot.
func (s *Source) Status() Status {
	cur := s.cur.Load()
	st := Status{Connected: cur.Connected(), Tracking: s.tr.on.Load() || !s.running.Load(), DirtyBytes: s.bm.DirtyBytes(),
		HotExtents: s.al.HotExtents(), ResyncActive: s.rsy.active.Load(), ResyncTotal: s.rsy.total.Load(),
		ResyncDone: s.rsy.done.Load(), ResyncSent: s.rsy.sent.Load(), ResyncPasses: s.rsy.passes.Load(),
		PeerGeneration: s.gens.peer.Load(), ResyncScheduled: s.rsy.scheduled.Load(),
		OpenDirtyBytes: s.atOpen.dirty, OpenHotExtents: s.atOpen.hot, OpenQueueBytes: s.atOpen.queue, Synced: s.hs.synced.Load(), SetAside: s.atOpen.setAside}
	es := cur.Stats()
	st.Stream, st.LastSeq, st.AckedSeq = cur.StreamID(), es.LastSeq, es.AckedSeq
	st.BacklogBytes, st.BacklogEntries = es.QueueBytes, es.QueueEntries
	st.MirrorActive, st.MirrorDone, st.MirrorTotal = es.MirrorActive, es.MirrorDone, es.MirrorTotal
	if q := s.q.Load(); q != nil {
		st.QueueMemBytes, st.QueueDiskBytes, st.QueueOverflow = q.q.MemBytes(), q.q.DiskBytes(), q.overflow.Load()
	}
	s.gens.mu.Lock()
	st.Generation, st.History = s.gens.state.Current, append([]uint64(nil), s.gens.state.History...)
	s.gens.mu.Unlock()
	if p := s.hs.decision.Load(); p != nil {
		st.Decision = *p
	}
	switch p := s.hs.refusal.Load(); {
	case p != nil:
		st.Refusal, st.State = *p, "refused"
	case st.Tracking:
		st.State = "tracking"
	case !st.Connected:
		st.State = "connecting"
	case st.ResyncActive:
		st.State = "resyncing"
	default:
		st.State = "replicating"
	}
	return st
}

var (
	descTracking   = prometheus.NewDesc("doppel_repl_tracking", "1 while the source tracks changes locally (target absent) instead of replicating.", nil, nil)
	descDirty      = prometheus.NewDesc("doppel_repl_dirty_bytes", "Bytes marked dirty in the bitmap.", nil, nil)
	descHot        = prometheus.NewDesc("doppel_repl_hot_extents", "Activity-log extents hot.", nil, nil)
	descRPass      = prometheus.NewDesc("doppel_repl_resync_pass_bytes", "The current or last resync pass: its dirty bytes (total) and those done.", []string{"stage"}, nil)
	descRSent      = prometheus.NewDesc("doppel_repl_resync_sent_bytes_total", "Payload bytes sent by resyncs and mirrors.", nil, nil)
	descRSched     = prometheus.NewDesc("doppel_repl_resync_scheduled_bytes_total", "Dirty bytes resync passes set out to send.", nil, nil)
	descOpenDirty  = prometheus.NewDesc("doppel_repl_open_dirty_bytes", "Dirty bytes found at start (bitmap plus the hot extents of a crash).", nil, nil)
	descOpenHot    = prometheus.NewDesc("doppel_repl_open_hot_extents", "Hot activity-log extents found at start (a crash).", nil, nil)
	descOpenQueue  = prometheus.NewDesc("doppel_repl_open_queue_bytes", "Disk queue bytes of the stream resumed at start (replayed, not resynced).", nil, nil)
	descRActive    = prometheus.NewDesc("doppel_repl_resync_active", "1 while a resync or mirror runs.", nil, nil)
	descQMem       = prometheus.NewDesc("doppel_repl_queue_memory_bytes", "Queue bytes held in memory.", nil, nil)
	descQDisk      = prometheus.NewDesc("doppel_repl_queue_disk_bytes", "Queue bytes on disk.", nil, nil)
	descQOverflow  = prometheus.NewDesc("doppel_repl_queue_overflow", "1 while the queue overflowed (changes tracked in the bitmap).", nil, nil)
	descGeneration = prometheus.NewDesc("doppel_repl_generation_info", "Current generation IDs of this side and the peer.", []string{"side", "id"}, nil)
	descRefused    = prometheus.NewDesc("doppel_repl_refused", "1 when the state handshake refused replication (split brain, unrelated data).", nil, nil)
)

type collector struct{ s *Source }

// Collector returns a Prometheus collector for the state layer's metrics.
func (s *Source) Collector() prometheus.Collector { return collector{s} }

func (c collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descTracking, descDirty, descHot, descRPass, descRSent, descRSched, descOpenDirty, descOpenHot, descOpenQueue, descRActive, descQMem, descQDisk, descQOverflow, descGeneration, descRefused} {
		ch <- d
	}
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

func (c collector) Collect(ch chan<- prometheus.Metric) {
	st := c.s.Status()
	g := prometheus.GaugeValue
	ch <- prometheus.MustNewConstMetric(descTracking, g, b2f(st.Tracking))
	ch <- prometheus.MustNewConstMetric(descDirty, g, float64(st.DirtyBytes))
	ch <- prometheus.MustNewConstMetric(descHot, g, float64(st.HotExtents))
	ch <- prometheus.MustNewConstMetric(descRPass, g, float64(st.ResyncTotal), "total")
	ch <- prometheus.MustNewConstMetric(descRPass, g, float64(st.ResyncDone), "done")
	ch <- prometheus.MustNewConstMetric(descRSent, prometheus.CounterValue, float64(st.ResyncSent))
	ch <- prometheus.MustNewConstMetric(descRSched, prometheus.CounterValue, float64(st.ResyncScheduled))
	ch <- prometheus.MustNewConstMetric(descOpenDirty, g, float64(st.OpenDirtyBytes))
	ch <- prometheus.MustNewConstMetric(descOpenHot, g, float64(st.OpenHotExtents))
	ch <- prometheus.MustNewConstMetric(descOpenQueue, g, float64(st.OpenQueueBytes))
	ch <- prometheus.MustNewConstMetric(descRActive, g, b2f(st.ResyncActive))
	ch <- prometheus.MustNewConstMetric(descQMem, g, float64(st.QueueMemBytes))
	ch <- prometheus.MustNewConstMetric(descQDisk, g, float64(st.QueueDiskBytes))
	ch <- prometheus.MustNewConstMetric(descQOverflow, g, b2f(st.QueueOverflow))
	ch <- prometheus.MustNewConstMetric(descGeneration, g, 1, "local", fmt.Sprintf("%016x", st.Generation))
	if st.PeerGeneration != 0 {
		ch <- prometheus.MustNewConstMetric(descGeneration, g, 1, "peer", fmt.Sprintf("%016x", st.PeerGeneration))
	}
	ch <- prometheus.MustNewConstMetric(descRefused, g, b2f(st.Refusal != ""))
}
