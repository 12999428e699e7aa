package netident

import (
	"errors"
	"net/netip"
	"slices"
	"testing"
)

func TestParseServiceIP(t *testing.T) {
	good := []struct {
		in   string
		want Addr
	}{
		{"172.17.22.187/24@eth0", Addr{netip.MustParsePrefix("172.17.22.187/24"), "eth0"}},
		{"fd00:17::187/64@ens3", Addr{netip.MustParsePrefix("fd00:17::187/64"), "ens3"}},
		{"10.0.0.5/32@bond0.100", Addr{netip.MustParsePrefix("10.0.0.5/32"), "bond0.100"}},
		{"fe80::5/64@br-lan", Addr{netip.MustParsePrefix("fe80::5/64"), "br-lan"}},
	}
	for _, g := range good {
		got, err := ParseServiceIP(g.in)
		if err != nil || got != g.want {
			t.Errorf("ParseServiceIP(%q) = %v, %v; want %v", g.in, got, err, g.want)
		}
		if got.String() != g.in {
			t.Errorf("%q.String() = %q", g.in, got.String())
		}
	}
	bad := []string{
		"", "@", "172.17.22.187@eth0", "172.17.22.187/24", "172.17.22.187/24@",
		"172.17.22.300/24@eth0", "172.17.22.187/33@eth0", "0.0.0.0/0@eth0", "127.0.0.5/8@lo",
		"224.0.0.5/24@eth0", "ff02::1/64@eth0", "::/64@eth0", "::1/128@lo", "::ffff:10.0.0.5/120@eth0",
		"fe80::1%eth0/64@eth0", "10.0.0.5/24@eth0:1", "10.0.0.5/24@a/b", "10.0.0.5/24@0123456789abcdef",
		"10.0.0.5/24@eth 0", "255.255.255.255/32@eth0", "10.0.0.5/24@..",
	}
	for _, b := range bad {
		if a, err := ParseServiceIP(b); !errors.Is(err, ErrBadServiceIP) {
			t.Errorf("ParseServiceIP(%q) = %v, %v; want ErrBadServiceIP", b, a, err)
		}
	}
}

func TestParseIfaceMap(t *testing.T) {
	m, err := ParseIfaceMap("eth0=ens3", "eth1=ens4,bond0=bond1")
	if err != nil {
		t.Fatal(err)
	}
	if m.String() != "bond0=bond1,eth0=ens3,eth1=ens4" {
		t.Fatalf("String() = %q", m.String())
	}
	addrs := m.Map([]Addr{{v4, "eth0"}, {v6, "eth9"}})
	if !slices.Equal(addrs, []Addr{{v4, "ens3"}, {v6, "eth9"}}) {
		t.Fatalf("Map = %v", addrs)
	}
	if m, err := ParseIfaceMap(); err != nil || len(m) != 0 {
		t.Fatalf("empty: %v %v", m, err)
	}
	for _, b := range []string{"eth0", "=ens3", "eth0=", "eth0=ens3,eth0=ens4", "eth0=en s3", "eth0=ens3,", "a=b=c"} {
		if _, err := ParseIfaceMap(b); !errors.Is(err, ErrBadIfaceMap) {
			t.Errorf("ParseIfaceMap(%q) error = %v, want ErrBadIfaceMap", b, err)
		}
	}
}

// FuzzParseServiceIP: never panics; what parses re-parses to itself from
// its String form, and passes Validate.
func FuzzParseServiceIP(f *testing.F) {
	for _, s := range []string{"172.17.22.187/24@eth0", "fd00::1/64@ens3", "1.2.3.4/0@a", "@@", "::ffff:1.2.3.4/128@x", "1.2.3.4/24@eth0@eth1"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		a, err := ParseServiceIP(s)
		if err != nil {
			return
		}
		b, err := ParseServiceIP(a.String())
		if err != nil || b != a {
			t.Fatalf("%q → %v → %q → %v, %v", s, a, a.String(), b, err)
		}
		if err := (Identity{Addrs: []Addr{a}}).Validate(); err != nil {
			t.Fatalf("%q parses but does not validate: %v", s, err)
		}
	})
}

// FuzzParseIfaceMap: never panics; String re-parses to the same map.
func FuzzParseIfaceMap(f *testing.F) {
	for _, s := range []string{"eth0=ens3", "eth0=ens3,eth1=ens4", "=", ",", "a=b,a=c", "a=b=c"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		m, err := ParseIfaceMap(s)
		if err != nil || len(m) == 0 {
			return
		}
		m2, err := ParseIfaceMap(m.String())
		if err != nil || m2.String() != m.String() || len(m2) != len(m) {
			t.Fatalf("%q → %q → %v, %v", s, m.String(), m2, err)
		}
		for src, tgt := range m {
			if CheckIfaceName(src) != nil || CheckIfaceName(tgt) != nil {
				t.Fatalf("%q: accepted bad names %q=%q", s, src, tgt)
			}
		}
	})
}
