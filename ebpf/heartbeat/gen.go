package heartbeat

// The XDP object is rebuilt by `make generate`, which pins the compiler
// (BPF2GO_CC=clang-14, BPF2GO_STRIP=llvm-strip-14); `make check-generate`
// fails when the committed files differ from a fresh build.
//go:generate go tool bpf2go -tags linux -type peer_key -type peer_config -type peer_stats probe probe.c -- -O2 -g -Wall -Werror
