package vm

import (
	"bufio"
	"bytes"
	"debug/elf"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"sort"
	"strings"
)

// cpioWriter writes a "newc" cpio archive, the format of an initramfs.
type cpioWriter struct {
	w    io.Writer
	ino  uint32
	err  error
	dirs map[string]bool
}

func newCPIO(w io.Writer) *cpioWriter {
	return &cpioWriter{w: w, ino: 1, dirs: map[string]bool{"": true, "/": true}}
}

const (
	sIFDIR = 0o040000
	sIFREG = 0o100000
	sIFLNK = 0o120000
	sIFCHR = 0o020000
)

func (c *cpioWriter) entry(name string, mode uint32, data []byte, rmajor, rminor uint32) {
	if c.err != nil {
		return
	}
	name = strings.TrimPrefix(path.Clean("/"+name), "/")
	if name == "" {
		name = "."
	}
	nlink := uint32(1)
	if mode&sIFDIR == sIFDIR && mode&sIFREG == 0 {
		nlink = 2
	}
	hdr := fmt.Sprintf("070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X",
		c.ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rmajor, rminor, len(name)+1, 0)
	c.ino++
	var b bytes.Buffer
	b.WriteString(hdr)
	b.WriteString(name)
	b.WriteByte(0)
	for b.Len()%4 != 0 {
		b.WriteByte(0)
	}
	b.Write(data)
	for b.Len()%4 != 0 {
		b.WriteByte(0)
	}
	_, c.err = c.w.Write(b.Bytes())
}

// mkdirAll adds dir and its missing parents.
func (c *cpioWriter) mkdirAll(dir string) {
	dir = path.Clean("/" + dir)
	if c.dirs[dir] {
		return
	}
	c.mkdirAll(path.Dir(dir))
	c.dirs[dir] = true
	c.entry(dir, sIFDIR|0o755, nil, 0, 0)
}

func (c *cpioWriter) file(name string, perm uint32, data []byte) {
	c.mkdirAll(path.Dir(name))
	c.entry(name, sIFREG|perm, data, 0, 0)
}

func (c *cpioWriter) symlink(name, target string) {
	c.mkdirAll(path.Dir(name))
	c.entry(name, sIFLNK|0o777, []byte(target), 0, 0)
}

func (c *cpioWriter) chardev(name string, major, minor uint32) {
	c.mkdirAll(path.Dir(name))
	c.entry(name, sIFCHR|0o600, nil, major, minor)
}

// hostFile copies a host file (following symlinks) to name.
func (c *cpioWriter) hostFile(src, name string) {
	if c.err != nil {
		return
	}
	b, err := os.ReadFile(src)
	if err != nil {
		c.err = err
		return
	}
	st, err := os.Stat(src)
	if err != nil {
		c.err = err
		return
	}
	c.file(name, uint32(st.Mode().Perm()), b)
}

func (c *cpioWriter) close() error {
	c.entry("TRAILER!!!", 0, nil, 0, 0)
	return c.err
}

// sharedLibs lists what the dynamic loader needs to run bin: the libraries
// ldd resolves and the loader itself.
func sharedLibs(bin string) ([]string, error) {
	f, err := elf.Open(bin)
	if err != nil {
		return nil, err
	}
	static := true
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			static = false
		}
	}
	f.Close()
	if static {
		return nil, nil
	}
	out, err := exec.Command("ldd", bin).Output()
	if err != nil {
		return nil, fmt.Errorf("ldd %s: %w", bin, err)
	}
	return parseLdd(out)
}

// parseLdd reads ldd's output: "name => /path (addr)" and "/path (addr)".
func parseLdd(out []byte) ([]string, error) {
	var libs []string
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		switch {
		case len(f) >= 3 && f[1] == "=>":
			if f[2] == "not" {
				return nil, fmt.Errorf("ldd: %s not found", f[0])
			}
			if strings.HasPrefix(f[2], "/") {
				libs = append(libs, f[2])
			}
		case len(f) >= 1 && strings.HasPrefix(f[0], "/"):
			libs = append(libs, f[0])
		}
	}
	return libs, sc.Err()
}

// Tool is a host program copied into guests with the shared libraries
// ldd finds for it (and the dynamic loader).
type Tool struct {
	Host    string   // path on the host
	Package string   // Debian package that installs it (for the error when missing)
	Guest   []string // paths in the guest: the first a copy, the others symlinks to it
}

// Bundle is a set of host programs and files that the guests asking for it
// get (GuestConfig.Bundles): an archive built once per set of contents,
// cached, and appended to the base initramfs. Programs come from the host
// (install their package: test/deps.sh does for these bundles), libraries
// are found with ldd, so a dynamically linked program runs in the guest
// as on the host.
type Bundle struct {
	Name  string // names the cached archive
	Tools []Tool
	// Files are written into the guest: guest path -> content.
	Files map[string]string
}

// key is a digest of what the bundle's archive holds, for the cache.
func (b Bundle) key() uint32 {
	return crc(fmt.Appendf(nil, "%v", b))
}

// baseTools are in every guest.
var baseTools = []Tool{
	{Host: "/sbin/mke2fs", Package: "e2fsprogs", Guest: []string{"/sbin/mke2fs", "/sbin/mkfs.ext4"}},
	{Host: "/sbin/e2fsck", Package: "e2fsprogs", Guest: []string{"/sbin/e2fsck", "/sbin/fsck.ext4"}},
}

// FioBundle is fio (its libraries weigh 80 MiB, which every boot copies).
var FioBundle = Bundle{Name: "fio", Tools: []Tool{{Host: "/usr/bin/fio", Package: "fio", Guest: []string{"/usr/bin/fio"}}}}

// LVMBundle is LVM (lvm and its command names, thin_check from
// thin-provisioning-tools) with an lvm.conf for a guest without udev or
// dmeventd: LVM makes the /dev nodes itself and monitors nothing. The
// device-mapper modules (dm_thin_pool and its dependencies) are in every
// guest's image (Kernel.Extra); a test loads them with modprobe.
var LVMBundle = Bundle{
	Name: "lvm",
	Tools: []Tool{
		{Host: "/sbin/lvm", Package: "lvm2", Guest: []string{"/sbin/lvm",
			"/sbin/pvcreate", "/sbin/pvs", "/sbin/pvremove",
			"/sbin/vgcreate", "/sbin/vgs", "/sbin/vgchange", "/sbin/vgremove",
			"/sbin/lvcreate", "/sbin/lvs", "/sbin/lvchange", "/sbin/lvremove", "/sbin/lvextend", "/sbin/lvdisplay"}},
		{Host: "/usr/sbin/pdata_tools", Package: "thin-provisioning-tools", Guest: []string{"/usr/sbin/pdata_tools",
			"/usr/sbin/thin_check", "/usr/sbin/thin_repair", "/usr/sbin/thin_dump", "/usr/sbin/thin_restore"}},
	},
	Files: map[string]string{"/etc/lvm/lvm.conf": `# The VM tier's guests: no udev, no dmeventd, no lvmpolld.
devices {
	obtain_device_list_from_udev = 0
	external_device_info_source = "none"
}
activation {
	udev_sync = 0
	udev_rules = 0
	monitoring = 0
}
global {
	use_lvmpolld = 0
	thin_check_executable = "/usr/sbin/thin_check"
}
backup {
	backup = 0
	archive = 0
}
`},
}

// addTools copies tools and the libraries they load.
func (c *cpioWriter) addTools(tools []Tool) error {
	libs := map[string]bool{}
	for _, t := range tools {
		if _, err := os.Stat(t.Host); err != nil {
			return fmt.Errorf("guest tool (install %s): %w", t.Package, err)
		}
		for i, g := range t.Guest {
			if i == 0 {
				c.hostFile(t.Host, g)
				continue
			}
			target := t.Guest[0]
			if path.Dir(target) == path.Dir(g) {
				target = path.Base(target)
			}
			c.symlink(g, target)
		}
		ls, err := sharedLibs(t.Host)
		if err != nil {
			return err
		}
		for _, l := range ls {
			libs[l] = true
		}
	}
	sorted := make([]string, 0, len(libs))
	for l := range libs {
		sorted = append(sorted, l)
	}
	sort.Strings(sorted)
	for _, l := range sorted {
		c.hostFile(l, l) // at the path the loader will look for
	}
	return nil
}

// buildBundle writes the archive that adds b to a guest.
func buildBundle(w io.Writer, b Bundle) error {
	c := newCPIO(w)
	if err := c.addTools(b.Tools); err != nil {
		return fmt.Errorf("bundle %s: %w", b.Name, err)
	}
	names := make([]string, 0, len(b.Files))
	for n := range b.Files {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		c.file(n, 0o644, []byte(b.Files[n]))
	}
	return c.close()
}

// buildBase writes the part of the initramfs that does not change between
// runs: busybox, e2fsprogs and their libraries, the kernel modules and
// /init. Archives are not compressed: under software emulation the kernel
// takes seconds to gunzip them, far longer than qemu takes to read them.
func buildBase(w io.Writer, k *KernelImage, initScript []byte) error {
	c := newCPIO(w)
	for _, d := range []string{"/bin", "/sbin", "/usr/bin", "/usr/sbin", "/proc", "/sys", "/dev", "/tmp", "/run", "/mnt", "/etc", "/var/lib/doppel"} {
		c.mkdirAll(d)
	}
	c.chardev("/dev/console", 5, 1)
	c.chardev("/dev/null", 1, 3)
	bb, err := exec.LookPath("busybox")
	if err != nil {
		return fmt.Errorf("busybox-static: %w", err)
	}
	if libs, err := sharedLibs(bb); err != nil || len(libs) > 0 {
		return fmt.Errorf("%s is not static (install busybox-static): %v", bb, err)
	}
	c.hostFile(bb, "/bin/busybox")
	c.symlink("/bin/sh", "busybox")
	if err := c.addTools(baseTools); err != nil {
		return err
	}
	if _, err := os.Stat("/etc/mke2fs.conf"); err == nil {
		c.hostFile("/etc/mke2fs.conf", "/etc/mke2fs.conf")
	}
	modRoot := "/lib/modules/" + k.Release
	err = filepath.WalkDir(k.ModDir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		rel, _ := filepath.Rel(k.ModDir, p)
		c.hostFile(p, path.Join(modRoot, filepath.ToSlash(rel)))
		return nil
	})
	if err != nil {
		return err
	}
	c.file("/init", 0o755, initScript)
	return c.close()
}

// buildOverlay writes the small archive appended to the base ones: the
// doppel binary. The kernel unpacks concatenated archives in order.
func buildOverlay(w io.Writer, doppel string) error {
	c := newCPIO(w)
	c.mkdirAll("/bin")
	c.hostFile(doppel, "/bin/doppel")
	return c.close()
}
