package replstate

import (
	"errors"
	"io"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/doppelha/doppel/daemon/bitmap"
)

// PeekDirty reports the dirty bytes a side's replication state in dir
// holds — its bitmap with the hot extents of its activity log folded in,
// as the engine will count them when it opens the state — without
// touching that state: it opens copies of the two files (the bitmap is one
// bit per 64 KiB chunk: 2 KiB per GiB). For a side whose engine is not
// open (a returned old source before reverse). An empty or missing dir
// holds nothing dirty.
func PeekDirty(dir string) (int64, error) {
	bmPath := filepath.Join(dir, BitmapFile)
	f, err := os.Open(bmPath)
	if errors.Is(err, fs.ErrNotExist) {
		return 0, nil // no state yet: nothing dirty
	}
	if err != nil {
		return 0, err
	}
	h := make([]byte, 4096)
	n, _ := io.ReadFull(f, h)
	f.Close()
	size, chunk, err := bitmap.ParseHeader(h[:n])
	if err != nil {
		return 0, err
	}
	tmp, err := os.MkdirTemp("", "doppel-peek-")
	if err != nil {
		return 0, err
	}
	defer os.RemoveAll(tmp)
	if err := copyFile(bmPath, filepath.Join(tmp, BitmapFile)); err != nil {
		return 0, err
	}
	bm, err := bitmap.Open(filepath.Join(tmp, BitmapFile), size, chunk)
	if err != nil {
		return 0, err
	}
	defer bm.Close()
	logPath := filepath.Join(dir, LogFile)
	if _, err := os.Stat(logPath); err == nil {
		if err := copyFile(logPath, filepath.Join(tmp, LogFile)); err != nil {
			return 0, err
		}
		al, err := bitmap.OpenLog(filepath.Join(tmp, LogFile), bm, bitmap.LogOptions{})
		if err != nil {
			return 0, err
		}
		defer al.Close()
	}
	return bm.DirtyBytes(), nil
}

func copyFile(from, to string) error {
	in, err := os.Open(from)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(to, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}
