// Package replstate is the persistent replication state of one side under a
// state directory: the dirty bitmap and activity log, the memory → disk
// queue, the generation state, plus the connect-time decision between the two
// sides. It wraps daemon/repl's Stream and Applier:
//
//   - Source is the blockdev.Mutator of the replicating side. Its writes are
//     made hot in the activity log before they are applied, queued (memory,
//     then disk), and tracked in the bitmap when the queue overflows or the
//     stream must restart (a source restart, a target that lost its tail).
//     In sync mode, when the target is gone for longer than SyncTimeout, it
//     continues in tracking mode (DRBD's disconnect) instead of blocking.
//   - Every connection starts with a state handshake: both generation
//     states and the target's bitmap are exchanged, generation.Decide rules, and
//     the union of both bitmaps is resynced in disk order (resumable: a
//     resynced chunk is cleared once the target holds it durably). Split
//     brain and unrelated data are refused with the reason;
//     Config.Discard = "target" resolves a split brain by saving the
//     target's divergent chunks (daemon/splitbrain) before the resync.
//   - Target serves the receiving side; a plain source (no magic prefix)
//     is passed to the engine unchanged.
//
// A restarted source resumes its stream from the disk queue when the target
// can continue it (the records durable there stand in for the activity log
// while a backlog exists); otherwise the queue is folded into the bitmap.
//
// A state directory is bound to one job incarnation and one volume
// (Owner, identity.json): state found for another job, another
// incarnation of the same job name or another volume is set aside
// (renamed, logged, never used), so that a volume whose content the state
// does not describe is mirrored instead of being taken as in sync.
//
// Source's code is split by concern: source.go (configuration, open,
// run, close, what the agent asks of it), write.go (the write path),
// handshake.go (the state handshake and the generations), stream.go (the
// engine's stream and its memory → disk backlog), track.go (tracking mode
// and housekeeping), resync.go (resyncs and mirrors), status.go.
//
// Files under the state directory: identity.json, bitmap, activity.log,
// generation, generation.unshared, queue/STREAM/ (the disk queue segments
// of the current stream), repl-target.json (the engine's target state),
// splitbrain-*.img (saved divergent chunks).
package replstate

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/doppelha/doppel/daemon/bitmap"
	"github.com/doppelha/doppel/daemon/generation"
)

// File names under the state directory.
const (
	BitmapFile     = "bitmap"
	LogFile        = "activity.log"
	GenerationFile = "generation"
	QueueDir       = "queue"
	TargetFile     = "repl-target.json"
	// UnsharedFile exists while the current generation was started
	// without the peer (it has not seen it yet): no need for another.
	UnsharedFile = "generation.unshared"
)

// openBitmap opens (creating) the bitmap of a volume of size bytes.
func openBitmap(dir string, size, chunk int64) (*bitmap.Bitmap, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	bm, err := bitmap.Open(filepath.Join(dir, BitmapFile), size, chunk)
	if err != nil {
		return nil, fmt.Errorf("open bitmap in %s: %w", dir, err)
	}
	return bm, nil
}

// loadGen loads the generation state; ok is false when there is none.
func loadGen(dir string) (st generation.State, ok bool, err error) {
	st, err = generation.Load(filepath.Join(dir, GenerationFile))
	if errors.Is(err, fs.ErrNotExist) {
		return generation.State{}, false, nil
	}
	if err != nil {
		return st, false, fmt.Errorf("load generation state: %w", err)
	}
	return st, true, nil
}

func saveGen(dir string, st generation.State) error {
	if err := generation.Save(filepath.Join(dir, GenerationFile), st); err != nil {
		return fmt.Errorf("save generation state: %w", err)
	}
	return nil
}

func encodeGen(st generation.State) []byte {
	b, _ := st.MarshalBinary()
	return b
}

func decodeGen(b []byte) (generation.State, error) {
	var st generation.State
	if err := st.UnmarshalBinary(b); err != nil {
		return st, fmt.Errorf("peer generation state: %w", err)
	}
	return st, nil
}
