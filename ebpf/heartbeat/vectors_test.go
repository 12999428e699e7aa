package heartbeat

import (
	"fmt"
	"net/netip"
	"sort"
	"strings"
	"testing"
	"time"
)

// Shared test vectors: sequences of heartbeats and the counters they must
// leave, run through the XDP program (TestXDPVectors, crafted frames
// through Program.Run) and through the userspace fallback's receive path
// (TestUserspaceVectors), so that both verify and count identically.
//
// The receiving host is "vm2"; it watches job "web" from peer4 and peer6
// and job "db" from peer4, each with vm1's sending key for that job.

const vecSecret = "job secret"

var (
	peer4  = netip.MustParseAddr("192.0.2.1")
	peer6  = netip.MustParseAddr("2001:db8::1")
	local4 = netip.MustParseAddr("192.0.2.2")
	local6 = netip.MustParseAddr("2001:db8::2")
	other4 = netip.MustParseAddr("192.0.2.99")
)

// vecHB is one heartbeat of a vector.
type vecHB struct {
	src             netip.Addr
	job             string // the job named in the heartbeat
	keyJob, signer  string // whose key signs it (default: job, "vm1")
	inc, seq, epoch uint64
	corrupt         func(b []byte) // changes the encoded heartbeat after signing
}

func (h vecHB) bytes(t testing.TB) []byte {
	kj, signer := h.keyJob, h.signer
	if kj == "" {
		kj = h.job
	}
	if signer == "" {
		signer = "vm1"
	}
	p := Packet{Job: JobIDOf(h.job), Incarnation: h.inc, Seq: h.seq, Epoch: h.epoch}
	p.Sign(testKey(t, vecSecret, kj, signer))
	b, _ := p.MarshalBinary()
	if h.corrupt != nil {
		h.corrupt(b)
	}
	return b
}

func hb(src netip.Addr, job string, inc, seq, epoch uint64) vecHB {
	return vecHB{src: src, job: job, inc: inc, seq: seq, epoch: epoch}
}

// vecWatched are the entries every vector starts with.
func vecWatched(t testing.TB) map[Peer]Key {
	return map[Peer]Key{
		{peer4, JobIDOf("web")}: testKey(t, vecSecret, "web", "vm1"),
		{peer6, JobIDOf("web")}: testKey(t, vecSecret, "web", "vm1"),
		{peer4, JobIDOf("db")}:  testKey(t, vecSecret, "db", "vm1"),
	}
}

type vector struct {
	name string
	hbs  []vecHB
	want map[string]Stats // by "addr/job"; entries not listed stay zero
}

var vectors = []vector{
	{"ipv4", []vecHB{hb(peer4, "web", 100, 1, 3)},
		map[string]Stats{"192.0.2.1/web": {Heartbeats: 1, Incarnation: 100, Seq: 1, Epoch: 3}}},
	{"ipv6", []vecHB{hb(peer6, "web", 100, 9, 0)},
		map[string]Stats{"2001:db8::1/web": {Heartbeats: 1, Incarnation: 100, Seq: 9}}},
	{"bad MAC", []vecHB{{src: peer4, job: "web", inc: 100, seq: 1, corrupt: func(b []byte) { b[Len-1] ^= 1 }}},
		map[string]Stats{"192.0.2.1/web": {BadMAC: 1}}},
	{"field changed after signing", []vecHB{{src: peer4, job: "web", inc: 100, seq: 1, corrupt: func(b []byte) { b[39]++ }}},
		map[string]Stats{"192.0.2.1/web": {BadMAC: 1}}},
	{"replayed", []vecHB{hb(peer4, "web", 100, 1, 3), hb(peer4, "web", 100, 1, 3), hb(peer4, "web", 100, 2, 3), hb(peer4, "web", 100, 1, 3)},
		map[string]Stats{"192.0.2.1/web": {Heartbeats: 2, Incarnation: 100, Seq: 2, Epoch: 3, Replays: 2}}},
	{"new incarnation restarts the sequence", []vecHB{hb(peer4, "web", 100, 50, 3), hb(peer4, "web", 101, 1, 4), hb(peer4, "web", 101, 2, 4)},
		map[string]Stats{"192.0.2.1/web": {Heartbeats: 3, Incarnation: 101, Seq: 2, Epoch: 4}}},
	{"older incarnation is a replay", []vecHB{hb(peer4, "web", 101, 1, 4), hb(peer4, "web", 100, 99, 3)},
		map[string]Stats{"192.0.2.1/web": {Heartbeats: 1, Incarnation: 101, Seq: 1, Epoch: 4, Replays: 1}}},
	{"gaps and reordering", []vecHB{hb(peer4, "web", 7, 1, 0), hb(peer4, "web", 7, 2, 0), hb(peer4, "web", 7, 5, 0), hb(peer4, "web", 7, 3, 0), hb(peer4, "web", 7, 6, 0)},
		map[string]Stats{"192.0.2.1/web": {Heartbeats: 4, Incarnation: 7, Seq: 6, Gaps: 2, Replays: 1}}},
	{"first heartbeat sets the base", []vecHB{hb(peer4, "web", 7, 100, 0), hb(peer4, "web", 7, 101, 0)},
		map[string]Stats{"192.0.2.1/web": {Heartbeats: 2, Incarnation: 7, Seq: 101}}},
	{"other job's key", []vecHB{{src: peer4, job: "web", keyJob: "db", inc: 100, seq: 1}},
		map[string]Stats{"192.0.2.1/web": {BadMAC: 1}}},
	{"wrong direction key (reflected)", []vecHB{{src: peer4, job: "web", signer: "vm2", inc: 100, seq: 1}},
		map[string]Stats{"192.0.2.1/web": {BadMAC: 1}}},
	{"two jobs from one peer counted apart", []vecHB{hb(peer4, "web", 100, 1, 3), hb(peer4, "db", 200, 5, 9), hb(peer4, "db", 200, 6, 9)},
		map[string]Stats{"192.0.2.1/web": {Heartbeats: 1, Incarnation: 100, Seq: 1, Epoch: 3}, "192.0.2.1/db": {Heartbeats: 2, Incarnation: 200, Seq: 6, Epoch: 9}}},
	{"epoch of the newest", []vecHB{hb(peer4, "web", 100, 1, 3), hb(peer4, "web", 100, 2, 4), hb(peer4, "web", 100, 1, 9)},
		map[string]Stats{"192.0.2.1/web": {Heartbeats: 2, Incarnation: 100, Seq: 2, Epoch: 4, Replays: 1}}},
	{"unwatched job", []vecHB{hb(peer4, "mail", 100, 1, 3), {src: peer4, job: "mail", keyJob: "web", inc: 100, seq: 2}}, nil},
	{"unknown sender", []vecHB{hb(other4, "web", 100, 1, 3), hb(netip.MustParseAddr("2001:db8::99"), "web", 100, 1, 3)}, nil},
	{"version 1", []vecHB{{src: peer4, job: "web", inc: 100, seq: 1, corrupt: func(b []byte) { b[4] = 1 }}}, nil},
	{"flags", []vecHB{{src: peer4, job: "web", inc: 100, seq: 1, corrupt: func(b []byte) { b[5] = 1 }}}, nil},
	{"bad magic", []vecHB{{src: peer4, job: "web", inc: 100, seq: 1, corrupt: func(b []byte) { b[0] = 'X' }}}, nil},
}

// statsKey names an entry "addr/job" for the vectors.
func statsKey(p Peer) string {
	for _, j := range []string{"web", "db", "mail"} {
		if p.Job == JobIDOf(j) {
			return p.Addr.Unmap().String() + "/" + j
		}
	}
	return fmt.Sprintf("%s/%x", p.Addr.Unmap(), p.Job)
}

// checkVector compares the entries' stats (LastSeen checked against the
// run window and then cleared) with v.want.
func checkVector(t *testing.T, v vector, got map[Peer]Stats, before, after time.Duration) {
	t.Helper()
	norm := map[string]Stats{}
	for p, s := range got {
		if (s.LastSeen != 0) != (s.Heartbeats != 0) {
			t.Errorf("%s: arrival time and count disagree: %+v", statsKey(p), s)
		}
		if s.LastSeen != 0 && (s.LastSeen < before || s.LastSeen > after) {
			t.Errorf("%s: last seen %v outside the run window [%v, %v]", statsKey(p), s.LastSeen, before, after)
		}
		s.LastSeen = 0
		if s != (Stats{}) {
			norm[statsKey(p)] = s
		}
	}
	if show(norm) != show(v.want) {
		t.Errorf("%s:\n got %s\nwant %s", v.name, show(norm), show(v.want))
	}
}

func show(m map[string]Stats) string {
	var out []string
	for k, s := range m {
		out = append(out, fmt.Sprintf("%s:%+v", k, s))
	}
	sort.Strings(out)
	return strings.Join(out, " ")
}

// TestUserspaceVectors runs the vectors through the fallback's receive
// path (what it does with each datagram its socket reads).
func TestUserspaceVectors(t *testing.T) {
	for _, v := range vectors {
		t.Run(v.name, func(t *testing.T) {
			p := &userspaceProbe{peers: map[Peer]*userspacePeer{}}
			for pr, k := range vecWatched(t) {
				p.peers[pr] = &userspacePeer{key: k}
			}
			before := Now()
			for _, h := range v.hbs {
				p.receiveLocked(h.src, h.bytes(t), Now())
			}
			after := Now()
			got := map[Peer]Stats{}
			for pr, e := range p.peers {
				got[pr] = e.stats
			}
			checkVector(t, v, got, before, after)
		})
	}
}
