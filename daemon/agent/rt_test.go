package agent

import (
	"log/slog"
	"os"
	"testing"

	"golang.org/x/sys/unix"
)

// TestLockRealtime: as root the locked thread runs SCHED_FIFO; without the
// privilege it says so and the thread keeps its normal policy.
func TestLockRealtime(t *testing.T) {
	done := make(chan struct{})
	var ok bool
	var attr *unix.SchedAttr
	var err error
	go func() {
		defer close(done)
		ok = lockRealtime(slog.New(slog.DiscardHandler), "test")
		attr, err = unix.SchedGetAttr(0, 0)
	}() // exits locked: Go ends the thread
	<-done
	if err != nil {
		t.Fatal(err)
	}
	if os.Geteuid() == 0 && !ok {
		t.Skip("root without CAP_SYS_NICE or RLIMIT_RTPRIO here: real-time priority refused")
	}
	if ok != (attr.Policy == unix.SCHED_FIFO && attr.Priority == rtPriority) {
		t.Fatalf("lockRealtime said %v, thread policy %d priority %d", ok, attr.Policy, attr.Priority)
	}
}
