// Package ebpf is the folder of doppel's kernel-side failure detection. The
// code lives in the sub-package heartbeat (github.com/doppelha/doppel/ebpf/heartbeat,
// a name that does not shadow github.com/cilium/ebpf): the authenticated
// heartbeat format, the XDP probe (probe.c, its generated bindings and
// object), its loader and map reader, the userspace fallback and the
// heartbeat sender. This package holds no code.
package ebpf
