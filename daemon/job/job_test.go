package job

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/doppelha/doppel/daemon/ha"
	"golang.org/x/sys/unix"
)

func validSpec() Spec {
	s := Spec{
		Name:       "web",
		Source:     Endpoint{Name: "vm1", Control: "172.17.22.11:6320", Repl: "192.168.0.11:6325", Fingerprint: "sha256:" + strings.Repeat("a", 64)},
		Target:     Endpoint{Name: "vm2", Control: "vm2.example:6320", Repl: "192.168.0.12:6325", Fingerprint: "sha256:" + strings.Repeat("b", 64)},
		Volume:     "/dev/vdb",
		ServiceIPs: []ServiceIP{{Prefix: "172.17.22.187/24", Iface: "eth0"}},
		MapIface:   map[string]string{"eth0": "eth1"},
		Failover:   ha.FailoverAuto,
		Scripts:    map[ha.Hook]string{ha.HookPostFailover: "/etc/doppel/up.sh"},
		Secret:     strings.Repeat("s", 64),
	}
	s.Defaults()
	return s
}

func TestValidate(t *testing.T) {
	good := validSpec()
	if err := good.Validate(); err != nil {
		t.Fatalf("valid spec refused: %v", err)
	}
	for _, tc := range []struct {
		name, want string
		mut        func(*Spec)
	}{
		{"name", "job name", func(s *Spec) { s.Name = "Web Server" }},
		{"same server", "same server", func(s *Spec) { s.Target.Name = "vm1" }},
		{"same agent", "same agent", func(s *Spec) { s.Target.Fingerprint = s.Source.Fingerprint }},
		{"relative volume", "absolute path", func(s *Spec) { s.Volume = "vdb" }},
		{"mode", "use sync or async", func(s *Spec) { s.Mode = "semi" }},
		{"service ip", "service IP", func(s *Spec) { s.ServiceIPs[0].Prefix = "172.17.22.300/24" }},
		{"iface", "interface name", func(s *Spec) { s.ServiceIPs[0].Iface = "a/b" }},
		{"interval", "below the minimum", func(s *Spec) { s.Monitor.Interval = 10e6 }},
		{"missed", "below the minimum", func(s *Spec) { s.Monitor.Missed = 1 }},
		{"failover", "auto or manual", func(s *Spec) { s.Failover = "maybe" }},
		{"hook", "script hook", func(s *Spec) { s.Scripts = map[ha.Hook]string{"on-tuesday": "/x"} }},
		{"script path", "absolute path", func(s *Spec) { s.Scripts = map[ha.Hook]string{ha.HookPreFailover: "x.sh"} }},
		{"secret", "secret", func(s *Spec) { s.Secret = "" }},
		{"repl addr", "replication address", func(s *Spec) { s.Target.Repl = "192.168.0.12" }},
		{"fingerprint", "fingerprint", func(s *Spec) { s.Source.Fingerprint = "md5:00" }},
		{"queue", "queue size", func(s *Spec) { s.QueueMemory = 4096 }},
		{"queue below a mirror read", "queue size", func(s *Spec) { s.QueueMemory = 2 << 20 }},
		{"negative queue", "queue size", func(s *Spec) { s.QueueMemory = -1 }},
		{"disk queue", "disk queue size", func(s *Spec) { s.QueueDisk = 1000 }},
		{"disk queue -2", "disk queue size", func(s *Spec) { s.QueueDisk = -2 }},
		{"rate", "rate limit", func(s *Spec) { s.RateLimit = 1000 }},
		{"rate vs keepalive", "session would time out", func(s *Spec) {
			s.RateLimit = 128 << 10
			s.Monitor = Monitor{Interval: 50e6, Missed: 3}
		}},
	} {
		s := validSpec()
		s.ServiceIPs = append([]ServiceIP(nil), s.ServiceIPs...)
		tc.mut(&s)
		err := s.Validate()
		if !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: got %v, want ErrInvalid mentioning %q", tc.name, err, tc.want)
		}
	}
}

// TestQueueAndRateAccepted: the queue and rate options' valid values.
func TestQueueAndRateAccepted(t *testing.T) {
	for _, mut := range []func(*Spec){
		func(s *Spec) { s.QueueMemory, s.QueueDisk = MinQueue, -1 },
		func(s *Spec) { s.QueueMemory, s.QueueDisk = 64<<20, 1<<30 },
		func(s *Spec) { s.RateLimit = 256 << 10 }, // 250 ms per chunk, monitor 250 ms × 8
		func(s *Spec) { s.RateLimit = 100 << 20 },
	} {
		s := validSpec()
		mut(&s)
		if err := s.Validate(); err != nil {
			t.Errorf("%+v refused: %v", s, err)
		}
	}
}

func TestParsers(t *testing.T) {
	if ip, err := ParseServiceIP("172.17.22.187/24@eth0"); err != nil || ip.Prefix != "172.17.22.187/24" || ip.Iface != "eth0" {
		t.Errorf("ParseServiceIP: %+v %v", ip, err)
	}
	for _, bad := range []string{"172.17.22.187/24", "x@eth0", "10.0.0.1/8@"} {
		if _, err := ParseServiceIP(bad); err == nil {
			t.Errorf("ParseServiceIP(%q) accepted", bad)
		}
	}
	if m, err := ParseMonitor("interval=100ms,missed=5"); err != nil || m.Interval != 100e6 || m.Missed != 5 {
		t.Errorf("ParseMonitor: %+v %v", m, err)
	}
	for _, bad := range []string{"interval=10ms", "missed=2", "every=1s", "interval"} {
		if _, err := ParseMonitor(bad); err == nil {
			t.Errorf("ParseMonitor(%q) accepted", bad)
		}
	}
	for in, want := range map[string]int64{"1": 1, "4096": 4096, "64K": 64 << 10, "512k": 512 << 10, "1M": 1 << 20, "1GiB": 1 << 30, "2g": 2 << 30, "2gb": 2 << 30, "1T": 1 << 40, " 8M ": 8 << 20, "100B": 100} {
		if got, err := ParseSize(in); err != nil || got != want {
			t.Errorf("ParseSize(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, bad := range []string{"", "-1", "0", "1X", "G", "1.5G", "abc", "99999999999P", "99999999999T"} {
		if _, err := ParseSize(bad); err == nil {
			t.Errorf("ParseSize(%q) accepted", bad)
		}
	}
}

func TestStore(t *testing.T) {
	dir := t.TempDir()
	s, err := OpenStore(dir)
	if err != nil {
		t.Fatal(err)
	}
	r := Record{Spec: validSpec(), Self: "vm1", HA: ha.HardState{Role: ha.RoleSource, Epoch: 1}}
	if err := s.Create(r); err != nil {
		t.Fatal(err)
	}
	if err := s.Create(r); !errors.Is(err, ErrExists) {
		t.Fatalf("second create: %v, want ErrExists", err)
	}
	fi, err := os.Stat(filepath.Join(dir, "jobs", "web.json"))
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("record file: %v mode %v, want 0600 (it holds the peer secret)", err, fi.Mode())
	}
	r.HA.Epoch = 7
	if err := s.Put(r); err != nil {
		t.Fatal(err)
	}
	// A reopened store (an agent restart) sees the same record.
	s2, _ := OpenStore(dir)
	got, err := s2.Get("web")
	if err != nil || got.HA.Epoch != 7 || got.Spec.Secret != r.Spec.Secret || got.Spec.Monitor != r.Spec.Monitor {
		t.Fatalf("reopened: %+v %v", got, err)
	}
	// A leftover temp file from a crash mid-write is not a job.
	os.WriteFile(filepath.Join(dir, "jobs", ".web.json.tmp123"), []byte("{"), 0o600)
	list, err := s2.List()
	if err != nil || len(list) != 1 {
		t.Fatalf("list: %d records, %v", len(list), err)
	}
	if _, err := s2.Get("nope"); !errors.Is(err, ErrNotFound) || !strings.Contains(err.Error(), "nope") {
		t.Fatalf("get unknown: %v", err)
	}
	if _, err := s2.Get("../etc/passwd"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("get traversal: %v", err)
	}
	if err := s2.Delete("web"); err != nil {
		t.Fatal(err)
	}
	if err := s2.Delete("web"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("second delete: %v", err)
	}
}

func TestCheckVolume(t *testing.T) {
	dir := t.TempDir()
	mi := filepath.Join(dir, "mountinfo")
	os.WriteFile(mi, nil, 0o644)
	if err := CheckVolume(filepath.Join(dir, "missing"), 0, mi); !errors.Is(err, ErrVolumeMissing) || !strings.Contains(err.Error(), "does not exist") {
		t.Errorf("missing volume: %v", err)
	}
	if err := CheckVolume(filepath.Join(dir, "new.img"), 1<<20, mi); err != nil {
		t.Errorf("file volume to create: %v", err)
	}
	if err := CheckVolume(dir, 0, mi); !errors.Is(err, ErrInvalid) {
		t.Errorf("directory: %v", err)
	}
	// A block device listed in mountinfo is refused with where it is mounted.
	devs, _ := filepath.Glob("/dev/loop[0-9]*")
	var dev string
	for _, d := range devs {
		if fi, err := os.Stat(d); err == nil && fi.Mode()&os.ModeDevice != 0 && fi.Mode()&os.ModeCharDevice == 0 {
			dev = d
			break
		}
	}
	if dev == "" {
		t.Skip("no block device node under /dev to check the mounted case")
	}
	var st unix.Stat_t
	if err := unix.Stat(dev, &st); err != nil {
		t.Fatal(err)
	}
	line := fmt.Sprintf("36 35 %d:%d / /srv/data rw,relatime shared:1 - ext4 %s rw\n", unix.Major(uint64(st.Rdev)), unix.Minor(uint64(st.Rdev)), dev)
	os.WriteFile(mi, []byte(line), 0o644)
	if err := CheckVolume(dev, 0, mi); !errors.Is(err, ErrVolumeMounted) || !strings.Contains(err.Error(), "/srv/data") {
		t.Errorf("mounted device: %v", err)
	}
}

func TestParseInterfaceMap(t *testing.T) {
	m, err := ParseInterfaceMap("--map-iface", []string{"eth0=ens3", "eth1=ens4"})
	if err != nil || len(m) != 2 || m["eth0"] != "ens3" || m["eth1"] != "ens4" {
		t.Fatalf("got %v, %v", m, err)
	}
	if m, err := ParseInterfaceMap("--map-iface", nil); m != nil || err != nil {
		t.Fatalf("no entries: got %v, %v", m, err)
	}
	for _, bad := range [][]string{{"eth0"}, {"=ens3"}, {"eth0="}, {"eth0=a", "eth0=b"}} {
		if _, err := ParseInterfaceMap("--map-iface", bad); !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), "--map-iface") {
			t.Errorf("%q: err %v, want ErrInvalid naming --map-iface", bad, err)
		}
	}
}
