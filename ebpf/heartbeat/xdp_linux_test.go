package heartbeat

import (
	"encoding/binary"
	"net/netip"
	"os"
	"testing"
	"time"

	"github.com/cilium/ebpf"
)

const xdpPass = 2

// Frame builders: just enough of each header for the probe (no checksums).

func ethFrame(proto uint16, vlans []uint16, payload []byte) []byte {
	b := []byte{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11}
	for _, tpid := range vlans {
		b = binary.BigEndian.AppendUint16(b, tpid)
		b = binary.BigEndian.AppendUint16(b, 42) // TCI
	}
	b = binary.BigEndian.AppendUint16(b, proto)
	return append(b, payload...)
}

func ipv4Packet(src, dst netip.Addr, proto byte, optWords int, flagsFrag uint16, payload []byte) []byte {
	ihl := 5 + optWords
	b := make([]byte, ihl*4)
	b[0] = 0x40 | byte(ihl)
	binary.BigEndian.PutUint16(b[2:], uint16(len(b)+len(payload)))
	binary.BigEndian.PutUint16(b[6:], flagsFrag)
	b[8] = 64
	b[9] = proto
	copy(b[12:], src.AsSlice())
	copy(b[16:], dst.AsSlice())
	for i := 20; i < len(b); i++ {
		b[i] = 1 // NOP options
	}
	return append(b, payload...)
}

func ipv6Packet(src, dst netip.Addr, next byte, payload []byte) []byte {
	b := make([]byte, 40)
	b[0] = 0x60
	binary.BigEndian.PutUint16(b[4:], uint16(len(payload)))
	b[6] = next
	b[7] = 64
	copy(b[8:], src.AsSlice())
	copy(b[24:], dst.AsSlice())
	return append(b, payload...)
}

func udpDatagram(sport, dport uint16, payload []byte) []byte {
	b := binary.BigEndian.AppendUint16(nil, sport)
	b = binary.BigEndian.AppendUint16(b, dport)
	b = binary.BigEndian.AppendUint16(b, uint16(8+len(payload)))
	b = append(b, 0, 0)
	return append(b, payload...)
}

// frameOf is h as the probe sees it: Ethernet, IPv4 or IPv6 (by h.src),
// UDP to the heartbeat port.
func frameOf(t testing.TB, h vecHB) []byte {
	u := udpDatagram(40000, Port, h.bytes(t))
	if h.src.Is4() {
		return ethFrame(0x0800, nil, ipv4Packet(h.src, local4, 17, 0, 0, u))
	}
	return ethFrame(0x86DD, nil, ipv6Packet(h.src, local6, 17, u))
}

func needBPF(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: loads a BPF program")
	}
}

// runFrames loads a fresh probe watching vecWatched, runs the frames
// through the program (each must pass) and returns every stats entry.
func runFrames(t *testing.T, frames ...[]byte) (got map[Peer]Stats, before, after time.Duration) {
	t.Helper()
	p, err := loadXDP(Config{Port: Port})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	for pr, k := range vecWatched(t) {
		if err := p.Watch(pr, k); err != nil {
			t.Fatal(err)
		}
	}
	before = Now()
	for i, f := range frames {
		ret, err := p.objs.DoppelProbe.Run(&ebpf.RunOptions{Data: f})
		if err != nil {
			t.Fatalf("frame %d (%d bytes): %v", i, len(f), err)
		}
		if ret != xdpPass {
			t.Fatalf("frame %d: verdict %d, want XDP_PASS", i, ret)
		}
	}
	after = Now()
	got = map[Peer]Stats{}
	var k probePeerKey
	var v probePeerStats
	it := p.objs.Stats.Iterate()
	for it.Next(&k, &v) {
		pr := Peer{Addr: netip.AddrFrom16(k.Addr).Unmap(), Job: k.Job}
		s, err := p.Stats(pr) // the locked read userspace uses
		if err != nil {
			t.Fatal(err)
		}
		got[pr] = s
	}
	if err := it.Err(); err != nil {
		t.Fatal(err)
	}
	if len(got) != len(vecWatched(t)) {
		t.Fatalf("%d stats entries, want the %d watched: the program created or deleted entries", len(got), len(vecWatched(t)))
	}
	return got, before, after
}

// TestXDPVectors runs the shared vectors through the XDP program.
func TestXDPVectors(t *testing.T) {
	needBPF(t)
	for _, v := range vectors {
		t.Run(v.name, func(t *testing.T) {
			var frames [][]byte
			for _, h := range v.hbs {
				frames = append(frames, frameOf(t, h))
			}
			got, before, after := runFrames(t, frames...)
			checkVector(t, v, got, before, after)
		})
	}
}

// TestXDPParsing: heartbeats in every encapsulation the probe parses
// count; those it must not parse change nothing.
func TestXDPParsing(t *testing.T) {
	needBPF(t)
	one := map[string]Stats{"192.0.2.1/web": {Heartbeats: 1, Incarnation: 100, Seq: 1, Epoch: 3}}
	one6 := map[string]Stats{"2001:db8::1/web": {Heartbeats: 1, Incarnation: 100, Seq: 1, Epoch: 3}}
	h4, h6 := hb(peer4, "web", 100, 1, 3), hb(peer6, "web", 100, 1, 3)
	p4, p6 := h4.bytes(t), h6.bytes(t)
	udp := func(dport uint16, b []byte) []byte { return udpDatagram(40000, dport, b) }
	for _, tc := range []struct {
		name  string
		frame []byte
		want  map[string]Stats
	}{
		{"ipv4 options", ethFrame(0x0800, nil, ipv4Packet(peer4, local4, 17, 3, 0, udp(Port, p4))), one},
		{"802.1Q", ethFrame(0x0800, []uint16{0x8100}, ipv4Packet(peer4, local4, 17, 0, 0, udp(Port, p4))), one},
		{"802.1ad+802.1Q ipv6", ethFrame(0x86DD, []uint16{0x88A8, 0x8100}, ipv6Packet(peer6, local6, 17, udp(Port, p6))), one6},
		{"v4-mapped source is the v4 peer", ethFrame(0x86DD, nil, ipv6Packet(netip.MustParseAddr("::ffff:192.0.2.1"), local6, 17, udp(Port, p4))), one},
		{"three tags not parsed", ethFrame(0x0800, []uint16{0x88A8, 0x8100, 0x8100}, ipv4Packet(peer4, local4, 17, 0, 0, udp(Port, p4))), nil},
		{"wrong port", ethFrame(0x0800, nil, ipv4Packet(peer4, local4, 17, 0, 0, udp(Port+1, p4))), nil},
		{"replication port", ethFrame(0x0800, nil, ipv4Packet(peer4, local4, 17, 0, 0, udp(6325, p4))), nil},
		{"heartbeat over tcp", ethFrame(0x0800, nil, ipv4Packet(peer4, local4, 6, 0, 0, udp(Port, p4))), nil},
		{"trailing byte", ethFrame(0x0800, nil, ipv4Packet(peer4, local4, 17, 0, 0, udp(Port, append(p4, 0)))), nil},
		{"ipv4 fragment", ethFrame(0x0800, nil, ipv4Packet(peer4, local4, 17, 0, 0x2000, udp(Port, p4))), nil},
		{"ipv6 extension header", ethFrame(0x86DD, nil, ipv6Packet(peer6, local6, 0, udp(Port, p6))), nil},
		{"ip version mismatch", ethFrame(0x86DD, nil, ipv4Packet(peer4, local4, 17, 0, 0, append(make([]byte, 20), udp(Port, p4)...))), nil},
		{"arp", ethFrame(0x0806, nil, make([]byte, 28)), nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, before, after := runFrames(t, tc.frame)
			checkVector(t, vector{name: tc.name, want: tc.want}, got, before, after)
		})
	}
}

// TestXDPTruncated runs every prefix of valid frames (from the 14-byte
// minimum Program.Run accepts): each cut at any layer must pass untouched.
func TestXDPTruncated(t *testing.T) {
	needBPF(t)
	h := hb(peer4, "web", 100, 1, 3)
	for name, f := range map[string][]byte{
		"ipv4":      frameOf(t, h),
		"ipv6":      frameOf(t, hb(peer6, "web", 100, 1, 3)),
		"qinq ipv4": ethFrame(0x0800, []uint16{0x88A8, 0x8100}, ipv4Packet(peer4, local4, 17, 2, 0, udpDatagram(1, Port, h.bytes(t)))),
	} {
		got, _, _ := runFrames(t, f)
		if n := countAll(got); n != 1 {
			t.Fatalf("%s: the whole frame counted %d heartbeats", name, n)
		}
		var frames [][]byte
		for n := 14; n < len(f); n++ {
			frames = append(frames, f[:n])
		}
		got, before, after := runFrames(t, frames...)
		checkVector(t, vector{name: name + " truncated"}, got, before, after)
	}
}

func countAll(m map[Peer]Stats) (n uint64) {
	for _, s := range m {
		n += s.Heartbeats
	}
	return n
}

// TestXDPUnknownSendersEvictNothing: a flood of valid-looking heartbeats
// from many unknown addresses and jobs leaves the maps exactly as they
// were (only userspace creates entries), and the watched peer still
// counts afterwards.
func TestXDPUnknownSendersEvictNothing(t *testing.T) {
	needBPF(t)
	var frames [][]byte
	for i := range 2000 {
		src := netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)})
		frames = append(frames, frameOf(t, vecHB{src: src, job: "web", inc: 1, seq: uint64(i + 1)}))
		frames = append(frames, frameOf(t, vecHB{src: peer4, job: "job" + string(rune('a'+i%26)) + string(rune('a'+i/26%26)), inc: 1, seq: 1}))
	}
	frames = append(frames, frameOf(t, hb(peer4, "web", 100, 1, 3)))
	got, before, after := runFrames(t, frames...)
	checkVector(t, vector{name: "flood", want: map[string]Stats{"192.0.2.1/web": {Heartbeats: 1, Incarnation: 100, Seq: 1, Epoch: 3}}}, got, before, after)
}

// TestXDPProgramSize reports the loaded program's instruction count (the
// verifier accepted it if this runs).
func TestXDPProgramSize(t *testing.T) {
	needBPF(t)
	p, err := loadXDP(Config{Port: Port})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	info, err := p.objs.DoppelProbe.Info()
	if err != nil {
		t.Fatal(err)
	}
	insns, err := info.Instructions()
	if err != nil {
		t.Skipf("instructions not readable: %v", err)
	}
	vi, _ := info.VerifiedInstructions()
	t.Logf("XDP probe: %d instructions loaded, %d verified instructions processed", len(insns), vi)
}

// BenchmarkXDPHeartbeat is the XDP program's cost per heartbeat (parse,
// map lookups, SipHash-2-4, the locked update), measured by the kernel
// over repeated runs of one frame (the first counts, the rest are
// replays: the same work).
func BenchmarkXDPHeartbeat(b *testing.B) {
	if os.Geteuid() != 0 {
		b.Skip("needs root: loads a BPF program")
	}
	p, err := loadXDP(Config{Port: Port})
	if err != nil {
		b.Fatal(err)
	}
	defer p.Close()
	for pr, k := range vecWatched(b) {
		if err := p.Watch(pr, k); err != nil {
			b.Fatal(err)
		}
	}
	frame := frameOf(b, hb(peer4, "web", 100, 1, 3))
	b.ResetTimer()
	ret, d, err := p.objs.DoppelProbe.Benchmark(frame, b.N, nil)
	if err != nil {
		b.Fatal(err)
	}
	if ret != xdpPass {
		b.Fatalf("verdict %d", ret)
	}
	b.ReportMetric(float64(d.Nanoseconds()), "ns/heartbeat")
}
