package blockdev

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/doppelha/doppel/blockdev/nbdproto"
	"golang.org/x/sys/unix"
)

// Export is one named volume served over NBD.
type Export struct {
	// Name is the export name clients ask for (at most 4096 bytes). A server
	// with a single export also answers to the empty (default) name.
	Name string
	// Description is sent in NBD_INFO_DESCRIPTION and NBD_OPT_LIST replies.
	Description string
	// Backend holds the data. Reads go straight to Backend.ReadAt.
	Backend Backend
	// Mutator receives every mutating request (write, trim, write-zeroes,
	// flush, FUA) before it is acknowledged; nil means Direct(Backend).
	//
	// The *Mutation passed to Apply, and its Data, belong to the server and
	// are reused once Apply returns: an implementation that keeps them must
	// copy them. Because the server advertises NBD_FLAG_CAN_MULTI_CONN, a
	// flush on any connection must make every write acknowledged on any
	// connection durable; Direct does (fdatasync covers the whole backend).
	Mutator Mutator
	// ReadOnly refuses writes, trims and write-zeroes with EPERM and
	// advertises NBD_FLAG_READ_ONLY.
	ReadOnly bool
}

// export is an Export with its derived state.
type export struct {
	Export
	mut   Mutator
	size  uint64
	flags uint16 // transmission flags
	fast  bool   // NBD_CMD_FLAG_FAST_ZERO honoured (never, for now)
	// serial: writes go straight to a backend that runs them one at a
	// time (File on a regular file; see tconn.serialInline).
	serial bool
}

// Stats counts the requests a Server has handled since it was created.
// Errors counts requests answered with an NBD error (any command).
type Stats struct {
	Connections   uint64 // connections accepted (including refused ones)
	Reads         uint64
	Writes        uint64
	Flushes       uint64
	Trims         uint64
	Zeroes        uint64 // NBD_CMD_WRITE_ZEROES
	Errors        uint64
	BytesRead     uint64
	BytesWritten  uint64
	BytesTrimmed  uint64
	BytesZeroed   uint64
	FUA           uint64 // requests carrying NBD_CMD_FLAG_FUA
	ProtocolFault uint64 // connections closed for a protocol violation
}

type counters struct {
	conns, reads, writes, flushes, trims, zeroes, errors        atomic.Uint64
	bytesRead, bytesWritten, bytesTrimmed, bytesZeroed, fua, pf atomic.Uint64
}

// Server is an NBD server (fixed newstyle negotiation, simple replies) for
// one or more exports. Requests on one connection are processed
// concurrently and answered as each completes; any number of connections
// may share an export.
type Server struct {
	log     *slog.Logger
	exports []*export
	stats   counters

	// MaxInFlight bounds the requests processed concurrently on one
	// connection (default 128). Set it before serving.
	MaxInFlight int

	grace time.Duration // shutdownGrace; shorter in tests
	conns sync.WaitGroup

	cmu     sync.Mutex
	clients map[*conn]Client // in transmission
	handing atomic.Bool      // Handover: hand connections over
	handed  []Handed
}

// Client is a client connected to an export (past negotiation).
type Client struct {
	Export string
	// Remote names the client: its address, or for a Unix socket the
	// process at the other end ("pid 1234 (nbdfuse)").
	Remote string
	Since  time.Time
}

func (c Client) String() string {
	return fmt.Sprintf("%s on export %q since %s", c.Remote, c.Export, c.Since.Format(time.TimeOnly))
}

// Clients lists the clients in transmission now, oldest first.
func (s *Server) Clients() []Client {
	s.cmu.Lock()
	defer s.cmu.Unlock()
	out := make([]Client, 0, len(s.clients))
	for _, c := range s.clients {
		out = append(out, c)
	}
	slices.SortFunc(out, func(a, b Client) int { return a.Since.Compare(b.Since) })
	return out
}

func (s *Server) addClient(cn *conn, export string) {
	s.cmu.Lock()
	defer s.cmu.Unlock()
	if s.clients == nil {
		s.clients = map[*conn]Client{}
	}
	s.clients[cn] = Client{Export: export, Remote: peerName(cn.c), Since: time.Now()}
}

func (s *Server) removeClient(cn *conn) {
	s.cmu.Lock()
	defer s.cmu.Unlock()
	delete(s.clients, cn)
}

// peerName names the other end of c: its address, or for a Unix socket
// the process holding it (SO_PEERCRED).
func peerName(c net.Conn) string {
	if uc, ok := c.(*net.UnixConn); ok {
		if raw, err := uc.SyscallConn(); err == nil {
			var cred *unix.Ucred
			raw.Control(func(fd uintptr) {
				cred, _ = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
			})
			if cred != nil && cred.Pid > 0 {
				comm, _ := os.ReadFile(fmt.Sprintf("/proc/%d/comm", cred.Pid))
				return fmt.Sprintf("pid %d (%s)", cred.Pid, strings.TrimSpace(string(comm)))
			}
		}
	}
	return remoteName(c)
}

// NewServer returns a server for exports. Export names must be unique and
// every export needs a Backend with a positive size.
func NewServer(log *slog.Logger, exports ...Export) (*Server, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if len(exports) == 0 {
		return nil, errors.New("nbd server: no export")
	}
	s := &Server{log: log, MaxInFlight: 128, grace: shutdownGrace}
	seen := map[string]bool{}
	for _, e := range exports {
		if e.Backend == nil {
			return nil, fmt.Errorf("nbd server: export %q: no backend", e.Name)
		}
		if len(e.Name) > nbdproto.MaxNameLength || len(e.Description) > nbdproto.MaxNameLength {
			return nil, fmt.Errorf("nbd server: export %q: name or description longer than %d bytes", e.Name, nbdproto.MaxNameLength)
		}
		if seen[e.Name] {
			return nil, fmt.Errorf("nbd server: duplicate export name %q", e.Name)
		}
		seen[e.Name] = true
		size := e.Backend.Size()
		if size <= 0 {
			return nil, fmt.Errorf("nbd server: export %q: size %d is not positive", e.Name, size)
		}
		x := &export{Export: e, mut: e.Mutator, size: uint64(size)}
		if x.mut == nil {
			x.mut = Direct(e.Backend)
			if f, ok := e.Backend.(*File); ok && !f.dev {
				x.serial = true
			}
		}
		// FAST_ZERO would need the backend to promise that zeroing never
		// falls back to writing; File cannot know that before trying, so
		// it is not advertised and FAST_ZERO requests get ENOTSUP.
		x.flags = nbdproto.FlagHasFlags | nbdproto.FlagSendFlush | nbdproto.FlagCanMultiConn
		if e.ReadOnly {
			x.flags |= nbdproto.FlagReadOnly
		} else {
			x.flags |= nbdproto.FlagSendFUA | nbdproto.FlagSendTrim | nbdproto.FlagSendWriteZeroes
			if x.fast {
				x.flags |= nbdproto.FlagSendFastZero
			}
		}
		s.exports = append(s.exports, x)
	}
	return s, nil
}

// lookup finds an export by name; a single-export server also answers to "".
func (s *Server) lookup(name string) *export {
	for _, x := range s.exports {
		if x.Name == name {
			return x
		}
	}
	if name == "" && len(s.exports) == 1 {
		return s.exports[0]
	}
	return nil
}

// Stats returns a snapshot of the request counters.
func (s *Server) Stats() Stats {
	c := &s.stats
	return Stats{
		Connections: c.conns.Load(), Reads: c.reads.Load(), Writes: c.writes.Load(),
		Flushes: c.flushes.Load(), Trims: c.trims.Load(), Zeroes: c.zeroes.Load(),
		Errors: c.errors.Load(), BytesRead: c.bytesRead.Load(), BytesWritten: c.bytesWritten.Load(),
		BytesTrimmed: c.bytesTrimmed.Load(), BytesZeroed: c.bytesZeroed.Load(), FUA: c.fua.Load(),
		ProtocolFault: c.pf.Load(),
	}
}

// Serve accepts connections on l and serves each until ctx is cancelled.
// Then it stops accepting (closing l), lets every connection finish the
// requests already received, syncs the backends and returns nil. A fatal
// accept failure ends every connection the same way and is returned.
func (s *Server) Serve(ctx context.Context, l net.Listener) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stop := context.AfterFunc(ctx, func() { l.Close() })
	defer stop()
	var err error
	var delay time.Duration
	for {
		c, aerr := l.Accept()
		if aerr != nil {
			if ctx.Err() != nil {
				break
			}
			if isTemporaryAccept(aerr) {
				delay = min(max(2*delay, 5*time.Millisecond), time.Second)
				s.log.Warn("nbd accept failed; retrying", "err", aerr, "delay", delay)
				time.Sleep(delay)
				continue
			}
			err = fmt.Errorf("nbd serve: accept: %w", aerr)
			cancel()
			break
		}
		delay = 0
		s.conns.Add(1)
		go func() {
			defer s.conns.Done()
			if cerr := s.ServeConn(ctx, c); cerr != nil {
				s.log.Warn("nbd connection closed", "remote", remoteName(c), "err", cerr)
			}
		}()
	}
	l.Close()
	s.conns.Wait()
	if serr := s.syncAll(); serr != nil && err == nil {
		err = serr
	}
	return err
}

// isTemporaryAccept reports accept errors worth retrying: running out of
// descriptors or memory, or a connection aborted before it was accepted.
func isTemporaryAccept(err error) bool {
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return true
	}
	for _, e := range []syscall.Errno{syscall.EMFILE, syscall.ENFILE, syscall.ECONNABORTED, syscall.ENOBUFS, syscall.ENOMEM, syscall.EINTR} {
		if errors.Is(err, e) {
			return true
		}
	}
	return false
}

// syncAll flushes every writable export's backend.
func (s *Server) syncAll() error {
	var errs []error
	for _, x := range s.exports {
		if x.ReadOnly {
			continue
		}
		if err := x.Backend.Sync(); err != nil {
			errs = append(errs, fmt.Errorf("sync export %q: %w", x.Name, err))
		}
	}
	return errors.Join(errs...)
}

func remoteName(c net.Conn) string {
	if a := c.RemoteAddr(); a != nil && a.String() != "" && a.String() != "@" {
		return a.String()
	}
	if a := c.LocalAddr(); a != nil {
		return a.String()
	}
	return "?"
}

// ServeConn serves one connected client (negotiation, then transmission)
// and closes c when done. It returns nil when the client disconnects
// (NBD_CMD_DISC, NBD_OPT_ABORT or EOF between requests) or ctx is
// cancelled (requests already received are finished and answered first),
// and an error describing a protocol violation or I/O failure otherwise.
// During a Handover, a client in transmission is handed over instead of
// closed (see Handed).
func (s *Server) ServeConn(ctx context.Context, c net.Conn) error {
	s.stats.conns.Add(1)
	cn := newConn(s, c)
	// Cancellation unblocks the reader; replies still go out.
	stop := context.AfterFunc(ctx, cn.cancel)
	defer stop()
	x, err := cn.negotiate()
	if err != nil || x == nil {
		// Counted before the close: a client seeing it sees the count.
		if err != nil && ctx.Err() == nil {
			s.stats.pf.Add(1)
		}
		c.Close()
		if ctx.Err() != nil {
			return nil
		}
		return err
	}
	cn.log.Info("nbd client connected", "export", x.Name)
	return s.transmission(ctx, cn, x)
}

// ResumeConn resumes transmission on a connection another server (this
// program's previous instance) handed over: no negotiation; pending are
// the bytes that server read from c and did not process, read first.
func (s *Server) ResumeConn(ctx context.Context, c net.Conn, export string, pending []byte) error {
	s.stats.conns.Add(1)
	cn := newConn(s, c)
	if len(pending) > 0 {
		cn.br = bufio.NewReaderSize(io.MultiReader(bytes.NewReader(pending), c), 64<<10)
	}
	x := s.lookup(export)
	if x == nil {
		c.Close()
		return fmt.Errorf("nbd: resume a connection to export %q: no such export", export)
	}
	stop := context.AfterFunc(ctx, cn.cancel)
	defer stop()
	cn.log.Info("nbd client resumed", "export", x.Name, "pending_bytes", len(pending))
	return s.transmission(ctx, cn, x)
}

// transmission runs the transmission phase of cn and closes it, or hands
// it over.
func (s *Server) transmission(ctx context.Context, cn *conn, x *export) error {
	s.addClient(cn, x.Name)
	defer s.removeClient(cn)
	if s.handing.Load() {
		cn.handoff()
	}
	err := cn.transmit(ctx, x)
	if errors.Is(err, errHandedOver) {
		if herr := s.hand(cn, x); herr != nil {
			cn.log.Error("nbd: hand the connection over", "export", x.Name, "err", herr)
			cn.c.Close()
			return herr
		}
		cn.log.Info("nbd client handed over", "export", x.Name, "pending_bytes", len(cn.pending))
		return nil
	}
	if ctx.Err() != nil && isReadInterrupt(err) {
		err = nil
	}
	if err != nil {
		s.stats.pf.Add(1)
	}
	cn.c.Close()
	cn.log.Info("nbd client disconnected", "export", x.Name)
	return err
}

// Handed is a connection handed over in the middle of transmission: its
// socket (a duplicate: the server closed its own), the export it had
// negotiated, and the bytes the server read from it without processing
// them (the start of the next requests). ResumeConn continues it.
type Handed struct {
	Export  string
	Conn    *os.File
	Pending []byte
}

// Handover makes the server hand its clients over instead of serving on:
// every connection in transmission (and any that reaches it from now on)
// stops reading at a request boundary, finishes and answers the requests
// it had read, and is handed over (Handed) instead of closed. Stop
// accepting (cancel Serve, or stop calling ServeConn) after calling it:
// connections still negotiating are closed by the cancellation.
func (s *Server) Handover() {
	s.cmu.Lock()
	defer s.cmu.Unlock()
	s.handing.Store(true)
	for cn := range s.clients {
		cn.handoff()
	}
}

// Handed returns, and forgets, the connections handed over since
// Handover; call it once every ServeConn and ResumeConn returned.
func (s *Server) Handed() []Handed {
	s.cmu.Lock()
	defer s.cmu.Unlock()
	h := s.handed
	s.handed = nil
	return h
}

func (s *Server) hand(cn *conn, x *export) error {
	fc, ok := cn.c.(interface{ File() (*os.File, error) })
	if !ok {
		return fmt.Errorf("a %T cannot be handed over", cn.c)
	}
	f, err := fc.File()
	if err != nil {
		return err
	}
	cn.c.Close()
	s.cmu.Lock()
	s.handed = append(s.handed, Handed{Export: x.Name, Conn: f, Pending: cn.pending})
	s.cmu.Unlock()
	return nil
}
