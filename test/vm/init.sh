#!/bin/busybox sh
# /init of the VM tier's guests (embedded by initramfs.go). It mounts the
# pseudo filesystems, loads the modules named on the kernel command line,
# configures the two NICs from it, then runs the commands the Go harness
# sends on the virtio-serial port doppel.ctl:
#   harness -> guest: "<id> <base64 script>\n"
#   guest -> harness: "@@BEGIN <id>\n" output "\n@@END <id> <exit code>\n"
# Kernel and init messages go to the console, /dev/ttyS0.
/bin/busybox --install -s
export PATH=/sbin:/usr/sbin:/bin:/usr/bin HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm /sys/fs/bpf /root
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t bpf bpf /sys/fs/bpf 2>/dev/null
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null

# doppel.KEY=VALUE parameters of the kernel command line.
for kv in $(cat /proc/cmdline); do
	case "$kv" in
	doppel.*=*)
		k=${kv%%=*}
		k=${k#doppel.}
		eval "P_$k=\${kv#*=}"
		;;
	esac
done

hostname "${P_hostname:-guest}"
for m in $(echo "$P_modules" | tr , ' '); do
	modprobe "$m" || echo "init: modprobe $m failed"
done

# State and volumes: on the guest's state disk when it has one (the
# virtio disk of serial doppel-state, made ext4 at first boot: e2fsck
# fails with 8 on a blank disk, corrects with 1 or 2 after a crash), else
# in RAM, beyond the rootfs's limit of half of it. Other disks are left
# alone (raw disks for the tests).
state=
for d in /sys/block/vd*; do
	[ "$(cat "$d/serial" 2>/dev/null)" = doppel-state ] && state=/dev/${d##*/}
done
if [ -n "$state" ]; then
	e2fsck -p "$state" >/dev/console 2>&1
	[ $? -ge 4 ] && mkfs.ext4 -q -F "$state"
	mount -t ext4 "$state" /var/lib/doppel || echo "init: mount $state failed"
else
	mount -t tmpfs -o size=70% tmpfs /var/lib/doppel
fi

ip link set lo up
# NICs are named after their role, found by MAC address.
for role in app repl; do
	eval "mac=\$P_${role}mac ip=\$P_${role}ip"
	[ -n "$mac" ] || continue
	for d in /sys/class/net/*; do
		if [ "$(cat "$d/address")" = "$mac" ]; then
			ip link set "${d##*/}" name "$role"
			ip addr add "$ip" dev "$role"
			ip link set "$role" up
		fi
	done
done

# The control channel is the virtio-serial port named doppel.ctl.
ctl=
for i in $(seq 100); do
	for p in /sys/class/virtio-ports/*; do
		[ "$(cat "$p/name" 2>/dev/null)" = doppel.ctl ] && [ -e "/dev/${p##*/}" ] && ctl=/dev/${p##*/}
	done
	[ -n "$ctl" ] && break
	sleep 0.1
done
[ -n "$ctl" ] || { echo "init: no control port (virtio-serial doppel.ctl)" >/dev/console; sleep 5; poweroff -f; }
exec 3<>"$ctl"
up=$(cut -d' ' -f1 /proc/uptime)
echo "init: ready after ${up}s" >/dev/console
printf '@@READY %s\n' "$up" >&3
while read -r id b64 <&3; do
	[ -n "$id" ] || continue
	echo "$b64" | base64 -d >"/run/cmd.$id"
	sh "/run/cmd.$id" >"/run/out.$id" 2>&1 </dev/null 3>&-
	rc=$?
	printf '@@BEGIN %s\n' "$id" >&3
	cat "/run/out.$id" >&3
	printf '\n@@END %s %d\n' "$id" "$rc" >&3
	rm -f "/run/cmd.$id" "/run/out.$id"
done
echo "init: control channel closed" >/dev/console
while :; do sleep 3600; done
