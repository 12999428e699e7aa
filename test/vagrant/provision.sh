#!/usr/bin/env bash
# Provisions one VM of doppel's Vagrant lab (run as root by the Vagrantfile):
#   provision.sh ROLE NAME APP_IP [REPL_IP]     ROLE: source, target or client
# Installs the binary built on the host (bin/doppel, from `make static`), the
# lab's host names, and on source and target the nbd module and the agent's
# systemd unit (cmd/doppel/doppel-agent.service) with this host's addresses.
set -euo pipefail
role=$1 name=$2 app=$3 repl=${4:-}
src=/vagrant

bin=$src/bin/doppel
if [ ! -x "$bin" ]; then
	echo "provision: $bin is missing: run 'make static' on the host, then 'vagrant provision'" >&2
	exit 1
fi
install -m 0755 "$bin" /usr/local/bin/doppel

# Host names of the lab on both networks.
for h in "172.17.22.11 vm1" "172.17.22.12 vm2" "172.17.22.13 client" \
	"192.168.0.11 vm1-repl" "192.168.0.12 vm2-repl"; do
	grep -qxF "$h" /etc/hosts || echo "$h" >>/etc/hosts
done

case $role in
source | target) ;;
client)
	echo "provision: $name ($role) ready: $app"
	exit 0
	;;
*)
	echo "provision: unknown role $role" >&2
	exit 2
	;;
esac

# The kernel side of the protected volume: /dev/nbdN.
echo nbd >/etc/modules-load.d/doppel.conf
modprobe nbd

unit=$src/cmd/doppel/doppel-agent.service
if [ ! -f "$unit" ]; then
	echo "provision: $unit is missing from this checkout" >&2
	exit 1
fi
install -m 0644 "$unit" /etc/systemd/system/doppel-agent.service
# The unit's binary path, wherever the unit expects it.
exe=$(sed -n 's/^ExecStart=\([^ ]*\).*/\1/p' "$unit" | head -n 1)
if [ -n "$exe" ] && [ "$exe" != /usr/local/bin/doppel ]; then
	install -D -m 0755 "$bin" "$exe"
fi
# This host's flags: replication on the replication network, the XDP
# probe on both monitored paths (eth1: application, eth2: replication).
mkdir -p /etc/systemd/system/doppel-agent.service.d
cat >/etc/systemd/system/doppel-agent.service.d/vagrant.conf <<EOT
[Service]
ExecStart=
ExecStart=${exe:-/usr/local/bin/doppel} agent --repl-listen ${repl}:6325 --probe-iface eth1 --probe-iface eth2
EOT
systemctl daemon-reload
systemctl enable doppel-agent.service
systemctl restart doppel-agent.service
for i in $(seq 50); do
	[ -s /var/lib/doppel/token ] && break
	sleep 0.2
done
systemctl --no-pager --lines=5 status doppel-agent.service || true
echo "provision: $name ($role) ready: app $app, replication $repl"
