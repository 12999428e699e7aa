package agent

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"time"

	"github.com/doppelha/doppel/daemon/ha"
	"github.com/doppelha/doppel/daemon/job"
)

// Scripts runs the hook scripts of a job (--script pre-failover=PATH ...).
//
// A script runs with its job's facts in the environment, on top of the
// agent's own environment:
//
//	DOPPEL_JOB          the job name
//	DOPPEL_EVENT        the hook: pre-failover, post-failover, pre-failback, post-failback
//	DOPPEL_ROLE         this host's role after the step: source or target
//	DOPPEL_HOST         this agent's server name in the job
//	DOPPEL_PEER         the other agent's server name
//	DOPPEL_DEVICE       where the volume is served here (/dev/nbdN or unix:PATH), empty if not
//	DOPPEL_VOLUME       the backing volume path
//	DOPPEL_EPOCH        the generation epoch after the step
//	DOPPEL_SERVICE_IPS  the service addresses, space-separated CIDR@IFACE (mapped for this host)
//
// The working directory is /, stdin is empty, and stdout/stderr go to the
// agent's log. A script that exits non-zero or runs past Timeout is reported
// in the job's status (last error) and log; the step continues: a failover
// must not be held hostage by a hook.
type Scripts struct {
	Log     *slog.Logger
	Timeout time.Duration // default 2 minutes
}

// Env returns the environment variables of a hook run (without the agent's).
func ScriptEnv(spec job.Spec, self string, hook ha.Hook, st ha.Status, device string, ips []string) []string {
	_, peer, _ := spec.Endpoints(self)
	return []string{
		"DOPPEL_JOB=" + spec.Name,
		"DOPPEL_EVENT=" + string(hook),
		"DOPPEL_ROLE=" + string(st.Role),
		"DOPPEL_HOST=" + self,
		"DOPPEL_PEER=" + peer.Name,
		"DOPPEL_DEVICE=" + device,
		"DOPPEL_VOLUME=" + spec.VolumeOn(self),
		"DOPPEL_EPOCH=" + strconv.FormatUint(st.Epoch, 10),
		"DOPPEL_SERVICE_IPS=" + strings.Join(ips, " "),
	}
}

// Run runs path with env added; it returns the combined output and an
// error naming the hook when the script fails.
func (s *Scripts) Run(ctx context.Context, hook ha.Hook, path string, env []string) error {
	timeout := s.Timeout
	if timeout <= 0 {
		timeout = 2 * time.Minute
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, path)
	cmd.Env = append(os.Environ(), env...)
	cmd.Dir = "/"
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	cmd.WaitDelay = 5 * time.Second
	start := time.Now()
	err := cmd.Run()
	log := s.Log.With("hook", hook, "script", path, "took", time.Since(start).Round(time.Millisecond))
	if o := strings.TrimSpace(out.String()); o != "" {
		log = log.With("output", truncate(o, 4096))
	}
	if ctx.Err() == context.DeadlineExceeded {
		log.Error("hook script timed out", "timeout", timeout)
		return fmt.Errorf("%s script %s: timed out after %v", hook, path, timeout)
	}
	if err != nil {
		log.Error("hook script failed", "err", err)
		return fmt.Errorf("%s script %s: %w", hook, path, err)
	}
	log.Info("hook script ran")
	return nil
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "..."
}
