package job

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/doppelha/doppel/daemon/ha"
	"github.com/doppelha/doppel/daemon/statefile"
)

// Record is what the store keeps for a job on one agent.
type Record struct {
	Spec Spec `json:"spec"`
	// Self is this agent's server name in the job (Spec.Source.Name or
	// Spec.Target.Name).
	Self    string       `json:"self"`
	HA      ha.HardState `json:"ha"`
	Created time.Time    `json:"created"`
	// Volume binds the job to its volume on this host (nil: not bound
	// yet, a record written by an older doppel).
	Volume *VolumeBinding `json:"volume,omitempty"`
	// CreatedVolume: the job's create made the volume file (a rolled
	// back create removes it).
	CreatedVolume bool `json:"created_volume,omitempty"`
}

// VolumeBinding is the volume a job was bound to on this host: like
// DRBD's metadata, it says whose data the volume holds. The replication
// state carries the same UUID and device identity, so that state of
// another volume (a disk swapped, a file re-created at the same path) is
// detected and never used.
type VolumeBinding struct {
	// UUID is given to the volume when the job binds it; for a file it is
	// also written on the file (extended attribute user.doppel.volume).
	UUID string `json:"uuid"`
	// Device identifies the volume (VolumeID.Device).
	Device string `json:"device"`
	// Tagged: the UUID is on the volume itself (the file system keeps
	// extended attributes).
	Tagged bool      `json:"tagged,omitempty"`
	Bound  time.Time `json:"bound"`
}

// Store keeps one record per job under DIR/jobs. Writes of one job are
// serialized; writes of different jobs are not (each is an fsync'd
// atomic replace of its own file: with one lock for the store, 32 jobs
// failing over at once persisted their state one fsync after the other).
type Store struct {
	dir string

	mu    sync.Mutex
	locks map[string]*nameLock // by job name, while in use

	// writeFile is statefile.Write (tests pause it).
	writeFile func(path string, data []byte, perm os.FileMode) error
}

// nameLock serializes the writers of one job's record.
type nameLock struct {
	mu   sync.Mutex
	refs int // holders and waiters; the entry goes when it drops to 0
}

// lock takes job name's lock and returns its release.
func (s *Store) lock(name string) (unlock func()) {
	s.mu.Lock()
	l := s.locks[name]
	if l == nil {
		l = &nameLock{}
		s.locks[name] = l
	}
	l.refs++
	s.mu.Unlock()
	l.mu.Lock()
	return func() {
		l.mu.Unlock()
		s.mu.Lock()
		if l.refs--; l.refs == 0 {
			delete(s.locks, name)
		}
		s.mu.Unlock()
	}
}

// OpenStore opens (creating when missing) the job store under stateDir.
func OpenStore(stateDir string) (*Store, error) {
	dir := filepath.Join(stateDir, "jobs")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("open job store: %w", err)
	}
	return &Store{dir: dir, locks: map[string]*nameLock{}, writeFile: statefile.Write}, nil
}

func (s *Store) path(name string) string { return filepath.Join(s.dir, name+".json") }

// RecordPath is the file that holds a job's record.
func (s *Store) RecordPath(name string) string { return s.path(name) }

// ReplStateDir is where a job's replication state (generations, bitmap,
// activity log, queue) lives under the agent's state directory.
func ReplStateDir(stateDir, name string) string {
	return filepath.Join(stateDir, "jobs", name+".repl")
}

// ArchiveDir is where the agent keeps what it set aside or archived:
// replication state of another job or volume, and the state of jobs
// deleted with --keep-state.
func ArchiveDir(stateDir string) string { return filepath.Join(stateDir, "archive") }

// Create stores a new record; ErrExists if the job is already there.
func (s *Store) Create(r Record) error {
	if err := ValidName("job", r.Spec.Name); err != nil {
		return err
	}
	defer s.lock(r.Spec.Name)()
	if _, err := os.Stat(s.path(r.Spec.Name)); err == nil {
		return fmt.Errorf("%w: %s", ErrExists, r.Spec.Name)
	}
	return s.write(r)
}

// Put replaces a job's record.
func (s *Store) Put(r Record) error {
	if err := ValidName("job", r.Spec.Name); err != nil {
		return err
	}
	defer s.lock(r.Spec.Name)()
	return s.write(r)
}

func (s *Store) write(r Record) error {
	data, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return fmt.Errorf("encode job %s: %w", r.Spec.Name, err)
	}
	if err := s.writeFile(s.path(r.Spec.Name), append(data, '\n'), 0o600); err != nil {
		return fmt.Errorf("store job %s: %w", r.Spec.Name, err)
	}
	return nil
}

// Get reads a job's record; ErrNotFound when there is none.
func (s *Store) Get(name string) (Record, error) {
	if err := ValidName("job", name); err != nil {
		return Record{}, fmt.Errorf("%w: %s", ErrNotFound, name)
	}
	data, err := os.ReadFile(s.path(name))
	if errors.Is(err, fs.ErrNotExist) {
		return Record{}, fmt.Errorf("%w: %s", ErrNotFound, name)
	}
	if err != nil {
		return Record{}, fmt.Errorf("read job %s: %w", name, err)
	}
	var r Record
	if err := json.Unmarshal(data, &r); err != nil {
		return Record{}, fmt.Errorf("decode job %s: %w", name, err)
	}
	return r, nil
}

// List returns every record, sorted by name.
func (s *Store) List() ([]Record, error) {
	ents, err := os.ReadDir(s.dir)
	if err != nil {
		return nil, fmt.Errorf("list jobs: %w", err)
	}
	var out []Record
	for _, e := range ents {
		name, ok := strings.CutSuffix(e.Name(), ".json")
		if !ok || e.IsDir() || strings.HasPrefix(name, ".") {
			continue
		}
		r, err := s.Get(name)
		if err != nil {
			return nil, err
		}
		out = append(out, r)
	}
	slices.SortFunc(out, func(a, b Record) int { return strings.Compare(a.Spec.Name, b.Spec.Name) })
	return out, nil
}

// Delete removes a job's record; ErrNotFound when there is none.
func (s *Store) Delete(name string) error {
	if err := ValidName("job", name); err != nil {
		return fmt.Errorf("%w: %s", ErrNotFound, name)
	}
	defer s.lock(name)()
	err := os.Remove(s.path(name))
	if errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("%w: %s", ErrNotFound, name)
	}
	if err != nil {
		return fmt.Errorf("delete job %s: %w", name, err)
	}
	return statefile.SyncDir(s.dir)
}
