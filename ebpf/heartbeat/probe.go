package heartbeat

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"time"

	"golang.org/x/sys/unix"
)

// Mode is how a Probe sees packets.
type Mode string

// Probe modes. ModeAuto is only a request: Open resolves it.
const (
	ModeAuto       Mode = ""
	ModeXDPDriver  Mode = "xdp-driver"  // XDP in the NIC driver
	ModeXDPGeneric Mode = "xdp-generic" // XDP on the generic (skb) path, e.g. veth without native support
	ModeXDP        Mode = "xdp"         // XDP loaded, attached to no interface yet (no peer watched)
	ModeUserspace  Mode = "userspace"   // UDP socket with SO_TIMESTAMPNS
)

// ParseMode parses "auto", "xdp-driver", "xdp-generic" or "userspace".
func ParseMode(s string) (Mode, error) {
	switch m := Mode(s); m {
	case "auto", ModeAuto:
		return ModeAuto, nil
	case ModeXDPDriver, ModeXDPGeneric, ModeUserspace:
		return m, nil
	}
	return "", fmt.Errorf("unknown probe mode %q (want auto, xdp-driver, xdp-generic or userspace)", s)
}

// ErrUnknownPeer is returned for a peer that is not watched.
var ErrUnknownPeer = errors.New("probe: unknown peer")

// Peer is what a probe counts heartbeats for: one job, from one peer
// address (one path).
type Peer struct {
	Addr netip.Addr
	Job  JobID
}

func (p Peer) String() string { return fmt.Sprintf("%s job %x", p.Addr, p.Job[:4]) }

// key16 is the 16-byte form of an address: IPv4 as IPv4-mapped IPv6.
func key16(a netip.Addr) [16]byte { return a.Unmap().As16() }

// Stats are the liveness facts about one watched peer. Times are
// CLOCK_MONOTONIC (see Now); zero means never.
type Stats struct {
	LastSeen    time.Duration // arrival of the newest counted heartbeat
	Heartbeats  uint64        // heartbeats counted: right MAC, (incarnation, sequence) above the last counted
	Incarnation uint64        // of the newest counted heartbeat
	Seq         uint64        // of the newest counted heartbeat
	Epoch       uint64        // the sender's epoch in the newest counted heartbeat
	Gaps        uint64        // sequence numbers skipped within an incarnation (lost heartbeats)
	Replays     uint64        // right MAC, (incarnation, sequence) not above the last counted: never liveness
	BadMAC      uint64        // heartbeats for the job from the peer's address with a wrong MAC: never liveness
}

// observe applies one heartbeat whose MAC was verified, arrived at at:
// probe.c's rules.
func (s *Stats) observe(p *Packet, at time.Duration) {
	if p.Incarnation < s.Incarnation || p.Incarnation == s.Incarnation && p.Seq <= s.Seq {
		s.Replays++
		return
	}
	if p.Incarnation == s.Incarnation && s.Heartbeats > 0 && p.Seq > s.Seq+1 {
		s.Gaps += p.Seq - s.Seq - 1
	}
	s.Incarnation, s.Seq, s.Epoch = p.Incarnation, p.Seq, p.Epoch
	s.LastSeen = max(s.LastSeen, at)
	s.Heartbeats++
}

// Probe records liveness facts about (peer address, job) pairs; it decides
// nothing. Entries exist only for what Watch was given: a heartbeat from
// anyone else changes nothing.
type Probe interface {
	// Mode is the mode in use (never ModeAuto).
	Mode() Mode
	// Watch starts counting p's heartbeats, verified with key (the peer's
	// sending key for the job); for a watched p it changes the key and
	// keeps the counters. Without configured interfaces an XDP probe
	// attaches to the interface of the route to p.Addr first.
	Watch(p Peer, key Key) error
	// Unwatch stops counting p and forgets its counters.
	Unwatch(p Peer) error
	// Stats returns the facts about p as of now; ErrUnknownPeer if not watched.
	Stats(p Peer) (Stats, error)
	Close() error
}

// Config says what Open attaches to.
type Config struct {
	// Interfaces the XDP program is attached to. Empty: the interface of
	// the route to each watched peer address, found (in the namespace
	// Open ran in) and attached when the peer is watched.
	Interfaces []string
	// Mode forces a mode; ModeAuto tries XDP in driver mode, then generic
	// mode, then the userspace listener.
	Mode Mode
	// Port is the UDP port heartbeats are sent to (default 6326). The
	// probe also binds it on every address (XDP modes: only so that the
	// kernel does not answer heartbeats with ICMP port unreachable).
	Port uint16
	// Logger receives the one-time fallback notice (default slog.Default()).
	Logger *slog.Logger
}

func (c *Config) defaults() {
	if c.Port == 0 {
		c.Port = Port
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
}

// Open starts a probe. In ModeAuto it falls back from XDP driver mode to
// generic mode per interface, and to the userspace listener when the BPF
// program cannot be loaded or attached at all (no root or CAP_BPF, old
// kernel); the fallback is logged once, at warning level.
func Open(cfg Config) (Probe, error) {
	cfg.defaults()
	switch cfg.Mode {
	case ModeUserspace:
		return openUserspace(cfg)
	case ModeXDPDriver, ModeXDPGeneric:
		return openXDP(cfg)
	case ModeAuto:
		for _, name := range cfg.Interfaces { // a typo is an error, not a reason to fall back
			if _, err := net.InterfaceByName(name); err != nil {
				return nil, fmt.Errorf("probe: interface %s: %w", name, err)
			}
		}
		p, err := openXDP(cfg)
		if err == nil {
			return p, nil
		}
		cfg.Logger.Warn("XDP probe unavailable; falling back to the userspace heartbeat listener",
			"interfaces", cfg.Interfaces, "err", err)
		return openUserspace(cfg)
	}
	return nil, fmt.Errorf("probe: unknown mode %q", cfg.Mode)
}

// Now is the current CLOCK_MONOTONIC time, the clock of Stats (and of
// bpf_ktime_get_ns). It does not jump with wall-clock changes.
func Now() time.Duration {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		panic("clock_gettime(CLOCK_MONOTONIC): " + err.Error())
	}
	return time.Duration(ts.Nano())
}
