// Package faults is doppel's process-level fault suite: two real agents
// (the doppel binary) and a 3-member etcd cluster in network namespaces
// (test/lab), an application writing through the source's export and
// recording every operation, faults injected alone and in seeded random
// schedules, and a checker of the recorded history against the safety
// contract (docs/safety.md): one host acknowledging per epoch, no
// acknowledged sync write lost, an async image that is a causal prefix of
// what was acknowledged. The checker (this file and check.go) is plain
// code with unit tests; the lab and the schedules are in the tests (root).
// How to run each tier: docs/testing.md.
package faults

import (
	"fmt"
	"time"
)

// Result is how a write ended.
type Result string

// Results of a write.
const (
	OK      Result = "ok"      // acknowledged
	EIO     Result = "eio"     // an NBD error reply (held, then failed)
	Timeout Result = "timeout" // no answer within the application's bound
	Lost    Result = "lost"    // the connection broke before the answer
)

// definite reports whether the write's effect, if any, happened before it
// returned: an answer was received. A write without an answer may still
// take effect at any later time.
func (r Result) definite() bool { return r == OK || r == EIO }

// Op is one write of the application: a unique value into a block.
// Times are offsets from the history's start on the monotonic clock.
type Op struct {
	Block  int           `json:"block"`
	Value  uint64        `json:"value"`
	Host   string        `json:"host"` // whose export answered (the one the application was connected to)
	Invoke time.Duration `json:"invoke"`
	Return time.Duration `json:"return"`
	Result Result        `json:"result"`
	Err    string        `json:"err,omitempty"`
}

func (o Op) String() string {
	s := fmt.Sprintf("%s block %d value %d [%v, %v] %s", o.Host, o.Block, o.Value, o.Invoke, o.Return, o.Result)
	if o.Err != "" {
		s += " (" + o.Err + ")"
	}
	return s
}

// end is the latest time the write can have taken effect.
func (o Op) end() time.Duration {
	if o.Result.definite() {
		return o.Return
	}
	return 1<<63 - 1
}

// Promotion is an epoch granted by the arbiter during a round.
type Promotion struct {
	Epoch  uint64 `json:"epoch"`
	Holder string `json:"holder"`
	// Granted is no later than the grant (the epoch record's time, set
	// before the transaction); Announced no earlier (the new holder's
	// "promoted" event, or when the test saw it).
	Granted   time.Duration `json:"granted"`
	Announced time.Duration `json:"announced"`
}

// Round is the history between two checks: the image read at its start,
// every write, the promotions, and the image read at its end from the
// host that ended as source.
type Round struct {
	N           int           `json:"n"`
	Mode        string        `json:"mode"` // sync or async
	StartHolder string        `json:"start_holder"`
	Initial     []uint64      `json:"initial"` // per block
	Ops         []Op          `json:"ops"`
	Promotions  []Promotion   `json:"promotions"`
	FinalHost   string        `json:"final_host"`
	Final       []uint64      `json:"final"`
	End         time.Duration `json:"end"`
}

// Violation is a property the history breaks.
type Violation struct {
	Property string `json:"property"` // a, b, c... as in docs/testing.md
	Detail   string `json:"detail"`
}

func (v Violation) String() string { return "(" + v.Property + ") " + v.Detail }
