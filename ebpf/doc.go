// Package ebpf is doppel's failure-detection probe: an XDP program that
// timestamps heartbeats from the peer in a BPF map, its loader and map
// reader, and a userspace fallback. It reports liveness facts; policy lives
// in daemon.
package ebpf
