package agent

import (
	"context"
	"net"
	"net/netip"
	"time"
)

// livenessWatch is what the job's Liveness watches: per monitored path,
// this host's address (heartbeats leave from it) and the peer's; the
// replication path also counts the replication session's frames.
func (r *runner) livenessWatch() LivenessWatch {
	spec := r.rec.Spec
	me, peer, _ := spec.Endpoints(r.rec.Self)
	locals := map[string]netip.Addr{"repl": hostAddr(me.Repl), "app": hostAddr(me.Control)}
	w := LivenessWatch{
		Job: spec.Name, Self: me.Name, Peer: peer.Name, Secret: spec.Secret,
		Paths: map[string]PathAddrs{}, Interval: spec.Monitor.Interval, Epoch: r.rec.HA.Epoch,
	}
	for name, a := range r.paths {
		w.Paths[name] = PathAddrs{Local: locals[name], Peer: a, Session: name == "repl"}
	}
	return w
}

// hostAddr is the address of a HOST:PORT endpoint, resolving a name;
// invalid when it is unspecified or cannot be resolved (the route then
// chooses the heartbeats' source address).
func hostAddr(hp string) netip.Addr {
	host, _, err := net.SplitHostPort(hp)
	if err != nil {
		return netip.Addr{}
	}
	if a, err := netip.ParseAddr(host); err == nil {
		if a.IsUnspecified() {
			return netip.Addr{}
		}
		return a.Unmap()
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	ips, err := net.DefaultResolver.LookupNetIP(ctx, "ip", host)
	if err != nil || len(ips) == 0 {
		return netip.Addr{}
	}
	return ips[0].Unmap()
}

// announceEpoch makes the job's heartbeats carry the state machine's
// current epoch (the fencing token the peer reads in its samples). Called
// with mu held, after every step.
func (r *runner) announceEpoch() {
	if r.subs.Liveness != nil {
		r.subs.Liveness.SetEpoch(r.rec.Spec.Name, r.node.Status().Epoch)
	}
}
