package ebpf

import (
	"encoding/binary"
	"fmt"
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

func tcpSegment(sport, dport uint16) []byte {
	b := make([]byte, 20)
	binary.BigEndian.PutUint16(b, sport)
	binary.BigEndian.PutUint16(b[2:], dport)
	b[12] = 5 << 4
	return b
}

func hbBytes(token, seq uint64) []byte {
	b, _ := Heartbeat{Token: token, Seq: seq, Generation: 7}.MarshalBinary()
	return b
}

var (
	peer4  = netip.MustParseAddr("192.0.2.1")
	peer6  = netip.MustParseAddr("2001:db8::1")
	local4 = netip.MustParseAddr("192.0.2.2")
	local6 = netip.MustParseAddr("2001:db8::2")
	other4 = netip.MustParseAddr("192.0.2.99")
)

const tok = 0x1122334455667788

func hb4(src netip.Addr, token, seq uint64) []byte {
	return ethFrame(0x0800, nil, ipv4Packet(src, local4, 17, 0, 0, udpDatagram(40000, HeartbeatPort, hbBytes(token, seq))))
}

func hb6(src netip.Addr, token, seq uint64) []byte {
	return ethFrame(0x86DD, nil, ipv6Packet(src, local6, 17, udpDatagram(40000, HeartbeatPort, hbBytes(token, seq))))
}

func needBPF(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: loads a BPF program")
	}
}

// runFrames loads a fresh probe with peer4 and peer6 configured (token tok),
// runs the frames through the program and returns the stats of every
// entry in the map, with timestamps checked and then zeroed.
func runFrames(t *testing.T, frames ...[]byte) map[netip.Addr]PeerStats {
	t.Helper()
	p, err := loadXDP(Config{HeartbeatPort: HeartbeatPort, ReplicationPort: ReplicationPort})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	for _, a := range []netip.Addr{peer4, peer6} {
		if err := p.SetPeer(a, tok); err != nil {
			t.Fatal(err)
		}
	}
	before := Now()
	for i, f := range frames {
		ret, err := p.objs.DoppelProbe.Run(&ebpf.RunOptions{Data: f})
		if err != nil {
			t.Fatalf("frame %d (%d bytes): %v", i, len(f), err)
		}
		if ret != xdpPass {
			t.Fatalf("frame %d: verdict %d, want XDP_PASS", i, ret)
		}
	}
	after := Now()
	got := map[netip.Addr]PeerStats{}
	var k probePeerKey
	var v probePeerStats
	it := p.objs.Stats.Iterate()
	for it.Next(&k, &v) {
		a := netip.AddrFrom16(k.Addr).Unmap()
		s := PeerStats{Heartbeats: v.Heartbeats, LastSeq: v.LastSeq, Gaps: v.Gaps, ReplicationPackets: v.ReplPackets, BadToken: v.BadToken}
		for name, ts := range map[string]uint64{"heartbeat": v.LastHeartbeatNs, "replication": v.LastReplNs} {
			if ts == 0 {
				continue
			}
			if d := time.Duration(ts); d < before || d > after {
				t.Errorf("%s: last %s time %v outside the run window [%v, %v]", a, name, d, before, after)
			}
		}
		if (v.LastHeartbeatNs != 0) != (v.Heartbeats != 0) || (v.LastReplNs != 0) != (v.ReplPackets != 0) {
			t.Errorf("%s: timestamps and counters disagree: %+v", a, v)
		}
		got[a] = s
	}
	if err := it.Err(); err != nil {
		t.Fatal(err)
	}
	return got
}

func TestXDPProgramRun(t *testing.T) {
	needBPF(t)
	zero := map[netip.Addr]PeerStats{peer4: {}, peer6: {}}
	with := func(a netip.Addr, s PeerStats) map[netip.Addr]PeerStats {
		m := map[netip.Addr]PeerStats{peer4: {}, peer6: {}}
		m[a] = s
		return m
	}
	udp4 := func(src netip.Addr, sport, dport uint16, payload []byte) []byte {
		return ethFrame(0x0800, nil, ipv4Packet(src, local4, 17, 0, 0, udpDatagram(sport, dport, payload)))
	}
	trailing := append(hbBytes(tok, 1), 0)
	v2 := hbBytes(tok, 1)
	v2[4] = 2
	for _, tc := range []struct {
		name   string
		frames [][]byte
		want   map[netip.Addr]PeerStats
	}{
		{"ipv4", [][]byte{hb4(peer4, tok, 1)}, with(peer4, PeerStats{Heartbeats: 1, LastSeq: 1})},
		{"ipv6", [][]byte{hb6(peer6, tok, 9)}, with(peer6, PeerStats{Heartbeats: 1, LastSeq: 9})},
		{"ipv4 options", [][]byte{ethFrame(0x0800, nil, ipv4Packet(peer4, local4, 17, 3, 0, udpDatagram(1, HeartbeatPort, hbBytes(tok, 4))))},
			with(peer4, PeerStats{Heartbeats: 1, LastSeq: 4})},
		{"802.1Q", [][]byte{ethFrame(0x0800, []uint16{0x8100}, ipv4Packet(peer4, local4, 17, 0, 0, udpDatagram(1, HeartbeatPort, hbBytes(tok, 3))))},
			with(peer4, PeerStats{Heartbeats: 1, LastSeq: 3})},
		{"802.1ad+802.1Q ipv6", [][]byte{ethFrame(0x86DD, []uint16{0x88A8, 0x8100}, ipv6Packet(peer6, local6, 17, udpDatagram(1, HeartbeatPort, hbBytes(tok, 3))))},
			with(peer6, PeerStats{Heartbeats: 1, LastSeq: 3})},
		{"three tags not parsed", [][]byte{ethFrame(0x0800, []uint16{0x88A8, 0x8100, 0x8100}, ipv4Packet(peer4, local4, 17, 0, 0, udpDatagram(1, HeartbeatPort, hbBytes(tok, 3))))}, zero},
		{"sequence gaps and reordering", [][]byte{hb4(peer4, tok, 1), hb4(peer4, tok, 2), hb4(peer4, tok, 5), hb4(peer4, tok, 3), hb4(peer4, tok, 6)},
			with(peer4, PeerStats{Heartbeats: 5, LastSeq: 6, Gaps: 2})},
		{"first heartbeat sets the base", [][]byte{hb4(peer4, tok, 100), hb4(peer4, tok, 101)}, with(peer4, PeerStats{Heartbeats: 2, LastSeq: 101})},
		{"wrong token", [][]byte{hb4(peer4, tok+1, 1), hb6(peer6, 0, 1)}, map[netip.Addr]PeerStats{peer4: {BadToken: 1}, peer6: {BadToken: 1}}},
		{"wrong peer", [][]byte{hb4(other4, tok, 1), hb6(netip.MustParseAddr("2001:db8::99"), tok, 1)}, zero},
		{"v4 peer key is not its v6 twin", [][]byte{hb6(netip.MustParseAddr("::ffff:192.0.2.1"), tok, 1)}, with(peer4, PeerStats{Heartbeats: 1, LastSeq: 1})},
		{"wrong port", [][]byte{udp4(peer4, 40000, HeartbeatPort+1, hbBytes(tok, 1))}, zero},
		{"heartbeat over tcp", [][]byte{ethFrame(0x0800, nil, ipv4Packet(peer4, local4, 6, 0, 0, udpDatagram(1, HeartbeatPort, hbBytes(tok, 1))))}, zero},
		{"bad magic", [][]byte{udp4(peer4, 1, HeartbeatPort, append([]byte("XPHB"), hbBytes(tok, 1)[4:]...))}, zero},
		{"version 2", [][]byte{udp4(peer4, 1, HeartbeatPort, v2)}, zero},
		{"trailing byte", [][]byte{udp4(peer4, 1, HeartbeatPort, trailing)}, zero},
		{"ipv4 fragment", [][]byte{ethFrame(0x0800, nil, ipv4Packet(peer4, local4, 17, 0, 0x2000, udpDatagram(1, HeartbeatPort, hbBytes(tok, 1))))}, zero},
		{"ipv6 extension header", [][]byte{ethFrame(0x86DD, nil, ipv6Packet(peer6, local6, 0, udpDatagram(1, HeartbeatPort, hbBytes(tok, 1))))}, zero},
		{"ip version mismatch", [][]byte{ethFrame(0x86DD, nil, ipv4Packet(peer4, local4, 17, 0, 0, append(make([]byte, 20), udpDatagram(1, HeartbeatPort, hbBytes(tok, 1))...)))}, zero},
		{"arp", [][]byte{ethFrame(0x0806, nil, make([]byte, 28))}, zero},
		{"replication tcp to and from the port, udp to it", [][]byte{
			ethFrame(0x0800, nil, ipv4Packet(peer4, local4, 6, 0, 0, tcpSegment(50000, ReplicationPort))),
			ethFrame(0x86DD, nil, ipv6Packet(peer6, local6, 6, tcpSegment(ReplicationPort, 50000))),
			udp4(peer4, 50000, ReplicationPort, nil),
		}, map[netip.Addr]PeerStats{peer4: {ReplicationPackets: 2}, peer6: {ReplicationPackets: 1}}},
		{"replication from an unknown peer", [][]byte{ethFrame(0x0800, nil, ipv4Packet(other4, local4, 6, 0, 0, tcpSegment(50000, ReplicationPort)))}, zero},
		{"other tcp port", [][]byte{ethFrame(0x0800, nil, ipv4Packet(peer4, local4, 6, 0, 0, tcpSegment(50000, 22)))}, zero},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := runFrames(t, tc.frames...)
			if fmt.Sprint(got) != fmt.Sprint(tc.want) {
				t.Errorf("map\n got %v\nwant %v", got, tc.want)
			}
		})
	}
}

// TestXDPTruncated runs every prefix of valid frames (from the 14-byte
// minimum Program.Run accepts): each cut at any layer must pass untouched.
func TestXDPTruncated(t *testing.T) {
	needBPF(t)
	zero := fmt.Sprint(map[netip.Addr]PeerStats{peer4: {}, peer6: {}})
	for name, f := range map[string][]byte{
		"ipv4":      hb4(peer4, tok, 1),
		"ipv6":      hb6(peer6, tok, 1),
		"qinq ipv4": ethFrame(0x0800, []uint16{0x88A8, 0x8100}, ipv4Packet(peer4, local4, 17, 2, 0, udpDatagram(1, HeartbeatPort, hbBytes(tok, 1)))),
		"repl tcp":  ethFrame(0x0800, nil, ipv4Packet(peer4, local4, 6, 0, 0, tcpSegment(1, ReplicationPort)[:4])),
	} {
		if got := fmt.Sprint(runFrames(t, f)); got == zero {
			t.Fatalf("%s: the whole frame did not count: %v", name, got)
		}
		var frames [][]byte
		for n := 14; n < len(f); n++ {
			frames = append(frames, f[:n])
		}
		if got := fmt.Sprint(runFrames(t, frames...)); got != zero {
			t.Errorf("%s: truncated frames changed the map: %v", name, got)
		}
	}
}
