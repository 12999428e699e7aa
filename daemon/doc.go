// Package daemon is the doppel agent: control API, job store, replication
// (source stream, target applier, bitmap, mirror, verify) and the failover
// state machine. It reaches the kernel only through netident and ebpf.
package daemon
