package agent

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/doppelha/doppel/daemon/statefile"
)

// IncarnationFile holds the agent's last heartbeat incarnation, in the
// state directory.
const IncarnationFile = "incarnation"

// NextIncarnation returns this start's heartbeat incarnation and persists
// it (atomically) in stateDir: max(persisted + 1, now in unix seconds).
// It grows at every start, also when the clock steps back, so a peer
// never takes this agent's new heartbeats for replays of old ones, nor
// old ones (recorded by an attacker) for new.
func NextIncarnation(stateDir string, now time.Time) (uint64, error) {
	if err := os.MkdirAll(stateDir, 0o700); err != nil {
		return 0, fmt.Errorf("state dir: %w", err)
	}
	path := filepath.Join(stateDir, IncarnationFile)
	var last uint64
	b, err := os.ReadFile(path)
	switch {
	case err == nil:
		if last, err = strconv.ParseUint(strings.TrimSpace(string(b)), 10, 64); err != nil {
			return 0, fmt.Errorf("read incarnation %s: %w", path, err)
		}
	case errors.Is(err, os.ErrNotExist):
	default:
		return 0, fmt.Errorf("read incarnation: %w", err)
	}
	next := max(last+1, uint64(max(now.Unix(), 0)))
	if err := statefile.Write(path, []byte(strconv.FormatUint(next, 10)+"\n"), 0o600); err != nil {
		return 0, fmt.Errorf("persist incarnation: %w", err)
	}
	return next, nil
}
