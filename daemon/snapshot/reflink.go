package snapshot

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"unsafe"

	"github.com/doppelha/doppel/daemon/statefile"
	"golang.org/x/sys/unix"
)

// reflink snapshots a file volume by cloning it (FICLONE) into
// DIR/.doppel-snapshots/JOB/NAME.img; clones for a test failover go to
// .../clones/NAME.img. Space is read with FIEMAP: extents without the
// SHARED flag are the image's own.
type reflink struct {
	vol string
	dir string
	fs  string
}

func (r *reflink) Name() string { return "reflink" }

func (r *reflink) Describe() string {
	return fmt.Sprintf("reflink clones (FICLONE) on %s, in %s", r.fs, r.dir)
}

// probe clones a small file in the snapshot directory: the file system
// supports reflinks (and the directory is writable) or it says why not.
func (r *reflink) probe() error {
	if err := os.MkdirAll(r.dir, 0o700); err != nil {
		return err
	}
	a, err := os.CreateTemp(r.dir, ".probe-*")
	if err != nil {
		return err
	}
	defer os.Remove(a.Name())
	defer a.Close()
	if _, err := a.Write(make([]byte, 4096)); err != nil {
		return err
	}
	b, err := os.CreateTemp(r.dir, ".probe-*")
	if err != nil {
		return err
	}
	defer os.Remove(b.Name())
	defer b.Close()
	if err := unix.IoctlFileClone(int(b.Fd()), int(a.Fd())); err != nil {
		return fmt.Errorf("FICLONE: %w", err)
	}
	return nil
}

// clone copies src to a new file dst by FICLONE, durably.
func clone(src, dst string) (err error) {
	if err := os.MkdirAll(filepath.Dir(dst), 0o700); err != nil {
		return err
	}
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		if errors.Is(err, os.ErrExist) {
			return fmt.Errorf("%w: %s", ErrExists, dst)
		}
		return err
	}
	defer func() {
		if cerr := out.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			os.Remove(dst)
		}
	}()
	if err := unix.IoctlFileClone(int(out.Fd()), int(in.Fd())); err != nil {
		return fmt.Errorf("clone %s to %s (FICLONE): %w", src, dst, err)
	}
	if err := out.Sync(); err != nil {
		return err
	}
	return statefile.SyncDir(filepath.Dir(dst))
}

func (r *reflink) Take(name string) (string, error) {
	dst := filepath.Join(r.dir, name+".img")
	// The catalog has no snapshot of this name (Manager.Create checked,
	// under its lock): an image there is the leftover of a Create
	// interrupted between the clone and the catalog (an agent killed in
	// the middle), not a snapshot anyone can use. It is replaced.
	if err := os.Remove(dst); err != nil && !errors.Is(err, os.ErrNotExist) {
		return "", fmt.Errorf("remove the leftover image %s: %w", dst, err)
	}
	if err := clone(r.vol, dst); err != nil {
		return "", err
	}
	return dst, nil
}

func (r *reflink) Remove(location string) error {
	if err := r.mine(location); err != nil {
		return err
	}
	if err := os.Remove(location); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return statefile.SyncDir(filepath.Dir(location))
}

// mine refuses to remove a file outside the snapshot directory (a
// corrupt or edited catalog must not delete anything else).
func (r *reflink) mine(p string) error {
	rel, err := filepath.Rel(r.dir, p)
	if err != nil || rel == "." || filepath.IsAbs(rel) || rel == ".." || len(rel) > 2 && rel[:3] == "../" {
		return fmt.Errorf("%w: %s is not under %s", ErrInvalid, p, r.dir)
	}
	return nil
}

func (r *reflink) Clone(location, name string) (string, error) {
	src := r.vol
	if location != "" {
		if err := r.mine(location); err != nil {
			return "", err
		}
		src = location
	}
	dst := filepath.Join(r.dir, "clones", name+".img")
	if err := clone(src, dst); err != nil {
		return "", err
	}
	return dst, nil
}

func (r *reflink) RemoveClone(p string) error { return r.Remove(p) }

func (r *reflink) Open(location string) (string, func() error, error) {
	if err := r.mine(location); err != nil {
		return "", nil, err
	}
	return location, func() error { return nil }, nil
}

func (r *reflink) Usage(location string) Usage {
	u := Usage{Allocated: -1, Exclusive: -1, How: "du (allocated blocks) and FIEMAP (extents without the SHARED flag)"}
	var st unix.Stat_t
	if err := unix.Stat(location, &st); err == nil {
		u.Allocated = st.Blocks * 512
	}
	exts, err := fiemapFile(location)
	if err != nil {
		u.How = "du only (FIEMAP: " + err.Error() + ")"
		return u
	}
	var excl int64
	for _, e := range exts {
		if e.flags&fiemapExtentShared == 0 {
			excl += int64(e.length)
		}
	}
	u.Exclusive = excl
	return u
}

// Differs compares the volume's extent map with the snapshot's: a chunk
// in which every byte maps to the same physical block in both (or is a
// hole in both) holds the same data, since shared blocks are copied on
// write, never written in place.
func (r *reflink) Differs(location string, chunk int64) ([]int64, bool, error) {
	if err := r.mine(location); err != nil {
		return nil, false, err
	}
	a, err := fiemapFile(r.vol)
	if err != nil {
		return nil, true, nil
	}
	b, err := fiemapFile(location)
	if err != nil {
		return nil, true, nil
	}
	var st unix.Stat_t
	if err := unix.Stat(r.vol, &st); err != nil {
		return nil, false, err
	}
	return differingChunks(a, b, st.Size, chunk), false, nil
}

// extent is one FIEMAP extent.
type extent struct {
	logical, physical, length uint64
	flags                     uint32
}

// FIEMAP (linux/fiemap.h).
const (
	fsIocFiemap         = 0xC020660B
	fiemapFlagSync      = 0x1
	fiemapExtentLast    = 0x1
	fiemapExtentUnknown = 0x2
	fiemapExtentDelay   = 0x4
	fiemapExtentShared  = 0x2000
	fiemapBatch         = 256
)

type fiemapHeader struct {
	start, length                               uint64
	flags, mappedExtents, extentCount, reserved uint32
}

type fiemapExtent struct {
	logical, physical, length uint64
	reserved64                [2]uint64
	flags                     uint32
	reserved                  [3]uint32
}

// fiemapFile returns the file's extents (after syncing delayed
// allocations), in logical order.
func fiemapFile(path string) ([]extent, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	type req struct {
		h fiemapHeader
		e [fiemapBatch]fiemapExtent
	}
	var out []extent
	var start uint64
	for range 1 << 20 {
		var q req
		q.h = fiemapHeader{start: start, length: ^uint64(0) - start, flags: fiemapFlagSync, extentCount: fiemapBatch}
		if _, _, e := unix.Syscall(unix.SYS_IOCTL, f.Fd(), fsIocFiemap, uintptr(unsafe.Pointer(&q))); e != 0 {
			return nil, fmt.Errorf("FIEMAP %s: %w", path, e)
		}
		n := int(q.h.mappedExtents)
		if n == 0 {
			return out, nil
		}
		for _, x := range q.e[:n] {
			out = append(out, extent{logical: x.logical, physical: x.physical, length: x.length, flags: x.flags})
		}
		last := q.e[n-1]
		if last.flags&fiemapExtentLast != 0 {
			return out, nil
		}
		start = last.logical + last.length
	}
	return nil, fmt.Errorf("FIEMAP %s: too many extents", path)
}

// differingChunks returns the chunks of [0, size) whose mapping differs
// between the extent lists a and b (or is unknown or delayed in either).
func differingChunks(a, b []extent, size, chunk int64) []int64 {
	// Cut both maps into segments at every extent boundary of either;
	// each segment maps to one physical address (or a hole) in each.
	type seg struct {
		off, end int64
		phys     int64 // -1: hole
		unknown  bool
	}
	segs := func(xs []extent) []seg {
		var out []seg
		for _, x := range xs {
			s := seg{off: int64(x.logical), end: int64(x.logical + x.length), phys: int64(x.physical),
				unknown: x.flags&(fiemapExtentUnknown|fiemapExtentDelay) != 0}
			out = append(out, s)
		}
		return out
	}
	sa, sb := segs(a), segs(b)
	cuts := []int64{0, size}
	for _, s := range append(slices.Clone(sa), sb...) {
		cuts = append(cuts, min(s.off, size), min(s.end, size))
	}
	slices.Sort(cuts)
	cuts = slices.Compact(cuts)
	// at returns the physical address of byte off (-1 hole) in ss.
	at := func(ss []seg, off int64) (int64, bool) {
		i, _ := slices.BinarySearchFunc(ss, off, func(s seg, o int64) int {
			switch {
			case s.end <= o:
				return -1
			case s.off > o:
				return 1
			}
			return 0
		})
		if i < len(ss) && ss[i].off <= off && off < ss[i].end {
			return ss[i].phys + (off - ss[i].off), ss[i].unknown
		}
		return -1, false
	}
	var out []int64
	add := func(from, to int64) {
		for c := from / chunk; c*chunk < to; c++ {
			if len(out) == 0 || out[len(out)-1] < c {
				out = append(out, c)
			}
		}
	}
	for i := 0; i+1 < len(cuts); i++ {
		off, end := cuts[i], cuts[i+1]
		if off >= size {
			break
		}
		pa, ua := at(sa, off)
		pb, ub := at(sb, off)
		if ua || ub || pa != pb {
			add(off, end)
		}
	}
	return out
}
