package agent

import (
	"sync"
	"time"
)

// rpoEstimator estimates a source's recovery point: how old the oldest
// write is that the target does not hold yet (what a failover right now
// would lose). The engine does not timestamp its writes, so the estimator
// samples (time, last sequence submitted) at each observation and reports
// now − the time of the oldest sample whose sequence the target has not
// applied yet: an estimate, short by at most one observation interval
// (the agent observes every 100 ms and at each status request).
//
// Writes that are not in the ordered stream (tracked in the dirty bitmap
// while the target is absent, the link is down, or a resync is running)
// are dated by the first observation that saw dirty bytes in that state;
// the writes a dropped stream still held keep their sample's date.
//
// In sync mode a connected, synced source has RPO 0: the application is
// acknowledged only once the target applied the write. Not connected, a
// sync source acknowledges locally: its queued writes count.
type rpoEstimator struct {
	mu        sync.Mutex
	stream    uint64
	samples   []rpoSample // ascending seq and time
	riskSince time.Time   // oldest write outside the ordered stream; zero: none
}

type rpoSample struct {
	at  time.Time
	seq uint64
}

// maxRPOSamples bounds memory: once full, the newest sample is replaced
// (the oldest, which decides the estimate, is kept).
const maxRPOSamples = 4096

// rpoInput is one observation of a source.
type rpoInput struct {
	Stream    uint64 // the engine's stream ID (sequences restart with a new stream)
	Last      uint64 // last sequence submitted
	Applied   uint64 // the target applied everything up to here
	Sync      bool
	Connected bool
	// AtRisk: writes are tracked in the bitmap rather than shipped in
	// order (tracking, not connected, resyncing).
	AtRisk bool
	Dirty  int64 // bitmap bytes
}

// observe records in at now and returns the estimate.
func (e *rpoEstimator) observe(now time.Time, in rpoInput) time.Duration {
	e.mu.Lock()
	defer e.mu.Unlock()
	if in.Stream != e.stream {
		// A new stream: the old one's unapplied writes are now in the
		// bitmap; they keep their date.
		if len(e.samples) > 0 && (e.riskSince.IsZero() || e.samples[0].at.Before(e.riskSince)) {
			e.riskSince = e.samples[0].at
		}
		e.samples = e.samples[:0]
		e.stream = in.Stream
	}
	i := 0
	for i < len(e.samples) && e.samples[i].seq <= in.Applied {
		i++
	}
	e.samples = append(e.samples[:0], e.samples[i:]...)
	if in.Last > in.Applied && (len(e.samples) == 0 || in.Last > e.samples[len(e.samples)-1].seq) {
		s := rpoSample{at: now, seq: in.Last}
		if len(e.samples) < maxRPOSamples {
			e.samples = append(e.samples, s)
		} else {
			e.samples[len(e.samples)-1] = s
		}
	}
	switch {
	case in.AtRisk && in.Dirty > 0:
		if e.riskSince.IsZero() {
			e.riskSince = now
		}
	case in.Dirty == 0 || !in.AtRisk:
		e.riskSince = time.Time{}
	}
	var oldest time.Time
	// Sync mode: a write is acknowledged once the target applied it,
	// unless the target is not following (then it is acknowledged
	// locally and queued or tracked).
	if (!in.Sync || in.AtRisk) && len(e.samples) > 0 {
		oldest = e.samples[0].at
	}
	if !e.riskSince.IsZero() && (oldest.IsZero() || e.riskSince.Before(oldest)) {
		oldest = e.riskSince
	}
	if oldest.IsZero() {
		return 0
	}
	return max(now.Sub(oldest), 0)
}
