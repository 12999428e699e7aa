package faults

import (
	"fmt"
	"math/rand/v2"
	"os"
	"slices"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"
)

// fault is one kind of fault the suite injects on the current source
// (src) and target (tgt). inject starts it and returns what heals it.
type fault struct {
	name string
	// failover: the fault may lead to a promotion (the source loses its
	// lease: it is cut from etcd, killed or paused). Any other fault that
	// leads to one breaks (e).
	failover bool
	// leaseLost: the source can no longer renew from the fault's start,
	// so no promotion may be granted before its lease can have expired.
	leaseLost bool
	// isolates: the source is cut from everything (its write stalls are
	// reported as an isolated source's).
	isolates bool
	// etcdLoss: etcd loses its majority (the source's write stalls are
	// reported as a healthy source's during etcd loss).
	etcdLoss bool
	// hold: how long the fault lasts in the single-fault table.
	hold   time.Duration
	inject func(c *cluster, src, tgt string, rng *rand.Rand, hold time.Duration) (heal func())
}

// failHold is long enough for a failover: detection, the lease, slack.
const failHold = detect + leaseTTL + 2*time.Second

var faults = []fault{
	{name: "etcd-minority-down", hold: 2 * leaseTTL, inject: func(c *cluster, _, _ string, rng *rand.Rand, _ time.Duration) func() {
		return c.etcdDown(rng, 1)
	}},
	{name: "etcd-majority-down", etcdLoss: true, hold: 3 * leaseTTL, inject: func(c *cluster, _, _ string, rng *rand.Rand, _ time.Duration) func() {
		return c.etcdDown(rng, 2)
	}},
	{name: "target-cut-from-etcd", hold: 2*leaseTTL + detect, inject: func(c *cluster, _, tgt string, _ *rand.Rand, _ time.Duration) func() {
		return c.cut([]string{tgt}, []string{"e1", "e2", "e3"}, true)
	}},
	{name: "hosts-cut", hold: 2*leaseTTL + detect, inject: func(c *cluster, src, tgt string, _ *rand.Rand, _ time.Duration) func() {
		return c.cut([]string{src}, []string{tgt}, true)
	}},
	{name: "one-way-loss-source-to-target", hold: 2*leaseTTL + detect, inject: func(c *cluster, src, tgt string, _ *rand.Rand, _ time.Duration) func() {
		return c.cut([]string{src}, []string{tgt}, false)
	}},
	{name: "one-way-loss-target-to-source", hold: 2*leaseTTL + detect, inject: func(c *cluster, src, tgt string, _ *rand.Rand, _ time.Duration) func() {
		return c.cut([]string{tgt}, []string{src}, false)
	}},
	{name: "spoofed-heartbeats-live-source", hold: 2*leaseTTL + detect, inject: func(c *cluster, src, tgt string, rng *rand.Rand, hold time.Duration) func() {
		return c.spoof(src, tgt, rng, hold)
	}},
	{name: "target-agent-kill", hold: leaseTTL, inject: func(c *cluster, _, tgt string, _ *rand.Rand, _ time.Duration) func() {
		return c.killAgent(tgt)
	}},
	{name: "source-agent-kill-quick-restart", failover: true, leaseLost: true, hold: 300 * time.Millisecond, inject: func(c *cluster, src, _ string, _ *rand.Rand, _ time.Duration) func() {
		return c.killAgent(src)
	}},
	{name: "source-links-down", failover: true, leaseLost: true, isolates: true, hold: failHold, inject: func(c *cluster, src, _ string, _ *rand.Rand, _ time.Duration) func() {
		return c.linksDown(src)
	}},
	{name: "source-silent-blackhole", failover: true, leaseLost: true, isolates: true, hold: failHold, inject: func(c *cluster, src, _ string, _ *rand.Rand, _ time.Duration) func() {
		return c.blackhole(src)
	}},
	{name: "source-cut-from-target-and-etcd", failover: true, leaseLost: true, isolates: true, hold: failHold, inject: func(c *cluster, src, tgt string, _ *rand.Rand, _ time.Duration) func() {
		return c.cut([]string{src}, []string{tgt, "e1", "e2", "e3"}, true)
	}},
	{name: "source-agent-pause", failover: true, leaseLost: true, hold: failHold, inject: func(c *cluster, src, _ string, _ *rand.Rand, _ time.Duration) func() {
		return c.pauseAgent(src)
	}},
	{name: "source-agent-kill", failover: true, leaseLost: true, hold: failHold, inject: func(c *cluster, src, _ string, _ *rand.Rand, _ time.Duration) func() {
		return c.killAgent(src)
	}},
	{name: "source-agent-kill-spoofed-heartbeats", failover: true, leaseLost: true, hold: failHold, inject: func(c *cluster, src, tgt string, rng *rand.Rand, hold time.Duration) func() {
		heal := c.killAgent(src)
		stop := c.spoof(src, tgt, rng, hold)
		return func() { stop(); heal() }
	}},
}

// cutFromArbiter is a fault that kept host from renewing its lease from
// from until healed.
type cutFromArbiter struct {
	host         string
	from, healed time.Duration
}

// renewalsFrom is the time since which src may have made no successful
// renewal when a fault starts at t0: t0, or the start of the previous fault
// that cut src off if that was healed too recently for a renewal to have
// completed since (a renewal runs every TTL/5 and may take TTL/5).
func (c *cluster) renewalsFrom(src string, t0 time.Duration) time.Duration {
	if p := c.lastCut; p != nil && p.host == src && t0-p.healed < 2*leaseTTL/5+100*time.Millisecond {
		return p.from
	}
	return t0
}

// run injects f for hold, heals it, and checks what followed: no
// promotion unless the fault allows one (e), none before the source's
// lease can have expired, writes served on the promoted side within the
// RTO budget (f), the old source fenced within fenceBound of the heal
// (d); a promotion ends the round (its history is checked: a, b, c) and
// the job is reversed. It returns the source afterwards.
func (c *cluster) run(f fault, src string, hold time.Duration, rng *rand.Rand) string {
	tgt := other(src)
	t0 := c.rec.since()
	c.logf("fault %s (source %s, target %s) for %v", f.name, src, tgt, hold.Round(time.Millisecond))
	from := c.renewalsFrom(src, t0)
	heal := f.inject(c, src, tgt, rng, hold)
	time.Sleep(hold)
	tHeal := c.rec.since()
	heal()
	if f.leaseLost {
		c.lastCut = &cutFromArbiter{host: src, from: from, healed: c.rec.since()}
	} else {
		c.lastCut = nil
	}
	c.logf("healed %s", f.name)
	c.figures.count(f.name)

	// Wait for the job to settle: PROTECTED again, or a promotion.
	var ps []Promotion
	deadline := time.Now().Add(90 * time.Second)
	for {
		var err error
		ps, err = c.promotions(t0)
		if err != nil {
			c.logf("epoch history: %v", err)
		}
		if len(ps) > 0 {
			break
		}
		st, err := c.status("client", "")
		if err == nil && st.Headline == "PROTECTED" && c.protected(st, src) {
			break
		}
		if time.Now().After(deadline) {
			c.fail("%s: neither PROTECTED again nor failed over 90 s after the heal: %s %s", f.name, st.Headline, st.Reason)
			return src
		}
		time.Sleep(250 * time.Millisecond)
	}
	c.stalls(f, src, t0, c.rec.since())
	if len(ps) == 0 {
		return src
	}
	p := ps[len(ps)-1]
	c.logf("promotion: epoch %d granted to %s at %v (announced %v), %v after the fault", p.Epoch, p.Holder, p.Granted, p.Announced, p.Granted-t0)
	if last, ok := c.lastAck(src, t0); ok {
		c.logf("last write acknowledged by the old source %s: %v after the fault", src, last.Round(time.Millisecond))
	} else {
		c.logf("last write acknowledged by the old source %s: none after the fault", src)
	}
	if !f.failover {
		c.fail("(e) %s: epoch %d granted to %s at %v although the source %s kept its lease (fault at %v)", f.name, p.Epoch, p.Holder, p.Granted, src, t0)
	}
	// The source's last renewal began at most TTL/5 before it was cut
	// off (renewalsFrom); its lease cannot expire before that + TTL (etcd
	// counts from when the renewal arrived).
	if earliest := from - leaseTTL/5 + leaseTTL - 100*time.Millisecond; f.leaseLost && p.Granted < earliest {
		c.fail("(e) %s: epoch %d granted at %v, before the source's lease can have expired (fault at %v, source cut off from renewing since %v, earliest %v)", f.name, p.Epoch, p.Granted, t0, from, earliest)
	}
	// (f) writes served again on the promoted side.
	newSrc := p.Holder
	if rto, ok := c.firstAck(newSrc, t0, 30*time.Second); ok {
		c.figures.rto = append(c.figures.rto, rto)
		c.logf("RTO %v (fault to the first write acknowledged by %s; budget %v)", rto.Round(time.Millisecond), newSrc, rtoBudget)
		if rto > rtoBudget {
			c.fail("(f) %s: the first write on %s acknowledged %v after the source failed: more than detection + TTL + 1 s = %v", f.name, newSrc, rto, rtoBudget)
		}
	} else {
		c.fail("(f) %s: no write acknowledged by the promoted %s within 30 s", f.name, newSrc)
	}
	// (d) the old source fenced after the heal.
	if d, ok := c.waitFenced(src, newSrc, fenceBound+20*time.Second); ok {
		c.figures.fence = append(c.figures.fence, d-tHeal)
		c.logf("old source %s fenced %v after the heal", src, (d - tHeal).Round(time.Millisecond))
		if d-tHeal > fenceBound {
			c.fail("(d) %s: the old source %s fenced %v after the heal: more than %v", f.name, src, d-tHeal, fenceBound)
		}
	} else {
		c.fail("(d) %s: the old source %s not fenced (superseded, no export, no service IP) 30 s after the heal", f.name, src)
	}
	c.endRound(newSrc)
	c.logf("reverse: %s becomes the target", src)
	// The promoted side accepts the reverse once the old source has told
	// it that it is fenced (its next hello): retry as an operator would.
	for end := time.Now().Add(30 * time.Second); ; {
		_, err := c.cli("client", "reverse", jobName)
		if err == nil {
			break
		}
		if time.Now().After(end) {
			c.fail("reverse after %s: %v", f.name, err)
			break
		}
		time.Sleep(500 * time.Millisecond)
	}
	got := c.settle("reverse after "+f.name, 90*time.Second)
	if got != newSrc {
		c.fail("after the reverse the source is %q, want %s", got, newSrc)
	}
	c.beginRound(newSrc)
	return newSrc
}

func other(h string) string {
	if h == "vm1" {
		return "vm2"
	}
	return "vm1"
}

// protected: src is the source, replicating with its lease held.
func (c *cluster) protected(st jobStatus, src string) bool {
	for _, s := range st.Sides {
		if s.Server == src && s.Status != nil && s.Status.HA.Role == "source" && s.Status.HA.State == "replicating" && s.Status.Arbiter != nil && s.Status.Arbiter.Holding {
			return true
		}
	}
	return false
}

// firstAck waits for the first write acknowledged by h invoked after
// from and returns how long after from it returned.
func (c *cluster) firstAck(h string, from, wait time.Duration) (time.Duration, bool) {
	deadline := time.Now().Add(wait)
	for {
		var best time.Duration = -1
		for _, o := range c.rec.snapshot() {
			if o.Host == h && o.Result == OK && o.Invoke >= from && (best < 0 || o.Return < best) {
				best = o.Return
			}
		}
		if best >= 0 {
			return best - from, true
		}
		if time.Now().After(deadline) {
			return 0, false
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// waitFenced waits until old reports itself superseded, serves no export
// and holds no service IP (and the new source holds it), and returns when.
func (c *cluster) waitFenced(old, newSrc string, wait time.Duration) (time.Duration, bool) {
	deadline := time.Now().Add(wait)
	for {
		why := ""
		s, err := c.own(old)
		switch {
		case err != nil:
			why = err.Error()
		case s.Status.HA.State != "superseded" && s.Status.HA.Role != "target":
			why = fmt.Sprintf("%s is %s %s", old, s.Status.HA.Role, s.Status.HA.State)
		case c.hasServiceIP(old):
			why = old + " holds the service IP"
		case !c.hasServiceIP(newSrc):
			why = newSrc + " does not hold the service IP"
		default:
			if cl, err := c.dial(old); err == nil {
				cl.Close()
				why = old + " serves its export"
			}
		}
		if why == "" {
			return c.rec.since(), true
		}
		if time.Now().After(deadline) {
			c.logf("not fenced: %s", why)
			return 0, false
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func (c *cluster) hasServiceIP(h string) bool {
	out, err := c.hosts[h].Run("ip", "-br", "addr", "show", "dev", "eth0")
	return err == nil && strings.Contains(string(out), serviceI+"/")
}

// round is the round in progress.
type roundState struct {
	n       int
	start   time.Duration
	holder  string
	initial []uint64
	apps    *apps
}

func (c *cluster) beginRound(holder string) {
	img, err := c.readImage(holder)
	if err != nil {
		c.t.Fatalf("round start: %v", err)
	}
	c.rec.take()
	c.cur = &roundState{n: len(c.rounds) + 1, start: c.rec.since(), holder: holder, initial: img}
	c.cur.apps = c.startApps(uint64(c.cur.n))
	c.logf("round %d: %s is the source", c.cur.n, holder)
}

// endRound stops the applications, reads the image from the final source
// and checks the round's history.
func (c *cluster) endRound(finalHost string) {
	rs := c.cur
	rs.apps.stop()
	r := &Round{N: rs.n, Mode: c.mode, StartHolder: rs.holder, Initial: rs.initial, Ops: c.rec.take(), FinalHost: finalHost, End: c.rec.since()}
	var err error
	if r.Promotions, err = c.promotions(rs.start); err != nil {
		c.fail("round %d: %v", rs.n, err)
	}
	if r.Final, err = c.readImage(finalHost); err != nil {
		c.fail("round %d: %v", rs.n, err)
	}
	c.mu.Lock()
	c.rounds = append(c.rounds, r)
	c.mu.Unlock()
	n := map[Result]int{}
	for _, o := range r.Ops {
		n[o.Result]++
	}
	c.figures.add(r)
	vs := Check(r, time.Second)
	c.logf("round %d checked: %d writes (%d ok, %d eio, %d timeout, %d lost), %d promotions, final source %s: %d violations",
		rs.n, len(r.Ops), n[OK], n[EIO], n[Timeout], n[Lost], len(r.Promotions), finalHost, len(vs))
	for i, v := range vs {
		if i == 20 {
			c.fail("round %d: %d more violations (history.json)", rs.n, len(vs)-20)
			break
		}
		c.fail("round %d (seed %d): %v", rs.n, c.seed, v)
	}
}

// lastAck is how long after the fault (at from) the last write host
// acknowledged returned; false if it acknowledged none after it.
func (c *cluster) lastAck(host string, from time.Duration) (time.Duration, bool) {
	var last time.Duration
	ok := false
	for _, o := range c.rec.snapshot() {
		if o.Host == host && o.Result == OK && o.Return >= from {
			last, ok = max(last, o.Return-from), true
		}
	}
	return last, ok
}

// stalls records the longest write of the source during the fault.
func (c *cluster) stalls(f fault, src string, from, to time.Duration) {
	var longest time.Duration
	for _, o := range c.rec.snapshot() {
		if o.Host == src && o.Invoke >= from && o.Invoke <= to && o.Result.definite() {
			longest = max(longest, o.Return-o.Invoke)
		}
	}
	switch {
	case f.isolates:
		c.figures.isolatedStall = max(c.figures.isolatedStall, longest)
	case f.etcdLoss:
		c.figures.etcdStall = max(c.figures.etcdStall, longest)
	}
}

// figures are what the suite measured.
type figures struct {
	faults        map[string]int
	rto, fence    []time.Duration
	isolatedStall time.Duration // longest write of an isolated source (answered)
	etcdStall     time.Duration // longest write of the source while etcd lost its majority
	writes        map[Result]int
	rounds        int
}

func newFigures() *figures { return &figures{faults: map[string]int{}, writes: map[Result]int{}} }

func (f *figures) count(kind string) { f.faults[kind]++ }

func (f *figures) add(r *Round) {
	f.rounds++
	for _, o := range r.Ops {
		f.writes[o.Result]++
	}
}

func (f *figures) String() string {
	var b strings.Builder
	kinds := make([]string, 0, len(f.faults))
	total := 0
	for k, n := range f.faults {
		kinds = append(kinds, k)
		total += n
	}
	sort.Strings(kinds)
	fmt.Fprintf(&b, "%d faults:", total)
	for _, k := range kinds {
		fmt.Fprintf(&b, " %s %d,", k, f.faults[k])
	}
	fmt.Fprintf(&b, "\n%d rounds checked, writes: %d ok, %d eio, %d timeout, %d lost", f.rounds, f.writes[OK], f.writes[EIO], f.writes[Timeout], f.writes[Lost])
	fmt.Fprintf(&b, "\nRTO (fault to the first write acknowledged on the promoted side, %d failovers): %s", len(f.rto), dist(f.rto))
	fmt.Fprintf(&b, "\nheal to fence of the old source: %s", dist(f.fence))
	fmt.Fprintf(&b, "\nlongest write of an isolated source: %v; of a healthy source during etcd majority loss: %v",
		f.isolatedStall.Round(time.Millisecond), f.etcdStall.Round(time.Millisecond))
	return b.String()
}

func dist(ds []time.Duration) string {
	if len(ds) == 0 {
		return "none"
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	return fmt.Sprintf("median %v, max %v (n=%d)", s[len(s)/2].Round(time.Millisecond), s[len(s)-1].Round(time.Millisecond), len(s))
}

// TestFaultTable injects every fault alone, in sync mode, each on a job
// that is PROTECTED, and checks what follows (docs/testing.md).
func TestFaultTable(t *testing.T) {
	c := newCluster(t, "sync")
	src := "vm1"
	c.captureHeartbeats()
	c.beginRound(src)
	rng := rand.New(rand.NewPCG(1, 1))
	for _, f := range faults {
		t.Run(f.name, func(t *testing.T) {
			before := len(c.failures)
			src = c.run(f, src, f.hold, rng)
			c.mu.Lock()
			for _, s := range c.failures[before:] {
				t.Error(s)
			}
			c.mu.Unlock()
		})
		if t.Failed() && len(c.failures) > 0 && strings.Contains(c.failures[len(c.failures)-1], "not PROTECTED") {
			break // the lab is stuck: the report says why
		}
	}
	c.endRound(src)
	t.Logf("figures (sync):\n%s", c.figures)
}

// TestFaultSchedule runs seeded random schedules of faults: the short
// tier (make test) one fixed seed per mode with a few faults; with
// DOPPEL_FAULTS=long (make test-faults), DOPPEL_FAULT_COUNT faults
// (default 100) per seed and mode, seeds from DOPPEL_FAULT_SEEDS or
// random. DOPPEL_FAULT_SEEDS=1,2,3 replays those seeds.
func TestFaultSchedule(t *testing.T) {
	long := os.Getenv("DOPPEL_FAULTS") == "long"
	count := 8
	seeds := []uint64{1}
	modes := []string{"async"}
	if long {
		count = 100
		seeds = []uint64{rand.Uint64() % 1_000_000}
		modes = []string{"sync", "async"}
	}
	if s := os.Getenv("DOPPEL_FAULT_COUNT"); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil {
			t.Fatalf("DOPPEL_FAULT_COUNT=%q: %v", s, err)
		}
		count = n
	}
	if s := os.Getenv("DOPPEL_FAULT_SEEDS"); s != "" {
		seeds = nil
		for _, f := range strings.Split(s, ",") {
			n, err := strconv.ParseUint(strings.TrimSpace(f), 10, 64)
			if err != nil {
				t.Fatalf("DOPPEL_FAULT_SEEDS=%q: %v", s, err)
			}
			seeds = append(seeds, n)
		}
	}
	if s := os.Getenv("DOPPEL_FAULT_MODES"); s != "" {
		modes = strings.Split(s, ",")
	}
	// The failures again at the end: a CI log keeps only its tail.
	var summary []string
	defer func() {
		if len(summary) > 0 {
			t.Logf("the schedules' failures (details above, reports in /tmp/doppel-faults-FAIL-*):\n%s", strings.Join(summary, "\n"))
		}
	}()
	for _, mode := range modes {
		if mode != "sync" && mode != "async" {
			t.Fatalf("DOPPEL_FAULT_MODES: mode %q: want sync or async", mode)
		}
		for _, seed := range seeds {
			t.Run(fmt.Sprintf("%s/seed=%d", mode, seed), func(t *testing.T) {
				t.Logf("schedule: mode %s, seed %d, %d faults (replay: DOPPEL_FAULT_SEEDS=%d DOPPEL_FAULT_MODES=%s)", mode, seed, count, seed, mode)
				c := newCluster(t, mode)
				c.seed = seed
				defer func() {
					c.mu.Lock()
					defer c.mu.Unlock()
					for i, f := range c.failures {
						if i == 8 {
							summary = append(summary, fmt.Sprintf("  %s seed %d: %d more", mode, seed, len(c.failures)-i))
							break
						}
						summary = append(summary, fmt.Sprintf("  %s seed %d: %s", mode, seed, truncate(f, 400)))
					}
				}()
				c.captureHeartbeats()
				rng := rand.New(rand.NewPCG(seed, 0x5eed))
				src := "vm1"
				c.beginRound(src)
				for i := range count {
					f := faults[rng.IntN(len(faults))]
					// Holds from 0.3 s to failHold + 1 s: some faults end
					// before anything moves, some outlast the lease.
					hold := 300*time.Millisecond + time.Duration(rng.Int64N(int64(failHold+700*time.Millisecond)))
					c.logf("fault %d/%d", i+1, count)
					src = c.run(f, src, hold, rng)
					if len(c.failures) > 0 && strings.Contains(c.failures[len(c.failures)-1], "not PROTECTED") {
						break
					}
				}
				c.endRound(src)
				t.Logf("figures (%s, seed %d):\n%s", mode, seed, c.figures)
			})
		}
	}
}

// truncate cuts s to n bytes at most, marking the cut.
func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "…"
}
