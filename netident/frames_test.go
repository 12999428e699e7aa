package netident

import (
	"bytes"
	"encoding/binary"
	"net"
	"net/netip"
	"testing"

	"github.com/mdlayher/ethernet"
	"github.com/mdlayher/ndp"
)

var frameMAC = net.HardwareAddr{0x02, 0xaa, 0xbb, 0xcc, 0xdd, 0xee}

func TestGARPFrames(t *testing.T) {
	fs, err := garpFrames(frameMAC, v4.Addr())
	if err != nil {
		t.Fatal(err)
	}
	for i, want := range []arpPacket{
		{Op: arpRequest, SHA: frameMAC, SPA: v4.Addr(), THA: zeroMAC, TPA: v4.Addr()},
		{Op: arpReply, SHA: frameMAC, SPA: v4.Addr(), THA: frameMAC, TPA: v4.Addr()},
	} {
		f, p, err := parseARPFrame(fs[i])
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(f.Destination, ethernet.Broadcast) || !bytes.Equal(f.Source, frameMAC) {
			t.Fatalf("frame %d: %s → %s", i, f.Source, f.Destination)
		}
		if p.Op != want.Op || !bytes.Equal(p.SHA, want.SHA) || !bytes.Equal(p.THA, want.THA) || p.SPA != want.SPA || p.TPA != want.TPA {
			t.Fatalf("frame %d: %+v, want %+v", i, p, want)
		}
	}
	probe, err := arpProbeFrame(frameMAC, v4.Addr())
	if err != nil {
		t.Fatal(err)
	}
	if _, p, err := parseARPFrame(probe); err != nil || p.SPA != netip.IPv4Unspecified() || p.TPA != v4.Addr() || p.Op != arpRequest {
		t.Fatalf("probe: %+v %v", p, err)
	}
	if _, err := garpFrames(frameMAC, v6.Addr()); err == nil {
		t.Fatal("ARP for an IPv6 address")
	}
}

func TestNDPFrames(t *testing.T) {
	na, err := unsolicitedNAFrame(frameMAC, v6.Addr())
	if err != nil {
		t.Fatal(err)
	}
	p, err := parseNDPFrame(na)
	if err != nil {
		t.Fatal(err)
	}
	m, ok := p.Msg.(*ndp.NeighborAdvertisement)
	if !ok || !m.Override || m.Solicited || m.Router || m.TargetAddress != v6.Addr() || p.Src != v6.Addr() || p.Dst != allNodes {
		t.Fatalf("NA: %+v %+v", p, p.Msg)
	}
	if got := p.answerMAC(v6.Addr()); !bytes.Equal(got, frameMAC) {
		t.Fatalf("NA names %v", got)
	}
	if !bytes.Equal(na[:6], []byte{0x33, 0x33, 0, 0, 0, 1}) {
		t.Fatalf("NA to %x", na[:6])
	}

	ns, err := dadProbeFrame(frameMAC, v6.Addr())
	if err != nil {
		t.Fatal(err)
	}
	p, err = parseNDPFrame(ns)
	if err != nil {
		t.Fatal(err)
	}
	s, ok := p.Msg.(*ndp.NeighborSolicitation)
	group := netip.MustParseAddr("ff02::1:ff00:187")
	if !ok || s.TargetAddress != v6.Addr() || p.Src != netip.IPv6Unspecified() || p.Dst != group || len(s.Options) != 0 {
		t.Fatalf("DAD probe: %+v %+v", p, p.Msg)
	}
	if !bytes.Equal(ns[:6], []byte{0x33, 0x33, 0xff, 0, 0x01, 0x87}) {
		t.Fatalf("DAD probe to %x", ns[:6])
	}
	if p.answerMAC(v6.Addr()) != nil {
		t.Fatal("a solicitation is not an answer")
	}

	// A corrupted checksum or hop limit is refused.
	bad := bytes.Clone(na)
	bad[len(bad)-1] ^= 1
	if _, err := parseNDPFrame(bad); err == nil {
		t.Fatal("bad checksum accepted")
	}
	bad = bytes.Clone(na)
	bad[14+7] = 64
	if _, err := parseNDPFrame(bad); err == nil {
		t.Fatal("hop limit 64 accepted")
	}
}

// FuzzParseARPFrame: never panics; a parsed packet re-encodes to a frame
// that parses to the same packet.
func FuzzParseARPFrame(f *testing.F) {
	fs, _ := garpFrames(frameMAC, v4.Addr())
	probe, _ := arpProbeFrame(frameMAC, v4.Addr())
	f.Add(fs[0])
	f.Add(fs[1])
	f.Add(probe)
	f.Add(probe[:20])
	f.Fuzz(func(t *testing.T, b []byte) {
		_, p, err := parseARPFrame(b)
		if err != nil {
			return
		}
		fr, err := p.frame(ethernet.Broadcast)
		if err != nil {
			t.Fatalf("re-encode %+v: %v", p, err)
		}
		_, q, err := parseARPFrame(fr)
		if err != nil || q.Op != p.Op || !bytes.Equal(q.SHA, p.SHA) || !bytes.Equal(q.THA, p.THA) || q.SPA != p.SPA || q.TPA != p.TPA {
			t.Fatalf("round trip %+v → %+v, %v", p, q, err)
		}
	})
}

// FuzzParseNDPFrame: never panics; whatever parses has hop limit 255 and a
// valid checksum, and answerMAC never panics.
func FuzzParseNDPFrame(f *testing.F) {
	na, _ := unsolicitedNAFrame(frameMAC, v6.Addr())
	ns, _ := dadProbeFrame(frameMAC, v6.Addr())
	f.Add(na)
	f.Add(ns)
	f.Add(na[:30])
	long := bytes.Clone(na)
	binary.BigEndian.PutUint16(long[14+4:], 0xffff)
	f.Add(long)
	f.Fuzz(func(t *testing.T, b []byte) {
		p, err := parseNDPFrame(b)
		if err != nil {
			return
		}
		var fr ethernet.Frame
		if fr.UnmarshalBinary(b) != nil || fr.Payload[7] != ndpHopLimit {
			t.Fatalf("accepted a frame with hop limit != 255")
		}
		_ = p.answerMAC(v6.Addr())
		_ = p.answerMAC(p.Src)
	})
}
