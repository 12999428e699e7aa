package bench

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// Link is two network namespaces joined by a veth pair, made for one
// benchmark run and deleted by Close.
type Link struct {
	Src, Tgt     string // namespace names
	SrcIP, TgtIP string // addresses on the veth ends
}

// NewLink creates namespaces "<prefix>s-<rand>" and "<prefix>t-<rand>" with
// a veth pair between them, addressed srcIP/24 and tgtIP/24, loopback up.
// On error, whatever was created is removed.
func NewLink(prefix, srcIP, tgtIP string) (l *Link, err error) {
	var rnd [3]byte
	_, _ = rand.Read(rnd[:])
	suffix := hex.EncodeToString(rnd[:])
	l = &Link{Src: prefix + "s-" + suffix, Tgt: prefix + "t-" + suffix, SrcIP: srcIP, TgtIP: tgtIP}
	vs, vt := "vs"+suffix, "vt"+suffix
	defer func() {
		if err != nil {
			l.Close()
		}
	}()
	for _, argv := range [][]string{
		{"ip", "netns", "add", l.Src},
		{"ip", "netns", "add", l.Tgt},
		{"ip", "link", "add", vs, "type", "veth", "peer", "name", vt},
		{"ip", "link", "set", vs, "netns", l.Src},
		{"ip", "link", "set", vt, "netns", l.Tgt},
		{"ip", "-n", l.Src, "addr", "add", srcIP + "/24", "dev", vs},
		{"ip", "-n", l.Tgt, "addr", "add", tgtIP + "/24", "dev", vt},
		{"ip", "-n", l.Src, "link", "set", "lo", "up"},
		{"ip", "-n", l.Tgt, "link", "set", "lo", "up"},
		{"ip", "-n", l.Src, "link", "set", vs, "up"},
		{"ip", "-n", l.Tgt, "link", "set", vt, "up"},
	} {
		if out, err := exec.Command(argv[0], argv[1:]...).CombinedOutput(); err != nil {
			return nil, fmt.Errorf("create link: %s: %w: %s", strings.Join(argv, " "), err, strings.TrimSpace(string(out)))
		}
	}
	return l, nil
}

// Close deletes both namespaces (and with them the veth pair).
func (l *Link) Close() error {
	var errs []error
	for _, ns := range []string{l.Src, l.Tgt} {
		if _, err := os.Stat("/var/run/netns/" + ns); err != nil {
			continue
		}
		if out, err := exec.Command("ip", "netns", "del", ns).CombinedOutput(); err != nil {
			errs = append(errs, fmt.Errorf("delete netns %s: %w: %s", ns, err, strings.TrimSpace(string(out))))
		}
	}
	return errors.Join(errs...)
}

// In returns argv run inside namespace ns.
func In(ns string, argv ...string) []string {
	return append([]string{"ip", "netns", "exec", ns}, argv...)
}

var rttRE = regexp.MustCompile(`= [0-9.]+/([0-9.]+)/`)

// PingRTT returns the mean round-trip time of count pings from the source
// namespace to the target address.
func (l *Link) PingRTT(count int) (time.Duration, error) {
	out, err := exec.Command("ip", "netns", "exec", l.Src, "ping", "-n", "-q", "-c", strconv.Itoa(count), "-i", "0.01", l.TgtIP).CombinedOutput()
	if err != nil {
		return 0, fmt.Errorf("ping: %w: %s", err, strings.TrimSpace(string(out)))
	}
	m := rttRE.FindSubmatch(out)
	if m == nil {
		return 0, fmt.Errorf("ping: no rtt in %q", out)
	}
	ms, err := strconv.ParseFloat(string(m[1]), 64)
	if err != nil {
		return 0, err
	}
	return time.Duration(ms * float64(time.Millisecond)), nil
}

// DialIn connects to addr from inside network namespace ns: the socket is
// created on a locked OS thread switched into ns, then the thread returns
// to its own namespace.
func DialIn(ctx context.Context, ns, network, addr string) (net.Conn, error) {
	type result struct {
		c   net.Conn
		err error
	}
	ch := make(chan result, 1)
	go func() {
		// The thread is not unlocked on failure to switch back: it then
		// exits with the goroutine instead of serving others in ns.
		runtime.LockOSThread()
		c, err, back := dialInLocked(ctx, ns, network, addr)
		if back {
			runtime.UnlockOSThread()
		}
		ch <- result{c, err}
	}()
	r := <-ch
	return r.c, r.err
}

func dialInLocked(ctx context.Context, ns, network, addr string) (c net.Conn, err error, back bool) {
	self, err := os.Open(fmt.Sprintf("/proc/self/task/%d/ns/net", unix.Gettid()))
	if err != nil {
		return nil, err, true
	}
	defer self.Close()
	target, err := os.Open("/var/run/netns/" + ns)
	if err != nil {
		return nil, err, true
	}
	defer target.Close()
	if err := unix.Setns(int(target.Fd()), unix.CLONE_NEWNET); err != nil {
		return nil, fmt.Errorf("setns %s: %w", ns, err), true
	}
	var d net.Dialer
	c, err = d.DialContext(ctx, network, addr)
	if serr := unix.Setns(int(self.Fd()), unix.CLONE_NEWNET); serr != nil {
		if c != nil {
			c.Close()
		}
		return nil, fmt.Errorf("setns back: %w", serr), false
	}
	return c, err, true
}

// HTTPClientIn returns an HTTP client whose connections are made inside
// network namespace ns.
func HTTPClientIn(ns string) *http.Client {
	return &http.Client{
		Timeout: 5 * time.Second,
		Transport: &http.Transport{
			DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
				return DialIn(ctx, ns, network, addr)
			},
			DisableKeepAlives: true,
		},
	}
}
