package replstate

import (
	"errors"
	"fmt"

	"github.com/doppelha/doppel/daemon/generation"
)

// RollbackTarget rolls a stopped target's state under dir back with its
// volume (size bytes) to a snapshot, before the target is promoted: a
// failover to a snapshot. roll writes the snapshot's data into the
// volume; before its first write it calls mark with the chunks (chunk
// bytes each, the source's bitmap chunk) it is about to write, and they
// are set in this side's bitmap durably. After the promotion they are
// this side's dirty chunks like its own writes: the reverse resyncs them
// to the old source (whose own dirty chunks are added to them), so the
// old source, which still holds the newer data there, gets the snapshot's.
//
// When roll succeeds the data is the snapshot's consistent image: the
// generation state says consistent. Until then, from the first mark, it
// says inconsistent (as it did for a target interrupted inside a
// resync). gen is the snapshot's generation, used
// when this side holds none (a full mirror was interrupted): the peer
// then finds it related or not, and mirrors when not.
func RollbackTarget(dir string, size, chunk int64, gen uint64, roll func(mark func(chunks []int64) error) error) error {
	st, ok, err := loadGen(dir)
	if err != nil {
		return fmt.Errorf("roll back: %w", err)
	}
	if ok && st.Side == generation.SideSource {
		return errors.New("roll back: this side's state is a source's: only a stopped target is rolled back")
	}
	bm, err := openBitmap(dir, size, chunk)
	if err != nil {
		return fmt.Errorf("roll back: %w", err)
	}
	defer bm.Close()
	mark := func(chunks []int64) error {
		for _, c := range chunks {
			bm.Set(c*chunk, chunk)
		}
		if err := bm.Flush(); err != nil {
			return err
		}
		if ok && st.Current != 0 && st.Data != generation.Inconsistent {
			// From the first rewritten byte until the roll completes the
			// image is neither the snapshot nor the newer data: the
			// replication state says inconsistent meanwhile (a source is
			// then opened on it only by force).
			mid := st
			mid.Data = generation.Inconsistent
			if err := saveGen(dir, mid); err != nil {
				return err
			}
		}
		return nil
	}
	if err := roll(mark); err != nil {
		return err
	}
	switch {
	case ok && st.Current != 0:
		st.Data = generation.Consistent
	case gen != 0:
		st = generation.State{Current: gen, Side: generation.SideTarget, Data: generation.Consistent}
	default:
		return errors.New("roll back: neither this side nor the snapshot has a generation")
	}
	if err := saveGen(dir, st); err != nil {
		return fmt.Errorf("roll back: %w", err)
	}
	return nil
}
