package client

import (
	"context"
	"fmt"

	"github.com/doppelha/doppel/daemon/api"
)

// Snapshot takes a snapshot of job name on its target (Pick with Target).
// With freeze, the source's file system (or application) is frozen first
// and the snapshot is taken exactly at the point the freeze marked in the
// replication stream (application-consistent); the source is thawed
// whatever became of the snapshot. It returns the target's name.
func (f *Fleet) Snapshot(ctx context.Context, name string, req api.SnapshotRequest, freeze *api.FreezeRequest) (string, api.SnapshotInfo, error) {
	server, cl, err := f.Pick(ctx, name, Target)
	if err != nil {
		return "", api.SnapshotInfo{}, err
	}
	if freeze == nil {
		info, err := cl.CreateSnapshot(ctx, name, req)
		if err != nil {
			return server, info, fmt.Errorf("snapshot on %s: %w", server, err)
		}
		return server, info, nil
	}
	srcName, src, err := f.Pick(ctx, name, ActiveSource)
	if err != nil {
		return server, api.SnapshotInfo{}, err
	}
	fr, err := src.Freeze(ctx, name, *freeze)
	if err != nil {
		return server, api.SnapshotInfo{}, fmt.Errorf("freeze on %s: %w", srcName, err)
	}
	req.AtStream, req.AtSeq = fr.Stream, fr.Seq
	info, cerr := cl.CreateSnapshot(ctx, name, req)
	terr := src.Thaw(context.WithoutCancel(ctx), name)
	if cerr != nil {
		return server, info, fmt.Errorf("snapshot on %s: %w", server, cerr)
	}
	if terr != nil {
		return server, info, fmt.Errorf("snapshot %s taken, but the thaw on %s failed: %w", info.Name, srcName, terr)
	}
	return server, info, nil
}

// EachSide runs fn on every side of job name that answered, in the order
// of its spec. It returns, for each side that did not answer or where fn
// failed, "SERVER: why".
func (f *Fleet) EachSide(ctx context.Context, name string, fn func(server string, cl *api.Client) error) ([]string, error) {
	sides, err := f.FindJob(ctx, name)
	if err != nil {
		return nil, err
	}
	var failed []string
	for _, s := range sides {
		if s.Status == nil {
			failed = append(failed, fmt.Sprintf("%s: %s", s.Server, s.Err))
			continue
		}
		cl, err := f.Client(s.Server)
		if err == nil {
			err = fn(s.Server, cl)
		}
		if err != nil {
			failed = append(failed, fmt.Sprintf("%s: %v", s.Server, err))
		}
	}
	return failed, nil
}
