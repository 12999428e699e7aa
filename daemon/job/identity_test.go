package job

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestIdentifyFileVolume: a file's identity survives reopening by another
// path (a symlink) and changes when the file is replaced at its path; its
// tag is read back.
func TestIdentifyFileVolume(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "vol.img")
	os.WriteFile(p, make([]byte, 4096), 0o600)
	open := func(path string) VolumeID {
		t.Helper()
		f, err := os.OpenFile(path, os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		id, err := IdentifyFD(int(f.Fd()))
		if err != nil {
			t.Fatal(err)
		}
		return id
	}
	a := open(p)
	if !strings.HasPrefix(a.Device, "file ") || a.Block {
		t.Fatalf("identity %+v", a)
	}
	link := filepath.Join(dir, "link")
	os.Symlink(p, link)
	if b := open(link); b.Device != a.Device {
		t.Fatalf("the same file through a symlink: %q vs %q", b.Device, a.Device)
	}
	if a.Taggable {
		f, _ := os.OpenFile(p, os.O_RDWR, 0)
		ok, err := TagFD(int(f.Fd()), "uuid-1")
		f.Close()
		if err != nil || !ok {
			t.Fatalf("tag: %t, %v", ok, err)
		}
		if got := open(link); got.Tag != "uuid-1" {
			t.Fatalf("tag read back %q", got.Tag)
		}
	} else {
		t.Log("the temp dir's file system keeps no user extended attributes: tags not tested")
	}
	// Replaced at the same path: another volume (hold the old one open so
	// that its inode cannot be reused).
	old, _ := os.Open(p)
	defer old.Close()
	tmp := p + ".new"
	os.WriteFile(tmp, make([]byte, 4096), 0o600)
	os.Rename(tmp, p)
	if c := open(p); c.Device == a.Device || c.Tag != "" {
		t.Fatalf("a replaced file keeps the identity: %+v", c)
	}
}

// TestBlockID: the most stable name sysfs has for a block device.
func TestBlockID(t *testing.T) {
	root := t.TempDir()
	dev := func(id string, files map[string]string) {
		d := filepath.Join(root, "devices", id)
		for f, v := range files {
			os.MkdirAll(filepath.Join(d, filepath.Dir(f)), 0o755)
			os.WriteFile(filepath.Join(d, f), []byte(v+"\n"), 0o644)
		}
		os.MkdirAll(filepath.Join(root, "dev", "block"), 0o755)
		os.Symlink(d, filepath.Join(root, "dev", "block", id))
	}
	dev("253:1", map[string]string{"dm/uuid": "LVM-abc"})
	dev("9:0", map[string]string{"md/uuid": "1234:5678"})
	dev("252:16", map[string]string{"serial": "disk-b", "dev": "252:16"})
	dev("7:3", map[string]string{"dev": "7:3"})
	// A partition lives under its disk in sysfs.
	part := filepath.Join(root, "devices", "252:16", "vdb1")
	os.MkdirAll(part, 0o755)
	os.WriteFile(filepath.Join(part, "partition"), []byte("1\n"), 0o644)
	os.Symlink(part, filepath.Join(root, "dev", "block", "252:17"))
	for _, tc := range []struct {
		maj, min uint32
		want     string
	}{
		{253, 1, "dm:LVM-abc"},
		{9, 0, "md:1234:5678"},
		{252, 16, "id:disk-b"},
		{252, 17, "id:disk-b part1"},
		{7, 3, "dev:7:3"},
		{8, 0, "dev:8:0"},
	} {
		if got := blockID(root, tc.maj, tc.min); got != tc.want {
			t.Errorf("%d:%d: %q, want %q", tc.maj, tc.min, got, tc.want)
		}
	}
}
