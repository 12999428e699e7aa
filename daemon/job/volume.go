package job

import (
	"bufio"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"strings"

	"golang.org/x/sys/unix"
)

// Volume check errors.
var (
	ErrVolumeMissing = errors.New("volume missing")
	ErrVolumeMounted = errors.New("volume mounted")
)

// CheckVolume says whether path may be protected: it must exist (unless
// size > 0, for a file volume created on demand), be a block device or a
// regular file, and not be mounted: writes must go through the agent.
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
		if size > 0 && size != st.Size() {
			return fmt.Errorf("%w: %s exists with size %d, not the %d given", ErrInvalid, path, st.Size(), size)
		}
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
