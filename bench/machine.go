package bench

import (
	"bufio"
	"debug/buildinfo"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"strings"

	"golang.org/x/sys/unix"
)

// Machine describes where a benchmark ran.
type Machine struct {
	CPU      string // model name
	CPUs     int    // online CPUs
	MemGiB   float64
	Kernel   string // uname -r
	OS       string // PRETTY_NAME of /etc/os-release
	FS       string // filesystem type of the benchmark directory
	Load     string // /proc/loadavg's first three fields
	Versions map[string]string
}

// DescribeMachine collects the machine's description; dir is the benchmark's
// working directory (its filesystem is reported) and tools maps a label to
// a command line printing that tool's version.
func DescribeMachine(dir string, tools map[string][]string) Machine {
	m := Machine{CPUs: runtime.NumCPU(), Versions: map[string]string{}}
	m.CPU = firstField("/proc/cpuinfo", "model name")
	if kb := firstField("/proc/meminfo", "MemTotal"); kb != "" {
		var n float64
		fmt.Sscanf(kb, "%f", &n)
		m.MemGiB = n / (1 << 20)
	}
	var u unix.Utsname
	if unix.Uname(&u) == nil {
		m.Kernel = unix.ByteSliceToString(u.Release[:])
	}
	if b, err := os.ReadFile("/etc/os-release"); err == nil {
		for l := range strings.Lines(string(b)) {
			if v, ok := strings.CutPrefix(strings.TrimSpace(l), "PRETTY_NAME="); ok {
				m.OS = strings.Trim(v, `"`)
			}
		}
	}
	m.FS = fsType(dir)
	m.Load = LoadAvg()
	for name, argv := range tools {
		out, err := exec.Command(argv[0], argv[1:]...).CombinedOutput()
		if err != nil {
			continue
		}
		line, _, _ := strings.Cut(strings.TrimSpace(string(out)), "\n")
		m.Versions[name] = line
	}
	return m
}

// String is the one-line form used in reports.
func (m Machine) String() string {
	return fmt.Sprintf("%s, %d CPUs, %.0f GiB RAM, %s, kernel %s", m.CPU, m.CPUs, m.MemGiB, m.OS, m.Kernel)
}

// LoadAvg returns /proc/loadavg's 1, 5 and 15 minute figures.
func LoadAvg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "?"
	}
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return "?"
	}
	return strings.Join(f[:3], " ")
}

func firstField(path, key string) string {
	f, err := os.Open(path)
	if err != nil {
		return ""
	}
	defer f.Close()
	s := bufio.NewScanner(f)
	for s.Scan() {
		k, v, ok := strings.Cut(s.Text(), ":")
		if ok && strings.TrimSpace(k) == key {
			return strings.TrimSpace(v)
		}
	}
	return ""
}

func fsType(dir string) string {
	var st unix.Statfs_t
	if unix.Statfs(dir, &st) != nil {
		return "?"
	}
	switch st.Type {
	case unix.EXT4_SUPER_MAGIC:
		return "ext4"
	case unix.XFS_SUPER_MAGIC:
		return "xfs"
	case unix.BTRFS_SUPER_MAGIC:
		return "btrfs"
	case unix.TMPFS_MAGIC:
		return "tmpfs"
	case unix.OVERLAYFS_SUPER_MAGIC:
		return "overlayfs"
	}
	return fmt.Sprintf("0x%x", st.Type)
}

// BinaryRevision returns the VCS revision a Go binary was built from (12
// hex digits, "+modified" when the tree had uncommitted changes), from its
// build information; without it (-buildvcs=false), the HEAD of the git
// repository at repo, marked "(HEAD)"; or "unknown".
func BinaryRevision(bin, repo string) string {
	bi, err := buildinfo.ReadFile(bin)
	if err != nil {
		return "unknown"
	}
	rev, modified := "", false
	for _, s := range bi.Settings {
		switch s.Key {
		case "vcs.revision":
			rev = s.Value
		case "vcs.modified":
			modified = s.Value == "true"
		}
	}
	if rev == "" {
		out, err := exec.Command("git", "-C", repo, "rev-parse", "--short=12", "HEAD").Output()
		if err != nil {
			return "unknown"
		}
		return strings.TrimSpace(string(out)) + " (HEAD)"
	}
	if len(rev) > 12 {
		rev = rev[:12]
	}
	if modified {
		rev += "+modified"
	}
	return rev
}
