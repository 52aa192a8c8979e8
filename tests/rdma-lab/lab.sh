#!/bin/bash
# RDMA lab: runs a command inside a throw-away QEMU guest (Debian's generic kernel, TCG) that has a
# real Soft-RoCE device rxe0, and returns the command's exit status.
#
# Usage: tests/rdma-lab/lab.sh [options] -- PROGRAM [ARGS...]
#   -a PATH        copy a host file or directory into the guest as /lab/<basename> (repeatable);
#                  ELF files get their shared libraries (and libgcc_s) added at the host's paths
#   -e VAR=VALUE   set VAR in the command's environment (repeatable)
#   -n NET         loop (default): rxe0 on dummy0, LAB_IP=LAB_PEER_IP=10.0.0.1
#                  udp:LPORT:RPORT: virtio NIC on a QEMU UDP socket netdev, bound to
#                  127.0.0.1:LPORT, sending to 127.0.0.1:RPORT (the peer guest; see two-hosts.sh)
#   -i IP/NN       guest address (default 10.0.0.1/24 for loop, 10.0.1.1/24 for udp)
#   -p PEER_IP     the other guest's address (exported as LAB_PEER_IP; udp only)
#   -t SECS        host-side timeout for the whole run, boot included (default 120)
#   -c CPUS        guest vCPUs (default 1)      -m MEM   guest memory (default 512M)
#   -l FILE        console log (default LABDIR/logs/lab-DATE-PID.log; the newest 50 are kept)
#   -q             do not echo the guest console (on failure its tail is printed to stderr)
#   -d LABDIR      lab directory from build-lab.sh (default $FTVM_RDMA_LAB_DIR, else build/rdma-lab)
#   -B             do not run build-lab.sh first (default: run it; it returns at once when cached)
# PROGRAM runs in /lab with /lab first in PATH (`-- sh -c '...'` for a shell command line; call
# iproute2 as /usr/bin/ip there, busybox ash prefers its own applet). Its environment has
# RXE_DEV=rxe0, GID_IDX (RoCEv2 IPv4-mapped GID index), LAB_IP, LAB_PEER_IP, LAB_NET, RXE_NETDEV.
# Exit status: the command's; 124 timeout; 125 the guest died or its setup failed; 2 usage or
# lab build errors. Environment: FTVM_LAB_ACCEL=tcg (default) | kvm (a KVM that boots Linux).
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
usage() { sed -n '2,26p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
die() { echo "lab: error: $*" >&2; exit 2; }
now() { echo "$EPOCHREALTIME"; }
T_START=$(now)

ADDS=() ENVS=() NET=loop IPADDR="" PEER="" TMO=120 CPUS=1 MEM=512M LOG="" QUIET=0 BUILD=1
LABDIR=${FTVM_RDMA_LAB_DIR:-$REPO/build/rdma-lab}
while getopts "a:e:n:i:p:t:c:m:l:qd:Bh" o; do
  case $o in
    a) ADDS+=("$OPTARG") ;;
    e) [[ $OPTARG == [A-Za-z_]*=* ]] || die "-e wants VAR=VALUE, got '$OPTARG'"; ENVS+=("$OPTARG") ;;
    n) NET=$OPTARG ;; i) IPADDR=$OPTARG ;; p) PEER=$OPTARG ;;
    t) TMO=$OPTARG ;; c) CPUS=$OPTARG ;; m) MEM=$OPTARG ;; l) LOG=$OPTARG ;;
    q) QUIET=1 ;; d) LABDIR=$OPTARG ;; B) BUILD=0 ;;
    *) usage ;;
  esac
done
shift $((OPTIND - 1))
[[ ${1:-} == -- ]] && shift
(($# > 0)) || usage
[[ $TMO =~ ^[0-9]+$ && $TMO -gt 0 ]] || die "-t wants a number of seconds"
for a in "${ADDS[@]}"; do [[ -e $a ]] || die "-a $a: no such file"; done

case $NET in
  loop)
    NETARGS=(-nic none); APPEND="lab_net=loop lab_ip=${IPADDR:-10.0.0.1/24}" ;;
  udp:*:*)
    IFS=: read -r _ LPORT RPORT <<< "$NET"
    [[ $LPORT =~ ^[0-9]+$ && $RPORT =~ ^[0-9]+$ ]] || die "-n udp:LPORT:RPORT wants two port numbers"
    IPADDR=${IPADDR:-10.0.1.1/24}
    ip4=${IPADDR%/*}; IFS=. read -r o1 o2 o3 o4 <<< "$ip4"
    mac=$(printf '52:54:%02x:%02x:%02x:%02x' "$o1" "$o2" "$o3" "$o4")
    NETARGS=(-netdev "socket,id=n0,udp=127.0.0.1:$RPORT,localaddr=127.0.0.1:$LPORT"
             -device "virtio-net-pci,netdev=n0,mac=$mac")
    APPEND="lab_net=virtio lab_ip=$IPADDR${PEER:+ lab_peer=$PEER}" ;;
  *) die "-n wants loop or udp:LPORT:RPORT, got '$NET'" ;;
esac

# ---- the lab base (cached by build-lab.sh; serialized for concurrent lab.sh runs) ----
mkdir -p "$LABDIR" || die "cannot create $LABDIR"
if ((BUILD)); then
  flock "$LABDIR/.build.lock" "$HERE/build-lab.sh" "$LABDIR" >&2 || die "build-lab.sh $LABDIR failed"
fi
BASE=$LABDIR/base.cpio.gz KERNEL=$LABDIR/vmlinux
[[ -s $BASE && -s $KERNEL ]] || die "no lab in $LABDIR: run tests/rdma-lab/build-lab.sh $LABDIR"

if [[ -z $LOG ]]; then
  mkdir -p "$LABDIR/logs"
  LOG=$LABDIR/logs/lab-$(date +%Y%m%d-%H%M%S)-$$.log
  ls -1t "$LABDIR"/logs/lab-*.log 2>/dev/null | tail -n +50 | xargs -r rm -f
fi
mkdir -p "$(dirname "$LOG")" && : > "$LOG" || die "cannot write console log $LOG"

QPID="" TPID=""
WORK=$(mktemp -d "${TMPDIR:-/tmp}/ftvm-lab.XXXXXX") || die "mktemp failed"
cleanup() {
  if [[ -n $QPID ]] && kill -0 "$QPID" 2>/dev/null; then
    kill -TERM "$QPID" 2>/dev/null
    for _ in {1..20}; do kill -0 "$QPID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$QPID" 2>/dev/null
  fi
  [[ -n $QPID ]] && wait "$QPID" 2>/dev/null
  [[ -n $TPID ]] && { kill "$TPID" 2>/dev/null; wait "$TPID" 2>/dev/null; }
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM HUP

# ---- the per-run part of the initramfs: /lab, libraries, env.sh, cmd.sh ----
shq() { local s=${1//\'/\'\\\'\'}; printf "'%s'" "$s"; }
R=$WORK/root
mkdir -p "$R/lab"
put() {  # host file -> same canonical path in the guest (libraries)
  local dst; dst="$(readlink -f "$(dirname "$1")")/$(basename "$1")"
  [[ -e $R$dst ]] && return 0
  mkdir -p "$R$(dirname "$dst")" && cp -L "$1" "$R$dst"
}
add_libs() {  # ELF -> its shared libraries
  local out l
  out=$(ldd "$1" 2>&1) || return 0   # static or not an executable: nothing to add
  if grep -q 'not found' <<< "$out"; then
    die "$1: missing shared libraries on the host: $(grep 'not found' <<< "$out" | tr -s ' \t' ' ')"
  fi
  for l in $(awk '/=> \//{print $3} /^\t\/[^ ]+ \(/{print $1}' <<< "$out"); do put "$l" || die "copy $l"; done
  l=$(ldconfig -p | awk '/libgcc_s.so.1 .*x86-64/ {print $NF; exit}')   # dlopen()ed by glibc
  [[ -n $l ]] && put "$l"
}
for a in "${ADDS[@]}"; do
  cp -rL "$a" "$R/lab/" || die "cannot copy $a"
  while IFS= read -r -d '' f; do
    [[ "$(head -c 4 "$f" | od -An -tx1 | tr -d ' \n')" == 7f454c46 ]] && add_libs "$f"
  done < <(find "$R/lab/$(basename "$a")" -type f -print0)
done
{
  for e in "${ENVS[@]}"; do printf 'export %s=%s\n' "${e%%=*}" "$(shq "${e#*=}")"; done
} > "$R/lab/env.sh"
{
  echo '# generated by lab.sh'
  echo 'ip() { /usr/bin/ip "$@"; }   # busybox ash would run its own ip applet'
  printf '%s' 'exec'; for w in "$@"; do printf ' %s' "$(shq "$w")"; done; echo
} > "$R/lab/cmd.sh"
(cd "$R" && find . -mindepth 1 -print0 | cpio --null -o -H newc --quiet -R 0:0 | gzip -1 -n) \
  > "$WORK/extra.cpio.gz" || die "cannot pack the /lab files"
cat "$BASE" "$WORK/extra.cpio.gz" > "$WORK/initrd.gz" || die "cannot write the initrd"

# ---- boot ----
# shellcheck disable=SC2054 # the commas are QEMU option syntax
case ${FTVM_LAB_ACCEL:-tcg} in
  tcg) ACCEL=(-machine q35,accel=tcg -cpu max) ;;
  kvm) ACCEL=(-machine q35,accel=kvm -cpu host) ;;
  *) die "FTVM_LAB_ACCEL must be tcg or kvm" ;;
esac
command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 missing (scripts/install-deps.sh)"
T_BOOT=$(now)
qemu-system-x86_64 "${ACCEL[@]}" -smp "$CPUS" -m "$MEM" \
  -nodefaults -no-user-config -no-reboot -display none -monitor none -serial stdio \
  "${NETARGS[@]}" \
  -kernel "$KERNEL" -initrd "$WORK/initrd.gz" \
  -append "console=ttyS0 quiet panic=-1 $APPEND" \
  < /dev/null > "$LOG" 2>&1 &
QPID=$!
if ((!QUIET)); then
  tail -s 0.2 -n +1 -f --pid="$QPID" "$LOG" | tr -d '\r' &
  TPID=$!
fi

RC="" T_RXE=""
DEADLINE=$((${EPOCHSECONDS} + TMO))
while kill -0 "$QPID" 2>/dev/null; do
  if [[ -z $T_RXE ]] && grep -aq '^lab: rxe0 up' "$LOG"; then T_RXE=$(now); fi
  if grep -aq '@@LAB_EXIT=[0-9]*@@\|@@LAB_SETUP_FAILED' "$LOG"; then
    for _ in {1..50}; do kill -0 "$QPID" 2>/dev/null || break; sleep 0.1; done   # poweroff -f
    break
  fi
  if ((EPOCHSECONDS >= DEADLINE)); then RC=124; echo "lab: TIMEOUT after ${TMO}s" >&2; break; fi
  sleep 0.1
done
kill -TERM "$QPID" 2>/dev/null
wait "$QPID" 2>/dev/null; QRC=$?
QPID=""
[[ -n $TPID ]] && { wait "$TPID" 2>/dev/null; TPID=""; }   # tail ends once qemu is gone
T_END=$(now)

if [[ -z $RC ]]; then
  RC=$(tr -d '\r' < "$LOG" | sed -n 's/.*@@LAB_EXIT=\([0-9]*\)@@.*/\1/p' | tail -1)
  if [[ -z $RC ]]; then
    RC=125
    why=$(tr -d '\r' < "$LOG" | sed -n 's/.*@@LAB_SETUP_FAILED: \(.*\)@@.*/\1/p' | tail -1)
    echo "lab: ${why:+guest setup failed: $why}${why:-guest ended without an exit marker (qemu rc=$QRC)}" >&2
  fi
fi
if ((QUIET)) && [[ $RC != 0 ]]; then
  echo "lab: last console lines ($LOG):" >&2
  tail -n 40 "$LOG" | tr -d '\r' | sed 's/^/  | /' >&2
fi
rxe=""
[[ -n $T_RXE ]] && rxe=$(awk -v a="$T_BOOT" -v b="$T_RXE" 'BEGIN{printf " rxe0-up=%.2fs", b-a}')
awk -v s="$T_START" -v b="$T_BOOT" -v e="$T_END" -v rc="$RC" -v rxe="$rxe" -v logf="$LOG" \
  'BEGIN{printf "lab: exit=%s wall=%.2fs (prepare=%.2fs, qemu=%.2fs%s) log=%s\n", rc, e-s, b-s, e-b, rxe, logf}' >&2
exit "$RC"
