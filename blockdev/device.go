package blockdev

import (
	"bufio"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"unsafe"

	"golang.org/x/sys/unix"
)

// ErrInUse is returned (wrapped, with the reason) when a block device is
// mounted, used as swap, or held by device-mapper, md or another program.
// Serving such a device would let writes bypass its user and corrupt it.
var ErrInUse = errors.New("block device in use")

// OpenDevice opens the block device at path exclusively and returns it as a
// backend. It refuses a device that is mounted (itself or one of its
// partitions), held by another device (device-mapper, md) or opened
// exclusively elsewhere, saying why. size must be 0 or the device's size.
func OpenDevice(path string, size int64) (*File, error) {
	return openDevice(path, size, os.O_RDWR)
}

func openDevice(path string, size int64, mode int) (*File, error) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return nil, fmt.Errorf("open %s: %w", path, err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFBLK {
		return nil, fmt.Errorf("open %s: not a block device", path)
	}
	if err := deviceInUse(path, unix.Major(st.Rdev), unix.Minor(st.Rdev)); err != nil {
		return nil, err
	}
	f, err := os.OpenFile(path, mode|unix.O_EXCL|unix.O_CLOEXEC, 0)
	if err != nil {
		if errors.Is(err, unix.EBUSY) {
			return nil, fmt.Errorf("open %s: %w: another program holds it exclusively (mounted, swap, LVM/md/dm or a running server)", path, ErrInUse)
		}
		return nil, fmt.Errorf("open %s: %w", path, err)
	}
	fd := int(f.Fd())
	var devSize uint64
	if err := ioctlPtr(fd, unix.BLKGETSIZE64, unsafe.Pointer(&devSize)); err != nil {
		f.Close()
		return nil, fmt.Errorf("size of %s (BLKGETSIZE64): %w", path, err)
	}
	if devSize == 0 {
		f.Close()
		return nil, fmt.Errorf("open %s: device has size 0", path)
	}
	if size != 0 && uint64(size) != devSize {
		f.Close()
		return nil, fmt.Errorf("open %s: device is %d bytes, not the %d requested", path, devSize, size)
	}
	d := newFile(f, path, int64(devSize), true)
	var ss int32
	if err := ioctlPtr(fd, unix.BLKSSZGET, unsafe.Pointer(&ss)); err == nil && ss > 0 {
		d.sector = int64(ss)
	}
	return d, nil
}

func ioctlPtr(fd int, req uint, p unsafe.Pointer) error {
	_, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), uintptr(req), uintptr(p))
	if e != 0 {
		return e
	}
	return nil
}

// deviceInUse checks mountinfo, swaps and sysfs holders for the device
// major:minor and its partitions.
func deviceInUse(path string, major, minor uint32) error {
	devs := map[string]string{fmt.Sprintf("%d:%d", major, minor): path}
	sys := fmt.Sprintf("/sys/dev/block/%d:%d", major, minor)
	if ents, err := os.ReadDir(sys); err == nil {
		for _, e := range ents {
			b, err := os.ReadFile(filepath.Join(sys, e.Name(), "dev"))
			if err != nil {
				continue
			}
			if _, err := os.Stat(filepath.Join(sys, e.Name(), "partition")); err == nil {
				devs[strings.TrimSpace(string(b))] = "/dev/" + e.Name()
			}
		}
	}
	if mf, err := os.Open("/proc/self/mountinfo"); err == nil {
		defer mf.Close()
		sc := bufio.NewScanner(mf)
		for sc.Scan() {
			fields := strings.Fields(sc.Text())
			if len(fields) < 5 {
				continue
			}
			if name, ok := devs[fields[2]]; ok {
				return fmt.Errorf("open %s: %w: %s is mounted on %s; unmount it first (serving a mounted device would corrupt its filesystem)",
					path, ErrInUse, name, unescapeMount(fields[4]))
			}
		}
	}
	for id, name := range devs {
		hs, _ := os.ReadDir(filepath.Join("/sys/dev/block", id, "holders"))
		if len(hs) > 0 {
			var names []string
			for _, h := range hs {
				names = append(names, h.Name())
			}
			return fmt.Errorf("open %s: %w: %s is held by %s (device-mapper, md or LVM)", path, ErrInUse, name, strings.Join(names, ", "))
		}
	}
	if b, err := os.ReadFile("/proc/swaps"); err == nil {
		for _, line := range strings.Split(string(b), "\n")[1:] {
			fields := strings.Fields(line)
			if len(fields) == 0 {
				continue
			}
			var st unix.Stat_t
			if unix.Stat(fields[0], &st) == nil && st.Mode&unix.S_IFMT == unix.S_IFBLK {
				if name, ok := devs[fmt.Sprintf("%d:%d", unix.Major(st.Rdev), unix.Minor(st.Rdev))]; ok {
					return fmt.Errorf("open %s: %w: %s is active swap", path, ErrInUse, name)
				}
			}
		}
	}
	return nil
}

// unescapeMount decodes the octal escapes (\040) of mountinfo paths.
func unescapeMount(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if v, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// devZero zeroes a range of a block device. The sector-aligned middle goes
// to the kernel: a zeroing discard (fallocate PUNCH_HOLE, which never
// leaves stale data) when deallocation is allowed, BLKZEROOUT otherwise or
// when the device cannot discard-and-zero; unaligned edges are written.
func (f *File) devZero(off, length int64, noHole bool) error {
	s := f.sector
	start := (off + s - 1) / s * s
	end := (off + length) / s * s
	if start >= end {
		return f.writeZeroBytes(off, length)
	}
	if start > off {
		if err := f.writeZeroBytes(off, start-off); err != nil {
			return err
		}
	}
	if end < off+length {
		if err := f.writeZeroBytes(end, off+length-end); err != nil {
			return err
		}
	}
	if !noHole {
		err := f.fallocate(unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, start, end-start)
		if err == nil {
			return nil
		}
		if !errors.Is(err, unix.EOPNOTSUPP) && !errors.Is(err, unix.ENOSYS) {
			return err
		}
	}
	r := [2]uint64{uint64(start), uint64(end - start)}
	if err := ioctlPtr(f.fd, unix.BLKZEROOUT, unsafe.Pointer(&r)); err != nil {
		return &fs.PathError{Op: "BLKZEROOUT", Path: f.path, Err: err}
	}
	return nil
}

// Discard issues BLKDISCARD on the sector-aligned part of a range of a
// block device. Unlike Trim it does not promise that the range reads as
// zeroes afterwards; it is for callers (mkfs-like full-device discards)
// that do not care.
func (f *File) Discard(off, length int64) error {
	if !f.dev {
		return f.fallocate(unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, length)
	}
	s := f.sector
	start := (off + s - 1) / s * s
	end := (off + length) / s * s
	if start >= end {
		return nil
	}
	r := [2]uint64{uint64(start), uint64(end - start)}
	if err := ioctlPtr(f.fd, unix.BLKDISCARD, unsafe.Pointer(&r)); err != nil {
		return &fs.PathError{Op: "BLKDISCARD", Path: f.path, Err: err}
	}
	return nil
}
