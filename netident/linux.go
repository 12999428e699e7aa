package netident

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"runtime"
	"strings"
	"time"

	"github.com/mdlayher/socket"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Linux is the real Kernel and Wire: addresses through a netlink handle,
// sysctls and packet sockets in the handle's network namespace, the host
// name of the calling thread's UTS namespace.
type Linux struct {
	h      *netlink.Handle
	ns     netns.NsHandle // netns.None(): the current namespace
	closeH bool
}

// OpenLinux returns the real Kernel and Wire. h is the netlink handle to
// use (nil: a new one in ns); ns is the network namespace h works in, where
// packet sockets are opened and sysctls read: netns.None() for the current
// one. Tests pass netlink.NewHandleAt(ns) and ns.
//
// A handle made here speaks only NETLINK_ROUTE (links, addresses, neighbours):
// netlink.NewHandle() with no family would also open XFRM and netfilter
// sockets, which fail where those modules cannot load (minimal guests,
// containers) although nothing here needs them.
func OpenLinux(h *netlink.Handle, ns netns.NsHandle) (*Linux, error) {
	s := &Linux{h: h, ns: ns}
	if h == nil {
		var err error
		if ns.IsOpen() {
			s.h, err = netlink.NewHandleAt(ns, unix.NETLINK_ROUTE)
		} else {
			s.h, err = netlink.NewHandle(unix.NETLINK_ROUTE)
		}
		if err != nil {
			return nil, fmt.Errorf("netlink: %w", err)
		}
		s.closeH = true
	}
	return s, nil
}

// Close releases the netlink handle if OpenLinux made it.
func (s *Linux) Close() error {
	if s.closeH {
		s.h.Close()
	}
	return nil
}

// inNS runs fn on a thread in s's namespace. fn must not start goroutines
// that depend on the namespace: sockets it opens stay in it, though.
func (s *Linux) inNS(fn func() error) error {
	if !s.ns.IsOpen() {
		return fn()
	}
	runtime.LockOSThread()
	orig, err := netns.Get()
	if err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("get current netns: %w", err)
	}
	defer orig.Close()
	if err := netns.Set(s.ns); err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("enter netns: %w", err)
	}
	ferr := fn()
	if err := netns.Set(orig); err != nil {
		// The thread stays locked and dies with this goroutine.
		return errors.Join(ferr, fmt.Errorf("leave netns: %w", err))
	}
	runtime.UnlockOSThread()
	return ferr
}

func (s *Linux) sysctl(path string) (string, error) {
	var v []byte
	err := s.inNS(func() error {
		var err error
		v, err = os.ReadFile(path)
		return err
	})
	return strings.TrimSpace(string(v)), err
}

// Link implements Kernel.
func (s *Linux) Link(name string) (Link, error) {
	if err := CheckIfaceName(name); err != nil {
		return Link{}, err
	}
	nl, err := s.h.LinkByName(name)
	if err != nil {
		var nf netlink.LinkNotFoundError
		if errors.As(err, &nf) || errors.Is(err, unix.ENODEV) {
			return Link{}, fmt.Errorf("%w %q", ErrNoInterface, name)
		}
		return Link{}, fmt.Errorf("link %s: %w", name, err)
	}
	a := nl.Attrs()
	l := Link{Name: a.Name, Index: a.Index, MAC: a.HardwareAddr, MTU: a.MTU, Up: a.Flags&net.FlagUp != 0}
	l.NoARP = a.RawFlags&unix.IFF_NOARP != 0 || a.Flags&net.FlagLoopback != 0 || len(a.HardwareAddr) != 6
	switch v, err := s.sysctl("/proc/sys/net/ipv6/conf/" + name + "/disable_ipv6"); {
	case errors.Is(err, os.ErrNotExist):
		l.NoIPv6 = true // no IPv6 in this kernel or namespace
	case err != nil:
		return Link{}, fmt.Errorf("link %s: read disable_ipv6: %w", name, err)
	default:
		l.NoIPv6 = v != "0"
	}
	return l, nil
}

func nlLink(l Link) netlink.Link {
	return &netlink.Device{LinkAttrs: netlink.LinkAttrs{Index: l.Index, Name: l.Name}}
}

func nlAddr(p netip.Prefix) *netlink.Addr {
	a := &netlink.Addr{IPNet: &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}}
	if p.Addr().Is6() {
		a.Flags = unix.IFA_F_NODAD
	}
	return a
}

// Addrs implements Kernel.
func (s *Linux) Addrs(l Link) ([]HostAddr, error) {
	list, err := s.h.AddrList(nlLink(l), netlink.FAMILY_ALL)
	if err != nil {
		return nil, fmt.Errorf("list addresses of %s: %w", l.Name, err)
	}
	out := make([]HostAddr, 0, len(list))
	for _, a := range list {
		ip, ok := netip.AddrFromSlice(a.IP)
		if !ok {
			continue
		}
		bits, _ := a.Mask.Size()
		out = append(out, HostAddr{Prefix: netip.PrefixFrom(ip.Unmap(), bits), Secondary: a.Flags&unix.IFA_F_SECONDARY != 0, Tentative: a.Flags&unix.IFA_F_TENTATIVE != 0})
	}
	return out, nil
}

// AddAddr implements Kernel.
func (s *Linux) AddAddr(l Link, p netip.Prefix) error {
	err := s.h.AddrAdd(nlLink(l), nlAddr(p))
	switch {
	case err == nil:
		return nil
	case errors.Is(err, unix.EEXIST):
		return fmt.Errorf("%w: %s on %s", ErrExists, p, l.Name)
	case errors.Is(err, unix.ENODEV):
		return fmt.Errorf("%w %q", ErrNoInterface, l.Name)
	case p.Addr().Is6() && (errors.Is(err, unix.EPERM) || errors.Is(err, unix.EACCES) || errors.Is(err, unix.EAFNOSUPPORT)):
		return fmt.Errorf("%w: IPv6 is disabled on %s: %w", ErrFamily, l.Name, err)
	}
	return fmt.Errorf("add %s to %s: %w", p, l.Name, err)
}

// DelAddr implements Kernel.
func (s *Linux) DelAddr(l Link, p netip.Prefix) error {
	err := s.h.AddrDel(nlLink(l), nlAddr(p))
	switch {
	case err == nil:
		return nil
	case errors.Is(err, unix.EADDRNOTAVAIL):
		return fmt.Errorf("%w: %s on %s", ErrAbsent, p, l.Name)
	case errors.Is(err, unix.ENODEV):
		return fmt.Errorf("%w %q", ErrNoInterface, l.Name)
	}
	return fmt.Errorf("delete %s from %s: %w", p, l.Name, err)
}

// Local implements Kernel.
func (s *Linux) Local(addr netip.Addr) (bool, error) {
	rs, err := s.h.RouteGet(addr.AsSlice())
	if err != nil {
		return false, fmt.Errorf("route get %s: %w", addr, err)
	}
	return len(rs) > 0 && rs[0].Type == unix.RTN_LOCAL, nil
}

// PromoteSecondaries implements Kernel.
func (s *Linux) PromoteSecondaries(l Link) error {
	path := "/proc/sys/net/ipv4/conf/" + l.Name + "/promote_secondaries"
	return s.inNS(func() error { return os.WriteFile(path, []byte("1\n"), 0o644) })
}

// Hostname implements Kernel.
func (s *Linux) Hostname() (string, error) {
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		return "", fmt.Errorf("uname: %w", err)
	}
	return unix.ByteSliceToString(u.Nodename[:]), nil
}

// SetHostname implements Kernel.
func (s *Linux) SetHostname(name string) error {
	if err := CheckHostname(name); err != nil {
		return err
	}
	if err := unix.Sethostname([]byte(name)); err != nil {
		return fmt.Errorf("sethostname %q: %w", name, err)
	}
	return nil
}

// pktConn is a raw packet socket bound to one interface and ethertype.
type pktConn struct {
	c     *socket.Conn
	index int
	proto uint16 // network byte order
}

func htons(v int) uint16 { return uint16(v)<<8 | uint16(v)>>8 }

// listen opens a raw packet socket for ethertype proto on l, in s's
// namespace.
func (s *Linux) listen(l Link, proto int) (*pktConn, error) {
	var c *socket.Conn
	err := s.inNS(func() error {
		var err error
		c, err = socket.Socket(unix.AF_PACKET, unix.SOCK_RAW, 0, "packet", nil)
		if err != nil {
			return err
		}
		// Bound before the protocol is set: no frame of another
		// interface gets queued meanwhile.
		if err := c.Bind(&unix.SockaddrLinklayer{Protocol: htons(proto), Ifindex: l.Index}); err != nil {
			c.Close()
			return err
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("packet socket on %s: %w", l.Name, err)
	}
	return &pktConn{c: c, index: l.Index, proto: htons(proto)}, nil
}

// Close closes the socket in the background: closing a packet socket waits
// for an RCU grace period (synchronize_net), milliseconds that must not
// delay a takeover.
func (p *pktConn) Close() error {
	go p.c.Close()
	return nil
}

// send writes frame (with its Ethernet header) out of the interface.
func (p *pktConn) send(ctx context.Context, frame []byte) error {
	sa := &unix.SockaddrLinklayer{Ifindex: p.index, Protocol: p.proto, Halen: 6}
	copy(sa.Addr[:], frame[:6])
	return p.c.Sendto(ctx, frame, 0, sa)
}

// recv reads the next frame received from the wire (frames this host sent
// are skipped) until ctx ends.
func (p *pktConn) recv(ctx context.Context, buf []byte) (int, error) {
	for {
		n, from, err := p.c.Recvfrom(ctx, buf, 0)
		if err != nil {
			return 0, err
		}
		if ll, ok := from.(*unix.SockaddrLinklayer); ok && ll.Pkttype == unix.PACKET_OUTGOING {
			continue
		}
		return n, nil
	}
}

// probeCount probes are sent, evenly spread over the probe wait.
const probeCount = 3

// Probe implements Wire.
func (s *Linux) Probe(ctx context.Context, l Link, addr netip.Addr, wait time.Duration) (net.HardwareAddr, error) {
	if len(l.MAC) != 6 {
		return nil, fmt.Errorf("probe %s on %s: not an Ethernet interface", addr, l.Name)
	}
	var (
		proto int
		frame []byte
		err   error
		match func([]byte) net.HardwareAddr
	)
	if addr.Is4() {
		proto = etherTypeARP
		frame, err = arpProbeFrame(l.MAC, addr)
		match = func(b []byte) net.HardwareAddr {
			if _, p, err := parseARPFrame(b); err == nil && p.SPA == addr {
				return p.SHA
			}
			return nil
		}
	} else {
		proto = etherTypeIPv6
		frame, err = dadProbeFrame(l.MAC, addr)
		match = func(b []byte) net.HardwareAddr {
			if p, err := parseNDPFrame(b); err == nil {
				return p.answerMAC(addr)
			}
			return nil
		}
	}
	if err != nil {
		return nil, fmt.Errorf("probe %s: %w", addr, err)
	}
	c, err := s.listen(l, proto)
	if err != nil {
		return nil, fmt.Errorf("probe %s: %w", addr, err)
	}
	defer c.Close()

	start := time.Now()
	end := start.Add(wait)
	buf := make([]byte, max(l.MTU+64, 2048))
	for sent := 0; ; {
		if sent < probeCount && !time.Now().Before(start.Add(wait*time.Duration(sent)/probeCount)) {
			if err := c.send(ctx, frame); err != nil {
				if errors.Is(err, unix.ENETDOWN) {
					err = ErrLinkDown
				}
				return nil, fmt.Errorf("probe %s on %s: send: %w", addr, l.Name, err)
			}
			sent++
		}
		dl := end
		if sent < probeCount {
			dl = start.Add(wait * time.Duration(sent) / probeCount)
		}
		rctx, cancel := context.WithDeadline(ctx, dl)
		n, err := c.recv(rctx, buf)
		cancel()
		switch {
		case ctx.Err() != nil:
			return nil, ctx.Err()
		case errors.Is(err, context.DeadlineExceeded) || errors.Is(err, os.ErrDeadlineExceeded):
			if sent == probeCount && !time.Now().Before(end) {
				return nil, nil
			}
		case err != nil:
			return nil, fmt.Errorf("probe %s on %s: read: %w", addr, l.Name, err)
		default:
			if mac := match(buf[:n]); mac != nil && !bytes.Equal(mac, l.MAC) {
				return mac, nil
			}
		}
	}
}

// Announce implements Wire.
func (s *Linux) Announce(l Link, addr netip.Addr) error {
	if len(l.MAC) != 6 {
		return fmt.Errorf("announce %s on %s: not an Ethernet interface", addr, l.Name)
	}
	var frames [][]byte
	proto := etherTypeARP
	if addr.Is4() {
		fs, err := garpFrames(l.MAC, addr)
		if err != nil {
			return fmt.Errorf("announce %s: %w", addr, err)
		}
		frames = fs[:]
	} else {
		proto = etherTypeIPv6
		f, err := unsolicitedNAFrame(l.MAC, addr)
		if err != nil {
			return fmt.Errorf("announce %s: %w", addr, err)
		}
		frames = [][]byte{f}
	}
	c, err := s.listen(l, proto)
	if err != nil {
		return fmt.Errorf("announce %s: %w", addr, err)
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	for _, f := range frames {
		if err := c.send(ctx, f); err != nil {
			if errors.Is(err, unix.ENETDOWN) {
				err = ErrLinkDown
			}
			return fmt.Errorf("announce %s on %s: %w", addr, l.Name, err)
		}
	}
	return nil
}
