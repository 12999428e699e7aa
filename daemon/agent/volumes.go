package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/doppelha/doppel/blockdev"
	"github.com/doppelha/doppel/blockdev/kernel"
	"github.com/doppelha/doppel/daemon/job"
)

// NBDVolumes serves job volumes with doppel's NBD server (blockdev): as
// /dev/nbdN where the kernel has nbd, else as an NBD export on a Unix
// socket under RunDir (status shows unix:PATH; nbdfuse, qemu-nbd or
// nbd-client can mount it).
type NBDVolumes struct {
	Log    *slog.Logger
	RunDir string
	// Kernel tries /dev/nbdN first.
	Kernel bool

	mu      sync.Mutex
	served  map[string]*served
	adopted map[string]*adoptedExport // handed over by the previous agent, served at the next Serve
}

type served struct {
	device  string
	cancel  context.CancelFunc
	done    chan struct{}
	srv     *blockdev.Server
	kdev    *kernel.Device
	l       *net.UnixListener
	resumed sync.WaitGroup // connections resumed after a handover
}

// Serve implements Volumes. Serving an already served job returns its
// device.
func (v *NBDVolumes) Serve(ctx context.Context, spec job.Spec, b blockdev.Backend, m blockdev.Mutator) (string, error) {
	v.mu.Lock()
	defer v.mu.Unlock()
	if s, ok := v.served[spec.Name]; ok {
		return s.device, nil
	}
	if v.served == nil {
		v.served = map[string]*served{}
	}
	if ad, ok := v.adopted[spec.Name]; ok {
		delete(v.adopted, spec.Name)
		return v.serveAdopted(spec, ad, b, m)
	}
	srv, err := blockdev.NewServer(v.Log.With("job", spec.Name), blockdev.Export{
		Name: spec.Name, Description: "doppel job " + spec.Name, Backend: b, Mutator: m,
	})
	if err != nil {
		return "", err
	}
	sctx, cancel := context.WithCancel(context.Background())
	s := &served{cancel: cancel, done: make(chan struct{}), srv: srv}
	if v.Kernel {
		if err := kernel.Probe(ctx); err == nil {
			dev, err := kernel.Attach(ctx, kernel.Config{
				Serve: srv.ServeConn, Export: spec.Name, Connections: 2,
				DeadConnTimeout: 30 * time.Second, BackendID: "doppel-" + spec.Name, Log: v.Log,
			})
			if err == nil {
				s.kdev, s.device = dev, dev.Path()
				close(s.done)
				v.served[spec.Name] = s
				return s.device, nil
			}
			v.Log.Warn("kernel attach failed; serving on a Unix socket", "job", spec.Name, "err", err)
		} else {
			v.Log.Info("no kernel nbd; serving the volume on a Unix socket", "job", spec.Name, "reason", err)
		}
	}
	path := filepath.Join(v.RunDir, spec.Name+".sock")
	os.Remove(path)
	l, err := blockdev.Listen("unix:" + path)
	if err != nil {
		cancel()
		return "", err
	}
	s.device = "unix:" + path
	s.l, _ = l.(*net.UnixListener)
	go func() {
		defer close(s.done)
		if err := srv.Serve(sctx, l); err != nil && !errors.Is(err, context.Canceled) {
			v.Log.Error("nbd export stopped", "job", spec.Name, "err", err)
		}
	}()
	v.served[spec.Name] = s
	return s.device, nil
}

// Stop implements Volumes.
func (v *NBDVolumes) Stop(name string) error {
	v.mu.Lock()
	s, ok := v.served[name]
	delete(v.served, name)
	v.mu.Unlock()
	if !ok {
		return nil
	}
	var errs []error
	if s.kdev != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		errs = append(errs, s.kdev.Detach(ctx))
		cancel()
	}
	s.cancel()
	<-s.done
	s.resumed.Wait()
	if path, ok := cutUnix(s.device); ok {
		os.Remove(path)
	}
	return errors.Join(errs...)
}

// InUse implements Volumes: the clients connected to the job's export on
// its Unix socket, or the mounts, holders and processes using its
// /dev/nbdN.
func (v *NBDVolumes) InUse(name string) []string {
	v.mu.Lock()
	s, ok := v.served[name]
	v.mu.Unlock()
	if !ok {
		return nil
	}
	if s.kdev != nil {
		return s.kdev.Users()
	}
	var out []string
	for _, c := range s.srv.Clients() {
		out = append(out, fmt.Sprintf("NBD client %s on %s since %s", c.Remote, s.device, c.Since.Format(time.TimeOnly)))
	}
	return out
}

// Device implements Volumes.
func (v *NBDVolumes) Device(name string) string {
	v.mu.Lock()
	defer v.mu.Unlock()
	if s, ok := v.served[name]; ok {
		return s.device
	}
	return ""
}

func cutUnix(dev string) (string, bool) {
	if len(dev) > 5 && dev[:5] == "unix:" {
		return dev[5:], true
	}
	return "", false
}
