package snapshot

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"time"
)

// Config configures a Manager.
type Config struct {
	// Dir holds the catalog and the schedule (the job's state:
	// STATE/jobs/NAME.snapshots).
	Dir string
	// Volume is the job's volume on this host, Job its name.
	Volume string
	Job    string
	Log    *slog.Logger
	// Now is the clock (nil: time.Now).
	Now func() time.Time
	// mech replaces detection (tests).
	mech Mechanism
}

// Manager is one job's snapshots on one host: the catalog and the
// mechanism that makes them. Its methods are safe for concurrent use.
type Manager struct {
	cfg     Config
	log     *slog.Logger
	mech    Mechanism
	mechErr error

	mu    sync.Mutex
	cat   Catalog
	sched Schedule
}

// Open loads the job's catalog and schedule and detects the mechanism.
// A volume that cannot take snapshots is not an error here: every
// snapshot operation is then refused with the reason (Mechanism).
func Open(cfg Config) (*Manager, error) {
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	cat, err := loadCatalog(cfg.Dir)
	if err != nil {
		return nil, err
	}
	sched, err := loadSchedule(cfg.Dir)
	if err != nil {
		return nil, err
	}
	m := &Manager{cfg: cfg, log: cfg.Log, cat: cat, sched: sched, mech: cfg.mech}
	if m.mech == nil {
		m.mech, m.mechErr = Detect(cfg.Volume, cfg.Job)
	}
	return m, nil
}

// Mechanism returns the mechanism in use, or why there is none.
func (m *Manager) Mechanism() (Mechanism, error) {
	if m.mechErr != nil {
		return nil, m.mechErr
	}
	return m.mech, nil
}

// Create takes snapshot name of the volume at point p. The caller keeps
// writes off the volume meanwhile (repl.Applier.Quiesce).
func (m *Manager) Create(name string, kind Kind, p Point, note string) (Snapshot, error) {
	if err := ValidName(name); err != nil {
		return Snapshot{}, err
	}
	if !kind.valid() {
		return Snapshot{}, fmt.Errorf("%w: kind %q", ErrInvalid, kind)
	}
	mech, err := m.Mechanism()
	if err != nil {
		return Snapshot{}, err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.cat.find(name) >= 0 {
		return Snapshot{}, fmt.Errorf("%w: %s", ErrExists, name)
	}
	size := volumeSize(m.cfg.Volume)
	start := time.Now()
	loc, err := mech.Take(name)
	if err != nil {
		return Snapshot{}, fmt.Errorf("snapshot %s: %w", name, err)
	}
	s := Snapshot{Name: name, Kind: kind, Created: m.cfg.Now().UTC(), Point: p, Mechanism: mech.Name(), Location: loc,
		Size: max(size, 0), Took: time.Since(start), Note: note}
	cat := m.cat
	cat.Snapshots = append(append([]Snapshot(nil), cat.Snapshots...), s)
	if err := saveCatalog(m.cfg.Dir, cat); err != nil {
		mech.Remove(loc)
		return Snapshot{}, fmt.Errorf("snapshot %s: %w", name, err)
	}
	m.cat = cat
	m.log.Info("snapshot taken", "snapshot", name, "kind", kind, "seq", p.Seq, "mechanism", mech.Name(), "location", loc, "took", s.Took)
	return s, nil
}

// volumeSize is the size of the file or block device at path (stat says
// 0 for a block device: its end is found by seeking), -1 when unknown.
func volumeSize(path string) int64 {
	f, err := os.Open(path)
	if err != nil {
		return -1
	}
	defer f.Close()
	n, err := f.Seek(0, io.SeekEnd)
	if err != nil {
		return -1
	}
	return n
}

// Delete removes snapshot name (image, then catalog entry).
func (m *Manager) Delete(name string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.deleteLocked(name)
}

func (m *Manager) deleteLocked(name string) error {
	i := m.cat.find(name)
	if i < 0 {
		return fmt.Errorf("%w: %s", ErrNotFound, name)
	}
	mech, err := m.Mechanism()
	if err != nil {
		return err
	}
	s := m.cat.Snapshots[i]
	if err := mech.Remove(s.Location); err != nil {
		return fmt.Errorf("delete snapshot %s: %w", name, err)
	}
	cat := m.cat
	cat.Snapshots = append(append([]Snapshot(nil), cat.Snapshots[:i]...), cat.Snapshots[i+1:]...)
	if err := saveCatalog(m.cfg.Dir, cat); err != nil {
		return fmt.Errorf("delete snapshot %s: %w", name, err)
	}
	m.cat = cat
	m.log.Info("snapshot deleted", "snapshot", name)
	return nil
}

// List returns the snapshots, oldest first.
func (m *Manager) List() []Snapshot {
	m.mu.Lock()
	defer m.mu.Unlock()
	return append([]Snapshot(nil), m.cat.Snapshots...)
}

// Get returns snapshot name.
func (m *Manager) Get(name string) (Snapshot, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	i := m.cat.find(name)
	if i < 0 {
		return Snapshot{}, fmt.Errorf("%w: %s", ErrNotFound, name)
	}
	return m.cat.Snapshots[i], nil
}

// Usage returns the space snapshot s holds.
func (m *Manager) Usage(s Snapshot) Usage {
	mech, err := m.Mechanism()
	if err != nil {
		return Usage{Allocated: -1, Exclusive: -1, How: err.Error()}
	}
	return mech.Usage(s.Location)
}

// Clone makes a writable copy of snapshot name ("": of the live volume,
// with writes held off it by the caller) for a test failover.
func (m *Manager) Clone(name, cloneName string) (string, error) {
	mech, err := m.Mechanism()
	if err != nil {
		return "", err
	}
	loc := ""
	if name != "" {
		s, err := m.Get(name)
		if err != nil {
			return "", err
		}
		loc = s.Location
	}
	return mech.Clone(loc, cloneName)
}

// RemoveClone deletes a clone made by Clone.
func (m *Manager) RemoveClone(path string) error {
	mech, err := m.Mechanism()
	if err != nil {
		return err
	}
	return mech.RemoveClone(path)
}

// RemoveAll deletes every snapshot and the catalog (the job is deleted).
func (m *Manager) RemoveAll() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	var errs []error
	for _, s := range append([]Snapshot(nil), m.cat.Snapshots...) {
		if err := m.deleteLocked(s.Name); err != nil {
			errs = append(errs, err)
		}
	}
	if len(errs) > 0 {
		return errors.Join(errs...)
	}
	if r, ok := m.mech.(*reflink); ok && m.mechErr == nil {
		os.RemoveAll(filepath.Join(r.dir, "clones"))
		os.Remove(r.dir)
		os.Remove(filepath.Dir(r.dir)) // .doppel-snapshots, when empty
	}
	return os.RemoveAll(m.cfg.Dir)
}

// Prune deletes what the retention rules no longer keep: scheduled
// snapshots beyond the schedule's keep rules, and automatic ones beyond
// the newest keepAuto of each automatic kind. Manual snapshots are never
// pruned. It returns the names deleted.
func (m *Manager) Prune(keepAuto int) ([]string, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	drop := Retain(m.cat.Snapshots, m.sched, keepAuto)
	var errs []error
	var done []string
	for _, n := range drop {
		if err := m.deleteLocked(n); err != nil {
			errs = append(errs, err)
			continue
		}
		done = append(done, n)
	}
	return done, errors.Join(errs...)
}

// Rollback makes the volume, through w (the job's backend, which nothing
// else writes meanwhile), hold snapshot name's data again. It compares
// only the chunks the mechanism says may differ and finds those that do:
// exactly the chunks the volume changed in since the snapshot. mark
// (when set) is called with them before the first write, so that the
// caller records them durably (a crash in the middle leaves them known);
// then they are written, the volume synced, and their indexes (chunk
// bytes each) returned. Running it again after an interruption finishes
// the job: the chunks already written compare equal.
func (m *Manager) Rollback(name string, w io.WriterAt, r io.ReaderAt, size, chunk int64, sync func() error, mark func(chunks []int64) error) ([]int64, error) {
	mech, err := m.Mechanism()
	if err != nil {
		return nil, err
	}
	s, err := m.Get(name)
	if err != nil {
		return nil, err
	}
	cands, all, err := mech.Differs(s.Location, chunk)
	if err != nil {
		return nil, fmt.Errorf("rollback to %s: %w", name, err)
	}
	path, done, err := mech.Open(s.Location)
	if err != nil {
		return nil, fmt.Errorf("rollback to %s: %w", name, err)
	}
	defer done()
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("rollback to %s: %w", name, err)
	}
	defer f.Close()
	if all {
		cands = cands[:0]
		for c := int64(0); c*chunk < size; c++ {
			cands = append(cands, c)
		}
	}
	a, b := make([]byte, chunk), make([]byte, chunk)
	read := func(c int64) (int64, error) {
		off := c * chunk
		n := min(chunk, size-off)
		if _, err := f.ReadAt(a[:n], off); err != nil && !errors.Is(err, io.EOF) {
			return 0, fmt.Errorf("rollback to %s: read snapshot: %w", name, err)
		}
		if _, err := r.ReadAt(b[:n], off); err != nil && !errors.Is(err, io.EOF) {
			return 0, fmt.Errorf("rollback to %s: read volume: %w", name, err)
		}
		return n, nil
	}
	var changed []int64
	for _, c := range cands {
		if c*chunk >= size {
			break
		}
		n, err := read(c)
		if err != nil {
			return nil, err
		}
		if !bytes.Equal(a[:n], b[:n]) {
			changed = append(changed, c)
		}
	}
	if mark != nil && len(changed) > 0 {
		if err := mark(changed); err != nil {
			return nil, fmt.Errorf("rollback to %s: mark the changed chunks: %w", name, err)
		}
	}
	for _, c := range changed {
		n, err := read(c)
		if err != nil {
			return changed, err
		}
		if _, err := w.WriteAt(a[:n], c*chunk); err != nil {
			return changed, fmt.Errorf("rollback to %s: write volume: %w", name, err)
		}
	}
	if err := sync(); err != nil {
		return changed, fmt.Errorf("rollback to %s: sync: %w", name, err)
	}
	m.log.Info("volume rolled back to a snapshot", "snapshot", name, "seq", s.Point.Seq, "candidate_chunks", len(cands), "changed_chunks", len(changed))
	return changed, nil
}
