package snapshot

import (
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"
)

// Mechanism copies a volume. Take and Clone of the live volume run while
// the caller keeps writes off it.
type Mechanism interface {
	// Name is reflink or lvm-thin.
	Name() string
	// Take makes snapshot name of the volume now; it returns where it is.
	Take(name string) (location string, err error)
	// Remove deletes a snapshot made by Take.
	Remove(location string) error
	// Clone makes a writable copy named name of the snapshot at
	// location ("": of the live volume) and returns a path to open it
	// (a file or a block device).
	Clone(location, name string) (path string, err error)
	// RemoveClone deletes a clone made by Clone.
	RemoveClone(path string) error
	// Open returns a path the snapshot at location can be read from and
	// a function to call when done with it.
	Open(location string) (path string, done func() error, err error)
	// Usage is the space the snapshot at location holds.
	Usage(location string) Usage
	// Differs returns the chunks of chunk bytes in which the volume may
	// differ from the snapshot at location (a superset: every chunk
	// that does differ is in it); all is true when it cannot tell (every
	// chunk may differ).
	Differs(location string, chunk int64) (chunks []int64, all bool, err error)
	// Describe is a line for status: what the mechanism uses.
	Describe() string
}

// Detect chooses the mechanism for job's volume at path: reflink for a
// file on XFS or btrfs (checked by cloning a small probe file), lvm-thin
// for a thin logical volume; otherwise an error wrapping ErrUnsupported
// that says what to do.
func Detect(path, job string) (Mechanism, error) {
	return detect(path, job, execRunner{})
}

func detect(path, job string, run runner) (Mechanism, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return nil, fmt.Errorf("snapshots of %s: %w", path, err)
	}
	switch {
	case fi.Mode().IsRegular():
		var st unix.Statfs_t
		if err := unix.Statfs(path, &st); err != nil {
			return nil, fmt.Errorf("snapshots of %s: statfs: %w", path, err)
		}
		fsName := fsTypeName(int64(st.Type))
		switch int64(st.Type) {
		case unix.XFS_SUPER_MAGIC, unix.BTRFS_SUPER_MAGIC:
		default:
			return nil, fmt.Errorf("%w: no reflink on %s (volume %s): put the target volume on XFS or btrfs, or use an LVM thin LV", ErrUnsupported, fsName, path)
		}
		r := &reflink{vol: path, dir: filepath.Join(filepath.Dir(path), ".doppel-snapshots", job), fs: fsName}
		if err := r.probe(); err != nil {
			hint := ""
			if fsName == "xfs" {
				hint = " (an XFS made without reflink: mkfs.xfs -m reflink=1, the default since xfsprogs 5.1)"
			}
			return nil, fmt.Errorf("%w: %s cannot clone files%s: %w; put the target volume on XFS with reflink or btrfs, or use an LVM thin LV", ErrUnsupported, fsName, hint, err)
		}
		return r, nil
	case fi.Mode().Type() == fs.ModeDevice:
		return detectLVM(path, job, run)
	}
	return nil, fmt.Errorf("%w: %s is neither a file nor a block device", ErrUnsupported, path)
}

// fsTypeName names a statfs magic for messages.
func fsTypeName(magic int64) string {
	switch magic {
	case unix.XFS_SUPER_MAGIC:
		return "xfs"
	case unix.BTRFS_SUPER_MAGIC:
		return "btrfs"
	case unix.EXT4_SUPER_MAGIC:
		return "ext4"
	case unix.TMPFS_MAGIC:
		return "tmpfs"
	case unix.OVERLAYFS_SUPER_MAGIC:
		return "overlayfs"
	case unix.NFS_SUPER_MAGIC:
		return "nfs"
	case 0x2fc12fc1:
		return "zfs"
	case 0x65735546:
		return "fuse"
	}
	return fmt.Sprintf("this file system (magic %#x)", magic)
}
