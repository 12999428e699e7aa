// Package job holds doppel's protection-job definitions (Spec), their
// validation, the check that a volume may be protected, and the job store:
// one JSON file per job under the agent's state directory, written
// atomically (temp file, fsync, rename, fsync of the directory) so that a
// crash leaves either the old or the new record, never a torn one.
package job

import (
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net/netip"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/doppelha/doppel/daemon/ha"
)

// Errors the store and validation return; the API maps them to statuses.
var (
	ErrNotFound = errors.New("job not found")
	ErrExists   = errors.New("job already exists")
	ErrInvalid  = errors.New("invalid job")
)

// Replication modes.
const (
	ModeSync  = "sync"  // acknowledged once the target applied it (DRBD protocol C)
	ModeAsync = "async" // acknowledged once local, shipped in order (protocol A)
)

// Defaults.
const (
	DefaultInterval = 250 * time.Millisecond
	DefaultMissed   = 8
	MinInterval     = 50 * time.Millisecond
	MinMissed       = 3

	// ArbiterEtcd is the one arbiter doppel has.
	ArbiterEtcd           = "etcd"
	DefaultLeaseTTL       = 5 * time.Second
	MinLeaseTTL           = 2 * time.Second
	MaxLeaseTTL           = 120 * time.Second
	DefaultSuspendTimeout = 30 * time.Second
)

// Endpoint is one agent of a job as the operator's CLI knows it.
type Endpoint struct {
	Name        string `json:"name"`        // the server name given to doppel server add
	Control     string `json:"control"`     // HOST:PORT of its control API
	Repl        string `json:"repl"`        // HOST:PORT of its replication listener
	Fingerprint string `json:"fingerprint"` // its TLS certificate, pinned
}

// ServiceIP is an address that follows the job's active side.
type ServiceIP struct {
	Prefix string `json:"prefix"` // CIDR, e.g. 172.17.22.187/24 or 2001:db8::10/64
	Iface  string `json:"iface"`  // the interface on the source
}

// Monitor configures failure detection.
type Monitor struct {
	Interval time.Duration `json:"interval"`
	Missed   int           `json:"missed"`
}

// Spec is a protection job as created by doppel job create.
type Spec struct {
	Name   string   `json:"name"`
	Source Endpoint `json:"source"`
	Target Endpoint `json:"target"`
	// Volume is the block device or file protected on the source and
	// written on the target (same path on both).
	Volume string `json:"volume"`
	// TargetVolume is the volume's path on the target when it differs.
	TargetVolume string `json:"target_volume,omitempty"`
	// Size, in bytes, of a file volume to create when missing; 0 for an
	// existing device or file.
	Size       int64              `json:"size,omitempty"`
	Mode       string             `json:"mode"`
	ServiceIPs []ServiceIP        `json:"service_ips,omitempty"`
	MapIface   map[string]string  `json:"map_iface,omitempty"` // source iface -> target iface
	Monitor    Monitor            `json:"monitor"`
	Failover   ha.FailoverMode    `json:"failover"`
	Scripts    map[ha.Hook]string `json:"scripts,omitempty"`
	// Arbiter is "etcd" when promotions go through the agents' etcd
	// arbiter (docs/safety.md; endpoints in each agent's config), "" for
	// none.
	Arbiter string `json:"arbiter,omitempty"`
	// LeaseTTL is the source's lease on the arbiter (default 5 s).
	LeaseTTL time.Duration `json:"lease_ttl,omitempty"`
	// SuspendTimeout bounds how long writes the source may not acknowledge
	// (lease lost, target gone) are held before they fail with EIO
	// (default 30 s; negative: hold them forever).
	SuspendTimeout time.Duration `json:"suspend_timeout,omitempty"`
	// Secret authenticates the two agents' messages to each other; it is
	// created by the CLI and never shown in status.
	Secret string `json:"secret,omitempty"`
	// UUID names this incarnation of the job: a job deleted and created
	// again under the same name is another job, and state one side kept
	// from the earlier one is never taken for its own. Made by the CLI;
	// when empty, derived from Secret (IncarnationOf).
	UUID string `json:"uuid,omitempty"`
	// VolumeSize is the replicated size in bytes: the source volume's
	// size when the job was created (the target's volume may be larger;
	// its tail is not used). 0: each side uses its volume's own size,
	// which must then be equal.
	VolumeSize int64 `json:"volume_size,omitempty"`
	// QueueMemory and QueueDisk bound the source's replication queue,
	// in bytes: writes the target has not taken yet (an outage, a slow
	// link) wait there, and beyond both they are tracked in the dirty
	// bitmap and resynced when the target is back. 0: the defaults (128
	// MiB, 2048 MiB); QueueDisk -1: no disk queue.
	QueueMemory int64 `json:"queue_memory,omitempty"`
	QueueDisk   int64 `json:"queue_disk,omitempty"`
	// RateLimit caps the source's replication traffic (stream, mirror
	// and resync) in bytes per second; 0: the agent's setting (none by
	// default).
	RateLimit int64 `json:"rate_limit,omitempty"`
}

// Bounds of the queue and rate options. A memory queue below MinQueue
// cannot hold the mirror's 1 MiB reads with room to spare: without a
// disk queue, a 1 MiB one never completes the first mirror.
const (
	MinQueue     = 4 << 20
	MinRateLimit = 64 << 10
)

var uuidRE = regexp.MustCompile(`^[0-9a-f][0-9a-f-]{7,63}$`)

// IncarnationOf is the job UUID derived from a spec's secret, for specs
// that carry none: both sides share the secret, so they derive the same.
func IncarnationOf(secret string) string {
	sum := sha256.Sum256([]byte("doppel job incarnation\x00" + secret))
	return hex.EncodeToString(sum[:16])
}

// NewSecret returns a random job secret (32 bytes, hex): what the two
// agents of a job authenticate each other's messages with.
func NewSecret() string {
	var b [32]byte
	rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// NewUUID returns a random (version 4) UUID.
func NewUUID() string {
	var b [16]byte
	rand.Read(b[:])
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	h := hex.EncodeToString(b[:])
	return h[0:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:]
}

var nameRE = regexp.MustCompile(`^[a-z0-9][a-z0-9_.-]{0,62}$`)

// ValidName checks a job or server name: lowercase letters, digits, '.',
// '_' and '-', at most 63 characters, starting with a letter or digit.
func ValidName(kind, name string) error {
	if !nameRE.MatchString(name) {
		return fmt.Errorf("%w: %s name %q: use 1-63 lowercase letters, digits, '.', '_' or '-', starting with a letter or digit", ErrInvalid, kind, name)
	}
	return nil
}

// Defaults fills the defaults of unset optional fields.
func (s *Spec) Defaults() {
	if s.Mode == "" {
		s.Mode = ModeSync
	}
	if s.Monitor.Interval == 0 {
		s.Monitor.Interval = DefaultInterval
	}
	if s.Monitor.Missed == 0 {
		s.Monitor.Missed = DefaultMissed
	}
	if s.Failover == "" {
		s.Failover = ha.FailoverManual
	}
	if s.Arbiter != "" && s.LeaseTTL == 0 {
		s.LeaseTTL = DefaultLeaseTTL
	}
	if s.Arbiter != "" && s.SuspendTimeout == 0 {
		s.SuspendTimeout = DefaultSuspendTimeout
	}
}

// Validate checks every field and says what is wrong with the first bad one.
func (s *Spec) Validate() error {
	bad := func(format string, a ...any) error {
		return fmt.Errorf("%w %q: %s", ErrInvalid, s.Name, fmt.Sprintf(format, a...))
	}
	if err := ValidName("job", s.Name); err != nil {
		return err
	}
	for _, e := range []struct {
		role string
		ep   Endpoint
	}{{"source", s.Source}, {"target", s.Target}} {
		if err := ValidName(e.role+" server", e.ep.Name); err != nil {
			return err
		}
		if _, err := netip.ParseAddrPort(e.ep.Control); err != nil {
			if _, _, herr := splitHostPort(e.ep.Control); herr != nil {
				return bad("%s control address %q: %v", e.role, e.ep.Control, herr)
			}
		}
		if _, _, err := splitHostPort(e.ep.Repl); err != nil {
			return bad("%s replication address %q: %v", e.role, e.ep.Repl, err)
		}
		if !strings.HasPrefix(e.ep.Fingerprint, "sha256:") || len(e.ep.Fingerprint) != len("sha256:")+64 {
			return bad("%s fingerprint %q is not sha256:<64 hex digits>", e.role, e.ep.Fingerprint)
		}
	}
	if s.Source.Name == s.Target.Name {
		return bad("source and target are the same server %q", s.Source.Name)
	}
	if s.Source.Fingerprint == s.Target.Fingerprint {
		return bad("source %s and target %s are the same agent (same certificate)", s.Source.Name, s.Target.Name)
	}
	if !strings.HasPrefix(s.Volume, "/") {
		return bad("volume %q must be an absolute path", s.Volume)
	}
	if s.TargetVolume != "" && !strings.HasPrefix(s.TargetVolume, "/") {
		return bad("target volume %q must be an absolute path", s.TargetVolume)
	}
	if s.Size < 0 {
		return bad("size %d is negative", s.Size)
	}
	if s.VolumeSize < 0 || s.VolumeSize%512 != 0 {
		return bad("volume size %d is not a non-negative multiple of 512", s.VolumeSize)
	}
	if s.QueueMemory != 0 && s.QueueMemory < MinQueue {
		return bad("queue size %d: want at least %d bytes (4M), or 0 for the default", s.QueueMemory, MinQueue)
	}
	if s.QueueDisk != 0 && s.QueueDisk != -1 && s.QueueDisk < MinQueue {
		return bad("disk queue size %d: want at least %d bytes (4M), 0 for the default or -1 for none", s.QueueDisk, MinQueue)
	}
	if s.RateLimit != 0 {
		if s.RateLimit < MinRateLimit {
			return bad("rate limit %d bytes/s: want at least %d (64K), or 0 for none", s.RateLimit, MinRateLimit)
		}
		// One resync chunk (64 KiB) must cross the link well within the
		// replication session's keepalive timeout, which follows the
		// monitor (interval × missed).
		chunk := time.Duration(float64(64<<10) / float64(s.RateLimit) * float64(time.Second))
		if bound := s.Monitor.Interval * time.Duration(s.Monitor.Missed) / 2; s.Monitor.Interval > 0 && chunk > bound {
			return bad("rate limit %d bytes/s: a 64 KiB chunk takes %v, more than half the monitor's %v × %d: the replication session would time out; raise the rate or the monitor settings",
				s.RateLimit, chunk.Round(time.Millisecond), s.Monitor.Interval, s.Monitor.Missed)
		}
	}
	if s.UUID != "" && !uuidRE.MatchString(s.UUID) {
		return bad("uuid %q: want 8-64 lowercase hex digits and dashes", s.UUID)
	}
	switch s.Arbiter {
	case "":
		if s.LeaseTTL != 0 {
			return bad("a lease TTL needs an arbiter (--arbiter etcd)")
		}
	case ArbiterEtcd:
		if s.LeaseTTL < MinLeaseTTL || s.LeaseTTL > MaxLeaseTTL {
			return bad("lease TTL %v: want %v to %v", s.LeaseTTL, MinLeaseTTL, MaxLeaseTTL)
		}
	default:
		return bad("arbiter %q: use etcd (or none)", s.Arbiter)
	}
	if s.Mode != ModeSync && s.Mode != ModeAsync {
		return bad("mode %q: use sync or async", s.Mode)
	}
	seen := map[netip.Addr]bool{}
	for _, ip := range s.ServiceIPs {
		p, err := netip.ParsePrefix(ip.Prefix)
		if err != nil {
			return bad("service IP %q: %v (want CIDR@IFACE, e.g. 172.17.22.187/24@eth0)", ip.Prefix, err)
		}
		if seen[p.Addr()] {
			return bad("service IP %s given twice", p.Addr())
		}
		seen[p.Addr()] = true
		if err := validIface(ip.Iface); err != nil {
			return bad("service IP %s: %v", ip.Prefix, err)
		}
	}
	for src, tgt := range s.MapIface {
		if err := validIface(src); err != nil {
			return bad("--map-iface %s=%s: %v", src, tgt, err)
		}
		if err := validIface(tgt); err != nil {
			return bad("--map-iface %s=%s: %v", src, tgt, err)
		}
	}
	if s.Monitor.Interval < MinInterval {
		return bad("monitor interval %v is below the minimum %v", s.Monitor.Interval, MinInterval)
	}
	if s.Monitor.Missed < MinMissed {
		return bad("monitor missed=%d is below the minimum %d", s.Monitor.Missed, MinMissed)
	}
	if s.Failover != ha.FailoverAuto && s.Failover != ha.FailoverManual {
		return bad("failover %q: use auto or manual", s.Failover)
	}
	for hook, path := range s.Scripts {
		if !slices.Contains(ha.Hooks, hook) {
			return bad("script hook %q: use one of %v", hook, ha.Hooks)
		}
		if !strings.HasPrefix(path, "/") {
			return bad("script %s=%q must be an absolute path", hook, path)
		}
	}
	if len(s.Secret) < 32 {
		return bad("peer secret missing or shorter than 32 characters")
	}
	return nil
}

func validIface(name string) error {
	if name == "" || len(name) > 15 || strings.ContainsAny(name, "/ \t\n:") || name == "." || name == ".." {
		return fmt.Errorf("interface name %q is not valid", name)
	}
	return nil
}

func splitHostPort(hp string) (string, int, error) {
	i := strings.LastIndex(hp, ":")
	if i <= 0 {
		return "", 0, fmt.Errorf("want HOST:PORT")
	}
	host, ps := strings.Trim(hp[:i], "[]"), hp[i+1:]
	port, err := strconv.Atoi(ps)
	if err != nil || port < 1 || port > 65535 {
		return "", 0, fmt.Errorf("port %q is not 1-65535", ps)
	}
	if host == "" {
		return "", 0, fmt.Errorf("empty host")
	}
	return host, port, nil
}

// VolumeOn is the volume's path on the named server.
func (s *Spec) VolumeOn(server string) string {
	if server == s.Target.Name && s.TargetVolume != "" {
		return s.TargetVolume
	}
	return s.Volume
}

// Redacted returns the spec without its secret, for status output.
func (s Spec) Redacted() Spec {
	s.Secret = ""
	return s
}

// Endpoint returns the endpoint named name and the other one.
func (s *Spec) Endpoints(self string) (me, peer Endpoint, ok bool) {
	switch self {
	case s.Source.Name:
		return s.Source, s.Target, true
	case s.Target.Name:
		return s.Target, s.Source, true
	}
	return Endpoint{}, Endpoint{}, false
}

// ParseServiceIPs parses each CIDR@IFACE of ss.
func ParseServiceIPs(ss []string) ([]ServiceIP, error) {
	var out []ServiceIP
	for _, s := range ss {
		ip, err := ParseServiceIP(s)
		if err != nil {
			return nil, err
		}
		out = append(out, ip)
	}
	return out, nil
}

// ParseInterfaceMap parses SRCIFACE=TGTIFACE entries (what names them in
// errors: a flag or a form field); nil when there are none.
func ParseInterfaceMap(what string, entries []string) (map[string]string, error) {
	var m map[string]string
	for _, s := range entries {
		src, tgt, ok := strings.Cut(s, "=")
		if !ok || src == "" || tgt == "" {
			return nil, fmt.Errorf("%w: %s %q: want SRCIFACE=TGTIFACE", ErrInvalid, what, s)
		}
		if m == nil {
			m = map[string]string{}
		}
		if _, dup := m[src]; dup {
			return nil, fmt.Errorf("%w: %s maps %s twice", ErrInvalid, what, src)
		}
		m[src] = tgt
	}
	return m, nil
}

// ParseServiceIP parses CIDR@IFACE.
func ParseServiceIP(s string) (ServiceIP, error) {
	cidr, iface, ok := strings.Cut(s, "@")
	if !ok {
		return ServiceIP{}, fmt.Errorf("%w: service IP %q: want CIDR@IFACE, e.g. 172.17.22.187/24@eth0", ErrInvalid, s)
	}
	p, err := netip.ParsePrefix(cidr)
	if err != nil {
		return ServiceIP{}, fmt.Errorf("%w: service IP %q: %v (want CIDR@IFACE, e.g. 172.17.22.187/24@eth0)", ErrInvalid, s, err)
	}
	if err := validIface(iface); err != nil {
		return ServiceIP{}, fmt.Errorf("%w: service IP %q: %v", ErrInvalid, s, err)
	}
	return ServiceIP{Prefix: p.String(), Iface: iface}, nil
}

// ParseMonitor parses "interval=250ms,missed=8" (either key may be left out).
func ParseMonitor(s string) (Monitor, error) {
	m := Monitor{Interval: DefaultInterval, Missed: DefaultMissed}
	for kv := range strings.SplitSeq(s, ",") {
		k, v, ok := strings.Cut(strings.TrimSpace(kv), "=")
		if !ok {
			return m, fmt.Errorf("%w: --monitor %q: want interval=DURATION,missed=N", ErrInvalid, s)
		}
		switch k {
		case "interval":
			d, err := time.ParseDuration(v)
			if err != nil {
				return m, fmt.Errorf("%w: --monitor interval %q: %v", ErrInvalid, v, err)
			}
			m.Interval = d
		case "missed":
			n, err := strconv.Atoi(v)
			if err != nil {
				return m, fmt.Errorf("%w: --monitor missed %q is not a number", ErrInvalid, v)
			}
			m.Missed = n
		default:
			return m, fmt.Errorf("%w: --monitor key %q: use interval or missed", ErrInvalid, k)
		}
	}
	if m.Interval < MinInterval || m.Missed < MinMissed {
		return m, fmt.Errorf("%w: --monitor %q: at least interval=%v and missed=%d", ErrInvalid, s, MinInterval, MinMissed)
	}
	return m, nil
}

// ParseSize parses a size with an optional binary suffix (K, M, G, T; KiB...).
func ParseSize(s string) (int64, error) {
	t := strings.TrimSuffix(strings.TrimSuffix(strings.ToUpper(strings.TrimSpace(s)), "IB"), "B")
	mult := int64(1)
	if n := len(t); n > 0 {
		switch t[n-1] {
		case 'K':
			mult = 1 << 10
		case 'M':
			mult = 1 << 20
		case 'G':
			mult = 1 << 30
		case 'T':
			mult = 1 << 40
		}
		if mult > 1 {
			t = t[:n-1]
		}
	}
	n, err := strconv.ParseInt(t, 10, 64)
	if err != nil || n <= 0 || n > (1<<62)/mult {
		return 0, fmt.Errorf("%w: size %q: want a positive number with an optional K, M, G or T suffix", ErrInvalid, s)
	}
	return n * mult, nil
}
