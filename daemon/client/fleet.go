// Package client is what an operator's tool needs to drive doppel agents:
// the list of servers (Config, the file doppel server add writes), a
// Fleet that asks them about a job in parallel, each answer bounded, and
// the operations that span both sides of a job: which side a command goes
// to (the Pick functions), create with pre-flight and rollback, the wait
// for the first replication handshake and for a switchover, job list, the
// merged event history, delete in the safe order. It prints nothing:
// cmd/doppel (flags and printing) and the web console are its callers.
//
// One agent's control API is package api's Client; the judgement of a
// job's two sides (PROTECTED, DEGRADED...) is package protection's.
package client

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/doppelha/doppel/daemon/api"
	"github.com/doppelha/doppel/daemon/job"
	"github.com/doppelha/doppel/daemon/protection"
)

// DefaultTimeout bounds each server's answer to a query: a dead or
// blackholed server costs at most this, once, not per server.
const DefaultTimeout = 2 * time.Second

// Options choose the servers of a Fleet and how it talks to them.
type Options struct {
	// Only restricts the fleet to this server ("": every configured one).
	Only string
	// TokenFile, when set, holds the token presented instead of the
	// stored one (to Only when set, else to every server).
	TokenFile string
	// Timeout bounds each server's answer to a query (0: DefaultTimeout).
	Timeout time.Duration
}

// Fleet is the set of agents one command talks to.
type Fleet struct {
	cfg       *Config
	only      string
	tokenFile string
	timeout   time.Duration
}

// Open loads the configuration at ConfigPath and returns the fleet opts
// describe.
func Open(opts Options) (*Fleet, error) {
	p, err := ConfigPath()
	if err != nil {
		return nil, err
	}
	cfg, err := LoadConfig(p)
	if err != nil {
		return nil, err
	}
	return New(cfg, opts)
}

// New returns the fleet of cfg that opts describe. It fails when cfg has
// no servers or Only names none of them.
func New(cfg *Config, opts Options) (*Fleet, error) {
	f := &Fleet{cfg: cfg, only: opts.Only, tokenFile: opts.TokenFile, timeout: opts.Timeout}
	if f.timeout <= 0 {
		f.timeout = DefaultTimeout
	}
	if f.only != "" {
		if _, err := cfg.Server(f.only); err != nil {
			return nil, err
		}
	}
	if len(cfg.Servers) == 0 {
		return nil, fmt.Errorf("no servers configured (%s): add them with doppel server add NAME HOST --token-file FILE", cfg.Path())
	}
	return f, nil
}

// Only is the one server the fleet is restricted to ("": none).
func (f *Fleet) Only() string { return f.only }

// Timeout bounds each server's answer to a query.
func (f *Fleet) Timeout() time.Duration { return f.timeout }

// Config is the configuration the fleet was made from.
func (f *Fleet) Config() *Config { return f.cfg }

// Client returns a client of the named server's control API.
func (f *Fleet) Client(name string) (*api.Client, error) {
	s, err := f.cfg.Server(name)
	if err != nil {
		return nil, err
	}
	if f.tokenFile != "" && (f.only == "" || f.only == name) {
		if s.Token, err = api.ReadToken(f.tokenFile); err != nil {
			return nil, err
		}
	}
	return s.Client()
}

// Servers are the servers a command consults: Only, or all.
func (f *Fleet) Servers() []string {
	if f.only != "" {
		return []string{f.only}
	}
	return f.all()
}

func (f *Fleet) all() []string {
	names := make([]string, len(f.cfg.Servers))
	for i, s := range f.cfg.Servers {
		names[i] = s.Name
	}
	return names
}

// ask runs fn for each of the servers names in parallel, with its client
// and a context bounded by Timeout, and returns their errors by index.
func (f *Fleet) ask(ctx context.Context, names []string, fn func(ctx context.Context, i int, cl *api.Client) error) []error {
	errs := make([]error, len(names))
	var wg sync.WaitGroup
	for i, s := range names {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx, cancel := context.WithTimeout(ctx, f.timeout)
			defer cancel()
			cl, err := f.Client(s)
			if err == nil {
				err = fn(ctx, i, cl)
			}
			errs[i] = err
		}()
	}
	wg.Wait()
	return errs
}

// Side is one server's answer about a job: its status, or why there is
// none.
type Side struct {
	Server string         `json:"server"`
	Status *api.JobStatus `json:"status,omitempty"`
	Err    string         `json:"error,omitempty"`
	cause  error
}

// Cause is the error behind Err (nil when the side answered, or when
// the side was never asked).
func (s Side) Cause() error { return s.cause }

// Protection turns sides into the input of protection.Assess.
func Protection(sides []Side) []protection.Side {
	out := make([]protection.Side, len(sides))
	for i, s := range sides {
		out[i] = protection.Side{Server: s.Server, Status: s.Status, Err: s.Err}
	}
	return out
}

// Assess is protection.Assess of sides: the job's headline.
func Assess(sides []Side) protection.Verdict { return protection.Assess(Protection(sides)) }

// FindJob asks the fleet's servers about a job, in parallel, each for at
// most Timeout. It returns the job's two sides in the order of its spec
// (a side that did not answer says why). It fails when no server knows
// the job, saying which were unreachable; an invalid name fails with an
// error wrapping job.ErrInvalid.
func (f *Fleet) FindJob(ctx context.Context, name string) ([]Side, error) {
	return f.findJob(ctx, name, f.Servers())
}

func (f *Fleet) findJob(ctx context.Context, name string, names []string) ([]Side, error) {
	if err := job.ValidName("job", name); err != nil {
		return nil, err
	}
	sides := make([]Side, len(names))
	errs := f.ask(ctx, names, func(ctx context.Context, i int, cl *api.Client) error {
		st, err := cl.Job(ctx, name)
		if err == nil {
			sides[i].Status = &st
		}
		return err
	})
	for i, s := range names {
		sides[i].Server = s
		if err := errs[i]; err != nil {
			sides[i].cause, sides[i].Err = err, err.Error()
		}
	}
	var found []Side
	var unreachable []string
	for _, s := range sides {
		switch {
		case s.Status != nil:
			found = append(found, s)
		case !api.IsKind(s.cause, "not_found"):
			unreachable = append(unreachable, fmt.Sprintf("%s (%v)", s.Server, s.cause))
		}
	}
	if len(found) == 0 {
		if len(unreachable) > 0 {
			return nil, fmt.Errorf("job %q not found on any reachable server; unreachable: %s", name, strings.Join(unreachable, "; "))
		}
		return nil, fmt.Errorf("job %q not found on %s", name, strings.Join(names, ", "))
	}
	// Both sides of the job, even those not found, for the status view.
	var notFound []Side
	for _, s := range sides {
		if s.Status == nil {
			if s.Err == "" || api.IsKind(s.cause, "not_found") {
				s.Err = "job not found there"
			}
			notFound = append(notFound, s)
		}
	}
	return jobSides(found[0].Status.Spec, found, notFound, f.only), nil
}

// jobSides are the two sides of a job with spec, from the answers found
// (and the servers that did not answer), in spec order.
func jobSides(spec job.Spec, found, unreachable []Side, only string) []Side {
	var out []Side
	for _, side := range []string{spec.Source.Name, spec.Target.Name} {
		s := Side{Server: side, Err: "not in this CLI's servers"}
		if only != "" {
			s.Err = "not asked (--server " + only + ")"
		}
		for _, u := range unreachable {
			if u.Server == side {
				s = u
			}
		}
		for _, f := range found {
			if f.Server == side {
				s = f
			}
		}
		out = append(out, s)
	}
	return out
}

// Job is one job of a listing: its two sides.
type Job struct {
	Name  string
	Sides []Side
}

// List is what the fleet's servers know: every job (by name) with its
// two sides, and the servers that did not answer.
type List struct {
	Jobs        []Job
	Unreachable []Side
}

// Err reports the servers that did not answer (nil: all did).
func (l List) Err(asked int) error {
	if len(l.Unreachable) == 0 {
		return nil
	}
	var parts []string
	for _, u := range l.Unreachable {
		parts = append(parts, u.Server+": "+u.Err)
	}
	return fmt.Errorf("%d of %d servers did not answer: %s", len(l.Unreachable), asked, strings.Join(parts, "; "))
}

// List asks every server of the fleet (in parallel, each for at most
// Timeout) for its jobs and groups the answers by job, in name order.
func (f *Fleet) List(ctx context.Context) List {
	names := f.Servers()
	answers := make([][]api.JobStatus, len(names))
	errs := f.ask(ctx, names, func(ctx context.Context, i int, cl *api.Client) (err error) {
		answers[i], err = cl.Jobs(ctx)
		return err
	})
	var out List
	byJob := map[string][]Side{}
	var jobNames []string
	for i, s := range names {
		if errs[i] != nil {
			out.Unreachable = append(out.Unreachable, Side{Server: s, Err: errs[i].Error(), cause: errs[i]})
			continue
		}
		for _, st := range answers[i] {
			if _, ok := byJob[st.Spec.Name]; !ok {
				jobNames = append(jobNames, st.Spec.Name)
			}
			byJob[st.Spec.Name] = append(byJob[st.Spec.Name], Side{Server: s, Status: &st})
		}
	}
	slices.Sort(jobNames)
	for _, name := range jobNames {
		found := byJob[name]
		out.Jobs = append(out.Jobs, Job{Name: name, Sides: jobSides(found[0].Status.Spec, found, out.Unreachable, f.only)})
	}
	return out
}
