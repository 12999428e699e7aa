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
	"testing"
	"testing/synctest"
	"time"
)

var (
	srcMAC = net.HardwareAddr{0x02, 0x5c, 0, 0, 0, 0x01}
	v4     = netip.MustParsePrefix("172.17.22.187/24")
	v6     = netip.MustParsePrefix("fd00:17::187/64")
)

// testHost is the target host of the design's example: eth0 carries the
// replication address 192.168.0.222/24, eth1 has IPv6 disabled, eth2 is down.
func testHost(t *testing.T, extra ...string) *Fake {
	t.Helper()
	f := NewFake("vm2",
		Link{Name: "eth0", Up: true},
		Link{Name: "eth1", Up: true, NoIPv6: true},
		Link{Name: "eth2"},
		Link{Name: "wg0", Up: true, NoARP: true},
	)
	run(t, f, "ip addr add 192.168.0.222/24 dev eth0", "ip addr add fe80::2/64 dev eth0")
	run(t, f, extra...)
	f.calls = 0
	return f
}

// run replays "ip addr add CIDR dev IFACE" lines on f.
func run(t *testing.T, f *Fake, cmds ...string) {
	t.Helper()
	for _, c := range cmds {
		var cidr, dev string
		if _, err := fmt.Sscanf(c, "ip addr add %s dev %s", &cidr, &dev); err != nil {
			t.Fatalf("bad command %q: %v", c, err)
		}
		l, err := f.Link(dev)
		if err != nil {
			t.Fatal(err)
		}
		if err := f.AddAddr(l, netip.MustParsePrefix(cidr)); err != nil {
			t.Fatalf("%s: %v", c, err)
		}
	}
}

func newTestManager(k Kernel, w Wire) *Manager {
	return New(slog.New(slog.DiscardHandler), k, w, Config{ProbeWait: 10 * time.Millisecond, SecondBurst: -1, AnnounceCount: 1})
}

func id(addrs ...Addr) Identity { return Identity{Addrs: addrs} }

func TestApplyTable(t *testing.T) {
	base := "hostname vm2\nip addr add 192.168.0.222/24 dev eth0\nip addr add fe80::2/64 dev eth0\n"
	tests := []struct {
		name    string
		extra   []string // ip addr add lines before Apply
		id      Identity
		force   bool
		holder  netip.Addr // another host answers for it (with srcMAC)
		wantErr error
		errText string // the error must also contain this
		want    string // state after (base + this)
		added   int
	}{
		{
			name:  "v4 and v6 on eth0",
			id:    id(Addr{v4, "eth0"}, Addr{v6, "eth0"}),
			want:  "ip addr add 172.17.22.187/24 dev eth0\nip addr add fd00:17::187/64 dev eth0\n",
			added: 2,
		},
		{
			name:  "already present is left alone",
			extra: []string{"ip addr add 172.17.22.187/24 dev eth0"},
			id:    id(Addr{v4, "eth0"}, Addr{v6, "eth0"}),
			want:  "ip addr add 172.17.22.187/24 dev eth0\nip addr add fd00:17::187/64 dev eth0\n",
			added: 1,
		},
		{
			name:  "v4 on the v6-less interface",
			id:    id(Addr{v4, "eth1"}),
			want:  "ip addr add 172.17.22.187/24 dev eth1\n",
			added: 1,
		},
		{
			name:    "unknown interface",
			id:      id(Addr{v4, "eth0"}, Addr{v6, "eth9"}),
			wantErr: ErrNoInterface,
			errText: `"eth9"`,
		},
		{
			name:    "IPv6 on an interface without IPv6",
			id:      id(Addr{v4, "eth0"}, Addr{v6, "eth1"}),
			wantErr: ErrFamily,
			errText: "disable_ipv6",
		},
		{
			name:    "malformed address",
			id:      id(Addr{v4, "eth0"}, Addr{netip.Prefix{}, "eth0"}),
			wantErr: ErrBadServiceIP,
		},
		{
			name:    "bad interface name",
			id:      id(Addr{v4, "eth0/x"}),
			wantErr: ErrBadIface,
		},
		{
			name:    "same address twice",
			id:      id(Addr{v4, "eth0"}, Addr{netip.MustParsePrefix("172.17.22.187/16"), "eth1"}),
			wantErr: ErrBadServiceIP,
			errText: "twice",
		},
		{
			name:    "held with another prefix length",
			extra:   []string{"ip addr add 172.17.22.187/16 dev eth0"},
			id:      id(Addr{v4, "eth0"}),
			errText: "already holds it as 172.17.22.187/16",
			want:    "ip addr add 172.17.22.187/16 dev eth0\n",
		},
		{
			name:    "another host answers",
			id:      id(Addr{v4, "eth0"}, Addr{v6, "eth0"}),
			holder:  v4.Addr(),
			wantErr: ErrConflict,
			errText: "172.17.22.187 is answered by 02:5c:00:00:00:01 on eth0",
		},
		{
			name:   "another host answers, forced",
			id:     id(Addr{v4, "eth0"}),
			holder: v4.Addr(),
			force:  true,
			want:   "ip addr add 172.17.22.187/24 dev eth0\n",
			added:  1,
		},
		{
			name:   "no ARP: neither probed nor announced",
			id:     id(Addr{v4, "wg0"}),
			holder: v4.Addr(),
			want:   "ip addr add 172.17.22.187/24 dev wg0\n",
			added:  1,
		},
		{
			name:    "interface down",
			id:      id(Addr{v4, "eth2"}),
			wantErr: ErrLinkDown,
		},
		{
			name:  "interface down, forced",
			id:    id(Addr{v4, "eth2"}),
			force: true,
			want:  "ip addr add 172.17.22.187/24 dev eth2\n",
			added: 1,
		},
		{
			name:  "interface down, forced, IPv6",
			id:    id(Addr{v6, "eth2"}),
			force: true,
			want:  "ip addr add fd00:17::187/64 dev eth2\n",
			added: 1,
		},
		{
			name:  "host name",
			id:    Identity{Addrs: []Addr{{v4, "eth0"}}, Hostname: "vm1"},
			want:  "ip addr add 172.17.22.187/24 dev eth0\n",
			added: 1,
		},
		{
			name:    "bad host name",
			id:      Identity{Addrs: []Addr{{v4, "eth0"}}, Hostname: "vm 1"},
			wantErr: ErrBadHostname,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := testHost(t, tt.extra...)
			before := f.String()
			w := NewFakeWire()
			if tt.holder.IsValid() {
				w.SetHolder(tt.holder, srcMAC)
			}
			m := newTestManager(f, w)
			defer m.Close()
			start := time.Now()
			r, err := m.Apply(t.Context(), tt.id, ApplyOptions{Force: tt.force})
			if d := time.Since(start); d > time.Second {
				t.Errorf("Apply took %v (waiting for something that cannot happen?)", d)
			}
			if tt.wantErr != nil || tt.errText != "" {
				if err == nil || (tt.wantErr != nil && !errors.Is(err, tt.wantErr)) || !strings.Contains(err.Error(), tt.errText) {
					t.Fatalf("Apply error = %v, want %v containing %q", err, tt.wantErr, tt.errText)
				}
				if got := f.String(); got != before || f.Changes() != 0 {
					t.Fatalf("failed Apply changed the host (%d changes):\n%s", f.Changes(), got)
				}
				if n := len(w.Announcements()); n != 0 {
					t.Fatalf("failed Apply sent %d announcements", n)
				}
				return
			}
			if err != nil {
				t.Fatalf("Apply: %v", err)
			}
			host := "vm2"
			if tt.id.Hostname != "" {
				host = tt.id.Hostname
			}
			want := strings.Replace(base, "vm2", host, 1) + tt.want
			if got := f.String(); got != want {
				t.Fatalf("state after Apply:\n%s\nwant:\n%s", got, want)
			}
			if len(r.Added) != tt.added {
				t.Fatalf("report added %v, want %d", r.Added, tt.added)
			}
			if tt.force && tt.holder.IsValid() && len(r.Conflicts) != 1 {
				t.Fatalf("forced conflict not reported: %+v", r)
			}
			// Every address of the identity was announced once before
			// Apply returned, except on a down interface (reported).
			wantAnn := 0
			for _, a := range tt.id.Addrs {
				if a.Iface != "eth2" && a.Iface != "wg0" {
					wantAnn++
				}
			}
			if n := len(w.Announcements()); n != wantAnn || (tt.id.Addrs[0].Iface == "eth2") != (r.AnnounceErr != nil) {
				t.Fatalf("%d announcements after Apply, want %d; report: %v", n, wantAnn, r.AnnounceErr)
			}

			// Idempotence: applying again changes nothing.
			changes := f.Changes()
			r2, err := m.Apply(t.Context(), tt.id, ApplyOptions{Force: tt.force})
			if err != nil {
				t.Fatalf("second Apply: %v", err)
			}
			if f.Changes() != changes || f.String() != want || r2.Changed() || len(r2.Present) != len(tt.id.Addrs) {
				t.Fatalf("second Apply changed something (%d → %d changes): %+v\n%s", changes, f.Changes(), r2, f.String())
			}

			// Release puts the host back as it was, then is a no-op.
			if _, err := m.Release(t.Context(), tt.id); err != nil {
				t.Fatalf("Release: %v", err)
			}
			wantBack := before
			for _, e := range tt.extra { // addresses present before Apply and in the identity go too
				for _, a := range tt.id.Addrs {
					if strings.Contains(e, " "+a.Prefix.String()+" dev "+a.Iface) {
						wantBack = strings.Replace(wantBack, e+"\n", "", 1)
					}
				}
			}
			if got := f.String(); got != wantBack {
				t.Fatalf("state after Release:\n%s\nwant:\n%s", got, wantBack)
			}
			changes = f.Changes()
			r3, err := m.Release(t.Context(), tt.id)
			if err != nil || f.Changes() != changes || r3.Changed() || len(r3.Absent) != len(tt.id.Addrs) {
				t.Fatalf("second Release: %v, %+v, %d → %d changes", err, r3, changes, f.Changes())
			}
		})
	}
}

// TestReleaseKeepsOtherAddresses: the service address was configured first
// on the source, so it is the primary and the replication address of the
// same subnet a secondary; Linux would delete the secondary with it.
func TestReleaseKeepsOtherAddresses(t *testing.T) {
	f := NewFake("vm1", Link{Name: "eth0", Up: true})
	run(t, f, "ip addr add 10.9.0.100/24 dev eth0", "ip addr add 10.9.0.1/24 dev eth0", "ip addr add 10.8.0.1/24 dev eth0")

	// The fake models the kernel: without promote_secondaries the
	// secondary goes with its primary.
	g := NewFake("vm1", Link{Name: "eth0", Up: true})
	run(t, g, "ip addr add 10.9.0.100/24 dev eth0", "ip addr add 10.9.0.1/24 dev eth0")
	l, _ := g.Link("eth0")
	if err := g.DelAddr(l, netip.MustParsePrefix("10.9.0.100/24")); err != nil {
		t.Fatal(err)
	}
	if got := g.String(); got != "hostname vm1\n" {
		t.Fatalf("fake kept a secondary without promote_secondaries:\n%s", got)
	}

	m := newTestManager(f, NewFakeWire())
	r, err := m.Release(t.Context(), id(Addr{netip.MustParsePrefix("10.9.0.100/24"), "eth0"}))
	if err != nil {
		t.Fatal(err)
	}
	want := "hostname vm1\nsysctl net.ipv4.conf.eth0.promote_secondaries=1\nip addr add 10.9.0.1/24 dev eth0\nip addr add 10.8.0.1/24 dev eth0\n"
	if got := f.String(); got != want {
		t.Fatalf("after Release:\n%s\nwant:\n%s", got, want)
	}
	if len(r.Promoted) != 1 || len(r.Removed) != 1 {
		t.Fatalf("report %+v", r)
	}
}

func TestReleaseBadInputChangesNothing(t *testing.T) {
	f := testHost(t, "ip addr add 172.17.22.187/24 dev eth0")
	before := f.String()
	m := newTestManager(f, NewFakeWire())
	_, err := m.Release(t.Context(), id(Addr{v4, "eth0"}, Addr{v6, "nope0"}))
	if !errors.Is(err, ErrNoInterface) {
		t.Fatalf("Release error = %v, want ErrNoInterface", err)
	}
	if f.String() != before || f.Changes() != 0 {
		t.Fatalf("failed Release changed the host:\n%s", f.String())
	}
}

// failingKernel fails to add one address, like a kernel running out of
// memory half-way through.
type failingKernel struct {
	*Fake
	fail netip.Prefix
}

func (k failingKernel) AddAddr(l Link, p netip.Prefix) error {
	if p == k.fail {
		return errors.New("injected failure")
	}
	return k.Fake.AddAddr(l, p)
}

func TestApplyUndoesHalfWay(t *testing.T) {
	f := testHost(t)
	before := f.String()
	m := newTestManager(failingKernel{f, v6}, NewFakeWire())
	_, err := m.Apply(t.Context(), id(Addr{v4, "eth0"}, Addr{v6, "eth0"}), ApplyOptions{})
	if err == nil || !strings.Contains(err.Error(), "injected failure") {
		t.Fatalf("Apply error = %v", err)
	}
	if got := f.String(); got != before {
		t.Fatalf("half-way Apply left:\n%s\nwant:\n%s", got, before)
	}
}

func TestHostnameRestore(t *testing.T) {
	f := testHost(t)
	m := newTestManager(f, NewFakeWire())
	ident := Identity{Addrs: []Addr{{v4, "eth0"}}, Hostname: "vm1"}
	r, err := m.Apply(t.Context(), ident, ApplyOptions{})
	if err != nil || r.HostnameFrom != "vm2" || r.HostnameTo != "vm1" {
		t.Fatalf("Apply: %v %+v", err, r)
	}
	if h, _ := f.Hostname(); h != "vm1" {
		t.Fatalf("hostname %q", h)
	}
	// A second Apply must not forget the original name.
	if _, err := m.Apply(t.Context(), ident, ApplyOptions{}); err != nil {
		t.Fatal(err)
	}
	r, err = m.Release(t.Context(), ident)
	if err != nil || r.HostnameTo != "vm2" {
		t.Fatalf("Release: %v %+v", err, r)
	}
	if h, _ := f.Hostname(); h != "vm2" {
		t.Fatalf("hostname after Release %q, want vm2", h)
	}
}

// TestAnnounceSchedule checks the announcement timetable on a fake clock:
// the probe takes exactly ProbeWait, the first round goes out before Apply
// returns, then 5 rounds 200 ms apart and a second burst 5 s after the first.
func TestAnnounceSchedule(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := testHost(t)
		w := NewFakeWire()
		m := New(slog.New(slog.DiscardHandler), f, w, Config{})
		start := time.Now()
		_, err := m.Apply(context.Background(), id(Addr{v4, "eth0"}, Addr{v6, "eth0"}), ApplyOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if d := time.Since(start); d != DefaultProbeWait {
			t.Fatalf("Apply took %v, want the probe wait %v", d, DefaultProbeWait)
		}
		if n := len(w.Announcements()); n != 2 {
			t.Fatalf("%d announcements when Apply returned, want 2", n)
		}
		if err := m.Wait(context.Background()); err != nil {
			t.Fatal(err)
		}
		var got []string
		for _, a := range w.Announcements() {
			got = append(got, fmt.Sprintf("%v %s", a.At.Sub(start)-DefaultProbeWait, a.Addr))
		}
		var want []string
		for _, ms := range []int{0, 200, 400, 600, 800, 5000, 5200, 5400, 5600, 5800} {
			d := time.Duration(ms) * time.Millisecond
			want = append(want, fmt.Sprintf("%v %s", d, v4.Addr()), fmt.Sprintf("%v %s", d, v6.Addr()))
		}
		slices.Sort(got) // the addresses of one instant come in any order
		slices.Sort(want)
		if strings.Join(got, "\n") != strings.Join(want, "\n") {
			t.Fatalf("announcements:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
		}
	})
}

// TestReleaseStopsAnnouncements: nothing is announced after Release began,
// and Release removes the address (never announcing an address it no longer
// holds).
func TestReleaseStopsAnnouncements(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := testHost(t)
		w := NewFakeWire()
		m := New(slog.New(slog.DiscardHandler), f, w, Config{})
		ident := id(Addr{v4, "eth0"})
		if _, err := m.Apply(context.Background(), ident, ApplyOptions{}); err != nil {
			t.Fatal(err)
		}
		time.Sleep(450 * time.Millisecond)
		if _, err := m.Release(context.Background(), ident); err != nil {
			t.Fatal(err)
		}
		released := time.Now()
		n := len(w.Announcements())
		if n != 3 {
			t.Fatalf("%d announcements in the first 450 ms, want 3", n)
		}
		time.Sleep(10 * time.Second)
		if all := w.Announcements(); len(all) != n || all[n-1].At.After(released) {
			t.Fatalf("announcements after Release: %d → %d", n, len(all))
		}
	})
}

// TestApplyRestartsAnnouncements: a second Apply replaces the running
// announcements instead of doubling them.
func TestApplyRestartsAnnouncements(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := testHost(t)
		w := NewFakeWire()
		m := New(slog.New(slog.DiscardHandler), f, w, Config{ProbeWait: -1, SecondBurst: -1})
		ident := id(Addr{v4, "eth0"})
		m.Apply(context.Background(), ident, ApplyOptions{})
		time.Sleep(300 * time.Millisecond) // rounds at 0, 200
		m.Apply(context.Background(), ident, ApplyOptions{})
		m.Wait(context.Background())
		if n := len(w.Announcements()); n != 2+5 {
			t.Fatalf("%d announcements, want 7", n)
		}
		m.Close()
	})
}

func TestApplyCancelled(t *testing.T) {
	f := testHost(t)
	before := f.String()
	m := New(slog.New(slog.DiscardHandler), f, NewFakeWire(), Config{ProbeWait: time.Hour})
	ctx, cancel := context.WithTimeout(t.Context(), 20*time.Millisecond)
	defer cancel()
	_, err := m.Apply(ctx, id(Addr{v4, "eth0"}), ApplyOptions{})
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Apply error = %v, want deadline exceeded", err)
	}
	if f.String() != before {
		t.Fatal("cancelled Apply changed the host")
	}
}

// slowKernel takes a while to make new addresses local, like Linux with a
// new IPv6 address.
type slowKernel struct {
	*Fake
	until time.Time
}

func (k slowKernel) Local(addr netip.Addr) (bool, error) {
	if time.Now().Before(k.until) {
		return false, nil
	}
	return k.Fake.Local(addr)
}

// TestAnnounceWaitsUntilLocal: nothing is announced before the kernel takes
// the address as its own (else a client's first SYN is lost).
func TestAnnounceWaitsUntilLocal(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := testHost(t)
		w := NewFakeWire()
		start := time.Now()
		ready := start.Add(30 * time.Millisecond)
		m := New(slog.New(slog.DiscardHandler), slowKernel{f, ready}, w, Config{ProbeWait: -1, SecondBurst: -1})
		if _, err := m.Apply(context.Background(), id(Addr{v6, "eth0"}), ApplyOptions{}); err != nil {
			t.Fatal(err)
		}
		ann := w.Announcements()
		if len(ann) != 1 || ann[0].At.Before(ready) || ann[0].At.Sub(ready) > time.Millisecond {
			t.Fatalf("first announcement at %v, want just after %v", ann[0].At.Sub(start), ready.Sub(start))
		}
		m.Close()
	})
}

// TestAnnouncementsPerIdentity: one Manager serving two jobs; applying the
// second does not cut the first one's announcements short, and releasing
// the first leaves the second's running.
func TestAnnouncementsPerIdentity(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := testHost(t)
		w := NewFakeWire()
		m := New(slog.New(slog.DiscardHandler), f, w, Config{ProbeWait: -1})
		job1, job2 := id(Addr{v4, "eth0"}), id(Addr{v6, "eth0"})
		m.Apply(context.Background(), job1, ApplyOptions{})
		time.Sleep(100 * time.Millisecond)
		m.Apply(context.Background(), job2, ApplyOptions{})
		time.Sleep(1 * time.Second)
		if _, err := m.Release(context.Background(), job1); err != nil {
			t.Fatal(err)
		}
		m.Wait(context.Background())
		count := map[netip.Addr]int{}
		for _, a := range w.Announcements() {
			count[a.Addr]++
		}
		if count[v4.Addr()] != 5 || count[v6.Addr()] != 10 {
			t.Fatalf("announcements per address: %v; want job1's first burst only (5), all of job2's (10)", count)
		}
	})
}
