package netident

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"
)

// Fake is an in-memory Kernel for tests (netident's and its callers'). It
// models what Linux does with addresses: unknown interfaces, IPv6 disabled
// per interface, EEXIST/EADDRNOTAVAIL semantics (IPv4 keyed by address and
// prefix length, IPv6 by address), IPv4 primary/secondary addresses and the
// loss of secondaries when their primary goes without promote_secondaries.
// String renders the state as the ip(8) commands that would rebuild it.
type Fake struct {
	mu       sync.Mutex
	links    []*fakeLink
	hostname string
	calls    int // changes made (adds, deletes, sysctls, hostnames)
}

type fakeLink struct {
	Link
	addrs   []HostAddr
	promote bool
}

// NewFake returns a Fake with the given host name and links. A link with
// Index 0 gets the next free index; a link without MAC gets a made-up one.
func NewFake(hostname string, links ...Link) *Fake {
	f := &Fake{hostname: hostname}
	for _, l := range links {
		f.AddLink(l)
	}
	return f
}

// AddLink adds an interface to f.
func (f *Fake) AddLink(l Link) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if l.Index == 0 {
		l.Index = len(f.links) + 1
	}
	if l.MAC == nil {
		l.MAC = net.HardwareAddr{0x02, 0, 0, 0, 0, byte(l.Index)}
	}
	if l.MTU == 0 {
		l.MTU = 1500
	}
	f.links = append(f.links, &fakeLink{Link: l})
}

// Changes returns how many changes f has undergone (address adds and
// deletes, sysctl writes, host name changes): idempotence tests compare it.
func (f *Fake) Changes() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.calls
}

func (f *Fake) link(name string) (*fakeLink, error) {
	for _, l := range f.links {
		if l.Name == name {
			return l, nil
		}
	}
	return nil, fmt.Errorf("%w %q", ErrNoInterface, name)
}

// Link implements Kernel.
func (f *Fake) Link(name string) (Link, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	l, err := f.link(name)
	if err != nil {
		return Link{}, err
	}
	return l.Link, nil
}

// Addrs implements Kernel.
func (f *Fake) Addrs(l Link) ([]HostAddr, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	fl, err := f.link(l.Name)
	if err != nil {
		return nil, err
	}
	return slices.Clone(fl.addrs), nil
}

// AddAddr implements Kernel.
func (f *Fake) AddAddr(l Link, p netip.Prefix) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	fl, err := f.link(l.Name)
	if err != nil {
		return err
	}
	if p.Addr().Is6() && fl.NoIPv6 {
		return fmt.Errorf("%w: IPv6 is disabled on %s", ErrFamily, l.Name)
	}
	secondary := false
	for _, a := range fl.addrs {
		if a.Prefix.Addr() != p.Addr() {
			if p.Addr().Is4() && !a.Secondary && a.Prefix.Bits() == p.Bits() && a.Prefix.Masked() == p.Masked() {
				secondary = true
			}
			continue
		}
		if p.Addr().Is6() || a.Prefix.Bits() == p.Bits() {
			return fmt.Errorf("%w: %s on %s", ErrExists, a.Prefix, l.Name)
		}
	}
	// Added with NODAD, an IPv6 address is never tentative (even on a down
	// link); Linux finishes it a few milliseconds later, which the fake
	// does not model (see slowKernel in the tests).
	fl.addrs = append(fl.addrs, HostAddr{Prefix: p, Secondary: secondary})
	f.calls++
	return nil
}

// DelAddr implements Kernel.
func (f *Fake) DelAddr(l Link, p netip.Prefix) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	fl, err := f.link(l.Name)
	if err != nil {
		return err
	}
	i := slices.IndexFunc(fl.addrs, func(a HostAddr) bool { return a.Prefix == p })
	if i < 0 {
		return fmt.Errorf("%w: %s on %s", ErrAbsent, p, l.Name)
	}
	gone := fl.addrs[i]
	fl.addrs = slices.Delete(fl.addrs, i, i+1)
	f.calls++
	if !p.Addr().Is4() || gone.Secondary {
		return nil
	}
	sameSubnet := func(a HostAddr) bool {
		return a.Secondary && a.Prefix.Bits() == p.Bits() && a.Prefix.Masked() == p.Masked()
	}
	if fl.promote {
		if j := slices.IndexFunc(fl.addrs, sameSubnet); j >= 0 {
			fl.addrs[j].Secondary = false
		}
		return nil
	}
	fl.addrs = slices.DeleteFunc(fl.addrs, sameSubnet) // what Linux does by default
	return nil
}

// Local implements Kernel: an address held by an up link, not tentative.
func (f *Fake) Local(addr netip.Addr) (bool, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, l := range f.links {
		for _, a := range l.addrs {
			if a.Prefix.Addr() == addr && !a.Tentative {
				return true, nil
			}
		}
	}
	return false, nil
}

// PromoteSecondaries implements Kernel.
func (f *Fake) PromoteSecondaries(l Link) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	fl, err := f.link(l.Name)
	if err != nil {
		return err
	}
	if !fl.promote {
		fl.promote = true
		f.calls++
	}
	return nil
}

// Hostname implements Kernel.
func (f *Fake) Hostname() (string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.hostname, nil
}

// SetHostname implements Kernel.
func (f *Fake) SetHostname(name string) error {
	if err := CheckHostname(name); err != nil {
		return err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.hostname = name
	f.calls++
	return nil
}

// String renders f as the commands that rebuild it, one per line:
// "hostname NAME", then "ip addr add CIDR dev IFACE" per address in link
// order and, within a link, in the order the kernel got them.
func (f *Fake) String() string {
	f.mu.Lock()
	defer f.mu.Unlock()
	var b strings.Builder
	fmt.Fprintf(&b, "hostname %s\n", f.hostname)
	for _, l := range f.links {
		if l.promote {
			fmt.Fprintf(&b, "sysctl net.ipv4.conf.%s.promote_secondaries=1\n", l.Name)
		}
		for _, a := range l.addrs {
			fmt.Fprintf(&b, "ip addr add %s dev %s\n", a.Prefix, l.Name)
		}
	}
	return b.String()
}

// FakeWire is an in-memory Wire: other hosts answering probes are listed in
// Holders, announcements are recorded with the time they were sent (under
// testing/synctest that time is the bubble's fake clock).
type FakeWire struct {
	mu      sync.Mutex
	holders map[netip.Addr]net.HardwareAddr
	sent    []Announcement
}

// Announcement is one announcement a FakeWire sent.
type Announcement struct {
	At    time.Time
	Iface string
	Addr  netip.Addr
}

// NewFakeWire returns a FakeWire on which nobody else holds any address.
func NewFakeWire() *FakeWire { return &FakeWire{holders: map[netip.Addr]net.HardwareAddr{}} }

// SetHolder makes another host with hardware address mac answer for addr;
// a nil mac makes it stop.
func (w *FakeWire) SetHolder(addr netip.Addr, mac net.HardwareAddr) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if mac == nil {
		delete(w.holders, addr)
		return
	}
	w.holders[addr] = mac
}

// Announcements returns what w has sent so far.
func (w *FakeWire) Announcements() []Announcement {
	w.mu.Lock()
	defer w.mu.Unlock()
	return slices.Clone(w.sent)
}

// Probe implements Wire: a holder answers at once, otherwise Probe listens
// for the whole wait.
func (w *FakeWire) Probe(ctx context.Context, l Link, addr netip.Addr, wait time.Duration) (net.HardwareAddr, error) {
	if !l.Up {
		return nil, fmt.Errorf("probe %s on %s: network is down", addr, l.Name)
	}
	w.mu.Lock()
	mac := w.holders[addr]
	w.mu.Unlock()
	if mac != nil {
		return mac, nil
	}
	t := time.NewTimer(wait)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return nil, ctx.Err()
	case <-t.C:
		return nil, nil
	}
}

// Announce implements Wire.
func (w *FakeWire) Announce(l Link, addr netip.Addr) error {
	if !l.Up {
		return fmt.Errorf("announce %s on %s: network is down", addr, l.Name)
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	w.sent = append(w.sent, Announcement{At: time.Now(), Iface: l.Name, Addr: addr})
	return nil
}
