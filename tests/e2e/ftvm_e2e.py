"""End-to-end test harness: real QEMU guests, real ftd daemons, real sockets.

Every process a scenario starts is recorded and killed by PID when the scenario ends, pass or
fail (Env.__exit__). Each Env has its own temporary directory (sockets, run dirs, logs) and its
own TCP port, so two runs never collide. Used by the e2e tests and by bench/.
"""
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

SRC = os.environ.get('FTVM_SOURCE_DIR', os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..')))
BUILD = os.environ.get('FTVM_BUILD_DIR', os.path.join(SRC, 'build'))
GUEST = os.environ.get('FTVM_GUEST_DIR', os.path.join(BUILD, 'guest'))
ACCEL = os.environ.get('FTVM_ACCEL', 'tcg')


class Failure(Exception):
    pass


def check(cond, msg):
    if not cond:
        raise Failure(msg)


def log(*a):
    print('[%s]' % time.strftime('%H:%M:%S'), *a, flush=True)


def free_port():
    s = socket.socket()
    s.bind(('127.0.0.1', 0))
    p = s.getsockname()[1]
    s.close()
    return p


def make_key(path):
    """Creates a replication key file (mode 0600) with `ftd --generate-key`."""
    r = subprocess.run([os.path.join(BUILD, 'ftd'), '--generate-key', path], capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        raise Failure('ftd --generate-key %s failed: %s' % (path, r.stderr))
    return path


def wait_for(pred, timeout, what, interval=0.05):
    t0 = time.time()
    while True:
        v = pred()
        if v:
            return v
        if time.time() - t0 > timeout:
            raise Failure('timed out after %.0f s waiting for %s' % (timeout, what))
        time.sleep(interval)


def pid_alive(pid):
    try:
        with open('/proc/%d/stat' % pid) as f:
            return f.read().split(') ')[1][0] != 'Z'
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


FENCE_SCRIPT = r'''#!/bin/sh
# One-shot test fence device shared by both "hosts" (like a power switch both can reach): the
# first fence wins, the loser's fails. fence-standby kills the standby host (its ftd and twin),
# fence-primary the primary host (its ftd and the guest QEMU); like a power switch it reports
# success only once the host is off.
D=%(dir)s
echo "$(date +%%s.%%N) $FTVM_FENCE_ACTION peer=$FTVM_PEER vm=$FTVM_VM" >> $D/fence.calls
mkdir $D/fence.lock 2>/dev/null || { echo "fence device already fired"; exit 1; }
echo "$FTVM_FENCE_ACTION" > $D/fence.lock/by
case "$FTVM_FENCE_ACTION" in
  fence-standby) victims="$(cat $D/standby.ftd.pid) $(cat $D/standby/vms/%(vm)s/twin.pid 2>/dev/null)" ;;
  fence-primary) victims="$(cat $D/primary.ftd.pid) $(cat $D/primary.qemu.pid)" ;;
esac
kill -9 $victims 2>/dev/null
for i in $(seq 200); do
  alive=0
  # gone = no thread of it left that is not a zombie (a dying process's leader turns zombie
  # before its other threads have exited)
  for p in $victims; do
    for t in /proc/$p/task/*/status; do
      [ -e "$t" ] && ! grep -q '^State:.*[ZX]' "$t" 2>/dev/null && alive=1
    done
  done
  [ $alive = 0 ] && break
  sleep 0.01
done
echo fenced
'''


def write_fence(env, vm):
    """Writes the scenario's fence command (see FENCE_SCRIPT) and returns its path. The test
    keeps ENV/{primary,standby}.ftd.pid and ENV/primary.qemu.pid current."""
    path = env.path('fence.sh')
    with open(path, 'w') as f:
        f.write(FENCE_SCRIPT % {'dir': env.dir, 'vm': vm})
    os.chmod(path, 0o755)
    return path


class Serial(threading.Thread):
    """Reads a QEMU serial chardev socket; keeps (host_time, line) pairs."""

    def __init__(self, path, logpath):
        super().__init__(daemon=True)
        self.path, self.logpath = path, logpath
        self.lines = []
        self.lock = threading.Lock()
        self.connected = threading.Event()
        self.stop = False
        self.sock = None
        self.send_lock = threading.Lock()

    def run(self):
        t0 = time.time()
        while not self.stop:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(self.path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                s.close()
                if time.time() - t0 > 120:
                    return
                time.sleep(0.02)
        else:
            return
        self.sock = s
        self.connected.set()
        buf = b''
        with open(self.logpath, 'a') as out:
            while not self.stop:
                r, _, _ = select.select([s], [], [], 0.2)
                if not r:
                    continue
                try:
                    d = s.recv(65536)
                except OSError:
                    break
                if not d:
                    break
                buf += d
                while b'\n' in buf:
                    line, buf = buf.split(b'\n', 1)
                    line = line.decode(errors='replace').rstrip('\r')
                    ts = time.time()
                    with self.lock:
                        self.lines.append((ts, line))
                    out.write('%.3f %s\n' % (ts, line))
                    out.flush()
        s.close()

    def send(self, line):
        """Types `line` on the guest's console (QEMU serves one client per serial socket: ours)."""
        check(self.connected.is_set() and self.sock is not None, 'serial %s not connected' % self.path)
        with self.send_lock:
            self.sock.sendall(line.encode() + b'\n')

    def matching(self, prefix):
        """(host_time, line) of every line starting with `prefix`."""
        with self.lock:
            return [(ts, l) for ts, l in self.lines if l.startswith(prefix)]

    def ticks(self):
        with self.lock:
            out = []
            for ts, l in self.lines:
                p = l.split()
                if len(p) == 2 and p[0] == 'tick' and p[1].isdigit():
                    out.append((ts, int(p[1])))
            return out

    def all(self):
        with self.lock:
            return list(self.lines)

    def wait_ticks(self, n, timeout):
        return wait_for(lambda: len(self.ticks()) >= n and self.ticks(), timeout, '%d ticks on %s' % (n, self.path))


def qmp(path, cmds, timeout=10):
    """Runs QMP commands on a socket nobody else holds; returns the list of returns."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(path)
    f = s.makefile('rb')
    json.loads(f.readline())
    res = []
    for c in [('qmp_capabilities', None)] + cmds:
        name, args = c if isinstance(c, tuple) else (c, None)
        msg = {'execute': name}
        if args is not None:
            msg['arguments'] = args
        s.sendall(json.dumps(msg).encode() + b'\n')
        while True:
            r = json.loads(f.readline())
            if 'event' in r:
                continue
            if 'error' in r:
                raise Failure('QMP %s on %s: %s' % (name, path, r['error']))
            res.append(r['return'])
            break
    s.close()
    return res[1:]


class Env:
    """One scenario: temp dir, processes, cleanup."""

    def __init__(self, name, hb_timeout_ms=1000, keep=False):
        self.name = name
        self.dir = tempfile.mkdtemp(prefix='ftvm-%s.' % name, dir='/tmp')
        self.pids = []          # (pid, what)
        self.procs = []
        self.serials = []
        self.hb_timeout_ms = hb_timeout_ms
        self.port = free_port()
        self.keep = keep or os.environ.get('FTVM_KEEP_TMP') == '1'
        log('scenario %s in %s' % (name, self.dir))
        # The host pair's replication key (issue 12): every ftd of the scenario gets it.
        self.key = self.path('peer.key')
        make_key(self.key)

    def __enter__(self):
        return self

    def __exit__(self, et, ev, tb):
        for s in self.serials:
            s.stop = True
        # Twins started by a standby ftd are recorded in its run dir.
        for root, _, files in os.walk(self.dir):
            if 'twin.pid' in files:
                try:
                    self.pids.append((int(open(os.path.join(root, 'twin.pid')).read()), 'twin'))
                except ValueError:
                    pass
        for pid, what in reversed(self.pids):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                pass
        for pid, what in self.pids:
            if what.startswith('twin-of:'):
                continue
        # Anything still running whose command line mentions our directory (twins, guards).
        for d in os.listdir('/proc'):
            if not d.isdigit():
                continue
            try:
                cmd = open('/proc/%s/cmdline' % d, 'rb').read()
            except OSError:
                continue
            if self.dir.encode() in cmd:
                try:
                    os.kill(int(d), signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if et is not None:
            log('FAILED: %s; logs kept in %s' % (ev, self.dir))
            for f in sorted(os.listdir(self.dir)):
                if f.endswith('.log') and 'ftd' in f:
                    p = os.path.join(self.dir, f)
                    log('---- last lines of %s' % p)
                    for l in open(p).read().splitlines()[-25:]:
                        print('   ', l[:400])
        elif not self.keep:
            subprocess.run(['rm', '-rf', self.dir])
        return False

    def path(self, *p):
        return os.path.join(self.dir, *p)

    def track(self, pid, what):
        self.pids.append((pid, what))

    # ---- guest -------------------------------------------------------------------------------
    def boot_guest(self, name='g', mem=256, smp=1, dirty_kib_s=1024, extra_append='', extra_args=()):
        run = self.path(name)
        args = [os.path.join(SRC, 'tests/guest/boot-guest.sh'), '-g', GUEST, '-d', run, '-m', str(mem), '-s', str(smp),
                '--accel', ACCEL, '--paused', '-a', 'ftvm_dirty_kib_s=%d %s' % (dirty_kib_s, extra_append)]
        if extra_args:
            args += ['--'] + list(extra_args)
        r = subprocess.run(args, capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            raise Failure('boot-guest failed: %s' % r.stderr[-2000:])
        pid = int(r.stdout.strip().splitlines()[-1])
        self.track(pid, 'guest ' + name)
        ser = Serial(os.path.join(run, 'serial.sock'), os.path.join(run, 'serial.log'))
        ser.start()
        self.serials.append(ser)
        ser.connected.wait(10)
        qmp(os.path.join(run, 'qmp.sock'), ['cont'])
        return Guest(pid, run, ser)

    def twin_serial(self, standby, vm):
        ser = Serial(os.path.join(standby.run_dir, 'vms', vm, 'serial.sock'), self.path('twin-%s.serial.log' % vm))
        ser.start()
        self.serials.append(ser)
        ser.connected.wait(20)
        check(ser.connected.is_set(), 'twin serial socket of %s never appeared' % vm)
        return ser

    # ---- daemons -----------------------------------------------------------------------------
    def twin_policy_args(self):
        """What a standby ftd lets twins run (issue 12): the test QEMU and synthvm, and the files
        of the test guest and of this scenario's directory."""
        args = []
        help_text = subprocess.run([os.path.join(BUILD, 'ftd'), '--help'], capture_output=True, text=True).stdout
        if '--qemu-binary' not in help_text:  # an ftd from before issue 12
            return args
        for b in ('/usr/bin/qemu-system-x86_64', os.path.join(BUILD, 'tests', 'synthetic-vmm', 'synthvm')):
            if os.path.exists(b):
                args += ['--qemu-binary', b]
        for d in (GUEST, self.dir):
            if os.path.isdir(d):
                args += ['--allow-path', os.path.realpath(d)]
        return args

    def start_ftd(self, name, listen=True, extra=(), key=True, prefix=(), listen_host='127.0.0.1'):
        """Starts an ftd (its PID is tracked). `key`: True = the scenario's key (self.key), a path =
        that key file, False/None = --insecure (tests of the refusal only). `prefix`: a command
        that runs ftd elsewhere and execs it (e.g. `ip netns exec NS`, `nsenter -t PID -n -m --`),
        so that the PID stays ftd's; `listen_host`: the replication listener's host (port
        env.port)."""
        run = self.path(name)
        os.makedirs(run, exist_ok=True)
        logf = self.path('%s.ftd.log' % name)
        if key is True:
            key = self.key
        if key and os.environ.get('FTVM_E2E_ENCRYPT') == '1':  # run a scenario with encrypted replication
            extra = ['--encrypt'] + list(extra)
        args = list(prefix) + [os.path.join(BUILD, 'ftd'), '--run-dir', run, '--log', logf,
                '--listen', ('%s:%d' % (listen_host, self.port) if listen is True else listen) if listen else '',
                '--heartbeat-timeout-ms', str(self.hb_timeout_ms), '--enable-fault-injection', '--verify-activation',
                '--stats-dir', self.dir] + (['--key-file', key] if key else ['--insecure']) + \
            self.twin_policy_args() + list(extra)
        if '--state-dir' not in extra:  # never the machine's /var/lib/ftvm: records are per scenario
            args += ['--state-dir', self.path('%s-state' % name)]
        p = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=open(logf + '.out', 'w'), stderr=subprocess.STDOUT)
        self.procs.append(p)
        self.track(p.pid, 'ftd ' + name)
        d = Ftd(self, name, p, run, logf)
        wait_for(lambda: os.path.exists(d.control) or p.poll() is not None, 10, 'ftd %s control socket' % name)
        check(p.poll() is None, 'ftd %s exited at start: %s' % (name, open(logf + '.out').read()))
        return d


class Guest:
    def __init__(self, pid, run, serial):
        self.pid, self.run, self.serial = pid, run, serial
        self.qmp = os.path.join(run, 'qmp.sock')


class Ftd:
    def __init__(self, env, name, proc, run_dir, logf):
        self.env, self.name, self.proc, self.run_dir, self.logf = env, name, proc, run_dir, logf
        self.control = os.path.join(run_dir, 'ftd.sock')

    def ctl(self, *args, timeout=300, check_rc=True):
        r = subprocess.run([os.path.join(BUILD, 'ftctl'), '--control', self.control] + list(args), capture_output=True,
                           text=True, timeout=timeout)
        if check_rc and r.returncode != 0:
            raise Failure('ftctl %s -> rc %d: %s %s' % (' '.join(args), r.returncode, r.stdout, r.stderr))
        return r

    def status(self, vm=None):
        args = ['status', '--json'] + ([vm] if vm else [])
        return json.loads(self.ctl(*args).stdout)

    def vm(self, vm, role=None):
        for v in self.status():
            if v['name'] == vm and (role is None or v['role'].startswith(role)):
                return v
        return None

    def log_text(self):
        return open(self.logf).read()

    def kill9(self):
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def committed_cut_ms(self, vm, epoch):
        """Wall time (ms) at which the primary cut `epoch`, the checkpoint the twin resumed. When
        the primary died before it processed that epoch's ack (no record), the previous recorded
        epoch bounds it."""
        recs = {r['epoch']: r for r in self.epochs(vm)}
        if epoch in recs:
            return recs[epoch]['wall_ms']
        earlier = [r for e, r in recs.items() if e < epoch]
        check(earlier, 'no committed epoch recorded by the primary')
        return max(earlier, key=lambda r: r['epoch'])['wall_ms']

    def epochs(self, vm):
        """Per-epoch records the primary wrote (acked epochs only)."""
        p = os.path.join(self.env.dir, '%s.epochs.jsonl' % vm)
        if not os.path.exists(p):
            return []
        return [json.loads(l) for l in open(p) if l.strip()]


def protect(env, primary, standby, guest, vm='vm1', epoch_ms=25):
    primary.ctl('enable', '--qmp', guest.qmp, '--peer', '127.0.0.1:%d' % env.port, '--name', vm,
                '--epoch-ms', str(epoch_ms), '--timeout', '120')
    v = primary.vm(vm, 'primary')
    check(v and v['state'] == 'protected', 'VM not protected after enable: %s' % v)
    return v


def wait_active(standby, vm, timeout=30):
    """Waits until the standby's session of `vm` ended; it must have activated the twin."""
    def ended():
        v = standby.vm(vm, 'active') or standby.vm(vm, 'standby')
        return v if v and v['state'] in ('active', 'activation-failed', 'closed') else None
    v = wait_for(ended, timeout, 'the standby to activate the twin of %s' % vm)
    check(v['state'] == 'active', 'standby did not activate: %s' % v)
    return v


def watch_exit(pid):
    """Returns a function giving the host time at which `pid` was seen gone (None while alive)."""
    fd = os.pidfd_open(pid)
    t = {'at': None}

    def run():
        select.select([fd], [], [])
        t['at'] = time.time()
        os.close(fd)
    threading.Thread(target=run, daemon=True).start()
    return lambda: t['at']


def check_continuity(primary_serial, twin_serial, committed_cut_wall_ms, planned=False):
    """The twin resumed the guest from the committed checkpoint: no reboot, ticks consecutive
    from a number no smaller than what the primary had printed before the checkpoint was cut,
    and no larger than the primary's last tick + 1 (exactly that for a planned failover)."""
    pt = primary_serial.ticks()
    tt = twin_serial.wait_ticks(5, 60)
    check(pt, 'primary printed no ticks')
    first = tt[0][1]
    last_primary = pt[-1][1]
    lines = [l for _, l in twin_serial.all()]
    check(not any('FTVM-GUEST READY' in l or 'Linux version' in l for l in lines),
          'twin rebooted the guest instead of resuming it: %s' % lines[:5])
    check(not any('WL BAD' in l for l in lines), 'guest memory check failed on the twin: %s' %
          [l for l in lines if 'WL BAD' in l])
    nums = [n for _, n in tt]
    check(all(b == a + 1 for a, b in zip(nums, nums[1:])), 'twin ticks not consecutive: %s' % nums[:20])
    before_cut = [n for ts, n in pt if ts * 1000 < committed_cut_wall_ms]
    floor = (before_cut[-1] + 1) if before_cut else 0
    log('continuity: primary last tick %d, last tick before the committed cut %s, twin first tick %d' %
        (last_primary, before_cut[-1] if before_cut else None, first))
    if planned:
        check(first == last_primary + 1, 'planned failover lost or repeated ticks: primary last %d, twin first %d' %
              (last_primary, first))
    else:
        check(floor <= first <= last_primary + 1,
              'twin resumed at tick %d, expected within [%d, %d]' % (first, floor, last_primary + 1))
    return first, last_primary


def main(scenarios):
    # SIGTERM (ctest's timeout) unwinds like an exception, so Env.__exit__ stops every process.
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))
    if len(sys.argv) != 2 or sys.argv[1] not in scenarios:
        print('usage: %s {%s}' % (sys.argv[0], '|'.join(scenarios)))
        sys.exit(2)
    for f in ('vmlinux', 'initramfs.cpio.gz'):
        if not os.path.exists(os.path.join(GUEST, f)):
            print('test guest missing in %s: build it with `cmake --build build --target guest-image`' % GUEST)
            sys.exit(1)
    t0 = time.time()
    try:
        scenarios[sys.argv[1]]()
    except Failure as e:
        log('FAIL %s: %s' % (sys.argv[1], e))
        sys.exit(1)
    log('PASS %s (%.1f s)' % (sys.argv[1], time.time() - t0))
