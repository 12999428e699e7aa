// Package repl is doppel's replication engine: the source's Stream that
// sequences and ships every write, the target's Applier, mirror, verify,
// and their transport (TLS 1.3 with pinned certificates, optional
// compression and a bandwidth limit). The frame codec is the sub-package
// wire. It keeps no state on disk beyond the applier's small state file:
// the persistent layer (bitmap, disk queue, generations, the state
// handshake) is daemon/replstate, whose Source and Target wrap a Stream
// and an Applier.
//
// # Stream (the source side)
//
// [Stream] is a [blockdev.Mutator]: the NBD server calls Apply concurrently
// and acknowledges on return. For a write, trim or write-zeroes, Apply
//
//  1. locks the byte range (overlapping requests in arrival order),
//  2. calls [Tracker.Mark] (bitmap + activity log),
//  3. sequences it and pushes the frame to the [Backlog] (one mutex: sequence
//     order is queue order); a write's frame keeps the NBD server's buffer
//     (blockdev.Mutation.Retain) until the target acknowledged it, no copy,
//  4. applies it locally (blockdev.ApplyTo) while the sender ships it (a
//     local failure leaves the range dirty in the Tracker and fails the
//     request),
//  5. unlocks; syncs locally for FUA; in sync mode waits until the target
//     acknowledged the sequence (the target fsyncs FUA frames first).
//
// A flush is sequenced first, then synced locally, then (sync mode) waited
// for: every write acknowledged before the flush arrived has a lower
// sequence, and the target fsyncs when it applies the flush. So FLUSH and
// FUA are barriers in both modes, and in sync mode durable on the target.
//
// [Stream.Run] owns the connection (dial, handshake, sender, receiver,
// reconnect with backoff resuming from the target's applied sequence): all
// connection handling is in session.go. [Stream.Mirror] and [Stream.Verify]
// read ranges under the same range lock and sequence their frames into the
// same stream as application writes (the DRBD "application vs resync IO"
// rule made structural): a mirror chunk read before a write is ordered
// before it on the target, one read after it holds its data, so it can never
// overwrite a newer write. Checksum requests are sequenced too, with the
// source's checksums computed under the lock at the same point: verify is
// exact while the application writes.
//
// # Applier (the target side)
//
// [Applier] accepts one source at a time (a new authenticated connection
// replaces a half-dead one), applies frames strictly in sequence order,
// fsyncs at flush, FUA and the end of a mirror, acknowledges (coalesced),
// and persists {stream, durable sequence, data state} atomically to
// ApplierConfig.StatePath. Its data state is inconsistent from the start to
// the end of a mirror or resync pass.
//
// # Seams (daemon/bitmap, daemon/queue, daemon/generation)
//
//   - [Backlog]: the frames sequenced and not yet acknowledged; Push /
//     Read(after) / Release(seq) / Len. The default [MemBacklog] is bounded
//     (128 MiB) and applies back pressure when full; replstate's, on the
//     memory → disk queue (daemon/queue), implements the same interface and
//     does not block; when it cannot take an entry, Push fails and the
//     source reports the range to Tracker.Sequenced with seq 0.
//   - [Tracker]: Mark (before the local write), Sequenced (seq assigned, or
//     0 = not queued), Acked (target applied up to seq). The default tracks
//     nothing.
//   - Resume: Hello carries the source's stream ID and the sequence it can
//     resend from; Welcome carries the target's stream and applied
//     sequence. A restarted source continues its stream with
//     StreamConfig.Resume (stream ID, last and acknowledged sequence) over
//     a persistent Backlog. A generation layer decides before Run whether to
//     resync.
//   - [Stream.Resync] sends a list of ranges (dirty chunks, in disk order)
//     through the ordered stream, the target inconsistent meanwhile;
//     [Stream.Mirror] (full or diff) and [Stream.Verify] are the other passes.
package repl
