package netident

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"time"
)

// Link is what netident needs to know about one interface.
type Link struct {
	Name  string
	Index int
	MAC   net.HardwareAddr
	MTU   int
	Up    bool // administratively up
	// NoIPv6 is set when IPv6 is disabled on the interface
	// (net.ipv6.conf.IFACE.disable_ipv6=1, or no IPv6 in the kernel).
	NoIPv6 bool
	// NoARP is set for interfaces without neighbour resolution (loopback,
	// NOARP, not Ethernet: tun, WireGuard...): nothing to probe or announce.
	NoARP bool
}

// HostAddr is one address as the kernel holds it on a link.
type HostAddr struct {
	Prefix netip.Prefix
	// Secondary marks an IPv4 address the kernel keeps as a secondary of a
	// primary in the same subnet (ip addr: "secondary").
	Secondary bool
	// Tentative marks an IPv6 address under duplicate address detection
	// (ip addr: "tentative").
	Tentative bool
}

// Kernel is the kernel state netident reads and changes: interfaces,
// addresses and the host name. Implementations: Linux (netlink, sysctl,
// sethostname) and Fake (in memory, rendered as ip(8) commands).
//
// Errors follow the kernel's: ErrNoInterface for an unknown interface,
// ErrExists when adding an address already there (IPv4 compares address and
// prefix length, IPv6 the address only), ErrAbsent when deleting one that is
// not, ErrFamily when the interface does not do IPv6.
type Kernel interface {
	Link(name string) (Link, error)
	Addrs(l Link) ([]HostAddr, error)
	// AddAddr adds p to l; IPv6 addresses are added without duplicate
	// address detection (IFA_F_NODAD): netident probes for duplicates itself.
	AddAddr(l Link, p netip.Prefix) error
	// DelAddr removes p (address and prefix length) from l. Deleting a
	// primary IPv4 address also deletes its secondaries unless
	// PromoteSecondaries was enabled on l.
	DelAddr(l Link, p netip.Prefix) error
	// Local reports whether the kernel takes packets to addr as its own
	// right now (a local route exists: ip route get ADDR says "local").
	// A new IPv6 address is not local at once even with NODAD: the kernel
	// finishes it from a work queue.
	Local(addr netip.Addr) (bool, error)
	// PromoteSecondaries makes the kernel promote a secondary IPv4 address
	// when its primary is deleted (net.ipv4.conf.IFACE.promote_secondaries=1).
	PromoteSecondaries(l Link) error
	Hostname() (string, error)
	SetHostname(name string) error
}

// Wire is the link-layer traffic of netident: probing for another holder of
// an address and announcing a new one. Implementations: Linux (packet
// sockets) and FakeWire.
type Wire interface {
	// Probe asks whether another host answers for addr on l (an ARP probe
	// with sender 0.0.0.0 for IPv4, a duplicate-address-detection neighbour
	// solicitation from :: for IPv6), listening for up to wait. It returns
	// the hardware address that answered, or nil if nobody did.
	Probe(ctx context.Context, l Link, addr netip.Addr, wait time.Duration) (net.HardwareAddr, error)
	// Announce sends one announcement of addr from l: a gratuitous ARP
	// request and a gratuitous ARP reply for IPv4, an unsolicited neighbour
	// advertisement with the Override flag for IPv6.
	Announce(l Link, addr netip.Addr) error
}

// Kernel errors.
var (
	ErrNoInterface = errors.New("no such interface")
	ErrExists      = errors.New("address already assigned")
	ErrAbsent      = errors.New("address not assigned")
	ErrFamily      = errors.New("address family not supported by the interface")
)
