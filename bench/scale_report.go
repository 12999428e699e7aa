package bench

import (
	"fmt"
	"slices"
	"strings"
	"syscall"
	"time"
)

func mib(n int64) string { return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20)) }

func durStats(ds []time.Duration) (med, max time.Duration) {
	if len(ds) == 0 {
		return 0, 0
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	return s[len(s)/2], s[len(s)-1]
}

func secs(d time.Duration) string { return fmt.Sprintf("%.2f s", d.Seconds()) }

// Markdown renders the report as the RESULTS.md section.
func (r *ScaleReport) Markdown() string {
	var b strings.Builder
	c := r.Config
	fmt.Fprintf(&b, "%s\n\n", ScaleSection)
	fmt.Fprintf(&b, "Measured %s UTC, %s (load %s at start, %s at the end; FS of the volumes and state: %s), doppel %s.\n",
		r.Start.UTC().Format("2006-01-02 15:04"), r.Machine, r.Machine.Load, r.LoadEnd, r.Machine.FS, r.Machine.Versions["doppel"])
	if r.Note != "" {
		fmt.Fprintf(&b, "**%s**\n", r.Note)
	}
	fmt.Fprintf(&b, "\n`%s` (as root; `make bench-scale`): %d jobs between one agent pair, two network namespaces joined by a veth pair, "+
		"each job a %s sparse file on each side, %s mode, `--failover auto` without an arbiter (the fault is a crash of the source agent, not a partition), "+
		"monitor defaults (250 ms × 8). The writes: a Go NBD client (blockdev/nbdclient) per job on the source's Unix-socket export, "+
		"4 KiB at random offsets, one at a time, %.0f a second per job (%.0f/s in all). Windows: idle %v, loaded %v, each after %v of settling.\n\n",
		r.Command, c.Jobs, humanBytes(c.Size), c.Mode, c.Rate, c.Rate*float64(c.Jobs), c.Idle, c.Load, c.Settle)
	for _, k := range sortedKeys(r.Argv) {
		fmt.Fprintf(&b, "- %s: `%s`\n", k, r.Argv[k])
	}
	fmt.Fprintf(&b, "\nSet-up: %d `doppel job create` one after the other took %s; every job in sync %s after the first. `doppel job list --json` of all %d jobs from both agents: %s (median of 5).\n\n",
		c.Jobs, secs(r.CreateTook), secs(r.InSyncTook), c.Jobs, secs(r.ListTook))

	b.WriteString("### Agents at idle and under the writes\n\n")
	b.WriteString("| window | agent | RSS | Go heap in use | Go heap goal | CPU (% of one core) | threads | goroutines | open fds (limit) |\n|---|---|--:|--:|--:|--:|--:|--:|--:|\n")
	for _, w := range []struct {
		name string
		w    ScaleWindow
	}{{"no job yet", r.Bare}, {"idle", r.Idle}, {"loaded", r.Loaded}, {"loaded, after the outage's resync", r.AfterResync}} {
		if w.w.Source.RSS == 0 {
			continue // not measured (no outage)
		}
		for _, a := range []struct {
			name string
			s    AgentSample
		}{{"source", w.w.Source}, {"target", w.w.Target}} {
			fmt.Fprintf(&b, "| %s | %s | %s | %s | %s | %.1f | %d | %.0f | %d (%d) |\n", w.name, a.name, mib(a.s.RSS), mib(int64(a.s.HeapInuse)), mib(int64(a.s.NextGC)), a.s.CPUPercent, a.s.Threads, a.s.Goroutines, a.s.FDs, a.s.FDLimit)
		}
	}
	fmt.Fprintf(&b, "\nPer job at idle (idle − no job, ÷ %d): source %s RSS, %.1f goroutines, %.1f fds; target %s RSS, %.1f goroutines, %.1f fds.\n",
		c.Jobs, mib((r.Idle.Source.RSS-r.Bare.Source.RSS)/int64(max1(c.Jobs))), (r.Idle.Source.Goroutines-r.Bare.Source.Goroutines)/float64(max1(c.Jobs)),
		float64(r.Idle.Source.FDs-r.Bare.Source.FDs)/float64(max1(c.Jobs)),
		mib((r.Idle.Target.RSS-r.Bare.Target.RSS)/int64(max1(c.Jobs))), (r.Idle.Target.Goroutines-r.Bare.Target.Goroutines)/float64(max1(c.Jobs)),
		float64(r.Idle.Target.FDs-r.Bare.Target.FDs)/float64(max1(c.Jobs)))
	for _, w := range []struct {
		name string
		w    ScaleWindow
	}{{"Under the writes", r.Loaded}, {"After the resync", r.AfterResync}} {
		if w.w.Writes == 0 {
			continue
		}
		fmt.Fprintf(&b, "%s: %d acknowledged in %v (%.0f/s), latency p50 %v, p99 %v, max %v (the writer's, ack included).\n",
			w.name, w.w.Writes, c.Load, w.w.WritesPerSec, w.w.P50.Round(time.Microsecond), w.w.P99.Round(time.Microsecond), w.w.Max.Round(time.Microsecond))
	}
	b.WriteString("\n")

	if c.Outage > 0 {
		b.WriteString("### Resync after a target outage\n\n")
		rmed, rmax := durStats(r.ResyncPerJob)
		how := "killed (SIGKILL, a crash)"
		if c.OutageSignal == syscall.SIGTERM {
			how = "stopped (SIGTERM, a clean stop)"
		}
		fmt.Fprintf(&b, "The target agent %s for %v while the writes went on (%d acknowledged meanwhile, %s; the longest write took %v: "+
			"a sync source holds writes until it gives up on its target), then started again. "+
			"From its start (the heal) until every job was in sync again (both sides replicating, the target consistent, nothing left to copy), "+
			"polled every 250 ms with `doppel job list --json`:\n\n", how, c.Outage, r.OutageWrites, mib(int64(r.OutageWrites)*scaleBlock), r.OutageStall.Round(time.Millisecond))
		b.WriteString("| all jobs in sync | per job, median | per job, max | sources' queues at the heal | sources' dirty bitmaps at the heal | distinct 64 KiB chunks written in the outage | resent (source's mirror_sent) |\n|--:|--:|--:|--:|--:|--:|--:|\n")
		fmt.Fprintf(&b, "| %s | %s | %s | %s | %s | %s | %s |\n\n", secs(r.ResyncAll), secs(rmed), secs(rmax), mib(r.QueuedAtHeal), mib(r.DirtyAtHeal), mib(r.WrittenChunks), mib(r.Resent))
		if c.Verify {
			fmt.Fprintf(&b, "`doppel verify` after the resync: %d of %d jobs equal on both sides.\n\n", r.EqualAfter, c.Jobs)
		}
	}

	b.WriteString("### Failover of every job at once\n\n")
	med, max := durStats(r.RTO)
	pmed, pmax := durStats(r.Reported)
	minRTO := time.Duration(0)
	if len(r.RTO) > 0 {
		minRTO = slices.Min(r.RTO)
	}
	fmt.Fprintf(&b, "The source agent killed (SIGKILL) with the writes running; every job fails over on its own (auto). "+
		"RTO is from the kill to the first 4 KiB write acknowledged on the promoted side's export (a client retrying every 20 ms per job); "+
		"\"reported\" is when `doppel job list --json --server vm2` (polled every 100 ms) first showed the job failed-over.\n\n")
	b.WriteString("| jobs failed over | RTO median | RTO max | RTO min | reported median | reported max | last acknowledged write on the promoted side |\n|--:|--:|--:|--:|--:|--:|--:|\n")
	fmt.Fprintf(&b, "| %d of %d | %s | %s | %s | %s | %s | %d of %d verified |\n\n", len(r.RTO), c.Jobs, secs(med), secs(max), secs(minRTO), secs(pmed), secs(pmax), r.Verified, c.Jobs)
	for _, u := range r.Unverified {
		fmt.Fprintf(&b, "- not verified: %s\n", u)
	}
	for _, f := range r.Failures {
		fmt.Fprintf(&b, "- FAILED: %s\n", f)
	}

	b.WriteString("### State on disk\n\n")
	fmt.Fprintf(&b, "Each agent's state directory with %d jobs of %s (after the idle window: certificate, token, job records, generations, bitmaps, activity logs):\n\n", c.Jobs, humanBytes(c.Size))
	b.WriteString("| agent | apparent | allocated | allocated per job |\n|---|--:|--:|--:|\n")
	for _, h := range []struct{ host, name string }{{"vm1", "source"}, {"vm2", "target"}} {
		fmt.Fprintf(&b, "| %s | %s | %s | %s |\n", h.name, bytesComma(r.StateBytes[h.host]), bytesComma(r.StateAlloc[h.host]), bytesComma(r.StateAlloc[h.host]/int64(max1(c.Jobs))))
	}
	if len(r.JobFiles) > 0 {
		fmt.Fprintf(&b, "\nOne job's files on the source (path, bytes): %s.\n", strings.Join(r.JobFiles, "; "))
	}
	return b.String()
}

func max1(n int) int { return max(n, 1) }

// bytesComma writes n with thousands separators and a unit.
func bytesComma(n int64) string {
	s := fmt.Sprint(n)
	var out []byte
	for i := range s {
		if i > 0 && (len(s)-i)%3 == 0 {
			out = append(out, ',')
		}
		out = append(out, s[i])
	}
	return string(out) + " B"
}
