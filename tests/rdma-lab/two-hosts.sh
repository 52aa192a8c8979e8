#!/bin/bash
# RDMA lab with two "hosts": two lab guests joined by a QEMU UDP socket netdev on 127.0.0.1, each
# with its own rxe0 on a virtio NIC (server 10.0.1.1, client 10.0.1.2). Runs a server command in
# one and a client command in the other, both booted at once (the client must retry until the
# server listens), and reports both exit statuses.
#
# Usage: tests/rdma-lab/two-hosts.sh [options] -s 'SERVER COMMAND' -c 'CLIENT COMMAND'
#   -s CMD, -c CMD  shell command lines (run with sh -c in /lab); LAB_IP is the guest's own
#                   address, LAB_PEER_IP the other's, LAB_ROLE server|client, RXE_DEV=rxe0, GID_IDX
#   -a PATH         add a file or directory to both guests as /lab/<basename> (repeatable)
#   -e VAR=VALUE    set VAR in both commands' environment (repeatable)
#   -t SECS         timeout of each guest (default 180)
#   -g SECS         when one side fails, how long the other may still run (default 15)
#   -l PREFIX       console logs PREFIX-server.log / PREFIX-client.log
#                   (default LABDIR/logs/two-hosts-DATE-PID)
#   -d LABDIR       lab directory (default $FTVM_RDMA_LAB_DIR, else build/rdma-lab)
#   -B              do not run build-lab.sh first (default: run it; it returns at once when cached)
# Prints both consoles (prefixed [server] / [client]) and "two-hosts: server=RC client=RC".
# Exit status: 0 when both returned 0, else the client's status if non-zero, else the server's
# (124 timeout, 125 guest died, as lab.sh). The link is UDP on purpose: QEMU's TCP socket netdev
# (listen=/connect=) adds ~25 ms per message (Nagle + delayed ACK).
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
usage() { sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
die() { echo "two-hosts: error: $*" >&2; exit 2; }

SCMD="" CCMD="" TMO=180 GRACE=15 PREFIX="" COMMON=() BUILD=1
LABDIR=${FTVM_RDMA_LAB_DIR:-$REPO/build/rdma-lab}
while getopts "s:c:a:e:t:g:l:d:Bh" o; do
  case $o in
    s) SCMD=$OPTARG ;; c) CCMD=$OPTARG ;;
    a) [[ -e $OPTARG ]] || die "-a $OPTARG: no such file"; COMMON+=(-a "$OPTARG") ;;
    e) COMMON+=(-e "$OPTARG") ;;
    t) TMO=$OPTARG ;; g) GRACE=$OPTARG ;; l) PREFIX=$OPTARG ;; d) LABDIR=$OPTARG ;; B) BUILD=0 ;;
    *) usage ;;
  esac
done
shift $((OPTIND - 1))
(($# == 0)) && [[ -n $SCMD && -n $CCMD ]] || usage
[[ $TMO =~ ^[0-9]+$ && $GRACE =~ ^[0-9]+$ ]] || die "-t and -g want seconds"

mkdir -p "$LABDIR" || die "cannot create $LABDIR"
if ((BUILD)); then
  flock "$LABDIR/.build.lock" "$HERE/build-lab.sh" "$LABDIR" >&2 || die "build-lab.sh $LABDIR failed"
fi
[[ -s $LABDIR/base.cpio.gz && -e $LABDIR/vmlinux ]] || die "no lab in $LABDIR: run tests/rdma-lab/build-lab.sh $LABDIR"
if [[ -z $PREFIX ]]; then
  mkdir -p "$LABDIR/logs"
  PREFIX=$LABDIR/logs/two-hosts-$(date +%Y%m%d-%H%M%S)-$$
  ls -1t "$LABDIR"/logs/two-hosts-*.log 2>/dev/null | tail -n +50 | xargs -r rm -f
fi
SLOG=$PREFIX-server.log CLOG=$PREFIX-client.log
mkdir -p "$(dirname "$PREFIX")" || die "cannot create the log directory of $PREFIX"

# two free UDP ports on 127.0.0.1 (asked from the kernel; released just before QEMU binds them)
read -r SPORT CPORT < <(python3 -c '
import socket
s = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2)]
for x in s: x.bind(("127.0.0.1", 0))
print(*[x.getsockname()[1] for x in s])') || die "cannot find free UDP ports"

SPID="" CPID=""
cleanup() {  # lab.sh kills its own QEMU on TERM
  local p
  for p in $SPID $CPID; do kill -TERM "$p" 2>/dev/null; done
  for p in $SPID $CPID; do wait "$p" 2>/dev/null; done
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM HUP

T0=$EPOCHREALTIME
"$HERE/lab.sh" -B -q -d "$LABDIR" -t "$TMO" -l "$SLOG" -n "udp:$SPORT:$CPORT" -i 10.0.1.1/24 -p 10.0.1.2 \
  "${COMMON[@]}" -e LAB_ROLE=server -- sh -c "$SCMD" 2> "$PREFIX-server.lab" &
SPID=$!
"$HERE/lab.sh" -B -q -d "$LABDIR" -t "$TMO" -l "$CLOG" -n "udp:$CPORT:$SPORT" -i 10.0.1.2/24 -p 10.0.1.1 \
  "${COMMON[@]}" -e LAB_ROLE=client -- sh -c "$CCMD" 2> "$PREFIX-client.lab" &
CPID=$!

# wait for the first to finish; if it failed, give the other GRACE seconds, then stop it
SRC="" CRC=""
wait -n -p done_pid "$SPID" "$CPID"; rc=$?
if [[ $done_pid == "$SPID" ]]; then SRC=$rc; other=$CPID; else CRC=$rc; other=$SPID; fi
if ((rc != 0)); then
  for ((i = 0; i < GRACE * 10; i++)); do kill -0 "$other" 2>/dev/null || break; sleep 0.1; done
  kill -0 "$other" 2>/dev/null && { echo "two-hosts: first side failed ($rc); stopping the other" >&2; kill -TERM "$other"; }
fi
wait "$other"; rc=$?
if [[ $other == "$SPID" ]]; then SRC=$rc; else CRC=$rc; fi
SPID="" CPID=""
T1=$EPOCHREALTIME

for side in server client; do
  log=$PREFIX-$side.log
  [[ -f $log ]] && tr -d '\r' < "$log" | sed "s/^/[$side] /"
  [[ -s $PREFIX-$side.lab ]] && sed "s/^/[$side] /" "$PREFIX-$side.lab" >&2
  rm -f "$PREFIX-$side.lab"
done
awk -v s="$SRC" -v c="$CRC" -v a="$T0" -v b="$T1" -v p="$PREFIX" \
  'BEGIN{printf "two-hosts: server=%s client=%s wall=%.2fs logs=%s-{server,client}.log\n", s, c, b-a, p}' >&2
if [[ $SRC == 0 && $CRC == 0 ]]; then exit 0; fi
[[ $CRC != 0 ]] && exit "$CRC"
exit "$SRC"
