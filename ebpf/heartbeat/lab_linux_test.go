package heartbeat

import (
	"context"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/doppelha/doppel/daemon/monitor"
	testlab "github.com/doppelha/doppel/test/lab"
)

// lab is two network namespaces joined by a veth pair: the sender (peer)
// in A, the probe in B. Names are unique per lab; everything is removed in
// t.Cleanup.
type lab struct {
	t            testing.TB
	nsA, nsB     string
	vethA, vethB string
	addrA, addrB netip.Addr
}

// needRoot skips without root or in -short mode (test/lab.Need).
func needRoot(t testing.TB) {
	t.Helper()
	testlab.Need(t)
}

// run runs a command (ip ...) and fails the test when it fails.
func run(t testing.TB, argv ...string) {
	t.Helper()
	if _, err := testlab.Run(argv...); err != nil {
		t.Fatal(err)
	}
}

func newLab(t testing.TB) *lab {
	t.Helper()
	needRoot(t)
	tl := testlab.New(t)
	a, b := tl.Host("dpa"), tl.Host("dpb")
	l := &lab{t: t, nsA: a.NS, nsB: b.NS, vethA: "dpva" + tl.Suffix, vethB: "dpvb" + tl.Suffix,
		addrA: netip.MustParseAddr("10.98.0.1"), addrB: netip.MustParseAddr("10.98.0.2")}
	a.Link(l.vethA, b, l.vethB, l.addrA.String()+"/24", l.addrB.String()+"/24")
	return l
}

// inNS runs f on an OS thread switched into the named namespace. Sockets
// and attachments made by f stay in that namespace.
func inNS(t testing.TB, ns string, f func() error) error {
	t.Helper()
	return testlab.DoIn(ns, f)
}

// The lab's job: its heartbeats are sent by "A" (the peer) and watched
// by B with A's key.
const (
	labJob    = "lab"
	labSecret = "lab secret"
	labGood   = "A"     // the peer's real signing identity
	labSpoof  = "spoof" // a sender without the job's key for A
)

var labJobID = JobIDOf(labJob)

func labKey(t testing.TB, signer string) Key { return testKey(t, labSecret, labJob, signer) }

// labPeer is the lab job seen from addr.
func labPeer(addr netip.Addr) Peer { return Peer{Addr: addr, Job: labJobID} }

// newLabSender opens a sender of the lab job signed as signer, with
// incarnation inc, to every destination.
func newLabSender(t testing.TB, signer string, inc uint64, dsts ...Dest) (*Sender, error) {
	return NewSender(SenderConfig{Job: labJobID, Key: labKey(t, signer), Incarnation: inc, Epoch: 1, Dests: dsts})
}

func toB(l *lab) Dest { return Dest{Remote: netip.AddrPortFrom(l.addrB, Port)} }

// openProbe opens a probe in B on B's veth, watching the lab job from A's
// address with A's key.
func (l *lab) openProbe(mode Mode) Probe {
	l.t.Helper()
	var p Probe
	err := inNS(l.t, l.nsB, func() (err error) {
		p, err = Open(Config{Interfaces: []string{l.vethB}, Mode: mode})
		return err
	})
	if err != nil {
		l.t.Fatalf("open probe (%q): %v", mode, err)
	}
	l.t.Cleanup(func() { p.Close() })
	if err := p.Watch(labPeer(l.addrA), labKey(l.t, labGood)); err != nil {
		l.t.Fatal(err)
	}
	return p
}

// pacedSender sends heartbeats from A every interval. cutAfterSend runs a
// fault right after a heartbeat went out, so the silence starts at the
// fault (to within the time the send takes).
type pacedSender struct {
	s     *Sender
	hooks chan func()
	stop  context.CancelFunc
	done  chan struct{}
}

func (l *lab) startSender(interval time.Duration, signer string) *pacedSender {
	l.t.Helper()
	var s *Sender
	err := inNS(l.t, l.nsA, func() (err error) {
		s, err = newLabSender(l.t, signer, uint64(time.Now().Unix()), toB(l))
		return err
	})
	if err != nil {
		l.t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	ps := &pacedSender{s: s, hooks: make(chan func()), stop: cancel, done: make(chan struct{})}
	go func() {
		defer close(ps.done)
		tk := time.NewTicker(interval)
		defer tk.Stop()
		for {
			s.Send() // errors while the link is cut are expected
			select {
			case h := <-ps.hooks:
				h()
			default:
			}
			select {
			case <-ctx.Done():
				return
			case <-tk.C:
			}
		}
	}()
	l.t.Cleanup(ps.Stop)
	return ps
}

// Stop stops sending (idempotent) and returns when the last send is done.
func (ps *pacedSender) Stop() {
	ps.stop()
	<-ps.done
	ps.s.Close()
}

// watcher runs monitor.Watch over a probe in this process.
type watcher struct {
	changes chan monitor.Change
	mu      sync.Mutex
	all     []monitor.Change
}

func startWatch(t testing.TB, p Probe, peer netip.Addr, cfg monitor.Config) *watcher {
	return startWatchPaths(t, p, []netip.Addr{peer}, cfg)
}

// startWatchPaths watches one peer over several paths (one address each).
func startWatchPaths(t testing.TB, p Probe, peers []netip.Addr, cfg monitor.Config) *watcher {
	t.Helper()
	var names []string
	for _, a := range peers {
		names = append(names, a.String())
	}
	m, err := monitor.New(cfg, names, Now())
	if err != nil {
		t.Fatal(err)
	}
	w := &watcher{changes: make(chan monitor.Change, 100)}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- monitor.Watch(ctx, m, Now, func(path string) (monitor.Sample, error) {
			s, err := p.Stats(labPeer(netip.MustParseAddr(path)))
			return monitor.Sample{LastSeen: s.LastSeen, Packets: s.Heartbeats}, err
		}, func(c monitor.Change) {
			w.mu.Lock()
			w.all = append(w.all, c)
			w.mu.Unlock()
			w.changes <- c
		})
	}()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("watch: %v", err)
		}
	})
	return w
}

// next waits for the next change, which must be to want.
func (w *watcher) next(t testing.TB, want monitor.State, within time.Duration) monitor.Change {
	t.Helper()
	select {
	case c := <-w.changes:
		if c.To != want {
			t.Fatalf("change %v, want -> %v", c, want)
		}
		return c
	case <-time.After(within):
		t.Fatalf("no change to %v within %v", want, within)
	}
	panic("unreachable")
}

// firstUp waits for the first change to up: one to down from unknown
// before it is the start-up silence of a loaded machine (the sender not
// running yet), not what a test checks.
func (w *watcher) firstUp(t testing.TB, within time.Duration) monitor.Change {
	t.Helper()
	deadline := time.After(within)
	for {
		select {
		case c := <-w.changes:
			switch {
			case c.To == monitor.Up:
				return c
			case c.From == monitor.Unknown && c.To == monitor.Down:
				t.Logf("before the first up (start-up): %v", c)
			default:
				t.Fatalf("change %v, want -> %v", c, monitor.Up)
			}
		case <-deadline:
			t.Fatalf("no change to %v within %v", monitor.Up, within)
		}
	}
}

// quiet fails if any change arrives within d.
func (w *watcher) quiet(t testing.TB, d time.Duration) {
	t.Helper()
	select {
	case c := <-w.changes:
		t.Fatalf("unexpected change %v", c)
	case <-time.After(d):
	}
}
