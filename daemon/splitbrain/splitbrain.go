// Package splitbrain saves the data a split-brain resolution is about to
// discard: the losing side's divergent chunks, copied to a sparse file at
// their own offsets, before the resync overwrites them.
//
// The save is a pair of files: NAME holds exactly the divergent chunks (the
// rest is holes, so `cmp`-style tools and loop devices see the volume's
// geometry), and NAME.ranges lists the ranges as text. NAME is written to a
// temporary name, fsynced and renamed; NAME.ranges is written last, also
// atomically, so its presence means the save is complete.
package splitbrain

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/doppelha/doppel/daemon/bitmap"
	"github.com/doppelha/doppel/daemon/statefile"
)

// RangesSuffix is appended to the save's path for the list of ranges.
const RangesSuffix = ".ranges"

const header = "# doppel split-brain save v1"

// maxIO bounds one read/write of the copy.
const maxIO = 1 << 20

// Range is a byte range of the volume.
type Range struct {
	Off, Len int64
}

// Saved describes a completed save.
type Saved struct {
	Path       string  // sparse file with the divergent chunks
	RangesPath string  // text list of the ranges
	Size       int64   // volume size (the sparse file's length)
	Ranges     []Range // merged, in disk order
	Bytes      int64   // data bytes saved
}

// ErrExists is returned when a save already exists at the path: a previous
// save is never overwritten.
var ErrExists = errors.New("split-brain save already exists")

// Save copies every chunk marked in divergent from src (the losing side's
// volume, of divergent.Size() bytes) into a new sparse file at path, at the
// same offsets, and writes the ranges to path + RangesSuffix. It returns once
// both files are durable.
func Save(path string, src io.ReaderAt, divergent *bitmap.Bitmap) (Saved, error) {
	s := Saved{Path: path, RangesPath: path + RangesSuffix, Size: divergent.Size()}
	for _, p := range []string{s.Path, s.RangesPath} {
		if _, err := os.Lstat(p); err == nil {
			return Saved{}, fmt.Errorf("%w: %s", ErrExists, p)
		}
	}
	tmp := path + ".partial"
	f, err := os.OpenFile(tmp, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return Saved{}, fmt.Errorf("create split-brain save: %w", err)
	}
	ok := false
	defer func() {
		if !ok {
			_ = f.Close()
			_ = os.Remove(tmp)
		}
	}()
	if err := f.Truncate(s.Size); err != nil {
		return Saved{}, fmt.Errorf("size split-brain save: %w", err)
	}
	buf := make([]byte, maxIO)
	for off, n := range divergent.Runs(0, maxIO) {
		b := buf[:n]
		if _, err := src.ReadAt(b, off); err != nil {
			return Saved{}, fmt.Errorf("read divergent range %d+%d: %w", off, n, err)
		}
		if _, err := f.WriteAt(b, off); err != nil {
			return Saved{}, fmt.Errorf("write split-brain save: %w", err)
		}
		if k := len(s.Ranges) - 1; k >= 0 && s.Ranges[k].Off+s.Ranges[k].Len == off {
			s.Ranges[k].Len += n
		} else {
			s.Ranges = append(s.Ranges, Range{off, n})
		}
		s.Bytes += n
	}
	if err := f.Sync(); err != nil {
		return Saved{}, fmt.Errorf("fsync split-brain save: %w", err)
	}
	if err := f.Close(); err != nil {
		return Saved{}, fmt.Errorf("close split-brain save: %w", err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return Saved{}, fmt.Errorf("rename split-brain save: %w", err)
	}
	ok = true
	if err := statefile.Write(s.RangesPath, EncodeRanges(s.Size, divergent.ChunkSize(), s.Ranges), 0o600); err != nil {
		return Saved{}, err
	}
	return s, nil
}

// EncodeRanges renders the sidecar: a header line, then one "offset length"
// line per range, in decimal bytes.
func EncodeRanges(size, chunk int64, ranges []Range) []byte {
	var b bytes.Buffer
	fmt.Fprintf(&b, "%s size=%d chunk=%d ranges=%d\n", header, size, chunk, len(ranges))
	for _, r := range ranges {
		fmt.Fprintf(&b, "%d %d\n", r.Off, r.Len)
	}
	return b.Bytes()
}

// ParseRanges reads a sidecar written by EncodeRanges. Ranges must be
// non-empty, in order, non-overlapping and inside the volume.
func ParseRanges(data []byte) (size int64, ranges []Range, err error) {
	sc := bufio.NewScanner(bytes.NewReader(data))
	if !sc.Scan() {
		return 0, nil, errors.New("split-brain ranges: empty")
	}
	var chunk int64
	var count int
	if _, err := fmt.Sscanf(sc.Text(), header+" size=%d chunk=%d ranges=%d", &size, &chunk, &count); err != nil {
		return 0, nil, fmt.Errorf("split-brain ranges: bad header %q", sc.Text())
	}
	if size <= 0 || count < 0 || count > len(data) {
		return 0, nil, fmt.Errorf("split-brain ranges: bad header values")
	}
	end := int64(0)
	for sc.Scan() {
		fs := strings.Fields(sc.Text())
		if len(fs) != 2 {
			return 0, nil, fmt.Errorf("split-brain ranges: bad line %q", sc.Text())
		}
		off, err1 := strconv.ParseInt(fs[0], 10, 64)
		n, err2 := strconv.ParseInt(fs[1], 10, 64)
		if err1 != nil || err2 != nil || off < end || n <= 0 || n > size || off > size-n {
			return 0, nil, fmt.Errorf("split-brain ranges: bad range %q", sc.Text())
		}
		ranges = append(ranges, Range{off, n})
		end = off + n
	}
	if len(ranges) != count {
		return 0, nil, fmt.Errorf("split-brain ranges: %d ranges, header says %d", len(ranges), count)
	}
	return size, ranges, nil
}

// Load reads the ranges of the save at path (the sparse file's path).
func Load(path string) (size int64, ranges []Range, err error) {
	b, err := os.ReadFile(path + RangesSuffix)
	if err != nil {
		return 0, nil, fmt.Errorf("load split-brain ranges: %w", err)
	}
	return ParseRanges(b)
}

// DefaultName is a file name for a save of job taken at the given
// generation, e.g. "splitbrain-web-1a2b3c4d5e6f7a8b.img".
func DefaultName(dir, job string, generation uint64) string {
	return filepath.Join(dir, fmt.Sprintf("splitbrain-%s-%016x.img", job, generation))
}
