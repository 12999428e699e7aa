//go:build ignore

// probe.c is doppel's XDP heartbeat probe (compiled by bpf2go, see gen.go).
//
// For every frame it parses Ethernet, up to two VLAN tags (802.1Q/802.1ad),
// IPv4 (honouring IHL, skipping fragments) or IPv6 (fixed header only: a
// packet with extension headers is not matched), then UDP. A datagram to
// hb_port that is a well-formed version 2 heartbeat (packet.go) is looked
// up by (source address, job ID): only an entry userspace created counts,
// so a flood from unknown senders evicts and changes nothing. For a known
// entry it verifies the MAC (SipHash-2-4 under that entry's key) and counts
// the heartbeat only if its (incarnation, sequence) is above the last one
// counted: last-heartbeat time (bpf_ktime_get_ns, i.e. CLOCK_MONOTONIC),
// count, incarnation, sequence, the sender's epoch, sequence gaps. A bad
// MAC counts in bad_mac, an old (incarnation, sequence) in replays; neither
// is ever liveness. The verdict is always XDP_PASS: the probe observes, it
// never filters.
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
#define __always_inline inline __attribute__((always_inline))

#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define be16(x) __builtin_bswap16(x)
#define be32(x) __builtin_bswap32(x)
#define be64(x) __builtin_bswap64(x)
#define le64(x) (x)
#else
#define be16(x) (x)
#define be32(x) (x)
#define be64(x) (x)
#define le64(x) __builtin_bswap64(x)
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

struct bpf_spin_lock {
	__u32 val;
};

static void *(*bpf_map_lookup_elem)(void *map, const void *key) = (void *)1;
static __u64 (*bpf_ktime_get_ns)(void) = (void *)5;
static long (*bpf_spin_lock)(struct bpf_spin_lock *lock) = (void *)93;
static long (*bpf_spin_unlock)(struct bpf_spin_lock *lock) = (void *)94;

// The heartbeat port, host byte order; set by the loader before loading.
volatile const __u16 hb_port = 6326;

// Heartbeat wire format, version 2 (packet.go): integers big-endian.
#define HB_MAGIC 0x44504842 // "DPHB"
#define HB_VERSION 2
#define HB_LEN 56
#define HB_OFF_JOB 8
#define HB_OFF_INC 24
#define HB_OFF_SEQ 32
#define HB_OFF_EPOCH 40
#define HB_OFF_MAC 48 // SipHash-2-4 of bytes 0..47

// peer_key is a watched (peer address, job): IPv4 as IPv4-mapped IPv6
// (::ffff:a.b.c.d).
struct peer_key {
	__u8 addr[16];
	__u8 job[16];
};

// peer_config is written by userspace: the SipHash key of the peer's
// direction of the job, as its two little-endian 64-bit halves.
struct peer_config {
	__u64 k0;
	__u64 k1;
};

// peer_stats is created zeroed by userspace and written by this program
// only. The fields under lock change together (userspace reads them with
// BPF_F_LOCK); bad_mac is an atomic counter of its own.
struct peer_stats {
	struct bpf_spin_lock lock;
	__u64 last_ns;
	__u64 heartbeats;
	__u64 incarnation;
	__u64 seq;
	__u64 epoch;
	__u64 gaps;
	__u64 replays;
	__u64 bad_mac;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, struct peer_key);
	__type(value, struct peer_config);
} keys SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, struct peer_key);
	__type(value, struct peer_stats);
} stats SEC(".maps");

#define ROTL(x, b) (__u64)(((x) << (b)) | ((x) >> (64 - (b))))

#define SIPROUND                       \
	do {                           \
		v0 += v1;              \
		v1 = ROTL(v1, 13);     \
		v1 ^= v0;              \
		v0 = ROTL(v0, 32);     \
		v2 += v3;              \
		v3 = ROTL(v3, 16);     \
		v3 ^= v2;              \
		v0 += v3;              \
		v3 = ROTL(v3, 21);     \
		v3 ^= v0;              \
		v2 += v1;              \
		v1 = ROTL(v1, 17);     \
		v1 ^= v2;              \
		v2 = ROTL(v2, 32);     \
	} while (0)

#define SIPBLOCK(m)          \
	do {                 \
		v3 ^= (m);   \
		SIPROUND;    \
		SIPROUND;    \
		v0 ^= (m);   \
	} while (0)

// siphash48 is SipHash-2-4 of the 48 bytes at p (six little-endian words,
// then the length block) under (k0, k1): straight-line code, no loop for
// the verifier to bound.
static __always_inline __u64 siphash48(__u64 k0, __u64 k1, const __u8 *p)
{
	__u64 v0 = k0 ^ 0x736f6d6570736575ULL;
	__u64 v1 = k1 ^ 0x646f72616e646f6dULL;
	__u64 v2 = k0 ^ 0x6c7967656e657261ULL;
	__u64 v3 = k1 ^ 0x7465646279746573ULL;
	__u64 m;

#pragma unroll
	for (int i = 0; i < 6; i++) {
		__builtin_memcpy(&m, p + 8 * i, 8);
		m = le64(m);
		SIPBLOCK(m);
	}
	SIPBLOCK((__u64)48 << 56);
	v2 ^= 0xff;
	SIPROUND;
	SIPROUND;
	SIPROUND;
	SIPROUND;
	return v0 ^ v1 ^ v2 ^ v3;
}

SEC("xdp")
int doppel_probe(struct xdp_md *ctx)
{
	__u8 *p = (__u8 *)(long)ctx->data;
	__u8 *end = (__u8 *)(long)ctx->data_end;
	struct peer_key key = {};
	struct peer_config *cfg;
	struct peer_stats *st;
	__u64 k0, k1, mac, wire_mac, inc, seq, epoch, now;
	__u32 magic;
	__u16 proto;
	__u8 *hb;

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
		if (p[9] != 17) // UDP
			return XDP_PASS;
		key.addr[10] = 0xff;
		key.addr[11] = 0xff;
		__builtin_memcpy(&key.addr[12], p + 12, 4);
		p += ihl;
	} else if (proto == be16(0x86DD)) {
		if (p + 40 > end)
			return XDP_PASS;
		if ((p[0] >> 4) != 6)
			return XDP_PASS;
		if (p[6] != 17) // UDP, no extension header
			return XDP_PASS;
		__builtin_memcpy(key.addr, p + 8, 16);
		p += 40;
	} else {
		return XDP_PASS;
	}

	if (p + 8 > end)
		return XDP_PASS;
	if (be16(*(__u16 *)(p + 2)) != hb_port)
		return XDP_PASS;
	hb = p + 8;
	if (hb + HB_LEN > end)
		return XDP_PASS;
	// Same strictness as Packet.UnmarshalBinary: exact length, flags 0.
	__builtin_memcpy(&magic, hb, 4);
	if (magic != be32(HB_MAGIC) || hb[4] != HB_VERSION || hb[5] != 0)
		return XDP_PASS;
	if (*(__u16 *)(hb + 6) != be16(HB_LEN) || *(__u16 *)(p + 4) != be16(8 + HB_LEN))
		return XDP_PASS;

	__builtin_memcpy(key.job, hb + HB_OFF_JOB, 16);
	cfg = bpf_map_lookup_elem(&keys, &key);
	if (!cfg)
		return XDP_PASS;
	st = bpf_map_lookup_elem(&stats, &key);
	if (!st)
		return XDP_PASS;
	k0 = cfg->k0;
	k1 = cfg->k1;
	mac = siphash48(k0, k1, hb);
	__builtin_memcpy(&wire_mac, hb + HB_OFF_MAC, 8);
	if (mac != le64(wire_mac)) {
		__sync_fetch_and_add(&st->bad_mac, 1);
		return XDP_PASS;
	}
	__builtin_memcpy(&inc, hb + HB_OFF_INC, 8);
	__builtin_memcpy(&seq, hb + HB_OFF_SEQ, 8);
	__builtin_memcpy(&epoch, hb + HB_OFF_EPOCH, 8);
	inc = be64(inc);
	seq = be64(seq);
	epoch = be64(epoch);
	now = bpf_ktime_get_ns(); // no helper call while the lock is held

	bpf_spin_lock(&st->lock);
	if (inc < st->incarnation || (inc == st->incarnation && seq <= st->seq)) {
		st->replays++;
	} else {
		if (inc == st->incarnation && st->heartbeats > 0 && seq > st->seq + 1)
			st->gaps += seq - st->seq - 1;
		st->incarnation = inc;
		st->seq = seq;
		st->epoch = epoch;
		st->last_ns = now;
		st->heartbeats++;
	}
	bpf_spin_unlock(&st->lock);
	return XDP_PASS;
}

char __license[] SEC("license") = "Dual MIT/GPL";
