package agent

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"slices"
	"strings"

	"github.com/doppelha/doppel/blockdev"
	"github.com/doppelha/doppel/blockdev/kernel"
	"github.com/doppelha/doppel/daemon/job"
	"golang.org/x/sys/unix"
)

// A restart (or upgrade) hands the running agent's state to its successor
// over a Unix socket pair: a manifest (JSON) and the descriptors it names,
// passed with SCM_RIGHTS. The descriptors keep what applications depend
// on open across the restart: each job's volume (its exclusive lock goes
// with the descriptor), each export's listening socket and its clients'
// connections (with the bytes read from them and not processed yet), and
// the control API's listener. Replication state is not passed: the old
// agent closes it cleanly (bitmap, activity log and queue on disk) and the
// new one reopens it, resuming the stream from the disk queue.

// handover is the manifest. Descriptors are named by their index in the
// list sent with it.
type handover struct {
	// Version of the agent that handed over.
	Version string `json:"version"`
	// Files is the number of descriptors that follow the manifest.
	Files int `json:"files"`
	// Control is the control API's listener (-1: none).
	Control int         `json:"control"`
	Jobs    []handedJob `json:"jobs"`
}

// handedJob is one job's part.
type handedJob struct {
	Name string `json:"name"`
	// Volume is the job's volume, opened exclusively (-1: it had none).
	Volume int `json:"volume"`
	// Size is the volume's served size.
	Size   int64         `json:"size"`
	Export *handedExport `json:"export,omitempty"`
}

// handedExport is a job's served export: an NBD export on a Unix socket
// (its listening socket and clients' connections), or /dev/nbdN (the
// server ends of the kernel's connections; the device stays connected).
type handedExport struct {
	Device   string       `json:"device"`   // unix:PATH or /dev/nbdN
	Listener int          `json:"listener"` // the Unix socket's listener (-1: /dev/nbdN)
	Kernel   int          `json:"kernel"`   // N of /dev/nbdN (-1: a Unix socket)
	Conns    []handedConn `json:"conns,omitempty"`
}

// handedConn is a client's connection in transmission.
type handedConn struct {
	FD      int    `json:"fd"`
	Export  string `json:"export"`
	Pending []byte `json:"pending,omitempty"`
}

// maxManifest bounds a manifest (a few hundred bytes per job and
// connection, up to 64 KiB of pending bytes per connection).
const maxManifest = 64 << 20

// maxFiles bounds the descriptors one handover passes.
const maxFiles = 1 << 16

// errManifest reports a manifest that cannot be used.
var errManifest = errors.New("invalid handover manifest")

// validate checks that every descriptor index is in range and used once.
func (h *handover) validate() error {
	if h.Files < 0 || h.Files > maxFiles {
		return fmt.Errorf("%w: %d descriptors", errManifest, h.Files)
	}
	used := make([]bool, h.Files)
	use := func(what string, i int, optional bool) error {
		if optional && i == -1 {
			return nil
		}
		if i < 0 || i >= h.Files || used[i] {
			return fmt.Errorf("%w: %s names descriptor %d of %d (or one named twice)", errManifest, what, i, h.Files)
		}
		used[i] = true
		return nil
	}
	if err := use("control listener", h.Control, true); err != nil {
		return err
	}
	var names []string
	for _, j := range h.Jobs {
		if err := job.ValidName("job", j.Name); err != nil || slices.Contains(names, j.Name) {
			return fmt.Errorf("%w: job name %q invalid or repeated", errManifest, j.Name)
		}
		names = append(names, j.Name)
		if j.Size < 0 {
			return fmt.Errorf("%w: job %s: size %d", errManifest, j.Name, j.Size)
		}
		if err := use("job "+j.Name+" volume", j.Volume, true); err != nil {
			return err
		}
		if e := j.Export; e != nil {
			if _, ok := cutUnix(e.Device); ok {
				if e.Kernel != -1 {
					return fmt.Errorf("%w: job %s: export %q with a kernel device %d", errManifest, j.Name, e.Device, e.Kernel)
				}
				if err := use("job "+j.Name+" export listener", e.Listener, false); err != nil {
					return err
				}
			} else if n, err := kernel.ParseDevice(e.Device); err != nil || n != e.Kernel || e.Listener != -1 || !strings.HasPrefix(e.Device, "/dev/") {
				return fmt.Errorf("%w: job %s: export %q is neither unix:PATH nor /dev/nbdN (kernel %d, listener %d)", errManifest, j.Name, e.Device, e.Kernel, e.Listener)
			}
			for _, c := range e.Conns {
				if err := use("job "+j.Name+" connection", c.FD, false); err != nil {
					return err
				}
			}
		}
	}
	return nil
}

func decodeHandover(b []byte) (handover, error) {
	var h handover
	if err := json.Unmarshal(b, &h); err != nil {
		return h, fmt.Errorf("%w: %v", errManifest, err)
	}
	return h, h.validate()
}

// writeFrame writes a length-prefixed JSON message.
func writeFrame(w io.Writer, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	if len(b) > maxManifest {
		return fmt.Errorf("handover message of %d bytes exceeds %d", len(b), maxManifest)
	}
	var n [4]byte
	binary.BigEndian.PutUint32(n[:], uint32(len(b)))
	_, err = w.Write(append(n[:], b...))
	return err
}

// readFrame reads a length-prefixed message's bytes.
func readFrame(r io.Reader) ([]byte, error) {
	var n [4]byte
	if _, err := io.ReadFull(r, n[:]); err != nil {
		return nil, err
	}
	l := binary.BigEndian.Uint32(n[:])
	if l > maxManifest {
		return nil, fmt.Errorf("%w: message of %d bytes", errManifest, l)
	}
	b := make([]byte, l)
	_, err := io.ReadFull(r, b)
	return b, err
}

// fdsPerMessage stays under the kernel's SCM_MAX_FD (253).
const fdsPerMessage = 200

// sendHandover sends the manifest and its descriptors on c.
func sendHandover(c *net.UnixConn, h handover, files []*os.File) error {
	h.Files = len(files)
	if err := writeFrame(c, h); err != nil {
		return fmt.Errorf("send the handover manifest: %w", err)
	}
	for len(files) > 0 {
		n := min(len(files), fdsPerMessage)
		fds := make([]int, n)
		for i, f := range files[:n] {
			// Not f.Fd(): it would put the descriptor, and with it the
			// socket this agent may still use (the listener), in
			// blocking mode.
			rc, err := f.SyscallConn()
			if err != nil {
				return fmt.Errorf("send descriptors: %w", err)
			}
			rc.Control(func(fd uintptr) { fds[i] = int(fd) })
		}
		if _, _, err := c.WriteMsgUnix([]byte{byte(n)}, unix.UnixRights(fds...), nil); err != nil {
			return fmt.Errorf("send %d descriptors: %w", n, err)
		}
		files = files[n:]
	}
	return nil
}

// recvHandover receives a manifest and its descriptors from c.
func recvHandover(c *net.UnixConn) (handover, []*os.File, error) {
	b, err := readFrame(c)
	if err != nil {
		return handover{}, nil, fmt.Errorf("read the handover manifest: %w", err)
	}
	h, err := decodeHandover(b)
	if err != nil {
		return h, nil, err
	}
	var files []*os.File
	closeAll := func() {
		for _, f := range files {
			f.Close()
		}
	}
	oob := make([]byte, unix.CmsgSpace(4*fdsPerMessage))
	for len(files) < h.Files {
		var one [1]byte
		_, oobn, _, _, err := c.ReadMsgUnix(one[:], oob)
		if err != nil {
			closeAll()
			return h, nil, fmt.Errorf("receive descriptors: %w", err)
		}
		msgs, err := unix.ParseSocketControlMessage(oob[:oobn])
		if err != nil {
			closeAll()
			return h, nil, fmt.Errorf("receive descriptors: %w", err)
		}
		got := 0
		for _, m := range msgs {
			fds, err := unix.ParseUnixRights(&m)
			if err != nil {
				continue
			}
			for _, fd := range fds {
				unix.CloseOnExec(fd)
				files = append(files, os.NewFile(uintptr(fd), "handed"))
				got++
			}
		}
		if got == 0 || got != int(one[0]) {
			closeAll()
			return h, nil, fmt.Errorf("receive descriptors: a message announced %d, carried %d", one[0], got)
		}
	}
	if len(files) != h.Files {
		closeAll()
		return h, nil, fmt.Errorf("receive descriptors: %d, the manifest names %d", len(files), h.Files)
	}
	return h, files, nil
}

// handedState is a handover ready to send or to adopt.
type handedState struct {
	h     handover
	files []*os.File
}

func (s *handedState) add(f *os.File) int {
	s.files = append(s.files, f)
	return len(s.files) - 1
}

// close closes every descriptor (once they were sent, or were not
// adopted).
func (s *handedState) close() {
	for _, f := range s.files {
		if f != nil {
			f.Close()
		}
	}
	s.files = nil
}

// job returns the handed part of job name.
func (s *handedState) job(name string) (handedJob, bool) {
	for _, j := range s.h.Jobs {
		if j.Name == name {
			return j, true
		}
	}
	return handedJob{}, false
}

// take returns descriptor i and forgets it (the caller owns it now).
func (s *handedState) take(i int) *os.File {
	if i < 0 || i >= len(s.files) {
		return nil
	}
	f := s.files[i]
	s.files[i] = nil
	return f
}

// export rebuilds a job's adopted export from its handed part.
func (s *handedState) export(e *handedExport) *adoptedExport {
	ad := &adoptedExport{device: e.Device, listener: s.take(e.Listener), kernel: e.Kernel}
	for _, c := range e.Conns {
		ad.conns = append(ad.conns, blockdev.Handed{Export: c.Export, Conn: s.take(c.FD), Pending: c.Pending})
	}
	return ad
}
