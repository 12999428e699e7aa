package agent

import (
	"bufio"
	"encoding/json"
	"errors"
	"io/fs"
	"log/slog"
	"os"
	"sync"
	"time"

	"github.com/doppelha/doppel/daemon/api"
	"github.com/doppelha/doppel/daemon/statefile"
)

// maxEvents is how many events of a job are kept (in memory, and at least
// that many in its file).
const maxEvents = 500

// eventLog is a job's decision history on this agent (doppel job events):
// every decision the runner takes, and every fact it acts on, in one line
// (what it saw, what it did), in the agent's log too. The last maxEvents
// are kept in memory and appended to STATE/jobs/NAME.events (JSON lines),
// which is rewritten with the last maxEvents when it holds twice that.
type eventLog struct {
	log  *slog.Logger
	path string

	mu    sync.Mutex
	evs   []api.Event
	lines int // lines in the file
}

// openEventLog loads the history kept in path (a missing or damaged file
// starts an empty one: the history is for people, not for safety).
func openEventLog(log *slog.Logger, path string) *eventLog {
	l := &eventLog{log: log, path: path}
	f, err := os.Open(path)
	if err != nil {
		if !errors.Is(err, fs.ErrNotExist) {
			log.Warn("job event history unreadable: starting a new one", "path", path, "err", err)
		}
		return l
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		var ev api.Event
		if json.Unmarshal(sc.Bytes(), &ev) == nil {
			l.evs = append(l.evs, ev)
			l.lines++
		}
	}
	if len(l.evs) > maxEvents {
		l.evs = append([]api.Event(nil), l.evs[len(l.evs)-maxEvents:]...)
	}
	return l
}

// add records one event and logs it.
func (l *eventLog) add(epoch uint64, kind, msg string) {
	ev := api.Event{Time: time.Now().UTC(), Epoch: epoch, Kind: kind, Msg: msg}
	l.log.Info(msg, "event", kind, "epoch", epoch)
	b, err := json.Marshal(ev)
	if err != nil {
		return
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	l.evs = append(l.evs, ev)
	if len(l.evs) > maxEvents {
		l.evs = append([]api.Event(nil), l.evs[len(l.evs)-maxEvents:]...)
	}
	if l.path == "" {
		return
	}
	if l.lines >= 2*maxEvents {
		var buf []byte
		for _, e := range l.evs {
			eb, _ := json.Marshal(e)
			buf = append(append(buf, eb...), '\n')
		}
		if err := statefile.Write(l.path, buf, 0o600); err != nil {
			l.log.Warn("rewrite job event history", "err", err)
			return
		}
		l.lines = len(l.evs)
		return
	}
	f, err := os.OpenFile(l.path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
	if err != nil {
		l.log.Warn("append to job event history", "err", err)
		return
	}
	_, err = f.Write(append(b, '\n'))
	if err = errors.Join(err, f.Close()); err != nil {
		l.log.Warn("append to job event history", "err", err)
		return
	}
	l.lines++
}

// list returns the kept events, oldest first.
func (l *eventLog) list() []api.Event {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]api.Event(nil), l.evs...)
}
