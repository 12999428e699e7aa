package replstate

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"time"

	"github.com/doppelha/doppel/daemon/statefile"
)

// OwnerFile binds a state directory to one job incarnation and one
// volume (see Owner).
const OwnerFile = "identity.json"

// maxOwner bounds the identity file (it holds three short strings).
const maxOwner = 64 << 10

// Owner is what a state directory belongs to. Generations, bitmap,
// activity log and queue describe the data of one volume as one job
// incarnation replicated it: state found for anything else says nothing
// about the volume and must not be used (a job deleted and created again
// would otherwise find "the same generation" on both sides and skip the
// mirror of a fresh target).
type Owner struct {
	// Job is the job incarnation: a UUID made when the job is created
	// (two jobs of the same name created one after the other differ).
	Job string `json:"job"`
	// Volume is the UUID the agent gave the volume when it bound it to
	// the job (kept in the job's record and, for a file, on the file).
	Volume string `json:"volume"`
	// Device is how the volume is found again (file system and inode,
	// or the block device's stable ID): a different file at the same
	// path is a different volume.
	Device string `json:"device"`
}

// IsZero reports whether no owner was configured (no check).
func (id Owner) IsZero() bool { return id == Owner{} }

func (id Owner) String() string {
	return fmt.Sprintf("job %s, volume %s (%s)", id.Job, id.Volume, id.Device)
}

// ErrOwner reports an identity file that cannot be read.
var ErrOwner = errors.New("unreadable state identity")

// LoadOwner reads dir's identity; ok is false when it has none.
func LoadOwner(dir string) (id Owner, ok bool, err error) {
	b, err := os.ReadFile(filepath.Join(dir, OwnerFile))
	if errors.Is(err, fs.ErrNotExist) {
		return id, false, nil
	}
	if err != nil {
		return id, false, err
	}
	id, err = decodeOwner(b)
	return id, err == nil, err
}

func decodeOwner(b []byte) (Owner, error) {
	var id Owner
	if len(b) > maxOwner {
		return id, fmt.Errorf("%w: %d bytes", ErrOwner, len(b))
	}
	if err := json.Unmarshal(b, &id); err != nil {
		return id, fmt.Errorf("%w: %v", ErrOwner, err)
	}
	return id, nil
}

func saveOwner(dir string, id Owner) error {
	b, err := json.MarshalIndent(id, "", "  ")
	if err != nil {
		return err
	}
	if err := statefile.Write(filepath.Join(dir, OwnerFile), append(b, '\n'), 0o600); err != nil {
		return fmt.Errorf("save state identity: %w", err)
	}
	return nil
}

// Binding says how a state directory is bound to its owner at open.
type Binding struct {
	// Owner the state must belong to; zero: no check (the state is
	// used as found, as by doppel repl with a --state-dir).
	Owner Owner
	// AdoptUnbound: state without an identity file (written before
	// identities existed) is taken as this identity's, once. Otherwise
	// it is set aside like state of another identity.
	AdoptUnbound bool
	// SetAsideTo is the directory that receives state of another
	// identity, renamed to NAME.stale-TIMESTAMP (default: next to the
	// state directory).
	SetAsideTo string
}

// bind makes dir the state of b.Owner: it keeps state of that
// identity, sets aside (renames, never deletes) state of any other, and
// writes the identity into a new or adopted directory. It returns where
// state was set aside ("" when none was) and a reason for the log.
func bind(dir string, b Binding, log *slog.Logger) (aside string, err error) {
	if b.Owner.IsZero() {
		return "", os.MkdirAll(dir, 0o700)
	}
	ents, err := os.ReadDir(dir)
	switch {
	case errors.Is(err, fs.ErrNotExist):
	case err != nil:
		return "", err
	case len(ents) > 0:
		found, ok, lerr := LoadOwner(dir)
		var why string
		switch {
		case lerr != nil:
			why = lerr.Error()
		case ok && found == b.Owner:
			return "", nil
		case ok && found.Job != b.Owner.Job:
			why = fmt.Sprintf("it belongs to another job incarnation (%s, this job is %s)", found.Job, b.Owner.Job)
		case ok:
			why = fmt.Sprintf("it belongs to another volume (%s %s, the job's volume is now %s %s)", found.Volume, found.Device, b.Owner.Volume, b.Owner.Device)
		case b.AdoptUnbound:
			log.Warn("replication state without an identity (written by an older doppel): bound to this job and volume", "dir", dir, "identity", b.Owner.String())
			return "", saveOwner(dir, b.Owner)
		default:
			why = "it has no identity (left by an earlier job of the same name)"
		}
		to := b.SetAsideTo
		if to == "" {
			to = filepath.Dir(dir)
		}
		if err := os.MkdirAll(to, 0o700); err != nil {
			return "", err
		}
		aside = filepath.Join(to, filepath.Base(dir)+".stale-"+time.Now().UTC().Format("20060102T150405.000000000"))
		if err := os.Rename(dir, aside); err != nil {
			return "", fmt.Errorf("set aside replication state %s: %w", dir, err)
		}
		if err := errors.Join(statefile.SyncDir(filepath.Dir(dir)), statefile.SyncDir(to)); err != nil {
			return "", err
		}
		log.Warn("replication state set aside: not this job's or not this volume's; the volume's content is unknown to the job (a checksum mirror decides what to send)",
			"dir", dir, "moved_to", aside, "reason", why)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return "", err
	}
	return aside, saveOwner(dir, b.Owner)
}
