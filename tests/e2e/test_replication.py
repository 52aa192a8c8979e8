#!/usr/bin/python3
"""Replication life cycle (CTest label `replication`): standby loss and return, retransmission
of a corrupted epoch, status output, disable, and a guest that powers itself off (protection
ends, nothing fails over)."""
import os
import signal
import time

from ftvm_e2e import Env, check, log, main, pid_alive, protect, wait_for

VM = 'vm1'


def standby_loss():
    with Env('standby-loss') as env:
        # -no-shutdown (as libvirt does): QEMU reports the guest's poweroff and waits, instead of
        # exiting at once, possibly before its SHUTDOWN event reached ftd (see ARCHITECTURE.md).
        g = env.boot_guest(dirty_kib_s=1024, extra_args=['-no-shutdown'])
        g.serial.wait_ticks(3, 90)
        P = env.start_ftd('primary', listen=False)
        S = env.start_ftd('standby')
        protect(env, P, S, g, VM)
        time.sleep(1)

        # Status shows what an operator needs.
        v = P.vm(VM, 'primary')
        for k in ('state', 'epoch', 'pause_ms', 'dirty_pages', 'throughput_mib_s', 'standby_lag_ms', 'link'):
            check(k in v, 'status lacks %s' % k)
        check(v['link']['transport'] == 'tcp' and v['link']['healthy'], 'link: %s' % v['link'])
        human = P.ctl('status').stdout
        check('state=protected' in human and 'p99' in human, 'human status: %s' % human)

        # A corrupted epoch is rejected by the standby and retransmitted; protection goes on.
        P.ctl('fault', VM, 'corrupt-once')
        wait_for(lambda: P.vm(VM, 'primary')['rejected_epochs'] >= 1, 10, 'the standby to reject the corrupted epoch')
        e0 = P.vm(VM, 'primary')['epoch']
        wait_for(lambda: P.vm(VM, 'primary')['epoch'] > e0 + 5, 10, 'epochs to commit after the retransmission')
        check(P.vm(VM, 'primary')['state'] == 'protected', 'not protected after a retransmission')
        check('rejected epoch' in S.log_text(), 'standby did not log the rejection')

        # The standby host dies: its ftd and the paused twin.
        twin_pid = S.vm(VM, 'standby')['twin_pid']
        ticks_before = len(g.serial.ticks())
        S.kill9()
        os.kill(twin_pid, signal.SIGKILL)
        log('standby ftd and twin pid %d killed' % twin_pid)
        wait_for(lambda: P.vm(VM, 'primary')['state'] == 'degraded', 10, 'primary to report degraded')
        v = P.vm(VM, 'primary')
        log('degraded: %s' % v['reason'])
        check(not v['link']['healthy'], 'link still reported healthy')
        time.sleep(1.5)
        check(len(g.serial.ticks()) >= ticks_before + 10, 'guest stopped running while degraded')
        check(pid_alive(g.pid), 'primary guest died')

        # A standby comes back on the same address: protection resumes with a fresh full sync.
        S2 = env.start_ftd('standby')
        wait_for(lambda: P.vm(VM, 'primary')['state'] == 'protected', 60, 'protection to resume')
        e1 = P.vm(VM, 'primary')['epoch']
        wait_for(lambda: P.vm(VM, 'primary')['epoch'] > e1 + 10, 10, 'epochs after re-protection')
        sv = S2.vm(VM, 'standby')
        check(sv and sv['state'] == 'protected' and pid_alive(sv['twin_pid']), 'new standby: %s' % sv)
        log('re-protected: epoch %d, twin pid %d' % (P.vm(VM, 'primary')['epoch'], sv['twin_pid']))

        # Disable: the twin goes away, the guest runs on untouched.
        r = P.ctl('disable', VM)
        log(r.stdout.strip())
        wait_for(lambda: not pid_alive(sv['twin_pid']), 10, 'the twin to be destroyed')
        n = len(g.serial.ticks())
        time.sleep(1)
        check(len(g.serial.ticks()) >= n + 5, 'guest does not run after disable')
        check(P.vm(VM) is None, 'VM still listed after disable')
        check(S2.vm(VM, 'standby')['state'] == 'closed', 'standby session not closed')
        # The guest is no longer tracked or paused: its QMP socket is free again.
        from ftvm_e2e import qmp
        st = qmp(g.qmp, ['query-status'])[0]
        check(st['status'] == 'running', 'guest status after disable: %s' % st)
        # And protection can be enabled again.
        protect(env, P, S2, g, VM)

        # The guest powers itself off: protection ends, the twin is destroyed, nothing fails over.
        twin2 = S2.vm(VM, 'standby')['twin_pid']
        g.serial.send('poweroff')
        wait_for(lambda: P.vm(VM, 'primary')['state'] == 'shut-down', 30, 'the primary to report shut-down')
        log('primary: %s' % P.vm(VM, 'primary')['reason'])
        wait_for(lambda: not pid_alive(twin2), 10, 'the twin to be destroyed after the guest powered off')
        sv = [v for v in S2.status() if v['name'] == VM]
        check(all(v['state'] == 'closed' and not v.get('activation') for v in sv),
              'the standby activated or kept a twin after a guest poweroff: %s' % sv)
        check(pid_alive(g.pid), 'the primary QEMU exited (-no-shutdown keeps it, powered off)')


if __name__ == '__main__':
    main({'standby-loss': standby_loss})
