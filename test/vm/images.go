package vm

import (
	"bytes"
	"debug/elf"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
)

// Kernel is a stock Debian kernel the tier boots, declared as data: the
// newest package whose name matches Package (from the apt archive) is used.
type Kernel struct {
	Name    string         // short name used in test names and the cache
	Package *regexp.Regexp // Debian package name; the first group orders candidates
	// Modules are loaded at boot (with their dependencies); nbd is not among
	// them: doppel loads it itself.
	Modules []string
	// Extra are copied into the image (with their dependencies) but not
	// loaded at boot.
	Extra []string
}

// Kernels is the table of kernels the tier knows. The first is the default.
var Kernels = []Kernel{{
	Name:    "debian12",
	Package: regexp.MustCompile(`^linux-image-6\.1\.0-(\d+)-amd64$`),
	Modules: []string{
		"virtio_pci", "virtio_net", "virtio_rng", "virtio_console", "virtio_blk",
		"ext4", "crc32c_generic", "crc32c_intel",
		// vishvananda/netlink's default handle (netident) opens XFRM and
		// netfilter netlink sockets too; a full Debian system autoloads
		// these by alias, which this initramfs (no modules.alias) cannot.
		"xfrm_user", "nfnetlink",
	},
	// dm_thin_pool (with dm_mod, dm_bufio, dm_bio_prison,
	// dm_persistent_data) and dm_snapshot (lvcreate --snapshot checks
	// for its target even for a thin snapshot): LVM thin snapshots.
	Extra: []string{"nbd", "loop", "dm_thin_pool", "dm_snapshot"},
}}

// KernelImage is an extracted kernel in the cache.
type KernelImage struct {
	Package string
	Release string // uname -r
	Vmlinuz string
	// ModDir holds lib/modules/<release>/ with only the needed modules and
	// their modules.dep.
	ModDir string
	// Load lists the modules /init loads (modprobe resolves dependencies).
	Load []string
}

// resolveKernel picks the newest package matching k.Package known to apt.
func resolveKernel(k Kernel) (string, error) {
	names, err := aptPkgNames("linux-image-")
	if err != nil {
		return "", err
	}
	if best := newest(k.Package, names); best != "" {
		return best, nil
	}
	// Package lists not downloaded yet (a fresh machine): fetch them once.
	if out, err := exec.Command("apt-get", "update", "-qq").CombinedOutput(); err != nil {
		return "", fmt.Errorf("apt-get update: %v: %s", err, out)
	}
	if names, err = aptPkgNames("linux-image-"); err != nil {
		return "", err
	}
	if best := newest(k.Package, names); best != "" {
		return best, nil
	}
	return "", fmt.Errorf("no package matching %s in the apt archive", k.Package)
}

func aptPkgNames(prefix string) ([]string, error) {
	out, err := exec.Command("apt-cache", "pkgnames", prefix).Output()
	if err != nil {
		return nil, fmt.Errorf("apt-cache pkgnames: %w", err)
	}
	return strings.Fields(string(out)), nil
}

// newest returns the name matching re whose first group is the largest number.
func newest(re *regexp.Regexp, names []string) string {
	best, bestN := "", -1
	for _, n := range names {
		m := re.FindStringSubmatch(n)
		if m == nil {
			continue
		}
		v := 0
		if len(m) > 1 {
			v, _ = strconv.Atoi(m[1])
		}
		if v > bestN {
			best, bestN = n, v
		}
	}
	return best
}

// fetchKernel returns the extracted kernel for k, downloading it with
// apt-get download into cache when missing.
func fetchKernel(cache string, k Kernel) (*KernelImage, error) {
	pkg, err := cachedKernel(cache, k)
	if err != nil {
		return nil, err
	}
	if pkg == "" {
		if pkg, err = resolveKernel(k); err != nil {
			return nil, err
		}
	}
	dir := filepath.Join(cache, "kernels", pkg)
	mods := append(slices.Clone(k.Modules), k.Extra...)
	// "ok" lists the modules extracted: a changed table re-extracts.
	if ok, err := os.ReadFile(filepath.Join(dir, "ok")); err != nil || string(ok) != moduleKey(mods) {
		if err := extractKernel(cache, pkg, dir, mods); err != nil {
			return nil, fmt.Errorf("kernel %s: %w", pkg, err)
		}
	}
	rel, err := os.ReadFile(filepath.Join(dir, "release"))
	if err != nil {
		return nil, err
	}
	img := &KernelImage{
		Package: pkg, Release: strings.TrimSpace(string(rel)),
		Vmlinuz: filepath.Join(dir, "vmlinuz"),
		ModDir:  filepath.Join(dir, "modules"),
	}
	img.Load = k.Modules
	return img, nil
}

// cachedKernel returns the newest extracted kernel matching k in the cache
// (so that a cached tier runs without apt), or "".
func cachedKernel(cache string, k Kernel) (string, error) {
	ents, err := os.ReadDir(filepath.Join(cache, "kernels"))
	if errors.Is(err, fs.ErrNotExist) {
		return "", nil
	}
	if err != nil {
		return "", err
	}
	var names []string
	for _, e := range ents {
		if _, err := os.Stat(filepath.Join(cache, "kernels", e.Name(), "ok")); err == nil {
			names = append(names, e.Name())
		}
	}
	return newest(k.Package, names), nil
}

// extractKernel downloads pkg and keeps vmlinuz and the closure of mods.
func extractKernel(cache, pkg, dir string, mods []string) error {
	debs := filepath.Join(cache, "debs")
	if err := os.MkdirAll(debs, 0o755); err != nil {
		return err
	}
	matches, _ := filepath.Glob(filepath.Join(debs, pkg+"_*.deb"))
	if len(matches) == 0 {
		cmd := exec.Command("apt-get", "download", "-q", pkg)
		cmd.Dir = debs
		if out, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("apt-get download %s: %v: %s", pkg, err, out)
		}
		matches, _ = filepath.Glob(filepath.Join(debs, pkg+"_*.deb"))
		if len(matches) == 0 {
			return fmt.Errorf("apt-get download %s left no .deb in %s", pkg, debs)
		}
	}
	tmp, err := os.MkdirTemp(cache, "extract-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)
	sh := fmt.Sprintf("dpkg-deb --fsys-tarfile %q | tar -x -C %q --wildcards './boot/vmlinuz-*' './lib/modules/*'", matches[0], tmp)
	if out, err := exec.Command("sh", "-c", sh).CombinedOutput(); err != nil {
		return fmt.Errorf("extract %s: %v: %s", matches[0], err, out)
	}
	vmlinuz, _ := filepath.Glob(filepath.Join(tmp, "boot", "vmlinuz-*"))
	if len(vmlinuz) != 1 {
		return fmt.Errorf("%s holds %d vmlinuz files", pkg, len(vmlinuz))
	}
	release := strings.TrimPrefix(filepath.Base(vmlinuz[0]), "vmlinuz-")
	modRoot := filepath.Join(tmp, "lib", "modules", release)
	all, err := scanModules(modRoot)
	if err != nil {
		return err
	}
	need, err := closure(all, mods)
	if err != nil {
		return err
	}
	os.RemoveAll(dir)
	out := filepath.Join(dir, "modules")
	var dep bytes.Buffer
	names := make([]string, 0, len(need))
	for n := range need {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		m := all[n]
		if err := copyFile(filepath.Join(modRoot, m.path), filepath.Join(out, m.path), 0o644); err != nil {
			return err
		}
		fmt.Fprintf(&dep, "%s:", m.path)
		for _, d := range depsInOrder(all, n) {
			fmt.Fprintf(&dep, " %s", all[d].path)
		}
		dep.WriteByte('\n')
	}
	if err := os.WriteFile(filepath.Join(out, "modules.dep"), dep.Bytes(), 0o644); err != nil {
		return err
	}
	if err := copyFile(vmlinuz[0], filepath.Join(dir, "vmlinuz"), 0o644); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, "release"), []byte(release+"\n"), 0o644); err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dir, "ok"), []byte(moduleKey(mods)), 0o644)
}

// moduleKey names a set of modules (sorted, one per line).
func moduleKey(mods []string) string {
	s := slices.Clone(mods)
	sort.Strings(s)
	return strings.Join(slices.Compact(s), "\n") + "\n"
}

// module is one .ko: its path under lib/modules/<release>/ and the modules
// it depends on (from its .modinfo section).
type module struct {
	path    string
	depends []string
}

func scanModules(root string) (map[string]module, error) {
	all := map[string]module{}
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() || !strings.HasSuffix(p, ".ko") {
			return err
		}
		name, deps, err := modinfo(p)
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, p)
		all[name] = module{path: rel, depends: deps}
		return nil
	})
	return all, err
}

// modinfo reads a module's name and dependencies from its ELF .modinfo.
func modinfo(path string) (name string, deps []string, err error) {
	f, err := elf.Open(path)
	if err != nil {
		return "", nil, err
	}
	defer f.Close()
	sec := f.Section(".modinfo")
	if sec == nil {
		return "", nil, fmt.Errorf("%s: no .modinfo section", path)
	}
	data, err := sec.Data()
	if err != nil {
		return "", nil, fmt.Errorf("%s: %w", path, err)
	}
	name, deps = parseModinfo(data)
	if name == "" {
		name = strings.ReplaceAll(strings.TrimSuffix(filepath.Base(path), ".ko"), "-", "_")
	}
	return name, deps, nil
}

// parseModinfo splits a .modinfo section (NUL-separated key=value).
func parseModinfo(data []byte) (name string, deps []string) {
	for kv := range bytes.SplitSeq(data, []byte{0}) {
		k, v, ok := bytes.Cut(kv, []byte{'='})
		if !ok {
			continue
		}
		switch string(k) {
		case "name":
			name = string(v)
		case "depends":
			for d := range strings.SplitSeq(string(v), ",") {
				if d != "" {
					// Module names in depends may use '-' ("dm-mod");
					// names are keyed with '_' (name=dm_mod).
					deps = append(deps, strings.ReplaceAll(d, "-", "_"))
				}
			}
		}
	}
	return name, deps
}

// closure returns mods and everything they depend on.
func closure(all map[string]module, mods []string) (map[string]bool, error) {
	need := map[string]bool{}
	var visit func(string) error
	visit = func(n string) error {
		n = strings.ReplaceAll(n, "-", "_")
		if need[n] {
			return nil
		}
		m, ok := all[n]
		if !ok {
			return fmt.Errorf("module %s is not in the kernel package (built in?)", n)
		}
		need[n] = true
		for _, d := range m.depends {
			if err := visit(d); err != nil {
				return err
			}
		}
		return nil
	}
	for _, n := range mods {
		if err := visit(n); err != nil {
			return nil, err
		}
	}
	return need, nil
}

// depsInOrder lists n's transitive dependencies in modules.dep order:
// modprobe loads them from the last to the first, so each module comes
// before everything it needs.
func depsInOrder(all map[string]module, n string) []string {
	var post []string
	seen := map[string]bool{n: true}
	var visit func(string)
	visit = func(m string) {
		if seen[m] {
			return
		}
		seen[m] = true
		for _, d := range all[m].depends {
			visit(d)
		}
		post = append(post, m)
	}
	for _, d := range all[n].depends {
		visit(d)
	}
	slices.Reverse(post)
	return post
}

func copyFile(src, dst string, mode os.FileMode) error {
	b, err := os.ReadFile(src)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
		return err
	}
	return os.WriteFile(dst, b, mode)
}
