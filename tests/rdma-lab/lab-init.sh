#!/bin/sh
# /init of the RDMA lab guest (built into the base by build-lab.sh; driven by lab.sh).
# Kernel command line knobs:
#   lab_net=loop     (default) dummy0 with lab_ip (default 10.0.0.1/24), rxe0 on it: server and
#                    client share rxe0 (loopback through the rxe device, as real RoCE would)
#   lab_net=virtio   the first virtio NIC with lab_ip, rxe0 on it; lab_peer = the other guest's IP
# Loads the modules in /lib/modules/KVER/load-order, creates rxe0, exports RXE_DEV, GID_IDX
# (index of the RoCEv2 IPv4-mapped GID), LAB_IP, LAB_PEER_IP and the variables in /lab/env.sh,
# runs /lab/cmd.sh in /lab, prints "@@LAB_EXIT=<rc>@@" on the console and powers off.
# A failed setup prints "@@LAB_SETUP_FAILED: <why>@@" instead.
export PATH=/lab:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /tmp
echo 4 > /proc/sys/kernel/printk
export HOME=/root
# shellcheck disable=SC3045 # busybox ash has ulimit -l (registered memory)
ulimit -l unlimited 2>/dev/null

fail() {
  echo "@@LAB_SETUP_FAILED: $*@@"
  sync
  poweroff -f
  exit 1
}
# Debian's busybox ash runs its own applets before $PATH: use iproute2's ip explicitly
IP=/usr/bin/ip

for kv in $(cat /proc/cmdline); do
  # shellcheck disable=SC2163 # exports the variable named in $kv
  case "$kv" in lab_*=*) export "$kv" ;; esac
done
: "${lab_net:=loop}"

KVER=$(uname -r)
[ -f "/lib/modules/$KVER/load-order" ] || fail "no modules for kernel $KVER in the lab base (rebuild it)"
for m in $(cat "/lib/modules/$KVER/load-order"); do
  insmod "/lib/modules/$KVER/$m.ko" || fail "insmod $m failed"
done

$IP link set lo up
case "$lab_net" in
  loop)
    : "${lab_ip:=10.0.0.1/24}"
    $IP link show dummy0 >/dev/null 2>&1 || $IP link add dummy0 type dummy || fail "cannot create dummy0"
    NETDEV=dummy0
    LAB_PEER_IP=${lab_ip%/*} ;;
  virtio)
    [ -n "${lab_ip:-}" ] || fail "lab_net=virtio needs lab_ip"
    NETDEV=
    for n in /sys/class/net/*; do
      n=${n##*/}
      case "$n" in lo|dummy*) ;; *) NETDEV=$n; break ;; esac
    done
    [ -n "$NETDEV" ] || fail "no virtio NIC"
    LAB_PEER_IP=${lab_peer:-} ;;
  *) fail "unknown lab_net=$lab_net" ;;
esac
$IP addr add "$lab_ip" dev "$NETDEV" || fail "ip addr add $lab_ip dev $NETDEV"
$IP link set "$NETDEV" up || fail "ip link set $NETDEV up"
rdma link add rxe0 type rxe netdev "$NETDEV" || fail "rdma link add rxe0 type rxe netdev $NETDEV"
export RXE_DEV=rxe0 RXE_NETDEV=$NETDEV LAB_IP=${lab_ip%/*} LAB_PEER_IP LAB_NET=$lab_net

# GID table entries appear asynchronously after the device is registered
GID_IDX=
tries=0
while [ -z "$GID_IDX" ] && [ $tries -lt 50 ]; do
  for g in /sys/class/infiniband/rxe0/ports/1/gids/*; do
    case "$(cat "$g" 2>/dev/null)" in
      0000:0000:0000:0000:0000:ffff:*) GID_IDX=${g##*/}; break ;;
    esac
  done
  [ -n "$GID_IDX" ] || { sleep 0.1; tries=$((tries + 1)); }
done
[ -n "$GID_IDX" ] || fail "rxe0 has no IPv4-mapped RoCEv2 GID"
export GID_IDX
[ -f /lab/env.sh ] && . /lab/env.sh
echo "lab: rxe0 up on $NETDEV at $(cut -d' ' -f1 /proc/uptime)s: kernel=$KVER net=$lab_net ip=$LAB_IP peer=$LAB_PEER_IP gid_idx=$GID_IDX"

rc=127
if [ -f /lab/cmd.sh ]; then
  cd /lab || fail "cd /lab"
  /bin/sh /lab/cmd.sh
  rc=$?
else
  echo "lab: no /lab/cmd.sh"
fi
echo "@@LAB_EXIT=$rc@@"
sync
poweroff -f
