#!/usr/bin/python3
"""Failover scenarios (CTest label `failover`): a real Linux guest under QEMU protected by two
real ftd daemons on loopback; the primary dies in different ways and the twin must resume the
guest from the last committed checkpoint, never while the primary still runs."""
import os
import re
import signal
import time

from ftvm_e2e import (Env, check, check_continuity, log, main, protect, qmp, wait_active, wait_for, watch_exit)

VM = 'vm1'


def setup(env, dirty=2048, mem=256, smp=1):
    g = env.boot_guest(mem=mem, smp=smp, dirty_kib_s=dirty)
    g.serial.wait_ticks(3, 90)
    P = env.start_ftd('primary', listen=False)
    S = env.start_ftd('standby')
    protect(env, P, S, g, VM)
    twin = env.twin_serial(S, VM)
    time.sleep(2.5)  # about a hundred epochs
    check(not twin.all(), 'paused twin printed output before failover: %s' % twin.all()[:3])
    v = P.vm(VM, 'primary')
    check(v['epoch'] > 10, 'too few committed epochs before failover: %s' % v['epoch'])
    return g, P, S, twin


def check_activation(env, P, S, v, guest_gone_at, primary_paused=False):
    a = v['activation']
    log('activation: %s' % a)
    check(a['status_after'] == 'running', 'twin not running after activation: %s' % a)
    check(a['ram_digest'] == a['expected_ram_digest'], 'twin RAM digest %s != primary digest %s of epoch %d' %
          (a['ram_digest'], a['expected_ram_digest'], a['epoch']))
    recs = {r['epoch']: r for r in P.epochs(VM)}
    if a['epoch'] in recs:
        check(recs[a['epoch']]['ram_digest'] == a['ram_digest'],
              'primary recorded digest %s for epoch %d, twin has %s' % (recs[a['epoch']]['ram_digest'], a['epoch'],
                                                                      a['ram_digest']))
    cut = P.committed_cut_ms(VM, a['epoch'])
    # No split brain: the primary QEMU was gone (or, for a planned failover, paused for good)
    # before the twin was resumed.
    check(guest_gone_at is not None, 'primary QEMU still running after the twin took over')
    if not primary_paused:
        check(guest_gone_at * 1000 < a['cont_wall_ms'], 'primary QEMU exited at %.3f, after the twin resumed at %.3f'
              % (guest_gone_at, a['cont_wall_ms'] / 1000))
    st = qmp(os.path.join(S.run_dir, 'vms', VM, 'twin-qmp.sock'), ['query-status'])[0]
    check(st['status'] == 'running', 'twin QMP status %s' % st)
    return cut


def kill_qemu():
    with Env('fo-qemu-kill') as env:
        g, P, S, twin = setup(env)
        gone = watch_exit(g.pid)
        log('kill -9 primary QEMU pid %d' % g.pid)
        os.kill(g.pid, signal.SIGKILL)
        v = wait_active(S, VM)
        wait_for(gone, 5, 'primary QEMU exit')
        cut = check_activation(env, P, S, v, gone())
        check_continuity(g.serial, twin, cut)
        wait_for(lambda: P.vm(VM, 'primary')['state'] == 'primary-lost', 10, 'primary to report primary-lost')
        check('primary declared dead' in S.log_text() or 'PrimaryLost' in S.log_text() or
              'primary reports its QEMU died' in S.log_text(), 'standby log does not say why it activated')


def kill_ftd():
    with Env('fo-ftd-kill') as env:
        g, P, S, twin = setup(env)
        gone = watch_exit(g.pid)
        log('kill -9 primary ftd pid %d' % P.proc.pid)
        P.kill9()
        wait_for(gone, 2, 'the guard to stop the primary QEMU after ftd died')
        v = wait_active(S, VM)
        cut = check_activation(env, P, S, v, gone())
        check_continuity(g.serial, twin, cut)


def planned():
    with Env('fo-planned') as env:
        g, P, S, twin = setup(env, smp=2)  # also covers a 2-vCPU guest
        gone = watch_exit(g.pid)
        r = P.ctl('failover', VM, timeout=120)
        log(r.stdout.strip())
        v = wait_active(S, VM, 10)
        wait_for(gone, 10, 'primary QEMU to quit after the planned failover')
        check(P.vm(VM, 'primary')['state'] == 'failed-over', 'primary state after failover: %s' % P.vm(VM))
        time.sleep(0.5)  # let the primary's last serial bytes arrive
        check_activation(env, P, S, v, gone(), primary_paused=True)
        last_primary_tick_at = g.serial.ticks()[-1][0]
        check(last_primary_tick_at * 1000 < v['activation']['cont_wall_ms'],
              'the primary printed a tick after the twin resumed')
        check_continuity(g.serial, twin, 0, planned=True)


def torn(fault, expect):
    with Env('fo-' + fault) as env:
        g, P, S, twin = setup(env)
        gone = watch_exit(g.pid)
        P.ctl('fault', VM, fault)
        wait_for(lambda: P.proc.poll() is not None, 10, 'primary ftd to die from the injected fault')
        wait_for(gone, 3, 'the guard to stop the primary QEMU')
        v = wait_active(S, VM)
        text = S.log_text()
        m = re.search(r'discarding epoch (\d+) \(begun, never committed(.*?)\); resuming from epoch (\d+)$', text, re.M)
        check(m, 'standby log does not report the discarded epoch')
        log('standby: %s' % m.group(0))
        check(int(m.group(3)) == int(m.group(1)) - 1, 'resumed from %s, expected %d' % (m.group(3), int(m.group(1)) - 1))
        check(v['activation']['epoch'] == int(m.group(3)), 'activation epoch mismatch')
        check(expect in text, 'standby log lacks %r' % expect)
        cut = check_activation(env, P, S, v, gone())
        check_continuity(g.serial, twin, cut)


if __name__ == '__main__':
    main({
        'kill-qemu': kill_qemu,
        'kill-ftd': kill_ftd,
        'planned': planned,
        'torn-epoch': lambda: torn('crash-mid-epoch', 'link to the primary lost'),
        'corrupt-epoch': lambda: torn('corrupt-then-crash', 'digest mismatch'),
    })
