package bench

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"time"
)

// QMP is a client of QEMU's machine protocol (JSON lines over a Unix
// socket), enough to drive qemu-storage-daemon's block jobs: commands are
// sent one at a time, asynchronous events are kept apart from replies.
type QMP struct {
	conn   io.ReadWriteCloser
	r      *bufio.Reader
	Events []QMPEvent // events received so far, oldest first
}

// QMPEvent is an asynchronous QMP message.
type QMPEvent struct {
	Event string          `json:"event"`
	Data  json.RawMessage `json:"data"`
}

// QMPError is an error reply.
type QMPError struct {
	Class string `json:"class"`
	Desc  string `json:"desc"`
}

func (e *QMPError) Error() string { return "qmp: " + e.Class + ": " + e.Desc }

// DialQMP connects to the QMP socket at path (retrying until timeout: the
// daemon creates it at start) and negotiates capabilities.
func DialQMP(ctx context.Context, path string, timeout time.Duration) (*QMP, error) {
	deadline := time.Now().Add(timeout)
	for {
		c, err := (&net.Dialer{}).DialContext(ctx, "unix", path)
		if err == nil {
			return NewQMP(c)
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return nil, fmt.Errorf("dial qmp %s: %w", path, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// NewQMP reads the greeting on conn and enters command mode.
func NewQMP(conn io.ReadWriteCloser) (*QMP, error) {
	q := &QMP{conn: conn, r: bufio.NewReader(conn)}
	var greeting struct {
		QMP *struct {
			Version json.RawMessage `json:"version"`
		} `json:"QMP"`
	}
	line, err := q.r.ReadBytes('\n')
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("read qmp greeting: %w", err)
	}
	if err := json.Unmarshal(line, &greeting); err != nil || greeting.QMP == nil {
		conn.Close()
		return nil, fmt.Errorf("read qmp greeting: not a QMP greeting: %q", truncate(line, 200))
	}
	if _, err := q.Execute("qmp_capabilities", nil); err != nil {
		conn.Close()
		return nil, err
	}
	return q, nil
}

// Execute runs command with args (nil: none) and returns its "return"
// value; events read meanwhile go to q.Events.
func (q *QMP) Execute(command string, args any) (json.RawMessage, error) {
	msg := map[string]any{"execute": command}
	if args != nil {
		msg["arguments"] = args
	}
	b, err := json.Marshal(msg)
	if err != nil {
		return nil, err
	}
	if _, err := q.conn.Write(append(b, '\n')); err != nil {
		return nil, fmt.Errorf("qmp %s: %w", command, err)
	}
	for {
		line, err := q.r.ReadBytes('\n')
		if err != nil {
			return nil, fmt.Errorf("qmp %s: %w", command, err)
		}
		var reply struct {
			Return json.RawMessage `json:"return"`
			Error  *QMPError       `json:"error"`
			QMPEvent
		}
		if err := json.Unmarshal(line, &reply); err != nil {
			return nil, fmt.Errorf("qmp %s: bad reply %q: %w", command, truncate(line, 200), err)
		}
		switch {
		case reply.Event != "":
			q.Events = append(q.Events, reply.QMPEvent)
		case reply.Error != nil:
			return nil, fmt.Errorf("%s: %w", command, reply.Error)
		case reply.Return != nil:
			return reply.Return, nil
		default:
			return nil, fmt.Errorf("qmp %s: reply without return or error: %q", command, truncate(line, 200))
		}
	}
}

// BlockJob is one entry of query-block-jobs.
type BlockJob struct {
	Device string `json:"device"`
	Type   string `json:"type"`
	Len    int64  `json:"len"`
	Offset int64  `json:"offset"`
	Busy   bool   `json:"busy"`
	Paused bool   `json:"paused"`
	Ready  bool   `json:"ready"`
	Status string `json:"status"`
}

// ErrNoJob is returned when a block job is not (or no longer) running.
var ErrNoJob = errors.New("block job not running")

// Job returns the state of the block job id.
func (q *QMP) Job(id string) (BlockJob, error) {
	raw, err := q.Execute("query-block-jobs", nil)
	if err != nil {
		return BlockJob{}, err
	}
	var jobs []BlockJob
	if err := json.Unmarshal(raw, &jobs); err != nil {
		return BlockJob{}, fmt.Errorf("query-block-jobs: %w", err)
	}
	for _, j := range jobs {
		if j.Device == id {
			return j, nil
		}
	}
	return BlockJob{}, fmt.Errorf("%s: %w", id, ErrNoJob)
}

// WaitJob polls the block job id every 10 ms until done says it is, or
// timeout passes.
func (q *QMP) WaitJob(ctx context.Context, id string, timeout time.Duration, done func(BlockJob) bool) (BlockJob, error) {
	deadline := time.Now().Add(timeout)
	for {
		j, err := q.Job(id)
		if err != nil {
			return j, err
		}
		if done(j) {
			return j, nil
		}
		if time.Now().After(deadline) {
			return j, fmt.Errorf("block job %s: not done after %v (status %s, offset %d of %d)", id, timeout, j.Status, j.Offset, j.Len)
		}
		select {
		case <-ctx.Done():
			return j, ctx.Err()
		case <-time.After(10 * time.Millisecond):
		}
	}
}

// MirrorSynced reports whether a ready mirror job has nothing left to copy.
func MirrorSynced(j BlockJob) bool { return j.Ready && j.Offset == j.Len }

// Close closes the connection.
func (q *QMP) Close() error { return q.conn.Close() }
