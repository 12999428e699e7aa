package agent

import (
	"log/slog"
	"runtime"
	"sync"

	"golang.org/x/sys/unix"
)

// rtPriority is the SCHED_FIFO priority of the heartbeat senders and the
// failure detectors: above every normal task, below the kernel's own
// real-time threads (which use 50 and up).
const rtPriority = 10

var rtWarn sync.Once

// lockRealtime locks the calling goroutine to its OS thread and raises
// that thread to SCHED_FIFO, so a busy host (a resync, a compile) does not
// delay a heartbeat or the detector's verdict. The goroutine must end
// without unlocking: Go then terminates the thread instead of returning a
// real-time thread to its pool. Without the privilege (CAP_SYS_NICE, an
// RLIMIT_RTPRIO of 0, a container) it logs a warning, once, and the thread
// runs at normal priority. It reports whether the priority was raised.
func lockRealtime(log *slog.Logger, what string) bool {
	runtime.LockOSThread()
	attr := unix.SchedAttr{Policy: unix.SCHED_FIFO, Priority: rtPriority, Flags: unix.SCHED_FLAG_RESET_ON_FORK}
	if err := unix.SchedSetAttr(0, &attr, 0); err != nil {
		rtWarn.Do(func() {
			log.Warn("real-time priority not permitted: heartbeats and failure detection run at normal priority (a loaded host may delay them)",
				"thread", what, "err", err)
		})
		return false
	}
	return true
}
