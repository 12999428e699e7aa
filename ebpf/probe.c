//go:build ignore

// probe.c is doppel's XDP heartbeat probe (compiled by bpf2go, see gen.go).
//
// For every frame it parses Ethernet, up to two VLAN tags (802.1Q/802.1ad),
// IPv4 (honouring IHL, skipping fragments) or IPv6 (fixed header only: a
// packet with extension headers is not matched), then UDP/TCP ports. It
// records, per configured peer address:
//   - a doppel heartbeat (UDP to hb_port, magic+version ok, token equal to the
//     peer's configured token): last-heartbeat time (bpf_ktime_get_ns, i.e.
//     CLOCK_MONOTONIC), count, highest sequence, sequence gaps;
//   - the same with a wrong token: only bad_token++ (never liveness);
//   - any UDP/TCP packet to or from repl_port: last-replication time, count.
// The verdict is always XDP_PASS: the probe observes, it never filters.
//
// The file is self-contained (no kernel or libbpf headers) so that the
// generated object depends only on the pinned clang version.

typedef unsigned char __u8;
typedef unsigned short __u16;
typedef unsigned int __u32;
typedef unsigned long long __u64;

#define SEC(name) __attribute__((section(name), used))
#define __uint(name, val) int(*name)[val]
#define __type(name, val) typeof(val) *name

#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define be16(x) __builtin_bswap16(x)
#define be32(x) __builtin_bswap32(x)
#define be64(x) __builtin_bswap64(x)
#else
#define be32(x) (x)
#define be16(x) (x)
#define be64(x) (x)
#endif

enum { XDP_PASS = 2 };
enum { BPF_MAP_TYPE_HASH = 1 };

struct xdp_md {
	__u32 data;
	__u32 data_end;
	__u32 data_meta;
	__u32 ingress_ifindex;
	__u32 rx_queue_index;
	__u32 egress_ifindex;
};

static void *(*bpf_map_lookup_elem)(void *map, const void *key) = (void *)1;
static __u64 (*bpf_ktime_get_ns)(void) = (void *)5;

// Ports, host byte order; set by the loader before the program is loaded.
volatile const __u16 hb_port = 6326;
volatile const __u16 repl_port = 6325;

// Heartbeat wire format (heartbeat.go), all integers big-endian.
#define HB_MAGIC 0x44504842 // "DPHB"
#define HB_VERSION 1
#define HB_LEN 48
#define HB_OFF_TOKEN 8
#define HB_OFF_SEQ 16

// peer_key is a peer address; IPv4 as IPv4-mapped IPv6 (::ffff:a.b.c.d).
struct peer_key {
	__u8 addr[16];
};

// peer_config is written by userspace. token holds the 8 wire bytes of
// the expected token (compared as raw memory).
struct peer_config {
	__u64 token;
};

// peer_stats is written by this program only (userspace creates it zeroed).
struct peer_stats {
	__u64 last_heartbeat_ns;
	__u64 heartbeats;
	__u64 last_seq;
	__u64 gaps;
	__u64 last_repl_ns;
	__u64 repl_packets;
	__u64 bad_token;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 64);
	__type(key, struct peer_key);
	__type(value, struct peer_config);
} peers SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 64);
	__type(key, struct peer_key);
	__type(value, struct peer_stats);
} stats SEC(".maps");

SEC("xdp")
int doppel_probe(struct xdp_md *ctx)
{
	__u8 *p = (__u8 *)(long)ctx->data;
	__u8 *end = (__u8 *)(long)ctx->data_end;
	struct peer_key key = {};
	__u16 proto, sport, dport;
	__u8 l4;

	if (p + 14 > end)
		return XDP_PASS;
	proto = *(__u16 *)(p + 12);
	p += 14;

#pragma unroll
	for (int i = 0; i < 2; i++) {
		if (proto != be16(0x8100) && proto != be16(0x88A8))
			break;
		if (p + 4 > end)
			return XDP_PASS;
		proto = *(__u16 *)(p + 2);
		p += 4;
	}

	if (proto == be16(0x0800)) {
		__u32 ihl;

		if (p + 20 > end)
			return XDP_PASS;
		if ((p[0] >> 4) != 4)
			return XDP_PASS;
		ihl = (p[0] & 0x0f) * 4;
		if (ihl < 20)
			return XDP_PASS;
		if (*(__u16 *)(p + 6) & be16(0x3fff)) // MF set or fragment offset
			return XDP_PASS;
		l4 = p[9];
		key.addr[10] = 0xff;
		key.addr[11] = 0xff;
		__builtin_memcpy(&key.addr[12], p + 12, 4);
		p += ihl;
	} else if (proto == be16(0x86DD)) {
		if (p + 40 > end)
			return XDP_PASS;
		if ((p[0] >> 4) != 6)
			return XDP_PASS;
		l4 = p[6];
		__builtin_memcpy(key.addr, p + 8, 16);
		p += 40;
	} else {
		return XDP_PASS;
	}

	if (l4 != 17 && l4 != 6) // UDP, TCP
		return XDP_PASS;
	if (p + 4 > end)
		return XDP_PASS;
	sport = be16(*(__u16 *)p);
	dport = be16(*(__u16 *)(p + 2));

	if (l4 == 17 && dport == hb_port) {
		__u8 *hb = p + 8;
		struct peer_config *cfg;
		struct peer_stats *st;
		__u32 magic;
		__u64 token, seq;

		if (hb + HB_LEN > end)
			return XDP_PASS;
		__builtin_memcpy(&magic, hb, 4);
		if (magic != be32(HB_MAGIC) || hb[4] != HB_VERSION || hb[5] != 0)
			return XDP_PASS;
		// Same strictness as Heartbeat.UnmarshalBinary: exact length.
		if (*(__u16 *)(hb + 6) != be16(HB_LEN) || *(__u16 *)(p + 4) != be16(8 + HB_LEN))
			return XDP_PASS;
		cfg = bpf_map_lookup_elem(&peers, &key);
		if (!cfg)
			return XDP_PASS;
		st = bpf_map_lookup_elem(&stats, &key);
		if (!st)
			return XDP_PASS;
		__builtin_memcpy(&token, hb + HB_OFF_TOKEN, 8);
		if (token != cfg->token) {
			__sync_fetch_and_add(&st->bad_token, 1);
			return XDP_PASS;
		}
		__builtin_memcpy(&seq, hb + HB_OFF_SEQ, 8);
		seq = be64(seq);
		// Heartbeats of one peer arrive one interval apart, so the
		// read-modify-write of last_seq/gaps below does not race in
		// practice; the counters are atomic regardless.
		if (st->heartbeats > 0 && seq > st->last_seq + 1)
			__sync_fetch_and_add(&st->gaps, seq - st->last_seq - 1);
		if (st->heartbeats == 0 || seq > st->last_seq)
			st->last_seq = seq;
		st->last_heartbeat_ns = bpf_ktime_get_ns();
		__sync_fetch_and_add(&st->heartbeats, 1);
		return XDP_PASS;
	}

	if (repl_port != 0 && (dport == repl_port || sport == repl_port)) {
		struct peer_stats *st;

		if (!bpf_map_lookup_elem(&peers, &key))
			return XDP_PASS;
		st = bpf_map_lookup_elem(&stats, &key);
		if (!st)
			return XDP_PASS;
		st->last_repl_ns = bpf_ktime_get_ns();
		__sync_fetch_and_add(&st->repl_packets, 1);
	}
	return XDP_PASS;
}

char __license[] SEC("license") = "Dual MIT/GPL";
