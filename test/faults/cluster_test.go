package faults

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/doppelha/doppel/test/lab"
)

// The lab's addresses (inside namespaces the test makes).
const (
	appNet   = "10.231.1."
	replNet  = "10.231.2."
	serviceI = appNet + "187"
	jobName  = "web"
)

var hostIP = map[string]string{"vm1": "11", "vm2": "12", "client": "100", "rogue": "66", "e1": "201", "e2": "202", "e3": "203"}

// Timings of the job under test: detection interval × missed, lease TTL,
// suspend timeout.
const (
	interval = 200 * time.Millisecond
	missed   = 5
	detect   = interval * missed
	leaseTTL = 2 * time.Second
	suspend  = 5 * time.Second
	// rtoBudget: writes served on the promoted side within detection +
	// TTL + 1 s of a source failure (docs/safety.md).
	rtoBudget = detect + leaseTTL + time.Second
	// fenceBound: the returning old source fenced within this of the heal.
	fenceBound = 10 * time.Second
)

var (
	buildOnce sync.Once
	binPath   string
	buildErr  error
	binDir    string
)

// doppelBin builds the doppel binary once per test run.
func doppelBin(t *testing.T) string {
	t.Helper()
	buildOnce.Do(func() {
		binDir, buildErr = os.MkdirTemp("", "doppel-faults-bin-")
		if buildErr != nil {
			return
		}
		binPath = filepath.Join(binDir, "doppel")
		out, err := exec.Command("go", "build", "-o", binPath, "github.com/doppelha/doppel/cmd/doppel").CombinedOutput()
		if err != nil {
			buildErr = fmt.Errorf("go build: %w\n%s", err, out)
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return binPath
}

func TestMain(m *testing.M) {
	code := m.Run()
	if binDir != "" {
		os.RemoveAll(binDir)
	}
	os.Exit(code)
}

// cluster is the lab under test: vm1 and vm2 on an application and a
// replication network, a client and a rogue host, three etcd members each
// in its own namespace, the agents, the job.
type cluster struct {
	t     *testing.T
	lab   *lab.Lab
	dir   string
	bin   string
	mode  string
	start time.Time // the history's zero

	hosts  map[string]*lab.Host // vm1 vm2 client rogue e1 e2 e3
	ports  map[string][]string  // host -> its bridge ports (app, repl)
	bridge map[string]string    // port -> bridge
	agents map[string]*lab.Proc
	etcd   map[string]*lab.Proc

	seed     uint64
	cur      *roundState
	captured map[string][]heartbeat // real heartbeats of each agent, for replays
	lastCut  *cutFromArbiter        // the last fault that kept a source from renewing

	mu       sync.Mutex
	rec      *recorder
	journal  []string // the schedule as it ran
	rounds   []*Round
	figures  *figures
	failures []string
}

func newCluster(t *testing.T, mode string) *cluster {
	t.Helper()
	lab.Need(t, "etcd", "etcdctl")
	bin := doppelBin(t)
	l := lab.New(t)
	c := &cluster{t: t, lab: l, dir: t.TempDir(), bin: bin, mode: mode, start: time.Now(),
		hosts: map[string]*lab.Host{}, ports: map[string][]string{}, bridge: map[string]string{},
		agents: map[string]*lab.Proc{}, etcd: map[string]*lab.Proc{}, figures: newFigures(), captured: map[string][]heartbeat{}}
	c.rec = &recorder{start: c.start}
	app, repl := l.Bridge("app"), l.Bridge("repl")
	for _, h := range []string{"vm1", "vm2", "client", "rogue", "e1", "e2", "e3"} {
		c.hosts[h] = l.Host(h)
		p := c.hosts[h].Attach("eth0", app, appNet+hostIP[h]+"/24")
		c.ports[h] = append(c.ports[h], p)
		c.bridge[p] = app
		if h == "vm1" || h == "vm2" || h == "rogue" {
			p := c.hosts[h].Attach("eth1", repl, replNet+hostIP[h]+"/24")
			c.ports[h] = append(c.ports[h], p)
			c.bridge[p] = repl
		}
	}
	t.Cleanup(c.report)
	c.startEtcd()
	for _, h := range []string{"vm1", "vm2"} {
		os.MkdirAll(filepath.Join(c.dir, h), 0o755)
		c.startAgent(h)
	}
	for _, h := range []string{"vm1", "vm2"} {
		c.waitLog(h, "agent ready", 20*time.Second)
	}
	for _, h := range []string{"vm1", "vm2"} {
		fp := regexp.MustCompile(`fingerprint=(sha256:[0-9a-f]+)`).FindSubmatch(c.agentLog(h))
		if fp == nil {
			t.Fatalf("%s: no fingerprint in its log", h)
		}
		c.mustCLI("client", "server", "add", h, appNet+hostIP[h], "--token-file", filepath.Join(c.dir, h, "state", "token"), "--fingerprint", string(fp[1]))
	}
	vol := func(h string) string { return filepath.Join(c.dir, h+".img") }
	for _, h := range []string{"vm1", "vm2"} {
		if err := os.WriteFile(vol(h), nil, 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Truncate(vol(h), volumeSize); err != nil {
			t.Fatal(err)
		}
	}
	c.mustCLI("client", "job", "create", jobName, "--source", "vm1", "--target", "vm2",
		"--volume", vol("vm1"), "--target-volume", vol("vm2"), "--mode", mode,
		"--service-ip", serviceI+"/24@eth0", "--failover", "auto",
		"--monitor", fmt.Sprintf("interval=%v,missed=%d", interval, missed),
		"--arbiter", "etcd", "--lease-ttl", leaseTTL.String(), "--suspend-timeout", suspend.String())
	c.settle("job created", 60*time.Second)
	c.logf("cluster up: mode %s, namespaces *-%s, work dir %s", mode, l.Suffix, c.dir)
	return c
}

func (c *cluster) logf(format string, args ...any) {
	s := fmt.Sprintf("%8.3fs  ", time.Since(c.start).Seconds()) + fmt.Sprintf(format, args...)
	c.mu.Lock()
	c.journal = append(c.journal, s)
	c.mu.Unlock()
	c.t.Log(s)
}

// fail records a failure of the suite (a broken property or a lab that
// did not behave); the test fails at the end with the report saved.
func (c *cluster) fail(format string, args ...any) {
	s := fmt.Sprintf(format, args...)
	c.logf("FAIL: %s", s)
	c.mu.Lock()
	c.failures = append(c.failures, s)
	c.mu.Unlock()
}

func (c *cluster) endpoints() string {
	var eps []string
	for _, e := range []string{"e1", "e2", "e3"} {
		eps = append(eps, "http://"+appNet+hostIP[e]+":2379")
	}
	return strings.Join(eps, ",")
}

func (c *cluster) startEtcd() {
	var members []string
	for _, e := range []string{"e1", "e2", "e3"} {
		members = append(members, e+"=http://"+appNet+hostIP[e]+":2380")
	}
	for _, e := range []string{"e1", "e2", "e3"} {
		c.startMember(e, strings.Join(members, ","), "new")
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		_, err := c.hosts["client"].Run("etcdctl", "--endpoints", c.endpoints(), "--dial-timeout", "1s", "endpoint", "health")
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			c.t.Fatalf("etcd cluster not healthy after 30 s: %v", err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func (c *cluster) startMember(e, members, state string) {
	ip := appNet + hostIP[e]
	p, err := c.hosts[e].Start("etcd-"+e, filepath.Join(c.dir, e+".log"), "etcd", "--name", e,
		"--data-dir", filepath.Join(c.dir, e), "--log-level", "error",
		"--listen-client-urls", "http://"+ip+":2379", "--advertise-client-urls", "http://"+ip+":2379",
		"--listen-peer-urls", "http://"+ip+":2380", "--initial-advertise-peer-urls", "http://"+ip+":2380",
		"--initial-cluster", members, "--initial-cluster-state", state, "--initial-cluster-token", "faults-"+c.lab.Suffix)
	if err != nil {
		c.t.Fatal(err)
	}
	c.etcd[e] = p
}

// restartMember starts a killed member again on its data dir.
func (c *cluster) restartMember(e string) {
	var members []string
	for _, m := range []string{"e1", "e2", "e3"} {
		members = append(members, m+"=http://"+appNet+hostIP[m]+":2380")
	}
	c.startMember(e, strings.Join(members, ","), "existing")
}

func (c *cluster) startAgent(h string) {
	p, err := c.hosts[h].Start("agent-"+h, filepath.Join(c.dir, h, "agent.log"), c.bin, "agent",
		"--state-dir", filepath.Join(c.dir, h, "state"),
		"--control-listen", appNet+hostIP[h]+":6320", "--repl-listen", replNet+hostIP[h]+":6325",
		"--arbiter-endpoints", c.endpoints())
	if err != nil {
		c.t.Fatal(err)
	}
	c.agents[h] = p
}

func (c *cluster) agentLog(h string) []byte {
	b, _ := os.ReadFile(filepath.Join(c.dir, h, "agent.log"))
	return b
}

func (c *cluster) waitLog(h, what string, d time.Duration) {
	c.t.Helper()
	deadline := time.Now().Add(d)
	for !bytes.Contains(c.agentLog(h), []byte(what)) {
		if time.Now().After(deadline) {
			c.t.Fatalf("%s: no %q in its log after %v:\n%s", h, what, d, c.agentLog(h))
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// cli runs the doppel CLI in host h's namespace.
func (c *cluster) cli(h string, args ...string) ([]byte, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", c.hosts[h].NS, c.bin}, args...)...)
	cmd.Env = append(os.Environ(), "DOPPEL_CONFIG="+filepath.Join(c.dir, "cli.json"))
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	if err != nil {
		return out.Bytes(), fmt.Errorf("doppel %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(errb.String()))
	}
	return out.Bytes(), nil
}

func (c *cluster) mustCLI(h string, args ...string) []byte {
	c.t.Helper()
	out, err := c.cli(h, args...)
	if err != nil {
		c.t.Fatalf("%v\n%s", err, out)
	}
	return out
}

// side is what one agent reports of the job (the fields the suite reads).
type side struct {
	Server string `json:"server"`
	Status *struct {
		HA struct {
			Role  string `json:"role"`
			State string `json:"state"`
			Epoch uint64 `json:"epoch"`
		} `json:"ha"`
		Data struct {
			Device string `json:"device"`
		} `json:"data"`
		Arbiter *struct {
			Holding         bool   `json:"holding"`
			TargetOutOfSync bool   `json:"target_out_of_sync"`
			Campaign        string `json:"campaign"`
		} `json:"arbiter"`
	} `json:"status"`
	Error string `json:"error"`
}

type jobStatus struct {
	Headline string `json:"headline"`
	Reason   string `json:"reason"`
	Sides    []side `json:"sides"`
}

// status asks from host from (its own agent, with server set; both
// agents from the client).
func (c *cluster) status(from string, server string) (jobStatus, error) {
	args := []string{"job", "status", jobName, "--json", "--timeout", "1s"}
	if server != "" {
		args = append(args, "--server", server)
	}
	out, err := c.cli(from, args...)
	var st jobStatus
	if jerr := json.Unmarshal(out, &st); jerr != nil {
		if err == nil {
			err = jerr
		}
		return st, err
	}
	return st, nil
}

// own is host h's view of the job, asked in its own namespace.
func (c *cluster) own(h string) (side, error) {
	st, err := c.status(h, h)
	if err != nil {
		return side{}, err
	}
	for _, s := range st.Sides {
		if s.Server == h && s.Status != nil {
			return s, nil
		}
	}
	b, _ := json.Marshal(st)
	return side{}, fmt.Errorf("no status of %s in %s", h, b)
}

// settle waits until the job is PROTECTED: both agents replicating at one
// epoch, the source holding its lease.
func (c *cluster) settle(why string, d time.Duration) (source string) {
	c.t.Helper()
	deadline := time.Now().Add(d)
	var last jobStatus
	for {
		st, err := c.status("client", "")
		if err == nil && st.Headline == "PROTECTED" && len(st.Sides) == 2 {
			for _, s := range st.Sides {
				if s.Status != nil && s.Status.HA.Role == "source" && s.Status.HA.State == "replicating" && s.Status.Arbiter != nil && s.Status.Arbiter.Holding {
					return s.Server
				}
			}
		}
		last = st
		if time.Now().After(deadline) {
			b, _ := json.Marshal(last)
			c.fail("%s: job not PROTECTED (replicating, lease held) after %v: %s", why, d, b)
			return ""
		}
		time.Sleep(250 * time.Millisecond)
	}
}

// epochRecord is the arbiter's epoch key.
type epochRecord struct {
	Epoch  uint64    `json:"epoch"`
	Holder string    `json:"holder"`
	At     time.Time `json:"at"`
	Reason string    `json:"reason"`
}

// epochHistory reads every revision of the job's epoch key from etcd
// (it keeps them: no compaction is configured), oldest first.
func (c *cluster) epochHistory() ([]epochRecord, error) {
	key := "/doppel/jobs/" + jobName + "/epoch"
	var recs []epochRecord
	rev := int64(0)
	for range 10000 {
		args := []string{"etcdctl", "--endpoints", c.endpoints(), "--dial-timeout", "2s", "--command-timeout", "5s", "get", key, "-w", "json"}
		if rev > 0 {
			args = append(args, "--rev", strconv.FormatInt(rev, 10))
		}
		out, err := c.hosts["client"].Output(args...)
		if err != nil {
			return recs, fmt.Errorf("read epoch history: %w", err)
		}
		var r struct {
			Kvs []struct {
				ModRevision int64  `json:"mod_revision"`
				Value       string `json:"value"`
			} `json:"kvs"`
		}
		if err := json.Unmarshal(out, &r); err != nil {
			return recs, fmt.Errorf("read epoch history: %w", err)
		}
		if len(r.Kvs) == 0 {
			break
		}
		v, err := base64.StdEncoding.DecodeString(r.Kvs[0].Value)
		if err != nil {
			return recs, fmt.Errorf("read epoch history: %w", err)
		}
		var e epochRecord
		if err := json.Unmarshal(v, &e); err != nil {
			return recs, fmt.Errorf("read epoch history: %s: %w", v, err)
		}
		recs = append([]epochRecord{e}, recs...)
		rev = r.Kvs[0].ModRevision - 1
		if rev <= 0 {
			break
		}
	}
	return recs, nil
}

// event is one line of doppel job events --json.
type event struct {
	Server string    `json:"server"`
	Time   time.Time `json:"time"`
	Epoch  uint64    `json:"epoch"`
	Kind   string    `json:"kind"`
	Msg    string    `json:"msg"`
}

func (c *cluster) events() ([]event, error) {
	out, err := c.cli("client", "job", "events", jobName, "--json", "--last", "0", "--timeout", "3s")
	var evs []event
	if jerr := json.Unmarshal(out, &evs); jerr != nil {
		return nil, fmt.Errorf("job events: %v (%v)", jerr, err)
	}
	return evs, nil
}

var promotedRE = regexp.MustCompile(`^promoted: the arbiter granted epoch (\d+) to (\S+)`)

// promotions since the offset from: from the arbiter's epoch records
// (granted) and the new holders' events (announced; now when absent).
func (c *cluster) promotions(from time.Duration) ([]Promotion, error) {
	recs, err := c.epochHistory()
	if err != nil {
		return nil, err
	}
	evs, _ := c.events()
	var ps []Promotion
	for _, r := range recs {
		at := r.At.Sub(c.start)
		if r.Epoch <= 1 || at < from {
			continue
		}
		p := Promotion{Epoch: r.Epoch, Holder: r.Holder, Granted: at, Announced: time.Since(c.start)}
		for _, e := range evs {
			if m := promotedRE.FindStringSubmatch(e.Msg); m != nil && m[1] == strconv.FormatUint(r.Epoch, 10) {
				p.Announced = e.Time.Sub(c.start)
			}
		}
		ps = append(ps, p)
	}
	return ps, nil
}

// report saves the history, logs, events and an etcd dump when the test
// failed, and names the directory.
func (c *cluster) report() {
	c.mu.Lock()
	failures := c.failures
	c.mu.Unlock()
	for _, f := range failures {
		c.t.Error(f)
	}
	if !c.t.Failed() {
		return
	}
	dir, err := os.MkdirTemp("/tmp", "doppel-faults-FAIL-")
	if err != nil {
		c.t.Log(err)
		return
	}
	c.mu.Lock()
	b, _ := json.MarshalIndent(struct {
		Mode   string   `json:"mode"`
		Start  string   `json:"start"`
		Rounds []*Round `json:"rounds"`
		Open   []Op     `json:"open_round_ops"`
	}{c.mode, c.start.Format(time.RFC3339Nano), c.rounds, c.rec.snapshot()}, "", " ")
	os.WriteFile(filepath.Join(dir, "history.json"), b, 0o644)
	os.WriteFile(filepath.Join(dir, "schedule.txt"), []byte(strings.Join(c.journal, "\n")+"\n"), 0o644)
	c.mu.Unlock()
	for _, h := range []string{"vm1", "vm2"} {
		os.WriteFile(filepath.Join(dir, h+"-agent.log"), c.agentLog(h), 0o644)
	}
	for _, e := range []string{"e1", "e2", "e3"} {
		if p := c.etcd[e]; p != nil {
			p.Signal(syscall.SIGCONT) // a dump needs them all
		}
		b, _ := os.ReadFile(filepath.Join(c.dir, e+".log"))
		os.WriteFile(filepath.Join(dir, e+".log"), b, 0o644)
	}
	if out, err := c.cli("client", "job", "events", jobName, "--last", "0", "--timeout", "3s"); err == nil {
		os.WriteFile(filepath.Join(dir, "events.txt"), out, 0o644)
	}
	dump, _ := c.hosts["client"].Run("etcdctl", "--endpoints", c.endpoints(), "--dial-timeout", "2s", "get", "--prefix", "/doppel", "-w", "json")
	recs, err := c.epochHistory()
	rb, _ := json.MarshalIndent(recs, "", " ")
	os.WriteFile(filepath.Join(dir, "etcd.json"), append(append(dump, "\nepoch history:\n"...), rb...), 0o644)
	if err != nil {
		os.WriteFile(filepath.Join(dir, "etcd-error.txt"), []byte(err.Error()), 0o644)
	}
	c.t.Errorf("fault suite report (history, schedule, agent logs, events, etcd dump) saved in %s", dir)
}
