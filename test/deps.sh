#!/usr/bin/env bash
# Installs, on Debian/Ubuntu, the packages doppel's tests and demo need when
# they are missing. Safe to run again; does nothing when all are present.
set -euo pipefail

# command -> Debian package
declare -A need=(
	[nbdinfo]=libnbd-bin [nbdcopy]=libnbd-bin [nbdfuse]=libnbd-bin
	[nbdkit]=nbdkit
	[qemu-nbd]=qemu-utils [qemu-io]=qemu-utils [qemu-storage-daemon]=qemu-system-common
	[fio]=fio
	[qemu-system-x86_64]=qemu-system-x86
	[busybox]=busybox-static
	[mkfs.ext4]=e2fsprogs
	[clang-14]=clang-14 [llc-14]=llvm-14
	[ip]=iproute2 [tc]=iproute2
	[arping]=arping
	[llvm-strip-14]=llvm-14 [ping]=iputils-ping [chrt]=util-linux [setpriv]=util-linux
	[cpio]=cpio
	[fusermount3]=fuse3
	[losetup]=mount
	[vagrant]=vagrant
	[etcd]=etcd-server [etcdctl]=etcd-client
	[mkfs.xfs]=xfsprogs [mkfs.btrfs]=btrfs-progs [fsfreeze]=util-linux
	[lvm]=lvm2 [thin_check]=thin-provisioning-tools
	[chromium]=chromium [systemd-socket-activate]=systemd
)
missing=()
for cmd in "${!need[@]}"; do
	command -v "$cmd" >/dev/null 2>&1 || missing+=("${need[$cmd]}")
done
# libbpf headers for the XDP program's includes.
[ -e /usr/include/bpf/bpf_helpers.h ] || missing+=(libbpf-dev)
if [ ${#missing[@]} -eq 0 ]; then
	exit 0
fi
mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
if [ "$(id -u)" -ne 0 ]; then
	echo "deps: missing ${missing[*]}; run as root (or install them) to run every test tier" >&2
	exit 0
fi
echo "deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}"
