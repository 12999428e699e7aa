package netident

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"
)

// Defaults of Config.
const (
	DefaultProbeWait        = 150 * time.Millisecond
	DefaultAnnounceCount    = 5
	DefaultAnnounceInterval = 200 * time.Millisecond
	DefaultSecondBurst      = 5 * time.Second
)

// Config tunes a Manager. The zero value is the defaults above.
type Config struct {
	// ProbeWait is how long Apply listens for another holder of each new
	// address before adding it (all addresses are probed at once). It is on
	// the failover's critical path; 150 ms is far above a LAN round trip.
	// Negative: no probe.
	ProbeWait time.Duration
	// AnnounceCount announcements AnnounceInterval apart make a burst;
	// a second burst starts SecondBurst after the first one started
	// (keepalived's garp_master_delay). SecondBurst negative: no second burst.
	AnnounceCount    int
	AnnounceInterval time.Duration
	SecondBurst      time.Duration
}

func (c Config) withDefaults() Config {
	if c.ProbeWait == 0 {
		c.ProbeWait = DefaultProbeWait
	}
	if c.AnnounceCount <= 0 {
		c.AnnounceCount = DefaultAnnounceCount
	}
	if c.AnnounceInterval <= 0 {
		c.AnnounceInterval = DefaultAnnounceInterval
	}
	if c.SecondBurst == 0 {
		c.SecondBurst = DefaultSecondBurst
	}
	return c
}

// ErrConflict is returned by Apply when another host answered for an address
// that is to be added (wrapped in a *ConflictError naming it).
var ErrConflict = errors.New("address in use by another host")

// ErrLinkDown is returned by Apply, unless forced, when a mapped interface is
// administratively down.
var ErrLinkDown = errors.New("interface is down")

// Conflict is one address another host answered for.
type Conflict struct {
	Addr Addr
	MAC  net.HardwareAddr // who answered
}

func (c Conflict) String() string {
	return fmt.Sprintf("%s is answered by %s on %s", c.Addr.Prefix.Addr(), c.MAC, c.Addr.Iface)
}

// ConflictError lists the addresses other hosts answered for.
type ConflictError struct{ Conflicts []Conflict }

func (e *ConflictError) Error() string {
	s := make([]string, len(e.Conflicts))
	for i, c := range e.Conflicts {
		s[i] = c.String()
	}
	return "address in use by another host: " + strings.Join(s, "; ") + " (release it there, or force)"
}

// Is makes errors.Is(err, ErrConflict) true.
func (e *ConflictError) Is(target error) bool { return target == ErrConflict }

// Report says what Apply or Release did.
type Report struct {
	Added     []Addr     // addresses added
	Present   []Addr     // addresses already there, left alone (Apply)
	Removed   []Addr     // addresses removed (Release)
	Absent    []Addr     // addresses already gone (Release)
	Conflicts []Conflict // other holders overridden by Force
	Promoted  []string   // interfaces where promote_secondaries was enabled to keep other addresses
	// HostnameFrom → HostnameTo when the host name changed.
	HostnameFrom, HostnameTo string
	// AnnounceErr is the first announcement failure of the burst Apply
	// started synchronously (the addresses are in place regardless).
	AnnounceErr error
}

// Changed reports whether r changed anything.
func (r Report) Changed() bool {
	return len(r.Added)+len(r.Removed) > 0 || r.HostnameFrom != r.HostnameTo || len(r.Promoted) > 0
}

// String renders r one change per line, for people.
func (r Report) String() string {
	var b strings.Builder
	for _, c := range r.Conflicts {
		fmt.Fprintf(&b, "forced  %s\n", c)
	}
	for _, i := range r.Promoted {
		fmt.Fprintf(&b, "sysctl  net.ipv4.conf.%s.promote_secondaries=1 (keeps the other addresses of the subnet)\n", i)
	}
	for _, a := range r.Added {
		fmt.Fprintf(&b, "added   %s dev %s\n", a.Prefix, a.Iface)
	}
	for _, a := range r.Present {
		fmt.Fprintf(&b, "present %s dev %s (unchanged)\n", a.Prefix, a.Iface)
	}
	for _, a := range r.Removed {
		fmt.Fprintf(&b, "removed %s dev %s\n", a.Prefix, a.Iface)
	}
	for _, a := range r.Absent {
		fmt.Fprintf(&b, "absent  %s dev %s (unchanged)\n", a.Prefix, a.Iface)
	}
	if r.HostnameFrom != r.HostnameTo {
		fmt.Fprintf(&b, "hostname %s (was %s)\n", r.HostnameTo, r.HostnameFrom)
	}
	if r.AnnounceErr != nil {
		fmt.Fprintf(&b, "warning: announcement failed: %v\n", r.AnnounceErr)
	}
	return b.String()
}

// ApplyOptions modify one Apply.
type ApplyOptions struct {
	// Force adds addresses even when another host answers for them (the
	// conflicts are logged and reported) or their interface is down.
	Force bool
}

// Manager applies and releases a host's network identity. Its methods are
// safe for concurrent use; Apply and Release are serialized. One Manager
// can serve several identities (jobs) at once: announcements are tracked
// per address, so applying or releasing one identity leaves the
// announcements of another alone.
type Manager struct {
	log  *slog.Logger
	k    Kernel
	w    Wire
	conf Config

	mu       sync.Mutex // serializes Apply/Release/Close
	prevHost string     // host name Apply replaced ("" when it did not)
	ourHost  string     // host name Apply set
	runs     map[netip.Addr]*announceRun
}

// announceRun is the background announcement schedule of one address.
type announceRun struct {
	cancel context.CancelFunc
	done   chan struct{} // closed when the run ends
}

// New returns a Manager changing k and talking on w (for the real host:
// sys, _ := OpenLinux(nil, netns.None()); New(log, sys, sys, Config{})).
func New(log *slog.Logger, k Kernel, w Wire, conf Config) *Manager {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Manager{log: log, k: k, w: w, conf: conf.withDefaults(), runs: map[netip.Addr]*announceRun{}}
}

// target is one address of an identity with its resolved link.
type target struct {
	Addr
	link    Link
	present bool
}

// resolve checks every address of id against the kernel without changing
// anything: the interface exists, does the address family, and does not hold
// the same address with another prefix length.
func (m *Manager) resolve(id Identity) ([]target, error) {
	if err := id.Validate(); err != nil {
		return nil, err
	}
	links := map[string]Link{}
	held := map[string][]HostAddr{}
	ts := make([]target, 0, len(id.Addrs))
	for _, a := range id.Addrs {
		l, ok := links[a.Iface]
		if !ok {
			var err error
			if l, err = m.k.Link(a.Iface); err != nil {
				return nil, fmt.Errorf("%s: %w", a, err)
			}
			if held[a.Iface], err = m.k.Addrs(l); err != nil {
				return nil, fmt.Errorf("%s: list addresses: %w", a, err)
			}
			links[a.Iface] = l
		}
		if a.Is6() && l.NoIPv6 {
			return nil, fmt.Errorf("%s: %w: IPv6 is disabled on %s (sysctl net.ipv6.conf.%s.disable_ipv6)", a, ErrFamily, l.Name, l.Name)
		}
		t := target{Addr: a, link: l}
		for _, h := range held[a.Iface] {
			if h.Prefix.Addr() != a.Prefix.Addr() {
				continue
			}
			if h.Prefix.Bits() == a.Prefix.Bits() {
				t.present = true
				break
			}
			return nil, fmt.Errorf("%s: %s already holds it as %s: remove that first", a, l.Name, h.Prefix)
		}
		ts = append(ts, t)
	}
	return ts, nil
}

// Apply makes this host carry id: it adds the addresses that are missing,
// sets the host name, and announces every address of id. It is idempotent:
// addresses already in place are left alone (and announced again), and
// addresses not in id are never touched.
//
// Before adding, Apply probes for another host answering for each new
// address (Config.ProbeWait, all at once) and refuses with a *ConflictError
// naming the MACs that answered, unless opts.Force. Bad input (malformed
// identity, unknown interface, IPv6 on an interface without it) is refused
// before anything changes; if adding fails half-way, the addresses added by
// this call are removed again.
//
// The first announcement of every address is sent before Apply returns; the
// rest run in the background until done, or until a Release or the next
// Apply of the same address, or Close, stops them (other addresses'
// announcements go on). ctx bounds the probe and the changes, not the
// announcements.
func (m *Manager) Apply(ctx context.Context, id Identity, opts ApplyOptions) (Report, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	var r Report
	ts, err := m.resolve(id)
	if err != nil {
		return r, fmt.Errorf("apply: %w", err)
	}
	var missing []*target
	for i := range ts {
		t := &ts[i]
		if t.present {
			r.Present = append(r.Present, t.Addr)
			continue
		}
		if !t.link.Up {
			if !opts.Force {
				return Report{}, fmt.Errorf("apply: %s: %w (ip link set %s up, or force)", t.Addr, ErrLinkDown, t.link.Name)
			}
			m.log.Warn("adding address to an interface that is down", "addr", t.Addr.String())
		}
		missing = append(missing, t)
	}

	if len(missing) > 0 && m.conf.ProbeWait > 0 {
		conflicts, err := m.probe(ctx, missing, opts.Force)
		if err != nil {
			return Report{}, fmt.Errorf("apply: %w", err)
		}
		if len(conflicts) > 0 {
			if !opts.Force {
				return Report{}, fmt.Errorf("apply: %w", &ConflictError{Conflicts: conflicts})
			}
			for _, c := range conflicts {
				m.log.Warn("taking over an address another host answers for (forced)", "addr", c.Addr.String(), "mac", c.MAC.String())
			}
			r.Conflicts = conflicts
		}
	}
	if err := ctx.Err(); err != nil {
		return Report{}, fmt.Errorf("apply: %w", err)
	}

	var fresh []Addr // added on links that are up
	for _, t := range missing {
		if err := m.k.AddAddr(t.link, t.Prefix); err != nil {
			if errors.Is(err, ErrExists) { // appeared since resolve: someone else added it
				r.Present = append(r.Present, t.Addr)
				continue
			}
			rerr := m.undo(r.Added)
			return Report{}, errors.Join(fmt.Errorf("apply: add %s: %w", t.Addr, err), rerr)
		}
		m.log.Info("service address added", "addr", t.Addr.String())
		r.Added = append(r.Added, t.Addr)
		if t.link.Up {
			fresh = append(fresh, t.Addr) // announced: worth waiting for
		}
	}

	m.waitUsable(ctx, fresh)

	if id.Hostname != "" {
		cur, err := m.k.Hostname()
		if err == nil && cur != id.Hostname {
			err = m.k.SetHostname(id.Hostname)
		}
		if err != nil {
			rerr := m.undo(r.Added)
			return Report{}, errors.Join(fmt.Errorf("apply: host name: %w", err), rerr)
		}
		if cur != id.Hostname {
			if m.ourHost == "" {
				m.prevHost = cur
			}
			m.ourHost = id.Hostname
			r.HostnameFrom, r.HostnameTo = cur, id.Hostname
			m.log.Info("host name taken over", "from", cur, "to", id.Hostname)
		}
	}

	r.AnnounceErr = m.startAnnouncing(ts)
	return r, nil
}

// probe probes every target at once and returns the conflicts.
func (m *Manager) probe(ctx context.Context, ts []*target, force bool) ([]Conflict, error) {
	type result struct {
		mac net.HardwareAddr
		err error
	}
	res := make([]result, len(ts))
	var wg sync.WaitGroup
	for i, t := range ts {
		if t.link.NoARP {
			m.log.Debug("no neighbour resolution on the interface: not probed", "addr", t.Addr.String())
			continue
		}
		wg.Go(func() {
			mac, err := m.w.Probe(ctx, t.link, t.Prefix.Addr(), m.conf.ProbeWait)
			res[i] = result{mac, err}
		})
	}
	wg.Wait()
	var conflicts []Conflict
	for i, t := range ts {
		switch {
		case res[i].err != nil && force:
			m.log.Warn("probe failed, adding anyway (forced)", "addr", t.Addr.String(), "err", res[i].err)
		case res[i].err != nil:
			return nil, fmt.Errorf("probe %s: %w", t.Addr, res[i].err)
		case res[i].mac != nil:
			conflicts = append(conflicts, Conflict{Addr: t.Addr, MAC: res[i].mac})
		}
	}
	return conflicts, nil
}

// usableWait bounds how long Apply waits for new addresses to become
// local before announcing them anyway.
const usableWait = 2 * time.Second

// waitUsable waits until the kernel takes every address just added as
// local. IPv4 addresses are at once; IPv6 ones, even with NODAD, a few
// milliseconds later (the kernel finishes them from a work queue). A
// neighbour told about an address before then sends its first packets into
// a void: a TCP SYN lost that way costs the client a 1 s retransmission.
func (m *Manager) waitUsable(ctx context.Context, added []Addr) {
	start := time.Now()
	for _, a := range added {
		for {
			ok, err := m.k.Local(a.Prefix.Addr())
			if err != nil {
				m.log.Warn("cannot tell whether the address is usable yet", "addr", a.String(), "err", err)
				break
			}
			if ok {
				break
			}
			if time.Since(start) > usableWait || ctx.Err() != nil {
				m.log.Warn("address not local yet; announcing anyway", "addr", a.String(), "waited", time.Since(start))
				return
			}
			time.Sleep(500 * time.Microsecond)
		}
	}
	m.log.Debug("new addresses usable", "waited", time.Since(start))
}

// undo removes addresses this Apply added, after a later step failed.
func (m *Manager) undo(added []Addr) error {
	var errs []error
	for _, a := range added {
		l, err := m.k.Link(a.Iface)
		if err == nil {
			err = m.k.DelAddr(l, a.Prefix)
		}
		if err != nil && !errors.Is(err, ErrAbsent) {
			errs = append(errs, fmt.Errorf("undo add %s: %w", a, err))
		}
	}
	return errors.Join(errs...)
}

// startAnnouncing stops the running announcements of the targets' addresses,
// sends the first announcement of every target and starts the rest in the
// background, one schedule per address. It returns the first send error of
// the first round. Called with m.mu held.
func (m *Manager) startAnnouncing(ts []target) error {
	ts = slices.DeleteFunc(slices.Clone(ts), func(t target) bool { return t.link.NoARP })
	for _, t := range ts {
		m.stopAnnouncing(t.Prefix.Addr())
	}
	announce := func(t target) error {
		err := m.w.Announce(t.link, t.Prefix.Addr())
		if err != nil {
			m.log.Warn("announcement failed", "addr", t.Addr.String(), "err", err)
			err = fmt.Errorf("announce %s: %w", t.Addr, err)
		}
		return err
	}
	start := time.Now()
	var first error
	for _, t := range ts {
		if err := announce(t); err != nil && first == nil {
			first = err
		}
	}
	// Offsets from start of every announcement after the first.
	var at []time.Duration
	for burst := range 2 {
		if burst == 1 && m.conf.SecondBurst < 0 {
			break
		}
		base := time.Duration(burst) * m.conf.SecondBurst
		for i := range m.conf.AnnounceCount {
			if burst == 0 && i == 0 {
				continue
			}
			at = append(at, base+time.Duration(i)*m.conf.AnnounceInterval)
		}
	}
	for _, t := range ts {
		ctx, cancel := context.WithCancel(context.Background())
		run := &announceRun{cancel: cancel, done: make(chan struct{})}
		m.runs[t.Prefix.Addr()] = run
		go func() {
			defer close(run.done)
			timer := time.NewTimer(0)
			defer timer.Stop()
			<-timer.C
			for _, d := range at {
				timer.Reset(time.Until(start.Add(d)))
				select {
				case <-ctx.Done():
					return
				case <-timer.C:
				}
				announce(t)
			}
			m.log.Debug("announcements done", "addr", t.Addr.String(), "rounds", len(at)+1)
		}()
	}
	return first
}

// stopAnnouncing cancels the announcements of addr, if any, and waits for
// them to stop. Called with m.mu held.
func (m *Manager) stopAnnouncing(addr netip.Addr) {
	if run, ok := m.runs[addr]; ok {
		run.cancel()
		<-run.done
		delete(m.runs, addr)
	}
}

// Wait blocks until the running announcements are done (or stopped), or
// ctx ends.
func (m *Manager) Wait(ctx context.Context) error {
	m.mu.Lock()
	var dones []chan struct{}
	for _, run := range m.runs {
		dones = append(dones, run.done)
	}
	m.mu.Unlock()
	for _, done := range dones {
		select {
		case <-done:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return nil
}

// Release gives id up: it stops the announcements of id's addresses, removes id's addresses
// that are present, and restores the host name Apply replaced. Addresses
// already gone are not an error, and addresses not in id are never touched:
// before removing a primary IPv4 address that has secondaries in its subnet
// (say, the replication address), Release enables promote_secondaries on
// the interface so the kernel keeps them. Bad input (malformed identity,
// unknown interface) is refused before anything changes; removal errors do
// not stop the other removals and are joined.
func (m *Manager) Release(ctx context.Context, id Identity) (Report, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	var r Report
	ts, err := m.resolve(id)
	if err != nil {
		return r, fmt.Errorf("release: %w", err)
	}
	for _, t := range ts {
		m.stopAnnouncing(t.Prefix.Addr())
	}
	var errs []error
	promoted := map[string]bool{}
	for _, t := range ts {
		if err := ctx.Err(); err != nil {
			errs = append(errs, err)
			break
		}
		if !t.present {
			r.Absent = append(r.Absent, t.Addr)
			continue
		}
		if !t.Is6() && !promoted[t.link.Name] {
			keep, err := m.hasSecondaries(t)
			if err == nil && keep {
				err = m.k.PromoteSecondaries(t.link)
				if err == nil {
					promoted[t.link.Name] = true
					r.Promoted = append(r.Promoted, t.link.Name)
					m.log.Info("enabled promote_secondaries to keep the other addresses of the subnet", "iface", t.link.Name)
				}
			}
			if err != nil {
				errs = append(errs, fmt.Errorf("release %s: keep secondaries: %w", t.Addr, err))
				continue
			}
		}
		switch err := m.k.DelAddr(t.link, t.Prefix); {
		case errors.Is(err, ErrAbsent):
			r.Absent = append(r.Absent, t.Addr)
		case err != nil:
			errs = append(errs, fmt.Errorf("release %s: %w", t.Addr, err))
		default:
			m.log.Info("service address removed", "addr", t.Addr.String())
			r.Removed = append(r.Removed, t.Addr)
		}
	}
	if m.ourHost != "" && (id.Hostname == "" || id.Hostname == m.ourHost) {
		cur, err := m.k.Hostname()
		switch {
		case err != nil:
			errs = append(errs, fmt.Errorf("release: host name: %w", err))
		case cur != m.ourHost:
			m.log.Warn("host name changed since takeover; not restoring it", "now", cur, "was", m.prevHost)
			m.ourHost, m.prevHost = "", ""
		default:
			if err := m.k.SetHostname(m.prevHost); err != nil {
				errs = append(errs, fmt.Errorf("release: restore host name %q: %w", m.prevHost, err))
				break
			}
			r.HostnameFrom, r.HostnameTo = cur, m.prevHost
			m.log.Info("host name restored", "to", m.prevHost)
			m.ourHost, m.prevHost = "", ""
		}
	}
	return r, errors.Join(errs...)
}

// hasSecondaries reports whether t is a primary IPv4 address with
// secondaries in its subnet, which the kernel would delete with it.
func (m *Manager) hasSecondaries(t target) (bool, error) {
	held, err := m.k.Addrs(t.link)
	if err != nil {
		return false, err
	}
	primary := false
	others := false
	for _, h := range held {
		if !h.Prefix.Addr().Is4() || h.Prefix.Bits() != t.Prefix.Bits() || h.Prefix.Masked() != t.Prefix.Masked() {
			continue
		}
		if h.Prefix == t.Prefix {
			primary = !h.Secondary
		} else if h.Secondary {
			others = true
		}
	}
	return primary && others, nil
}

// Close stops all announcements. The addresses stay.
func (m *Manager) Close() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	for addr := range m.runs {
		m.stopAnnouncing(addr)
	}
	return nil
}
