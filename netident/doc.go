// Package netident owns a host's network identity during failover: adding
// and removing service IPs with netlink, announcing them (gratuitous ARP,
// unsolicited neighbour advertisement), adapter mapping and hostname. It
// never decides when to fail over.
//
// A Manager applies an Identity (service addresses, each on an interface of
// this host, and optionally a host name) and releases it:
//
//	sys, err := netident.OpenLinux(nil, netns.None()) // or (netlink.NewHandleAt(ns), ns)
//	m := netident.New(log, sys, sys, netident.Config{})
//	id := netident.Identity{Addrs: ifaceMap.Map(sourceAddrs)}
//	report, err := m.Apply(ctx, id, netident.ApplyOptions{})
//	...
//	report, err = m.Release(ctx, id)
//
// Both are idempotent: Apply adds only what is missing and Release removes
// only what is present; neither touches an address that is not in the
// identity (the host's own replication address stays). ParseServiceIP reads
// "CIDR@IFACE" specs and ParseIfaceMap "SRC=TGT" adapter mappings.
//
// # Taking an address over
//
// Apply first probes every missing address at once for Config.ProbeWait
// (150 ms): an RFC 5227 ARP probe (sender 0.0.0.0) for IPv4, an RFC 4862
// duplicate-address solicitation (from ::, to the solicited-node group) for
// IPv6, three of each. If another host answers, Apply refuses with a
// *ConflictError naming the MAC that answered, unless forced. Then it adds
// the addresses and announces each one: a gratuitous ARP request and a
// gratuitous ARP reply (target hardware address = sender, which Linux
// requires to override a fresh neighbour entry) for IPv4, an unsolicited
// neighbour advertisement with the Override flag to all nodes for IPv6; 5
// rounds 200 ms apart and a second burst 5 s later (keepalived's
// garp_master_delay), for stale caches and switches that missed the first.
// The first round is sent before Apply returns; the rest run in the
// background, per address, until done or stopped by a Release or the next
// Apply of that address, or Close; one Manager can serve several jobs.
//
// IPv6 addresses are added with IFA_F_NODAD. Kernel DAD would leave a new
// address tentative (unusable as a source, not answering solicitations)
// for RetransTimer × dad_transmits, 1 s by default and more on a loaded
// host, and a detected duplicate only shows as a "dadfailed" flag, naming
// nobody. netident's own probe finds the duplicate in 150 ms and says who
// holds it, so the address is added usable at once; TestTakeoverPeers
// measures the second or more that waiting for the kernel costs. Even with
// NODAD the kernel finishes a new IPv6 address from a work queue a few
// milliseconds later: Apply announces only once the kernel takes every new
// address as local, else a client's first SYN would be dropped and retried
// a second later.
//
// # Giving an address up
//
// Release stops the announcements first (an address is never announced
// after Release began), then removes the addresses. Removing a primary IPv4
// address makes Linux delete the secondaries of its subnet too; when one
// exists (say the replication address, added after the service address),
// Release first enables net.ipv4.conf.IFACE.promote_secondaries so the
// kernel keeps it.
//
// # Host name
//
// Identity.Hostname is given to the kernel with sethostname(2) (the calling
// thread's UTS namespace); Release restores the name Apply replaced, unless
// someone changed it since. /etc/hostname is not touched, so a reboot
// brings the host's own name back, which is what a failed-over host wants.
//
// # Testing
//
// The kernel-facing code is behind Kernel (links, addresses, host name) and
// Wire (probe, announce). Fake models the kernel's address rules and renders
// its state as "ip addr add CIDR dev IFACE" lines for table tests; FakeWire
// plays the other hosts and records announcements, on testing/synctest's
// clock for exact schedules. Linux, the real implementation, is tested as
// root in namespaces src, tgt and client on a bridge (TestTakeover).
package netident
