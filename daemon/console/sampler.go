package console

import (
	"context"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/doppelha/doppel/daemon/api"
	"github.com/doppelha/doppel/daemon/client"
	"github.com/doppelha/doppel/daemon/protection"
)

// Sample is one point of a job's charts.
type Sample struct {
	// T is the sample's time, Unix milliseconds.
	T int64 `json:"t"`
	// Throughput: bytes per second the target applied since the previous
	// sample (writes, mirror and resync data); -1 unknown.
	Throughput float64 `json:"throughput"`
	// QueueMemory, QueueDisk: the source's replication queue (-1 unknown).
	QueueMemory int64 `json:"queue_memory"`
	QueueDisk   int64 `json:"queue_disk"`
	// RPO in seconds (-1 unknown).
	RPO float64 `json:"rpo"`
	// Dirty: the source's dirty bytes (-1 unknown).
	Dirty int64 `json:"dirty"`
}

// history is a job's samples over the retention window, oldest first.
type history struct {
	samples []Sample
	// The target's applied-bytes counter at the previous sample, for the
	// throughput (it restarts when a side becomes the target).
	prevServer  string
	prevApplied int64
	prevAt      time.Time
	// Sync progress samples for the mirror/resync rate.
	syncServer string
	syncPts    []syncPoint
}

type syncPoint struct {
	at   time.Time
	done int64
}

// rateWindow is how far back the mirror rate looks.
const rateWindow = 10 * time.Second

// lastReport is a side's last answer about a job.
type lastReport struct {
	st *api.JobStatus
	at time.Time
}

// sampler asks every agent for its jobs once per interval (the client
// package's Fleet.List: all servers in parallel, each bounded), keeps each
// job's last reports and history, and publishes the snapshot.
type sampler struct {
	log *slog.Logger
	// config returns the servers' configuration now (nil: none).
	config   func() *client.Config
	interval time.Duration
	// retention of the charts' history.
	retention time.Duration
	timeout   time.Duration

	mu      sync.Mutex
	snap    Snapshot
	snapJS  []byte
	changed chan struct{} // closed and replaced at each new snapshot
	hist    map[string]*history
	last    map[string]map[string]lastReport // job -> server -> last report
	// lastJobs: the jobs each server reported at its last answer, so that
	// a job whose agents all went silent stays listed.
	lastJobs map[string][]string
	infos    map[string]infoAt
	seen     map[string]time.Time
	// lastStart: when the last published round started.
	lastStart time.Time
}

type infoAt struct {
	info api.Info
	at   time.Time
}

// infoEvery is how often an agent's description is asked again.
const infoEvery = 30 * time.Second

func newSampler(log *slog.Logger, config func() *client.Config, interval time.Duration) *sampler {
	return &sampler{log: log, config: config, interval: interval, retention: time.Hour, timeout: max(2*time.Second, interval),
		snap: Snapshot{Servers: []ServerView{}, Jobs: []JobView{}}, changed: make(chan struct{}), hist: map[string]*history{}, last: map[string]map[string]lastReport{},
		lastJobs: map[string][]string{}, infos: map[string]infoAt{}, seen: map[string]time.Time{}}
}

// run samples until ctx ends.
func (s *sampler) run(ctx context.Context) {
	t := time.NewTicker(s.interval)
	defer t.Stop()
	for {
		s.round(ctx)
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// round is one round of queries: every server's jobs (Fleet.List) and,
// now and then, its description; then the new snapshot is published.
func (s *sampler) round(ctx context.Context) {
	started := time.Now()
	cfg := s.config()
	var servers []client.Server
	var list client.List
	infos := map[string]api.Info{}
	if cfg != nil && len(cfg.Servers) > 0 {
		servers = append(servers, cfg.Servers...)
		fleet, err := client.New(cfg, client.Options{Timeout: s.timeout})
		if err != nil {
			s.log.Warn("console: servers", "err", err)
			return
		}
		s.mu.Lock()
		var needInfo []client.Server
		for _, srv := range servers {
			ia, ok := s.infos[srv.Name]
			if !ok || started.Sub(ia.at) > infoEvery || ia.info.Fingerprint != srv.Fingerprint {
				needInfo = append(needInfo, srv)
			}
		}
		s.mu.Unlock()
		var mu sync.Mutex
		var wg sync.WaitGroup
		for _, srv := range needInfo {
			wg.Add(1)
			go func() {
				defer wg.Done()
				qctx, cancel := context.WithTimeout(ctx, s.timeout)
				defer cancel()
				cl, err := fleet.Client(srv.Name)
				if err != nil {
					return
				}
				if info, err := cl.Info(qctx); err == nil {
					info.Fingerprint = srv.Fingerprint // the pinned one, to notice a change
					mu.Lock()
					infos[srv.Name] = info
					mu.Unlock()
				}
			}()
		}
		list = fleet.List(ctx)
		wg.Wait()
	}
	if ctx.Err() != nil {
		return
	}
	s.publish(servers, list, infos, started, time.Now())
}

// publish folds a round's answers into the snapshot and the histories. A
// round that started before the last published one is dropped (a round
// woken by an action overtook it).
func (s *sampler) publish(servers []client.Server, list client.List, infos map[string]api.Info, started, now time.Time) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if started.Before(s.lastStart) {
		return
	}
	s.lastStart = started
	snap := Snapshot{Time: now, Servers: []ServerView{}, Jobs: []JobView{}}
	errs := map[string]string{}
	for _, u := range list.Unreachable {
		errs[u.Server] = u.Err
	}
	configured := map[string]bool{}
	views := map[string]*ServerView{}
	for name, info := range infos {
		s.infos[name] = infoAt{info: info, at: now}
	}
	for _, srv := range servers {
		configured[srv.Name] = true
		sv := &ServerView{Name: srv.Name, Addr: srv.Addr, Fingerprint: srv.Fingerprint, Paths: []string{}}
		if ia, ok := s.infos[srv.Name]; ok {
			sv.Hostname, sv.Version, sv.Subsystems = ia.info.Hostname, ia.info.Version, ia.info.Subsystems
		}
		if e, down := errs[srv.Name]; down {
			sv.Error = e
		} else {
			sv.Reachable = true
			s.seen[srv.Name] = now
			s.lastJobs[srv.Name] = nil
		}
		sv.LastSeen = s.seen[srv.Name]
		views[srv.Name] = sv
	}
	// Each job's sides, as the fleet found them; a side it did not find
	// on a server that answered does not have the job.
	sidesOf := map[string][]client.Side{}
	for _, j := range list.Jobs {
		sides := slices.Clone(j.Sides)
		for i := range sides {
			sd := &sides[i]
			switch {
			case sd.Status != nil:
				st := sd.Status
				if s.last[j.Name] == nil {
					s.last[j.Name] = map[string]lastReport{}
				}
				s.last[j.Name][sd.Server] = lastReport{st: st, at: now}
				if sv := views[sd.Server]; sv != nil {
					sv.Jobs++
					s.lastJobs[sd.Server] = append(s.lastJobs[sd.Server], j.Name)
					if sv.Probe == "" {
						sv.Probe = st.Probe.Mode
					}
					if paths := protection.PathStates(st.HA.Paths); len(paths) > 0 {
						sv.Paths = append(sv.Paths, j.Name+": "+strings.Join(paths, ", "))
					}
				}
			case !configured[sd.Server]:
				sd.Err = "not in this console's servers"
			case errs[sd.Server] == "":
				sd.Err = "job not found there"
			}
		}
		sidesOf[j.Name] = sides
	}
	// A job whose agents are all silent stays listed (UNREACHABLE) from
	// their last answers.
	for server, names := range s.lastJobs {
		if !configured[server] {
			delete(s.lastJobs, server)
			continue
		}
		if _, down := errs[server]; !down {
			continue
		}
		for _, jn := range names {
			if _, ok := sidesOf[jn]; ok {
				continue
			}
			var spec *api.JobStatus
			for _, lr := range s.last[jn] {
				spec = lr.st
				break
			}
			if spec == nil {
				continue
			}
			var sides []client.Side
			for _, side := range []string{spec.Spec.Source.Name, spec.Spec.Target.Name} {
				e := errs[side]
				if e == "" {
					e = "job not found there"
				}
				if !configured[side] {
					e = "not in this console's servers"
				}
				sides = append(sides, client.Side{Server: side, Err: e})
			}
			sidesOf[jn] = sides
		}
	}
	reports := map[string][]sideReport{}
	for _, jn := range sortedNames(sidesOf) {
		var reps []sideReport
		for _, sd := range sidesOf[jn] {
			r := sideReport{Side: sd}
			if sd.Status == nil {
				if lr, ok := s.last[jn][sd.Server]; ok {
					r.Last, r.LastAt = lr.st, lr.at
				}
			}
			reps = append(reps, r)
		}
		reports[jn] = reps
		h := s.hist[jn]
		if h == nil {
			h = &history{}
			s.hist[jn] = h
		}
		smp, rate := h.add(reps, now, s.retention)
		jv := buildJobView(jn, reps, rate, smp.Throughput, now)
		jv.Sample = smp
		snap.Jobs = append(snap.Jobs, jv)
	}
	// Forget what no longer exists.
	for jn := range s.hist {
		if _, ok := reports[jn]; !ok {
			delete(s.hist, jn)
			delete(s.last, jn)
		}
	}
	for _, name := range sortedNames(views) {
		snap.Servers = append(snap.Servers, *views[name])
	}
	s.snap = snap
	s.snapJS = nil
	close(s.changed)
	s.changed = make(chan struct{})
}

// add records a sample of the job from this round's reports; it returns
// it and the current mirror/resync rate (bytes/s, 0 unknown).
func (h *history) add(reps []sideReport, now time.Time, retention time.Duration) (Sample, float64) {
	smp := Sample{T: now.UnixMilli(), Throughput: -1, QueueMemory: -1, QueueDisk: -1, RPO: -1, Dirty: -1}
	src, tgt := roles(reps)
	if tgt != nil {
		applied := tgt.Status.Data.AppliedBytes
		if h.prevServer == tgt.Server && applied >= h.prevApplied && now.After(h.prevAt) {
			smp.Throughput = float64(applied-h.prevApplied) / now.Sub(h.prevAt).Seconds()
		}
		h.prevServer, h.prevApplied, h.prevAt = tgt.Server, applied, now
	} else {
		h.prevServer = ""
	}
	rate := 0.0
	if src != nil && src.Status.Data.Known {
		d := src.Status.Data
		smp.QueueMemory, smp.QueueDisk, smp.Dirty = d.QueueMemory, d.QueueDisk, d.DirtyBytes
		if d.RPO >= 0 {
			smp.RPO = d.RPO.Seconds()
		}
		if d.SyncTotal > 0 && d.BytesRemaining > 0 {
			if h.syncServer != src.Server || (len(h.syncPts) > 0 && d.SyncDone < h.syncPts[len(h.syncPts)-1].done) {
				h.syncPts = nil
			}
			h.syncServer = src.Server
			h.syncPts = append(h.syncPts, syncPoint{at: now, done: d.SyncDone})
			for len(h.syncPts) > 2 && now.Sub(h.syncPts[0].at) > rateWindow {
				h.syncPts = h.syncPts[1:]
			}
			if first := h.syncPts[0]; len(h.syncPts) > 1 && now.After(first.at) {
				rate = float64(d.SyncDone-first.done) / now.Sub(first.at).Seconds()
			}
		} else {
			h.syncPts = nil
		}
	}
	h.samples = append(h.samples, smp)
	cut := 0
	for cut < len(h.samples) && now.Sub(time.UnixMilli(h.samples[cut].T)) > retention {
		cut++
	}
	if cut > 0 {
		h.samples = append(h.samples[:0:0], h.samples[cut:]...)
	}
	return smp, rate
}

// snapshot returns the current snapshot's JSON and a channel closed when
// a newer one is published.
func (s *sampler) snapshot() ([]byte, <-chan struct{}) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.snapJS == nil {
		s.snapJS = mustJSON(s.snap)
	}
	return s.snapJS, s.changed
}

// samples returns a job's history (nil: unknown job).
func (s *sampler) samples(job string) []Sample {
	s.mu.Lock()
	defer s.mu.Unlock()
	h := s.hist[job]
	if h == nil {
		return nil
	}
	return append([]Sample(nil), h.samples...)
}

// lastOf returns a side's last report of a job (nil: none).
func (s *sampler) lastOf(job, server string) (*api.JobStatus, time.Time) {
	s.mu.Lock()
	defer s.mu.Unlock()
	lr, ok := s.last[job][server]
	if !ok {
		return nil, time.Time{}
	}
	return lr.st, lr.at
}

// wake asks for a round now (after an action), without waiting for the
// next tick.
func (s *sampler) wake(ctx context.Context) {
	go s.round(ctx)
}
