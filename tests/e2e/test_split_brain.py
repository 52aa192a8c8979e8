#!/usr/bin/python3
"""Split-brain scenarios (CTest label `split-brain`, issue 10): faults that leave both hosts alive
must never leave two running copies of the guest. A real Linux guest under QEMU, two real ftd
daemons on loopback, real TCP resets (`ss -K`), real packet drops (iptables on the replication
port, both directions or one), SIGSTOP of ftd, a real fence command as the arbiter.

What "one copy" means here, checked after every fault:
  * the standby never resumed the twin while the primary QEMU ran unpaused, seen from outside:
    the guest prints a tick every 100 ms on its serial console; the primary's ticks and the
    twin's ticks never overlap in time, and
  * whichever copy survives continues from a committed checkpoint (tick continuity).
"""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from ftvm_e2e import (BUILD, SRC, Env, Failure, check, check_continuity, log, main, pid_alive, protect, wait_active,
                      wait_for, watch_exit, write_fence)

VM = 'vm1'


def setup(env, extra_primary=(), extra_standby=(), dirty=1024):
    g = env.boot_guest(mem=256, dirty_kib_s=dirty)
    g.serial.wait_ticks(3, 90)
    P = env.start_ftd('primary', listen=False, extra=extra_primary)
    S = env.start_ftd('standby', extra=extra_standby)
    protect(env, P, S, g, VM)
    twin = env.twin_serial(S, VM)
    time.sleep(1.5)
    check(not twin.all(), 'paused twin printed output: %s' % twin.all()[:3])
    return g, P, S, twin


def no_overlap(primary_serial, twin_serial, slack_s=0.15):
    """Two running copies would both print ticks at the same time. The primary's last tick must
    come before the twin's first (plus the serial latency slack)."""
    pt, tt = primary_serial.ticks(), twin_serial.ticks()
    if not tt:
        return
    first_twin = tt[0][0]
    late = [(ts, n) for ts, n in pt if ts > first_twin + slack_s]
    check(not late, 'SPLIT BRAIN: the primary printed ticks %s after the twin started printing at %.3f (first twin '
          'tick %d)' % ([n for _, n in late[:5]], first_twin, tt[0][1]))


def ticks_advance(serial, what, n=5, timeout=30):
    before = serial.ticks()
    last = before[-1][1] if before else -1
    wait_for(lambda: serial.ticks() and serial.ticks()[-1][1] >= last + n, timeout, '%s to advance %d ticks' % (what, n))


def state(ftd, role):
    v = ftd.vm(VM, role)
    return v['state'] if v else None


def ss_kill(port):
    """Resets every TCP connection to the replication port (the data path and the second path):
    both hosts stay up, only the connections die."""
    r = subprocess.run(['ss', '-K', 'dst', '127.0.0.1', 'dport', '=', ':%d' % port], capture_output=True, text=True)
    check(r.returncode == 0, 'ss -K failed: %s' % r.stderr)


class Partition:
    """Drops packets of the replication port on loopback: 'both', 'to-standby' (primary ->
    standby lost) or 'to-primary' (standby -> primary lost). Removed on exit, pass or fail."""

    def __init__(self, port, direction):
        self.rules = []
        if direction in ('both', 'to-standby'):
            self.rules.append(['INPUT', '-i', 'lo', '-p', 'tcp', '--dport', str(port), '-j', 'DROP'])
        if direction in ('both', 'to-primary'):
            self.rules.append(['INPUT', '-i', 'lo', '-p', 'tcp', '--sport', str(port), '-j', 'DROP'])

    def __enter__(self):
        for r in self.rules:
            subprocess.run(['iptables', '-w', '-I'] + r, check=True)
        log('partition on: %s' % self.rules)
        return self

    def __exit__(self, *a):
        for r in self.rules:
            subprocess.run(['iptables', '-w', '-D'] + r)
        log('partition healed')
        return False


def reset():
    """`ss -K` on the replication connections while both hosts live, 4 times at random moments:
    the primary settles the session (Resolve), the standby drops its paused twin and never
    resumes it, the primary re-protects; the guest never stops."""
    with Env('sb-reset') as env:
        g, P, S, twin = setup(env)
        rng = random.Random(int(os.environ.get('FTVM_SEED', '7')))
        for i in range(4):
            wait_for(lambda: state(P, 'primary') == 'protected', 120, 'protection before reset %d' % i)
            time.sleep(rng.uniform(0.2, 1.0))
            log('reset %d: ss -K on port %d' % (i, env.port))
            ss_kill(env.port)
            # The standby's timeout is 1 s: wait well past it.
            time.sleep(2.5)
            check('ACTIVATED' not in S.log_text(), 'the standby resumed the twin after a connection reset:\n%s' %
                  [l for l in S.log_text().splitlines() if 'activat' in l.lower()][-5:])
            check(pid_alive(g.pid), 'the primary QEMU died after a connection reset')
            ticks_advance(g.serial, 'the primary guest after reset %d' % i)
        wait_for(lambda: state(P, 'primary') == 'protected', 120, 'protection after the last reset')
        no_overlap(g.serial, twin)
        check(not twin.all(), 'a twin printed output: %s' % twin.all()[:3])
        text = P.log_text()
        check('settling session' in text and 'standby says: dropped' in text,
              'the primary did not settle the broken session with the standby')
        log('4 resets: the primary settled each and re-protected; the twin never ran')


def stall_ftd():
    """SIGSTOP of the primary ftd for longer than the standby's timeout: the guard's watchdog
    kills the primary QEMU before the standby resumes the twin; SIGCONT later changes nothing."""
    with Env('sb-stall') as env:
        g, P, S, twin = setup(env)
        gone = watch_exit(g.pid)
        log('SIGSTOP primary ftd pid %d for 3 s' % P.proc.pid)
        os.kill(P.proc.pid, signal.SIGSTOP)
        try:
            v = wait_active(S, VM, timeout=20)
        finally:
            time.sleep(0.5)
            os.kill(P.proc.pid, signal.SIGCONT)
        check(gone() is not None, 'primary QEMU still runs after the twin took over (ftd stopped)')
        a = v['activation']
        check(gone() * 1000 < a['cont_wall_ms'], 'SPLIT BRAIN: primary QEMU exited at %.3f, after the twin resumed at %.3f'
              % (gone(), a['cont_wall_ms'] / 1000))
        check_continuity(g.serial, twin, P.committed_cut_ms(VM, a['epoch']))
        no_overlap(g.serial, twin)
        wait_for(lambda: state(P, 'primary') in ('primary-lost', 'failed-over'), 20, 'the primary to notice')
        log('guard watchdog fenced the stalled primary %.0f ms before the twin resumed' %
            (a['cont_wall_ms'] - gone() * 1000))


def short_stall():
    """SIGSTOP of the primary ftd well below the watchdog: nothing fails over."""
    with Env('sb-short-stall') as env:
        g, P, S, twin = setup(env)
        os.kill(P.proc.pid, signal.SIGSTOP)
        time.sleep(0.2)
        os.kill(P.proc.pid, signal.SIGCONT)
        time.sleep(2)
        check(pid_alive(g.pid), 'a 200 ms stall of ftd killed the primary QEMU')
        check('ACTIVATED' not in S.log_text(), 'a 200 ms stall made the standby take over')
        ticks_advance(g.serial, 'the primary guest')




def partition(direction):
    def run():
        """A partition longer than the timeout with a fence-command arbiter: exactly one copy
        survives (the side whose fence fired first), never both, never overlapping."""
        with Env('sb-part-%s' % direction) as env:
            fence = write_fence(env, VM)
            arb = ['--arbiter', 'fence-command', '--fence-command', fence, '--fence-timeout-ms', '5000']
            g, P, S, twin = setup(env, extra_primary=arb, extra_standby=arb)
            for d in (P, S):
                with open(env.path('%s.ftd.pid' % d.name), 'w') as f:
                    f.write('%d\n' % d.proc.pid)
            with open(env.path('primary.qemu.pid'), 'w') as f:
                f.write('%d\n' % g.pid)
            gone = watch_exit(g.pid)
            with Partition(env.port, direction):
                wait_for(lambda: os.path.exists(env.path('fence.lock', 'by')), 30, 'a fence to fire')
                time.sleep(3)
            by = open(env.path('fence.lock', 'by')).read().strip()
            log('fence fired: %s; calls:\n%s' % (by, open(env.path('fence.calls')).read()))
            if by == 'fence-standby':
                # The primary won: it runs on alone; the twin never ran.
                wait_for(lambda: state(P, 'primary') in ('degraded', 'protected'), 20, 'the primary to run on')
                check(pid_alive(g.pid), 'the primary QEMU died although it won the fence')
                ticks_advance(g.serial, 'the primary guest')
                check(not twin.all(), 'SPLIT BRAIN: the twin printed output: %s' % twin.all()[:3])
                check('ACTIVATED' not in S.log_text(), 'the fenced standby resumed the twin')
            else:
                # The standby won: the primary host was fenced before the twin resumed.
                v = wait_active(S, VM, timeout=30)
                wait_for(gone, 10, 'the fenced primary QEMU to be gone')
                a = v['activation']
                check(gone() * 1000 < a['cont_wall_ms'], 'SPLIT BRAIN: primary QEMU exited at %.3f, after the twin '
                      'resumed at %.3f' % (gone(), a['cont_wall_ms'] / 1000))
                check_continuity(g.serial, twin, P.committed_cut_ms(VM, a['epoch']) if P.epochs(VM) else 0)
            no_overlap(g.serial, twin)
    return run


def partition_corosync(cut):
    """`--arbiter corosync` on both ftd daemons, each inside one node of a real two-node corosync
    cluster with a qnetd quorum device (tests/cluster/corosync-lab.sh: network namespaces; the
    replication runs over the lab's bridge, the guest QEMU stays in the root namespace, QMP and
    serial are unix sockets). One node is cut off for longer than every timeout; exactly one copy
    survives, the quorate side's:
      cut='primary' (node n1): n1 loses quorum, the primary fences its own guest; n2 keeps quorum
        without n1 and resumes the twin after the margin: the primary QEMU is gone before the
        twin's `cont`, the serial ticks never overlap, the twin continues from a committed
        checkpoint.
      cut='standby' (node n2): n1 keeps quorum without n2: the primary's guest, paused while the
        standby cannot be reached, runs on alone after the margin; the twin never runs (n2 lost
        quorum, its standby waits)."""
    def run():
        lab = os.path.join(SRC, 'tests/cluster/corosync-lab.sh')
        if os.geteuid() != 0 or not all(shutil.which(b) for b in ('corosync', 'corosync-qdevice', 'corosync-qnetd')):
            log('SKIP: needs root and corosync, corosync-qdevice, corosync-qnetd (scripts/install-deps.sh)')
            sys.exit(77)
        helptext = subprocess.run([os.path.join(BUILD, 'ftd'), '--help'], capture_output=True, text=True).stdout
        if 'corosync' not in helptext:
            log('SKIP: ftd was built without the corosync arbiter (libquorum-dev libvotequorum-dev libcmap-dev)')
            sys.exit(77)
        labdir = tempfile.mkdtemp(prefix='ftvm-sb-corosync-lab.', dir='/tmp')
        ok = False
        try:
            subprocess.run([lab, '--dir', labdir, 'up'], check=True)
            in_node = lambda n: [lab, '--dir', labdir, 'exec', n]  # execs: the PID stays ftd's
            s_addr = '10.213.0.2'
            node = 'n1' if cut == 'primary' else 'n2'
            with Env('sb-corosync-%s' % cut) as env:
                arb = ['--arbiter', 'corosync', '--corosync-settle-ms', '1000', '--libvirt-uri', '']
                g = env.boot_guest(mem=256, dirty_kib_s=1024)
                g.serial.wait_ticks(3, 90)
                P = env.start_ftd('primary', listen=False, extra=arb, prefix=in_node('n1'))
                S = env.start_ftd('standby', extra=arb, prefix=in_node('n2'), listen_host=s_addr)
                P.ctl('enable', '--qmp', g.qmp, '--peer', '%s:%d' % (s_addr, env.port), '--name', VM,
                      '--epoch-ms', '25', '--timeout', '120')
                v = P.vm(VM, 'primary')
                check(v and v['state'] == 'protected', 'VM not protected after enable: %s' % v)
                log('primary arbiter: %s' % v.get('arbiter'))
                check('quorate (3 votes' in json.dumps(v.get('arbiter')),
                      'the primary arbiter is not quorate with 3 votes: %s' % v.get('arbiter'))
                twin = env.twin_serial(S, VM)
                time.sleep(1.5)
                check(not twin.all(), 'paused twin printed output: %s' % twin.all()[:3])
                gone = watch_exit(g.pid)
                r = subprocess.run([lab, '--dir', labdir, 'cut', node], check=True, capture_output=True, text=True)
                t_cut = int(r.stdout.split()[0]) / 1000
                log('cut the %s node %s at %.3f' % (cut, node, t_cut))
                if cut == 'primary':
                    v = wait_active(S, VM, timeout=60)
                    a = v['activation']
                    wait_for(gone, 30, 'the primary QEMU to be fenced')
                    log('primary QEMU gone %.0f ms after the cut; twin cont %.0f ms after the cut' %
                        ((gone() - t_cut) * 1000, a['cont_wall_ms'] - t_cut * 1000))
                    check(gone() * 1000 < a['cont_wall_ms'], 'SPLIT BRAIN: primary QEMU exited at %.3f, after the '
                          'twin resumed at %.3f' % (gone(), a['cont_wall_ms'] / 1000))
                    check('arbiter corosync says this side lost' in P.log_text(),
                          'the primary QEMU is gone but the primary ftd did not fence it on lost quorum')
                    check_continuity(g.serial, twin, P.committed_cut_ms(VM, a['epoch']) if P.epochs(VM) else 0)
                else:
                    wait_for(lambda: 'running on alone' in P.log_text(), 60, 'the primary to run on alone')
                    log('primary runs on alone %.0f ms after the cut' % ((time.time() - t_cut) * 1000))
                    check('arbiter corosync lets this side run alone' in P.log_text(),
                          'the primary ran on alone, but not on the arbiter\'s Yes')
                    ticks_advance(g.serial, 'the primary guest after the cut')
                    check(gone() is None and pid_alive(g.pid), 'the primary QEMU died although its node kept quorum')
                    time.sleep(3)  # the standby's side must keep waiting (its node lost quorum)
                    check(not twin.all(), 'SPLIT BRAIN: the twin printed output: %s' % twin.all()[:3])
                    check('ACTIVATED' not in S.log_text(), 'the standby resumed the twin without quorum')
                    # the longest gap in the primary's ticks is the time its guest stayed paused
                    ts = [t for t, _ in g.serial.ticks()]
                    log('primary guest paused for %.0f ms at most' % (max(b - a for a, b in zip(ts, ts[1:])) * 1000))
                no_overlap(g.serial, twin)
                subprocess.run([lab, '--dir', labdir, 'heal', node], check=True, capture_output=True)
            ok = True
        finally:
            subprocess.run([lab, '--dir', labdir, 'down'])
            if ok:
                shutil.rmtree(labdir, ignore_errors=True)
            else:
                log('lab logs kept in %s' % labdir)
    return run


def standby_restart_keeps_active_twin():
    """kill -9 of the primary QEMU -> the twin runs; then kill -9 and restart of the standby ftd:
    the new ftd leaves the running twin alone (it used to kill it as a 'stale paused twin') and
    refuses a new session for that VM."""
    with Env('sb-standby-restart') as env:
        g, P, S, twin = setup(env)
        os.kill(g.pid, signal.SIGKILL)
        wait_active(S, VM)
        tpid = int(open(os.path.join(S.run_dir, 'vms', VM, 'twin.pid')).read())
        twin.wait_ticks(3, 30)
        S.kill9()
        S2 = env.start_ftd('standby')
        time.sleep(1)
        check(pid_alive(tpid), 'the restarted standby ftd killed the running (activated) twin pid %d' % tpid)
        check('left running' in S2.log_text(), 'the restarted ftd did not say it left the active twin running')
        ticks_advance(twin, 'the twin after the standby ftd restart')


def planned_lost_answer():
    """A planned failover whose link breaks right after Activate (no ActivateDone): the primary
    must never resume its paused guest on its own; it settles with the standby, learns that the
    twin runs and fences its QEMU. Exactly one copy, nothing lost (planned continuity)."""
    with Env('sb-planned-lost') as env:
        g, P, S, twin = setup(env)
        gone = watch_exit(g.pid)
        P.ctl('fault', VM, 'lose-activate-done')
        r = P.ctl('failover', VM, check_rc=False)
        log('ftctl failover -> rc %d: %s %s' % (r.returncode, r.stdout.strip(), r.stderr.strip()))
        v = wait_active(S, VM)
        wait_for(gone, 20, 'the primary QEMU to be fenced after the lost ActivateDone')
        wait_for(lambda: state(P, 'primary') == 'failed-over', 20, 'the primary to report failed-over')
        twin.wait_ticks(3, 30)
        no_overlap(g.serial, twin)
        check_continuity(g.serial, twin, 0, planned=True)
        check('standby says: active' in P.log_text() and 'FENCED' in P.log_text(),
              'the primary did not learn from the standby that the twin runs')


def per_vm_arbiter():
    """The arbiter is per daemon, and per VM: a VM may opt out (`ftctl enable --arbiter none`:
    warned, shown in status, accepted by a standby that arbitrates), a VM asking for an arbiter
    its hosts do not have is refused with the reason and nothing is started."""
    with Env('sb-per-vm-arbiter') as env:
        fence = write_fence(env, VM)
        arb = ['--arbiter', 'fence-command', '--fence-command', fence]
        g = env.boot_guest(mem=256, dirty_kib_s=1024)
        g.serial.wait_ticks(3, 90)
        P = env.start_ftd('primary', listen=False, extra=arb)
        S = env.start_ftd('standby', extra=arb)
        peer = '127.0.0.1:%d' % env.port
        r = P.ctl('enable', '--qmp', g.qmp, '--peer', peer, '--name', VM, '--arbiter', 'corosync', check_rc=False)
        check(r.returncode == 5 and "arbitrates with 'fence-command'" in r.stderr,
              'an arbiter the host does not have was not refused: rc %d %s' % (r.returncode, r.stderr))
        check(not os.path.exists(os.path.join(S.run_dir, 'vms', VM, 'twin.pid')), 'a twin was started for a refused VM')
        r = P.ctl('enable', '--qmp', g.qmp, '--peer', peer, '--name', VM, '--arbiter', 'none', '--timeout', '120')
        check('split-brain unprotected' in r.stderr, 'enable --arbiter none did not warn: %s' % r.stderr)
        v = P.vm(VM, 'primary')
        check(v['state'] == 'protected' and v['arbiter']['kind'] == 'none', 'status: %s' % v.get('arbiter'))
        check('opts out of arbitration' in S.log_text(), 'the standby did not accept the opt-out')
        P.ctl('disable', VM)
        P.ctl('enable', '--qmp', g.qmp, '--peer', peer, '--name', VM, '--timeout', '120')
        v = P.vm(VM, 'primary')
        check(v['arbiter']['kind'] == 'fence-command', 'default is not the host arbiter: %s' % v.get('arbiter'))


class TwoNetworks:
    """Two "hosts" (network namespaces P and S) joined by two independent networks A and B (a veth
    pair each: two NICs per host). `cut(net)` takes that network down on P's side (both
    directions); everything is removed on exit, pass or fail."""

    def __init__(self):
        tag = os.urandom(3).hex()
        self.nsP, self.nsS = 'ftvm-2np-' + tag, 'ftvm-2ns-' + tag
        b = os.urandom(1)[0] % 50
        self.net = {'A': '10.%d.1' % (200 + b), 'B': '10.%d.2' % (200 + b)}
        self.dev = {'A': 'n2a' + tag, 'B': 'n2b' + tag}

    def sh(self, *a, ok=False):
        r = subprocess.run(list(a), capture_output=True, text=True)
        check(ok or r.returncode == 0, '%s failed: %s' % (' '.join(a), r.stderr))
        return r

    def ip(self, host, net):
        return self.net[net] + ('.1' if host == 'P' else '.2')

    def __enter__(self):
        try:
            for ns in (self.nsP, self.nsS):
                self.sh('ip', 'netns', 'add', ns)
                self.sh('ip', '-n', ns, 'link', 'set', 'lo', 'up')
            for n, dev in self.dev.items():
                self.sh('ip', 'link', 'add', dev + 'p', 'netns', self.nsP, 'type', 'veth', 'peer', 'name', dev + 's',
                        'netns', self.nsS)
                for host, ns, d in (('P', self.nsP, dev + 'p'), ('S', self.nsS, dev + 's')):
                    self.sh('ip', '-n', ns, 'addr', 'add', self.ip(host, n) + '/24', 'dev', d)
                    self.sh('ip', '-n', ns, 'link', 'set', d, 'up')
        except Exception:
            self.__exit__(None, None, None)
            raise
        return self

    def cut(self, net, on):
        log('network %s %s' % (net, 'cut' if on else 'restored'))
        self.sh('ip', '-n', self.nsP, 'link', 'set', self.dev[net] + 'p', 'down' if on else 'up')

    def __exit__(self, *a):
        for ns in (self.nsP, self.nsS):
            for pid in self.sh('ip', 'netns', 'pids', ns, ok=True).stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            self.sh('ip', 'netns', 'del', ns, ok=True)
        return False


def second_network():
    """Issue 10: a TCP session's second heartbeat path travels on a second network (the standby's
    `--listen-also`, `ftctl enable --peer-alt`). With no arbiter at all, losing either network
    for longer than the timeout never makes the standby take over a live primary: it hears the
    primary on the other one. The primary pauses, settles (Resolve over the network that works),
    runs on and protects the VM again over the surviving network; both ways round. Without
    --peer-alt (FTVM_TEST_NO_PEER_ALT=1, the behaviour before) the twin takes over on a cut of
    network A and this test fails."""
    with Env('sb-second-net') as env, TwoNetworks() as n:
        g = env.boot_guest(mem=256, dirty_kib_s=1024)
        g.serial.wait_ticks(3, 90)
        P = env.start_ftd('primary', listen=False, prefix=['ip', 'netns', 'exec', n.nsP])
        S = env.start_ftd('standby', prefix=['ip', 'netns', 'exec', n.nsS], listen_host=n.ip('S', 'A'),
                          extra=['--listen-also', '%s:%d' % (n.ip('S', 'B'), env.port)])
        args = ['enable', '--qmp', g.qmp, '--peer', '%s:%d' % (n.ip('S', 'A'), env.port), '--name', VM,
                '--timeout', '120']
        if os.environ.get('FTVM_TEST_NO_PEER_ALT') != '1':
            args += ['--peer-alt', '%s:%d' % (n.ip('S', 'B'), env.port)]
        P.ctl(*args)
        twin = env.twin_serial(S, VM)
        v = P.vm(VM, 'primary')
        log('status link: %s' % json.dumps(v['link']))
        check(v['link']['second_path']['state'] == 'up', 'the second path is not up: %s' % v['link'])
        first_pid = g.pid
        for net in ('A', 'B'):
            other = 'B' if net == 'A' else 'A'
            wait_for(lambda: state(P, 'primary') == 'protected' and
                     P.vm(VM, 'primary')['link']['second_path']['state'] == 'up', 60,
                     'protection with both paths up before cutting network %s' % net)
            n.cut(net, True)
            try:
                # Well past the standby's timeout (1 s): it would have taken over by now.
                time.sleep(4)
                check('ACTIVATED' not in S.log_text(), 'the standby resumed the twin although the primary was alive '
                      'on network %s:\n%s' % (other, [l for l in S.log_text().splitlines() if 'activat' in l.lower()][-5:]))
                check(pid_alive(first_pid), 'the primary QEMU died when network %s was cut' % net)
                ticks_advance(g.serial, 'the primary guest with network %s cut' % net)
                wait_for(lambda: state(P, 'primary') == 'protected', 120,
                         'protection again over network %s while %s is cut' % (other, net))
                peer = P.vm(VM, 'primary')['link']['peer']
                log('protected again over %s while network %s is cut' % (peer, net))
                check(peer.startswith(n.ip('S', other)), 'data path %s is not on network %s' % (peer, other))
            finally:
                n.cut(net, False)
        check(not twin.all(), 'SPLIT BRAIN: the twin printed output: %s' % twin.all()[:3])
        text = P.log_text()
        check('standby says: dropped' in text, 'the primary did not settle the broken session with the standby')
        log('either network cut for 4 s: the standby never took over, the primary re-protected over the other one')


if __name__ == '__main__':
    main({'reset': reset, 'stall-ftd': stall_ftd, 'short-stall': short_stall,
          'partition-both': partition('both'), 'partition-to-standby': partition('to-standby'),
          'partition-to-primary': partition('to-primary'),
          'standby-restart': standby_restart_keeps_active_twin, 'planned-lost-answer': planned_lost_answer,
          'per-vm-arbiter': per_vm_arbiter, 'second-network': second_network, 'partition-corosync-primary': partition_corosync('primary'),
          'partition-corosync-standby': partition_corosync('standby')})
