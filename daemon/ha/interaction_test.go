package ha

import (
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"testing"
)

var rewrite = flag.Bool("rewrite", false, "rewrite testdata/*.txt with the actual output")

// TestInteraction runs the scenario transcripts in testdata. Each block is a
// command, a line "----" and the expected output; -rewrite regenerates the
// outputs. Commands:
//
//	new home=vm1 failover=auto|manual missed=N paths=a,b [grace=N] [arbiter=on]   two nodes vm1, vm2
//	start NODE | crash NODE | restart NODE   (restart: from the last persisted state)
//	net up|down PATH                          heartbeats on PATH flow or not
//	link up|down                              the replication link, stepped on live nodes
//	resync [NODE] | synced [NODE]             mirror/resync started/completed (NODE, else live nodes)
//	tick [N]                                  N ticks; peers hear each other on up paths (path status only)
//	deliver                                   deliver queued messages until quiet
//	deliver-one                               deliver the oldest queued message
//	failover NODE [force] [discard-queue] | reverse NODE | failback NODE | switchover NODE
//	pause NODE | resume NODE | drained NODE | status NODE
//	action-failed NODE ACTION                 an action of NODE failed
//	drop                                      lose every queued message
//	peer-down NODE | peer-up NODE             the failure detector's verdicts on NODE (daemon/monitor's, in production)
//	promotion NODE epoch=N | promotion NODE refused=WORD [final]   the arbiter's answer to a campaign
//	epoch-seen NODE N | lease NODE held|lost  arbiter facts
func TestInteraction(t *testing.T) {
	files, err := filepath.Glob("testdata/*.txt")
	if err != nil || len(files) == 0 {
		t.Fatalf("no transcripts: %v", err)
	}
	for _, f := range files {
		t.Run(strings.TrimSuffix(filepath.Base(f), ".txt"), func(t *testing.T) { runTranscript(t, f) })
	}
}

type block struct {
	pre  []string // comments and blank lines before the command
	cmd  string
	want string
	line int
}

func parseTranscript(t *testing.T, data string) []block {
	var out []block
	lines := strings.Split(data, "\n")
	var pre []string
	for i := 0; i < len(lines); i++ {
		l := lines[i]
		if strings.TrimSpace(l) == "" || strings.HasPrefix(l, "#") {
			pre = append(pre, l)
			continue
		}
		b := block{pre: pre, cmd: l, line: i + 1}
		pre = nil
		i++
		if i >= len(lines) || lines[i] != "----" {
			t.Fatalf("line %d: command %q not followed by ----", b.line, l)
		}
		var want []string
		for i+1 < len(lines) && lines[i+1] != "" {
			i++
			want = append(want, lines[i])
		}
		b.want = strings.Join(want, "\n")
		out = append(out, b)
	}
	return out
}

func runTranscript(t *testing.T, path string) {
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	blocks := parseTranscript(t, string(data))
	h := &harness{t: t}
	var rewritten strings.Builder
	for _, b := range blocks {
		got := h.run(b.cmd)
		if got == "" {
			got = "ok"
		}
		for _, p := range b.pre {
			rewritten.WriteString(p + "\n")
		}
		fmt.Fprintf(&rewritten, "%s\n----\n%s\n", b.cmd, got)
		if !*rewrite && got != b.want {
			t.Errorf("%s:%d: %s\n got:\n%s\nwant:\n%s", path, b.line, b.cmd, got, b.want)
		}
	}
	if *rewrite {
		if err := os.WriteFile(path, []byte(rewritten.String()), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

type simNode struct {
	n         *Node
	alive     bool
	persisted HardState
	state     State
}

type harness struct {
	t       *testing.T
	cfg     Config
	nodes   map[string]*simNode
	names   []string
	pathsUp map[string]bool
	inbox   []Message
	out     []string
}

func (h *harness) printf(format string, a ...any) { h.out = append(h.out, fmt.Sprintf(format, a...)) }

func kv(args []string) map[string]string {
	m := map[string]string{}
	for _, a := range args {
		k, v, _ := strings.Cut(a, "=")
		m[k] = v
	}
	return m
}

func (h *harness) node(name string) *simNode {
	sn, ok := h.nodes[name]
	if !ok {
		h.t.Fatalf("unknown node %q", name)
	}
	return sn
}

func (h *harness) run(cmd string) string {
	h.out = nil
	f := strings.Fields(cmd)
	args := f[1:]
	arg := func(i int) string {
		if i >= len(args) {
			h.t.Fatalf("%q: missing argument %d", cmd, i+1)
		}
		return args[i]
	}
	switch f[0] {
	case "new":
		m := kv(args)
		missed, _ := strconv.Atoi(m["missed"])
		grace, _ := strconv.Atoi(m["grace"])
		h.cfg = Config{Job: "web", Home: m["home"], Failover: FailoverMode(m["failover"]),
			Paths: strings.Split(m["paths"], ","), Missed: missed, StartGrace: grace,
			Arbiter: m["arbiter"] == "on"}
		h.names = []string{"vm1", "vm2"}
		h.nodes = map[string]*simNode{}
		h.pathsUp = map[string]bool{}
		for _, p := range h.cfg.Paths {
			h.pathsUp[p] = true
		}
		for _, name := range h.names {
			cfg := h.config(name)
			hs := Initial(cfg)
			h.nodes[name] = &simNode{persisted: hs}
			h.boot(name)
			h.printf("%s: %s", name, hs)
		}
	case "start":
		h.step(arg(0), Event{Type: EvStart})
	case "crash":
		sn := h.node(arg(0))
		sn.alive = false
		h.printf("%s: crashed (persisted %s)", arg(0), sn.persisted)
	case "restart":
		h.boot(arg(0))
		h.step(arg(0), Event{Type: EvStart})
	case "net":
		h.pathsUp[arg(1)] = arg(0) == "up"
	case "link":
		ev := EvLinkDown
		if arg(0) == "up" {
			ev = EvLinkUp
		}
		h.eachLive(func(name string) { h.step(name, Event{Type: ev}) })
	case "resync", "synced":
		ev := Event{Type: EvResync}
		if f[0] == "synced" {
			ev.Type = EvSynced
		}
		if len(args) > 0 {
			h.step(arg(0), ev)
			break
		}
		h.eachLive(func(name string) { h.step(name, ev) })
	case "tick":
		n := 1
		if len(args) > 0 {
			n, _ = strconv.Atoi(args[0])
		}
		for range n {
			h.eachLive(func(name string) {
				peer := h.peer(name)
				if h.nodes[peer].alive {
					for _, p := range h.cfg.Paths {
						if h.pathsUp[p] {
							h.step(name, Event{Type: EvHeartbeat, Path: p})
						}
					}
				}
				h.nodes[name].n.Tick()
				h.collect(name)
			})
		}
	case "deliver-one":
		if len(h.inbox) > 0 {
			m := h.inbox[0]
			h.inbox = h.inbox[1:]
			h.printf("deliver %s", m)
			h.step(m.To, Event{Type: EvMessage, Msg: &m})
		}
	case "deliver":
		for i := 0; len(h.inbox) > 0 && i < 20; i++ {
			msgs := h.inbox
			h.inbox = nil
			for _, m := range msgs {
				if !h.nodes[m.To].alive || !h.nodes[m.From].alive || !h.anyPathUp() {
					h.printf("dropped %s", m)
					continue
				}
				h.printf("deliver %s", m)
				h.step(m.To, Event{Type: EvMessage, Msg: &m})
			}
		}
	case "failover":
		ev := Event{Type: CmdFailover}
		for _, a := range args[1:] {
			ev.Force = ev.Force || a == "force"
			ev.DiscardQueue = ev.DiscardQueue || a == "discard-queue"
		}
		h.step(arg(0), ev)
	case "reverse", "failback", "switchover", "pause", "resume":
		h.step(arg(0), Event{Type: EventType(f[0])})
	case "peer-down":
		h.step(arg(0), Event{Type: EvPeerDown})
	case "peer-up":
		h.step(arg(0), Event{Type: EvPeerUp, Path: h.cfg.Paths[0]})
	case "promotion":
		m := kv(args[1:])
		ev := Event{Type: EvPromotion, Err: m["refused"], Final: slices.Contains(args, "final")}
		if e, ok := m["epoch"]; ok {
			ev.Epoch, _ = strconv.ParseUint(e, 10, 64)
		}
		h.step(arg(0), ev)
	case "epoch-seen":
		e, _ := strconv.ParseUint(arg(1), 10, 64)
		h.step(arg(0), Event{Type: EvEpochSeen, Epoch: e})
	case "lease":
		h.step(arg(0), Event{Type: EvLease, Held: arg(1) == "held"})
	case "drained":
		h.step(arg(0), Event{Type: EvDrained})
	case "action-failed":
		h.step(arg(0), Event{Type: EvActionFailed, Action: ActionType(arg(1)), Err: "injected"})
	case "drop":
		for _, m := range h.inbox {
			h.printf("dropped %s", m)
		}
		h.inbox = nil
	case "status":
		st := h.node(arg(0)).n.Status()
		h.printf("%s: role=%s state=%s epoch=%d consistent=%t link=%t", st.Self, st.Role, st.State, st.Epoch, st.Consistent, st.LinkUp)
		for _, p := range st.Paths {
			h.printf("  path %s silent=%d up=%t", p.Name, p.SilentTicks, p.Up)
		}
		if st.Reason != "" {
			h.printf("  reason: %s", st.Reason)
		}
		if st.LastError != "" {
			h.printf("  last error: %s", st.LastError)
		}
		h.printf("  persisted: %s", h.node(arg(0)).persisted)
	default:
		h.t.Fatalf("unknown command %q", cmd)
	}
	return strings.Join(h.out, "\n")
}

func (h *harness) config(name string) Config {
	cfg := h.cfg
	cfg.Self, cfg.Peer = name, h.peer(name)
	return cfg
}

func (h *harness) peer(name string) string {
	if name == "vm1" {
		return "vm2"
	}
	return "vm1"
}

func (h *harness) anyPathUp() bool {
	for _, up := range h.pathsUp {
		if up {
			return true
		}
	}
	return false
}

func (h *harness) boot(name string) {
	sn := h.nodes[name]
	n, err := NewNode(h.config(name), sn.persisted)
	if err != nil {
		h.t.Fatal(err)
	}
	sn.n, sn.alive, sn.state = n, true, n.Status().State
	// Messages in flight to a crashed node are lost.
	kept := h.inbox[:0]
	for _, m := range h.inbox {
		if m.To != name {
			kept = append(kept, m)
		}
	}
	h.inbox = kept
}

func (h *harness) eachLive(f func(name string)) {
	names := append([]string(nil), h.names...)
	sort.Strings(names)
	for _, name := range names {
		if h.nodes[name].alive {
			f(name)
		}
	}
}

func (h *harness) step(name string, ev Event) {
	sn := h.node(name)
	if !sn.alive {
		h.printf("%s: down", name)
		return
	}
	if err := sn.n.Step(ev); err != nil {
		h.printf("%s: error: %v", name, err)
	}
	h.collect(name)
}

// collect plays the driver: persist, queue messages, print actions and the
// state change.
func (h *harness) collect(name string) {
	sn := h.nodes[name]
	if sn.n.HasReady() {
		rd := sn.n.Ready()
		if rd.MustPersist {
			sn.persisted = rd.HardState
			h.printf("%s: persist %s", name, rd.HardState)
		}
		for _, m := range rd.Messages {
			h.printf("%s: send %s", name, m)
			h.inbox = append(h.inbox, m)
		}
		for _, a := range rd.Actions {
			h.printf("%s: action %s", name, a)
		}
		for _, m := range rd.AfterActions {
			h.printf("%s: then send %s", name, m)
			h.inbox = append(h.inbox, m)
		}
	}
	if st := sn.n.Status().State; st != sn.state {
		h.printf("%s: state %s -> %s", name, sn.state, st)
		sn.state = st
	}
}
