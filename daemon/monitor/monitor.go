// Package monitor is doppel's failure-detection policy: it turns liveness
// facts about a peer (per path: when traffic last arrived, how many packets)
// into a state, up or down, and a time-to-fail countdown.
//
// A peer is down when every monitored path has been silent for
// Interval × Missed. Once down, it is up again only after Rise consecutive
// packets on one path (hysteresis, so a flapping link does not flap the
// peer). The Monitor is a pure state machine: it holds no sockets and reads
// no clock. Times are CLOCK_MONOTONIC instants as time.Duration (the clock
// of heartbeat.Now and of the XDP probe's bpf_ktime_get_ns), passed in by the
// caller; Watch is the loop that drives it from a probe.
package monitor

import (
	"errors"
	"fmt"
	"slices"
	"time"
)

// State is the peer's state as the monitor sees it.
type State int

// States.
const (
	Unknown State = iota // no traffic seen yet, and not yet silent for the timeout
	Up
	Down
)

func (s State) String() string {
	switch s {
	case Unknown:
		return "unknown"
	case Up:
		return "up"
	case Down:
		return "down"
	}
	return fmt.Sprintf("State(%d)", int(s))
}

// Defaults (DESIGN.md §3: 250 ms × 8 = 2 s, tunable down to 50 ms × 3).
const (
	DefaultInterval = 250 * time.Millisecond
	DefaultMissed   = 8
	DefaultRise     = 3
	MinInterval     = 10 * time.Millisecond
)

// Config is the detection policy.
type Config struct {
	Interval time.Duration // heartbeat interval (default 250 ms)
	Missed   int           // heartbeats missed on every path before down (default 8)
	Rise     int           // consecutive packets on one path to come back up after down (default 3)
}

// Timeout is how long every path must be silent before the peer is down.
func (c Config) Timeout() time.Duration { return c.Interval * time.Duration(c.Missed) }

func (c *Config) validate() error {
	if c.Interval == 0 {
		c.Interval = DefaultInterval
	}
	if c.Missed == 0 {
		c.Missed = DefaultMissed
	}
	if c.Rise == 0 {
		c.Rise = DefaultRise
	}
	switch {
	case c.Interval < MinInterval:
		return fmt.Errorf("monitor: interval %v below %v", c.Interval, MinInterval)
	case c.Missed < 1:
		return fmt.Errorf("monitor: missed %d < 1", c.Missed)
	case c.Rise < 1:
		return fmt.Errorf("monitor: rise %d < 1", c.Rise)
	}
	return nil
}

// Sample is what a probe knows about one path: the arrival time of its
// newest packet (zero: never) and the cumulative packet count. A count
// that goes backwards is taken as a probe restart. PeerEpoch is the epoch
// (the failover fencing token) the peer announced in its newest
// authenticated heartbeat on the path (zero: none).
type Sample struct {
	LastSeen  time.Duration
	Packets   uint64
	PeerEpoch uint64
}

// Change is a state transition returned by Tick.
type Change struct {
	From, To State
	At       time.Duration // the Tick that saw it
	LastSeen time.Duration // newest traffic on any path (zero: never)
	Silence  time.Duration // At - LastSeen (or since the monitor started, if never seen)
	Path     string        // for Up: the path whose packets brought the peer up
}

func (c Change) String() string {
	if c.To == Up {
		return fmt.Sprintf("%s -> %s (path %s)", c.From, c.To, c.Path)
	}
	return fmt.Sprintf("%s -> %s after %v of silence on every path", c.From, c.To, c.Silence.Round(100*time.Microsecond))
}

// PathStatus describes one path, for status output.
type PathStatus struct {
	Name     string
	LastSeen time.Duration
	Packets  uint64
	Silent   bool // silent for at least the timeout
}

type path struct {
	name     string
	seen     bool
	sample   Sample
	streak   int // consecutive packets, for Rise
	streakAt time.Duration
}

// ErrUnknownPath is returned by Observe for a path not given to New.
var ErrUnknownPath = errors.New("monitor: unknown path")

// Monitor is the failure detector for one peer. It is not safe for
// concurrent use.
type Monitor struct {
	cfg       Config
	start     time.Duration
	paths     []*path
	state     State
	peerEpoch uint64
}

// New returns a monitor in state Unknown for a peer reached over the named
// paths, started at now.
func New(cfg Config, paths []string, now time.Duration) (*Monitor, error) {
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	if len(paths) == 0 {
		return nil, errors.New("monitor: no path")
	}
	m := &Monitor{cfg: cfg, start: now}
	for _, n := range paths {
		if slices.ContainsFunc(m.paths, func(p *path) bool { return p.name == n }) {
			return nil, fmt.Errorf("monitor: duplicate path %q", n)
		}
		m.paths = append(m.paths, &path{name: n})
	}
	return m, nil
}

// Config returns the policy in effect (with defaults filled in).
func (m *Monitor) Config() Config { return m.cfg }

// Observe records the probe's current sample for a path. Only new traffic
// (a later LastSeen) counts: replaying an old sample changes nothing.
func (m *Monitor) Observe(name string, s Sample) error {
	i := slices.IndexFunc(m.paths, func(p *path) bool { return p.name == name })
	if i < 0 {
		return fmt.Errorf("%w %q", ErrUnknownPath, name)
	}
	p := m.paths[i]
	m.peerEpoch = max(m.peerEpoch, s.PeerEpoch)
	prev := p.sample
	delta := s.Packets - prev.Packets
	if s.Packets < prev.Packets {
		delta = s.Packets // probe restarted
	}
	p.sample.Packets = s.Packets
	if s.LastSeen <= prev.LastSeen || s.LastSeen == 0 {
		return nil // nothing new
	}
	p.sample.LastSeen = s.LastSeen
	if !p.seen || s.LastSeen-p.streakAt > 2*m.cfg.Interval {
		p.streak = 0 // a heartbeat was missed: the run starts again
	}
	p.seen = true
	p.streak += int(max(delta, 1))
	p.streakAt = s.LastSeen
	return nil
}

// lastSeen is the newest traffic on any path, or zero.
func (m *Monitor) lastSeen() time.Duration {
	var t time.Duration
	for _, p := range m.paths {
		t = max(t, p.sample.LastSeen)
	}
	return t
}

// Deadline is the instant at which the peer will be declared down if no
// traffic arrives before it.
func (m *Monitor) Deadline() time.Duration {
	t := m.lastSeen()
	if t == 0 {
		t = m.start
	}
	return t + m.cfg.Timeout()
}

// Tick evaluates the state at now and returns the transition it made, or nil.
func (m *Monitor) Tick(now time.Duration) *Change {
	last := m.lastSeen()
	silence := now - max(last, m.start)
	if last != 0 {
		silence = now - last
	}
	ch := &Change{From: m.state, At: now, LastSeen: last, Silence: silence}
	switch m.state {
	case Unknown, Up:
		if now >= m.Deadline() {
			m.state = Down
			for _, p := range m.paths {
				p.streak = 0
			}
		} else if m.state == Unknown && last != 0 {
			m.state = Up
			ch.Path = m.newestPath()
		}
	case Down:
		for _, p := range m.paths {
			if p.streak > 0 && now-p.streakAt > 2*m.cfg.Interval {
				p.streak = 0 // the run of packets broke off
			}
			if p.streak >= m.cfg.Rise {
				m.state = Up
				ch.Path = p.name
				break
			}
		}
	}
	if m.state == ch.From {
		return nil
	}
	ch.To = m.state
	return ch
}

func (m *Monitor) newestPath() string {
	best := m.paths[0]
	for _, p := range m.paths[1:] {
		if p.sample.LastSeen > best.sample.LastSeen {
			best = p
		}
	}
	return best.name
}

// PeerEpoch is the highest epoch the peer announced in an authenticated
// heartbeat on any path (zero: none). Policy about it (a source that sees
// a higher epoch than its own fences itself) is the caller's.
func (m *Monitor) PeerEpoch() uint64 { return m.peerEpoch }

// State is the state after the last Tick.
func (m *Monitor) State() State { return m.state }

// TimeToFail is how long, from now, until the peer would be declared down
// if no more traffic arrived; zero when it is down.
func (m *Monitor) TimeToFail(now time.Duration) time.Duration {
	if m.state == Down {
		return 0
	}
	return max(0, m.Deadline()-now)
}

// Paths reports every path as of now.
func (m *Monitor) Paths(now time.Duration) []PathStatus {
	out := make([]PathStatus, len(m.paths))
	for i, p := range m.paths {
		since := p.sample.LastSeen
		if since == 0 {
			since = m.start
		}
		out[i] = PathStatus{Name: p.name, LastSeen: p.sample.LastSeen, Packets: p.sample.Packets, Silent: now-since >= m.cfg.Timeout()}
	}
	return out
}
