#!/bin/bash
# corosync-lab.sh: a two-node corosync 3 cluster with a corosync-qnetd quorum device, on this
# one machine, in network namespaces (for the corosync arbiter's tests). Needs root and the
# packages corosync corosync-qdevice corosync-qnetd (scripts/install-deps.sh).
#
# Usage: corosync-lab.sh --dir DIR ACTION [ARGS]      (or FTVM_LAB_DIR=DIR)
#   up                 create the namespaces, start qnetd, corosync + corosync-qdevice on n1 and n2,
#                      wait until both nodes are quorate with 3 votes (prints the timings)
#   down               stop everything by PID, delete the namespaces (idempotent; also after a
#                      failed or partial up); DIR is left in place (logs)
#   cut NODE           take NODE's (n1|n2|q) switch port down: it loses everyone else
#   heal NODE          bring it back
#   qnetd-stop | qnetd-start
#   corosync-stop NODE | corosync-start NODE   stop (SIGTERM, by PID) / start corosync and its
#                      qdevice on n1|n2 (a node whose corosync is gone, then comes back)
#   exec NODE CMD...   run CMD in NODE's network + mount namespace (exec: the PID is CMD's)
#   addr NODE          print NODE's address
#   ns NODE            print NODE's network namespace name (for `ip netns exec`)
#   status             corosync-quorumtool -s of both nodes, one line each
# cut/heal/qnetd-* print "<unix_ms> ACTION [NODE]" when the action took effect.
#
# Layout (names derive from a run id chosen at `up`, kept in DIR/run-id, so that two labs never
# collide; nothing is created in the root network namespace):
#   netns ftcl-ID-sw : bridge br0 with ports p-n1 p-n2 p-q (the switch)
#   netns ftcl-ID-n1 : eth0 10.213.0.1/24, corosync (nodeid 1, name n1) + corosync-qdevice
#   netns ftcl-ID-n2 : eth0 10.213.0.2/24, corosync (nodeid 2, name n2) + corosync-qdevice
#   netns ftcl-ID-q  : eth0 10.213.0.3/24, corosync-qnetd (TCP 5403, TLS off)
# The addresses exist only inside these namespaces. Each node has a holder process (sleep) that
# owns a private mount namespace in which DIR/NODE/{etc,run,lib} are bind-mounted over
# /etc/corosync, /run and /var/lib/corosync (corosync hard-codes /var/run/corosync.pid), so all
# tools run unchanged through `exec`. libqb IPC uses abstract unix sockets, which are per network
# namespace: a libquorum client only has to run in the node's namespace.
# Env (up): TOKEN_MS (1000), QDEV_TIMEOUT_MS (3000), QNETD_DPD_COEFF (3) — with qnetd's
# dead-peer detection at 3 heartbeats the cut-off node is told it lost before the survivor is
# told it won (see docs/ARCHITECTURE.md, "Corosync arbiter").
set -uo pipefail

die() { echo "corosync-lab: $*" >&2; exit 1; }
ms_now() { date +%s%3N; }

W=${FTVM_LAB_DIR:-}
if [ "${1:-}" = --dir ]; then W=${2:-}; shift 2; fi
[ -n "$W" ] || die "no lab directory: pass --dir DIR or set FTVM_LAB_DIR (usage: sed -n 2,20p $0)"
W=$(realpath -m "$W")
ACTION=${1:-}; shift || true

declare -A ADDR=([n1]=10.213.0.1 [n2]=10.213.0.2 [q]=10.213.0.3)
NODES=(n1 n2 q)

load_id() {
  [ -f "$W/run-id" ] || die "$W/run-id missing: no lab was brought up with --dir $W"
  ID=$(cat "$W/run-id")
  NS_SW=ftcl-$ID-sw
}
ns_of() { echo "ftcl-$ID-$1"; }
check_node() { [ -n "${ADDR[$1]:-}" ] || die "unknown node '$1' (n1, n2 or q)"; }

alive() {  # running and not a zombie (daemons are re-parented to PID 1, which may reap slowly)
  local st
  read -r _ _ st _ 2>/dev/null </proc/"$1"/stat || return 1
  [ "$st" != Z ]
}
holder_pid() {
  local p
  p=$(cat "$W/pids/holder-$1.pid" 2>/dev/null) || die "no holder for node $1 (lab not up?)"
  alive "$p" || die "holder of node $1 (pid $p) is gone: run down, then up"
  echo "$p"
}
# start_bg NODE TAG CMD...: nsenter is the backgrounded simple command and execs CMD, so $! is
# the daemon's PID.
start_bg() {
  local n=$1 tag=$2 h; shift 2
  h=$(holder_pid "$n") || exit 1
  nsenter -t "$h" -n -m -- "$@" </dev/null >>"$W/log/$tag.log" 2>&1 &
  echo $! >"$W/pids/$tag.pid"
}
in_ns() { local n=$1 h; shift; h=$(holder_pid "$n") || exit 1; nsenter -t "$h" -n -m -- "$@"; }
kill_pidfile() {  # FILE [timeout_s]: SIGTERM, wait, SIGKILL
  local f=$1 t=${2:-10} p i
  [ -f "$f" ] || return 0
  p=$(cat "$f")
  if [ -n "$p" ] && alive "$p"; then
    kill -TERM "$p" 2>/dev/null
    for ((i = 0; i < t * 50; i++)); do alive "$p" || break; sleep 0.02; done
    if alive "$p"; then echo "corosync-lab: pid $p ($f) ignored SIGTERM, SIGKILL" >&2; kill -KILL "$p" 2>/dev/null; fi
  fi
  rm -f "$f"
}
wait_until() {  # TIMEOUT_S CMD...
  local t=$1 i; shift
  for ((i = 0; i < t * 20; i++)); do "$@" && return 0; sleep 0.05; done
  return 1
}
start_qnetd() {
  start_bg q qnetd corosync-qnetd -f -d -s off -l "${ADDR[q]}" -p 5403 \
    -S "dpd_interval_coefficient=${QNETD_DPD_COEFF:-3}"
}
three_votes() { in_ns "$1" corosync-quorumtool -s 2>/dev/null | grep -Eq '^Total votes: +3$'; }

do_down() {
  local t0 f n p
  set +e
  t0=$(ms_now)
  [ -f "$W/run-id" ] || { echo "down: nothing to do"; return 0; }
  load_id
  for f in "$W"/pids/qdevice-*.pid; do [ -e "$f" ] && kill_pidfile "$f" 10; done
  # both corosyncs at once (alone, each waits a token timeout for the other's departure)
  # (wait for these jobs only: after a failed `up` this shell's children include the daemons)
  local jobs=()
  for f in "$W"/pids/corosync-*.pid; do
    [ -e "$f" ] || continue
    kill_pidfile "$f" 15 &
    jobs+=($!)
  done
  [ ${#jobs[@]} -eq 0 ] || wait "${jobs[@]}"
  for f in "$W"/pids/*.pid; do [ -e "$f" ] && kill_pidfile "$f" 5; done
  # anything still inside our namespaces was started into them by this lab's users: ours
  for n in "${NODES[@]}"; do
    ip netns list | grep -qw "$(ns_of "$n")" || continue
    for p in $(ip netns pids "$(ns_of "$n")"); do
      echo "corosync-lab: leftover pid $p in $(ns_of "$n") ($(tr '\0' ' ' </proc/"$p"/cmdline 2>/dev/null)), SIGKILL" >&2
      kill -KILL "$p" 2>/dev/null
    done
  done
  for n in "${NODES[@]}" sw; do
    if ip netns list | grep -qw "ftcl-$ID-$n"; then ip netns del "ftcl-$ID-$n" || echo "corosync-lab: ip netns del ftcl-$ID-$n failed" >&2; fi
  done
  rm -f "$W/run-id"
  echo "down: $(( $(ms_now) - t0 )) ms"
}

do_up() {
  local t0 t_net n
  case "$W/" in /run/*|/var/run/*|/etc/corosync/*|/var/lib/corosync/*)
    die "the lab directory must not be under /run, /etc/corosync or /var/lib/corosync (hidden by the bind mounts)";; esac
  [ "$(id -u)" = 0 ] || die "must run as root (network and mount namespaces)"
  for b in corosync corosync-qdevice corosync-qnetd corosync-keygen corosync-quorumtool nsenter unshare; do
    command -v "$b" >/dev/null || die "$b not found: run scripts/install-deps.sh"
  done
  [ ! -f "$W/run-id" ] || die "a lab is already up in $W (run-id $(cat "$W/run-id")): run down first"
  t0=$(ms_now)
  mkdir -p "$W/pids" "$W/log" || die "cannot create $W"
  ID=$(od -An -N3 -tx1 /dev/urandom | tr -d ' \n')
  echo "$ID" >"$W/run-id"
  NS_SW=ftcl-$ID-sw
  trap 'echo "corosync-lab: up failed, tearing down" >&2; do_down >&2' EXIT
  set -e
  for n in "${NODES[@]}"; do mkdir -p "$W/$n/etc" "$W/$n/run" "$W/$n/lib"; done
  mkdir -p "$W/n1/run/corosync-qdevice" "$W/n2/run/corosync-qdevice" "$W/q/run/corosync-qnetd"

  ip netns add "$NS_SW"
  ip -n "$NS_SW" link set lo up
  ip -n "$NS_SW" link add br0 type bridge
  ip -n "$NS_SW" link set br0 up
  for n in "${NODES[@]}"; do
    ip netns add "$(ns_of $n)"
    ip -n "$NS_SW" link add "p-$n" type veth peer name eth0 netns "$(ns_of $n)"
    ip -n "$NS_SW" link set "p-$n" master br0 up
    ip -n "$(ns_of $n)" link set lo up
    ip -n "$(ns_of $n)" addr add "${ADDR[$n]}/24" dev eth0
    ip -n "$(ns_of $n)" link set eth0 up
  done

  corosync-keygen -k "$W/authkey" >/dev/null 2>&1
  cat >"$W/corosync.conf" <<CONF
totem {
    version: 2
    cluster_name: ftcl$ID
    transport: knet
    token: ${TOKEN_MS:-1000}
    crypto_cipher: aes256
    crypto_hash: sha256
}
nodelist {
    node {
        ring0_addr: ${ADDR[n1]}
        nodeid: 1
        name: n1
    }
    node {
        ring0_addr: ${ADDR[n2]}
        nodeid: 2
        name: n2
    }
}
quorum {
    provider: corosync_votequorum
    device {
        model: net
        votes: 1
        timeout: ${QDEV_TIMEOUT_MS:-3000}
        net {
            host: ${ADDR[q]}
            port: 5403
            algorithm: ffsplit
            tie_breaker: lowest
            tls: off
        }
    }
}
system {
    # Two "hosts" share this machine's cores: corosync's default SCHED_RR 99 lets both nodes
    # spin both cores for 1-2 s while a new membership forms after a cut, starving everything
    # else (ftd, its guard). Normal priority here; on real hosts keep the default.
    sched_rr: no
    priority: 0
}
logging {
    to_stderr: yes
    to_syslog: no
    to_logfile: no
    timestamp: hires
}
CONF
  for n in n1 n2; do
    install -m 0400 "$W/authkey" "$W/$n/etc/authkey"
    install -m 0644 "$W/corosync.conf" "$W/$n/etc/corosync.conf"
  done
  for n in "${NODES[@]}"; do
    rm -f "$W/$n/ready"
    ip netns exec "$(ns_of $n)" unshare -m --propagation private -- sh -c '
      mount --bind "$0/etc" /etc/corosync &&
      mount --bind "$0/lib" /var/lib/corosync &&
      mount --bind "$0/run" /run &&
      touch "$0/ready" && exec sleep infinity' "$W/$n" </dev/null >>"$W/log/holder-$n.log" 2>&1 &
    echo $! >"$W/pids/holder-$n.pid"
  done
  for n in "${NODES[@]}"; do
    wait_until 5 test -e "$W/$n/ready" || die "the namespace holder of $n did not come up (see $W/log/holder-$n.log)"
  done
  t_net=$(ms_now)
  start_qnetd
  for n in n1 n2; do start_bg $n corosync-$n corosync -f; done
  for n in n1 n2; do
    wait_until 10 in_ns $n corosync-cfgtool -s >/dev/null 2>&1 || die "corosync on $n does not answer (see $W/log/corosync-$n.log)"
    start_bg $n qdevice-$n corosync-qdevice -f -d
  done
  for n in n1 n2; do
    wait_until 60 three_votes $n || { in_ns $n corosync-quorumtool -s >&2; die "node $n not quorate with 3 votes within 60 s (logs in $W/log)"; }
  done
  set +e
  trap - EXIT
  echo "up: run id $ID, namespaces $((t_net - t0)) ms, quorate with 3 votes after $(( $(ms_now) - t0 )) ms"
}

case $ACTION in
  up) do_up ;;
  down) do_down ;;
  cut|heal)
    load_id; n=${1:-}; check_node "$n"
    ip -n "$NS_SW" link set "p-$n" $([ "$ACTION" = cut ] && echo down || echo up) || die "ip link set p-$n failed"
    echo "$(ms_now) $ACTION $n" ;;
  qnetd-stop) load_id; kill_pidfile "$W/pids/qnetd.pid" 10; echo "$(ms_now) qnetd-stop" ;;
  qnetd-start) load_id; start_qnetd; echo "$(ms_now) qnetd-start" ;;
  corosync-stop)
    load_id; n=${1:-}; [ "$n" = n1 ] || [ "$n" = n2 ] || die "corosync-stop: n1 or n2"
    kill_pidfile "$W/pids/qdevice-$n.pid" 10
    kill_pidfile "$W/pids/corosync-$n.pid" 15
    echo "$(ms_now) corosync-stop $n" ;;
  corosync-start)
    load_id; n=${1:-}; [ "$n" = n1 ] || [ "$n" = n2 ] || die "corosync-start: n1 or n2"
    start_bg "$n" "corosync-$n" corosync -f
    wait_until 10 in_ns "$n" corosync-cfgtool -s >/dev/null 2>&1 || die "corosync on $n does not answer (see $W/log/corosync-$n.log)"
    start_bg "$n" "qdevice-$n" corosync-qdevice -f -d
    echo "$(ms_now) corosync-start $n" ;;
  exec) load_id; n=${1:-}; check_node "$n"; shift; [ $# -gt 0 ] || die "exec $n: no command"
    h=$(holder_pid "$n") || exit 1
    exec nsenter -t "$h" -n -m -- "$@" ;;
  addr) n=${1:-}; check_node "$n"; echo "${ADDR[$n]}" ;;
  ns) load_id; n=${1:-}; check_node "$n"; ns_of "$n" ;;
  status)
    load_id
    for n in n1 n2; do
      s=$(in_ns $n corosync-quorumtool -s 2>&1)
      printf '%s: quorate=%s total_votes=%s\n' $n "$(awk -F': *' '/^Quorate:/{print $2}' <<<"$s")" \
        "$(awk -F': *' '/^Total votes:/{print $2}' <<<"$s")"
    done ;;
  *) sed -n '2,22p' "$0" >&2; exit 2 ;;
esac
