package blockdev

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"runtime"
	"sync"
	"unsafe"

	"golang.org/x/sys/unix"
)

// File is a Backend over a regular file or a block device, with pread and
// pwrite straight on the descriptor. On a regular file Trim punches a hole
// and WriteZeroes uses FALLOC_FL_ZERO_RANGE (or a hole when the range may be
// deallocated); on a block device both use the kernel's zeroing discard and
// BLKZEROOUT. Sync is fdatasync.
type File struct {
	f      *os.File
	fd     int
	size   int64
	dev    bool // block device
	sector int64
	path   string
	wmu    sync.Mutex // serialises writes to a regular file (see WriteAt)
}

var (
	_ Backend = (*File)(nil)
	_ Trimmer = (*File)(nil)
	_ Zeroer  = (*File)(nil)
)

// OpenFile opens the regular file at path for reading and writing. When it
// does not exist it is created sparse with size bytes (size must then be
// positive). When it exists, size 0 means "use its size"; a different
// positive size is refused, except that an empty file is extended.
func OpenFile(path string, size int64) (*File, error) {
	if size < 0 {
		return nil, fmt.Errorf("open %s: negative size %d", path, size)
	}
	fi, err := os.Stat(path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		if size == 0 {
			return nil, fmt.Errorf("open %s: file does not exist and no size was given to create it", path)
		}
		f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
		if err != nil {
			return nil, fmt.Errorf("create %s: %w", path, err)
		}
		if err := f.Truncate(size); err != nil {
			f.Close()
			os.Remove(path)
			return nil, fmt.Errorf("size %s to %d bytes: %w", path, size, err)
		}
		return newFile(f, path, size, false), nil
	case err != nil:
		return nil, fmt.Errorf("open %s: %w", path, err)
	case !fi.Mode().IsRegular():
		return nil, fmt.Errorf("open %s: not a regular file (%s)", path, fi.Mode().Type())
	}
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", path, err)
	}
	cur := fi.Size()
	switch {
	case size == 0 && cur == 0:
		f.Close()
		return nil, fmt.Errorf("open %s: file is empty; give a size to extend it", path)
	case size == 0:
		size = cur
	case cur == 0:
		if err := f.Truncate(size); err != nil {
			f.Close()
			return nil, fmt.Errorf("size %s to %d bytes: %w", path, size, err)
		}
	case size != cur:
		f.Close()
		return nil, fmt.Errorf("open %s: file is %d bytes, not the %d requested (resize it yourself if that is intended)", path, cur, size)
	}
	return newFile(f, path, size, false), nil
}

func newFile(f *os.File, path string, size int64, dev bool) *File {
	return &File{f: f, fd: int(f.Fd()), size: size, dev: dev, sector: 512, path: path}
}

// OpenReadOnly opens an existing regular file or block device for reading
// only (for a read-only export of a file the server may not write). Its
// size is the file's or device's; a block device is checked and claimed as
// by OpenDevice.
func OpenReadOnly(path string) (*File, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", path, err)
	}
	if fi.Mode().Type() == fs.ModeDevice {
		return openDevice(path, 0, os.O_RDONLY)
	}
	if !fi.Mode().IsRegular() {
		return nil, fmt.Errorf("open %s: not a regular file or block device (%s)", path, fi.Mode().Type())
	}
	if fi.Size() == 0 {
		return nil, fmt.Errorf("open %s: file is empty", path)
	}
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", path, err)
	}
	return newFile(f, path, fi.Size(), false), nil
}

// Open opens a regular file (see OpenFile) or a block device, chosen by
// stat. A block device is opened exclusively (O_EXCL) and refused when it,
// one of its partitions or a holder (device-mapper, md) is in use, with the
// reason; size must be 0 or the device's size.
func Open(path string, size int64) (Backend, error) {
	fi, err := os.Stat(path)
	if err == nil && fi.Mode().Type() == fs.ModeDevice {
		return OpenDevice(path, size)
	}
	return OpenFile(path, size)
}

// OpenExclusive opens a regular file or block device like Open, and makes
// this descriptor its only writer on the host: a block device is opened
// O_EXCL (as by Open), a regular file is locked with flock(LOCK_EX |
// LOCK_NB) whatever path it is reached by (symlink, bind mount, hard
// link). The lock lives as long as the descriptor (and any duplicate of
// it, such as one handed to another process). A file another program
// holds is refused with ErrInUse.
func OpenExclusive(path string, size int64) (*File, error) {
	fi, err := os.Stat(path)
	if err == nil && fi.Mode().Type() == fs.ModeDevice {
		return OpenDevice(path, size)
	}
	f, err := OpenFile(path, size)
	if err != nil {
		return nil, err
	}
	if err := lockFile(f.fd, path); err != nil {
		f.Close()
		return nil, err
	}
	return f, nil
}

// AdoptFile makes a backend of f, a volume another process opened with
// OpenExclusive and handed over (its lock or exclusive claim goes with
// the descriptor): path is where it was opened from, size its size as it
// was served (0: the file's or device's own).
func AdoptFile(f *os.File, path string, size int64) (*File, error) {
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		return nil, fmt.Errorf("adopt %s: %w", path, err)
	}
	var d *File
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFREG:
		d = newFile(f, path, st.Size, false)
	case unix.S_IFBLK:
		var n uint64
		if err := ioctlPtr(int(f.Fd()), unix.BLKGETSIZE64, unsafe.Pointer(&n)); err != nil {
			return nil, fmt.Errorf("adopt %s: BLKGETSIZE64: %w", path, err)
		}
		d = newFile(f, path, int64(n), true)
		var ss int32
		if err := ioctlPtr(d.fd, unix.BLKSSZGET, unsafe.Pointer(&ss)); err == nil && ss > 0 {
			d.sector = int64(ss)
		}
	default:
		return nil, fmt.Errorf("adopt %s: neither a regular file nor a block device", path)
	}
	if size > 0 && size != d.size {
		if err := d.LimitSize(size); err != nil {
			return nil, err
		}
	}
	return d, nil
}

// Dup returns a duplicate of the backend's descriptor (to hand the volume
// to another process: an exclusive lock goes with it).
func (f *File) Dup() (*os.File, error) {
	fd, err := unix.FcntlInt(uintptr(f.fd), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("dup %s: %w", f.path, err)
	}
	return os.NewFile(uintptr(fd), f.path), nil
}

// lockFile takes an exclusive flock on fd, without waiting.
func lockFile(fd int, path string) error {
	for {
		err := unix.Flock(fd, unix.LOCK_EX|unix.LOCK_NB)
		switch {
		case err == nil:
			return nil
		case errors.Is(err, unix.EINTR):
			continue
		case errors.Is(err, unix.EWOULDBLOCK):
			return fmt.Errorf("open %s: %w: another program holds it (a doppel job, doppel nbd serve or repl, another agent): writes would bypass it", path, ErrInUse)
		}
		return fmt.Errorf("lock %s: %w", path, err)
	}
}

// Fd is the descriptor the backend reads and writes through (to identify
// the volume or hand it to another process; do not close it).
func (f *File) Fd() int { return f.fd }

// LimitSize serves only the first n bytes of the file or device (a
// replica larger than its source): n must be positive, a multiple of 512
// and at most the size it was opened with.
func (f *File) LimitSize(n int64) error {
	if n <= 0 || n%512 != 0 || n > f.size {
		return fmt.Errorf("%s: cannot serve %d of its %d bytes", f.path, n, f.size)
	}
	f.size = n
	return nil
}

// Path is the file or device path the backend was opened from.
func (f *File) Path() string { return f.path }

// Size is the export size in bytes.
func (f *File) Size() int64 { return f.size }

// ReadAt reads len(p) bytes at off with pread. Bytes past the end of a
// regular file that is shorter than Size (truncated behind our back) read
// as zeroes.
func (f *File) ReadAt(p []byte, off int64) (int, error) {
	n := 0
	for n < len(p) {
		m, err := unix.Pread(f.fd, p[n:], off+int64(n))
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			runtime.KeepAlive(f.f)
			return n, &fs.PathError{Op: "pread", Path: f.path, Err: err}
		}
		if m == 0 {
			clear(p[n:])
			n = len(p)
			break
		}
		n += m
	}
	runtime.KeepAlive(f.f)
	return n, nil
}

// maxPwrite caps one pwrite(2). The page cache allocates a folio as large
// as the write (ext4 large folios): on a VM whose balloon reports free
// memory back to the host, a 1 MiB write into memory the host took back
// costs ~10x a 256 KiB one (dd of 1 GiB into a fresh file, memory idle for
// 8 s: 2.8-3.0 s in 1 MiB writes, 1.3 s in 512 KiB, 0.23-0.37 s in
// 256 KiB; 0.25-0.47 s each when the memory was just freed). That made the
// replication mirror's speed swing 3x. Elsewhere it costs three more
// syscalls per MiB.
const maxPwrite = 256 << 10

// pwrite is unix.Pwrite; tests replace it to see what reaches the kernel.
var pwrite = unix.Pwrite

// WriteAt writes p at off with pwrite, at most maxPwrite bytes per call.
//
// Writes to a regular file are serialised here: the kernel serialises
// buffered writes to one file anyway (ext4 and xfs take the inode's lock
// exclusively for the whole write, dirty throttling included), and letting
// several threads wait for it there costs CPU (the lock's optimistic
// spinning, then a sleep and wake-up per write) and threads, without adding
// throughput. Waiting on a Go mutex parks only the goroutine. Block devices
// take no such lock, so their writes stay concurrent.
func (f *File) WriteAt(p []byte, off int64) (int, error) {
	if !f.dev {
		f.wmu.Lock()
		defer f.wmu.Unlock()
	}
	n := 0
	for n < len(p) {
		m, err := pwrite(f.fd, p[n:min(len(p), n+maxPwrite)], off+int64(n))
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			runtime.KeepAlive(f.f)
			return n, &fs.PathError{Op: "pwrite", Path: f.path, Err: err}
		}
		if m == 0 {
			runtime.KeepAlive(f.f)
			return n, &fs.PathError{Op: "pwrite", Path: f.path, Err: unix.EIO}
		}
		n += m
	}
	runtime.KeepAlive(f.f)
	return n, nil
}

// Sync makes completed writes durable (fdatasync).
func (f *File) Sync() error {
	for {
		err := unix.Fdatasync(f.fd)
		if err == unix.EINTR {
			continue
		}
		runtime.KeepAlive(f.f)
		if err != nil {
			return &fs.PathError{Op: "fdatasync", Path: f.path, Err: err}
		}
		return nil
	}
}

// Trim discards the range; it reads as zeroes afterwards.
func (f *File) Trim(off, length int64) error {
	return f.zero(off, length, false)
}

// WriteZeroes zeroes the range; with noHole false it may be deallocated.
func (f *File) WriteZeroes(off, length int64, noHole bool) error {
	return f.zero(off, length, noHole)
}

func (f *File) zero(off, length int64, noHole bool) error {
	if length <= 0 {
		return nil
	}
	if off < 0 || off+length > f.size || off+length < off {
		return &fs.PathError{Op: "zero", Path: f.path, Err: unix.EINVAL}
	}
	if f.dev {
		return f.devZero(off, length, noHole)
	}
	mode := uint32(unix.FALLOC_FL_PUNCH_HOLE | unix.FALLOC_FL_KEEP_SIZE)
	if noHole {
		mode = unix.FALLOC_FL_ZERO_RANGE | unix.FALLOC_FL_KEEP_SIZE
	}
	err := f.fallocate(mode, off, length)
	if err == nil {
		return nil
	}
	if !errors.Is(err, unix.EOPNOTSUPP) && !errors.Is(err, unix.ENOSYS) {
		return err
	}
	if !noHole {
		// No hole punching here: zero the range in place instead.
		if err := f.fallocate(unix.FALLOC_FL_ZERO_RANGE|unix.FALLOC_FL_KEEP_SIZE, off, length); err == nil {
			return nil
		}
	}
	return f.writeZeroBytes(off, length)
}

func (f *File) fallocate(mode uint32, off, length int64) error {
	for {
		err := unix.Fallocate(f.fd, mode, off, length)
		if err == unix.EINTR {
			continue
		}
		runtime.KeepAlive(f.f)
		if err != nil {
			return &fs.PathError{Op: "fallocate", Path: f.path, Err: err}
		}
		return nil
	}
}

func (f *File) writeZeroBytes(off, length int64) error {
	for length > 0 {
		n := min(length, int64(len(zeroBuf)))
		if _, err := f.WriteAt(zeroBuf[:n], off); err != nil {
			return err
		}
		off += n
		length -= n
	}
	return nil
}

// Close closes the descriptor (without syncing: call Sync first).
func (f *File) Close() error {
	if err := f.f.Close(); err != nil {
		return fmt.Errorf("close %s: %w", f.path, err)
	}
	return nil
}
