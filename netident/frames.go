package netident

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"

	"github.com/mdlayher/ethernet"
	"github.com/mdlayher/ndp"
)

// Link-layer frames netident sends and reads on packet sockets: ARP for
// IPv4, ICMPv6 neighbour discovery for IPv6 (built down to the Ethernet
// header, so a duplicate-address probe can come from ::, which an ICMPv6
// socket cannot send).

const (
	ipv6HeaderLen = 40
	protoICMPv6   = 58
	ndpHopLimit   = 255
	etherTypeIPv6 = 0x86dd
	etherTypeARP  = 0x0806
)

var (
	allNodes    = netip.MustParseAddr("ff02::1")
	zeroMAC     = net.HardwareAddr{0, 0, 0, 0, 0, 0}
	errNotFrame = errors.New("not a frame of interest")
)

// multicastMAC is the Ethernet address of IPv6 multicast group g (RFC 2464).
func multicastMAC(g netip.Addr) net.HardwareAddr {
	b := g.As16()
	return net.HardwareAddr{0x33, 0x33, b[12], b[13], b[14], b[15]}
}

// ARP operations.
const (
	arpRequest = 1
	arpReply   = 2
	arpLen     = 28 // Ethernet/IPv4 ARP packet
)

// arpPacket is an ARP packet for IPv4 over Ethernet (RFC 826).
type arpPacket struct {
	Op       uint16
	SHA, THA net.HardwareAddr // sender and target hardware addresses
	SPA, TPA netip.Addr       // sender and target IPv4 addresses
}

// frame builds the Ethernet frame to ethDst carrying p, from p.SHA.
func (p arpPacket) frame(ethDst net.HardwareAddr) ([]byte, error) {
	if len(p.SHA) != 6 || len(p.THA) != 6 || len(ethDst) != 6 {
		return nil, fmt.Errorf("arp: hardware addresses must be 6 bytes")
	}
	if !p.SPA.Is4() || !p.TPA.Is4() {
		return nil, fmt.Errorf("arp: protocol addresses must be IPv4")
	}
	b := make([]byte, arpLen)
	binary.BigEndian.PutUint16(b[0:], 1) // Ethernet
	binary.BigEndian.PutUint16(b[2:], uint16(ethernet.EtherTypeIPv4))
	b[4], b[5] = 6, 4
	binary.BigEndian.PutUint16(b[6:], p.Op)
	copy(b[8:], p.SHA)
	spa, tpa := p.SPA.As4(), p.TPA.As4()
	copy(b[14:], spa[:])
	copy(b[18:], p.THA)
	copy(b[24:], tpa[:])
	f := &ethernet.Frame{Destination: ethDst, Source: p.SHA, EtherType: ethernet.EtherTypeARP, Payload: b}
	return f.MarshalBinary()
}

// garpFrames returns the gratuitous ARP request and reply announcing that
// mac holds addr. The reply's target hardware address is mac itself: Linux
// takes a reply as gratuitous (overriding a fresh neighbour entry) only then.
func garpFrames(mac net.HardwareAddr, addr netip.Addr) ([2][]byte, error) {
	var out [2][]byte
	var err error
	req := arpPacket{Op: arpRequest, SHA: mac, SPA: addr, THA: zeroMAC, TPA: addr}
	if out[0], err = req.frame(ethernet.Broadcast); err != nil {
		return out, err
	}
	rep := arpPacket{Op: arpReply, SHA: mac, SPA: addr, THA: mac, TPA: addr}
	out[1], err = rep.frame(ethernet.Broadcast)
	return out, err
}

// arpProbeFrame is an RFC 5227 ARP probe for addr: sender IP 0.0.0.0.
func arpProbeFrame(mac net.HardwareAddr, addr netip.Addr) ([]byte, error) {
	p := arpPacket{Op: arpRequest, SHA: mac, SPA: netip.IPv4Unspecified(), THA: zeroMAC, TPA: addr}
	return p.frame(ethernet.Broadcast)
}

// parseARPFrame decodes an Ethernet frame (VLAN tags allowed) carrying an
// IPv4-over-Ethernet ARP packet. Trailing padding is ignored.
func parseARPFrame(b []byte) (*ethernet.Frame, arpPacket, error) {
	var f ethernet.Frame
	if err := f.UnmarshalBinary(b); err != nil {
		return nil, arpPacket{}, fmt.Errorf("ethernet: %w", err)
	}
	if f.EtherType != ethernet.EtherTypeARP {
		return nil, arpPacket{}, errNotFrame
	}
	a := f.Payload
	if len(a) < arpLen {
		return nil, arpPacket{}, fmt.Errorf("arp: %d bytes, want %d", len(a), arpLen)
	}
	if binary.BigEndian.Uint16(a[0:]) != 1 || binary.BigEndian.Uint16(a[2:]) != uint16(ethernet.EtherTypeIPv4) || a[4] != 6 || a[5] != 4 {
		return nil, arpPacket{}, errNotFrame
	}
	p := arpPacket{
		Op:  binary.BigEndian.Uint16(a[6:]),
		SHA: net.HardwareAddr(bytes.Clone(a[8:14])),
		SPA: netip.AddrFrom4([4]byte(a[14:18])),
		THA: net.HardwareAddr(bytes.Clone(a[18:24])),
		TPA: netip.AddrFrom4([4]byte(a[24:28])),
	}
	return &f, p, nil
}

// ndpFrame builds an Ethernet frame carrying IPv6 (hop limit 255) and the
// NDP message m with its checksum, from src to dst.
func ndpFrame(ethSrc, ethDst net.HardwareAddr, src, dst netip.Addr, m ndp.Message) ([]byte, error) {
	body, err := ndp.MarshalMessageChecksum(m, src, dst)
	if err != nil {
		return nil, err
	}
	ip := make([]byte, ipv6HeaderLen, ipv6HeaderLen+len(body))
	ip[0] = 6 << 4
	binary.BigEndian.PutUint16(ip[4:], uint16(len(body)))
	ip[6] = protoICMPv6
	ip[7] = ndpHopLimit
	s, d := src.As16(), dst.As16()
	copy(ip[8:], s[:])
	copy(ip[24:], d[:])
	f := &ethernet.Frame{Destination: ethDst, Source: ethSrc, EtherType: ethernet.EtherTypeIPv6, Payload: append(ip, body...)}
	return f.MarshalBinary()
}

// unsolicitedNAFrame announces that mac holds addr: an unsolicited neighbour
// advertisement with Override, from addr to all nodes (RFC 4861 7.2.6).
func unsolicitedNAFrame(mac net.HardwareAddr, addr netip.Addr) ([]byte, error) {
	na := &ndp.NeighborAdvertisement{
		Override:      true,
		TargetAddress: addr,
		Options:       []ndp.Option{&ndp.LinkLayerAddress{Direction: ndp.Target, Addr: mac}},
	}
	return ndpFrame(mac, multicastMAC(allNodes), addr, allNodes, na)
}

// dadProbeFrame is a duplicate-address-detection neighbour solicitation for
// addr (RFC 4862 5.4.2): from ::, to addr's solicited-node group, without a
// source link-layer option. A holder answers to all nodes.
func dadProbeFrame(mac net.HardwareAddr, addr netip.Addr) ([]byte, error) {
	group, err := ndp.SolicitedNodeMulticast(addr)
	if err != nil {
		return nil, err
	}
	ns := &ndp.NeighborSolicitation{TargetAddress: addr}
	return ndpFrame(mac, multicastMAC(group), netip.IPv6Unspecified(), group, ns)
}

// ndpPacket is a decoded NDP frame.
type ndpPacket struct {
	EthSrc   net.HardwareAddr
	Src, Dst netip.Addr
	Msg      ndp.Message
}

// parseNDPFrame decodes an Ethernet frame carrying IPv6 and an NDP message.
// It checks what a receiver must (RFC 4861 7.1.2): hop limit 255, ICMPv6
// code 0, a correct checksum, and no extension headers.
func parseNDPFrame(b []byte) (ndpPacket, error) {
	var f ethernet.Frame
	if err := f.UnmarshalBinary(b); err != nil {
		return ndpPacket{}, fmt.Errorf("ethernet: %w", err)
	}
	if f.EtherType != ethernet.EtherTypeIPv6 {
		return ndpPacket{}, errNotFrame
	}
	ip := f.Payload
	if len(ip) < ipv6HeaderLen || ip[0]>>4 != 6 {
		return ndpPacket{}, fmt.Errorf("ipv6: short or not version 6")
	}
	if ip[6] != protoICMPv6 {
		return ndpPacket{}, errNotFrame
	}
	plen := int(binary.BigEndian.Uint16(ip[4:]))
	if len(ip) < ipv6HeaderLen+plen {
		return ndpPacket{}, fmt.Errorf("ipv6: payload length %d beyond frame", plen)
	}
	if ip[7] != ndpHopLimit {
		return ndpPacket{}, fmt.Errorf("ndp: hop limit %d, want 255", ip[7])
	}
	src := netip.AddrFrom16([16]byte(ip[8:24]))
	dst := netip.AddrFrom16([16]byte(ip[24:40]))
	body := ip[ipv6HeaderLen : ipv6HeaderLen+plen]
	if len(body) < 4 {
		return ndpPacket{}, fmt.Errorf("icmpv6: short")
	}
	if body[1] != 0 {
		return ndpPacket{}, fmt.Errorf("ndp: code %d, want 0", body[1])
	}
	if icmp6Checksum(src, dst, body) != 0 {
		return ndpPacket{}, fmt.Errorf("icmpv6: bad checksum")
	}
	m, err := ndp.ParseMessage(body)
	if err != nil {
		return ndpPacket{}, err
	}
	return ndpPacket{EthSrc: f.Source, Src: src, Dst: dst, Msg: m}, nil
}

// icmp6Checksum returns the ones' complement sum of the IPv6 pseudo-header
// and body folded to 16 bits and complemented: 0 for a body whose checksum
// field is right, the value to store for a body whose field is zero.
func icmp6Checksum(src, dst netip.Addr, body []byte) uint16 {
	var sum uint32
	add := func(b []byte) {
		for len(b) >= 2 {
			sum += uint32(b[0])<<8 | uint32(b[1])
			b = b[2:]
		}
		if len(b) == 1 {
			sum += uint32(b[0]) << 8
		}
	}
	s, d := src.As16(), dst.As16()
	add(s[:])
	add(d[:])
	var l [8]byte
	binary.BigEndian.PutUint32(l[:4], uint32(len(body)))
	l[7] = protoICMPv6
	add(l[:])
	add(body)
	for sum>>16 != 0 {
		sum = sum&0xffff + sum>>16
	}
	return ^uint16(sum)
}

// answerMAC returns the hardware address of the host an NDP packet shows
// holding target: a neighbour advertisement for target (its target
// link-layer option, else its Ethernet source). Other packets: nil.
func (p ndpPacket) answerMAC(target netip.Addr) net.HardwareAddr {
	na, ok := p.Msg.(*ndp.NeighborAdvertisement)
	if !ok || na.TargetAddress != target {
		return nil
	}
	for _, o := range na.Options {
		if lla, ok := o.(*ndp.LinkLayerAddress); ok && lla.Direction == ndp.Target && len(lla.Addr) == 6 {
			return lla.Addr
		}
	}
	return p.EthSrc
}
