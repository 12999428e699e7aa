// Package daemon is the folder of the doppel agent (doppel agent); it holds
// no code. This is a map of its packages by the two paths that matter.
//
// Where a write goes. An application writes to /dev/nbdN, which the kernel
// sends to the agent's NBD server (blockdev, attached by blockdev/kernel).
// The server hands every write, trim, write-zeroes and flush to a
// blockdev.Mutator: the job's data plane (agent's ReplPlanes, which holds
// writes while a switchover drains), then replstate.Source, which starts a
// new generation (generation) when the target may not see the write in
// order and asks the arbiter (replstate.Authority, implemented by the
// agent over arbiter) before acknowledging what the target has not. The
// engine is repl.Stream: it locks the range, marks it hot in the activity
// log and bitmap (bitmap), sequences it into its Backlog (replstate's
// memory → disk queue, queue), writes it to the local volume and, in sync
// mode, waits for the target's acknowledgement. Frames (repl/wire) travel
// over TLS with pinned certificates (tlspin) to the peer agent's
// replication listener (repl.Mux routes by job), where replstate.Target
// runs the state handshake (generations, bitmaps, the resync decision,
// split-brain saves in splitbrain, snapshots before a resync in snapshot)
// and repl.Applier applies the frames in order. Resyncs are paced by
// resync; small state files are written atomically by statefile.
//
// Where failover is decided. Each agent sends authenticated heartbeats and
// the XDP probe on the peer timestamps them (ebpf/heartbeat). The agent's
// detector reads those facts and applies monitor's policy (down after
// interval × missed of silence on every path, up after rise packets); its
// verdicts, the replication link's facts, peer messages and operator
// commands (api, from the CLI and console through client) are events of
// the job's pure state machine, ha.Node. ha decides: fail over, fence a
// returned source, reverse, switch over; with an etcd arbiter (arbiter) a
// promotion waits for the epoch it grants. The agent (agent) carries out
// ha's actions: the data plane promotes or demotes (replstate), volumes
// are served or not (blockdev), service IPs move (netident), hook scripts
// run. job holds the job definitions and their store; protection judges a
// job's two sides in the operator's words.
package daemon
