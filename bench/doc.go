// Package bench holds doppel's reproducible benchmarks against peer
// implementations (fio's nbd engine, nbdkit, qemu-nbd, QEMU's block mirror in
// qemu-storage-daemon, nbdcopy, go-nbd) and
// the code that runs them: fio invocation and JSON parsing, server process
// management, network-namespace links, Prometheus scraping, medians and the
// Markdown sections of RESULTS.md.
//
// The harnesses are commands, not tests, so that no timing is asserted under
// `go test ./...`:
//
//	make bench-nbd   # go run ./bench/cmd/nbdbench: doppel vs nbdkit, qemu-nbd, go-nbd
//	make bench-repl  # go run ./bench/cmd/replbench: doppel async/sync vs QEMU's mirror, the two-copy limit, unreplicated; mirror vs nbdcopy (root)
//
// Both take -short for a quick check of the harness itself. Results, with the
// command and the machine, are recorded in RESULTS.md; CPU profiles of doppel
// taken during the runs are left in bench/profiles/.
package bench
