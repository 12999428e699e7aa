package snapshot

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// fakeLVM answers lvs and records every command as a line.
type fakeLVM struct {
	cmds []string
	lvs  string
	fail string // a command prefix that fails
	// answers: command line prefix -> output (before lvs's default).
	answers map[string]string
}

func (f *fakeLVM) Run(name string, args ...string) (string, error) {
	line := name + " " + strings.Join(args, " ")
	f.cmds = append(f.cmds, line)
	if f.fail != "" && strings.HasPrefix(line, f.fail) {
		return "", errors.New("exit status 5: " + f.fail + " failed")
	}
	for p, out := range f.answers {
		if strings.HasPrefix(line, p) {
			return out, nil
		}
	}
	if name == "lvs" {
		return f.lvs, nil
	}
	return "", nil
}

// TestLVMThinCommands: the commands the thin mechanism runs for each
// operation, and what it refuses (LVs that are not its own).
func TestLVMThinCommands(t *testing.T) {
	f := &fakeLVM{lvs: "  LVM2_LV_SIZE=1073741824 LVM2_DATA_PERCENT=12.50\n"}
	m := &lvmThin{vg: "vg0", lv: "data", pool: "pool", run: f, active: map[string]int{}}
	loc, err := m.Take("s1")
	if err != nil || loc != "vg0/data_snap_s1" {
		t.Fatalf("take: %q %v", loc, err)
	}
	p, err := m.Clone(loc, "t1")
	if err != nil || p != "/dev/vg0/data_clone_t1" {
		t.Fatalf("clone: %q %v", p, err)
	}
	if err := m.RemoveClone(p); err != nil {
		t.Fatal(err)
	}
	path, done, err := m.Open(loc)
	if err != nil || path != "/dev/vg0/data_snap_s1" {
		t.Fatalf("open: %q %v", path, err)
	}
	if err := done(); err != nil {
		t.Fatal(err)
	}
	if u := m.Usage(loc); u.Allocated != 134217728 || u.Exclusive != -1 {
		t.Fatalf("usage %+v", u)
	}
	if err := m.Remove(loc); err != nil {
		t.Fatal(err)
	}
	want := []string{
		"lvs --noheadings --nameprefixes --unquoted -o lv_name,lv_tags --select lv_name=data_snap_s1 vg0",
		"lvcreate -qq --snapshot --name data_snap_s1 --addtag doppel vg0/data",
		"lvcreate -qq --snapshot --setactivationskip n --name data_clone_t1 --addtag doppel vg0/data_snap_s1",
		"lvchange -qq --activate y vg0/data_clone_t1",
		"lvremove -qq --yes vg0/data_clone_t1",
		"lvchange -qq --activate y --ignoreactivationskip vg0/data_snap_s1",
		"lvchange -qq --activate n vg0/data_snap_s1",
		"lvchange -qq --activate y --ignoreactivationskip vg0/data_snap_s1",
		"lvs --noheadings --units b --nosuffix --nameprefixes --unquoted -o lv_size,data_percent vg0/data_snap_s1",
		"lvchange -qq --activate n vg0/data_snap_s1",
		"lvremove -qq --yes vg0/data_snap_s1",
	}
	if got := strings.Join(f.cmds, "\n"); got != strings.Join(want, "\n") {
		t.Fatalf("commands:\n%s\nwant:\n%s", got, strings.Join(want, "\n"))
	}
	for _, bad := range []string{"vg0/data", "vg1/data_snap_s1", "vg0/other_snap_x", "data_snap_s1"} {
		if err := m.Remove(bad); !errors.Is(err, ErrInvalid) {
			t.Errorf("remove %s: %v", bad, err)
		}
	}
	if _, all, _ := m.Differs(loc, 65536); !all {
		t.Fatal("thin snapshots cannot narrow a rollback")
	}
	f.fail = "lvchange -qq --activate y vg0/data_clone"
	if _, err := m.Clone("", "t2"); err == nil || f.cmds[len(f.cmds)-1] != "lvremove -qq --yes vg0/data_clone_t2" {
		t.Fatalf("a clone that cannot be activated is removed: %v %v", err, f.cmds)
	}
}

// TestLVMThinLeftover: an LV of the snapshot's name that doppel made (an
// interrupted Create: lvcreate done, the catalog not written) is
// replaced; one it did not make is refused and kept.
func TestLVMThinLeftover(t *testing.T) {
	const query = "lvs --noheadings --nameprefixes --unquoted -o lv_name,lv_tags --select lv_name=data_snap_s1 vg0"
	f := &fakeLVM{answers: map[string]string{query: "  LVM2_LV_NAME=data_snap_s1 LVM2_LV_TAGS=backup,doppel\n"}}
	m := &lvmThin{vg: "vg0", lv: "data", pool: "pool", run: f, active: map[string]int{}}
	if loc, err := m.Take("s1"); err != nil || loc != "vg0/data_snap_s1" {
		t.Fatalf("take over a leftover: %q %v", loc, err)
	}
	want := []string{query, "lvremove -qq --yes vg0/data_snap_s1", "lvcreate -qq --snapshot --name data_snap_s1 --addtag doppel vg0/data"}
	if got := strings.Join(f.cmds, "\n"); got != strings.Join(want, "\n") {
		t.Fatalf("commands:\n%s\nwant:\n%s", got, strings.Join(want, "\n"))
	}
	f = &fakeLVM{answers: map[string]string{query: "  LVM2_LV_NAME=data_snap_s1 LVM2_LV_TAGS=mine\n"}}
	m.run = f
	if _, err := m.Take("s1"); !errors.Is(err, ErrExists) || len(f.cmds) != 1 {
		t.Fatalf("an LV doppel did not make: %v, commands %v", err, f.cmds)
	}
}

// TestLVMThinActivation: a snapshot read by two users at once (a rollback
// and a listing's Usage) stays active until the last is done; LVM's
// blank data_percent (an inactive thin LV) is reported as unknown, not 0.
func TestLVMThinActivation(t *testing.T) {
	f := &fakeLVM{lvs: "  LVM2_LV_SIZE=1073741824 LVM2_DATA_PERCENT=\n"}
	m := &lvmThin{vg: "vg0", lv: "data", pool: "pool", run: f, active: map[string]int{}}
	_, done1, err := m.Open("vg0/data_snap_s1")
	if err != nil {
		t.Fatal(err)
	}
	u := m.Usage("vg0/data_snap_s1")
	if u.Allocated != -1 || !strings.Contains(u.How, "unknown") {
		t.Errorf("blank data_percent: %+v", u)
	}
	_, done2, _ := m.Open("vg0/data_snap_s1")
	done1()
	done1() // twice: counted once
	for _, c := range f.cmds {
		if strings.HasPrefix(c, "lvchange -qq --activate n") {
			t.Fatalf("deactivated while in use: %v", f.cmds)
		}
	}
	done2()
	want := []string{
		"lvchange -qq --activate y --ignoreactivationskip vg0/data_snap_s1",
		"lvs --noheadings --units b --nosuffix --nameprefixes --unquoted -o lv_size,data_percent vg0/data_snap_s1",
		"lvchange -qq --activate n vg0/data_snap_s1",
	}
	if got := strings.Join(f.cmds, "\n"); got != strings.Join(want, "\n") {
		t.Fatalf("commands:\n%s\nwant:\n%s", got, strings.Join(want, "\n"))
	}
}

func TestParseNamePrefixes(t *testing.T) {
	kv := parseNamePrefixes("  LVM2_VG_NAME=vg0 LVM2_LV_NAME=data LVM2_SEGTYPE=thin LVM2_POOL_LV=pool\n")
	if kv["LVM2_VG_NAME"] != "vg0" || kv["LVM2_SEGTYPE"] != "thin" || kv["LVM2_POOL_LV"] != "pool" {
		t.Fatalf("%v", kv)
	}
}

// TestVolumeSize: a block device's size (a snapshot's Size) is its
// length, not stat's 0; Detect reads its device number.
func TestVolumeSize(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: a loop device")
	}
	img := filepath.Join(t.TempDir(), "vol.img")
	if err := os.WriteFile(img, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(img, 3<<20); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command("losetup", "-f", "--show", img).CombinedOutput()
	if err != nil {
		t.Fatalf("losetup: %v: %s", err, out)
	}
	loop := strings.TrimSpace(string(out))
	t.Cleanup(func() { exec.Command("losetup", "-d", loop).Run() })
	// A block device that is not a device-mapper LV: refused as such
	// (stat's device number read, /sys/dev/block/M:N/dm absent).
	if _, err := Detect(loop, "web"); !errors.Is(err, ErrUnsupported) || !strings.Contains(err.Error(), "is not an LVM logical volume") {
		t.Errorf("detect on %s: %v", loop, err)
	}
	if n := volumeSize(loop); n != 3<<20 {
		t.Errorf("size of %s: %d, want %d", loop, n, 3<<20)
	}
	if n := volumeSize(img); n != 3<<20 {
		t.Errorf("size of the file: %d", n)
	}
	if n := volumeSize(filepath.Join(t.TempDir(), "missing")); n != -1 {
		t.Errorf("size of a missing volume: %d", n)
	}
}
