package bench

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// Proc is a server process started by a benchmark. It is stopped by its own
// PID only (never by name), and its output goes to a log file that is quoted
// when it fails.
type Proc struct {
	Name string
	Argv []string
	Log  string // path of the combined stdout/stderr log

	cmd  *exec.Cmd
	done chan struct{}
	err  error // Wait's result, valid once done is closed
}

// StartProc starts argv with its output in logPath. The process gets
// SIGKILL if the benchmark process dies (Pdeathsig), so that no server
// outlives an interrupted run.
func StartProc(name string, argv []string, logPath string) (*Proc, error) {
	lf, err := os.Create(logPath)
	if err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	defer lf.Close()
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Stdout, cmd.Stderr = lf, lf
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	p := &Proc{Name: name, Argv: argv, Log: logPath, cmd: cmd, done: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		close(p.done)
	}()
	return p, nil
}

// PID is the process ID.
func (p *Proc) PID() int { return p.cmd.Process.Pid }

// Alive reports whether the process is still running.
func (p *Proc) Alive() bool {
	select {
	case <-p.done:
		return false
	default:
		return true
	}
}

// Exited returns an error describing the process's end, with its log's tail.
func (p *Proc) Exited() error {
	return fmt.Errorf("%s exited (%v): %s", p.Name, p.err, p.LogTail(600))
}

// LogTail returns up to n bytes of the end of the process's log.
func (p *Proc) LogTail(n int) string {
	b, _ := os.ReadFile(p.Log)
	b = bytes.TrimSpace(b)
	if len(b) > n {
		b = b[len(b)-n:]
	}
	return strings.ReplaceAll(string(b), "\n", " | ")
}

// WaitUnix waits until the process accepts connections on the Unix socket
// at path, or fails if it exits or timeout passes.
func (p *Proc) WaitUnix(ctx context.Context, path string, timeout time.Duration) error {
	return p.waitDial(ctx, "unix", path, timeout)
}

func (p *Proc) waitDial(ctx context.Context, network, addr string, timeout time.Duration) error {
	return p.WaitReady(ctx, timeout, func() error {
		c, err := net.DialTimeout(network, addr, time.Second)
		if err == nil {
			c.Close()
		}
		return err
	})
}

// WaitReady polls ready every 50 ms until it returns nil, the process exits,
// ctx ends or timeout passes.
func (p *Proc) WaitReady(ctx context.Context, timeout time.Duration, ready func() error) error {
	deadline := time.Now().Add(timeout)
	var last error
	for {
		if !p.Alive() {
			return p.Exited()
		}
		if last = ready(); last == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s not ready after %v: %v (log: %s)", p.Name, timeout, last, p.LogTail(400))
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-p.done:
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// Stop sends SIGTERM, waits up to grace for the process to exit, then
// kills it. It returns an error when the process had to be killed or had
// already died on its own.
func (p *Proc) Stop(grace time.Duration) error {
	if !p.Alive() {
		return p.Exited()
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
		if p.err != nil && !isSignalExit(p.err, syscall.SIGTERM) {
			return fmt.Errorf("%s stopped with %v: %s", p.Name, p.err, p.LogTail(300))
		}
		return nil
	case <-time.After(grace):
		_ = p.cmd.Process.Kill()
		<-p.done
		return fmt.Errorf("%s ignored SIGTERM for %v; killed", p.Name, grace)
	}
}

func isSignalExit(err error, sig syscall.Signal) bool {
	var ee *exec.ExitError
	if !errors.As(err, &ee) {
		return false
	}
	ws, ok := ee.Sys().(syscall.WaitStatus)
	return ok && ws.Signaled() && ws.Signal() == sig
}

// ProcCPU returns the CPU time (user + system, every thread, living or
// exited) process pid has used, from /proc/PID/stat, or 0.
func ProcCPU(pid int) time.Duration {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	// Fields after the command name (which may hold spaces) in parentheses.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0
	}
	f := strings.Fields(string(b[i+1:]))
	// f[0] is field 3 (state); utime and stime are fields 14 and 15.
	if len(f) < 13 {
		return 0
	}
	ut, err1 := strconv.ParseInt(f[11], 10, 64)
	st, err2 := strconv.ParseInt(f[12], 10, 64)
	if err1 != nil || err2 != nil {
		return 0
	}
	return time.Duration(ut+st) * time.Second / clockTicks
}

// clockTicks is USER_HZ, the unit of /proc/PID/stat times: 100 on every
// Linux architecture Go supports.
const clockTicks = 100

// Kill sends SIGKILL (a crash, not a shutdown) and waits for the process
// to exit.
func (p *Proc) Kill() {
	if p.Alive() {
		_ = p.cmd.Process.Kill()
	}
	<-p.done
}

// ProcMem is what /proc/PID/status and /proc/PID/fd say of a process's
// footprint.
type ProcMem struct {
	RSS     int64 // VmRSS, bytes
	Threads int
	FDs     int   // open file descriptors
	FDLimit int64 // soft RLIMIT_NOFILE
}

// ReadProcMem reads process pid's RSS, threads and open descriptors.
func ReadProcMem(pid int) (ProcMem, error) {
	var m ProcMem
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return m, fmt.Errorf("read process memory: %w", err)
	}
	for l := range strings.Lines(string(b)) {
		k, v, ok := strings.Cut(l, ":")
		if !ok {
			continue
		}
		f := strings.Fields(v)
		if len(f) == 0 {
			continue
		}
		switch k {
		case "VmRSS":
			kb, _ := strconv.ParseInt(f[0], 10, 64)
			m.RSS = kb << 10
		case "Threads":
			m.Threads, _ = strconv.Atoi(f[0])
		}
	}
	fds, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		return m, fmt.Errorf("read process descriptors: %w", err)
	}
	m.FDs = len(fds)
	if b, err := os.ReadFile(fmt.Sprintf("/proc/%d/limits", pid)); err == nil {
		for l := range strings.Lines(string(b)) {
			if rest, ok := strings.CutPrefix(l, "Max open files"); ok {
				if f := strings.Fields(rest); len(f) > 0 {
					m.FDLimit, _ = strconv.ParseInt(f[0], 10, 64)
				}
			}
		}
	}
	return m, nil
}
