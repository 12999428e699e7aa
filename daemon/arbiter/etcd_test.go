package arbiter

import (
	"context"
	"errors"
	"os"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/doppelha/doppel/daemon/arbiter/etcdtest"
)

func startEtcd(t *testing.T) string {
	ep, _ := etcdtest.Start(t)
	return ep
}

func startEtcdProc(t *testing.T) (string, *os.Process) { return etcdtest.Start(t) }

func dial(t *testing.T, ep string) *Client {
	t.Helper()
	c, err := Dial(Config{Endpoints: []string{ep}, Prefix: "/t"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// events collects a holder's events.
type events struct {
	mu  sync.Mutex
	evs []HolderEvent
}

func (e *events) add(ev HolderEvent) {
	e.mu.Lock()
	e.evs = append(e.evs, ev)
	e.mu.Unlock()
}

func (e *events) superseded() uint64 {
	e.mu.Lock()
	defer e.mu.Unlock()
	for _, ev := range e.evs {
		if ev.Superseded > 0 {
			return ev.Superseded
		}
	}
	return 0
}

func waitValid(t *testing.T, h *Holder) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := h.Wait(ctx); err != nil {
		t.Fatalf("holder never held: %v (%+v)", err, h.Status())
	}
}

const ttl = MinTTL

func TestPromoteRefusedWhileHeldThenAfterExpiry(t *testing.T) {
	c := dial(t, startEtcd(t))
	ctx := context.Background()
	var ev events
	h := c.Hold("web", "vm1", 1, ttl, ev.add)
	waitValid(t, h)
	v, err := c.View(ctx, "web")
	if err != nil || v.CurrentEpoch() != 1 || v.Leader == nil || v.Leader.Holder != "vm1" {
		t.Fatalf("view after acquire: %+v %v", v, err)
	}
	req := PromoteRequest{Job: "web", Self: "vm2", Peer: "vm1", Epoch: 1, TTL: ttl, Reason: "test"}
	// Held and renewed: refused, however long we try within a few TTLs.
	for range 3 {
		if _, _, err := c.Promote(ctx, req, nil); !errors.Is(err, ErrLeaderPresent) {
			t.Fatalf("promote while the source renews: %v, want ErrLeaderPresent", err)
		}
		time.Sleep(ttl / 2)
	}
	// The source stops renewing (a dead source): once the lease expired,
	// the promotion succeeds at epoch 2, and never before the old holder
	// stopped counting itself as holding.
	h.Stop()
	stopped := h.Status().Deadline
	var nh *Holder
	var epoch uint64
	deadline := time.Now().Add(3 * ttl)
	for {
		nh, epoch, err = c.Promote(ctx, req, nil)
		if err == nil {
			break
		}
		if !errors.Is(err, ErrLeaderPresent) || time.Now().After(deadline) {
			t.Fatalf("promote after the source stopped: %v", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	defer nh.Stop()
	if promoted := time.Now(); promoted.Before(stopped) {
		t.Fatalf("promoted at %v, before the old holder's deadline %v", promoted, stopped)
	}
	if epoch != 2 || !nh.Valid(time.Now()) {
		t.Fatalf("promoted at epoch %d valid=%v, want 2 and held", epoch, nh.Valid(time.Now()))
	}
	// The old source comes back at epoch 1: superseded, never held.
	var ev2 events
	old := c.Hold("web", "vm1", 1, ttl, ev2.add)
	defer old.Stop()
	werr := old.Wait(context.Background())
	if !errors.Is(werr, ErrSuperseded) || ev2.superseded() != 2 {
		t.Fatalf("old source back at epoch 1: wait %v, superseded %d; want ErrSuperseded, 2", werr, ev2.superseded())
	}
}

func TestPromoteStaleEpochAndOutOfSync(t *testing.T) {
	c := dial(t, startEtcd(t))
	ctx := context.Background()
	h := c.Hold("db", "vm1", 1, ttl, nil)
	waitValid(t, h)
	if err := h.MarkSync(ctx, "vm2", false); err != nil {
		t.Fatal(err)
	}
	if err := h.Resign(ctx); err != nil {
		t.Fatal(err)
	}
	// Resigned: no leader. A stale target (epoch 0) is refused.
	if _, _, err := c.Promote(ctx, PromoteRequest{Job: "db", Self: "vm2", Peer: "vm1", Epoch: 0, TTL: ttl}, nil); !errors.Is(err, ErrStaleEpoch) {
		t.Fatalf("stale epoch: %v", err)
	}
	// Sync mode, recorded out of sync: refused.
	sreq := PromoteRequest{Job: "db", Self: "vm2", Peer: "vm1", Epoch: 1, RequireInSync: true, TTL: ttl}
	if _, _, err := c.Promote(ctx, sreq, nil); !errors.Is(err, ErrOutOfSync) {
		t.Fatalf("out of sync: %v", err)
	}
	// The source comes back, records the target in sync and resigns: the
	// promotion succeeds (a planned switchover).
	h = c.Hold("db", "vm1", 1, ttl, nil)
	waitValid(t, h)
	if err := h.MarkSync(ctx, "vm2", true); err != nil {
		t.Fatal(err)
	}
	if err := h.Resign(ctx); err != nil {
		t.Fatal(err)
	}
	nh, epoch, err := c.Promote(ctx, sreq, nil)
	if err != nil || epoch != 2 {
		t.Fatalf("promote in sync after resign: epoch %d, %v", epoch, err)
	}
	nh.Stop()
	// A holder whose key was taken cannot record sync states.
	if err := h.MarkSync(ctx, "vm2", true); !errors.Is(err, ErrNotHeld) {
		t.Fatalf("mark sync after losing the key: %v", err)
	}
}

func TestForceTakeoverFencesARenewingSource(t *testing.T) {
	c := dial(t, startEtcd(t))
	ctx := context.Background()
	var ev events
	h := c.Hold("app", "vm1", 1, ttl, ev.add)
	defer h.Stop()
	waitValid(t, h)
	if err := h.MarkSync(ctx, "vm2", false); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	nh, epoch, err := c.ForceTakeover(ctx, PromoteRequest{Job: "app", Self: "vm2", Peer: "vm1", Epoch: 1, TTL: ttl, Reason: "forced by the operator"}, nil)
	if err != nil || epoch != 2 {
		t.Fatalf("forced takeover: %d %v", epoch, err)
	}
	defer nh.Stop()
	took := time.Since(start)
	if took < ttl {
		t.Errorf("forced takeover took %v, less than one TTL (%v): the old source may still acknowledge", took, ttl)
	}
	// The old source, still running its renewals, was fenced before the
	// new holder took the key.
	if h.Valid(time.Now()) {
		t.Fatalf("old holder still valid after the forced takeover: %+v", h.Status())
	}
	if d := h.Status().Deadline; !d.Before(start.Add(took)) {
		t.Fatalf("old holder's deadline %v is after the takeover finished", d)
	}
	if ev.superseded() != 2 {
		t.Fatalf("old holder events: superseded %d, want 2", ev.superseded())
	}
	v, err := c.View(ctx, "app")
	if err != nil || v.Epoch == nil || !v.Epoch.Forced || v.Leader == nil || v.Leader.Holder != "vm2" {
		t.Fatalf("view after forced takeover: %+v %v", v, err)
	}
}

func TestDeleteJobKeepsOthers(t *testing.T) {
	c := dial(t, startEtcd(t))
	ctx := context.Background()
	for _, j := range []string{"a", "ab"} {
		h := c.Hold(j, "vm1", 1, ttl, nil)
		waitValid(t, h)
		if err := h.Resign(ctx); err != nil {
			t.Fatal(err)
		}
	}
	if err := c.DeleteJob(ctx, "a"); err != nil {
		t.Fatal(err)
	}
	va, _ := c.View(ctx, "a")
	vab, _ := c.View(ctx, "ab")
	if va.Epoch != nil || vab.Epoch == nil {
		t.Fatalf("after deleting a: a=%+v ab=%+v", va.Epoch, vab.Epoch)
	}
	h := c.Hold("ab", "vm1", 1, ttl, nil)
	defer h.Stop()
	waitValid(t, h)
	if err := c.DeleteJob(ctx, "ab"); !errors.Is(err, ErrLeaderPresent) {
		t.Fatalf("delete of a held job: %v", err)
	}
}

// TestDeadlineWhenEtcdStops: with etcd frozen, the holder stops counting
// itself as holding at its deadline (last renewal start + TTL − margin),
// before etcd could expire the lease, and holds again once etcd is back.
func TestDeadlineWhenEtcdStops(t *testing.T) {
	ep, proc := startEtcdProc(t)
	c := dial(t, ep)
	var ev events
	h := c.Hold("vol", "vm1", 1, ttl, ev.add)
	defer h.Stop()
	waitValid(t, h)
	time.Sleep(ttl / 2) // a few renewals
	if err := proc.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	stopped := time.Now()
	defer proc.Signal(syscall.SIGCONT)
	for h.Valid(time.Now()) {
		if time.Since(stopped) > 2*ttl {
			t.Fatal("still holding two TTLs after etcd stopped")
		}
		time.Sleep(10 * time.Millisecond)
	}
	lost := time.Now()
	last := h.LastRenewal()
	want := last.Add(ttl - Margin(ttl))
	if lost.Before(want) || lost.Sub(want) > 200*time.Millisecond {
		t.Errorf("stopped holding at %v after the last renewal, want %v (TTL − margin)", lost.Sub(last), ttl-Margin(ttl))
	}
	if lost.Sub(last) >= ttl {
		t.Errorf("held %v after the last renewal started: etcd may have expired the lease already (TTL %v)", lost.Sub(last), ttl)
	}
	if err := proc.Signal(syscall.SIGCONT); err != nil {
		t.Fatal(err)
	}
	waitValid(t, h)
	if ev.superseded() != 0 {
		t.Fatal("superseded after etcd came back with nobody promoted")
	}
}
