package faults

import (
	"crypto/rand"
	"encoding/binary"
	"fmt"
	mrand "math/rand/v2"
	"net"
	"net/netip"
	"slices"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/doppelha/doppel/test/lab"
)

// ips are a host's addresses (application, and replication for vm1/vm2).
func ips(h string) []string {
	out := []string{appNet + hostIP[h]}
	if h == "vm1" || h == "vm2" {
		out = append(out, replNet+hostIP[h])
	}
	return out
}

// cut drops every packet from each host of from to each host of to with
// blackhole routes in the senders' namespaces (a sender sees its sends
// fail; the other side sees silence); both: the other way too.
func (c *cluster) cut(from, to []string, both bool) func() {
	type route struct{ h, dst string }
	var rs []route
	for _, a := range from {
		for _, b := range to {
			for _, ip := range ips(b) {
				rs = append(rs, route{a, ip})
			}
			if both {
				for _, ip := range ips(a) {
					rs = append(rs, route{b, ip})
				}
			}
		}
	}
	for _, r := range rs {
		if err := c.hosts[r.h].IP("route", "add", "blackhole", r.dst+"/32"); err != nil {
			c.fail("cut: %v", err)
		}
	}
	return func() {
		for _, r := range rs {
			if err := c.hosts[r.h].IP("route", "del", "blackhole", r.dst+"/32"); err != nil {
				c.fail("heal cut: %v", err)
			}
		}
	}
}

// linksDown sets every interface of h down (its sends fail at once).
func (c *cluster) linksDown(h string) func() {
	for _, ifc := range []string{"eth0", "eth1"} {
		if err := c.hosts[h].IP("link", "set", ifc, "down"); err != nil {
			c.fail("links down: %v", err)
		}
	}
	return func() {
		for _, ifc := range []string{"eth0", "eth1"} {
			if err := c.hosts[h].IP("link", "set", ifc, "up"); err != nil {
				c.fail("links up: %v", err)
			}
		}
	}
}

// blackhole takes h's ports off the bridges: its links stay up, its
// packets vanish and nothing reaches it (a silent blackhole).
func (c *cluster) blackhole(h string) func() {
	for _, p := range c.ports[h] {
		if _, err := lab.Run("ip", "-n", c.lab.Switch, "link", "set", p, "nomaster"); err != nil {
			c.fail("blackhole: %v", err)
		}
	}
	return func() {
		for _, p := range c.ports[h] {
			if _, err := lab.Run("ip", "-n", c.lab.Switch, "link", "set", p, "master", c.bridge[p]); err != nil {
				c.fail("heal blackhole: %v", err)
			}
		}
	}
}

// killAgent kills h's agent with SIGKILL; the heal starts it again on its
// state directory.
func (c *cluster) killAgent(h string) func() {
	if err := c.agents[h].Kill(); err != nil {
		c.fail("kill agent: %v", err)
	}
	return func() { c.startAgent(h) }
}

// pauseAgent stops h's agent (SIGSTOP) until the heal (SIGCONT): the
// lease-is-not-a-lock case.
func (c *cluster) pauseAgent(h string) func() {
	if err := c.agents[h].Signal(syscall.SIGSTOP); err != nil {
		c.fail("pause agent: %v", err)
	}
	return func() {
		if err := c.agents[h].Signal(syscall.SIGCONT); err != nil {
			c.fail("resume agent: %v", err)
		}
	}
}

// etcdDown stops n members chosen at random, either frozen (SIGSTOP) or
// killed (SIGKILL, restarted on their data at the heal).
func (c *cluster) etcdDown(rng *mrand.Rand, n int) func() {
	members := []string{"e1", "e2", "e3"}
	rng.Shuffle(len(members), func(i, j int) { members[i], members[j] = members[j], members[i] })
	members = members[:n]
	kill := rng.IntN(2) == 0
	c.logf("etcd members %v %s", members, map[bool]string{true: "killed", false: "frozen"}[kill])
	for _, m := range members {
		var err error
		if kill {
			err = c.etcd[m].Kill()
		} else {
			err = c.etcd[m].Signal(syscall.SIGSTOP)
		}
		if err != nil {
			c.fail("etcd down: %v", err)
		}
	}
	return func() {
		for _, m := range members {
			if kill {
				c.restartMember(m)
			} else if err := c.etcd[m].Signal(syscall.SIGCONT); err != nil {
				c.fail("etcd up: %v", err)
			}
		}
	}
}

// heartbeat is a UDP datagram to the heartbeat port, as captured.
type heartbeat struct {
	src, dst netip.Addr
	sport    uint16
	payload  []byte
}

// captureHeartbeats records real heartbeats of both agents for a second
// on their bridge ports (in the switch namespace), for replays.
func (c *cluster) captureHeartbeats() {
	var wg sync.WaitGroup
	var mu sync.Mutex
	for _, h := range []string{"vm1", "vm2"} {
		for _, port := range c.ports[h] {
			wg.Add(1)
			go func() {
				defer wg.Done()
				hbs, err := capture(c.lab.Switch, port, time.Second)
				if err != nil {
					c.fail("capture heartbeats of %s: %v", h, err)
				}
				mu.Lock()
				c.captured[h] = append(c.captured[h], hbs...)
				mu.Unlock()
			}()
		}
	}
	wg.Wait()
	for _, h := range []string{"vm1", "vm2"} {
		if len(c.captured[h]) == 0 {
			c.fail("no heartbeat of %s captured in 1 s", h)
		}
	}
	c.logf("captured %d heartbeats of vm1, %d of vm2 for replays", len(c.captured["vm1"]), len(c.captured["vm2"]))
}

const heartbeatPort = 6326

func htons(v uint16) uint16 { return v<<8 | v>>8 }

// capture reads the IPv4 UDP datagrams to the heartbeat port seen on
// interface ifname of namespace ns for d.
func capture(ns, ifname string, d time.Duration) ([]heartbeat, error) {
	var out []heartbeat
	err := lab.DoIn(ns, func() error {
		ifi, err := net.InterfaceByName(ifname)
		if err != nil {
			return err
		}
		fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, int(htons(unix.ETH_P_ALL)))
		if err != nil {
			return fmt.Errorf("packet socket: %w", err)
		}
		defer unix.Close(fd)
		if err := unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_ALL), Ifindex: ifi.Index}); err != nil {
			return fmt.Errorf("bind packet socket: %w", err)
		}
		tv := unix.NsecToTimeval(int64(100 * time.Millisecond))
		unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
		buf := make([]byte, 2048)
		end := time.Now().Add(d)
		for n := 0; time.Now().Before(end) && n < 100000; n++ {
			k, _, err := unix.Recvfrom(fd, buf, 0)
			if err != nil {
				continue
			}
			if hb, ok := parseHeartbeat(buf[:k]); ok {
				out = append(out, hb)
			}
		}
		return nil
	})
	return out, err
}

func parseHeartbeat(f []byte) (heartbeat, bool) {
	if len(f) < 14+20+8 || binary.BigEndian.Uint16(f[12:]) != 0x0800 {
		return heartbeat{}, false
	}
	ip := f[14:]
	ihl := int(ip[0]&0xf) * 4
	if ip[9] != unix.IPPROTO_UDP || len(ip) < ihl+8 {
		return heartbeat{}, false
	}
	udp := ip[ihl:]
	if binary.BigEndian.Uint16(udp[2:]) != heartbeatPort {
		return heartbeat{}, false
	}
	src, _ := netip.AddrFromSlice(ip[12:16])
	dst, _ := netip.AddrFromSlice(ip[16:20])
	n := int(binary.BigEndian.Uint16(udp[4:]))
	if n < 8 || n > len(udp) {
		return heartbeat{}, false
	}
	return heartbeat{src: src, dst: dst, sport: binary.BigEndian.Uint16(udp[0:]), payload: slices.Clone(udp[8:n])}, true
}

// spoof floods tgt's heartbeat port from the rogue host with datagrams
// forged from src's addresses: junk, and replays of src's captured
// heartbeats, about 2000 a second for at most hold (and 20000 in all),
// until the returned stop is called.
func (c *cluster) spoof(src, tgt string, rng *mrand.Rand, hold time.Duration) func() {
	var fd int
	err := c.hosts["rogue"].Do(func() error {
		var err error
		fd, err = unix.Socket(unix.AF_INET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.IPPROTO_RAW)
		return err
	})
	if err != nil {
		c.fail("spoof: raw socket in the rogue host: %v", err)
		return func() {}
	}
	replays := c.captured[src]
	seed := rng.Uint64()
	stop := make(chan struct{})
	done := make(chan int)
	go func() {
		defer unix.Close(fd)
		r := mrand.New(mrand.NewPCG(seed, 7))
		sent := 0
		tick := time.NewTicker(5 * time.Millisecond)
		defer tick.Stop()
		end := time.Now().Add(hold + time.Second)
		for sent < 20000 && time.Now().Before(end) {
			select {
			case <-stop:
				done <- sent
				return
			case <-tick.C:
			}
			for range 10 {
				path := r.IntN(len(ips(src)))
				s := netip.MustParseAddr(ips(src)[path])
				d := netip.MustParseAddr(ips(tgt)[path])
				var payload []byte
				sport := uint16(heartbeatPort)
				if len(replays) > 0 && r.IntN(2) == 0 {
					hb := replays[r.IntN(len(replays))]
					payload, sport = hb.payload, hb.sport
				} else {
					payload = make([]byte, r.IntN(200))
					rand.Read(payload)
				}
				pkt := forge(s, d, sport, payload)
				sa := &unix.SockaddrInet4{Addr: d.As4()}
				if unix.Sendto(fd, pkt, 0, sa) == nil {
					sent++
				}
			}
		}
		<-stop
		done <- sent
	}()
	return func() {
		close(stop)
		n := <-done
		c.logf("spoof: %d forged datagrams sent to %s (junk and %d captured heartbeats of %s replayed)", n, tgt, len(replays), src)
		if n == 0 {
			c.fail("spoof: no forged datagram could be sent")
		}
	}
}

// forge builds an IPv4/UDP datagram from src to dst's heartbeat port (the
// kernel fills the IP checksum and length; UDP checksum 0: none).
func forge(src, dst netip.Addr, sport uint16, payload []byte) []byte {
	p := make([]byte, 20+8+len(payload))
	p[0] = 0x45
	binary.BigEndian.PutUint16(p[2:], uint16(len(p)))
	binary.BigEndian.PutUint16(p[6:], 0x4000)
	p[8] = 64
	p[9] = unix.IPPROTO_UDP
	s, d := src.As4(), dst.As4()
	copy(p[12:], s[:])
	copy(p[16:], d[:])
	binary.BigEndian.PutUint16(p[20:], sport)
	binary.BigEndian.PutUint16(p[22:], heartbeatPort)
	binary.BigEndian.PutUint16(p[24:], uint16(8+len(payload)))
	copy(p[28:], payload)
	return p
}
