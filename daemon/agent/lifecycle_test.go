package agent

import (
	"bytes"
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/doppelha/doppel/blockdev"
	"github.com/doppelha/doppel/daemon/api"
	"github.com/doppelha/doppel/daemon/ha"
	"github.com/doppelha/doppel/daemon/job"
	"github.com/doppelha/doppel/daemon/replstate"
)

// recreate creates the pair's job again on both agents (a new secret, the
// same name and volumes) and waits until vm1 is protected.
func (p *pair) recreate() {
	p.t.Helper()
	ctx := context.Background()
	spec := p.spec
	spec.Secret = newSecret()
	spec.Size = 0
	if _, err := p.agents["vm1"].client.CreateJob(ctx, spec); err != nil {
		p.t.Fatalf("create again on vm1: %v", err)
	}
	spec.Size = pairSize
	if _, err := p.agents["vm2"].client.CreateJob(ctx, spec); err != nil {
		p.t.Fatalf("create again on vm2: %v", err)
	}
	p.spec = spec
}

// targetEqualsModel reads the target's volume file directly.
func (p *pair) targetEqualsModel() bool {
	got, err := os.ReadFile(p.spec.TargetVolume)
	return err == nil && bytes.Equal(got, p.model)
}

// TestRecreateMirrorsFreshTarget: a job is deleted and created again with
// the same name onto a fresh, empty target volume. The state the first
// job left behind must not make the new one skip its mirror: the target
// is consistent only once it holds the source's data, and verify finds no
// difference. (It used to find the same generation on both sides, skip
// the mirror and report an empty target consistent.)
func TestRecreateMirrorsFreshTarget(t *testing.T) {
	p := newPair(t, ha.FailoverManual)
	p.write("vm1", 64)
	p.verify("vm1")
	ctx := context.Background()
	for _, n := range []string{"vm1", "vm2"} {
		if err := p.agents[n].client.DeleteJob(ctx, "web"); err != nil {
			t.Fatalf("delete on %s: %v", n, err)
		}
	}
	if err := os.Remove(p.spec.TargetVolume); err != nil {
		t.Fatal(err)
	}
	p.recreate()
	p.waitFor("target consistent", func() bool {
		st := p.status("vm2")
		return st.HA.Role == ha.RoleTarget && st.HA.Consistent
	})
	if !p.targetEqualsModel() {
		t.Fatal("the new job's target reports consistent data but does not hold the source's")
	}
	p.waitProtected("vm1")
	p.verify("vm1")
}

// TestDeleteRemovesOrArchivesState: delete removes the job's replication
// state on both agents; with KeepState it moves the state and the
// record into a named archive directory instead. State that an earlier
// job left under the name (an older doppel, a delete interrupted) is set
// aside at create and the new job mirrors its fresh target.
func TestDeleteRemovesOrArchivesState(t *testing.T) {
	p := newPair(t, ha.FailoverManual)
	p.write("vm1", 16)
	ctx := context.Background()
	state := func(n string) string { return job.ReplStateDir(filepath.Join(p.root, n), "web") }
	for _, n := range []string{"vm1", "vm2"} {
		if _, err := os.Stat(filepath.Join(state(n), replstate.OwnerFile)); err != nil {
			t.Fatalf("%s: the job's state is not bound to it: %v", n, err)
		}
	}
	// Keep the state: archived with the record, nothing left in jobs/.
	archived := map[string]string{}
	for _, n := range []string{"vm1", "vm2"} {
		res, err := p.agents[n].client.DeleteJobWith(ctx, "web", api.DeleteOptions{KeepState: true})
		if err != nil {
			t.Fatalf("delete --keep-state on %s: %v", n, err)
		}
		if !strings.HasPrefix(res.Archived, job.ArchiveDir(filepath.Join(p.root, n))) {
			t.Fatalf("%s: archived to %q", n, res.Archived)
		}
		for _, f := range []string{"web.repl/" + replstate.GenerationFile, "web.repl/" + replstate.OwnerFile, "web.json"} {
			if _, err := os.Stat(filepath.Join(res.Archived, f)); err != nil {
				t.Errorf("%s: archive lacks %s: %v", n, f, err)
			}
		}
		if _, err := os.Stat(state(n)); !os.IsNotExist(err) {
			t.Errorf("%s: state still in jobs/ after delete: %v", n, err)
		}
		archived[n] = res.Archived
	}
	// An older doppel's delete left the state in place: put it back, and
	// give the target a fresh volume.
	for n, a := range archived {
		if err := os.Rename(filepath.Join(a, "web.repl"), state(n)); err != nil {
			t.Fatal(err)
		}
	}
	os.Remove(p.spec.TargetVolume)
	p.recreate()
	p.waitFor("target consistent", func() bool { return p.status("vm2").HA.Consistent })
	if !p.targetEqualsModel() {
		t.Fatal("stale state was trusted: the target reports consistent data it does not hold")
	}
	for _, n := range []string{"vm1", "vm2"} {
		stale, _ := filepath.Glob(filepath.Join(job.ArchiveDir(filepath.Join(p.root, n)), "web.repl.stale-*"))
		if len(stale) != 1 {
			t.Errorf("%s: the stale state was not set aside into the archive (%v)", n, stale)
		}
	}
	// A plain delete removes the state.
	p.waitProtected("vm1")
	for _, n := range []string{"vm1", "vm2"} {
		res, err := p.agents[n].client.DeleteJobWith(ctx, "web", api.DeleteOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if res.Archived != "" || !slices.Contains(res.Removed, state(n)) {
			t.Errorf("%s: delete archived %q removed %v", n, res.Archived, res.Removed)
		}
		if _, err := os.Stat(state(n)); !os.IsNotExist(err) {
			t.Errorf("%s: state left after delete: %v", n, err)
		}
	}
}

// TestTargetVolumeReplacedIsMirrored: while the target's agent is down,
// its volume file is replaced by an empty one at the same path. The agent
// finds another volume than the job's, sets the replication state aside,
// and the target is consistent again only after a mirror.
func TestTargetVolumeReplacedIsMirrored(t *testing.T) {
	p := newPair(t, ha.FailoverManual)
	p.write("vm1", 32)
	p.verify("vm1")
	addr := p.agents["vm2"].addr
	p.agents["vm2"].stop()
	tmp := p.spec.TargetVolume + ".new"
	if err := os.WriteFile(tmp, make([]byte, pairSize), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, p.spec.TargetVolume); err != nil {
		t.Fatal(err)
	}
	p.start("vm2", addr)
	p.waitFor("target consistent", func() bool {
		st := p.status("vm2")
		return st.HA.Role == ha.RoleTarget && st.HA.Consistent
	})
	if !p.targetEqualsModel() {
		t.Fatal("a replaced target volume was reported consistent without a mirror")
	}
	p.waitProtected("vm1")
	p.verify("vm1")
}

// TestSourceVolumeReplacedIsRefused: the source's volume is replaced by
// another file (same content, another inode: a restore) while its agent
// is down. The source refuses to serve a volume that is not the job's,
// and says why.
func TestSourceVolumeReplacedIsRefused(t *testing.T) {
	p := newPair(t, ha.FailoverManual)
	p.write("vm1", 8)
	addr := p.agents["vm1"].addr
	p.agents["vm1"].stop()
	b, _ := os.ReadFile(p.spec.Volume)
	tmp := p.spec.Volume + ".restored"
	os.WriteFile(tmp, b, 0o600)
	if err := os.Rename(tmp, p.spec.Volume); err != nil {
		t.Fatal(err)
	}
	p.start("vm1", addr)
	p.waitFor("refusal", func() bool {
		st := p.status("vm1")
		return strings.Contains(st.Data.Note, "volume changed")
	})
	time.Sleep(300 * time.Millisecond)
	st := p.status("vm1")
	if st.Data.Device != "" {
		t.Fatalf("a replaced source volume is served at %s", st.Data.Device)
	}
	if !strings.Contains(st.Data.Note, "delete the job and create it again") {
		t.Errorf("the refusal does not say what to do: %q", st.Data.Note)
	}
}

// TestVolumeBelongsToOneJob: a volume belongs to one job on a host,
// whatever path reaches it: a second job on the same file through a
// symlink or a bind mount is refused naming the job that has it, and a
// second opener (doppel nbd serve, another agent) cannot open it while
// the job exists, on the source or on the target.
func TestVolumeBelongsToOneJob(t *testing.T) {
	p := newPair(t, ha.FailoverManual)
	ctx := context.Background()
	other := p.spec
	other.Name, other.Secret, other.UUID, other.Size = "web2", newSecret(), "", 0
	link := filepath.Join(p.root, "link.img")
	if err := os.Symlink(p.spec.Volume, link); err != nil {
		t.Fatal(err)
	}
	paths := map[string]string{"symlink": link}
	if os.Geteuid() == 0 {
		bind := filepath.Join(p.root, "bind")
		os.Mkdir(bind, 0o700)
		if out, err := exec.Command("mount", "--bind", filepath.Dir(p.spec.Volume), bind).CombinedOutput(); err != nil {
			t.Fatalf("bind mount: %v: %s", err, out)
		}
		t.Cleanup(func() { exec.Command("umount", bind).Run() })
		paths["bind mount"] = filepath.Join(bind, filepath.Base(p.spec.Volume))
	} else {
		t.Log("not root: the bind-mount path is not tested")
	}
	for how, path := range paths {
		other.Volume = path
		_, err := p.agents["vm1"].client.CreateJob(ctx, other)
		if !api.IsKind(err, "in_use") || !strings.Contains(err.Error(), "job web's volume") {
			t.Errorf("second job on the source volume by %s: %v", how, err)
		}
	}
	if jobs, _ := p.agents["vm1"].client.Jobs(ctx); len(jobs) != 1 {
		t.Fatalf("a refused create left %d jobs", len(jobs))
	}
	for _, path := range []string{p.spec.Volume, link, p.spec.TargetVolume} {
		if b, err := blockdev.OpenExclusive(path, 0); !errors.Is(err, blockdev.ErrInUse) {
			if err == nil {
				b.Close()
			}
			t.Errorf("a second opener of %s: %v, want ErrInUse", path, err)
		}
	}
	// The job's own writes still go through.
	p.write("vm1", 8)
	p.verify("vm1")
	// Once the job is gone, the volume is free.
	for _, n := range []string{"vm1", "vm2"} {
		if err := p.agents[n].client.DeleteJob(ctx, "web"); err != nil {
			t.Fatal(err)
		}
	}
	b, err := blockdev.OpenExclusive(p.spec.Volume, 0)
	if err != nil {
		t.Fatalf("volume still held after delete: %v", err)
	}
	b.Close()
}

// TestPreflightEndpoint: the pre-flight reports, changing nothing, a
// volume another program holds, a peer whose control API presents
// another certificate, a peer replication address nobody listens on;
// and nothing for a job that can be created.
func TestPreflightEndpoint(t *testing.T) {
	p := newPair(t, ha.FailoverManual)
	ctx := context.Background()
	spec := p.spec
	spec.Name, spec.Secret, spec.UUID = "db", newSecret(), ""
	spec.Volume, spec.TargetVolume, spec.Size = filepath.Join(p.root, "db1.img"), filepath.Join(p.root, "db2.img"), 1<<20
	pre, err := p.agents["vm1"].client.Preflight(ctx, spec)
	if err != nil || len(pre.Problems) != 0 || pre.Server != "vm1" || pre.Role != ha.RoleSource || !pre.Volume.Create || pre.Volume.Size != 1<<20 {
		t.Fatalf("pre-flight of a good job: %+v, %v", pre, err)
	}
	held, err := blockdev.OpenExclusive(spec.Volume, 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	defer held.Close()
	bad := spec
	bad.Target.Fingerprint = p.spec.Source.Fingerprint[:7] + strings.Repeat("e", 64)
	bad.Target.Repl = freePort(t)
	pre, err = p.agents["vm1"].client.Preflight(ctx, bad)
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]string{}
	for _, pr := range pre.Problems {
		got[pr.Check] = pr.Message
	}
	if !strings.Contains(got["in_use"], "held by another program") || !strings.Contains(got["peer_control"], "the job pins") ||
		!strings.Contains(got["peer_repl"], "cannot reach vm2's replication address") || len(got) != 3 {
		t.Fatalf("problems %v", pre.Problems)
	}
	if _, err := os.Stat(job.ReplStateDir(filepath.Join(p.root, "vm1"), "db")); !os.IsNotExist(err) {
		t.Fatal("the pre-flight made replication state")
	}
	// The create makes the same local checks.
	if _, err := p.agents["vm1"].client.CreateJob(ctx, bad); !api.IsKind(err, "in_use") {
		t.Fatalf("create of a held volume: %v", err)
	}
}
