package snapshot

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"time"

	"github.com/doppelha/doppel/daemon/statefile"
)

// Schedule is a job's snapshot schedule and retention.
type Schedule struct {
	// Every is the interval between scheduled snapshots (0: none).
	Every time.Duration `json:"every"`
	// Keep is how many of the newest scheduled snapshots are kept;
	// KeepDaily keeps in addition the newest of each of the last N days
	// that have one, KeepWeekly of each of the last N ISO weeks.
	Keep       int `json:"keep"`
	KeepDaily  int `json:"keep_daily,omitempty"`
	KeepWeekly int `json:"keep_weekly,omitempty"`
	// AutoKeep is how many automatic (before-resync, before-rollback)
	// snapshots of each kind are kept (default 1; negative: none are
	// taken).
	AutoKeep int `json:"auto_keep,omitempty"`
}

// ScheduleFile is the schedule's name in a manager's directory.
const ScheduleFile = "schedule.json"

// DefaultAutoKeep is Schedule.AutoKeep's default.
const DefaultAutoKeep = 1

// MinEvery is the shortest schedule interval.
const MinEvery = time.Minute

// Validate checks a schedule.
func (s Schedule) Validate() error {
	switch {
	case s.Every != 0 && s.Every < MinEvery:
		return fmt.Errorf("%w: schedule every %v: at least %v", ErrInvalid, s.Every, MinEvery)
	case s.Every < 0 || s.Keep < 0 || s.KeepDaily < 0 || s.KeepWeekly < 0:
		return fmt.Errorf("%w: negative schedule value", ErrInvalid)
	case s.Every > 0 && s.Keep+s.KeepDaily+s.KeepWeekly == 0:
		return fmt.Errorf("%w: a schedule keeps at least one snapshot (keep, keep-daily or keep-weekly)", ErrInvalid)
	case s.Keep > 10000 || s.KeepDaily > 10000 || s.KeepWeekly > 10000 || s.AutoKeep > 100:
		return fmt.Errorf("%w: retention too large", ErrInvalid)
	}
	return nil
}

// AutoKeepOr returns AutoKeep with its default.
func (s Schedule) AutoKeepOr() int {
	if s.AutoKeep == 0 {
		return DefaultAutoKeep
	}
	return max(s.AutoKeep, 0)
}

// Due reports whether a scheduled snapshot is due at now, the newest
// scheduled one having been taken at last (zero: none yet).
func (s Schedule) Due(last, now time.Time) bool {
	return s.Every > 0 && (last.IsZero() || now.Sub(last) >= s.Every)
}

func loadSchedule(dir string) (Schedule, error) {
	b, err := os.ReadFile(filepath.Join(dir, ScheduleFile))
	if errors.Is(err, os.ErrNotExist) {
		return Schedule{}, nil
	}
	if err != nil {
		return Schedule{}, fmt.Errorf("read snapshot schedule: %w", err)
	}
	var s Schedule
	if err := json.Unmarshal(b, &s); err != nil {
		return Schedule{}, fmt.Errorf("%w: snapshot schedule %s: %w", ErrInvalid, dir, err)
	}
	return s, s.Validate()
}

// Schedule returns the job's schedule on this host.
func (m *Manager) Schedule() Schedule {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.sched
}

// SetSchedule validates and persists a schedule.
func (m *Manager) SetSchedule(s Schedule) error {
	if err := s.Validate(); err != nil {
		return err
	}
	b, err := json.MarshalIndent(s, "", "  ")
	if err != nil {
		return err
	}
	if err := os.MkdirAll(m.cfg.Dir, 0o700); err != nil {
		return err
	}
	if err := statefile.Write(filepath.Join(m.cfg.Dir, ScheduleFile), append(b, '\n'), 0o600); err != nil {
		return err
	}
	m.mu.Lock()
	m.sched = s
	m.mu.Unlock()
	return nil
}

// LastScheduled is when the newest scheduled snapshot was taken (zero:
// none).
func (m *Manager) LastScheduled() time.Time {
	m.mu.Lock()
	defer m.mu.Unlock()
	var t time.Time
	for _, s := range m.cat.Snapshots {
		if s.Kind == KindScheduled && s.Created.After(t) {
			t = s.Created
		}
	}
	return t
}

// Retain returns the names of the snapshots the rules drop: scheduled
// ones kept by none of keep (newest N), keep-daily (newest of each of the
// last N days with one) and keep-weekly (newest of each of the last N
// ISO weeks with one), and automatic ones beyond the newest keepAuto of
// their kind. Manual snapshots are always kept. Pure: days and weeks are
// UTC calendar ones.
func Retain(snaps []Snapshot, s Schedule, keepAuto int) []string {
	byKind := map[Kind][]Snapshot{}
	for _, x := range snaps {
		byKind[x.Kind] = append(byKind[x.Kind], x)
	}
	for _, xs := range byKind {
		sort.SliceStable(xs, func(i, j int) bool { return xs[i].Created.After(xs[j].Created) }) // newest first
	}
	var drop []string
	for _, k := range []Kind{KindBeforeResync, KindBeforeRollback} {
		for i, x := range byKind[k] {
			if i >= keepAuto {
				drop = append(drop, x.Name)
			}
		}
	}
	sch := byKind[KindScheduled]
	keep := map[string]bool{}
	for i, x := range sch {
		if i < s.Keep {
			keep[x.Name] = true
		}
	}
	bucket := func(n int, key func(time.Time) string) {
		seen := map[string]bool{}
		for _, x := range sch {
			k := key(x.Created.UTC())
			if seen[k] {
				continue
			}
			if len(seen) >= n {
				break
			}
			seen[k] = true
			keep[x.Name] = true
		}
	}
	bucket(s.KeepDaily, func(t time.Time) string { return t.Format("2006-01-02") })
	bucket(s.KeepWeekly, func(t time.Time) string { y, w := t.ISOWeek(); return fmt.Sprintf("%d-%02d", y, w) })
	for _, x := range sch {
		if !keep[x.Name] {
			drop = append(drop, x.Name)
		}
	}
	return drop
}
