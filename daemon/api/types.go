// Package api is the doppel agent's control API: HTTPS with the agent's
// self-signed certificate (clients pin its SHA-256 fingerprint), a bearer
// token created at first start (mode 0600), JSON bodies, and errors that
// say what is wrong: 401 for a wrong token, 404 naming the unknown job,
// 409 for a command the job's state refuses (with the reason), 400 for bad
// input, 501 for a subsystem this build does not have wired.
//
// Routes (all under the token except /v1/peer, which uses the job's peer
// secret; the snapshot routes are in snapshot.go):
//
//	GET    /v1/info                     the agent: hostname, fingerprint, ports, subsystems
//	GET    /v1/jobs                     every job's status
//	POST   /v1/preflight                dry run of creating a job (job.Spec): Preflight
//	POST   /v1/jobs                     create a job (job.Spec)
//	GET    /v1/jobs/{name}              one job's status
//	DELETE /v1/jobs/{name}              delete a job (?force, ?keep_state, ?undo=true): DeleteResult
//	POST   /v1/jobs/{name}/{command}    failover | reverse | switchover | failback | pause | resume (CommandOptions)
//	POST   /v1/jobs/{name}/verify       compare source and target
//	POST   /v1/agent/stop               stop the agent (StopOptions; 409 in_use while volumes are in use)
//	POST   /v1/agent/restart            restart (upgrade) the agent keeping the volumes served: RestartResult
//	POST   /v1/peer/jobs/{name}/message a state-machine message from the peer agent
//	GET    /metrics                     Prometheus metrics (also without the token on the agent's --metrics-listen)
//
// The package also holds the Go client of one agent's API (Client): the
// agents use it for peer messages, and daemon/client, which drives every
// agent of a job for the CLI and the console, builds on it.
package api

import (
	"errors"
	"time"

	"github.com/doppelha/doppel/daemon/ha"
	"github.com/doppelha/doppel/daemon/job"
)

// DefaultPort is the control API's port.
const DefaultPort = 6320

// ErrNotWired is returned (and served as 501) for an operation whose
// subsystem is not part of this build yet: doppel never fakes a result.
var ErrNotWired = errors.New("not wired in this build")

// ErrRestarting refuses what would change a job while the agent hands
// its state over to its successor (a restart or an upgrade): retry in a
// moment.
var ErrRestarting = errors.New("the agent is restarting")

// ErrInUse is returned (and served as 409, kind in_use) when an operation
// would take a volume away from the applications using it: its export
// has clients, or its device is mounted. The message names them; --force
// overrides.
var ErrInUse = errors.New("in use")

// Info describes an agent.
type Info struct {
	Hostname      string `json:"hostname"`
	Version       string `json:"version"`
	Fingerprint   string `json:"fingerprint"`
	Control       string `json:"control"`        // the control listener
	Repl          string `json:"repl"`           // the replication listener (host may be empty: any)
	HeartbeatPort int    `json:"heartbeat_port"` // UDP
	// Subsystems says, per subsystem, "ok" or why it is unavailable.
	Subsystems map[string]string `json:"subsystems"`
}

// CommandOptions are the flags of an operator command.
type CommandOptions struct {
	Force        bool `json:"force,omitempty"`
	DiscardQueue bool `json:"discard_queue,omitempty"`
	// Snapshot: a failover promotes this snapshot of the target's volume
	// (the newer data is kept as a snapshot of its own).
	Snapshot string `json:"snapshot,omitempty"`
}

// DataStatus is the data side of a job on one agent.
type DataStatus struct {
	// Device is where applications use the volume on this host (/dev/nbdN
	// or unix:PATH of an NBD export); empty when not served here.
	Device string `json:"device,omitempty"`
	// Users are who uses the served volume now (NBD clients, mounts,
	// processes holding /dev/nbdN open): a delete or an agent stop is
	// refused while there are any, unless forced.
	Users []string `json:"users,omitempty"`
	// Progress of the current mirror or resync, in bytes.
	SyncTotal      int64 `json:"sync_total"`
	SyncDone       int64 `json:"sync_done"`
	BytesRemaining int64 `json:"bytes_remaining"`
	// Queue bytes (async mode): in memory and spilled to disk.
	QueueMemory int64 `json:"queue_memory"`
	QueueDisk   int64 `json:"queue_disk"`
	// MirrorSent counts the data bytes this source sent by mirror or
	// resync since it started (a restart resumes by checksum comparison:
	// only differing chunks are sent).
	MirrorSent int64 `json:"mirror_sent"`
	// DirtyBytes: this side's dirty bitmap (chunks a resync would send
	// or, on a returning old source, ask for): what the engine tracks.
	DirtyBytes int64 `json:"dirty_bytes"`
	// HotExtents: activity-log extents hot on this source (a crash now
	// adds them to DirtyBytes; idle ones are cooled every 2 s while
	// connected).
	HotExtents int `json:"hot_extents"`
	// ChangedBytes: bytes of the chunks written through this side's
	// served volume while it was not replicating (a failed-over host
	// before reverse, a paused job): the agent's own count, reset when
	// replication starts. A reverse should send about the union of the
	// new source's ChangedBytes and the old source's DirtyBytes.
	ChangedBytes int64 `json:"changed_bytes"`
	// AppliedBytes (target side): payload bytes applied from the source
	// (writes, mirror and resync data) since this side became the target
	// — after a reverse, what the reverse cost.
	AppliedBytes int64 `json:"applied_bytes"`
	// RPO estimate on the source: the age of the oldest write the target
	// does not hold (async: not applied yet; any mode: tracked in the
	// bitmap while the link is down or a resync runs); 0 in sync mode
	// while connected and synced. Sampled every 100 ms: short by at most
	// that. -1 unknown (the target side, or no engine).
	RPO time.Duration `json:"rpo"`
	// Known is false when the replication engine is not wired in: the
	// numbers above are then unknown, not zero.
	Known bool   `json:"known"`
	Note  string `json:"note,omitempty"`
}

// ProbeStatus is the failure detector's view.
type ProbeStatus struct {
	Mode     string        `json:"mode"` // xdp, userspace, or why none
	Interval time.Duration `json:"interval"`
	Missed   int           `json:"missed"`
	// TimeToFail counts down to the source being declared failed; -1 when
	// not counting.
	TimeToFail time.Duration `json:"time_to_fail"`
	// Active: failure detection runs (a probe is wired and readable).
	Active bool `json:"active"`
}

// JobStatus is a job as one agent sees it.
type JobStatus struct {
	Spec    job.Spec    `json:"spec"` // without its secret
	Self    string      `json:"self"`
	HA      ha.Status   `json:"ha"`
	Data    DataStatus  `json:"data"`
	Probe   ProbeStatus `json:"probe"`
	Actions []string    `json:"actions,omitempty"` // what the last command did
	// Arbiter is this side's view of the job's arbiter (nil: none).
	Arbiter *ArbiterStatus `json:"arbiter,omitempty"`
	// Snapshots are the job's snapshots on this side (nil: not wired).
	Snapshots *SnapshotStatus `json:"snapshots,omitempty"`
	Updated   time.Time       `json:"updated"`
}

// ArbiterStatus is a job's arbiter as one agent sees it.
type ArbiterStatus struct {
	Endpoints []string `json:"endpoints"`
	// Holding: this side holds the leadership key and may acknowledge
	// writes the target did not (source side).
	Holding bool `json:"holding"`
	// LeaseAge is how long ago the last successful renewal started (-1:
	// none); TTL the lease's time to live.
	LeaseAge time.Duration `json:"lease_age"`
	TTL      time.Duration `json:"ttl"`
	// TargetOutOfSync: sync mode, this source recorded its target as
	// missing writes (it continued without it).
	TargetOutOfSync bool `json:"target_out_of_sync,omitempty"`
	// Campaign says what a promoting target is waiting for.
	Campaign string `json:"campaign,omitempty"`
	// Error is the last failure to reach or use the arbiter.
	Error string `json:"error,omitempty"`
}

// Event is one decision or fact in a job's history on one agent, in the
// style of Patroni's HA loop log: what it saw, what it did.
type Event struct {
	Time  time.Time `json:"time"`
	Epoch uint64    `json:"epoch"`
	// Kind: state, action, arbiter, detector, command, peer, data.
	Kind string `json:"kind"`
	Msg  string `json:"msg"`
}

// Preflight is a dry run of creating a job on one agent: what the create
// would find and do on this host, changing nothing. The CLI runs it on
// both sides before creating anything, and prints every problem of both;
// a console can do the same (POST /v1/preflight, then POST /v1/jobs on
// each side, source last, DELETE with undo=true to roll back).
type Preflight struct {
	// Server is this agent's name in the job ("" when it is neither side).
	Server string      `json:"server"`
	Role   ha.Role     `json:"role,omitempty"`
	Volume VolumeFacts `json:"volume"`
	// Problems would make the create fail or leave a job that cannot
	// replicate: none may remain.
	Problems []Problem `json:"problems,omitempty"`
	// Notices are what the create would do that the operator should know
	// (state of an earlier job set aside, a volume file created).
	Notices []string `json:"notices,omitempty"`
}

// Problem is one failed pre-flight check.
type Problem struct {
	// Check names it: spec, agent, job, volume, mount, in_use, size,
	// script, peer_control, peer_repl.
	Check   string `json:"check"`
	Message string `json:"message"`
}

func (p Problem) String() string { return p.Check + ": " + p.Message }

// VolumeFacts describe a job's volume on one host.
type VolumeFacts struct {
	Path   string `json:"path"`
	Exists bool   `json:"exists"`
	Kind   string `json:"kind,omitempty"` // file | block
	// Size in bytes: the volume's, or the size it would be created with
	// (0: unknown).
	Size int64 `json:"size"`
	// Create: the create would make the file (sparse, Size bytes).
	Create bool `json:"create,omitempty"`
}

// StopOptions are the flags of doppel agent stop.
type StopOptions struct {
	// Force stops the agent even while volumes are in use (their users
	// lose their disks).
	Force bool `json:"force,omitempty"`
}

// RestartResult is the answer to a restart request.
type RestartResult struct {
	// PID of the agent that took over.
	PID     int    `json:"pid"`
	Message string `json:"message"`
}

// StopResult is the answer to a stop request.
type StopResult struct {
	Message string `json:"message"`
}

// DeleteOptions are the flags of doppel job delete.
type DeleteOptions struct {
	// Force deletes the job even while its volume is in use here (open
	// NBD connections, a mounted /dev/nbdN): the application loses its
	// disk.
	Force bool `json:"force,omitempty"`
	// KeepState archives the job's record and replication state
	// (generations, bitmap, queue) instead of removing them.
	KeepState bool `json:"keep_state,omitempty"`
	// Undo rolls back a create: it also removes the volume file when the
	// create made it.
	Undo bool `json:"undo,omitempty"`
}

// DeleteResult says what a delete did on one agent.
type DeleteResult struct {
	Job string `json:"job"`
	// Archived is the directory that holds what was kept (the state with
	// KeepState, split-brain saves always); "" when nothing was.
	Archived string `json:"archived,omitempty"`
	// Removed lists what was removed (the replication state directory).
	Removed []string `json:"removed,omitempty"`
}

// VerifyResult is the outcome of doppel verify.
type VerifyResult struct {
	Job       string `json:"job"`
	Bytes     int64  `json:"bytes"`
	Chunks    int64  `json:"chunks"`
	Differing int64  `json:"differing"`
	Equal     bool   `json:"equal"`
}

// errorBody is every error response.
type errorBody struct {
	Error string `json:"error"`
	Kind  string `json:"kind"`
}
