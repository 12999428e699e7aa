// Package test is the folder of doppel's tests that span hosts; it holds
// no code. Every tier is plain go test (docs/testing.md):
//
//   - Unit (every package, no root; go test -short ./... runs only what
//     needs nothing): codecs and their fuzz seeds (test/fuzz.sh fuzzes each
//     target beyond them), bitmap, queues, generations, the state machine
//     (daemon/ha transcripts, fake time), the NBD server against an
//     in-process client, two real agents in one process (daemon/agent).
//   - Integration (root; skipped with the reason without it): real NBD
//     clients (nbdinfo, qemu-io, nbdcopy, fio), file systems through
//     nbdfuse and a loop device, XDP and IP takeover in network namespaces,
//     agent processes killed and restarted (cmd/doppel), the demo
//     (test/demo: protect, partition, fail over, fence, reverse, fail back
//     in a two-host lab with a 3-member etcd arbiter).
//   - VM (root and qemu; test/vm): stock Debian kernels under qemu with a
//     static doppel, for the real /dev/nbdN, XDP and IP takeover between
//     two guests.
package test
