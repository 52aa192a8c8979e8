#!/usr/bin/python3
"""The embedded default, end to end on one machine: a Linux test guest (with a 64 MiB ext4 disk
it writes checksummed records to) protected by a primary ftd and replicated, RAM and disk, to a
standby ftd (both on this host, over loopback TCP); then the primary QEMU is killed with SIGKILL
and the standby's twin resumes the guest on the disk replica, which is then checked (fsck,
every record). Prints every command and the measured numbers. Everything started here is
stopped by PID at the end."""
import argparse
import os
import signal
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'tests', 'e2e'))
import ftvm_e2e as h  # noqa: E402
import disk_records  # noqa: E402

ap = argparse.ArgumentParser(description=__doc__)
ap.add_argument('--mem', type=int, default=256, help='guest RAM in MiB')
ap.add_argument('--smp', type=int, default=1, help='guest vCPUs')
ap.add_argument('--dirty-kib-s', type=int, default=2048, help='guest memory write rate')
ap.add_argument('--epoch-ms', type=int, default=25)
ap.add_argument('--run-s', type=float, default=10, help='protected run time before the failure')
ap.add_argument('--planned', action='store_true', help='planned switchover (ftctl failover) instead of kill -9')
ap.add_argument('--no-disk', action='store_true', help='diskless guest (RAM only)')
a = ap.parse_args()


def say(*x):
    print('\n==>', *x, flush=True)


def show(r):
    out = (r.stdout + r.stderr).strip()
    if out:
        print('   ' + out.replace('\n', '\n   '))


with h.Env('demo', hb_timeout_ms=400) as env:
    say('booting the test guest: %d MiB, %d vCPU, accel %s, writing %d KiB/s' % (a.mem, a.smp, h.ACCEL, a.dirty_kib_s))
    extra, append = [], ''
    if not a.no_disk:
        img = env.path('disk.img')
        disk_records.make_fs(img, 64)
        extra = ['-drive', 'file=%s,if=virtio,format=raw,cache=writeback' % img]
        append = 'ftvm_disk=vda ftvm_disk_rec_s=20'
        print('   disk: %s (64 MiB ext4); the guest appends checksummed records and reports "DISK synced N"' % img)
    g = env.boot_guest(mem=a.mem, smp=a.smp, dirty_kib_s=a.dirty_kib_s, extra_append=append, extra_args=extra)
    print('   ' + open(os.path.join(g.run, 'cmdline')).read().strip())
    g.serial.wait_ticks(3, 120)
    print('   guest up, QEMU pid %d, serial console says: %s' % (g.pid, g.serial.ticks()[-1]))

    say('starting the primary ftd and the standby ftd (standby listens on 127.0.0.1:%d); both hold the '
        'replication key %s (ftd --generate-key)' % (env.port, env.key))
    P = env.start_ftd('primary', listen=False)
    S = env.start_ftd('standby', extra=['--disk-dir', env.path('replicas')])
    print('   ftd --run-dir %s --key-file %s                      (log %s)' % (P.run_dir, env.key, P.logf))
    print('   ftd --run-dir %s --key-file %s --listen 127.0.0.1:%d (log %s)' % (S.run_dir, env.key, env.port, S.logf))

    say('ftctl enable --qmp %s --peer 127.0.0.1:%d --name demo --epoch-ms %d' % (g.qmp, env.port, a.epoch_ms))
    t0 = time.time()
    r = P.ctl('enable', '--qmp', g.qmp, '--peer', '127.0.0.1:%d' % env.port, '--name', 'demo', '--epoch-ms',
              str(a.epoch_ms))
    show(r)
    print('   protected %.1f s after enable' % (time.time() - t0))
    twin = env.twin_serial(S, 'demo')

    say('running protected for %.0f s' % a.run_s)
    end = time.time() + a.run_s
    while time.time() < end:
        time.sleep(min(5, max(0.1, end - time.time())))
        show(P.ctl('status', 'demo'))
    show(S.ctl('status'))
    before = P.vm('demo', 'primary')

    gone = h.watch_exit(g.pid)
    if a.planned:
        say('ftctl failover demo   (planned switchover)')
        show(P.ctl('failover', 'demo'))
        t_fail = time.time()
    else:
        say('kill -9 %d   (the primary QEMU dies)' % g.pid)
        t_fail = time.time()
        os.kill(g.pid, signal.SIGKILL)
    v = h.wait_for(lambda: (S.vm('demo', 'active') or {}).get('activation') and S.vm('demo', 'active'), 30,
                   'the twin to take over')
    tt = twin.wait_ticks(3, 30)
    act = v['activation']
    show(S.ctl('status'))
    say('the guest continues on the standby; its console:')
    for ts, line in twin.all()[:5]:
        print('   [twin %+.3f s] %s' % (ts - t_fail, line))
    last = g.serial.ticks()[-1]
    disk_ok, disk_row = True, None
    if not a.no_disk:
        say('checking the disk replica the twin runs on')
        twin.send('disk-stop')
        stopped = h.wait_for(lambda: twin.matching('DISK stopped') or twin.matching('DISK umount'), 60,
                             'the guest to stop writing')[-1][1]
        print('   twin console: %s' % stopped)
        replica = act['disks'][0]
        n = int(stopped.split('last=')[1]) if 'last=' in stopped else 0
        problems = disk_records.verify(replica, n)
        durable = [int(l.split()[2]) for ts, l in g.serial.matching('DISK synced ') if ts < t_fail]
        print('   %s: e2fsck -fn clean and records 1..%d intact: %s' % (replica, n, 'yes' if not problems else problems))
        disk_ok = not problems and n > 0
        before_d = before['disk']
        disk_row = ('disk: initial copy / writes replicated / replica', '%d MiB in %.0f ms / %d (%.1f MiB) / %s' % (
            before_d['initial_copy_bytes'] >> 20, before_d['initial_copy_ms'], before_d['forwarded_ops'],
            before_d['forwarded_bytes'] / 2**20, 'fsck clean, records 1..%d ok (last durable before the failure: %s)' %
            (n, durable[-1] if durable else '-') if disk_ok else 'BAD'))

    say('numbers')
    pm = before['pause_ms']
    rows = [
        ('guest', '%d MiB, %d vCPU, %s, %d KiB/s written' % (a.mem, a.smp, h.ACCEL, a.dirty_kib_s)),
        ('epochs committed before the failure', before['epoch']),
        ('pause per epoch (ms) p50 / p99 / max', '%.2f / %.2f / %.2f' % (pm['p50'], pm['p99'], pm['max'])),
        ('dirty pages per epoch (mean)', '%.0f' % before['dirty_pages']['mean']),
        ('checkpoint size (mean KiB)', '%.0f' % (before['checkpoint_bytes']['mean'] / 1024)),
        ('replication throughput (MiB/s)', '%.2f' % before['throughput_mib_s']),
        ('initial sync', '%d pages in %d passes, %.0f ms' % (before['sync']['pages'], before['sync']['passes'],
                                                              before['sync']['ms'])),
        ('failure -> standby declares primary dead (ms)', '%.0f' % (act['declared_wall_ms'] - t_fail * 1000)),
        ('declared dead -> twin running (ms)', '%.1f, of which %.1f the demo-only full-RAM digest check '
         '(device-state load %.1f)' % (act['activation_ms'], act.get('verify_ms', 0), act['load_ms'])),
        ('declared dead -> first new tick on the twin (ms)', '%.0f' % (tt[0][0] * 1000 - act['declared_wall_ms'])),
        ('failure -> first new tick on the twin (ms)', '%.0f' % ((tt[0][0] - t_fail) * 1000)),
        ('resumed at epoch', act['epoch']),
        ('twin RAM digest = primary digest', '%s (%s)' % (act['ram_digest'] == act['expected_ram_digest'],
                                                          act['ram_digest'])),
        ('last tick on the primary / first on the twin', '%d / %d' % (last[1], tt[0][1])),
    ]
    if disk_row:
        rows.append(disk_row)
    for k, val in rows:
        print('   %-48s %s' % (k, val))
    ok = act['ram_digest'] == act['expected_ram_digest'] and tt[0][1] <= last[1] + 1 and disk_ok
    say('demo %s; logs in %s' % ('OK' if ok else 'FAILED', env.dir))
    env.keep = True
sys.exit(0 if ok else 1)
