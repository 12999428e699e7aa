package netident

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
)

// Addr is one service address and the interface of this host that carries
// it: "172.17.22.187/24 on eth0".
type Addr struct {
	Prefix netip.Prefix // the address with its prefix length (not masked)
	Iface  string       // interface name on this host
}

// String renders a in the form ParseServiceIP reads: "CIDR@IFACE".
func (a Addr) String() string { return a.Prefix.String() + "@" + a.Iface }

// IP renders a as the ip(8) command that adds it: "ip addr add CIDR dev IFACE".
func (a Addr) IP() string { return "ip addr add " + a.Prefix.String() + " dev " + a.Iface }

// Is6 reports whether a is an IPv6 address.
func (a Addr) Is6() bool { return a.Prefix.Addr().Is6() }

// Identity is what a host takes over from another one: service addresses on
// mapped interfaces and, optionally, the host name.
type Identity struct {
	Addrs []Addr
	// Hostname, when set, is given to the kernel with sethostname(2) by
	// Apply; Release restores the name it replaced. Only the running
	// kernel's name (of the caller's UTS namespace) changes: /etc/hostname
	// is left alone, so a reboot comes back with the host's own name.
	Hostname string
}

// Input errors. They are wrapped with the offending text.
var (
	ErrBadServiceIP = errors.New("bad service IP")
	ErrBadIfaceMap  = errors.New("bad interface mapping")
	ErrBadIface     = errors.New("bad interface name")
	ErrBadHostname  = errors.New("bad host name")
)

// ParseServiceIP parses a service address spec "CIDR@IFACE", for example
// "172.17.22.187/24@eth0" or "fd00:17::187/64@eth0". The prefix length is
// required (it decides the on-link route the kernel adds with the address).
// Unspecified, loopback, multicast, IPv4-mapped and zoned addresses are
// refused: none of them can be a service address.
func ParseServiceIP(s string) (Addr, error) {
	i := strings.LastIndexByte(s, '@')
	if i < 0 {
		return Addr{}, fmt.Errorf("%w %q: want CIDR@IFACE, e.g. 172.17.22.187/24@eth0", ErrBadServiceIP, s)
	}
	cidr, iface := s[:i], s[i+1:]
	p, err := ParseCIDR(cidr)
	if err != nil {
		return Addr{}, fmt.Errorf("%w %q: %w", ErrBadServiceIP, s, err)
	}
	if err := CheckIfaceName(iface); err != nil {
		return Addr{}, fmt.Errorf("%w %q: %w", ErrBadServiceIP, s, err)
	}
	return Addr{Prefix: p, Iface: iface}, nil
}

// ParseCIDR parses a service address "ADDR/LEN" and checks that it can be
// carried by a host (see ParseServiceIP). The address is kept as written,
// not masked: 10.0.0.5/24 stays 10.0.0.5/24.
func ParseCIDR(s string) (netip.Prefix, error) {
	if !strings.Contains(s, "/") {
		return netip.Prefix{}, fmt.Errorf("%q has no prefix length: want e.g. 172.17.22.187/24", s)
	}
	p, err := netip.ParsePrefix(s)
	if err != nil {
		return netip.Prefix{}, fmt.Errorf("malformed CIDR %q: %w", s, err)
	}
	a := p.Addr()
	switch {
	case a.Is4In6():
		return netip.Prefix{}, fmt.Errorf("%s: IPv4-mapped IPv6 address; write the IPv4 address", s)
	case a.IsUnspecified():
		return netip.Prefix{}, fmt.Errorf("%s: unspecified address", s)
	case a.IsLoopback():
		return netip.Prefix{}, fmt.Errorf("%s: loopback address", s)
	case a.IsMulticast():
		return netip.Prefix{}, fmt.Errorf("%s: multicast address", s)
	case a.Is4() && a == netip.AddrFrom4([4]byte{255, 255, 255, 255}):
		return netip.Prefix{}, fmt.Errorf("%s: broadcast address", s)
	}
	return p, nil
}

// CheckIfaceName reports whether name is a valid Linux interface name: 1 to
// 15 bytes, no '/', ':' or white space, not "." or "..". The separators of
// doppel's specs ('@', '=', ',') are refused too, though Linux allows them.
func CheckIfaceName(name string) error {
	switch {
	case name == "":
		return fmt.Errorf("%w: empty", ErrBadIface)
	case len(name) > 15:
		return fmt.Errorf("%w %q: longer than 15 bytes", ErrBadIface, name)
	case name == "." || name == "..":
		return fmt.Errorf("%w %q", ErrBadIface, name)
	}
	for _, c := range []byte(name) {
		if c == '/' || c == ':' || c <= ' ' || c == 0x7f || c == '@' || c == '=' || c == ',' {
			return fmt.Errorf("%w %q: contains %q", ErrBadIface, name, c)
		}
	}
	return nil
}

// CheckHostname reports whether name can be given to sethostname(2) and is a
// sane DNS-style host name: 1 to 64 bytes of letters, digits, '-' and '.'.
func CheckHostname(name string) error {
	if name == "" || len(name) > 64 {
		return fmt.Errorf("%w %q: want 1 to 64 bytes", ErrBadHostname, name)
	}
	for _, c := range []byte(name) {
		ok := c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '.'
		if !ok {
			return fmt.Errorf("%w %q: contains %q", ErrBadHostname, name, c)
		}
	}
	return nil
}

// IfaceMap is the adapter mapping of a job: source interface name → target
// interface name. The source's service address on eth0 may have to live on
// ens3 of the target; IfaceMap{"eth0": "ens3"} says so.
type IfaceMap map[string]string

// ParseIfaceMap parses mapping specs "SRC=TGT" (as given by repeated
// --map-iface flags; each spec may also hold several comma-separated pairs).
// Mapping one source interface twice is an error.
func ParseIfaceMap(specs ...string) (IfaceMap, error) {
	m := IfaceMap{}
	for _, spec := range specs {
		for pair := range strings.SplitSeq(spec, ",") {
			src, tgt, ok := strings.Cut(pair, "=")
			if !ok {
				return nil, fmt.Errorf("%w %q: want SRC=TGT, e.g. eth0=ens3", ErrBadIfaceMap, pair)
			}
			if err := CheckIfaceName(src); err != nil {
				return nil, fmt.Errorf("%w %q: source: %w", ErrBadIfaceMap, pair, err)
			}
			if err := CheckIfaceName(tgt); err != nil {
				return nil, fmt.Errorf("%w %q: target: %w", ErrBadIfaceMap, pair, err)
			}
			if old, dup := m[src]; dup {
				return nil, fmt.Errorf("%w: %s mapped twice (to %s and %s)", ErrBadIfaceMap, src, old, tgt)
			}
			m[src] = tgt
		}
	}
	return m, nil
}

// Iface returns the target interface for source interface src; an unmapped
// interface keeps its name.
func (m IfaceMap) Iface(src string) string {
	if t, ok := m[src]; ok {
		return t
	}
	return src
}

// Map returns addrs with each interface replaced by its mapping.
func (m IfaceMap) Map(addrs []Addr) []Addr {
	out := make([]Addr, len(addrs))
	for i, a := range addrs {
		out[i] = Addr{Prefix: a.Prefix, Iface: m.Iface(a.Iface)}
	}
	return out
}

// String renders m as ParseIfaceMap reads it: "eth0=ens3,eth1=ens4", sorted.
func (m IfaceMap) String() string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	var b strings.Builder
	for i, k := range keys {
		if i > 0 {
			b.WriteByte(',')
		}
		b.WriteString(k + "=" + m[k])
	}
	return b.String()
}

// Validate checks an identity before anything is changed: every address is a
// valid service address on a valid interface name, no address appears twice,
// and the host name (if any) is valid.
func (id Identity) Validate() error {
	seen := map[netip.Addr]Addr{}
	for _, a := range id.Addrs {
		if _, err := ParseCIDR(a.Prefix.String()); err != nil || !a.Prefix.IsValid() {
			return fmt.Errorf("%w %s: %v", ErrBadServiceIP, a, err)
		}
		if err := CheckIfaceName(a.Iface); err != nil {
			return fmt.Errorf("%w %s: %w", ErrBadServiceIP, a, err)
		}
		if prev, dup := seen[a.Prefix.Addr()]; dup {
			return fmt.Errorf("%w: %s listed twice (%s and %s)", ErrBadServiceIP, a.Prefix.Addr(), prev, a)
		}
		seen[a.Prefix.Addr()] = a
	}
	if id.Hostname != "" {
		if err := CheckHostname(id.Hostname); err != nil {
			return err
		}
	}
	return nil
}
