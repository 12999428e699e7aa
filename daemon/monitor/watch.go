package monitor

import (
	"context"
	"fmt"
	"time"
)

// Source returns a probe's current sample for a path.
type Source func(path string) (Sample, error)

// Watch drives m until ctx is done (then it returns nil) or a sample
// fails. Each round it reads now, then samples every path, then ticks, in
// that order: a process stopped anywhere in the round (SIGSTOP, a long GC
// or scheduling pause) reads samples at least as fresh as its clock, so its
// own delay is never mistaken for the peer's silence as long as the probe
// timestamps packets on arrival (the XDP map, SO_TIMESTAMPNS). Rounds run
// every Interval/4, and also exactly at the down deadline. onChange is
// called for each transition.
func Watch(ctx context.Context, m *Monitor, now func() time.Duration, sample Source, onChange func(Change)) error {
	poll := m.cfg.Interval / 4
	t := time.NewTimer(0)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
		n := now()
		for _, p := range m.paths {
			s, err := sample(p.name)
			if err != nil {
				return fmt.Errorf("monitor: sample path %s: %w", p.name, err)
			}
			if err := m.Observe(p.name, s); err != nil {
				return err
			}
		}
		if ch := m.Tick(n); ch != nil && onChange != nil {
			onChange(*ch)
		}
		wait := poll
		if ttf := m.TimeToFail(n); ttf > 0 {
			wait = min(wait, ttf)
		}
		t.Reset(wait)
	}
}
