package agent

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// FuzzHandoverManifest: the manifest decoder never panics, and what it
// accepts names every descriptor once and re-encodes to itself.
func FuzzHandoverManifest(f *testing.F) {
	good := handover{Version: "v1", Files: 4, Control: 0, Jobs: []handedJob{
		{Name: "web", Volume: 1, Size: 1 << 20, Export: &handedExport{Device: "unix:/run/web.sock", Listener: 2, Kernel: -1,
			Conns: []handedConn{{FD: 3, Export: "web", Pending: []byte{1, 2, 3}}}}},
		{Name: "db", Volume: -1},
	}}
	kern := handover{Files: 3, Control: -1, Jobs: []handedJob{{Name: "db", Volume: 0, Export: &handedExport{Device: "/dev/nbd3", Listener: -1, Kernel: 3,
		Conns: []handedConn{{FD: 1, Export: "db"}, {FD: 2, Export: "db"}}}}}}
	kb, _ := json.Marshal(kern)
	f.Add(kb)
	b, _ := json.Marshal(good)
	f.Add(b)
	f.Add([]byte(`{"files":1,"control":0,"jobs":[{"name":"x","volume":0}]}`))
	f.Add([]byte(`{"files":-1}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		h, err := decodeHandover(b)
		if err != nil {
			return
		}
		again, err := json.Marshal(h)
		if err != nil {
			t.Fatal(err)
		}
		h2, err := decodeHandover(again)
		if err != nil {
			t.Fatalf("re-decode: %v", err)
		}
		if a, b := string(again), mustJSON(t, h2); a != b {
			t.Fatalf("round trip:\n%s\n%s", a, b)
		}
	})
}

func mustJSON(t *testing.T, v any) string {
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// TestHandoverManifestRefusals: descriptors out of range or named twice,
// bad job names, exports that are not Unix sockets are refused.
func TestHandoverManifestRefusals(t *testing.T) {
	for _, tc := range []struct{ json, want string }{
		{`{"files":1,"control":1}`, "descriptor 1 of 1"},
		{`{"files":2,"control":0,"jobs":[{"name":"web","volume":0}]}`, "named twice"},
		{`{"files":1,"control":-1,"jobs":[{"name":"Web","volume":0}]}`, "invalid"},
		{`{"files":1,"control":-1,"jobs":[{"name":"web","volume":-1,"export":{"device":"/dev/nbd0","listener":0,"kernel":0}}]}`, "neither unix:PATH nor /dev/nbdN"},
		{`{"files":1,"control":-1,"jobs":[{"name":"web","volume":-1,"export":{"device":"/dev/nbd1","listener":-1,"kernel":0}}]}`, "neither unix:PATH nor /dev/nbdN"},
		{`{"files":1,"control":-1,"jobs":[{"name":"web","volume":-1,"export":{"device":"/dev/sda","listener":-1,"kernel":0}}]}`, "neither unix:PATH nor /dev/nbdN"},
		{`{"files":1,"control":-1,"jobs":[{"name":"web","volume":-1,"export":{"device":"unix:/x","listener":0,"kernel":0}}]}`, "with a kernel device"},
		{`{"files":70000}`, "70000 descriptors"},
	} {
		if _, err := decodeHandover([]byte(tc.json)); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want %q", tc.json, err, tc.want)
		}
	}
}

// TestSendReceiveHandover: a manifest and 450 descriptors (three
// messages' worth) cross a socket pair; the received descriptors are the
// sent files.
func TestSendReceiveHandover(t *testing.T) {
	a, b, err := socketPair()
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	bc, err := fileUnixConn(b)
	if err != nil {
		t.Fatal(err)
	}
	defer bc.Close()
	dir := t.TempDir()
	var files []*os.File
	h := handover{Version: "t", Control: -1}
	for i := range 450 {
		f, err := os.Create(filepath.Join(dir, strconv.Itoa(i)))
		if err != nil {
			t.Fatal(err)
		}
		f.WriteString(strconv.Itoa(i))
		files = append(files, f)
	}
	h.Jobs = []handedJob{{Name: "web", Volume: 449, Size: 3}}
	errc := make(chan error, 1)
	go func() { errc <- sendHandover(a, h, files) }()
	got, recv, err := recvHandover(bc)
	if err != nil {
		t.Fatal(err)
	}
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	if len(recv) != 450 || got.Jobs[0].Volume != 449 {
		t.Fatalf("received %d files, manifest %+v", len(recv), got)
	}
	for i, f := range recv {
		buf := make([]byte, 8)
		n, _ := f.ReadAt(buf, 0)
		if string(buf[:n]) != strconv.Itoa(i) {
			t.Fatalf("descriptor %d reads %q", i, buf[:n])
		}
		f.Close()
		files[i].Close()
	}
}
