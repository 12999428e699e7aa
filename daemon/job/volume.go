package job

import (
	"bufio"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Volume check errors.
var (
	ErrVolumeMissing = errors.New("volume missing")
	ErrVolumeMounted = errors.New("volume mounted")
	// ErrVolumeInUse: another job or program holds the volume.
	ErrVolumeInUse = errors.New("volume in use")
	// ErrVolumeSize: the volume is smaller than the job replicates.
	ErrVolumeSize = errors.New("volume too small")
)

// CheckVolume says whether path may be protected: it must exist (unless
// size > 0, for a file volume created on demand), be a block device or a
// regular file, and not be mounted: writes must go through the agent. An
// existing file's size is not checked (a replica may be larger than its
// source: see Spec.VolumeSize).
// mountinfo is the path of /proc/self/mountinfo (a parameter for tests).
func CheckVolume(path string, size int64, mountinfo string) error {
	st, err := os.Stat(path)
	if errors.Is(err, fs.ErrNotExist) {
		if size > 0 {
			return nil // a file volume, created sparse by the agent
		}
		return fmt.Errorf("%w: %s does not exist (give --size to create a file volume)", ErrVolumeMissing, path)
	}
	if err != nil {
		return fmt.Errorf("%w: %s: %v", ErrVolumeMissing, path, err)
	}
	mode := st.Mode()
	switch {
	case mode&fs.ModeDevice != 0 && mode&fs.ModeCharDevice == 0:
		var sys unix.Stat_t
		if err := unix.Stat(path, &sys); err != nil {
			return fmt.Errorf("stat %s: %w", path, err)
		}
		maj, min := unix.Major(uint64(sys.Rdev)), unix.Minor(uint64(sys.Rdev))
		if where, ok, err := mountedDev(mountinfo, maj, min); err != nil {
			return err
		} else if ok {
			return fmt.Errorf("%w: %s is mounted on %s: unmount it first; once protected, use the device doppel serves instead", ErrVolumeMounted, path, where)
		}
		if holders, _ := os.ReadDir(fmt.Sprintf("/sys/dev/block/%d:%d/holders", maj, min)); len(holders) > 0 {
			return fmt.Errorf("%w: %s is in use by %s (device-mapper, md or a partition holder)", ErrVolumeMounted, path, holders[0].Name())
		}
	case mode.IsRegular():
		if where, ok, err := mountedFileLoop(mountinfo, path, st); err != nil {
			return err
		} else if ok {
			return fmt.Errorf("%w: %s backs a loop device mounted on %s: unmount it first", ErrVolumeMounted, path, where)
		}
	default:
		return fmt.Errorf("%w: %s is neither a block device nor a regular file", ErrInvalid, path)
	}
	return nil
}

// mountedDev looks for a mount of device maj:min in mountinfo.
func mountedDev(mountinfo string, maj, min uint32) (string, bool, error) {
	f, err := os.Open(mountinfo)
	if err != nil {
		return "", false, fmt.Errorf("read mounts: %w", err)
	}
	defer f.Close()
	want := fmt.Sprintf("%d:%d", maj, min)
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) > 4 && fields[2] == want {
			return fields[4], true, nil
		}
	}
	return "", false, sc.Err()
}

// mountedFileLoop reports whether a loop device backed by the file is
// mounted.
func mountedFileLoop(mountinfo, path string, st fs.FileInfo) (string, bool, error) {
	loops, _ := os.ReadDir("/sys/block")
	for _, l := range loops {
		if !strings.HasPrefix(l.Name(), "loop") {
			continue
		}
		b, err := os.ReadFile("/sys/block/" + l.Name() + "/loop/backing_file")
		if err != nil {
			continue
		}
		bst, err := os.Stat(strings.TrimSpace(string(b)))
		if err != nil || !os.SameFile(bst, st) {
			continue
		}
		dev, err := os.ReadFile("/sys/block/" + l.Name() + "/dev")
		if err != nil {
			continue
		}
		var maj, min uint32
		if _, err := fmt.Sscanf(strings.TrimSpace(string(dev)), "%d:%d", &maj, &min); err != nil {
			continue
		}
		if where, ok, err := mountedDev(mountinfo, maj, min); err != nil || ok {
			return where, ok, err
		}
	}
	return "", false, nil
}

// VolumeID is what identifies a volume on its host, independently of the
// path it was opened by (symlinks, bind mounts, hard links).
type VolumeID struct {
	// Device is "file fsid=HEX ino=N" for a regular file (the file
	// system's ID survives reboots and device renumbering; the inode
	// changes when the file is replaced) or "block ID size=N" for a block
	// device, ID being the most stable name the kernel has for it: its
	// device-mapper or md UUID, its loop device's backing file, its WWID
	// or serial (a partition: its disk's, plus the partition number),
	// else its major:minor.
	Device string
	// Tag is the volume UUID written on the volume ("" when none).
	Tag string
	// Taggable: the volume carries a tag (a regular file on a file system
	// with user extended attributes).
	Taggable bool
	Block    bool
}

// VolumeTagAttr is the extended attribute that carries a file volume's
// UUID.
const VolumeTagAttr = "user.doppel.volume"

// IdentifyFD identifies the volume open at fd.
func IdentifyFD(fd int) (VolumeID, error) {
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return VolumeID{}, fmt.Errorf("identify volume: %w", err)
	}
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFREG:
		var sf unix.Statfs_t
		if err := unix.Fstatfs(fd, &sf); err != nil {
			return VolumeID{}, fmt.Errorf("identify volume: %w", err)
		}
		id := VolumeID{Device: fmt.Sprintf("file fsid=%08x%08x ino=%d", uint32(sf.Fsid.Val[0]), uint32(sf.Fsid.Val[1]), st.Ino)}
		if sf.Fsid.Val == [2]int32{} {
			// No file system ID (some virtual file systems): the device.
			id.Device = fmt.Sprintf("file dev=%d:%d ino=%d", unix.Major(st.Dev), unix.Minor(st.Dev), st.Ino)
		}
		buf := make([]byte, 128)
		n, err := unix.Fgetxattr(fd, VolumeTagAttr, buf)
		switch {
		case err == nil:
			id.Tag, id.Taggable = string(buf[:n]), true
		case errors.Is(err, unix.ENODATA):
			id.Taggable = true
		case errors.Is(err, unix.ENOTSUP), errors.Is(err, unix.EOPNOTSUPP), errors.Is(err, unix.ERANGE):
		default:
			return VolumeID{}, fmt.Errorf("identify volume: read %s: %w", VolumeTagAttr, err)
		}
		return id, nil
	case unix.S_IFBLK:
		var size uint64
		if _, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), unix.BLKGETSIZE64, uintptr(unsafe.Pointer(&size))); e != 0 {
			return VolumeID{}, fmt.Errorf("identify volume: BLKGETSIZE64: %w", e)
		}
		return VolumeID{Device: fmt.Sprintf("block %s size=%d", blockID("/sys", unix.Major(st.Rdev), unix.Minor(st.Rdev)), size), Block: true}, nil
	}
	return VolumeID{}, fmt.Errorf("identify volume: neither a regular file nor a block device")
}

// blockID is the most stable name sysfs (under root) has for block
// device maj:min.
func blockID(root string, maj, min uint32) string {
	dir := filepath.Join(root, "dev", "block", fmt.Sprintf("%d:%d", maj, min))
	read := func(rel string) string {
		b, err := os.ReadFile(filepath.Join(dir, rel))
		if err != nil {
			return ""
		}
		return strings.TrimSpace(string(b))
	}
	if v := read("dm/uuid"); v != "" {
		return "dm:" + v
	}
	if v := read("md/uuid"); v != "" {
		return "md:" + v
	}
	if v := read("loop/backing_file"); v != "" {
		var st unix.Stat_t
		if err := unix.Stat(v, &st); err == nil {
			return fmt.Sprintf("loop:%s ino=%d offset=%s", v, st.Ino, read("loop/offset"))
		}
		return "loop:" + v
	}
	for _, rel := range []string{"wwid", "device/wwid", "serial", "device/serial"} {
		if v := read(rel); v != "" {
			return "id:" + v
		}
	}
	if part := read("partition"); part != "" {
		// The disk is the parent directory of the partition in sysfs.
		if real, err := filepath.EvalSymlinks(dir); err == nil {
			b, err := os.ReadFile(filepath.Join(filepath.Dir(real), "dev"))
			var pmaj, pmin uint32
			if err == nil {
				if _, err := fmt.Sscanf(strings.TrimSpace(string(b)), "%d:%d", &pmaj, &pmin); err == nil {
					return blockID(root, pmaj, pmin) + " part" + part
				}
			}
		}
	}
	return fmt.Sprintf("dev:%d:%d", maj, min)
}

// TagFD writes uuid on the volume open at fd (a regular file's extended
// attribute); it returns false, nil when the volume cannot carry one.
func TagFD(fd int, uuid string) (bool, error) {
	err := unix.Fsetxattr(fd, VolumeTagAttr, []byte(uuid), 0)
	switch {
	case err == nil:
		return true, nil
	case errors.Is(err, unix.ENOTSUP), errors.Is(err, unix.EOPNOTSUPP), errors.Is(err, unix.EPERM):
		return false, nil
	}
	return false, fmt.Errorf("tag volume: %w", err)
}
