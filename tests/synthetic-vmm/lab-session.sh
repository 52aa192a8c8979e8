#!/bin/sh
# A replication session end to end inside the RDMA lab guest (issue 3): the synthetic VMM
# (synthvm) protected by the real ftd daemons over --transport rdma|tcp on rxe0's address, with
# the lab kernel's soft-dirty tracker (no PAGEMAP_SCAN in Debian's 6.1). Runs in /lab next to
# synthvm, ftd and ftctl (tests/rdma-lab/lab.sh -a ...), busybox sh.
#
# Usage:
#   lab-session.sh single SCENARIO TRANSPORT   standby and primary ftd in this guest (rxe0 loopback)
#   lab-session.sh standby SCENARIO TRANSPORT  two-host variant, standby side (two-hosts.sh server)
#   lab-session.sh primary SCENARIO TRANSPORT  two-host variant, primary side (two-hosts.sh client)
# SCENARIO: kill-vmm (kill -9 the primary synthvm) | crash-mid-epoch (the primary ftd exits in the
# middle of sending an epoch: the standby must discard it and resume from the one before).
# TRANSPORT: rdma | tcp.
# Checks (synthvm --tool check-failover): the standby activated the twin, its full-RAM digest
# equals the primary's digest of the committed epoch, the twin verified every page byte for byte
# against the committed device state before resuming, its ticks continue from the checkpoint
# (single: within [last tick before the committed cut + 1, primary's last tick + 1]), it is
# executing; the primary used the soft-dirty tracker and the requested transport.
# Environment: SYN_RUN_S (seconds protected before the failure, default 6), SYN_MEM_MIB (32),
# SYN_RATE_KIB_S (1024), SYN_EPOCH_MS (50).
set -u
LAB=$(cd "$(dirname "$0")" && pwd)
SYN=$LAB/synthvm
VM=vm1
PORT=7410
RUN_S=${SYN_RUN_S:-6}
MEM=${SYN_MEM_MIB:-32}
RATE=${SYN_RATE_KIB_S:-1024}
EPOCH=${SYN_EPOCH_MS:-50}
W=/tmp/synlab
rm -rf "$W" && mkdir -p "$W" || exit 2
PIDS=""

say() { echo "lab-session: $*"; }
die() {
  say "FAIL: $*"
  for f in "$W"/*.ftd.log "$W"/standby/vms/$VM/twin.log "$W"/g/synthvm.log; do
    [ -f "$f" ] || continue
    echo "---- last lines of $f"
    tail -n 30 "$f"
  done
  cleanup
  exit 1
}
cleanup() {
  for p in $PIDS; do kill -9 "$p" 2>/dev/null; done
  [ -f "$W/standby/vms/$VM/twin.pid" ] && kill -9 "$(cat "$W/standby/vms/$VM/twin.pid")" 2>/dev/null
  return 0
}
# wait_for SECONDS DESCRIPTION COMMAND...: polls COMMAND every 0.1 s
wait_for() {
  n=$(($1 * 10)); what=$2; shift 2
  while ! "$@" >/dev/null 2>&1; do
    n=$((n - 1))
    [ $n -gt 0 ] || die "timed out waiting for $what"
    sleep 0.1
  done
}

# Replication key (issue 12). Both transports authenticate (RDMA: handshake in the first SENDs,
# tagged SENDs, keyed Commit digest over the one-sided epoch writes), so both ftd use a key:
# $LAB/lab-peer.key when it was copied in (the two-host tests do: the same file on both guests,
# made at build time with `ftd --generate-key`), else single mode generates one. Prints ftd's
# arguments on stdout (messages go to stderr).
security_args() {  # TRANSPORT
  if [ -f "$LAB/lab-peer.key" ]; then
    cp "$LAB/lab-peer.key" "$W/peer.key" && chmod 600 "$W/peer.key" || { say "copying lab-peer.key failed" >&2; echo "--insecure"; return; }
  elif [ "$mode" = single ]; then
    [ -f "$W/peer.key" ] || "$LAB/ftd" --generate-key "$W/peer.key" >/dev/null || say "ftd --generate-key failed" >&2
  else
    say "no $LAB/lab-peer.key for the two-host variant: running --insecure" >&2
    echo "--insecure"; return
  fi
  echo "--key-file $W/peer.key"
}

start_ftd() {  # NAME LISTEN
  mkdir -p "$W/$1"
  listen=""
  [ -n "$2" ] && listen="--listen $2"
  # shellcheck disable=SC2046,SC2086
  "$LAB/ftd" --run-dir "$W/$1" --log "$W/$1.ftd.log" $listen --heartbeat-timeout-ms 1000 $(security_args "$tr") \
    --enable-fault-injection --verify-activation --verify-every-commit --stats-dir "$W" \
    --memory-reserve-mib 16 --qemu-binary "$LAB/synthvm" > "$W/$1.ftd.out" 2>&1 &
  eval "FTD_$1=$!"
  PIDS="$PIDS $!"
  wait_for 20 "ftd $1 control socket" test -S "$W/$1/ftd.sock"
}
ctl() {  # NAME ARGS...
  _c=$1; shift
  "$LAB/ftctl" --control "$W/$_c/ftd.sock" "$@"
}

boot_synthvm() {
  mkdir -p "$W/g"
  "$SYN" -name guest=g -machine q35,memory-backend=mem0 -m "$MEM" \
    -object "memory-backend-memfd,id=mem0,size=${MEM}M,share=on" -nodefaults -display none \
    -chardev "socket,id=ser0,path=$W/g/serial.sock,server=on,wait=off" -serial chardev:ser0 \
    -qmp "unix:$W/g/qmp.sock,server=on,wait=off" \
    -append "synth_rate_kib_s=$RATE synth_tick_ms=100" > "$W/g/synthvm.log" 2>&1 &
  VMPID=$!
  PIDS="$PIDS $VMPID"
  wait_for 10 "synthvm QMP socket" test -S "$W/g/qmp.sock"
  "$SYN" --tool console "$W/g/serial.sock" "$W/primary-console.log" &
  PIDS="$PIDS $!"
  wait_for 20 "primary ticks" grep -q ' tick 3$' "$W/primary-console.log"
  say "synthvm pid $VMPID running (${MEM} MiB, ${RATE} KiB/s)"
}

enable() {  # PEER_IP TRANSPORT (a standby not listening yet is retried by the primary ftd)
  ctl primary enable --qmp "$W/g/qmp.sock" --peer "$1:$PORT" --name $VM --epoch-ms "$EPOCH" \
    --transport "$2" --timeout 120 > "$W/enable.out" 2>&1 || { cat "$W/enable.out"; die "ftctl enable failed"; }
  ctl primary status --json $VM > "$W/primary-status.json" || die "ftctl status failed"
  grep -q '"tracker": "soft-dirty"' "$W/primary-status.json" ||
    { cat "$W/primary-status.json"; die "the primary does not use the soft-dirty tracker"; }
  grep -q "\"transport\": \"$2\"" "$W/primary-status.json" ||
    { cat "$W/primary-status.json"; die "the link does not use transport $2"; }
  # With a key (every variant but a two-host run without lab-peer.key) the link is authenticated.
  if ! security_args "$2" 2>/dev/null | grep -q -- --insecure; then
    grep -q '"security": "authenticated' "$W/primary-status.json" ||
      { cat "$W/primary-status.json"; die "the $2 link is not authenticated although both ftd have a key"; }
  fi
  say "protected over $2 with the soft-dirty tracker ($(grep -m1 -o '"security": "[^"]*"' "$W/primary-status.json"))"
}

run_protected() {
  sleep "$RUN_S"
  ctl primary status --json $VM > "$W/primary-status.json" || die "ftctl status failed"
  grep -q '"state": "protected"' "$W/primary-status.json" ||
    { cat "$W/primary-status.json"; die "VM not protected after ${RUN_S}s"; }
  say "primary after ${RUN_S}s: $(grep -m1 '"epoch":' "$W/primary-status.json" | tr -d ' ,') \
$(grep -m1 '"p50"' "$W/primary-status.json" | tr -d ' ,') ms pause (p50)"
}

fail_primary() {  # SCENARIO
  case $1 in
    kill-vmm)
      say "kill -9 primary synthvm pid $VMPID"
      kill -9 "$VMPID" ;;
    crash-mid-epoch)
      ctl primary fault $VM crash-mid-epoch || die "ftctl fault failed"
      eval "fp=\$FTD_primary"
      wait_for 10 "the primary ftd to exit from the injected fault" sh -c "! kill -0 $fp"
      wait_for 5 "the guard to kill the primary synthvm" sh -c "! kill -0 $VMPID" ;;
    *) die "unknown scenario $1" ;;
  esac
}

standby_active() { ctl standby status --json > "$W/standby-status.json" && grep -q '"state": "active"' "$W/standby-status.json"; }

check_standby() {  # SCENARIO [--primary-console ...]
  scen=$1; shift
  wait_for 30 "the standby to activate the twin" standby_active
  sleep 2  # some ticks from the twin
  ctl standby status --json > "$W/standby-status.json" || die "ftctl status on the standby failed"
  "$SYN" --tool check-failover --status "$W/standby-status.json" --vm $VM --twin-console "$W/twin-console.log" \
    --min-epoch 10 "$@" || die "check-failover"
  if [ "$scen" = crash-mid-epoch ]; then
    line=$(grep -o 'discarding epoch [0-9]* (begun, never committed[^)]*); resuming from epoch [0-9]*' "$W/standby.ftd.log")
    [ -n "$line" ] || die "the standby log does not report the discarded epoch"
    b=$(echo "$line" | sed 's/discarding epoch \([0-9]*\) .*/\1/')
    r=$(echo "$line" | sed 's/.*resuming from epoch \([0-9]*\)$/\1/')
    [ "$r" -eq $((b - 1)) ] || die "resumed from epoch $r after discarding $b"
    say "standby: $line"
  fi
}

twin_console() {  # started before the twin exists: the tool waits for the socket, and follows
  # the twin across restarts (a twin destroyed before its first commit is replaced on the same path)
  "$SYN" --tool console "$W/standby/vms/$VM/serial.sock" "$W/twin-console.log" --follow &
  PIDS="$PIDS $!"
}

mode=${1:-}
case $mode in
  single)
    [ $# -eq 3 ] || { sed -n '2,20p' "$0"; exit 2; }
    scen=$2 tr=$3
    boot_synthvm
    start_ftd standby "$LAB_IP:$PORT"
    start_ftd primary ""
    twin_console
    enable "$LAB_IP" "$tr"
    run_protected
    fail_primary "$scen"
    check_standby "$scen" --primary-console "$W/primary-console.log" --epochs "$W/$VM.epochs.jsonl"
    ;;
  standby)
    [ $# -eq 3 ] || { sed -n '2,20p' "$0"; exit 2; }
    scen=$2 tr=$3
    start_ftd standby "$LAB_IP:$PORT"
    twin_console
    say "standby listening on $LAB_IP:$PORT"
    wait_for $((RUN_S + 120)) "a session from the primary" test -S "$W/standby/vms/$VM/serial.sock"
    check_standby "$scen"
    ;;
  primary)
    [ $# -eq 3 ] || { sed -n '2,20p' "$0"; exit 2; }
    scen=$2 tr=$3
    boot_synthvm
    start_ftd primary ""
    enable "$LAB_PEER_IP" "$tr"
    run_protected
    fail_primary "$scen"
    if [ "$scen" = kill-vmm ]; then
      wait_for 10 "the primary ftd to report primary-lost" sh -c \
        "'$LAB/ftctl' --control '$W/primary/ftd.sock' status --json $VM | grep -q '\"state\": \"primary-lost\"'"
    fi
    say "primary: last console lines: $(tail -n 2 "$W/primary-console.log" | tr '\n' ' ')"
    sleep 8  # keep the link's guest up while the standby activates and checks
    ;;
  *) sed -n '2,20p' "$0"; exit 2 ;;
esac
cleanup
say "PASS $*"
exit 0
