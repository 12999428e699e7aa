package agent

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"

	"github.com/doppelha/doppel/blockdev"
	"github.com/doppelha/doppel/blockdev/kernel"
	"github.com/doppelha/doppel/daemon/job"
)

// adoptedExport is a job's export as the previous agent handed it over:
// its listening socket and its clients' connections, with what was read
// from them and not processed.
type adoptedExport struct {
	device   string
	listener *os.File // a Unix-socket export's (nil: kernel)
	kernel   int      // N of an adopted /dev/nbdN (-1: none)
	conns    []blockdev.Handed
}

// Freeze hands job name's export over instead of stopping it: the socket
// stays where it is (not unlinked), or /dev/nbdN stays connected; its
// clients (the kernel's connections) stop at a request boundary with
// their requests answered, and their connections are returned, as the
// listener's, for the next agent (or this one, Adopt). A job that is not
// served returns nil.
func (v *NBDVolumes) Freeze(name string) (*adoptedExport, error) {
	v.mu.Lock()
	s, ok := v.served[name]
	if ok && s.kdev == nil && s.l == nil {
		v.mu.Unlock()
		return nil, fmt.Errorf("job %s: its export %s cannot be handed over", name, s.device)
	}
	delete(v.served, name)
	v.mu.Unlock()
	if !ok {
		return nil, nil
	}
	if s.kdev != nil {
		s.srv.Handover()
		s.kdev.Release() // connected still: to the server ends handed over
		s.cancel()
		<-s.done
		return &adoptedExport{device: s.device, kernel: s.kdev.Index(), conns: s.srv.Handed()}, nil
	}
	lf, err := s.l.File() // a duplicate: the listening socket outlives this server
	if err != nil {
		return nil, fmt.Errorf("job %s: hand the export's socket over: %w", name, err)
	}
	s.l.SetUnlinkOnClose(false)
	s.srv.Handover()
	s.cancel() // stops accepting; clients finish and are handed over
	<-s.done
	s.resumed.Wait()
	return &adoptedExport{device: s.device, listener: lf, kernel: -1, conns: s.srv.Handed()}, nil
}

// Adopt makes the next Serve of job name continue the export ad, handed
// over by Freeze, instead of making a new one.
func (v *NBDVolumes) Adopt(name string, ad *adoptedExport) {
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.adopted == nil {
		v.adopted = map[string]*adoptedExport{}
	}
	v.adopted[name] = ad
}

// Unadopt returns and forgets what Adopt left for job name and no Serve
// took.
func (v *NBDVolumes) Unadopt(name string) *adoptedExport {
	v.mu.Lock()
	defer v.mu.Unlock()
	ad := v.adopted[name]
	delete(v.adopted, name)
	return ad
}

// serveAdopted serves an adopted export: the listener accepts again and
// every handed connection resumes where it stopped. Called with mu held.
func (v *NBDVolumes) serveAdopted(spec job.Spec, ad *adoptedExport, b blockdev.Backend, m blockdev.Mutator) (string, error) {
	log := v.Log.With("job", spec.Name)
	srv, err := blockdev.NewServer(log, blockdev.Export{
		Name: spec.Name, Description: "doppel job " + spec.Name, Backend: b, Mutator: m,
	})
	if err != nil {
		ad.close()
		return "", err
	}
	if ad.kernel >= 0 {
		return v.serveAdoptedKernel(spec, ad, srv)
	}
	fl, err := net.FileListener(ad.listener)
	ad.listener.Close()
	if err != nil {
		ad.closeConns()
		return "", fmt.Errorf("job %s: adopt the export's socket: %w", spec.Name, err)
	}
	ul, ok := fl.(*net.UnixListener)
	if !ok {
		fl.Close()
		ad.closeConns()
		return "", fmt.Errorf("job %s: the adopted export's socket is a %T", spec.Name, fl)
	}
	ul.SetUnlinkOnClose(false) // Stop removes it
	sctx, cancel := context.WithCancel(context.Background())
	s := &served{device: ad.device, cancel: cancel, done: make(chan struct{}), srv: srv, l: ul}
	for _, h := range ad.conns {
		c, err := net.FileConn(h.Conn)
		h.Conn.Close()
		if err != nil {
			log.Error("resume a handed-over NBD connection", "err", err)
			continue
		}
		s.resumed.Add(1)
		go func() {
			defer s.resumed.Done()
			if err := srv.ResumeConn(sctx, c, h.Export, h.Pending); err != nil {
				log.Warn("nbd connection closed", "err", err)
			}
		}()
	}
	go func() {
		defer close(s.done)
		if err := srv.Serve(sctx, ul); err != nil && !errors.Is(err, context.Canceled) {
			log.Error("nbd export stopped", "err", err)
		}
	}()
	v.served[spec.Name] = s
	log.Info("export adopted from the previous agent", "device", ad.device, "connections", len(ad.conns))
	return s.device, nil
}

// serveAdoptedKernel continues serving an adopted /dev/nbdN: its
// connections resume where the previous agent stopped. Called with mu
// held.
func (v *NBDVolumes) serveAdoptedKernel(spec job.Spec, ad *adoptedExport, srv *blockdev.Server) (string, error) {
	log := v.Log.With("job", spec.Name)
	var conns []net.Conn
	var handed []blockdev.Handed
	for _, h := range ad.conns {
		c, err := net.FileConn(h.Conn)
		h.Conn.Close()
		if err != nil {
			log.Error("resume a handed-over NBD connection of the device", "err", err)
			continue
		}
		conns, handed = append(conns, c), append(handed, h)
	}
	dev, err := kernel.Adopt(ad.kernel, conns, func(ctx context.Context, i int, c net.Conn) error {
		return srv.ResumeConn(ctx, c, handed[i].Export, handed[i].Pending)
	}, log)
	if err != nil {
		for _, c := range conns {
			c.Close()
		}
		return "", err
	}
	s := &served{device: dev.Path(), cancel: func() {}, done: make(chan struct{}), srv: srv, kdev: dev}
	close(s.done)
	v.served[spec.Name] = s
	log.Info("device adopted from the previous agent", "device", dev.Path(), "connections", len(conns))
	return s.device, nil
}

func (ad *adoptedExport) closeConns() {
	for _, h := range ad.conns {
		h.Conn.Close()
	}
}

func (ad *adoptedExport) close() {
	if ad.listener != nil {
		ad.listener.Close()
	}
	ad.closeConns()
}
