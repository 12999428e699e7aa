package monitor_test

import (
	"fmt"
	"time"

	"github.com/doppelha/doppel/daemon/monitor"
)

// The agent feeds the monitor what the probe saw on each path and ticks
// it with the same monotonic clock (heartbeat.Now in production).
func Example() {
	ms := time.Millisecond
	m, _ := monitor.New(monitor.Config{Interval: 250 * ms, Missed: 8}, []string{"repl", "service"}, 0)

	m.Observe("repl", monitor.Sample{LastSeen: 100 * ms, Packets: 1})
	fmt.Println(m.Tick(100*ms), m.TimeToFail(100*ms))

	// Only the service path still hears the peer.
	m.Observe("service", monitor.Sample{LastSeen: 1500 * ms, Packets: 7})
	fmt.Println(m.Tick(2100*ms), m.State(), m.TimeToFail(2100*ms))

	fmt.Println(m.Tick(3500 * ms))
	// Output:
	// unknown -> up (path repl) 2s
	// <nil> up 1.4s
	// up -> down after 2s of silence on every path
}
