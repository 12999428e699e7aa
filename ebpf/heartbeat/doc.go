// Package heartbeat is doppel's failure-detection probe: the authenticated
// heartbeat (version 2: job, sender incarnation, sequence, epoch and a
// SipHash-2-4 MAC under a per-job, per-direction key), the heartbeat
// sender, the XDP program that verifies and timestamps heartbeats in the
// kernel (probe.c, bpf2go bindings), its loader and map reader, and a
// userspace fallback that counts with the same rules. It reports liveness
// facts per (peer address, job); policy lives in daemon/monitor.
package heartbeat
