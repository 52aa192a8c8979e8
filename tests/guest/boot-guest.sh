#!/bin/bash
# Boots the ftvm Linux test guest (built by build-guest.sh) in QEMU with its RAM in a shared
# memfd backend, serial console and QMP on unix sockets in a run directory.
#
# Usage: tests/guest/boot-guest.sh [options] [-- extra qemu args...]
#   -g, --guest DIR     dir with vmlinux + initramfs.cpio.gz (default $FTVM_GUEST_DIR, else
#                       <repo>/build/guest)
#   -d, --dir DIR       run dir for serial.sock, qmp.sock, qemu.pid, cmdline (default: new
#                       /tmp/ftvm-guest.XXXXXX)
#   -m, --mem MIB       guest RAM in MiB (default 256; also "1G")
#   -s, --smp N         vCPUs (default $SMP or 1)
#   -a, --append STR    extra kernel parameters, e.g. "ftvm_dirty_kib_s=4096 ftvm_tick_ms=50"
#   --accel A           tcg or kvm (default $FTVM_ACCEL or tcg)
#   --cpu MODEL         -cpu model (default max)
#   --paused            start with -S (resume with QMP "cont")
#   --log               keep a serial log in DIR/serial.log (host time per line); the guest is
#                       started paused and resumed only after the logger is connected
#   --smoke             boot, wait for "FTVM-GUEST READY" and --ticks ticks, print timings,
#                       kill QEMU; exit 0 on success
#   --ticks N           ticks to wait for in --smoke (default 5)
#   --timeout S         --smoke timeout in seconds (default 120)
# Output: stdout gets the QEMU PID only (one line); everything else goes to stderr.
# Without --smoke QEMU keeps running (daemonized): stop it with kill PID.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
GUEST=${FTVM_GUEST_DIR:-$HERE/../../build/guest}
RUN=
MEM=256
SMP_N=${SMP:-1}
APPEND=
ACCEL=${FTVM_ACCEL:-tcg}
CPU=max
PAUSED=0
LOG=0
SMOKE=0
TICKS=5
TIMEOUT=120
EXTRA=()
PY=/usr/bin/python3

usage() { sed -n '2,24p' "$0" >&2; exit 2; }
while [[ $# -gt 0 ]]; do
  case $1 in
    -g|--guest) GUEST=$2; shift 2 ;;
    -d|--dir) RUN=$2; shift 2 ;;
    -m|--mem) MEM=$2; shift 2 ;;
    -s|--smp) SMP_N=$2; shift 2 ;;
    -a|--append) APPEND="$APPEND $2"; shift 2 ;;
    --accel) ACCEL=$2; shift 2 ;;
    --cpu) CPU=$2; shift 2 ;;
    --paused) PAUSED=1; shift ;;
    --log) LOG=1; shift ;;
    --smoke) SMOKE=1; shift ;;
    --ticks) TICKS=$2; shift 2 ;;
    --timeout) TIMEOUT=$2; shift 2 ;;
    -h|--help) usage ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "boot-guest: unknown option $1" >&2; usage ;;
  esac
done
case $MEM in
  *[Gg]) MEM=$(( ${MEM%[Gg]} * 1024 )) ;;
  *[Mm]) MEM=${MEM%[Mm]} ;;
esac
[[ $MEM =~ ^[0-9]+$ ]] || { echo "boot-guest: bad --mem" >&2; exit 2; }
for f in vmlinux initramfs.cpio.gz; do
  [[ -s $GUEST/$f ]] || { echo "boot-guest: $GUEST/$f missing (run tests/guest/build-guest.sh $GUEST)" >&2; exit 1; }
done
GUEST=$(cd "$GUEST" && pwd)
if [[ -z $RUN ]]; then RUN=$(mktemp -d /tmp/ftvm-guest.XXXXXX); else mkdir -p "$RUN"; fi
RUN=$(cd "$RUN" && pwd)
rm -f "$RUN/serial.sock" "$RUN/qmp.sock" "$RUN/qemu.pid"

start_paused=$PAUSED
((SMOKE || LOG)) && start_paused=1
cmd=(qemu-system-x86_64
  -accel "$ACCEL" -machine q35,memory-backend=mem0 -cpu "$CPU" -smp "$SMP_N" -m "${MEM}M"
  -object "memory-backend-memfd,id=mem0,size=${MEM}M,share=on"
  -kernel "$GUEST/vmlinux" -initrd "$GUEST/initramfs.cpio.gz"
  -append "console=ttyS0 panic=-1 quiet${APPEND}"
  -nodefaults -display none -no-user-config -no-reboot
  -chardev "socket,id=ser0,path=$RUN/serial.sock,server=on,wait=off" -serial chardev:ser0
  -qmp "unix:$RUN/qmp.sock,server=on,wait=off"
  -pidfile "$RUN/qemu.pid" -daemonize)
((start_paused)) && cmd+=(-S)
cmd+=("${EXTRA[@]}")
printf '%q ' "${cmd[@]}" > "$RUN/cmdline"; echo >> "$RUN/cmdline"

t_start=$(date +%s.%N)
"${cmd[@]}" 2> "$RUN/qemu.stderr" || { cat "$RUN/qemu.stderr" >&2; echo "boot-guest: QEMU failed to start" >&2; exit 1; }
[[ -s $RUN/qemu.stderr ]] && sed 's/^/boot-guest: qemu: /' "$RUN/qemu.stderr" >&2
PID=$(cat "$RUN/qemu.pid")
echo "boot-guest: QEMU pid $PID, run dir $RUN (mem ${MEM} MiB, smp $SMP_N, accel $ACCEL, cpu $CPU)" >&2

# Python helper: serial logger / QMP cont / smoke check.
helper() {
  "$PY" - "$@" <<'EOF'
import json, os, socket, sys, time
mode, run = sys.argv[1], sys.argv[2]
def connect(path, timeout=10):
    t0 = time.time()
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(path); return s
        except (FileNotFoundError, ConnectionRefusedError):
            s.close()
            if time.time() - t0 > timeout: raise
            time.sleep(0.01)
def qmp(cmds):
    s = connect(os.path.join(run, 'qmp.sock')); f = s.makefile('rb')
    json.loads(f.readline())
    for c in ['qmp_capabilities'] + cmds:
        s.sendall(json.dumps({'execute': c}).encode() + b'\n')
        while True:
            r = json.loads(f.readline())
            if 'event' in r: continue
            if 'error' in r: raise SystemExit('QMP %s: %s' % (c, r['error']))
            break
    s.close()
if mode == 'log':       # log RUN RESUME : daemon that writes DIR/serial.log
    resume = sys.argv[3] == '1'
    s = connect(os.path.join(run, 'serial.sock'))
    if os.fork(): sys.exit(0)
    os.setsid()
    nul = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1): os.dup2(nul, fd)      # never hold the caller's stdout (e.g. $(...))
    err = os.open(os.path.join(run, 'serial-logger.err'), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(err, 2)
    if resume: qmp(['cont'])
    buf = b''
    with open(os.path.join(run, 'serial.log'), 'w') as out:
        while True:
            try: d = s.recv(65536)
            except OSError: break
            if not d: break
            buf += d
            while b'\n' in buf:
                line, buf = buf.split(b'\n', 1)
                out.write('%.3f %s\n' % (time.time(), line.decode(errors='replace').rstrip('\r'))); out.flush()
    sys.exit(0)
if mode == 'smoke':     # smoke RUN TICKS TIMEOUT T_START
    ticks, timeout, t_start = int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5])
    s = connect(os.path.join(run, 'serial.sock'))
    s.settimeout(0.5)
    t_cont = time.time(); qmp(['cont'])
    out = open(os.path.join(run, 'serial.log'), 'w')
    buf = b''; t_ready = None; seen = []; bad = []; errors = 0
    while True:
        if time.time() - t_cont > timeout:
            print('boot-guest: smoke FAILED: timeout after %.0f s (ready=%s ticks=%s)' % (timeout, t_ready is not None, seen), file=sys.stderr)
            sys.exit(1)
        try: d = s.recv(65536)
        except socket.timeout: continue
        if not d:
            print('boot-guest: smoke FAILED: serial closed (QEMU exited?)', file=sys.stderr); sys.exit(1)
        buf += d
        while b'\n' in buf:
            line, buf = buf.split(b'\n', 1)
            line = line.decode(errors='replace').rstrip('\r'); now = time.time()
            out.write('%.3f %s\n' % (now, line)); out.flush()
            if line == 'FTVM-GUEST READY': t_ready = now
            elif line.startswith('tick ') and t_ready is not None:
                seen.append((now, int(line.split()[1])))
            elif line.startswith('WL BAD'): bad.append(line)
            elif 'INIT:' in line and 'fail' in line: print('boot-guest: ' + line, file=sys.stderr)
        if len(seen) >= ticks: break
    nums = [n for _, n in seen]
    ok = nums == list(range(nums[0], nums[0] + len(nums))) and nums[0] == 0 and not bad
    per = (seen[-1][0] - seen[0][0]) / max(1, len(seen) - 1)
    print('boot-guest: smoke %s: start->READY %.2f s (cont->READY %.2f s, qemu start %.2f s), ticks %s, %.0f ms/tick%s'
          % ('OK' if ok else 'FAILED', t_ready - t_start, t_ready - t_cont, t_cont - t_start, nums, per * 1000,
             (', ' + '; '.join(bad)) if bad else ''), file=sys.stderr)
    sys.exit(0 if ok else 1)
EOF
}

if ((SMOKE)); then
  rc=0
  helper smoke "$RUN" "$TICKS" "$TIMEOUT" "$t_start" || rc=$?
  kill "$PID" 2>/dev/null || true
  for _ in $(seq 50); do kill -0 "$PID" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$PID" 2>/dev/null || true
  echo "$PID"
  exit $rc
fi
if ((LOG)); then
  helper log "$RUN" "$((1 - PAUSED))" < /dev/null > /dev/null
fi
echo "$PID"
