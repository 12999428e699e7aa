package agent

import (
	"bufio"
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/doppelha/doppel/daemon/repl"
	"github.com/doppelha/doppel/ebpf/heartbeat"
)

// DefaultWitnessPort is the witness's query port (TCP).
const DefaultWitnessPort = 6327

// A witness is a third host that both agents of a job send their
// heartbeats to (doppel witness, in the seed's lab the client). When a
// target's detector declares its source down, the target asks the witness
// how long ago it last heard that source: an automatic failover goes ahead
// only when the witness lost it too (silent for interval × missed, or
// never heard). A target cut off from its source but not from the clients'
// side — the source still serving — therefore stays put, and so does a
// target that cannot reach the witness (it may be the isolated one).
//
// Trust: the witness is a plain service on a trusted network. It parses
// heartbeats without verifying them (it has no job keys): it answers for
// any sender of a well-formed heartbeat naming the job, and queries and
// answers are not authenticated:
// someone who can forge a "lost" answer can cause the split brain the
// witness exists to prevent, one who forges "heard" only blocks automatic
// failover.
//
// Query (one line, one per connection):
//
//	DOPPEL-WITNESS 1 <job id: 32 hex> <token: 16 hex, ignored> <addr>[,<addr>...]
//
// Reply: "HEARD <ms since the newest heartbeat from any addr>" or "NEVER",
// or "ERR <text>".

const witnessProto = "DOPPEL-WITNESS 1"

// maxWitnessLine bounds a query or reply.
const maxWitnessLine = 512

// heartbeatJobID is the job ID heartbeats carry.
func heartbeatJobID(job string) [16]byte { return heartbeat.JobIDOf(job) }

type witnessQuery struct {
	Job   [16]byte
	Token uint64
	Addrs []netip.Addr
}

func (q witnessQuery) String() string {
	as := make([]string, len(q.Addrs))
	for i, a := range q.Addrs {
		as[i] = a.String()
	}
	return fmt.Sprintf("%s %s %016x %s\n", witnessProto, hex.EncodeToString(q.Job[:]), q.Token, strings.Join(as, ","))
}

// errWitness reports a malformed witness query or reply.
var errWitness = errors.New("witness protocol")

func parseWitnessQuery(line string) (witnessQuery, error) {
	var q witnessQuery
	rest, ok := strings.CutPrefix(strings.TrimSuffix(line, "\n"), witnessProto+" ")
	if !ok {
		return q, fmt.Errorf("%w: not a %q query", errWitness, witnessProto)
	}
	f := strings.Split(rest, " ")
	if len(f) != 3 {
		return q, fmt.Errorf("%w: want job, token and addresses", errWitness)
	}
	id, err := hex.DecodeString(f[0])
	if err != nil || len(id) != 16 {
		return q, fmt.Errorf("%w: job id %q", errWitness, f[0])
	}
	q.Job = [16]byte(id)
	if len(f[1]) != 16 {
		return q, fmt.Errorf("%w: token %q", errWitness, f[1])
	}
	if q.Token, err = strconv.ParseUint(f[1], 16, 64); err != nil {
		return q, fmt.Errorf("%w: token %q", errWitness, f[1])
	}
	for _, s := range strings.Split(f[2], ",") {
		a, err := netip.ParseAddr(s)
		if err != nil || a.Zone() != "" {
			return q, fmt.Errorf("%w: address %q", errWitness, s)
		}
		q.Addrs = append(q.Addrs, a.Unmap())
		if len(q.Addrs) > 8 {
			return q, fmt.Errorf("%w: more than 8 addresses", errWitness)
		}
	}
	return q, nil
}

// parseWitnessReply returns how long ago the witness last heard the
// source; heard is false when it never did.
func parseWitnessReply(line string) (silence time.Duration, heard bool, err error) {
	line = strings.TrimSuffix(line, "\n")
	switch {
	case line == "NEVER":
		return 0, false, nil
	case strings.HasPrefix(line, "HEARD "):
		ms, err := strconv.ParseUint(line[len("HEARD "):], 10, 32)
		if err != nil {
			return 0, false, fmt.Errorf("%w: reply %q", errWitness, line)
		}
		return time.Duration(ms) * time.Millisecond, true, nil
	case strings.HasPrefix(line, "ERR "):
		return 0, false, fmt.Errorf("witness: %s", line[len("ERR "):])
	}
	return 0, false, fmt.Errorf("%w: reply %q", errWitness, line)
}

type witnessKey struct {
	job  [16]byte
	from netip.Addr
}

// Witness is the witness service: it records heartbeats and answers
// queries.
type Witness struct {
	Log *slog.Logger

	mu   sync.Mutex
	seen map[witnessKey]time.Duration // CLOCK_MONOTONIC arrival of the newest heartbeat
}

// maxWitnessEntries bounds the witness's memory (a flood of forged
// heartbeats evicts the oldest entries).
const maxWitnessEntries = 4096

func (w *Witness) record(k witnessKey, at time.Duration) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.seen == nil {
		w.seen = map[witnessKey]time.Duration{}
	}
	if _, ok := w.seen[k]; !ok && len(w.seen) >= maxWitnessEntries {
		var oldest witnessKey
		first := true
		for k2, t := range w.seen {
			if first || t < w.seen[oldest] {
				oldest, first = k2, false
			}
		}
		delete(w.seen, oldest)
	}
	w.seen[k] = at
}

// answer replies to q as of now.
func (w *Witness) answer(q witnessQuery, now time.Duration) string {
	w.mu.Lock()
	defer w.mu.Unlock()
	var newest time.Duration
	heard := false
	for _, a := range q.Addrs {
		if t, ok := w.seen[witnessKey{q.Job, a}]; ok && (!heard || t > newest) {
			newest, heard = t, true
		}
	}
	if !heard {
		return "NEVER\n"
	}
	return fmt.Sprintf("HEARD %d\n", max(now-newest, 0).Milliseconds())
}

// ServeHeartbeats records the heartbeats arriving on c until ctx is done.
func (w *Witness) ServeHeartbeats(ctx context.Context, c net.PacketConn) error {
	stop := context.AfterFunc(ctx, func() { c.Close() })
	defer stop()
	buf := make([]byte, 256)
	for {
		n, from, err := c.ReadFrom(buf)
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return err
		}
		at := heartbeat.Now()
		var hb heartbeat.Packet
		if hb.UnmarshalBinary(buf[:n]) != nil {
			continue
		}
		ua, ok := from.(*net.UDPAddr)
		if !ok {
			continue
		}
		a, ok := netip.AddrFromSlice(ua.IP)
		if !ok {
			continue
		}
		w.record(witnessKey{hb.Job, a.Unmap()}, at)
	}
}

// ServeQueries answers queries on l until ctx is done.
func (w *Witness) ServeQueries(ctx context.Context, l net.Listener) error {
	return repl.ServeConns(ctx, l, w.Log, func(_ context.Context, c net.Conn) error {
		defer c.Close()
		c.SetDeadline(time.Now().Add(2 * time.Second))
		line, err := bufio.NewReader(io.LimitReader(c, maxWitnessLine)).ReadString('\n')
		if err != nil {
			return nil
		}
		q, err := parseWitnessQuery(line)
		if err != nil {
			io.WriteString(c, "ERR "+strings.ReplaceAll(err.Error(), "\n", " ")+"\n")
			return nil
		}
		io.WriteString(c, w.answer(q, heartbeat.Now()))
		return nil
	})
}

// askWitness asks the witness at addr how long ago it last heard the
// source at addrs.
func askWitness(ctx context.Context, addr string, q witnessQuery) (silence time.Duration, heard bool, err error) {
	ctx, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	var d net.Dialer
	c, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return 0, false, fmt.Errorf("witness %s: %w", addr, err)
	}
	defer c.Close()
	if dl, ok := ctx.Deadline(); ok {
		c.SetDeadline(dl)
	}
	if _, err := io.WriteString(c, q.String()); err != nil {
		return 0, false, fmt.Errorf("witness %s: %w", addr, err)
	}
	line, err := bufio.NewReader(io.LimitReader(c, maxWitnessLine)).ReadString('\n')
	if err != nil {
		return 0, false, fmt.Errorf("witness %s: %w", addr, err)
	}
	return parseWitnessReply(line)
}
