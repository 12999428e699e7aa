package agent

import (
	"context"
	"fmt"
	"sync/atomic"
	"time"

	"github.com/doppelha/doppel/daemon/ha"
	"github.com/doppelha/doppel/daemon/monitor"
	"github.com/doppelha/doppel/ebpf/heartbeat"
)

// detectorView is what status reads of a job's detector (daemon/monitor
// runs in the detector goroutine and is not safe for concurrent use).
type detectorView struct {
	running  atomic.Bool
	down     atomic.Bool
	deadline atomic.Int64 // CLOCK_MONOTONIC ns at which the peer is declared down
	timeout  time.Duration
	interval time.Duration
}

// timeToFail is the countdown to the peer being declared down, shown once
// at least one whole interval passed without its traffic; ok is false when
// not counting.
func (v *detectorView) timeToFail() (time.Duration, bool) {
	if !v.running.Load() || v.down.Load() {
		return 0, false
	}
	ttf := max(time.Duration(v.deadline.Load())-heartbeat.Now(), 0)
	if ttf > v.timeout-v.interval {
		return 0, false
	}
	return ttf, true
}

// detect runs the job's failure detector, daemon/monitor's policy over
// the probe's samples: down when every path has been silent for
// interval × missed (arrival times from the kernel's timestamps, compared
// with CLOCK_MONOTONIC), up again after rise consecutive packets. Its
// verdicts go to the state machine (ha.EvPeerDown, ha.EvPeerUp). It runs
// on a locked OS thread at real-time priority where permitted. A probe
// that cannot be read suspends detection (the tick reports it); detection
// resumes with a fresh monitor, so silence nobody measured never counts.
func (r *runner) detect(ctx context.Context) {
	defer close(r.detDone)
	lockRealtime(r.log, "failure detector")
	spec := r.rec.Spec.Monitor
	cfg := monitor.Config{Interval: spec.Interval, Missed: spec.Missed}
	v := &r.det
	v.timeout, v.interval = cfg.Timeout(), cfg.Interval
	defer v.running.Store(false)
	for ctx.Err() == nil {
		start := heartbeat.Now()
		m, err := monitor.New(cfg, r.pathNames, start)
		if err != nil {
			r.log.Error("failure detector", "err", err)
			return
		}
		v.down.Store(false)
		v.deadline.Store(int64(start + cfg.Timeout()))
		v.running.Store(true)
		var newest time.Duration
		var seenEpoch uint64
		sample := func(path string) (monitor.Sample, error) {
			s, err := r.subs.Liveness.Sample(r.rec.Spec.Name, path)
			if err == nil && s.PeerEpoch > r.epoch.Load() && s.PeerEpoch > seenEpoch {
				// An authenticated heartbeat names a newer epoch: a source
				// fences itself at once.
				seenEpoch = s.PeerEpoch
				r.history.add(r.epoch.Load(), "detector", fmt.Sprintf("the peer's heartbeats carry epoch %d", s.PeerEpoch))
				r.notify(ha.Event{Type: ha.EvEpochSeen, Epoch: s.PeerEpoch})
			}
			if err == nil && s.LastSeen > newest {
				newest = s.LastSeen
				v.deadline.Store(int64(newest + cfg.Timeout()))
			}
			return s, err
		}
		err = monitor.Watch(ctx, m, heartbeat.Now, sample, func(ch monitor.Change) {
			switch ch.To {
			case monitor.Down:
				v.down.Store(true)
				r.log.Warn("peer down: no traffic on any path", "silence", ch.Silence.Round(time.Millisecond), "timeout", cfg.Timeout())
				r.history.add(r.epoch.Load(), "detector", fmt.Sprintf("peer down: no authenticated traffic on any path for %v (timeout %v)", ch.Silence.Round(time.Millisecond), cfg.Timeout()))
				r.notify(ha.Event{Type: ha.EvPeerDown})
			case monitor.Up:
				v.down.Store(false)
				if ch.From == monitor.Down {
					r.history.add(r.epoch.Load(), "detector", "peer up again on path "+ch.Path)
				}
				r.notify(ha.Event{Type: ha.EvPeerUp, Path: ch.Path})
			}
		})
		v.running.Store(false)
		if err == nil {
			return // ctx done
		}
		// The tick logs and reports the probe error; retry each interval.
		select {
		case <-ctx.Done():
			return
		case <-time.After(cfg.Interval):
		}
	}
}
