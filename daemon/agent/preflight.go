package agent

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"
	"unsafe"

	"github.com/doppelha/doppel/daemon/api"
	"github.com/doppelha/doppel/daemon/ha"
	"github.com/doppelha/doppel/daemon/job"
	"golang.org/x/sys/unix"
)

// peerCheckTimeout bounds each reachability check of the pre-flight.
const peerCheckTimeout = 3 * time.Second

// Preflight implements api.Agent: every check a create of spec would
// make on this agent, plus the reachability of the peer's control and
// replication addresses from here, without changing anything.
func (a *Agent) Preflight(ctx context.Context, spec job.Spec) api.Preflight {
	return a.preflight(ctx, spec, true)
}

// errPreflight joins a pre-flight's problems into the error of a create.
func errPreflight(p api.Preflight) error {
	var msgs []string
	for _, pr := range p.Problems {
		msgs = append(msgs, pr.String())
	}
	err := fmt.Errorf("%s: %s", p.Server, strings.Join(msgs, "; "))
	for _, pr := range p.Problems {
		switch pr.Check {
		case "job":
			return fmt.Errorf("%w: %w", job.ErrExists, err)
		case "in_use":
			return fmt.Errorf("%w: %w", job.ErrVolumeInUse, err)
		case "volume", "mount":
			if strings.Contains(pr.Message, "mounted") {
				return fmt.Errorf("%w: %w", job.ErrVolumeMounted, err)
			}
		}
	}
	return fmt.Errorf("%w: %w", job.ErrInvalid, err)
}

// preflight runs the checks; network also checks the peer's addresses.
func (a *Agent) preflight(ctx context.Context, spec job.Spec, network bool) api.Preflight {
	var p api.Preflight
	bad := func(check, format string, args ...any) {
		p.Problems = append(p.Problems, api.Problem{Check: check, Message: fmt.Sprintf(format, args...)})
	}
	spec.Defaults()
	if spec.UUID == "" {
		spec.UUID = job.IncarnationOf(spec.Secret)
	}
	if err := spec.Validate(); err != nil {
		bad("spec", "%v", err)
	}
	switch a.Credentials.Fingerprint {
	case spec.Source.Fingerprint:
		p.Server, p.Role = spec.Source.Name, ha.RoleSource
	case spec.Target.Fingerprint:
		p.Server, p.Role = spec.Target.Name, ha.RoleTarget
	default:
		bad("agent", "this agent (%s, %s) is neither the source %s nor the target %s (fingerprints differ: was the server re-added?)",
			a.Hostname, a.Credentials.Fingerprint, spec.Source.Name, spec.Target.Name)
		return p
	}
	if spec.Arbiter != "" {
		if a.Subsystems.Arbiter == nil {
			bad("arbiter", "%s has no arbiter configured: set arbiter.endpoints in its agent config (or --arbiter-endpoints) to the etcd cluster", p.Server)
		} else if network {
			actx, cancel := context.WithTimeout(ctx, 3*time.Second)
			v, err := a.Subsystems.Arbiter.View(actx, spec.Name)
			cancel()
			switch {
			case err != nil:
				bad("arbiter", "%s cannot reach the arbiter %v: %v", p.Server, a.Subsystems.Arbiter.Endpoints(), err)
			case v.Epoch != nil || v.Leader != nil:
				bad("arbiter", "the arbiter already holds records of a job %s (epoch %d): delete that job first (doppel job delete)", spec.Name, v.CurrentEpoch())
			}
		}
	}
	if job.ValidName("job", spec.Name) == nil {
		if _, err := a.runner(spec.Name); err == nil {
			bad("job", "a job %s exists on %s already", spec.Name, p.Server)
		} else if _, err := a.Store.Get(spec.Name); err == nil {
			bad("job", "a record of job %s exists on %s (%s)", spec.Name, p.Server, a.Store.RecordPath(spec.Name))
		}
		if dir, ok := staleState(a.Config.StateDir, spec.Name); ok {
			p.Notices = append(p.Notices, fmt.Sprintf("replication state of an earlier job %s at %s is not this job's: create moves it to %s/", spec.Name, dir, job.ArchiveDir(a.Config.StateDir)))
		}
	}
	a.checkVolume(&p, spec, bad)
	for _, hook := range ha.Hooks {
		if path, ok := spec.Scripts[hook]; ok {
			if err := checkScript(path); err != nil {
				bad("script", "%s script %s: %v (hooks run on whichever host takes the role, so the script must exist on both)", hook, path, err)
			}
		}
	}
	if network {
		a.checkPeer(ctx, spec, p.Server, bad)
	}
	return p
}

// checkVolume fills p.Volume and reports what stops the volume from being
// this job's.
func (a *Agent) checkVolume(p *api.Preflight, spec job.Spec, bad func(check, format string, args ...any)) {
	path := spec.VolumeOn(p.Server)
	p.Volume.Path = path
	if !strings.HasPrefix(path, "/") {
		return // Validate said so
	}
	fi, err := os.Stat(path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		if spec.Size <= 0 {
			bad("volume", "%s does not exist (give --size to create a file volume)", path)
			return
		}
		p.Volume.Create, p.Volume.Size, p.Volume.Kind = true, spec.Size, "file"
		parent := filepath.Dir(path)
		if st, err := os.Stat(parent); err != nil || !st.IsDir() {
			bad("volume", "%s cannot be created: its directory %s does not exist", path, parent)
			return
		}
		if err := unix.Access(parent, unix.W_OK); err != nil {
			bad("volume", "%s cannot be created in %s: %v", path, parent, err)
			return
		}
		p.Notices = append(p.Notices, fmt.Sprintf("%s will be created: a sparse file of %d bytes", path, spec.Size))
		return
	case err != nil:
		bad("volume", "%s: %v", path, err)
		return
	}
	p.Volume.Exists = true
	if err := job.CheckVolume(path, 0, a.Config.MountInfo); err != nil {
		check := "volume"
		if errors.Is(err, job.ErrVolumeMounted) {
			check = "mount"
		}
		bad(check, "%v", err)
		return
	}
	if k, _, err := statKey(path); err == nil {
		if other, opath := a.holder(k, spec.Name); other != "" {
			bad("in_use", "%s is job %s's volume (%s): a volume belongs to one job", path, other, opath)
			return
		}
	}
	size, err := probeVolume(path, fi)
	switch {
	case errors.Is(err, errHeld):
		bad("in_use", "%s is held by another program (a doppel job of another agent, doppel nbd serve, a mount or a device-mapper/md holder): writes would bypass replication", path)
	case err != nil:
		bad("volume", "%s: %v", path, err)
	}
	p.Volume.Size = size
	if fi.Mode().IsRegular() {
		p.Volume.Kind = "file"
		if size == 0 {
			bad("size", "%s is empty", path)
		}
	} else {
		p.Volume.Kind = "block"
	}
	if spec.VolumeSize > 0 && size > 0 && size < spec.VolumeSize {
		bad("size", "%s is %d bytes, smaller than the %d the job replicates", path, size, spec.VolumeSize)
	}
}

var errHeld = errors.New("held by another program")

// probeVolume returns the volume's size and whether another program holds
// it (the test takes and drops the lock a job would hold: flock on a
// file, O_EXCL on a block device).
func probeVolume(path string, fi fs.FileInfo) (int64, error) {
	if fi.Mode().IsRegular() {
		f, err := os.Open(path)
		if err != nil {
			return fi.Size(), err
		}
		defer f.Close()
		if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
			if errors.Is(err, unix.EWOULDBLOCK) {
				return fi.Size(), errHeld
			}
			return fi.Size(), err
		}
		return fi.Size(), nil
	}
	if fi.Mode().Type() != fs.ModeDevice {
		return 0, fmt.Errorf("neither a block device nor a regular file")
	}
	f, err := os.OpenFile(path, os.O_RDONLY|unix.O_EXCL|unix.O_CLOEXEC, 0)
	if err != nil {
		if errors.Is(err, unix.EBUSY) {
			return 0, errHeld
		}
		return 0, err
	}
	defer f.Close()
	var size uint64
	if _, _, e := unix.Syscall(unix.SYS_IOCTL, f.Fd(), unix.BLKGETSIZE64, uintptr(unsafe.Pointer(&size))); e != 0 {
		return 0, fmt.Errorf("BLKGETSIZE64: %w", e)
	}
	return int64(size), nil
}

// checkScript says why a hook script could not run.
func checkScript(path string) error {
	fi, err := os.Stat(path)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return errors.New("does not exist")
		}
		return err
	}
	if !fi.Mode().IsRegular() {
		return errors.New("is not a regular file")
	}
	if err := unix.Access(path, unix.X_OK); err != nil {
		return errors.New("is not executable (chmod +x)")
	}
	return nil
}

// checkPeer checks, from this host, the peer's control API (its pinned
// certificate) and replication listener (a TCP connection).
func (a *Agent) checkPeer(ctx context.Context, spec job.Spec, self string, bad func(check, format string, args ...any)) {
	_, peer, ok := spec.Endpoints(self)
	if !ok {
		return
	}
	ctx, cancel := context.WithTimeout(ctx, peerCheckTimeout)
	defer cancel()
	var wg sync.WaitGroup
	var mu sync.Mutex
	wg.Go(func() {
		fp, err := api.FetchFingerprint(ctx, peer.Control)
		mu.Lock()
		defer mu.Unlock()
		switch {
		case err != nil:
			bad("peer_control", "%s cannot reach %s's control API at %s: %v", self, peer.Name, peer.Control, err)
		case fp != peer.Fingerprint:
			bad("peer_control", "%s's control API at %s presents %s, the job pins %s (another agent, or one reinstalled: doppel server add again)", peer.Name, peer.Control, fp, peer.Fingerprint)
		}
	})
	wg.Go(func() {
		var d net.Dialer
		c, err := d.DialContext(ctx, "tcp", peer.Repl)
		mu.Lock()
		defer mu.Unlock()
		if err != nil {
			bad("peer_repl", "%s cannot reach %s's replication address %s: %v (firewall? the agent's --repl-listen?)", self, peer.Name, peer.Repl, err)
			return
		}
		c.Close()
	})
	wg.Wait()
}
