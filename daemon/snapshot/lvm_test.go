package snapshot

import (
	"errors"
	"strings"
	"testing"
)

// fakeLVM answers lvs and records every command as a line.
type fakeLVM struct {
	cmds []string
	lvs  string
	fail string // a command prefix that fails
}

func (f *fakeLVM) Run(name string, args ...string) (string, error) {
	line := name + " " + strings.Join(args, " ")
	f.cmds = append(f.cmds, line)
	if f.fail != "" && strings.HasPrefix(line, f.fail) {
		return "", errors.New("exit status 5: " + f.fail + " failed")
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
	m := &lvmThin{vg: "vg0", lv: "data", pool: "pool", run: f}
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
	done()
	if u := m.Usage(loc); u.Allocated != 134217728 || u.Exclusive != -1 {
		t.Fatalf("usage %+v", u)
	}
	if err := m.Remove(loc); err != nil {
		t.Fatal(err)
	}
	want := []string{
		"lvcreate -qq --snapshot --name data_snap_s1 --addtag doppel vg0/data",
		"lvcreate -qq --snapshot --setactivationskip n --name data_clone_t1 --addtag doppel vg0/data_snap_s1",
		"lvchange -qq --activate y vg0/data_clone_t1",
		"lvremove -qq --yes vg0/data_clone_t1",
		"lvchange -qq --activate y --ignoreactivationskip vg0/data_snap_s1",
		"lvchange -qq --activate n vg0/data_snap_s1",
		"lvs --noheadings --units b --nosuffix --nameprefixes --unquoted -o lv_size,data_percent vg0/data_snap_s1",
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

func TestParseNamePrefixes(t *testing.T) {
	kv := parseNamePrefixes("  LVM2_VG_NAME=vg0 LVM2_LV_NAME=data LVM2_SEGTYPE=thin LVM2_POOL_LV=pool\n")
	if kv["LVM2_VG_NAME"] != "vg0" || kv["LVM2_SEGTYPE"] != "thin" || kv["LVM2_POOL_LV"] != "pool" {
		t.Fatalf("%v", kv)
	}
}
