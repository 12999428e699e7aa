// Package test holds doppel's multi-host integration tests: the
// network-namespace lab, end-to-end scenarios, fault and crash-consistency
// torture, and the qemu VM tier (test/vm).
package test
