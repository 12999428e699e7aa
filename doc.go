// Package doppel is the module root; it holds only repository-wide tests.
// The product is in cmd/doppel, blockdev, daemon, netident and ebpf.
package doppel
