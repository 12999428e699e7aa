package kernel

import (
	"bufio"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
)

// Users says who uses the attached device: mounts of it or of its
// partitions, device-mapper/md holders, and processes (other than this
// one) that hold it open. Empty: detaching it takes nothing away from
// anyone.
func (d *Device) Users() []string { return d.host.users(d.index, os.Getpid()) }

func (h host) users(index int, self int) []string {
	name := "nbd" + strconv.Itoa(index)
	devs := map[string]string{} // major:minor -> /dev/NAME
	add := func(dir, dev string) {
		b, err := os.ReadFile(filepath.Join(dir, "dev"))
		if err == nil {
			devs[strings.TrimSpace(string(b))] = dev
		}
	}
	sys := filepath.Join(h.sysfs, "block", name)
	add(sys, "/dev/"+name)
	ents, _ := os.ReadDir(sys)
	var parts []string
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), name+"p") {
			add(filepath.Join(sys, e.Name()), "/dev/"+e.Name())
			parts = append(parts, e.Name())
		}
	}
	var out []string
	if f, err := os.Open(filepath.Join(h.proc, "self", "mountinfo")); err == nil {
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			fs := strings.Fields(sc.Text())
			if len(fs) > 4 {
				if dev, ok := devs[fs[2]]; ok {
					out = append(out, fmt.Sprintf("%s mounted on %s", dev, fs[4]))
				}
			}
		}
		f.Close()
	}
	for _, p := range append([]string{""}, parts...) {
		dir := filepath.Join(sys, p, "holders")
		hs, _ := os.ReadDir(dir)
		for _, hd := range hs {
			dev := "/dev/" + name
			if p != "" {
				dev = "/dev/" + p
			}
			out = append(out, fmt.Sprintf("%s held by %s", dev, hd.Name()))
		}
	}
	paths := make([]string, 0, len(devs))
	for _, p := range devs {
		paths = append(paths, p)
	}
	procs, _ := os.ReadDir(h.proc)
	for _, pe := range procs {
		pid, err := strconv.Atoi(pe.Name())
		if err != nil || pid == self {
			continue
		}
		fds, _ := os.ReadDir(filepath.Join(h.proc, pe.Name(), "fd"))
		for _, fd := range fds {
			t, err := os.Readlink(filepath.Join(h.proc, pe.Name(), "fd", fd.Name()))
			if err != nil || !slices.Contains(paths, t) {
				continue
			}
			comm, _ := os.ReadFile(filepath.Join(h.proc, pe.Name(), "comm"))
			out = append(out, fmt.Sprintf("%s open by pid %d (%s)", t, pid, strings.TrimSpace(string(comm))))
			break
		}
	}
	return out
}
