package ebpf

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
	ModeUserspace  Mode = "userspace"   // UDP socket with SO_TIMESTAMPNS; heartbeats only
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

// ErrUnknownPeer is returned for a peer that was not added with SetPeer.
var ErrUnknownPeer = errors.New("probe: unknown peer")

// PeerStats are the liveness facts about one peer address. Times are
// CLOCK_MONOTONIC (see Now); zero means never.
type PeerStats struct {
	LastHeartbeat      time.Duration // arrival of the newest heartbeat with the right token
	Heartbeats         uint64        // heartbeats with the right token
	LastSeq            uint64        // highest sequence number seen
	Gaps               uint64        // sequence numbers skipped (lost heartbeats)
	LastReplication    time.Duration // newest packet to or from the replication port (XDP modes only)
	ReplicationPackets uint64        // packets to or from the replication port (XDP modes only)
	BadToken           uint64        // heartbeats from the peer's address with a wrong token (never liveness)
}

// LastSeen is the arrival time of the newest packet that proves the peer
// alive: a heartbeat with the right token or a replication packet.
func (s PeerStats) LastSeen() time.Duration { return max(s.LastHeartbeat, s.LastReplication) }

// Packets counts every packet that proved the peer alive.
func (s PeerStats) Packets() uint64 { return s.Heartbeats + s.ReplicationPackets }

// Probe records liveness facts about peers; it decides nothing. Peers are
// keyed by address: give each monitored path's peer address (replication
// network, service network) to SetPeer.
type Probe interface {
	// Mode is the mode in use (never ModeAuto).
	Mode() Mode
	// SetPeer starts watching addr, or changes its expected token; the
	// counters of an already watched peer are kept.
	SetPeer(addr netip.Addr, token uint64) error
	// RemovePeer stops watching addr and forgets its counters.
	RemovePeer(addr netip.Addr) error
	// Stats returns the facts about addr as of now; ErrUnknownPeer if not watched.
	Stats(addr netip.Addr) (PeerStats, error)
	Close() error
}

// Config says what Open attaches to.
type Config struct {
	// Interfaces the XDP program is attached to (the ones heartbeats and
	// replication traffic arrive on). Empty means userspace mode.
	Interfaces []string
	// Mode forces a mode; ModeAuto tries XDP in driver mode, then generic
	// mode, then the userspace listener.
	Mode Mode
	// HeartbeatPort is the UDP port heartbeats are sent to (default 6326).
	HeartbeatPort uint16
	// ReplicationPort: packets to or from it count as liveness in XDP modes
	// (default 6325; NoReplication disables).
	ReplicationPort uint16
	NoReplication   bool
	// ListenAddr is the address the UDP socket binds (default: all, v4 and v6).
	// In XDP modes the socket only swallows heartbeats so that the kernel
	// does not answer them with ICMP port unreachable.
	ListenAddr netip.Addr
	// Logger receives the one-time fallback notice (default slog.Default()).
	Logger *slog.Logger
}

func (c *Config) defaults() {
	if c.HeartbeatPort == 0 {
		c.HeartbeatPort = HeartbeatPort
	}
	if c.ReplicationPort == 0 {
		c.ReplicationPort = ReplicationPort
	}
	if c.NoReplication {
		c.ReplicationPort = 0
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
		if len(cfg.Interfaces) == 0 {
			return nil, fmt.Errorf("probe: mode %s needs an interface", cfg.Mode)
		}
		return openXDP(cfg)
	case ModeAuto:
		if len(cfg.Interfaces) == 0 {
			return openUserspace(cfg)
		}
		for _, name := range cfg.Interfaces { // a typo is an error, not a reason to fall back
			if _, err := net.InterfaceByName(name); err != nil {
				return nil, fmt.Errorf("probe: interface %s: %w", name, err)
			}
		}
		p, err := openXDP(cfg)
		if err == nil {
			return p, nil
		}
		cfg.Logger.Warn("XDP probe unavailable; falling back to the userspace heartbeat listener (replication traffic will not count as liveness)",
			"interfaces", cfg.Interfaces, "err", err)
		return openUserspace(cfg)
	}
	return nil, fmt.Errorf("probe: unknown mode %q", cfg.Mode)
}

// Now is the current CLOCK_MONOTONIC time, the clock of PeerStats (and of
// bpf_ktime_get_ns). It does not jump with wall-clock changes.
func Now() time.Duration {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		panic("clock_gettime(CLOCK_MONOTONIC): " + err.Error())
	}
	return time.Duration(ts.Nano())
}

// peerKey is the 16-byte map key of addr: IPv4 as IPv4-mapped IPv6.
func peerKey(addr netip.Addr) [16]byte { return addr.Unmap().As16() }
