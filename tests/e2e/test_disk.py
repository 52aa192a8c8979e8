#!/usr/bin/python3
"""Disk replication scenarios (CTest label `disk`, issue 5): a real Linux guest with a
virtio-blk ext4 disk writes numbered, checksummed records (tests/guest/guest-init.sh,
ftvm_disk=vda) while two real ftd daemons replicate its RAM and its disk; the standby's replica
is then checked on the host with e2fsck and by reading every record (disk_records.py).

  kill-qemu   kill -9 of the primary QEMU mid-write: the twin resumes on the replica, fsck is
              clean, every record the guest reported durable before the committed checkpoint
              is intact, and the guest's own idea of what it wrote matches the replica.
  planned     shared-disk refusal, a foreign process on the NBD socket, mirror failure
              (NBD connections dropped) -> degraded -> re-protection with a new full copy,
              then a planned failover: the replica equals the primary's image byte for byte.
"""
import os
import re
import signal
import socket
import subprocess
import time

import disk_records
from ftvm_e2e import (BUILD, Env, check, check_continuity, log, main, protect, wait_active, wait_for, watch_exit)

VM = 'vm1'
DISK_MIB = 64


def setup(env, rec_s=25):
    img = env.path('disk.img')
    disk_records.make_fs(img, DISK_MIB)
    g = env.boot_guest(dirty_kib_s=512,
                       extra_append='ftvm_disk=vda ftvm_disk_rec_s=%d ftvm_disk_sync_every=4' % rec_s,
                       extra_args=['-drive', 'file=%s,if=virtio,format=raw,cache=writeback' % img])
    g.serial.wait_ticks(3, 90)
    wait_for(lambda: g.serial.matching('DISK synced'), 60, 'the guest to write records')
    P = env.start_ftd('primary', listen=False)
    S = env.start_ftd('standby', extra=['--disk-dir', env.path('replicas')])
    return img, g, P, S


def synced(serial, before=None):
    """Record numbers the guest reported durable ("DISK synced N"), optionally only those
    printed before host time `before`."""
    out = []
    for ts, line in serial.matching('DISK synced '):
        if before is None or ts < before:
            out.append(int(line.split()[2]))
    return out


def stop_writer(serial, what):
    """Stops the guest's record writer (it syncs and unmounts); returns the last record."""
    serial.send('disk-stop')
    ts_line = wait_for(lambda: serial.matching('DISK stopped') or serial.matching('DISK umount failed'), 60,
                       'the record writer on %s to stop' % what)
    line = ts_line[-1][1]
    check(line.startswith('DISK stopped'), '%s: %s' % (what, line))
    return int(re.search(r'last=(\d+)', line).group(1))


def kill_qemu():
    with Env('disk-kill') as env:
        img, g, P, S = setup(env)
        protect(env, P, S, g, VM)
        v = P.vm(VM, 'primary')
        check(v['disk'] and v['disk']['disks'][0]['ready'], 'disk not mirrored after enable: %s' % v['disk'])
        log('initial copy: %s bytes in %.0f ms' % (v['disk']['initial_copy_bytes'], v['disk']['initial_copy_ms']))
        twin = env.twin_serial(S, VM)
        time.sleep(4)  # ~160 epochs, ~100 records written under protection
        before = P.vm(VM, 'primary')['disk']['forwarded_ops']
        check(before > 50, 'too few disk writes replicated before the kill: %d' % before)
        gone = watch_exit(g.pid)
        log('kill -9 primary QEMU pid %d (mid-write)' % g.pid)
        os.kill(g.pid, signal.SIGKILL)
        v = wait_active(S, VM)
        wait_for(gone, 5, 'primary QEMU exit')
        a = v['activation']
        log('activation: %s' % a)
        check(a['status_after'] == 'running', 'twin not running: %s' % a)
        check(a['ram_digest'] == a['expected_ram_digest'], 'twin RAM digest differs: %s' % a)
        check(gone() * 1000 < a['cont_wall_ms'], 'primary QEMU still ran when the twin resumed')
        cut = P.committed_cut_ms(VM, a['epoch'])
        check_continuity(g.serial, twin, cut)
        # What the guest reported durable before the committed checkpoint must be on the replica;
        # the resumed guest's own counter continues from the checkpoint.
        durable_before_cut = synced(g.serial, cut / 1000)
        check(durable_before_cut, 'the guest reported no durable record before the committed cut')
        must = max(durable_before_cut)
        twin_synced = wait_for(lambda: synced(twin), 60, 'the resumed guest to report durable records')
        log('primary: last durable before the cut %d, last printed %d; twin continues at %d' %
            (must, max(synced(g.serial)), twin_synced[0]))
        check(twin_synced[0] > must, 'the resumed guest reported record %d durable again, but it was durable '
              'before the checkpoint (%d)' % (twin_synced[0], must))
        time.sleep(2)
        last = stop_writer(twin, 'the twin')
        replica = S.vm(VM)['activation']['disks'][0]
        check(os.path.exists(replica), 'replica %s missing' % replica)
        problems = disk_records.verify(replica, last)
        check(not problems, 'replica %s after failover: %s' % (replica, problems))
        log('replica verified: fsck clean, records 1..%d intact (durable before the cut: 1..%d)' % (last, must))


def planned():
    with Env('disk-planned') as env:
        img, g, P, S = setup(env)
        # Shared storage is refused, and says why.
        r = P.ctl('enable', '--qmp', g.qmp, '--peer', '127.0.0.1:%d' % env.port, '--name', VM, '--shared-disk',
                  check_rc=False)
        check(r.returncode == 5 and 'shared-disk' in r.stderr, 'enable --shared-disk: rc %d %s %s' %
              (r.returncode, r.stdout, r.stderr))
        protect(env, P, S, g, VM)
        # A process that is not the guest's QEMU cannot use the mirror's NBD export.
        sock_path = os.path.join(P.run_dir, 'nbd', '%s.0.sock' % VM)
        check(os.path.exists(sock_path), 'no NBD socket at %s' % sock_path)
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.settimeout(5)
        c.connect(sock_path)
        got = c.recv(64)
        c.close()
        check(got == b'', 'a foreign peer got %r from the NBD export' % got)
        time.sleep(1)
        v = P.vm(VM, 'primary')
        check(v['state'] == 'protected', 'foreign NBD peer disturbed protection: %s %s' % (v['state'], v['reason']))

        # Mirror failure: QEMU's NBD connection breaks -> degraded with the reason -> a new
        # session with a new full copy.
        P.ctl('fault', VM, 'nbd-drop')
        wait_for(lambda: P.vm(VM, 'primary')['state'] == 'degraded', 20, 'degraded after the NBD connection broke')
        v = P.vm(VM, 'primary')
        log('degraded: %s' % v['reason'])
        check('NBD' in v['reason'] or 'mirror' in v['reason'], 'degraded reason does not name the disk: %s' %
              v['reason'])
        wait_for(lambda: P.vm(VM, 'primary')['state'] == 'protected', 120, 're-protection after the mirror failure')
        v = P.vm(VM, 'primary')
        check(v['disk']['disks'][0]['ready'], 'disk not mirrored after re-protection: %s' % v['disk'])
        log('re-protected: new full copy of %d bytes in %.0f ms' % (v['disk']['initial_copy_bytes'],
                                                                   v['disk']['initial_copy_ms']))
        check(v['disk']['initial_copy_bytes'] >= DISK_MIB << 20, 'no full copy after re-protection: %s' % v['disk'])
        twin = env.twin_serial(S, VM)
        time.sleep(3)

        # Planned failover with the writer running: the final checkpoint is cut with the guest
        # paused; the replica at activation (digest taken before the twin resumed) must equal
        # the primary's image once its QEMU has quit.
        gone = watch_exit(g.pid)
        r = P.ctl('failover', VM, timeout=120)
        log(r.stdout.strip())
        wait_for(gone, 20, 'the primary QEMU to quit after the planned failover')
        v = wait_active(S, VM)
        a = v['activation']
        out = subprocess.run([os.path.join(BUILD, 'ftctl'), 'digest', img], capture_output=True, text=True,
                             check=True).stdout.split()
        log('primary image digest %s, replica digest at activation %s' % (out[0], a['disk_digests'][0]))
        check(out[0] == a['disk_digests'][0], 'replica %s differs from the primary image %s at the planned failover' %
              (a['disks'][0], img))
        check_continuity(g.serial, twin, 0, planned=True)
        last = stop_writer(twin, 'the twin')
        problems = disk_records.verify(a['disks'][0], last)
        check(not problems, 'replica after planned failover: %s' % problems)
        log('replica equals the primary image at the switchover; fsck clean, records 1..%d intact' % last)


if __name__ == '__main__':
    main({'kill-qemu': kill_qemu, 'planned': planned})
