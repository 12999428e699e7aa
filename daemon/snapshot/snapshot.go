// Package snapshot keeps point-in-time copies of a job's target volume:
// manual, scheduled, and automatic before the target turns inconsistent
// (a resync or a reverse), plus writable clones for a test failover.
//
// A snapshot is taken while the target applies nothing (the caller runs
// Create inside repl.Applier.Quiesce), so it is a crash-consistent image
// of the source's history up to a replication sequence number, recorded
// with it. The copy itself is made by a Mechanism chosen from the volume:
//
//   - reflink: a file volume on XFS (reflink=1) or btrfs is cloned with
//     the FICLONE ioctl into a file of the same file system (no data is
//     copied; blocks are shared until either side writes them);
//   - lvm-thin: a thin logical volume gets an LVM thin snapshot
//     (lvcreate -s), a writable clone is a thin snapshot of it;
//   - anything else is refused with what to do (Detect says why).
//
// The catalog (catalog.json in the manager's directory, written
// atomically) names every snapshot with its point, time, kind and
// mechanism location; the images live where the mechanism keeps them
// (reflink: DIR/.doppel-snapshots/JOB/ next to the volume file, so that
// they share its file system).
package snapshot

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"time"

	"github.com/doppelha/doppel/daemon/statefile"
)

// Errors.
var (
	// ErrUnsupported: the volume's storage cannot take snapshots; the
	// message says what to do.
	ErrUnsupported = errors.New("snapshots unsupported")
	// ErrExists: a snapshot of that name exists.
	ErrExists = errors.New("snapshot exists")
	// ErrNotFound: no snapshot of that name.
	ErrNotFound = errors.New("no such snapshot")
	// ErrInvalid: a bad name or catalog.
	ErrInvalid = errors.New("invalid snapshot")
)

// Kind says why a snapshot was taken.
type Kind string

// Kinds.
const (
	KindManual    Kind = "manual"
	KindScheduled Kind = "scheduled"
	// KindBeforeResync is taken automatically before the target turns
	// inconsistent (a resync, a mirror, a reverse).
	KindBeforeResync Kind = "before-resync"
	// KindBeforeRollback keeps the newer data when the volume is rolled
	// back to an older snapshot (failover to a snapshot).
	KindBeforeRollback Kind = "before-rollback"
)

func (k Kind) valid() bool {
	switch k {
	case KindManual, KindScheduled, KindBeforeResync, KindBeforeRollback:
		return true
	}
	return false
}

// Point is where in the replication history a snapshot was taken.
type Point struct {
	// Generation is the target's generation ID (daemon/generation), Stream the
	// replication stream and Seq the last sequence applied in it.
	Generation uint64 `json:"generation"`
	Stream     uint64 `json:"stream"`
	Seq        uint64 `json:"seq"`
	// AppConsistent: the source's file system was frozen at the point
	// (fsfreeze or a freeze script), not only crash-consistent.
	AppConsistent bool `json:"app_consistent,omitempty"`
}

// Snapshot is one catalog entry.
type Snapshot struct {
	Name    string    `json:"name"`
	Kind    Kind      `json:"kind"`
	Created time.Time `json:"created"`
	Point   Point     `json:"point"`
	// Mechanism made it (reflink, lvm-thin); Location is where its image
	// is (a file path, or VG/LV).
	Mechanism string `json:"mechanism"`
	Location  string `json:"location"`
	// Size is the volume's size in bytes (what the snapshot holds).
	Size int64 `json:"size"`
	// Took is how long the copy took (the apply stream was paused for
	// it).
	Took time.Duration `json:"took"`
	// Note says more (the reason of an automatic snapshot).
	Note string `json:"note,omitempty"`
}

// Usage is the space a snapshot holds.
type Usage struct {
	// Allocated is what du reports for the image (blocks allocated to
	// it, shared ones included); -1 unknown.
	Allocated int64 `json:"allocated"`
	// Exclusive is what deleting it would free: extents not shared with
	// the volume or another snapshot (FIEMAP without the SHARED flag); -1
	// when the mechanism cannot tell.
	Exclusive int64 `json:"exclusive"`
	// How says how the numbers were found.
	How string `json:"how"`
}

var nameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$`)

// ValidName checks a snapshot name: 1-64 letters, digits, '.', '_' or
// '-', starting with a letter or digit.
func ValidName(name string) error {
	if !nameRE.MatchString(name) {
		return fmt.Errorf("%w: name %q: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit", ErrInvalid, name)
	}
	return nil
}

// Catalog is the persisted list of a job's snapshots, oldest first.
type Catalog struct {
	Version   int        `json:"version"`
	Snapshots []Snapshot `json:"snapshots"`
}

const catalogVersion = 1

// CatalogFile is the catalog's name in a manager's directory.
const CatalogFile = "catalog.json"

// Validate checks what the rest of the package relies on.
func (c Catalog) Validate() error {
	if c.Version != catalogVersion {
		return fmt.Errorf("%w: catalog version %d (want %d)", ErrInvalid, c.Version, catalogVersion)
	}
	seen := map[string]bool{}
	for _, s := range c.Snapshots {
		if err := ValidName(s.Name); err != nil {
			return err
		}
		if seen[s.Name] {
			return fmt.Errorf("%w: %q twice in the catalog", ErrInvalid, s.Name)
		}
		seen[s.Name] = true
		if !s.Kind.valid() {
			return fmt.Errorf("%w: %q has kind %q", ErrInvalid, s.Name, s.Kind)
		}
		if s.Location == "" || s.Mechanism == "" || s.Size < 0 {
			return fmt.Errorf("%w: %q has no location, mechanism or size", ErrInvalid, s.Name)
		}
	}
	return nil
}

// MarshalCatalog encodes c (validated).
func MarshalCatalog(c Catalog) ([]byte, error) {
	if err := c.Validate(); err != nil {
		return nil, err
	}
	b, err := json.MarshalIndent(c, "", "  ")
	if err != nil {
		return nil, err
	}
	return append(b, '\n'), nil
}

// UnmarshalCatalog decodes and validates a catalog.
func UnmarshalCatalog(b []byte) (Catalog, error) {
	var c Catalog
	if err := json.Unmarshal(b, &c); err != nil {
		return Catalog{}, fmt.Errorf("%w: catalog: %w", ErrInvalid, err)
	}
	if err := c.Validate(); err != nil {
		return Catalog{}, err
	}
	return c, nil
}

func loadCatalog(dir string) (Catalog, error) {
	b, err := os.ReadFile(filepath.Join(dir, CatalogFile))
	if errors.Is(err, os.ErrNotExist) {
		return Catalog{Version: catalogVersion}, nil
	}
	if err != nil {
		return Catalog{}, fmt.Errorf("read snapshot catalog: %w", err)
	}
	c, err := UnmarshalCatalog(b)
	if err != nil {
		return Catalog{}, fmt.Errorf("snapshot catalog %s: %w", dir, err)
	}
	return c, nil
}

func saveCatalog(dir string, c Catalog) error {
	sort.SliceStable(c.Snapshots, func(i, j int) bool { return c.Snapshots[i].Created.Before(c.Snapshots[j].Created) })
	b, err := MarshalCatalog(c)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("snapshot catalog dir: %w", err)
	}
	return statefile.Write(filepath.Join(dir, CatalogFile), b, 0o600)
}

// find returns the index of name in c, -1 when absent.
func (c Catalog) find(name string) int {
	return slices.IndexFunc(c.Snapshots, func(s Snapshot) bool { return s.Name == name })
}
