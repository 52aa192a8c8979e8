#!/usr/bin/python3
"""failover=manual under a standby ftd restart and under partitions (CTest label `reprotect`,
issue 11; the partitions also `split-brain`).

  standby-restart: kill -9 of the primary QEMU with failover=manual: the twin waits paused in
      primary-lost. Then the standby ftd is killed (kill -9) and started again, then stopped
      cleanly (SIGTERM) and started again: each new ftd adopts the same paused twin (same pid,
      listed, state primary-lost, no CPU time, no ticks); `ftctl failover --force` on it resumes
      the twin from the committed checkpoint (tick continuity, no reboot). Before the fix the
      restarted ftd killed the twin ("killing stale paused twin"): this test fails then.
  partition-both, partition-to-primary: two ftd daemons in network namespaces (one veth
      network), failover=manual, the fence-command arbiter (both sides, as in the split-brain
      tests) behind a gate: the fence device is unreachable (the command fails: Wait) until the
      test opens it for fence-primary. The link is cut both ways, or standby -> primary only
      (iptables in the primary's namespace). While the arbiter cannot tell, `ftctl failover
      --force` on the standby is refused (6, or 5 while the primary is still heard) and the twin
      never runs; no copy runs while the primary is paused. Once the arbiter fenced the primary
      (its QEMU and ftd killed) the standby still does not resume the twin by itself (state
      primary-lost, no ticks); `--force` (the arbiter asked again) resumes it with tick
      continuity. partition-both additionally kills (kill -9) and restarts the standby ftd while
      the twin waits after the fence: the new ftd adopts it, and its `--force` asks the arbiter
      again (6 while the fence device is unreachable, 0 once it answers). Throughout, a /proc
      sampler (chaos.CpuWatch) checks that at most one QEMU executes guest code.
  restart-primary-back: no arbiter, both ways cut: the standby waits with the twin paused, its
      ftd is killed and restarted (adopts the twin); the partition heals and the primary, which
      ran on alone, is heard again: the adopted twin is dropped (it never ran), the VM is
      protected again with a new twin and `--force` is refused (5).
"""
import os
import signal
import subprocess
import time

from chaos import CpuWatch, vcpu_time
from ftvm_e2e import Env, check, check_continuity, log, main, pid_alive, wait_for, watch_exit
from test_split_brain import TwoNetworks

VM = 'vm1'


def cpu_ticks(pid):
    f = open('/proc/%d/stat' % pid).read().rsplit(')', 1)[1].split()
    return int(f[11]) + int(f[12])


def activated_since(S, t):
    for x in S.status():
        a = x.get('activation') or {}
        if x['name'] == VM and x['state'] == 'active' and a.get('cont_wall_ms', 0) > t * 1000:
            return a
    return None


def waiting(S):
    v = S.vm(VM)
    return v if v and v['state'] == 'primary-lost' else None


def check_paused(env, S, twin, tpid, what):
    """The twin of VM is listed in primary-lost with pid `tpid`, uses no CPU and prints nothing."""
    v = wait_for(lambda: waiting(S), 20, 'the standby to list the waiting twin (%s)' % what)
    check(v['twin_pid'] == tpid, '%s: the twin pid changed: %s, was %d' % (what, v['twin_pid'], tpid))
    check('failover --force' in v['reason'], '%s: the reason does not say what to run: %s' % (what, v['reason']))
    check(pid_alive(tpid), '%s: the paused twin pid %d is gone' % (what, tpid))
    c0 = cpu_ticks(tpid)
    time.sleep(2 * env.hb_timeout_ms / 1000.0)
    c1 = cpu_ticks(tpid)
    hz = os.sysconf('SC_CLK_TCK')
    check((c1 - c0) / hz < 0.5, '%s: the twin runs (%.2f s CPU)' % (what, (c1 - c0) / hz))
    check(not twin.ticks(), '%s: the twin printed ticks: %s' % (what, twin.ticks()[:3]))
    log('%s: twin pid %d listed in primary-lost (%s), paused (%.2f s CPU in %.1f s)' %
        (what, tpid, v['role'], (c1 - c0) / hz, 2 * env.hb_timeout_ms / 1000.0))
    return v


def force_and_check(S, g, P, twin, gone, what):
    # Exit code 6 means "the arbiter cannot tell yet: retry" (a cluster manager retries): the
    # fence command, asked again at --force, may take longer than the session's first poll.
    for i in range(10):
        t_force = time.time()
        r = S.ctl('failover', '--force', VM, check_rc=False)
        log('%s: --force: rc %d: %s%s' % (what, r.returncode, r.stdout.strip(), r.stderr.strip()))
        if r.returncode != 6:
            break
        check(not twin.ticks(), '%s: the twin ran although --force answered 6' % what)
        time.sleep(0.5)
    check(r.returncode == 0, '%s: force: rc %d %s' % (what, r.returncode, r.stderr))
    a = activated_since(S, t_force)
    check(a, '%s: no activation after --force: %s' % (what, S.status()))
    check(gone() is not None and gone() * 1000 < a['cont_wall_ms'], '%s: the primary QEMU still ran when the twin '
          'resumed' % what)
    wait_for(lambda: len(twin.ticks()) >= 5, 30, 'the resumed twin to print ticks')
    check_continuity(g.serial, twin, P.committed_cut_ms(VM, a['epoch']) if P.epochs(VM) else 0)
    r = S.ctl('failover', '--force', VM, check_rc=False)
    check(r.returncode == 0, '%s: second force: rc %d %s' % (what, r.returncode, r.stderr))
    v = S.vm(VM, 'active')
    fo = [e for e in v.get('history', []) if e.get('event') == 'failover']
    check(fo and 'force' in fo[-1]['reason'], '%s: history: %s' % (what, v.get('history')))
    log('%s: twin resumed %.0f ms after --force from epoch %d, ticks continue' %
        (what, a['cont_wall_ms'] - t_force * 1000, a['epoch']))
    return a


def restart_standby(env, **kw):
    """Starts the standby ftd again on the same run and state dirs. A killed ftd leaves its control
    socket behind: removed first, so that start_ftd waits for the new ftd's."""
    sock = env.path('standby', 'ftd.sock')
    if os.path.exists(sock):
        os.unlink(sock)
    return env.start_ftd('standby', **kw)


def standby_restart():
    with Env('manual-standby-restart') as env:
        g = env.boot_guest(mem=256, dirty_kib_s=1024)
        g.serial.wait_ticks(3, 90)
        P = env.start_ftd('primary', listen=False)
        S = env.start_ftd('standby')
        P.ctl('enable', '--qmp', g.qmp, '--peer', '127.0.0.1:%d' % env.port, '--name', VM, '--timeout', '120',
              '--failover', 'manual')
        twin = env.twin_serial(S, VM)
        tpid = S.vm(VM, 'standby')['twin_pid']
        env.track(tpid, 'twin')
        time.sleep(1)
        gone = watch_exit(g.pid)
        os.kill(g.pid, signal.SIGKILL)
        log('kill -9 of the primary QEMU pid %d (failover=manual)' % g.pid)
        wait_for(gone, 10, 'primary QEMU exit')
        check_paused(env, S, twin, tpid, 'before the restarts')

        S.proc.send_signal(signal.SIGTERM)
        S.proc.wait(30)
        log('clean stop (SIGTERM) of the standby ftd')
        check(pid_alive(tpid), 'the paused twin died with its ftd (clean stop)')
        check('left for the next ftd' in S.log_text(), 'the stopping ftd did not say it leaves the waiting twin')
        S = restart_standby(env)
        check_paused(env, S, twin, tpid, 'after a clean stop and restart')
        check(S.log_text().count('adopting the paused twin pid %d' % tpid) == 1, 'the restarted ftd did not adopt '
              'the twin:\n%s' % S.log_text()[-3000:])

        S.kill9()
        log('kill -9 of the standby ftd')
        check(pid_alive(tpid), 'the paused twin died with its ftd (kill -9)')
        S = restart_standby(env)
        check_paused(env, S, twin, tpid, 'after kill -9 and restart')
        hs = S.ctl('status', VM).stdout
        check('primary-lost' in hs and 'adopted' in hs and str(tpid) in hs, 'ftctl status of the adopted twin:\n%s' % hs)
        check(S.log_text().count('adopting the paused twin pid %d' % tpid) == 2, 'the restarted ftd did not adopt '
              'the twin:\n%s' % S.log_text()[-3000:])
        # The adopting ftd stops cleanly too: the twin is left for the next one again.
        S.proc.send_signal(signal.SIGTERM)
        S.proc.wait(30)
        check(pid_alive(tpid), 'the adopted twin died with its ftd (clean stop)')
        S = restart_standby(env)
        check_paused(env, S, twin, tpid, 'after a second clean stop and restart')
        # --force must still ask the same questions: refused for an unknown VM.
        r = S.ctl('failover', '--force', 'nosuchvm', check_rc=False)
        check(r.returncode == 4, 'force of an unknown VM: rc %d %s' % (r.returncode, r.stderr))

        a = force_and_check(S, g, P, twin, gone, 'after two restarts')
        check(a.get('adopted'), 'the activation was not that of the adopted twin: %s' % a)
        check(not os.path.exists(env.path('standby-state', 'manual-wait', VM + '.json')),
              'the failover=manual record is left behind after the activation')
        check(os.path.exists(env.path('standby', 'vms', VM, 'active')), 'no active marker for the resumed twin')
        # The resumed twin survives another restart of its ftd (activated: left running).
        S.kill9()
        S = restart_standby(env)
        check(pid_alive(tpid), 'the resumed twin died when its ftd restarted')
        r = S.ctl('failover', '--force', VM, check_rc=False)
        check(r.returncode == 0, 'force after the last restart: rc %d %s' % (r.returncode, r.stderr))
        n = len(twin.ticks())
        wait_for(lambda: len(twin.ticks()) >= n + 5, 30, 'the twin to keep running after its ftd restarted')


GATED_FENCE = r'''#!/bin/sh
# The split-brain tests' one-shot fence device (the first side to fire wins, the other fails),
# behind a gate: unreachable (exit 1: the arbiter answers Wait) until the test writes the action
# it lets through into fence-open. Firing again for the side that already won succeeds (the
# primary is off; a power switch reports "off" again).
D=%(dir)s
echo "$(date +%%s.%%N) $FTVM_FENCE_ACTION peer=$FTVM_PEER vm=$FTVM_VM" >> $D/fence.calls
[ "$(cat $D/fence-open 2>/dev/null)" = "$FTVM_FENCE_ACTION" ] || { echo "fence device unreachable"; exit 1; }
if ! mkdir $D/fence.lock 2>/dev/null; then
  [ "$(cat $D/fence.lock/by)" = "$FTVM_FENCE_ACTION" ] || { echo "fence device already fired"; exit 1; }
fi
echo "$FTVM_FENCE_ACTION" > $D/fence.lock/by
case "$FTVM_FENCE_ACTION" in
  fence-standby) victims="$(cat $D/standby.ftd.pid) $(cat $D/standby/vms/%(vm)s/twin.pid 2>/dev/null)" ;;
  fence-primary) victims="$(cat $D/primary.ftd.pid) $(cat $D/primary.qemu.pid)" ;;
esac
kill -9 $victims 2>/dev/null
for i in $(seq 200); do
  alive=0
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


def partition(direction):
    def run():
        with Env('manual-part-%s' % direction) as env, TwoNetworks() as n:
            fence = env.path('fence.sh')
            with open(fence, 'w') as f:
                f.write(GATED_FENCE % {'dir': env.dir, 'vm': VM})
            os.chmod(fence, 0o755)
            arb = ['--arbiter', 'fence-command', '--fence-command', fence, '--fence-timeout-ms', '5000']
            g = env.boot_guest(mem=256, dirty_kib_s=1024,
                               extra_args=['-name', '%s,debug-threads=on' % VM])  # vCPU threads named (CpuWatch)
            g.serial.wait_ticks(3, 90)
            P = env.start_ftd('primary', listen=False, prefix=['ip', 'netns', 'exec', n.nsP], extra=arb)
            S = env.start_ftd('standby', prefix=['ip', 'netns', 'exec', n.nsS], listen_host=n.ip('S', 'A'), extra=arb)
            for d in (P, S):
                with open(env.path('%s.ftd.pid' % d.name), 'w') as f:
                    f.write('%d\n' % d.proc.pid)
            with open(env.path('primary.qemu.pid'), 'w') as f:
                f.write('%d\n' % g.pid)
            P.ctl('enable', '--qmp', g.qmp, '--peer', '%s:%d' % (n.ip('S', 'A'), env.port), '--name', VM,
                  '--timeout', '120', '--failover', 'manual')
            check(P.vm(VM, 'primary')['state'] == 'protected', 'not protected: %s' % P.vm(VM, 'primary'))
            twin = env.twin_serial(S, VM)
            tpid = S.vm(VM, 'standby')['twin_pid']
            env.track(tpid, 'twin')
            watch = CpuWatch(g.pid, lambda: os.path.join(S.run_dir, 'vms', VM, 'twin.pid'))
            gone = watch_exit(g.pid)
            time.sleep(1)
            if direction == 'both':
                n.cut('A', True)
            else:  # standby -> primary dropped, primary -> standby still delivered
                n.sh('ip', 'netns', 'exec', n.nsP, 'iptables', '-w', '-I', 'INPUT', '-s', n.ip('S', 'A'), '-j', 'DROP')
                log('network A: standby -> primary dropped')
            try:
                # Well past the standby's timeout (1 s): with the fence device unreachable neither
                # side may act; the primary keeps its guest paused, the twin stays paused.
                wait_for(lambda: 'fence-primary' in open(env.path('fence.calls')).read()
                         if os.path.exists(env.path('fence.calls')) else False, 30, 'the standby to ask the arbiter')
                time.sleep(2)
                for i in range(2):
                    r = S.ctl('failover', '--force', VM, check_rc=False)
                    log('--force while the arbiter cannot tell: rc %d: %s' % (r.returncode, r.stderr.strip()))
                    check(r.returncode in (5, 6), 'force while the primary may be alive: rc %d %s' %
                          (r.returncode, r.stderr))
                    time.sleep(1)
                check(not twin.ticks() and 'ACTIVATED' not in S.log_text(), 'the twin ran while the arbiter waited')
                # Neither copy executes: the primary paused its guest when it lost the standby and
                # its own arbiter question (fence-standby) gets no answer either.
                v0 = vcpu_time(g.pid)
                time.sleep(1)
                v1 = vcpu_time(g.pid)
                log('primary vCPU time while undecided: %s -> %s ticks in 1 s' % (v0, v1))
                check(v0 is not None and v1 - v0 <= 5, 'the primary guest runs although its standby is unreachable '
                      'and the arbiter cannot tell (%s -> %s vCPU ticks in 1 s)' % (v0, v1))
                check(pid_alive(g.pid), 'the primary QEMU died although nothing fenced it')
                v = S.vm(VM)
                log('standby while undecided: %s (%s)' % (v['state'], v['reason']))
                # The fence device comes back and lets the standby's shot through: the primary
                # host (its ftd and QEMU) is fenced.
                with open(env.path('fence-open'), 'w') as f:
                    f.write('fence-primary\n')
                wait_for(gone, 30, 'the fenced primary QEMU to be gone')
                log('the arbiter fenced the primary: %s' % open(env.path('fence.calls')).read().strip().splitlines()[-1])
                v = check_paused(env, S, twin, tpid, 'after the fence (failover=manual)')
                check('ACTIVATED' not in S.log_text(), 'the standby resumed the twin by itself')
                if direction == 'both':
                    # The standby ftd restarts while its twin waits (kill -9): the new ftd adopts it,
                    # and its --force asks the arbiter again: unreachable now -> 6, the twin paused.
                    S.kill9()
                    S = restart_standby(env, prefix=['ip', 'netns', 'exec', n.nsS], listen_host=n.ip('S', 'A'),
                                        extra=arb)
                    v = check_paused(env, S, twin, tpid, 'adopted after a standby ftd restart')
                    check(v.get('adopted') and not v.get('primary_reported_dead'), 'adopted status: %s' % v)
                    os.unlink(env.path('fence-open'))
                    r = S.ctl('failover', '--force', VM, check_rc=False)
                    log('adopted twin, --force while the fence device is unreachable: rc %d: %s' %
                        (r.returncode, r.stderr.strip()))
                    check(r.returncode == 6, 'adopted twin, force while the arbiter cannot tell: rc %d %s' %
                          (r.returncode, r.stderr))
                    check(not twin.ticks() and pid_alive(tpid), 'the adopted twin ran or died after a refused --force')
                    with open(env.path('fence-open'), 'w') as f:
                        f.write('fence-primary\n')
                a = force_and_check(S, g, P, twin, gone, 'partition %s' % direction)
                check(direction != 'both' or a.get('adopted'), 'the activation was not that of the adopted twin')
            finally:
                watch.stop.set()
                if direction == 'both':
                    n.cut('A', False)
                else:
                    n.sh('ip', 'netns', 'exec', n.nsP, 'iptables', '-w', '-D', 'INPUT', '-s', n.ip('S', 'A'), '-j', 'DROP',
                         ok=True)
            watch.t.join(2)
            log('/proc: %d samples, at most %d QEMU executing at once, overlaps %s' %
                (watch.samples, watch.max_running, watch.overlaps[:3]))
            watch.check()
            check(watch.samples > 50, 'the /proc sampler took only %d samples' % watch.samples)
    return run


def restart_primary_back():
    """No arbiter, failover=manual, both ways cut in network namespaces: the standby declares the
    silent primary lost (the no-arbiter policy says Yes) and waits, paused; the primary runs on
    alone (only one copy: the twin waits for the operator). The standby ftd is killed (kill -9)
    and started again: it adopts the waiting twin. The partition heals: the primary is heard again
    (its Resolve or new session): the adopted twin is dropped, never having run, the primary is
    protected again with a new twin, and `--force` is refused (5: the primary is heard)."""
    with Env('manual-restart-primary-back') as env, TwoNetworks() as n:
        g = env.boot_guest(mem=256, dirty_kib_s=1024, extra_args=['-name', '%s,debug-threads=on' % VM])
        g.serial.wait_ticks(3, 90)
        P = env.start_ftd('primary', listen=False, prefix=['ip', 'netns', 'exec', n.nsP])
        skw = dict(prefix=['ip', 'netns', 'exec', n.nsS], listen_host=n.ip('S', 'A'))
        S = env.start_ftd('standby', **skw)
        P.ctl('enable', '--qmp', g.qmp, '--peer', '%s:%d' % (n.ip('S', 'A'), env.port), '--name', VM,
              '--timeout', '120', '--failover', 'manual')
        twin = env.twin_serial(S, VM)
        tpid = S.vm(VM, 'standby')['twin_pid']
        env.track(tpid, 'twin')
        watch = CpuWatch(g.pid, lambda: os.path.join(S.run_dir, 'vms', VM, 'twin.pid'))
        time.sleep(1)
        n.cut('A', True)
        try:
            check_paused(env, S, twin, tpid, 'partitioned, no arbiter')
            S.kill9()
            log('kill -9 of the standby ftd while its twin waits')
            S = restart_standby(env, **skw)
            v = check_paused(env, S, twin, tpid, 'after the restart, still partitioned')
            check(v.get('adopted') and not v.get('primary_reported_dead'), 'adopted status: %s' % v)
            check(pid_alive(g.pid), 'the primary QEMU died in the partition')
            n0 = len(g.serial.ticks())
            wait_for(lambda: len(g.serial.ticks()) >= n0 + 5, 30, 'the primary to run on alone')
        finally:
            n.cut('A', False)
        wait_for(lambda: not pid_alive(tpid), 60, 'the adopted twin to be dropped once the primary is heard again')
        check('the primary is heard again' in S.log_text(), 'the standby did not say why it dropped the twin')
        wait_for(lambda: (P.vm(VM, 'primary') or {}).get('state') == 'protected', 120, 'the primary to be protected '
                 'again')
        v = S.vm(VM, 'standby')
        check(v and v['twin_pid'] != tpid, 'no new twin: %s' % v)
        r = S.ctl('failover', '--force', VM, check_rc=False)
        log('--force with the primary back: rc %d: %s' % (r.returncode, r.stderr.strip()))
        check(r.returncode == 5 and 'is heard' in r.stderr, 'force with the primary back: rc %d %s' %
              (r.returncode, r.stderr))
        check(not twin.ticks() and 'ACTIVATED' not in S.log_text(), 'a twin ran: %s' % twin.ticks()[:3])
        check(pid_alive(g.pid), 'the primary QEMU died')
        watch.stop.set()
        watch.t.join(2)
        log('/proc: %d samples, at most %d QEMU executing at once' % (watch.samples, watch.max_running))
        watch.check()


if __name__ == '__main__':
    main({'standby-restart': standby_restart, 'partition-both': partition('both'),
          'partition-to-primary': partition('to-primary'), 'restart-primary-back': restart_primary_back})
