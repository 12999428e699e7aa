package main

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"sort"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/doppelha/doppel/daemon/client"
	"github.com/doppelha/doppel/daemon/ha"
	"github.com/doppelha/doppel/daemon/job"
	"github.com/doppelha/doppel/daemon/protection"
	"github.com/urfave/cli/v2"
)

// statusExit is the exit status of doppel job status: the verdict's code,
// without a message (the status printed says it all).
type statusExit int

func (e statusExit) Error() string { return "" }
func (e statusExit) ExitCode() int { return int(e) }

// exitStatus returns nil for 0, else the code as an error for main.
func exitStatus(code int) error {
	if code == 0 {
		return nil
	}
	return statusExit(code)
}

// jobStatusJSON is doppel job status --json: the verdict, then each
// side's status as its agent reported it (or why it did not answer).
type jobStatusJSON struct {
	protection.Verdict
	Sides []client.Side `json:"sides"`
}

func jobStatus(c *cli.Context) error {
	name, err := oneArg(c, "doppel job status NAME [--watch] [--json]")
	if err != nil {
		return err
	}
	f, err := fleet(c)
	if err != nil {
		return err
	}
	w := c.App.Writer
	tty := isTerminal(w)
	var screen watchScreen
	rates := syncRates{}
	code := 0
	for {
		views, err := f.FindJob(c.Context, name)
		var v protection.Verdict
		if err == nil {
			v = client.Assess(views)
		} else {
			v = protection.Verdict{Job: name, Level: protection.Unreachable, Reason: err.Error(), ExitCode: protection.Unreachable.ExitCode()}
		}
		code = v.ExitCode
		switch {
		case c.Bool("json"):
			if err := writeJSONOut(w, jobStatusJSON{Verdict: v, Sides: views}); err != nil {
				return err
			}
		case c.Bool("watch"):
			var b bytes.Buffer
			now := time.Now()
			rates.observe(views, now)
			renderStatus(&b, v, views, rates, now, tty)
			screen.draw(w, b.Bytes(), tty)
		default:
			renderStatus(w, v, views, nil, time.Now(), tty)
		}
		if !c.Bool("watch") {
			return exitStatus(code)
		}
		select {
		case <-c.Context.Done():
			return exitStatus(code)
		case <-time.After(c.Duration("interval")):
		}
	}
}

// watchScreen redraws a frame in place on a terminal: cursor home, each
// line cleared to its end, the rest of the screen cleared (no flicker).
// Elsewhere the frames follow one another, separated by a blank line.
type watchScreen struct{ frames int }

func (s *watchScreen) draw(w io.Writer, frame []byte, tty bool) {
	if !tty {
		if s.frames > 0 {
			io.WriteString(w, "\n")
		}
		w.Write(frame)
		s.frames++
		return
	}
	var b bytes.Buffer
	b.WriteString("\033[H")
	for _, line := range strings.SplitAfter(string(frame), "\n") {
		if line == "" {
			continue
		}
		b.WriteString(strings.TrimSuffix(line, "\n"))
		b.WriteString("\033[K\n")
	}
	b.WriteString("\033[J")
	w.Write(b.Bytes())
	s.frames++
}

// syncRates follows each side's mirror or resync progress between two
// refreshes of --watch, for a rate and an estimate of the time left.
type syncRates map[string]syncRate

type syncRate struct {
	done int64
	at   time.Time
	rate float64 // bytes per second, 0 unknown
}

func (r syncRates) observe(views []client.Side, now time.Time) {
	for _, v := range views {
		if v.Status == nil || v.Status.Data.SyncTotal == 0 {
			delete(r, v.Server)
			continue
		}
		d := v.Status.Data.SyncDone
		prev, ok := r[v.Server]
		cur := syncRate{done: d, at: now}
		if ok && d >= prev.done && now.After(prev.at) {
			inst := float64(d-prev.done) / now.Sub(prev.at).Seconds()
			cur.rate = inst
			if prev.rate > 0 {
				cur.rate = 0.7*prev.rate + 0.3*inst
			}
		}
		r[v.Server] = cur
	}
}

// isTerminal reports whether w is a terminal (colour, in-place redraw).
func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	fi, err := f.Stat()
	return err == nil && fi.Mode()&os.ModeCharDevice != 0
}

// headline colours the verdict like a traffic light on a terminal (unless
// NO_COLOR is set).
func headline(l protection.Level, tty bool) string {
	if !tty || os.Getenv("NO_COLOR") != "" {
		return string(l)
	}
	colour := "31" // red
	switch l {
	case protection.Protected:
		colour = "32"
	case protection.Degraded:
		colour = "33"
	}
	return "\033[1;" + colour + "m" + string(l) + "\033[0m"
}

// renderStatus prints a job in the operator's words: the verdict (one
// headline, its reason, what a failure of the source now would cost, the
// commands that would succeed now), the job in its real direction, then
// each side as its agent sees it, the source first.
func renderStatus(w io.Writer, v protection.Verdict, views []client.Side, rates syncRates, now time.Time, tty bool) {
	var spec job.Spec
	for _, vw := range views {
		if vw.Status != nil {
			spec = vw.Status.Spec
			break
		}
	}
	fmt.Fprintf(w, "%s  %s  %s\n", v.Job, headline(v.Level, tty), v.Reason)
	if r := v.RiskLine(); r != "" {
		fmt.Fprintf(w, "  %s\n", r)
	}
	for _, a := range v.Advice {
		fmt.Fprintf(w, "  next: %s\n", a)
	}
	if spec.Name == "" {
		return
	}
	fmt.Fprintln(w)
	src, tgt := v.Source, v.Target
	direction := "no active source"
	if src != "" {
		direction = fmt.Sprintf("%s:%s -> %s:%s", src, spec.VolumeOn(src), tgt, spec.VolumeOn(tgt))
	}
	fmt.Fprintf(w, "job %s  %s  mode %s  failover %s  home %s  (%s)\n", spec.Name, direction, spec.Mode, spec.Failover, spec.Source.Name, now.Format(time.TimeOnly))
	for _, ip := range spec.ServiceIPs {
		fmt.Fprintf(w, "  service IP %s@%s\n", ip.Prefix, ip.Iface)
	}
	if spec.Arbiter != "" {
		fmt.Fprintf(w, "  arbiter %s, lease TTL %v\n", spec.Arbiter, spec.LeaseTTL)
	}
	ordered := append([]client.Side(nil), views...)
	sort.SliceStable(ordered, func(i, j int) bool { return ordered[i].Server == src && ordered[j].Server != src })
	for _, vw := range ordered {
		renderSide(w, vw, rates)
	}
}

func renderSide(w io.Writer, v client.Side, rates syncRates) {
	if v.Status == nil {
		fmt.Fprintf(w, "\n  %-6s unreachable: %s\n", v.Server, v.Err)
		return
	}
	st := v.Status
	fmt.Fprintf(w, "\n  %-6s %-7s %-14s epoch %d", v.Server, st.HA.Role, st.HA.State, st.HA.Epoch)
	if st.HA.Role == ha.RoleTarget {
		fmt.Fprintf(w, "  target data %s", dataState(st.HA))
	}
	fmt.Fprintln(w)
	if st.Data.Device != "" {
		fmt.Fprintf(w, "         volume served at %s\n", st.Data.Device)
	}
	if st.HA.Reason != "" {
		fmt.Fprintf(w, "         ! %s\n", st.HA.Reason)
	}
	if st.Data.Known {
		if st.Data.SyncTotal > 0 && st.Data.BytesRemaining > 0 {
			line := fmt.Sprintf("%s %s remaining", progressBar(st.Data.SyncDone, st.Data.SyncTotal, 30), protection.BytesHuman(st.Data.BytesRemaining))
			if r := rates[v.Server]; r.rate > 0 {
				left := time.Duration(float64(st.Data.BytesRemaining) / r.rate * float64(time.Second))
				line += fmt.Sprintf(", %s/s, ~%v left", protection.BytesHuman(int64(r.rate)), left.Round(time.Second))
			}
			fmt.Fprintf(w, "         sync     %s\n", line)
		}
		fmt.Fprintf(w, "         queue    memory %s, disk %s", protection.BytesHuman(st.Data.QueueMemory), protection.BytesHuman(st.Data.QueueDisk))
		if st.Data.RPO >= 0 {
			fmt.Fprintf(w, "   RPO %v", st.Data.RPO.Round(time.Millisecond))
		}
		if st.Data.DirtyBytes > 0 {
			fmt.Fprintf(w, "   dirty %s", protection.BytesHuman(st.Data.DirtyBytes))
		}
		if st.Data.ChangedBytes > 0 {
			fmt.Fprintf(w, "   changed unreplicated %s", protection.BytesHuman(st.Data.ChangedBytes))
		}
		fmt.Fprintln(w)
		if st.Data.Note != "" {
			fmt.Fprintf(w, "         engine   %s\n", st.Data.Note)
		}
	} else if st.Data.Note != "" {
		fmt.Fprintf(w, "         data     unknown: %s\n", st.Data.Note)
	}
	fmt.Fprintf(w, "         probe    %s, %v × %d; peer %s; link %s", st.Probe.Mode, st.Probe.Interval, st.Probe.Missed, strings.Join(protection.PathStates(st.HA.Paths), ", "), upDown(st.HA.LinkUp))
	if st.Probe.TimeToFail >= 0 {
		fmt.Fprintf(w, "; source declared failed in %v", st.Probe.TimeToFail)
	}
	fmt.Fprintln(w)
	if a := st.Arbiter; a != nil {
		fmt.Fprintf(w, "         arbiter  %s\n", protection.ArbiterLine(st.HA.Role, a))
	}
	if st.HA.LastError != "" {
		fmt.Fprintf(w, "         last error: %s\n", st.HA.LastError)
	}
}

// jobListJSON is doppel job list --json.
type jobListJSON struct {
	Jobs        []jobStatusJSON `json:"jobs"`
	Unreachable []client.Side   `json:"unreachable,omitempty"`
}

// jobList asks every server (in parallel, each bounded by --timeout) for
// its jobs and prints one line per job: its verdict and real direction.
func jobList(c *cli.Context) error {
	f, err := fleet(c)
	if err != nil {
		return err
	}
	list := f.List(c.Context)
	var out jobListJSON
	out.Unreachable = list.Unreachable
	for _, j := range list.Jobs {
		out.Jobs = append(out.Jobs, jobStatusJSON{Verdict: client.Assess(j.Sides), Sides: j.Sides})
	}
	failed := list.Err(len(f.Servers()))
	if c.Bool("json") {
		return errors.Join(writeJSONOut(c.App.Writer, out), failed)
	}
	tty := isTerminal(c.App.Writer)
	tw := tabwriter.NewWriter(c.App.Writer, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "JOB\tHEADLINE\tDIRECTION\tEPOCH\tMODE\tREASON")
	for _, j := range out.Jobs {
		direction, epoch := "-", "-"
		if j.Source != "" {
			direction = j.Source + " -> " + j.Target
		}
		for _, s := range j.Sides {
			if s.Status != nil && s.Server == j.Source {
				epoch = strconv.FormatUint(s.Status.HA.Epoch, 10)
			}
		}
		mode := j.Sides[0].Status
		if mode == nil {
			mode = j.Sides[1].Status
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", j.Job, headline(j.Level, tty), direction, epoch, mode.Spec.Mode, j.Reason)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	if len(out.Jobs) == 0 && failed == nil {
		fmt.Fprintln(c.App.Writer, "no jobs")
	}
	return failed
}

func dataState(s ha.Status) string {
	if s.Consistent {
		return "consistent"
	}
	return "inconsistent"
}

func upDown(b bool) string {
	if b {
		return "up"
	}
	return "down"
}

// progressBar draws [#####-----] 50.0%.
func progressBar(done, total int64, width int) string {
	if total <= 0 {
		return ""
	}
	done = min(max(done, 0), total)
	n := int(int64(width) * done / total)
	return "[" + strings.Repeat("#", n) + strings.Repeat("-", width-n) + "] " + strconv.FormatFloat(100*float64(done)/float64(total), 'f', 1, 64) + "%"
}
