package api

import (
	"context"
	"errors"
	"net/http"
	"time"

	"github.com/doppelha/doppel/daemon/snapshot"
)

// Snapshot routes (all under the API token; served when the agent
// implements SnapshotAgent, else 501):
//
//	GET    /v1/jobs/{name}/snapshots               the job's snapshots on this agent: SnapshotList
//	POST   /v1/jobs/{name}/snapshots               take one (SnapshotRequest; the job's target): SnapshotInfo
//	DELETE /v1/jobs/{name}/snapshots/{snap}        delete one
//	PUT    /v1/jobs/{name}/snapshots/schedule      set the schedule (snapshot.Schedule)
//	POST   /v1/jobs/{name}/freeze                  source: freeze, mark a point in the stream: FreezeResult
//	POST   /v1/jobs/{name}/thaw                    source: thaw
//	POST   /v1/jobs/{name}/test-failover           start a test failover (TestFailoverRequest): TestFailoverStatus
//	DELETE /v1/jobs/{name}/test-failover           stop it, discarding the clone

// SnapshotAgent is what the snapshot routes need of the agent.
type SnapshotAgent interface {
	Snapshots(ctx context.Context, job string) (SnapshotList, error)
	CreateSnapshot(ctx context.Context, job string, req SnapshotRequest) (SnapshotInfo, error)
	DeleteSnapshot(ctx context.Context, job, name string) error
	SetSnapshotSchedule(ctx context.Context, job string, s snapshot.Schedule) error
	Freeze(ctx context.Context, job string, req FreezeRequest) (FreezeResult, error)
	Thaw(ctx context.Context, job string) error
	StartTestFailover(ctx context.Context, job string, req TestFailoverRequest) (TestFailoverStatus, error)
	StopTestFailover(ctx context.Context, job string) error
}

// SnapshotRequest asks the job's target for a snapshot.
type SnapshotRequest struct {
	// Name of the snapshot ("": snap-TIMESTAMP).
	Name string `json:"name,omitempty"`
	// AtStream and AtSeq, when set, take it exactly at that point of
	// the stream (the source's FreezeResult): application-consistent.
	AtStream uint64 `json:"at_stream,omitempty"`
	AtSeq    uint64 `json:"at_seq,omitempty"`
}

// SnapshotInfo is one snapshot as an agent reports it.
type SnapshotInfo struct {
	snapshot.Snapshot
	Usage snapshot.Usage `json:"usage"`
	// Age at the time of the answer.
	Age time.Duration `json:"age"`
}

// SnapshotList is a job's snapshots on one agent.
type SnapshotList struct {
	Job string `json:"job"`
	// Mechanism in use on this host's volume, or Unsupported: why none.
	Mechanism   string            `json:"mechanism,omitempty"`
	Describe    string            `json:"describe,omitempty"`
	Unsupported string            `json:"unsupported,omitempty"`
	Schedule    snapshot.Schedule `json:"schedule"`
	Snapshots   []SnapshotInfo    `json:"snapshots"`
	// TestFailover is the running test failover, if any.
	TestFailover *TestFailoverStatus `json:"test_failover,omitempty"`
}

// SnapshotStatus is the snapshot line of a job's status.
type SnapshotStatus struct {
	Mechanism   string            `json:"mechanism,omitempty"`
	Unsupported string            `json:"unsupported,omitempty"`
	Count       int               `json:"count"`
	Schedule    snapshot.Schedule `json:"schedule"`
	// Latest is the newest snapshot (nil: none); NextDue when the
	// schedule takes the next one (zero: no schedule, or not the target).
	Latest  *snapshot.Snapshot `json:"latest,omitempty"`
	NextDue time.Time          `json:"next_due,omitempty"`
	// LastError is the last automatic or scheduled snapshot that failed.
	LastError    string              `json:"last_error,omitempty"`
	TestFailover *TestFailoverStatus `json:"test_failover,omitempty"`
}

// FreezeRequest asks the job's source to freeze its file system and mark
// the point in the replication stream: exactly one of Mount (fsfreeze
// -f/-u on that mount point) and Script (run with freeze, then thaw).
type FreezeRequest struct {
	Mount  string `json:"mount,omitempty"`
	Script string `json:"script,omitempty"`
	// Timeout thaws on its own (default 10s, at most 60s).
	Timeout time.Duration `json:"timeout,omitempty"`
}

// FreezeResult is the point marked while frozen.
type FreezeResult struct {
	Stream uint64 `json:"stream"`
	Seq    uint64 `json:"seq"`
	// Until is when the source thaws on its own.
	Until time.Time `json:"until"`
}

// TestFailoverRequest starts a test failover on the job's target.
type TestFailoverRequest struct {
	// Snapshot to clone ("": the current consistent image).
	Snapshot string `json:"snapshot,omitempty"`
	// TestIP, CIDR@IFACE, puts the export on an address of its own
	// (never a service IP of the job); "": a Unix socket.
	TestIP string `json:"test_ip,omitempty"`
}

// TestFailoverStatus is a running test failover.
type TestFailoverStatus struct {
	// Device is where the clone is served (unix:PATH or nbd://IP:PORT/EXPORT).
	Device  string         `json:"device"`
	Export  string         `json:"export"`
	From    string         `json:"from"` // the snapshot, or "live"
	Point   snapshot.Point `json:"point"`
	Clone   string         `json:"clone"` // the clone's file or device
	Started time.Time      `json:"started"`
	TestIP  string         `json:"test_ip,omitempty"`
	Clients []string       `json:"clients,omitempty"`
}

func (s *Server) snapshotRoutes(b Agent) {
	sb, _ := b.(SnapshotAgent)
	wired := func(h func(w http.ResponseWriter, r *http.Request) error) func(w http.ResponseWriter, r *http.Request) error {
		return func(w http.ResponseWriter, r *http.Request) error {
			if sb == nil {
				return ErrNotWired
			}
			return h(w, r)
		}
	}
	s.handle("GET /v1/jobs/{name}/snapshots", s.auth(wired(func(w http.ResponseWriter, r *http.Request) error {
		l, err := sb.Snapshots(r.Context(), r.PathValue("name"))
		if err != nil {
			return err
		}
		return writeJSON(w, http.StatusOK, l)
	})))
	s.handle("POST /v1/jobs/{name}/snapshots", s.auth(wired(func(w http.ResponseWriter, r *http.Request) error {
		var req SnapshotRequest
		if err := s.readJSON(w, r, &req); err != nil {
			return err
		}
		info, err := sb.CreateSnapshot(r.Context(), r.PathValue("name"), req)
		if err != nil {
			return err
		}
		return writeJSON(w, http.StatusCreated, info)
	})))
	s.handle("DELETE /v1/jobs/{name}/snapshots/{snap}", s.auth(wired(func(w http.ResponseWriter, r *http.Request) error {
		if err := sb.DeleteSnapshot(r.Context(), r.PathValue("name"), r.PathValue("snap")); err != nil {
			return err
		}
		w.WriteHeader(http.StatusNoContent)
		return nil
	})))
	s.handle("PUT /v1/jobs/{name}/snapshots/schedule", s.auth(wired(func(w http.ResponseWriter, r *http.Request) error {
		var sc snapshot.Schedule
		if err := s.readJSON(w, r, &sc); err != nil {
			return err
		}
		if err := sb.SetSnapshotSchedule(r.Context(), r.PathValue("name"), sc); err != nil {
			return err
		}
		w.WriteHeader(http.StatusNoContent)
		return nil
	})))
	s.handle("POST /v1/jobs/{name}/freeze", s.auth(wired(func(w http.ResponseWriter, r *http.Request) error {
		var req FreezeRequest
		if err := s.readJSON(w, r, &req); err != nil {
			return err
		}
		res, err := sb.Freeze(r.Context(), r.PathValue("name"), req)
		if err != nil {
			return err
		}
		return writeJSON(w, http.StatusOK, res)
	})))
	s.handle("POST /v1/jobs/{name}/thaw", s.auth(wired(func(w http.ResponseWriter, r *http.Request) error {
		if err := sb.Thaw(r.Context(), r.PathValue("name")); err != nil {
			return err
		}
		w.WriteHeader(http.StatusNoContent)
		return nil
	})))
	s.handle("POST /v1/jobs/{name}/test-failover", s.auth(wired(func(w http.ResponseWriter, r *http.Request) error {
		var req TestFailoverRequest
		if err := s.readJSON(w, r, &req); err != nil {
			return err
		}
		st, err := sb.StartTestFailover(r.Context(), r.PathValue("name"), req)
		if err != nil {
			return err
		}
		return writeJSON(w, http.StatusCreated, st)
	})))
	s.handle("DELETE /v1/jobs/{name}/test-failover", s.auth(wired(func(w http.ResponseWriter, r *http.Request) error {
		if err := sb.StopTestFailover(r.Context(), r.PathValue("name")); err != nil {
			return err
		}
		w.WriteHeader(http.StatusNoContent)
		return nil
	})))
}

// classifySnapshot maps the snapshot package's errors to HTTP.
func classifySnapshot(err error) (int, string, bool) {
	switch {
	case errors.Is(err, snapshot.ErrNotFound):
		return http.StatusNotFound, "not_found", true
	case errors.Is(err, snapshot.ErrExists):
		return http.StatusConflict, "exists", true
	case errors.Is(err, snapshot.ErrUnsupported):
		return http.StatusConflict, "unsupported", true
	case errors.Is(err, snapshot.ErrInvalid):
		return http.StatusBadRequest, "invalid", true
	}
	return 0, "", false
}

// Snapshots lists a job's snapshots on the agent.
func (c *Client) Snapshots(ctx context.Context, job string) (SnapshotList, error) {
	var l SnapshotList
	err := c.do(ctx, http.MethodGet, "/v1/jobs/"+job+"/snapshots", nil, &l)
	return l, err
}

// CreateSnapshot takes a snapshot on the agent (the job's target).
func (c *Client) CreateSnapshot(ctx context.Context, job string, req SnapshotRequest) (SnapshotInfo, error) {
	var info SnapshotInfo
	err := c.do(ctx, http.MethodPost, "/v1/jobs/"+job+"/snapshots", req, &info)
	return info, err
}

// DeleteSnapshot deletes a snapshot on the agent.
func (c *Client) DeleteSnapshot(ctx context.Context, job, name string) error {
	return c.do(ctx, http.MethodDelete, "/v1/jobs/"+job+"/snapshots/"+name, nil, nil)
}

// SetSnapshotSchedule sets the job's snapshot schedule on the agent.
func (c *Client) SetSnapshotSchedule(ctx context.Context, job string, s snapshot.Schedule) error {
	return c.do(ctx, http.MethodPut, "/v1/jobs/"+job+"/snapshots/schedule", s, nil)
}

// Freeze freezes the job's source and marks the point.
func (c *Client) Freeze(ctx context.Context, job string, req FreezeRequest) (FreezeResult, error) {
	var res FreezeResult
	err := c.do(ctx, http.MethodPost, "/v1/jobs/"+job+"/freeze", req, &res)
	return res, err
}

// Thaw thaws the job's source.
func (c *Client) Thaw(ctx context.Context, job string) error {
	return c.do(ctx, http.MethodPost, "/v1/jobs/"+job+"/thaw", nil, nil)
}

// StartTestFailover starts a test failover on the agent (the job's target).
func (c *Client) StartTestFailover(ctx context.Context, job string, req TestFailoverRequest) (TestFailoverStatus, error) {
	var st TestFailoverStatus
	err := c.do(ctx, http.MethodPost, "/v1/jobs/"+job+"/test-failover", req, &st)
	return st, err
}

// StopTestFailover stops the test failover, discarding its clone.
func (c *Client) StopTestFailover(ctx context.Context, job string) error {
	return c.do(ctx, http.MethodDelete, "/v1/jobs/"+job+"/test-failover", nil, nil)
}
