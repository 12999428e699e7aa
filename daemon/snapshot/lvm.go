package snapshot

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"

	"golang.org/x/sys/unix"
)

// runner runs a command and returns its standard output (tests replace
// it to see the commands).
type runner interface {
	Run(name string, args ...string) (string, error)
}

type execRunner struct{}

func (execRunner) Run(name string, args ...string) (string, error) {
	var out, errb bytes.Buffer
	c := exec.Command(name, args...)
	c.Stdout, c.Stderr = &out, &errb
	if err := c.Run(); err != nil {
		return out.String(), fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, strings.TrimSpace(errb.String()))
	}
	return out.String(), nil
}

// lvmThin snapshots a thin logical volume with LVM thin snapshots:
// VG/LV_snap_NAME (the activation-skip flag LVM sets on thin snapshots
// is kept: a snapshot is activated only while it is read); clones are
// VG/LV_clone_NAME, activated.
type lvmThin struct {
	vg, lv, pool string
	run          runner

	// mu guards active: how many users (Open, Usage) each snapshot LV
	// has; it is activated for the first and deactivated after the last.
	mu     sync.Mutex
	active map[string]int
}

// detectLVM checks that the block device at path is a thin LV.
func detectLVM(path, job string, run runner) (Mechanism, error) {
	// os.Stat's Sys is a *syscall.Stat_t: stat again for the device number.
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return nil, fmt.Errorf("%w: stat %s: %w", ErrUnsupported, path, err)
	}
	sys := fmt.Sprintf("/sys/dev/block/%d:%d/dm/uuid", unix.Major(uint64(st.Rdev)), unix.Minor(uint64(st.Rdev)))
	uuid, err := os.ReadFile(sys)
	if err != nil || !strings.HasPrefix(string(uuid), "LVM-") {
		return nil, fmt.Errorf("%w: block device %s is not an LVM logical volume: snapshots need a thin LV (lvcreate --thin) or a file volume on XFS or btrfs", ErrUnsupported, path)
	}
	out, err := run.Run("lvs", "--noheadings", "--nameprefixes", "--unquoted", "-o", "vg_name,lv_name,segtype,pool_lv", path)
	if err != nil {
		return nil, fmt.Errorf("%w: %s: %w", ErrUnsupported, path, err)
	}
	kv := parseNamePrefixes(out)
	m := &lvmThin{vg: kv["LVM2_VG_NAME"], lv: kv["LVM2_LV_NAME"], pool: kv["LVM2_POOL_LV"], run: run, active: map[string]int{}}
	if m.vg == "" || m.lv == "" {
		return nil, fmt.Errorf("%w: lvs did not name the LV of %s: %q", ErrUnsupported, path, out)
	}
	if seg := kv["LVM2_SEGTYPE"]; seg != "thin" {
		return nil, fmt.Errorf("%w: %s/%s is a %s LV, not a thin one: snapshots need a thin LV (lvcreate --thin; move the data to it) or a file volume on XFS or btrfs", ErrUnsupported, m.vg, m.lv, seg)
	}
	return m, nil
}

// parseNamePrefixes reads lvs --nameprefixes --unquoted output (one LV).
func parseNamePrefixes(out string) map[string]string {
	kv := map[string]string{}
	for _, f := range strings.Fields(out) {
		if k, v, ok := strings.Cut(f, "="); ok {
			kv[k] = strings.Trim(v, "'\"")
		}
	}
	return kv
}

func (m *lvmThin) Name() string { return "lvm-thin" }

func (m *lvmThin) Describe() string {
	return fmt.Sprintf("LVM thin snapshots of %s/%s (pool %s)", m.vg, m.lv, m.pool)
}

func (m *lvmThin) snapLV(name string) string  { return m.lv + "_snap_" + name }
func (m *lvmThin) cloneLV(name string) string { return m.lv + "_clone_" + name }

func (m *lvmThin) Take(name string) (string, error) {
	lv := m.snapLV(name)
	// The catalog has no snapshot of this name (Manager.Create checked,
	// under its lock): an LV of that name made by doppel (tagged) is the
	// leftover of a Create interrupted between lvcreate and the catalog,
	// and is replaced; one doppel did not make is left alone.
	out, err := m.run.Run("lvs", "--noheadings", "--nameprefixes", "--unquoted", "-o", "lv_name,lv_tags", "--select", "lv_name="+lv, m.vg)
	if err != nil {
		return "", fmt.Errorf("thin snapshot: %w", err)
	}
	kv := parseNamePrefixes(out)
	switch tags := kv["LVM2_LV_TAGS"]; {
	case kv["LVM2_LV_NAME"] != lv:
	case slices.Contains(strings.Split(tags, ","), "doppel"):
		if _, err := m.run.Run("lvremove", "-qq", "--yes", m.vg+"/"+lv); err != nil {
			return "", fmt.Errorf("remove the leftover thin snapshot %s/%s: %w", m.vg, lv, err)
		}
	default:
		return "", fmt.Errorf("%w: %s/%s exists and was not made by doppel (tags %q)", ErrExists, m.vg, lv, tags)
	}
	if _, err := m.run.Run("lvcreate", "-qq", "--snapshot", "--name", lv, "--addtag", "doppel", m.vg+"/"+m.lv); err != nil {
		return "", fmt.Errorf("thin snapshot: %w", err)
	}
	return m.vg + "/" + lv, nil
}

// mine refuses an LV that is not one of this volume's snapshots or clones.
func (m *lvmThin) mine(loc string) error {
	vg, lv, ok := strings.Cut(loc, "/")
	if !ok || vg != m.vg || !(strings.HasPrefix(lv, m.lv+"_snap_") || strings.HasPrefix(lv, m.lv+"_clone_")) {
		return fmt.Errorf("%w: %s is not a snapshot of %s/%s", ErrInvalid, loc, m.vg, m.lv)
	}
	return nil
}

func (m *lvmThin) Remove(loc string) error {
	if err := m.mine(loc); err != nil {
		return err
	}
	if _, err := m.run.Run("lvremove", "-qq", "--yes", loc); err != nil {
		return fmt.Errorf("remove thin snapshot: %w", err)
	}
	return nil
}

func (m *lvmThin) Clone(loc, name string) (string, error) {
	origin := m.vg + "/" + m.lv
	if loc != "" {
		if err := m.mine(loc); err != nil {
			return "", err
		}
		origin = loc
	}
	lv := m.cloneLV(name)
	if _, err := m.run.Run("lvcreate", "-qq", "--snapshot", "--setactivationskip", "n", "--name", lv, "--addtag", "doppel", origin); err != nil {
		return "", fmt.Errorf("thin clone: %w", err)
	}
	if _, err := m.run.Run("lvchange", "-qq", "--activate", "y", m.vg+"/"+lv); err != nil {
		m.run.Run("lvremove", "-qq", "--yes", m.vg+"/"+lv)
		return "", fmt.Errorf("activate thin clone: %w", err)
	}
	return filepath.Join("/dev", m.vg, lv), nil
}

func (m *lvmThin) RemoveClone(path string) error {
	return m.Remove(m.vg + "/" + filepath.Base(path))
}

// Open activates the snapshot LV (-K: its activation-skip flag kept) for
// as long as someone reads it; the last done deactivates it.
func (m *lvmThin) Open(loc string) (string, func() error, error) {
	if err := m.mine(loc); err != nil {
		return "", nil, err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.active[loc] == 0 {
		if _, err := m.run.Run("lvchange", "-qq", "--activate", "y", "--ignoreactivationskip", loc); err != nil {
			return "", nil, fmt.Errorf("activate thin snapshot: %w", err)
		}
	}
	m.active[loc]++
	var once sync.Once
	done := func() error {
		var err error
		once.Do(func() {
			m.mu.Lock()
			defer m.mu.Unlock()
			if m.active[loc]--; m.active[loc] > 0 {
				return
			}
			delete(m.active, loc)
			if _, e := m.run.Run("lvchange", "-qq", "--activate", "n", loc); e != nil {
				err = fmt.Errorf("deactivate thin snapshot: %w", e)
			}
		})
		return err
	}
	return filepath.Join("/dev", loc), done, nil
}

// Usage is the thin snapshot's mapped data: its size × data_percent
// from lvs. LVM reports data_percent only for an active thin LV, so the
// snapshot is activated for the reading (and deactivated again).
func (m *lvmThin) Usage(loc string) Usage {
	u := Usage{Allocated: -1, Exclusive: -1, How: "lvs: size × data_percent of the thin snapshot (blocks shared with the volume included; LVM does not report exclusive ones)"}
	if err := m.mine(loc); err != nil {
		u.How = "unknown: " + err.Error()
		return u
	}
	_, done, err := m.Open(loc)
	if err != nil {
		u.How = "unknown: " + err.Error()
		return u
	}
	defer done()
	out, err := m.run.Run("lvs", "--noheadings", "--units", "b", "--nosuffix", "--nameprefixes", "--unquoted", "-o", "lv_size,data_percent", loc)
	if err != nil {
		u.How = "unknown: " + err.Error()
		return u
	}
	kv := parseNamePrefixes(out)
	size, err1 := strconv.ParseFloat(kv["LVM2_LV_SIZE"], 64)
	pct, err2 := strconv.ParseFloat(kv["LVM2_DATA_PERCENT"], 64)
	if err1 != nil || err2 != nil {
		u.How = fmt.Sprintf("unknown: lvs printed %q", strings.TrimSpace(out))
		return u
	}
	u.Allocated = int64(size * pct / 100)
	return u
}

// Differs cannot tell without reading (thin_delta needs the pool's
// metadata snapshot): every chunk may differ.
func (m *lvmThin) Differs(string, int64) ([]int64, bool, error) { return nil, true, nil }
