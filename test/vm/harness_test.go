package vm

import (
	"bufio"
	"bytes"
	"fmt"
	"os/exec"
	"reflect"
	"regexp"
	"strings"
	"testing"
	"time"
)

func TestNewest(t *testing.T) {
	re := regexp.MustCompile(`^linux-image-6\.1\.0-(\d+)-amd64$`)
	names := []string{"linux-image-6.1.0-9-amd64", "linux-image-6.1.0-56-amd64", "linux-image-6.1.0-56-cloud-amd64",
		"linux-image-6.1.0-100-rt-amd64", "linux-image-6.1.0-55-amd64"}
	if got := newest(re, names); got != "linux-image-6.1.0-56-amd64" {
		t.Errorf("newest = %q", got)
	}
	if got := newest(re, nil); got != "" {
		t.Errorf("newest of nothing = %q", got)
	}
}

func TestModuleOrder(t *testing.T) {
	// virtio_net's real dependencies in Debian 6.1: modprobe loads the
	// modules.dep list from the end, so virtio_ring must come after virtio.
	all := map[string]module{
		"virtio_net":   {path: "n.ko", depends: []string{"virtio_ring", "virtio", "net_failover"}},
		"virtio":       {path: "v.ko", depends: []string{"virtio_ring"}},
		"virtio_ring":  {path: "r.ko"},
		"net_failover": {path: "nf.ko", depends: []string{"failover"}},
		"failover":     {path: "f.ko"},
	}
	got := depsInOrder(all, "virtio_net")
	pos := map[string]int{}
	for i, m := range got {
		pos[m] = i
	}
	for m, mod := range all {
		for _, d := range mod.depends {
			if m != "virtio_net" && pos[d] < pos[m] {
				t.Errorf("%s needs %s, but %s is loaded later: %v", m, d, d, got)
			}
		}
	}
	if len(got) != 4 {
		t.Errorf("deps %v", got)
	}
	need, err := closure(all, []string{"virtio-net"})
	if err != nil || len(need) != 5 {
		t.Errorf("closure: %v %v", need, err)
	}
	if _, err := closure(all, []string{"nbd"}); err == nil {
		t.Error("missing module accepted")
	}
	name, deps := parseModinfo([]byte("license=GPL\x00depends=virtio_ring,virtio\x00name=virtio_net\x00vermagic=6.1\x00"))
	if name != "virtio_net" || !reflect.DeepEqual(deps, []string{"virtio_ring", "virtio"}) {
		t.Errorf("modinfo: %q %v", name, deps)
	}
	// dm_thin_pool's depends names its modules with '-'.
	name, deps = parseModinfo([]byte("depends=dm-persistent-data,dm-bio-prison,dm-mod\x00name=dm_thin_pool\x00"))
	if name != "dm_thin_pool" || !reflect.DeepEqual(deps, []string{"dm_persistent_data", "dm_bio_prison", "dm_mod"}) {
		t.Errorf("modinfo with dashes: %q %v", name, deps)
	}
}

func TestParseLdd(t *testing.T) {
	out := []byte("\tlinux-vdso.so.1 (0x00007ffd)\n\tlibz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x00007f)\n\t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n")
	got, err := parseLdd(out)
	if err != nil || !reflect.DeepEqual(got, []string{"/lib/x86_64-linux-gnu/libz.so.1", "/lib64/ld-linux-x86-64.so.2"}) {
		t.Errorf("%v %v", got, err)
	}
	if _, err := parseLdd([]byte("\tlibfoo.so.1 => not found\n")); err == nil {
		t.Error("missing library accepted")
	}
}

// TestCPIO checks the archive with the cpio tool when it is installed.
func TestCPIO(t *testing.T) {
	var b bytes.Buffer
	c := newCPIO(&b)
	c.file("/usr/bin/x", 0o755, []byte("hello"))
	c.symlink("/bin/sh", "busybox")
	c.chardev("/dev/console", 5, 1)
	if err := c.close(); err != nil {
		t.Fatal(err)
	}
	if b.Len()%4 != 0 || !bytes.HasPrefix(b.Bytes(), []byte("070701")) {
		t.Fatalf("not a newc archive: %d bytes", b.Len())
	}
	if _, err := exec.LookPath("cpio"); err != nil {
		t.Skip("cpio not installed: the listing check needs it")
	}
	cmd := exec.Command("cpio", "-t", "--quiet")
	cmd.Stdin = &b
	out, err := cmd.Output()
	if err != nil {
		t.Fatal(err)
	}
	want := "usr\nusr/bin\nusr/bin/x\nbin\nbin/sh\ndev\ndev/console\n"
	if string(out) != want {
		t.Errorf("cpio -t:\n%s\nwant:\n%s", out, want)
	}
}

func TestReadReply(t *testing.T) {
	stream := "noise\n@@READY\n@@BEGIN 3\nline1\nline2 @@END 3 1\n\n@@END 3 42\n@@BEGIN 4\n\n@@END 4 0\n"
	r := bufio.NewReader(strings.NewReader(stream))
	out, rc, err := readReply(r, "3")
	if err != nil || rc != 42 || out != "line1\nline2 @@END 3 1\n" {
		t.Errorf("reply 3: %q %d %v", out, rc, err)
	}
	out, rc, err = readReply(r, "4")
	if err != nil || rc != 0 || out != "" {
		t.Errorf("reply 4: %q %d %v", out, rc, err)
	}
	if _, _, err := readReply(r, "5"); err == nil {
		t.Error("EOF accepted")
	}
}

// FuzzReadReply: whatever a guest prints, the reply reader never panics.
func FuzzReadReply(f *testing.F) {
	f.Add("@@BEGIN 1\nout\n@@END 1 0\n")
	f.Add("@@BEGIN 1\n\n@@END 1 x\n")
	f.Add("@@BEGIN 1\n@@END 1 0")
	f.Fuzz(func(t *testing.T, s string) {
		out, rc, err := readReply(bufio.NewReader(strings.NewReader(s)), "1")
		if err == nil && (rc < 0 || !strings.Contains(s, out)) {
			t.Fatalf("reply %q rc %d from %q", out, rc, s)
		}
	})
}

// FuzzParseHostOutput: the .modinfo and ldd parsers never panic.
func FuzzParseHostOutput(f *testing.F) {
	f.Add([]byte("name=nbd\x00depends=\x00"))
	f.Add([]byte("\tlibz.so.1 => /lib/libz.so.1 (0x1)\n/lib64/ld.so (0x2)\n"))
	f.Fuzz(func(t *testing.T, b []byte) {
		name, deps := parseModinfo(b)
		for _, d := range deps {
			if d == "" || strings.Contains(d, ",") {
				t.Fatalf("dependency %q from %q", d, b)
			}
		}
		_ = name
		libs, err := parseLdd(b)
		for _, l := range libs {
			if err == nil && !strings.HasPrefix(l, "/") {
				t.Fatalf("library %q from %q", l, b)
			}
		}
	})
}

func TestGuestTimes(t *testing.T) {
	got, err := parseGuestTime("1795641391.021060\n")
	if err != nil || !got.Equal(time.Unix(1795641391, 21060000)) {
		t.Errorf("parseGuestTime: %v %v", got, err)
	}
	for _, bad := range []string{"", "1795641391", "1795641391.21", "x.000001", "1.00000x", "-1.000000", "+1.000000", ".000001"} {
		if _, err := parseGuestTime(bad); err == nil {
			t.Errorf("parseGuestTime(%q) accepted", bad)
		}
	}
	log := "time=2026-11-25T21:18:23.727Z level=INFO msg=\"action done\" job=web self=vm1 action=serve\n" +
		"time=2026-11-25T21:18:23.728Z level=INFO msg=\"action done\" job=web self=vm1 action=apply-identity\n" +
		"time=2026-11-25T21:18:24.001Z level=INFO msg=\"action done\" job=web self=vm1 action=apply-identity\n"
	ts, ok := slogTime(log, regexp.MustCompile(`msg="action done".*apply-identity`))
	if !ok || !ts.Equal(time.Date(2026, 11, 25, 21, 18, 23, 728e6, time.UTC)) {
		t.Errorf("slogTime: %v %v", ts, ok)
	}
	if _, ok := slogTime(log, regexp.MustCompile("promote")); ok {
		t.Error("slogTime found a missing line")
	}
	c := Clock{Offset: 1500 * time.Millisecond}
	if h := c.Host(time.Unix(100, 0)); !h.Equal(time.Unix(98, 5e8)) {
		t.Errorf("Clock.Host: %v", h)
	}
}

// FuzzParseGuestTime: whatever a guest prints, the clock parser never
// panics, and what it accepts it reads back exactly.
func FuzzParseGuestTime(f *testing.F) {
	f.Add("1795641391.021060")
	f.Add("-1.000000")
	f.Add("99999999999999999999.000000")
	f.Fuzz(func(t *testing.T, s string) {
		ts, err := parseGuestTime(s)
		if err != nil {
			return
		}
		back := fmt.Sprintf("%d.%06d", ts.Unix(), ts.Nanosecond()/1000)
		again, err := parseGuestTime(back)
		if err != nil || !again.Equal(ts) || ts.Nanosecond()%1000 != 0 {
			t.Fatalf("%q read as %v, printed %s, read back as %v (%v)", s, ts, back, again, err)
		}
	})
}
