package agent

import (
	"context"
	"crypto/rand"
	"errors"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/doppelha/doppel/blockdev/nbdclient"
	"github.com/doppelha/doppel/daemon/ha"
	"github.com/doppelha/doppel/daemon/job"
	"golang.org/x/sys/unix"
)

// goSuccessor is a successor agent run in this process: the handover
// (descriptors passed with SCM_RIGHTS over a socket pair) is the same as
// between two processes.
type goSuccessor struct {
	cancel context.CancelFunc
	done   chan error
}

func (g *goSuccessor) Pid() int    { return os.Getpid() }
func (g *goSuccessor) Wait() error { return <-g.done }
func (g *goSuccessor) Kill() error { g.cancel(); return nil }

// successor makes name's agent restart into a new agent of the pair (in
// this process); the new agent replaces it in p.agents once it serves.
// fail makes the successor fail after receiving the state.
func (p *pair) successor(name string, fail bool) func(*os.File) (Successor, error) {
	started := make(chan *testAgent, 1)
	p.next = started
	return func(passed *os.File) (Successor, error) {
		// The restarting agent closes its copy once this returns (a
		// child process has its own): keep one.
		fd, err := unix.FcntlInt(passed.Fd(), unix.F_DUPFD_CLOEXEC, 0)
		if err != nil {
			return nil, err
		}
		sock := os.NewFile(uintptr(fd), "handover")
		ctx, cancel := context.WithCancel(context.Background())
		g := &goSuccessor{cancel: cancel, done: make(chan error, 1)}
		go func() {
			h, err := ReceiveHandover(sock, "successor")
			if err != nil {
				g.done <- err
				return
			}
			if fail {
				h.Close()
				<-ctx.Done() // never acknowledges: killed
				g.done <- errors.New("killed")
				return
			}
			l, err := h.Control()
			if err != nil {
				h.Ack(err)
				g.done <- err
				return
			}
			subs, configure := p.subsystems(name)
			ta := startAgentOn(p.t, p.agents[name].dir, l, subs, func(a *Agent) {
				configure(a)
				a.SetHandover(h)
				a.OnServing = func() { h.Ack(nil) }
			})
			started <- ta
			select {
			case <-ctx.Done():
				ta.stop()
			case err := <-ta.done:
				ta.done <- err
			}
			g.done <- nil
		}()
		return g, nil
	}
}

// writer writes 4 KiB blocks through an NBD client as fast as they are
// acknowledged, into the model, and records the longest wait and the
// first error.
type writer struct {
	p       *pair
	c       *nbdclient.Client
	stop    chan struct{}
	done    chan struct{}
	mu      sync.Mutex
	longest time.Duration
	writes  int
	err     error
}

func (p *pair) startWriter(name string) *writer {
	w := &writer{p: p, c: p.nbd(name), stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(w.done)
		buf := make([]byte, 4096)
		for i := 0; ; i++ {
			select {
			case <-w.stop:
				return
			default:
			}
			rand.Read(buf)
			off := int64(4096 * randN(pairSize/4096))
			start := time.Now()
			_, err := w.c.WriteAt(buf, off)
			d := time.Since(start)
			w.mu.Lock()
			w.longest = max(w.longest, d)
			if err != nil {
				w.err = err
				w.mu.Unlock()
				return
			}
			w.writes++
			w.mu.Unlock()
			p.modelMu.Lock()
			copy(p.model[off:], buf)
			p.modelMu.Unlock()
		}
	}()
	return w
}

func (w *writer) finish() (writes int, longest time.Duration, err error) {
	close(w.stop)
	<-w.done
	w.mu.Lock()
	defer w.mu.Unlock()
	if err := w.c.Flush(); err != nil && w.err == nil {
		w.err = err
	}
	w.c.Close()
	return w.writes, w.longest, w.err
}

// TestRestartKeepsIO: the source agent restarts (into a new agent in this
// process, through the same handover as between processes) while an
// application writes through its export. The application sees no error,
// only a pause; afterwards the job replicates, verify finds no
// difference, and the volume holds every acknowledged write. Then the
// target restarts the same way.
func TestRestartKeepsIO(t *testing.T) {
	p := newPair(t, ha.FailoverManual)
	ctx := context.Background()
	for _, name := range []string{"vm1", "vm2"} {
		p.agents[name].a.Config.Successor = p.successor(name, false)
		w := p.startWriter("vm1")
		time.Sleep(300 * time.Millisecond)
		old := p.agents[name]
		start := time.Now()
		res, err := old.client.RestartAgent(ctx)
		if err != nil {
			t.Fatalf("restart %s: %v", name, err)
		}
		took := time.Since(start)
		select {
		case ta := <-p.next:
			p.agents[name] = ta
		case <-time.After(10 * time.Second):
			t.Fatalf("%s: no successor", name)
		}
		select {
		case <-old.done:
			old.cancel = nil
		case <-time.After(5 * time.Second):
			t.Fatalf("%s: the old agent did not stop after the handover", name)
		}
		time.Sleep(500 * time.Millisecond)
		writes, longest, err := w.finish()
		if err != nil {
			t.Fatalf("restart of %s: the application got an error: %v", name, err)
		}
		t.Logf("restart of %s: %s in %v; %d writes, the longest took %v", name, res.Message, took.Round(time.Millisecond), writes, longest.Round(time.Millisecond))
		p.waitProtected("vm1")
		p.verify("vm1")
		p.check("vm1")
		p.waitFor("the writer gone", func() bool { return len(p.status("vm1").Data.Users) == 0 })
	}
}

// TestRestartSuccessorFails: a successor that takes the state and never
// acknowledges is killed, and the agent takes its jobs back: the
// application's writes go on, without error.
func TestRestartSuccessorFails(t *testing.T) {
	p := newPair(t, ha.FailoverManual)
	ctx := context.Background()
	p.agents["vm1"].a.Config.Successor = p.successor("vm1", true)
	p.agents["vm1"].a.ackTimeout = time.Second
	w := p.startWriter("vm1")
	time.Sleep(200 * time.Millisecond)
	_, err := p.agents["vm1"].client.RestartAgent(ctx)
	if err == nil {
		t.Fatal("a failed restart reported success")
	}
	t.Logf("restart: %v", err)
	time.Sleep(500 * time.Millisecond)
	if _, _, err := w.finish(); err != nil {
		t.Fatalf("the application got an error: %v", err)
	}
	p.waitProtected("vm1")
	p.verify("vm1")
	p.check("vm1")
	if _, err := p.agents["vm1"].client.Job(ctx, "web"); err != nil {
		t.Fatal(err)
	}
}

// TestRestartWithArbiter: a job whose source holds its lease on the etcd
// arbiter (sync mode) restarts under a writer: no write fails, the new
// agent holds the lease again, and the volume holds every acknowledged
// write.
func TestRestartWithArbiter(t *testing.T) {
	ap := newArbPair(t, job.ModeSync, 0)
	p := ap.pair
	p.extra = func(name string, subs *Subsystems) { subs.Arbiter = ap.clis[name] }
	p.agents["vm1"].a.Config.Successor = p.successor("vm1", false)
	w := p.startWriter("vm1")
	time.Sleep(300 * time.Millisecond)
	old := p.agents["vm1"]
	if _, err := old.client.RestartAgent(context.Background()); err != nil {
		t.Fatalf("restart: %v", err)
	}
	select {
	case ta := <-p.next:
		p.agents["vm1"] = ta
	case <-time.After(10 * time.Second):
		t.Fatal("no successor")
	}
	time.Sleep(500 * time.Millisecond)
	writes, longest, err := w.finish()
	if err != nil {
		t.Fatalf("the application got an error across the restart: %v", err)
	}
	t.Logf("%d writes, the longest took %v", writes, longest.Round(time.Millisecond))
	ap.waitHolding("vm1")
	p.waitProtected("vm1")
	p.verify("vm1")
	p.check("vm1")
}
