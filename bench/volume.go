package bench

import (
	"fmt"
	"math/rand/v2"
	"os"

	"golang.org/x/sys/unix"
)

// PrepareVolume creates path as a fully allocated file of size bytes. With
// fill it holds pseudo-random data from seed (so that no server can shortcut
// reads of holes or zeroes, and compression gains nothing); without, it is
// allocated but reads as zeroes. The data is fdatasync'd before returning.
func PrepareVolume(path string, size int64, fill bool, seed uint64) error {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return fmt.Errorf("prepare volume: %w", err)
	}
	defer f.Close()
	if err := unix.Fallocate(int(f.Fd()), 0, 0, size); err != nil {
		return fmt.Errorf("prepare volume: fallocate %s: %w", path, err)
	}
	if fill {
		rng := rand.NewChaCha8([32]byte{0: byte(seed), 1: byte(seed >> 8), 2: byte(seed >> 16), 3: byte(seed >> 24)})
		buf := make([]byte, 4<<20)
		for off := int64(0); off < size; off += int64(len(buf)) {
			n := min(int64(len(buf)), size-off)
			_, _ = rng.Read(buf[:n])
			if _, err := f.WriteAt(buf[:n], off); err != nil {
				return fmt.Errorf("prepare volume: %w", err)
			}
		}
	}
	if err := unix.Fdatasync(int(f.Fd())); err != nil {
		return fmt.Errorf("prepare volume: fdatasync %s: %w", path, err)
	}
	return nil
}

// SyncFiles fdatasyncs each file, so that dirty pages left by one run are not
// written back during the next server's run.
func SyncFiles(paths ...string) error {
	for _, p := range paths {
		f, err := os.OpenFile(p, os.O_RDWR, 0)
		if err != nil {
			return fmt.Errorf("sync %s: %w", p, err)
		}
		err = unix.Fdatasync(int(f.Fd()))
		f.Close()
		if err != nil {
			return fmt.Errorf("sync %s: %w", p, err)
		}
	}
	return nil
}
