package agent

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"time"

	"github.com/doppelha/doppel/blockdev"
	"github.com/doppelha/doppel/daemon/ha"
	"github.com/doppelha/doppel/daemon/job"
	"github.com/doppelha/doppel/daemon/replstate"
	"github.com/doppelha/doppel/daemon/statefile"
	"golang.org/x/sys/unix"
)

// ErrVolumeChanged: the volume at the job's path is not the one the job
// replicated (a disk swapped, a file re-created). A source refuses to
// serve it: its data and the target's are unrelated.
var ErrVolumeChanged = errors.New("volume changed")

// claim is a job's hold on its volume on this host, from the job's
// creation (or the agent's start) to its deletion: the volume is opened
// once and exclusively (flock on a file, O_EXCL on a block device), so
// that no other writer (another job, doppel nbd serve, another agent)
// bypasses replication, and the NBD export and the replication engine
// share that one descriptor.
type claim struct {
	path    string
	file    *blockdev.File
	key     volumeKey
	created bool // the file did not exist: the claim made it
	rebound bool // the record's volume binding was made or replaced
	binding replstate.Binding
	// note says what the claim did that the operator should know (the
	// volume was re-bound, the replication state set aside).
	note string
}

// volumeKey identifies a volume on this host whatever path reaches it.
type volumeKey struct {
	block    bool
	dev, ino uint64 // a file
	rdev     uint64 // a block device
}

func keyOf(st *unix.Stat_t) volumeKey {
	if st.Mode&unix.S_IFMT == unix.S_IFBLK {
		return volumeKey{block: true, rdev: st.Rdev}
	}
	return volumeKey{dev: st.Dev, ino: st.Ino}
}

// statKey returns the key of the volume at path (ok false when it does
// not exist).
func statKey(path string) (volumeKey, bool, error) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		if errors.Is(err, unix.ENOENT) {
			return volumeKey{}, false, nil
		}
		return volumeKey{}, false, fmt.Errorf("stat %s: %w", path, err)
	}
	return keyOf(&st), true, nil
}

func (c *claim) close() error {
	if c == nil || c.file == nil {
		return nil
	}
	err := c.file.Close()
	c.file = nil
	return err
}

// undo closes the claim and removes a file it created (a create that
// failed later).
func (c *claim) undo() {
	if c == nil {
		return
	}
	path, created := c.path, c.created
	c.close()
	if created {
		os.Remove(path)
	}
}

// holder returns the job of this agent whose claim holds the volume with
// key k, other than name.
func (a *Agent) holder(k volumeKey, name string) (string, string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	for n, r := range a.jobs {
		if n != name && r.claim != nil && r.claim.file != nil && r.claim.key == k {
			return n, r.claim.path
		}
	}
	return "", ""
}

// openClaim opens the volume of rec on this host exclusively and binds it
// to the job (bindClaim). legacy: the record was written by a doppel
// without identities (its state is adopted).
func (a *Agent) openClaim(rec *job.Record, legacy bool) (*claim, error) {
	spec := &rec.Spec
	path := spec.VolumeOn(rec.Self)
	k, exists, err := statKey(path)
	if err != nil {
		return nil, err
	}
	if exists {
		if other, opath := a.holder(k, spec.Name); other != "" {
			return nil, fmt.Errorf("%w: %s is job %s's volume (%s): a volume belongs to one job", job.ErrVolumeInUse, path, other, opath)
		}
	}
	size := spec.Size
	if exists && spec.VolumeSize > 0 {
		size = 0 // its own size, checked below
	}
	f, err := blockdev.OpenExclusive(path, size)
	if err != nil {
		if errors.Is(err, blockdev.ErrInUse) {
			return nil, fmt.Errorf("%w: %w", job.ErrVolumeInUse, err)
		}
		return nil, fmt.Errorf("open volume: %w", err)
	}
	c := &claim{path: path, file: f, created: !exists}
	if n := spec.VolumeSize; n > 0 {
		switch {
		case f.Size() < n:
			c.undo()
			return nil, fmt.Errorf("%w: %s is %d bytes, the job replicates %d (the source volume's size)", job.ErrVolumeSize, path, f.Size(), n)
		case f.Size() > n:
			if err := f.LimitSize(n); err != nil {
				c.undo()
				return nil, err
			}
		}
	}
	if err := a.bindClaim(rec, c, legacy); err != nil {
		if errors.Is(err, ErrVolumeChanged) {
			c.close()
		} else {
			c.undo()
		}
		return nil, err
	}
	return c, nil
}

// adoptClaim makes a claim of the volume f the previous agent handed over
// (opened exclusively by it, its lock held by the descriptor), served at
// size bytes, and binds it like openClaim.
func (a *Agent) adoptClaim(rec *job.Record, f *os.File, size int64, legacy bool) (*claim, error) {
	path := rec.Spec.VolumeOn(rec.Self)
	b, err := blockdev.AdoptFile(f, path, size)
	if err != nil {
		f.Close()
		return nil, err
	}
	c := &claim{path: path, file: b}
	if err := a.bindClaim(rec, c, legacy); err != nil {
		c.close()
		return nil, err
	}
	return c, nil
}

// bindClaim binds the claimed volume to the job: a record without a
// binding is bound now (the binding is stored in rec, which the caller
// persists); a volume that is not the bound one is re-bound on a target
// (its replication state is set aside and the source mirrors it) and
// refused on a source (ErrVolumeChanged).
func (a *Agent) bindClaim(rec *job.Record, c *claim, legacy bool) error {
	spec, path, f := &rec.Spec, c.path, c.file
	var st unix.Stat_t
	if err := unix.Fstat(f.Fd(), &st); err != nil {
		return fmt.Errorf("stat %s: %w", path, err)
	}
	c.key = keyOf(&st)
	id, err := job.IdentifyFD(f.Fd())
	if err != nil {
		return err
	}
	b := rec.Volume
	switch {
	case b == nil:
		if err := a.bindVolume(rec, c, id); err != nil {
			return err
		}
	case b.Device != id.Device || b.Tagged && id.Tag != b.UUID:
		why := fmt.Sprintf("%s is %s", path, id.Device)
		if id.Tag != b.UUID {
			why += fmt.Sprintf(" tagged %q", id.Tag)
		}
		why += fmt.Sprintf("; the job's volume was %s tagged %q (bound %s)", b.Device, b.UUID, b.Bound.Format(time.RFC3339))
		if rec.HA.Role == ha.RoleSource {
			return fmt.Errorf("%w: %s. Its data is not the data this job replicated: it is not served. If it is the right volume, delete the job and create it again (a checksum mirror sends only what differs)", ErrVolumeChanged, why)
		}
		if err := a.bindVolume(rec, c, id); err != nil {
			return err
		}
		c.note = fmt.Sprintf("volume changed (%s): bound again, its replication state set aside; the source mirrors it (checksums: only what differs is sent)", why)
		a.Log.Warn("target volume changed: bound again, replication state set aside", "job", spec.Name, "why", why)
	}
	c.binding = replstate.Binding{
		Owner:        replstate.Owner{Job: spec.UUID, Volume: rec.Volume.UUID, Device: rec.Volume.Device},
		AdoptUnbound: legacy,
		SetAsideTo:   job.ArchiveDir(a.Config.StateDir),
	}
	return nil
}

// bindVolume gives the volume a new UUID, writes it on the volume when it
// can carry one, and records the binding in rec.
func (a *Agent) bindVolume(rec *job.Record, c *claim, id job.VolumeID) error {
	vb := &job.VolumeBinding{UUID: job.NewUUID(), Device: id.Device, Bound: time.Now().UTC()}
	if id.Taggable {
		ok, err := job.TagFD(c.file.Fd(), vb.UUID)
		if err != nil {
			return err
		}
		vb.Tagged = ok
	}
	rec.Volume = vb
	c.rebound = true
	return nil
}

// staleState reports replication state left under the job's name with
// no job of that name (a job deleted by an older doppel, or a crash
// between delete steps).
func staleState(stateDir, name string) (string, bool) {
	dir := job.ReplStateDir(stateDir, name)
	if _, err := os.Stat(dir); errors.Is(err, fs.ErrNotExist) || err != nil {
		return dir, false
	}
	return dir, true
}

// archive moves path (a job's stale replication state) into the archive
// directory as NAME.repl.REASON-TIMESTAMP and returns where it went.
func (a *Agent) archive(name, reason, path string) (string, error) {
	root := job.ArchiveDir(a.Config.StateDir)
	if err := os.MkdirAll(root, 0o700); err != nil {
		return "", err
	}
	dst := filepath.Join(root, filepath.Base(path)+"."+reason+"-"+stamp())
	if err := os.Rename(path, dst); err != nil {
		return "", err
	}
	return dst, errors.Join(statefile.SyncDir(filepath.Dir(path)), statefile.SyncDir(root))
}

// archiveAll moves paths into a new directory NAME.REASON-TIMESTAMP of
// the archive directory and returns it.
func (a *Agent) archiveAll(name, reason string, paths []string) (string, error) {
	dst := filepath.Join(job.ArchiveDir(a.Config.StateDir), name+"."+reason+"-"+stamp())
	if err := os.MkdirAll(dst, 0o700); err != nil {
		return "", err
	}
	var errs []error
	dirs := map[string]bool{}
	for _, p := range paths {
		if err := os.Rename(p, filepath.Join(dst, filepath.Base(p))); err != nil && !errors.Is(err, fs.ErrNotExist) {
			errs = append(errs, err)
			continue
		}
		dirs[filepath.Dir(p)] = true
	}
	dirs[dst], dirs[filepath.Dir(dst)] = true, true
	for d := range dirs {
		errs = append(errs, statefile.SyncDir(d))
	}
	return dst, errors.Join(errs...)
}

func stamp() string { return time.Now().UTC().Format("20060102T150405.000") }
