#!/bin/bash
# doppel demo: the two-VM lab in network namespaces on one machine.
#
#   vm1 (source)  eth0 172.17.22.11  eth1 192.168.0.11  ┐
#   vm2 (target)  eth0 172.17.22.12  eth1 192.168.0.12  ├ bridges: application 172.17.22.0/24,
#   client        eth0 172.17.22.100                    │          replication 192.168.0.0/24
#   etcd          eth0 172.17.22.201-203 (3 members)     ┘ the arbiter
#   service IP    172.17.22.187 (a tiny HTTP service with files on ext4 on the protected volume)
#
# Steps: a 3-member etcd cluster (the arbiter), agents on vm1 and vm2, servers
# added from the client, job created (--arbiter etcd),
# ext4 on the volume (nbdfuse + loop: this kernel may have no nbd module),
# files written, service started; vm1 force-stopped (agent killed, links
# down); automatic failover: vm2 takes the IP, mounts the volume, serves the
# same files; vm1 returns fenced; reverse; failback to vm1.
#
# Usage: test/demo/demo.sh [path/to/doppel]   (root; every name carries a
# random suffix; everything is removed on exit, even on failure)
# Exits non-zero when a check fails. DEMO_FAST=1 shortens the pauses;
# DEMO_HOLD=1 keeps the lab (and the web console, whose URL and password
# step 4 prints) up at the end until Enter is pressed.
set -euo pipefail

DOPPEL=$(realpath "${1:-bin/doppel}")
[ "$(id -u)" = 0 ] || { echo "demo: needs root (network namespaces, loop devices, FUSE)"; exit 1; }
[ -x "$DOPPEL" ] || { echo "demo: no doppel binary at $DOPPEL (make build)"; exit 1; }
for t in ip nsenter nbdfuse losetup mkfs.ext4 busybox curl sha256sum etcd systemd-socket-activate ss; do
	command -v $t >/dev/null || { echo "demo: missing $t (make deps)"; exit 1; }
done

S=$(head -c 3 /dev/urandom | od -An -tx1 | tr -d ' \n')
D=$(mktemp -d /tmp/doppel-demo-$S.XXXX)
NS1=vm1-$S NS2=vm2-$S NSC=client-$S NSE=etcd-$S
BRA=dpa$S BRR=dpr$S
SVC=172.17.22.187
export DOPPEL_CONFIG=$D/cli.json
PIDS=()

bold() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
say() { printf '   %s\n' "$*"; }
fail() {
	printf '\033[31mFAIL: %s\033[0m\n' "$*"
	for ns in $NS1 $NS2 $NSC; do echo "-- $ns"; ip -n $ns -br addr; ip -n $ns neigh; ip netns exec $ns ss -ltn; done 2>&1 | sed 's/^/   /'
	ls -la $D/vm1/fs $D/vm2/fs 2>&1 | sed 's/^/   /'
	cmp $D/vm1.img $D/vm2.img 2>&1 | sed 's/^/   /'
	exit 1
}
pause() { [ -n "${DEMO_FAST:-}" ] || sleep "${1:-1}"; }
cli() { ip netns exec $NSC "$DOPPEL" "$@"; }
# job status exits 0 protected, 1 degraded, 2 not protected / failed over,
# 3 unreachable: the demo shows every state, so only >3 is an error.
jstatus() { local rc=0; cli job status web "$@" || rc=$?; [ $rc -le 3 ]; }
status() { jstatus | sed 's/^/   /'; }
state_of() { # server field: role or state as that agent sees the job
	jstatus --json | busybox awk -v s="$1" -v f="$2" '
		/"server":/ { cur = ($2 ~ "\"" s "\"") }
		cur && $1 == "\"" f "\":" && !done { gsub(/[",]/, "", $2); print $2; done = 1 }'
}
wait_for() { # desc seconds cmd...
	local desc=$1 secs=$2; shift 2
	local end=$((SECONDS + secs))
	until "$@" >/dev/null 2>&1; do
		[ $SECONDS -lt $end ] || fail "timed out after ${secs}s waiting for $desc"
		sleep 0.2
	done
}
is_state() { [ "$(state_of "$1" state)" = "$2" ]; }
has_ip() { [[ "$(ip -n $1 addr show eth0)" == *"$SVC/"* ]]; } # (no grep -q under pipefail)

cleanup() {
	local rc=$?
	set +e
	if [ $rc != 0 ]; then
		mkdir -p /tmp/doppel-demo-logs
		for h in vm1 vm2; do cp $D/$h/agent.log /tmp/doppel-demo-logs/$h-agent.log 2>/dev/null; cp $D/$h/hook.log /tmp/doppel-demo-logs/$h-hook.log 2>/dev/null; done
		for i in 1 2 3; do cp $D/etcd/$i.log /tmp/doppel-demo-logs/etcd-$i.log 2>/dev/null; done
		cp $D/console.log /tmp/doppel-demo-logs/console.log 2>/dev/null
		for h in vm1 vm2; do cli job events web --server $h --last 0 >/tmp/doppel-demo-logs/$h-events.txt 2>&1; done
		echo "demo: failed; agent and hook logs in /tmp/doppel-demo-logs"
	fi
	for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null; done
	for h in vm1 vm2; do
		[ -f $D/$h/httpd.pid ] && kill -9 "$(cat $D/$h/httpd.pid)" 2>/dev/null
		umount -l $D/$h/fs 2>/dev/null
		[ -f $D/$h/loop ] && losetup -d "$(cat $D/$h/loop)" 2>/dev/null
		[ -f $D/$h/nbdfuse.pid ] && kill "$(cat $D/$h/nbdfuse.pid)" 2>/dev/null
		fusermount3 -u -z $D/$h/fuse 2>/dev/null
	done
	sleep 0.3
	for ns in $NS1 $NS2 $NSC $NSE; do ip netns del $ns 2>/dev/null; done
	ip link del $BRA 2>/dev/null; ip link del $BRR 2>/dev/null
	rm -rf "$D"
}
trap cleanup EXIT

bold "1. The lab: vm1, vm2 and a client on two networks (application 172.17.22.0/24, replication 192.168.0.0/24)"
for br in $BRA $BRR; do ip link add $br type bridge; ip link set $br up; done
veth() { # ns ifname bridge addr
	local peer=v$S$RANDOM
	peer=${peer:0:15}
	ip link add $peer type veth peer name tmp$S
	ip link set tmp$S netns $1
	ip -n $1 link set tmp$S name $2
	ip link set $peer master $3 up
	ip -n $1 addr add $4 dev $2
	ip -n $1 link set $2 up
}
for ns in $NS1 $NS2 $NSC $NSE; do ip netns add $ns; ip -n $ns link set lo up; done
veth $NS1 eth0 $BRA 172.17.22.11/24; veth $NS1 eth1 $BRR 192.168.0.11/24
veth $NS2 eth0 $BRA 172.17.22.12/24; veth $NS2 eth1 $BRR 192.168.0.12/24
veth $NSC eth0 $BRA 172.17.22.100/24
veth $NSE eth0 $BRA 172.17.22.201/24
ip -n $NSE addr add 172.17.22.202/24 dev eth0; ip -n $NSE addr add 172.17.22.203/24 dev eth0
say "namespaces $NS1 $NS2 $NSC $NSE, bridges $BRA (application) $BRR (replication), work dir $D"

bold "2. The arbiter: a 3-member etcd cluster (the etcd Patroni and Kubernetes users already run)"
mkdir -p $D/etcd
CLUSTER=e1=http://172.17.22.201:2380,e2=http://172.17.22.202:2380,e3=http://172.17.22.203:2380
ENDPOINTS=http://172.17.22.201:2379,http://172.17.22.202:2379,http://172.17.22.203:2379
for i in 1 2 3; do
	ip=172.17.22.20$i
	ip netns exec $NSE etcd --name e$i --data-dir $D/etcd/e$i --log-level error \
		--listen-client-urls http://$ip:2379 --advertise-client-urls http://$ip:2379 \
		--listen-peer-urls http://$ip:2380 --initial-advertise-peer-urls http://$ip:2380 \
		--initial-cluster $CLUSTER --initial-cluster-state new --initial-cluster-token demo-$S >>$D/etcd/$i.log 2>&1 &
	PIDS+=($!)
	disown $!
done
etcd_up() { ip netns exec $NSC env ETCDCTL_API=3 etcdctl --endpoints $ENDPOINTS --dial-timeout 1s endpoint health >/dev/null 2>&1; }
if command -v etcdctl >/dev/null; then wait_for "etcd cluster healthy" 30 etcd_up; else sleep 3; fi
say "etcd members e1 e2 e3 on 172.17.22.201-203 (endpoints $ENDPOINTS)"

bold "3. Install the agents (doppel agent) on vm1 and vm2, each pointed at the arbiter"
mkdir -p $D/vm1 $D/vm2
start_agent() { # host ns app-ip repl-ip
	# As the README starts it: no --probe-iface, the probe attaches to the
	# interface of the route to each peer address (both paths here).
	ip netns exec $2 "$DOPPEL" agent --state-dir $D/$1/state \
		--control-listen $3:6320 --repl-listen $4:6325 --arbiter-endpoints $ENDPOINTS >>$D/$1/agent.log 2>&1 &
	echo $! >$D/$1/agent.pid
	PIDS+=($!)
	disown $! # killed on purpose later: no "Killed" job report from bash
}
start_agent vm1 $NS1 172.17.22.11 192.168.0.11
start_agent vm2 $NS2 172.17.22.12 192.168.0.12
wait_for "agent on vm1" 10 test -f $D/vm1/state/token
wait_for "agent on vm2" 10 test -f $D/vm2/state/token
wait_for "agents ready" 10 grep -q "agent ready" $D/vm1/agent.log $D/vm2/agent.log
sleep 0.5
say "each agent created its certificate and an API token (mode $(stat -c %a $D/vm1/state/token))"

bold "4. From the console (client namespace): add the servers, pinning their certificates"
fp() { grep -o 'fingerprint=sha256:[0-9a-f]*' $D/$1/agent.log | head -1 | cut -d= -f2; }
cli server add vm1 172.17.22.11 --token-file $D/vm1/state/token --fingerprint "$(fp vm1)" | sed 's/^/   /'
cli server add vm2 172.17.22.12 --token-file $D/vm2/state/token --fingerprint "$(fp vm2)" | sed 's/^/   /'
cli server list | sed 's/^/   /'
say "a wrong token is refused:"
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >$D/bad.token
if cli job list --server vm1 --token-file $D/bad.token >$D/out 2>&1; then fail "wrong token accepted"; fi
say "  $(cat $D/out)"
# The web console: doppel console runs in the client namespace, next to the
# CLI's server list, and serves a listener made in this (the host's)
# namespace by systemd-socket-activate, so a browser here (or through ssh
# -L) reaches it; it starts at the first connection.
CPORT=${DEMO_CONSOLE_PORT:-6330}
for _ in $(seq 50); do [ -z "$(ss -Hltn "sport = :$CPORT")" ] && break; CPORT=$((CPORT + 1)); done
head -c 9 /dev/urandom | od -An -tx1 | tr -d ' \n' >$D/console.pw
systemd-socket-activate -l 127.0.0.1:$CPORT ip netns exec $NSC env DOPPEL_CONFIG=$DOPPEL_CONFIG \
	"$DOPPEL" console --state-dir $D/console --init-password $D/console.pw </dev/null >>$D/console.log 2>&1 &
PIDS+=($!)
disown $!
console_up() { curl -sk -m 2 -o /dev/null -w '%{http_code}' https://127.0.0.1:$CPORT/login | grep -q 200; }
wait_for "the web console" 15 console_up
say "web console (doppel console): https://127.0.0.1:$CPORT/  (from another machine: ssh -L $CPORT:127.0.0.1:$CPORT THIS-HOST)"
say "  log in with the console password $(cat $D/console.pw) or vm1's API token $(cat $D/vm1/state/token) ($D/vm1/state/token)"
say "  its certificate: $(grep -o 'sha256:[0-9a-f]*' $D/console.log | head -1)"

bold "5. Create the protection job: vm1's volume replicated to vm2, service IP $SVC, automatic failover through the arbiter"
truncate -s 256M $D/vm1.img $D/vm2.img
cat >$D/hook.sh <<EOF
#!/bin/bash
# Hook script: DOPPEL_EVENT, DOPPEL_HOST, DOPPEL_DEVICE (unix:SOCKET) ...
exec >>$D/\$DOPPEL_HOST/hook.log 2>&1
echo "\$(date +%T.%N) \$DOPPEL_EVENT host=\$DOPPEL_HOST role=\$DOPPEL_ROLE device=\$DOPPEL_DEVICE epoch=\$DOPPEL_EPOCH ips=\$DOPPEL_SERVICE_IPS"
H=$D/\$DOPPEL_HOST
case \$DOPPEL_EVENT in
post-failover|post-failback)
	# Mount the volume and start the service on the service IP.
	# (ip netns exec gave the agent a private mount namespace, a slave of
	# the host's: mount in the demo's (the host's) so that everyone sees it.)
	nsenter -t $$ -m -- $D/mount.sh \$DOPPEL_HOST "\${DOPPEL_DEVICE#unix:}" && nsenter -t $$ -m -- $D/service.sh \$DOPPEL_HOST ;;
pre-failback)
	# Stop the service and unmount before the volume moves.
	set -e
	if [ -f \$H/httpd.pid ]; then
		p=\$(cat \$H/httpd.pid); kill \$p
		while kill -0 \$p 2>/dev/null; do sleep 0.05; done
		rm -f \$H/httpd.pid
	fi
	nsenter -t $$ -m -- umount \$H/fs; losetup -d \$(cat \$H/loop); rm -f \$H/loop
	p=\$(cat \$H/nbdfuse.pid); kill \$p
	while kill -0 \$p 2>/dev/null; do sleep 0.05; done
	rm -f \$H/nbdfuse.pid ;;
esac
EOF
cat >$D/mount.sh <<EOF
#!/bin/bash
# mount.sh HOST SOCKET: the served NBD export as a file (nbdfuse), a loop device, ext4.
set -e
H=$D/\$1; mkdir -p \$H/fuse \$H/fs
setsid nbdfuse \$H/fuse "nbd+unix:///web?socket=\$2" </dev/null >\$H/nbdfuse.log 2>&1 &
echo \$! >\$H/nbdfuse.pid
for i in \$(seq 50); do [ -e \$H/fuse/nbd ] && break; sleep 0.1; done
losetup -f --show \$H/fuse/nbd >\$H/loop
[ -n "\$3" ] && mkfs.ext4 -q -F \$(cat \$H/loop)
fsck.ext4 -p \$(cat \$H/loop) || [ \$? -le 1 ]
mount \$(cat \$H/loop) \$H/fs
EOF
cat >$D/service.sh <<EOF
#!/bin/bash
# service.sh HOST: a tiny HTTP service on the service IP, serving the volume's files.
H=$D/\$1
setsid busybox httpd -f -p $SVC:8080 -h \$H/fs </dev/null >/dev/null 2>&1 &
echo \$! >\$H/httpd.pid
EOF
chmod +x $D/hook.sh $D/mount.sh $D/service.sh
cli job create web --source vm1 --target vm2 --volume $D/vm1.img --target-volume $D/vm2.img \
	--service-ip $SVC/24@eth0 --failover auto --monitor interval=200ms,missed=5 --arbiter etcd --lease-ttl 3s \
	--script post-failover=$D/hook.sh --script pre-failback=$D/hook.sh --script post-failback=$D/hook.sh | sed 's/^/   /'
wait_for "mirror to complete" 60 is_state vm2 replicating
both_paths() { local out; out=$(jstatus); [[ "$out" != *SILENT* && "$out" == *"probe    xdp-"*"peer repl up, app up"* ]]; }
wait_for "each agent to hear the other on both paths (XDP on the routes' interfaces)" 10 both_paths
status

bold "6. Put ext4 on the protected volume (vm1 serves it as an NBD export; nbdfuse + loop), write files"
sock=$(jstatus --json | busybox awk -F'"' '/"device": "unix:/ { sub("unix:", "", $4); print $4; exit }')
[ -S "$sock" ] || fail "vm1 does not serve the volume (device '$sock')"
$D/mount.sh vm1 "$sock" mkfs
for i in 1 2 3 4 5; do head -c $((i * 300000)) /dev/urandom >$D/vm1/fs/file$i.bin; done
echo "hello from the protected volume" >$D/vm1/fs/index.html
sync -f $D/vm1/fs/index.html
(cd $D/vm1/fs && sha256sum file*.bin index.html) >$D/sums
say "files written and fsynced (sync mode: on vm2 before the write returned):"
sed 's/^/     /' $D/sums
ip netns exec $NS1 $D/service.sh vm1
wait_for "service on vm1" 10 ip netns exec $NSC curl -sf -m 1 -o /dev/null http://$SVC:8080/index.html
say "client -> http://$SVC:8080/index.html: $(ip netns exec $NSC curl -sf -m 2 http://$SVC:8080/index.html)"
pause 1

bold "7. A partition between vm1 and vm2 only: vm2 no longer hears vm1, both still reach the arbiter"
ip -n $NS1 route add blackhole 172.17.22.12/32; ip -n $NS1 route add blackhole 192.168.0.12/32
wait_for "vm2 to declare vm1 down and ask the arbiter" 15 is_state vm2 promoting
sleep 4 # longer than the lease TTL (3 s): vm1 renews it, vm2 is refused
status
is_state vm2 promoting && [ "$(state_of vm2 role)" = target ] || fail "vm2 took over while vm1 held its lease"
if has_ip $NS2; then fail "vm2 took the service IP during the partition"; fi
cli job events web --server vm2 --last 0 | grep -q "refused for now: the source holds the lease" || fail "vm2 did not ask the arbiter"
say "no failover: the arbiter refuses vm2 while vm1 renews its lease (vm2 asks again every 200 ms)"
cli job events web --last 8 | sed 's/^/     /' 
ip -n $NS1 route del blackhole 172.17.22.12/32; ip -n $NS1 route del blackhole 192.168.0.12/32
wait_for "the partition to heal" 30 is_state vm2 replicating
say "healed: vm2 hears vm1 again and replicates"
# During the partition vm1 recorded at the arbiter that vm2 is out of sync
# (its writes went on under the lease alone); vm2 may take over again only
# once vm1 has recorded it back in sync.
in_sync() { [ "$(state_of vm1 target_out_of_sync)" != true ]; }
wait_for "vm1 to record vm2 in sync at the arbiter" 20 in_sync

# A crash folds the activity log's hot extents into the dirty bitmap
# (resynced on return): let mkfs's extents cool first, as they do within
# seconds on an idle volume, so the reverse below has a meaningful bound.
cool() { [ "$(state_of vm1 hot_extents)" -le 2 ]; }
wait_for "vm1's hot extents to cool" 20 cool
say "vm1: $(state_of vm1 hot_extents) hot extents in its activity log"

bold "8. Force-stop vm1: agent killed, links down"
T0=$(date +%s.%N)
kill -9 "$(cat $D/vm1/agent.pid)"
ip -n $NS1 link set eth0 down; ip -n $NS1 link set eth1 down
kill -9 "$(cat $D/vm1/httpd.pid)" 2>/dev/null || true; rm -f $D/vm1/httpd.pid
say "vm1 is gone; vm2's probe counts down..."
# RTO: when a new client connection succeeds again. A fresh attempt every
# 50 ms with a short connect timeout (an attempt begun before the takeover
# would wait out TCP's 1 s SYN retransmission and measure that instead).
until ip netns exec $NSC curl -sf --connect-timeout 0.2 -m 1 -o /dev/null http://$SVC:8080/index.html 2>/dev/null; do
	awk -v t0=$T0 -v now=$(date +%s.%N) 'BEGIN { exit !(now - t0 > 30) }' && fail "service not back within 30 s"
	sleep 0.05
done
T1=$(date +%s.%N)
RTO=$(awk -v a=$T0 -v b=$T1 'BEGIN { printf "%.2f", b - a }')

bold "9. Automatic failover: vm2 took the service IP and serves the same files (RTO ${RTO}s)"
status
for f in file1.bin file2.bin file3.bin file4.bin file5.bin index.html; do
	ip netns exec $NSC curl -sf -m 5 -o $D/got.$f http://$SVC:8080/$f
done
(cd $D && for f in file1.bin file2.bin file3.bin file4.bin file5.bin index.html; do echo "$(sha256sum <got.$f | cut -d' ' -f1)  $f"; done) >$D/sums2
diff $D/sums $D/sums2 >/dev/null || fail "files differ on vm2"
cli job events web --server vm2 --last 0 | grep -q "promoted: the arbiter granted epoch 2" || fail "vm2 failed over without the arbiter's grant"
say "vm2's detector declared vm1 down; once vm1's lease expired the arbiter granted vm2 epoch 2"
say "all $(wc -l <$D/sums) files intact on vm2 (sha256 match); client reached $SVC on vm2 ${RTO}s after the kill"
ip -n $NS2 -br addr show eth0 | sed 's/^/   vm2: /'
echo "written on vm2 after the failover" >$D/vm2/fs/after-failover.txt; sync -f $D/vm2/fs/after-failover.txt
pause 1

bold "10. Bring vm1 back: it finds it was superseded and stays fenced"
ip -n $NS1 link set eth0 up; ip -n $NS1 link set eth1 up
umount -l $D/vm1/fs 2>/dev/null || true; losetup -d "$(cat $D/vm1/loop)" 2>/dev/null || true
kill "$(cat $D/vm1/nbdfuse.pid)" 2>/dev/null || true; fusermount3 -u -z $D/vm1/fuse 2>/dev/null || true
rm -f $D/vm1/loop $D/vm1/nbdfuse.pid
start_agent vm1 $NS1 172.17.22.11 192.168.0.11
wait_for "vm1 fenced" 20 is_state vm1 superseded
status
if has_ip $NS1; then fail "returned vm1 holds the service IP"; fi
say "vm1 holds no service IP and does not serve the volume"

bold "11. doppel reverse: vm1 becomes the target, resynced with only what differs"
# What differs: the chunks vm2 wrote since the failover, and vm1's dirty
# chunks (its writes vm2 never acknowledged, plus the hot extents of its crash).
CHANGED2=$(state_of vm2 changed_bytes) DIRTY1=$(state_of vm1 dirty_bytes)
say "before: vm2 changed $CHANGED2 bytes (64 KiB chunks) since the failover; vm1 has $DIRTY1 dirty bytes"
[ "${CHANGED2:-0}" -gt 0 ] || fail "vm2 reports no change since the failover (it wrote after-failover.txt)"
cli reverse web | sed 's/^/   /'
wait_for "reverse resync" 60 is_state vm1 replicating
status
cli verify web | sed 's/^/   /' || fail "vm1 and vm2 differ after the reverse resync"
# What the reverse cost: the payload vm1 applied as the new target (the
# writes vm2 queued since the failover, shipped in order, plus the resync).
REV=$(state_of vm1 applied_bytes) RESYNC=$(state_of vm2 mirror_sent)
say "reverse sent $REV bytes of the 256 MiB volume ($RESYNC of them by resync of the union of both sides' dirty bitmaps)"
# The reverse bound: at most 1.1 × (bytes changed on vm2 + vm1's dirty chunks).
[ $((REV * 10)) -le $((11 * (CHANGED2 + DIRTY1))) ] ||
	fail "reverse sent $REV bytes: more than 1.1 × ($CHANGED2 changed on vm2 + $DIRTY1 dirty on vm1)"
say "$REV ≤ 1.1 × ($CHANGED2 + $DIRTY1) = $(( 11 * (CHANGED2 + DIRTY1) / 10 ))"


bold "12. doppel failback: planned switchover, vm1 is the source again, vm2 the standby"
cli failback web | sed 's/^/   /'
is_source() { [ "$(state_of "$1" role)" = source ]; }
wait_for "vm1 to take the source role back" 60 is_source vm1
wait_for "failback" 60 is_state vm1 replicating
wait_for "service on vm1" 20 ip netns exec $NSC curl -sf -m 1 -o /dev/null http://$SVC:8080/after-failover.txt
status
has_ip $NS1 || fail "service IP not back on vm1"
if has_ip $NS2; then fail "service IP still on vm2"; fi
say "client -> $SVC: $(ip netns exec $NSC curl -sf -m 2 http://$SVC:8080/after-failover.txt) (served by vm1)"
cli verify web | sed 's/^/   /'

bold "Done: protect, fail over (RTO ${RTO}s), fence, reverse, fail back."
if [ -n "${DEMO_HOLD:-}" ]; then
	say "DEMO_HOLD: the lab and the web console stay up: https://127.0.0.1:$CPORT/ (password $(cat $D/console.pw))"
	read -r -p "   press Enter to remove the lab " _ || true
fi
printf 'RTO_SECONDS=%s\nREVERSE_BYTES=%s\nVM2_CHANGED_BYTES=%s\nVM1_DIRTY_BYTES=%s\n' "$RTO" "$REV" "$CHANGED2" "$DIRTY1" >"${DEMO_RESULT:-/dev/null}"
