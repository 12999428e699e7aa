// Package bench holds doppel's reproducible benchmarks against peer
// implementations (fio's nbd engine, nbdkit, qemu-nbd, nbdcopy, go-nbd).
// Results, with the command and machine, are recorded in RESULTS.md.
package bench
