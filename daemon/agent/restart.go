package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"sort"
	"strings"
	"time"

	"github.com/doppelha/doppel/daemon/api"
	"github.com/doppelha/doppel/daemon/job"
	"golang.org/x/sys/unix"
)

// Restart timeouts.
const (
	// successorHello bounds the new agent's start, up to its hello.
	successorHello = 30 * time.Second
	// successorAck bounds the new agent's adoption of the handed state.
	successorAck = 60 * time.Second
	// restartFlush bounds the barrier to the target before the handover.
	restartFlush = 5 * time.Second
)

// successorHelloMsg is the new agent's first word: it started (its
// configuration, identity and store opened) and waits for the state.
type successorHelloMsg struct {
	PID     int    `json:"pid"`
	Version string `json:"version"`
}

// successorAckMsg is its last: it serves what was handed over, or why not.
type successorAckMsg struct {
	OK    bool   `json:"ok"`
	Error string `json:"error,omitempty"`
}

// Restart restarts the agent without taking the volumes away from their
// applications: it starts the successor (Config.Successor, the binary now
// installed: an upgrade), waits for it to come up, then stops its jobs
// without stopping what they serve (exports stop at a request boundary,
// requests read are answered, replication state is closed cleanly) and
// hands the volumes, the exports' sockets and connections and the control
// listener to the successor, which resumes them. When the successor does
// not come up, nothing was touched; when it fails after the handover
// began, it is killed and this agent takes its state back. On success
// this agent stops (Serve returns) and Restart returns the successor's
// PID.
func (a *Agent) Restart(ctx context.Context) (int, error) {
	if a.Config.Successor == nil {
		return 0, fmt.Errorf("%w: restart: this agent was not started with a way to start its successor", api.ErrNotWired)
	}
	if !a.restartMu.TryLock() {
		return 0, fmt.Errorf("%w: a restart is in progress", api.ErrRestarting)
	}
	defer a.restartMu.Unlock()
	if err := a.restartable(); err != nil {
		return 0, err
	}
	mine, theirs, err := socketPair()
	if err != nil {
		return 0, fmt.Errorf("restart: %w", err)
	}
	defer mine.Close()
	proc, err := a.Config.Successor(theirs)
	theirs.Close()
	if err != nil {
		return 0, fmt.Errorf("restart: start the new agent: %w", err)
	}
	exited := make(chan error, 1)
	go func() { exited <- proc.Wait() }()
	kill := func() {
		proc.Kill()
		<-exited
	}
	conn := mine
	a.Log.Info("restart: successor started", "pid", proc.Pid())

	var hello successorHelloMsg
	if err := readMsgDeadline(conn, &hello, successorHello, exited); err != nil {
		kill()
		return 0, fmt.Errorf("restart: the new agent (pid %d) did not come up: %w; this agent keeps running, nothing was changed", proc.Pid(), err)
	}
	a.Log.Info("restart: successor ready: handing over", "pid", hello.PID, "version", hello.Version)

	start := time.Now()
	a.restarting.Store(true)
	defer a.restarting.Store(false)
	if a.BeforeHandover != nil {
		a.BeforeHandover()
	}
	st, ferr := a.freeze()
	if ferr == nil {
		ferr = sendHandover(conn, st.h, st.files)
	}
	var ack successorAckMsg
	if ferr == nil {
		wait := successorAck
		if a.ackTimeout > 0 {
			wait = a.ackTimeout
		}
		ferr = readMsgDeadline(conn, &ack, wait, exited)
		if ferr == nil && !ack.OK {
			ferr = errors.New(ack.Error)
		}
	}
	if ferr != nil {
		kill()
		a.Log.Error("restart failed after the handover began: this agent takes its jobs back", "successor", hello.PID, "err", ferr)
		if err := a.takeBack(st); err != nil {
			return 0, fmt.Errorf("restart: the new agent failed (%v) and taking the jobs back failed too: %w", ferr, err)
		}
		return 0, fmt.Errorf("restart: the new agent (pid %d) failed: %w; this agent took its jobs back", hello.PID, ferr)
	}
	st.close() // the successor holds its own duplicates
	a.Log.Info("restart: handed over", "successor", hello.PID, "jobs", len(st.h.Jobs), "took", time.Since(start).Round(time.Millisecond))
	a.handedOver.Store(true)
	a.requestStop()
	return hello.PID, nil
}

// HandedOver reports whether the agent stopped because its successor
// took over (it must then leave the served resources alone).
func (a *Agent) HandedOver() bool { return a.handedOver.Load() }

// restartable refuses a restart that would cut an application off: a
// volume server that cannot hand its exports over.
func (a *Agent) restartable() error {
	if a.Subsystems.Volumes == nil {
		return nil
	}
	if _, ok := a.Subsystems.Volumes.(*NBDVolumes); !ok {
		return fmt.Errorf("restart: the volume server cannot hand its exports over")
	}
	return nil
}

// freeze stops every job without stopping what it serves and returns the
// state to hand over. A job that fails to freeze is still in it as far
// as it got (its volume at least).
func (a *Agent) freeze() (*handedState, error) {
	st := &handedState{h: handover{Version: a.Config.Version, Control: -1}}
	a.mu.Lock()
	runners := a.jobs
	a.jobs = map[string]*runner{}
	l := a.controlL
	a.mu.Unlock()
	names := make([]string, 0, len(runners))
	for n := range runners {
		names = append(names, n)
	}
	sort.Strings(names)
	var errs []error
	for _, n := range names {
		hj, err := runners[n].freeze(st)
		st.h.Jobs = append(st.h.Jobs, hj)
		if err != nil {
			errs = append(errs, fmt.Errorf("job %s: %w", n, err))
		}
	}
	if rl := a.Subsystems.ReplListener; rl != nil {
		rl.Close()
	}
	if tl, ok := l.(*net.TCPListener); ok {
		f, err := tl.File()
		if err != nil {
			errs = append(errs, fmt.Errorf("control listener: %w", err))
		} else {
			st.h.Control = st.add(f)
			// From now on the successor accepts (a request to this agent
			// would find no job: a peer's hello would be lost).
			a.API.StopAccepting()
		}
	}
	return st, errors.Join(errs...)
}

// freeze stops the runner without stopping what it serves: its export is
// handed over (Freeze), its data plane closed cleanly, its volume
// duplicated into st.
func (r *runner) freeze(st *handedState) (handedJob, error) {
	r.cancel()
	<-r.done
	if r.detDone != nil {
		<-r.detDone
	}
	if r.subs.Liveness != nil {
		r.subs.Liveness.Unwatch(r.rec.Spec.Name)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	hj := handedJob{Name: r.rec.Spec.Name, Volume: -1}
	var errs []error
	if nv, ok := r.subs.Volumes.(*NBDVolumes); ok {
		ad, err := nv.Freeze(hj.Name)
		if err != nil {
			errs = append(errs, err)
		}
		if ad == nil {
			ad = nv.Unadopt(hj.Name) // adopted, not served yet: pass it on
		}
		if ad != nil {
			e := &handedExport{Device: ad.device, Listener: -1, Kernel: ad.kernel}
			if ad.listener != nil {
				e.Listener = st.add(ad.listener)
			}
			for _, h := range ad.conns {
				e.Conns = append(e.Conns, handedConn{FD: st.add(h.Conn), Export: h.Export, Pending: h.Pending})
			}
			hj.Export = e
		}
	}
	if r.dp != nil {
		// The exports are stopped: a barrier makes what they wrote
		// durable on the target, so the successor has nothing to resync.
		if f, ok := r.dp.(interface{ Flush(context.Context) error }); ok {
			ctx, cancel := context.WithTimeout(context.Background(), restartFlush)
			if err := f.Flush(ctx); err != nil {
				r.log.Warn("restart: flush before closing replication (the successor resyncs what the target may lack)", "err", err)
			}
			cancel()
		}
	}
	if r.arb != nil {
		// After the exports' last writes: the lease stays on its key,
		// the successor takes it back.
		r.arb.close()
	}
	if r.dp != nil {
		if err := r.dp.Close(); err != nil {
			errs = append(errs, fmt.Errorf("close replication: %w", err))
		}
	}
	if r.claim != nil && r.claim.file != nil {
		f, err := r.claim.file.Dup()
		if err != nil {
			errs = append(errs, err)
		} else {
			hj.Volume, hj.Size = st.add(f), r.claim.file.Size()
		}
		r.claim.close()
	}
	return hj, errors.Join(errs...)
}

// takeBack resumes the jobs from the state this agent had handed over
// (its successor failed).
func (a *Agent) takeBack(st *handedState) error {
	if a.AfterFailedHandover != nil {
		if err := a.AfterFailedHandover(); err != nil {
			a.Log.Error("restart: reopen what the handover closed", "err", err)
		}
	}
	if f := st.take(st.h.Control); f != nil {
		l, err := net.FileListener(f)
		f.Close()
		if err != nil {
			return fmt.Errorf("take the control listener back: %w", err)
		}
		a.API.ResumeAccepting(l)
	}
	if rl := a.Subsystems.ReplListener; rl != nil {
		if err := rl.Listen(); err != nil {
			a.Log.Error("replication listener", "err", err)
		}
	}
	return a.resumeAll(st)
}

// resumeAll starts every stored job, adopting its handed state from st
// when st has it, and closes what st still holds.
func (a *Agent) resumeAll(st *handedState) error {
	defer func() {
		if st != nil {
			st.close()
		}
	}()
	recs, err := a.Store.List()
	if err != nil {
		return err
	}
	for _, rec := range recs {
		var err error
		if hj, ok := st.lookup(rec.Spec.Name); ok {
			err = a.adoptJob(rec, hj, st)
		} else {
			err = a.resumeJob(rec)
		}
		if err != nil {
			a.Log.Error("resume job", "job", rec.Spec.Name, "err", err)
			continue
		}
		a.Log.Info("resumed job", "job", rec.Spec.Name, "role", rec.HA.Role, "epoch", rec.HA.Epoch)
	}
	return nil
}

// lookup is job on a possibly nil state.
func (s *handedState) lookup(name string) (handedJob, bool) {
	if s == nil {
		return handedJob{}, false
	}
	return s.job(name)
}

// adoptJob starts a stored job with the volume and export handed over.
func (a *Agent) adoptJob(rec job.Record, hj handedJob, st *handedState) error {
	legacy := rec.Spec.UUID == ""
	if legacy {
		rec.Spec.UUID = job.IncarnationOf(rec.Spec.Secret)
	}
	var cl *claim
	var err error
	if f := st.take(hj.Volume); f != nil {
		cl, err = a.adoptClaim(&rec, f, hj.Size, legacy)
	} else {
		cl, err = a.openClaim(&rec, legacy)
	}
	if err != nil {
		a.Log.Error("job volume unavailable: the job serves and replicates nothing until it is", "job", rec.Spec.Name, "err", err)
	} else if legacy || cl.rebound {
		if cl.note != "" {
			rec.HA.Consistent = false
		}
		if perr := a.Store.Put(rec); perr != nil {
			cl.close()
			return perr
		}
	}
	if hj.Export != nil {
		ad := st.export(hj.Export)
		if nv, ok := a.Subsystems.Volumes.(*NBDVolumes); ok && err == nil {
			nv.Adopt(rec.Spec.Name, ad)
		} else {
			ad.close()
		}
	}
	return a.startJob(rec, cl, err)
}

// SetHandover gives the agent the state its predecessor handed over
// (ReceiveHandover): Serve adopts it instead of opening the jobs' volumes.
func (a *Agent) SetHandover(h *Handover) { a.handover = h.st }

// Handover is the state a restarting agent received from its predecessor.
type Handover struct {
	st *handedState
	c  *net.UnixConn
}

// Version is the predecessor's version.
func (h *Handover) Version() string { return h.st.h.Version }

// Control returns the control API's listener it handed over (nil: none).
func (h *Handover) Control() (net.Listener, error) {
	f := h.st.take(h.st.h.Control)
	if f == nil {
		return nil, nil
	}
	defer f.Close()
	return net.FileListener(f)
}

// Ack tells the predecessor whether this agent took over (err nil: it
// stops) and closes the channel to it.
func (h *Handover) Ack(err error) error {
	m := successorAckMsg{OK: err == nil}
	if err != nil {
		m.Error = err.Error()
	}
	werr := writeFrame(h.c, m)
	h.c.Close()
	return werr
}

// Close releases what was not adopted.
func (h *Handover) Close() {
	h.st.close()
}

// ReceiveHandover is the successor's side of Restart, on the socket f its
// predecessor passed it: it says it is up (its PID and version) and
// receives the state. The predecessor has stopped its jobs when it
// returns: serve them (SetHandover, Serve) and Ack promptly.
func ReceiveHandover(f *os.File, version string) (*Handover, error) {
	c, err := fileUnixConn(f)
	if err != nil {
		return nil, fmt.Errorf("handover socket: %w", err)
	}
	if err := writeFrame(c, successorHelloMsg{PID: os.Getpid(), Version: version}); err != nil {
		c.Close()
		return nil, fmt.Errorf("handover: say hello: %w", err)
	}
	h, files, err := recvHandover(c)
	if err != nil {
		writeFrame(c, successorAckMsg{Error: err.Error()})
		c.Close()
		return nil, fmt.Errorf("handover: %w", err)
	}
	return &Handover{st: &handedState{h: h, files: files}, c: c}, nil
}

// fileUnixConn makes a Unix socket connection of f (closed).
func fileUnixConn(f *os.File) (*net.UnixConn, error) {
	fc, err := net.FileConn(f)
	f.Close()
	if err != nil {
		return nil, err
	}
	c, ok := fc.(*net.UnixConn)
	if !ok {
		fc.Close()
		return nil, fmt.Errorf("a %T, not a Unix socket", fc)
	}
	return c, nil
}

// readMsgDeadline reads one frame into v within d, or fails early when
// the process behind c exits.
func readMsgDeadline(c *net.UnixConn, v any, d time.Duration, exited <-chan error) error {
	c.SetReadDeadline(time.Now().Add(d))
	defer c.SetReadDeadline(time.Time{})
	type res struct {
		b   []byte
		err error
	}
	got := make(chan res, 1)
	go func() {
		b, err := readFrame(c)
		got <- res{b, err}
	}()
	select {
	case r := <-got:
		if r.err != nil {
			return r.err
		}
		return json.Unmarshal(r.b, v)
	case err := <-exited:
		c.SetReadDeadline(time.Now())
		<-got
		if err == nil {
			err = errors.New("exited")
		}
		return fmt.Errorf("it exited: %w", err)
	}
}

// socketPair returns both ends of a Unix stream socket pair: this side's
// as a connection, the other's as a file to pass to a child.
func socketPair() (*net.UnixConn, *os.File, error) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, nil, fmt.Errorf("socketpair: %w", err)
	}
	f := os.NewFile(uintptr(fds[0]), "handover")
	fc, err := net.FileConn(f)
	f.Close()
	if err != nil {
		unix.Close(fds[1])
		return nil, nil, err
	}
	return fc.(*net.UnixConn), os.NewFile(uintptr(fds[1]), "handover-successor"), nil
}

// Successor is the agent process a restart started.
type Successor interface {
	Pid() int
	// Wait returns when it exited.
	Wait() error
	Kill() error
}

// SuccessorCommand is a Config.Successor that starts path with args and
// env, the handover socket passed as descriptor 3 and named in env by
// DOPPEL_HANDOVER_FD=3, its output to this process's.
func SuccessorCommand(path string, args, env []string) func(*os.File) (Successor, error) {
	return func(sock *os.File) (Successor, error) {
		cmd := exec.Command(path, args...)
		cmd.Env = append(withoutHandoverEnv(env), HandoverEnv+"=3")
		cmd.ExtraFiles = []*os.File{sock}
		cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
		if err := cmd.Start(); err != nil {
			return nil, fmt.Errorf("start %s: %w", path, err)
		}
		return cmdSuccessor{cmd}, nil
	}
}

type cmdSuccessor struct{ cmd *exec.Cmd }

func (c cmdSuccessor) Pid() int    { return c.cmd.Process.Pid }
func (c cmdSuccessor) Wait() error { return c.cmd.Wait() }
func (c cmdSuccessor) Kill() error { return c.cmd.Process.Kill() }

// HandoverEnv names the descriptor of the handover socket in a
// successor's environment.
const HandoverEnv = "DOPPEL_HANDOVER_FD"

func withoutHandoverEnv(env []string) []string {
	out := make([]string, 0, len(env))
	for _, e := range env {
		if !strings.HasPrefix(e, HandoverEnv+"=") {
			out = append(out, e)
		}
	}
	return out
}
