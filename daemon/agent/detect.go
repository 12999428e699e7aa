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
		sample := func(path string) (monitor.Sample, error) {
			s, err := r.subs.Liveness.Sample(r.rec.Spec.Name, path)
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
				r.notify(ha.Event{Type: ha.EvPeerDown})
				if r.rec.Spec.Witness != "" {
					go r.askWitness(ctx)
				}
			case monitor.Up:
				v.down.Store(false)
				if ch.From == monitor.Down {
					r.log.Info("peer up again", "path", ch.Path)
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

// askWitness asks the job's witness whether it lost the source too,
// right away and then every half second while the detector says down and
// the witness has not (a source that dies after a partition, a witness
// that comes back); each answer goes to the state machine (ha.EvWitness).
func (r *runner) askWitness(ctx context.Context) {
	q := witnessQuery{Job: heartbeatJobID(r.rec.Spec.Name)}
	for _, name := range r.pathNames {
		q.Addrs = append(q.Addrs, r.paths[name])
	}
	timeout := r.rec.Spec.Monitor.Interval * time.Duration(r.rec.Spec.Monitor.Missed)
	last := ""
	for {
		silence, heard, err := askWitness(ctx, r.rec.Spec.Witness, q)
		lost := err == nil && (!heard || silence >= timeout)
		why := ""
		switch {
		case err != nil:
			why = err.Error()
		case !lost:
			why = fmt.Sprintf("the witness heard it %v ago", silence)
		}
		if why != last || lost {
			r.log.Info("witness", "lost_source", lost, "detail", why)
			last = why
		}
		r.notify(ha.Event{Type: ha.EvWitness, WitnessLost: lost, Err: why})
		if lost {
			return
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(500 * time.Millisecond):
		}
		if !r.det.down.Load() {
			return
		}
	}
}
