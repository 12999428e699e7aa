package client

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/doppelha/doppel/daemon/api"
	"github.com/doppelha/doppel/daemon/ha"
)

// DeleteTimeout bounds the delete of a job on one agent.
const DeleteTimeout = 30 * time.Second

// Delete deletes job name on both its sides: the target first (the source
// keeps sending the job's heartbeats until its own delete, so the peer's
// probe, which may judge a sibling job's heartbeats by this job's, never
// hears silence). Unless opts.Force, nothing is deleted anywhere while the
// volume is in use on a side (each agent refuses on its own too).
// deleted is called for each side done; a side that did not answer is an
// error unless it does not know the job.
func (f *Fleet) Delete(ctx context.Context, name string, opts api.DeleteOptions, deleted func(server string, res api.DeleteResult)) error {
	sides, err := f.FindJob(ctx, name)
	if err != nil {
		return err
	}
	slices.SortStableFunc(sides, func(a, b Side) int {
		rank := func(s Side) int {
			if s.Status != nil && s.Status.HA.Role == ha.RoleSource {
				return 1
			}
			return 0
		}
		return rank(a) - rank(b)
	})
	if !opts.Force {
		var users []string
		for _, s := range sides {
			if s.Status != nil {
				for _, u := range s.Status.Data.Users {
					users = append(users, s.Server+": "+u)
				}
			}
		}
		if len(users) > 0 {
			return fmt.Errorf("job %s not deleted (nothing was changed): its volume is in use (%s). Stop the application (unmount) first, or delete with --force: it loses its disk",
				name, strings.Join(users, "; "))
		}
	}
	var errs []error
	for _, s := range sides {
		if s.Status == nil {
			if s.cause != nil && !api.IsKind(s.cause, "not_found") {
				errs = append(errs, fmt.Errorf("%s: %s (delete it there when it is back)", s.Server, s.Err))
			}
			continue
		}
		cl, err := f.Client(s.Server)
		var res api.DeleteResult
		if err == nil {
			dctx, cancel := context.WithTimeout(ctx, DeleteTimeout)
			res, err = cl.DeleteJobWith(dctx, name, opts)
			cancel()
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", s.Server, err))
			continue
		}
		deleted(s.Server, res)
	}
	return errors.Join(errs...)
}
