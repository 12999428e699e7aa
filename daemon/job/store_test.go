package job

import (
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/doppelha/doppel/daemon/ha"
	"github.com/doppelha/doppel/daemon/statefile"
)

// TestStoreJobsDoNotWaitForEachOther: a Put of one job is not held up by
// another job's Put still writing (fsync) its record — 32 jobs failing
// over at once each persist their state before promoting — while two
// Puts of one job still write one after the other, the last one kept.
func TestStoreJobsDoNotWaitForEachOther(t *testing.T) {
	s, err := OpenStore(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	entered, release := make(chan struct{}), make(chan struct{})
	var once sync.Once
	var mu sync.Mutex
	writing := map[string]int{} // concurrent writes per record file
	s.writeFile = func(path string, data []byte, perm os.FileMode) error {
		mu.Lock()
		writing[path]++
		n := writing[path]
		mu.Unlock()
		defer func() {
			mu.Lock()
			writing[path]--
			mu.Unlock()
		}()
		if n > 1 {
			t.Errorf("%d writes of %s at once", n, path)
		}
		if strings.HasSuffix(path, "/a.json") && strings.Contains(string(data), `"epoch": 1`) {
			once.Do(func() { close(entered) })
			<-release // a slow fsync
		}
		return statefile.Write(path, data, perm)
	}
	rec := func(name string, epoch uint64) Record {
		sp := validSpec()
		sp.Name = name
		return Record{Spec: sp, Self: "vm2", HA: ha.HardState{Role: ha.RoleTarget, Epoch: epoch}}
	}
	aDone := make(chan error, 2)
	go func() { aDone <- s.Put(rec("a", 1)) }()
	<-entered
	go func() { aDone <- s.Put(rec("a", 2)) }() // waits for the first

	bDone := make(chan error, 1)
	go func() { bDone <- s.Put(rec("b", 1)) }()
	select {
	case err := <-bDone:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		close(release)
		t.Fatal("job b's Put waited for job a's write")
	}
	select {
	case err := <-aDone:
		t.Fatalf("a's Put returned (%v) while its first write was paused", err)
	default:
	}
	close(release)
	for range 2 {
		if err := <-aDone; err != nil {
			t.Fatal(err)
		}
	}
	got, err := s.Get("a")
	if err != nil || got.HA.Epoch != 2 {
		t.Fatalf("a: epoch %d, %v; want the second Put's 2", got.HA.Epoch, err)
	}
	if len(s.locks) != 0 {
		t.Errorf("%d name locks left", len(s.locks))
	}
}
