#!/usr/bin/python3
"""`ftd --arbiter sanlock` (the quorum disk; tools/ftd/arbiter/sanlock.h) with real sanlock 3.8
daemons, one per simulated host (own SANLOCK_RUN_DIR; unprivileged mode, no watchdog: -w 0),
one shared lease area initialised by scripts/ftvm-sanlock-init, a real Linux guest under QEMU,
two real ftd daemons on loopback (the replication link cut with iptables as in
test_split_brain.py). CTest labels `arbiter` (and `split-brain` for the partition).

Scenarios:
  partition   the replication link is cut both ways for longer than the heartbeat timeout:
              exactly one copy runs, the lease holder's (the primary runs on alone on the
              arbiter's Yes; the standby's arbiter answers Wait; the twin never resumes).
  host-death  kill -9 of the primary host's sanlock daemon, its lease keeper, its ftd and its
              QEMU: the standby resumes the twin once it holds the lease, which sanlock frees
              only at 8*io_timeout + 60 s (~68 s at io_timeout 1 s; printed, not asserted), and
              never before it holds it.
  daemon-lost the primary host's sanlock daemon dies (kill -9): the keeper sees its connection
              close and kills the primary QEMU at once; the standby resumes the guest (ftd
              reports the lost primary) and takes the lease once it frees (printed).
  storage-cut LOOP mode: each host reaches the lease file through its own loop device; the
              primary's device is made read-only (its lockspace renewals fail): its sanlock
              daemon sends SIGTERM to the keeper at 8*io_timeout, which kills the primary QEMU.
              Skipped (77) without loop devices.
  planned     `ftctl failover`: the twin runs, the old primary's QEMU quits and releases the
              lease, the new primary (the twin's host) holds it.
  refused     a VM whose lease the other host holds cannot be protected from this host:
              `ftctl enable` fails with sanlock's reason and nothing is left behind.
  ftd-restart the primary ftd is restarted (SIGTERM, as for an upgrade): the guest runs on and
              its keeper keeps holding the lease meanwhile; the new ftd protects the VM again
              and takes the lease over from the old keeper.
Exit 77 (skip) without root, sanlock, or an ftd built without the sanlock arbiter.
"""
import os
import shutil
import signal
import subprocess
import sys
import time

from ftvm_e2e import (BUILD, SRC, Env, check, check_continuity, log, main, pid_alive, wait_active, wait_for,
                      watch_exit)
from test_split_brain import Partition, no_overlap, state, ticks_advance

VM = 'vm1'
IO = 1  # sanlock io_timeout (s): fence at 8 s, takeover of a dead host at 68 s


def skip_unless_possible():
    if os.geteuid() != 0 or not shutil.which('sanlock'):
        log('SKIP: needs root and sanlock (scripts/install-deps.sh)')
        sys.exit(77)
    helptext = subprocess.run([os.path.join(BUILD, 'ftd'), '--help'], capture_output=True, text=True).stdout
    if '--sanlock-lease' not in helptext:
        log('SKIP: ftd was built without the sanlock arbiter (libsanlock-dev)')
        sys.exit(77)


class SanlockLab:
    """Two simulated hosts' sanlock daemons on one lease area in env's directory. Every daemon is
    tracked by PID in env (killed when the scenario ends); loop devices are detached by close()."""

    def __init__(self, env, loop=False):
        self.env = env
        self.lease = env.path('lease')
        self.loops = []
        subprocess.run([os.path.join(SRC, 'scripts/ftvm-sanlock-init'), self.lease, '8', str(IO)], check=True,
                       capture_output=True)
        self.paths = {}
        for h in (1, 2):
            if loop:
                r = subprocess.run(['losetup', '--direct-io=on', '-f', '--show', self.lease], capture_output=True,
                                   text=True)
                if r.returncode != 0:
                    self.close()
                    log('SKIP: no loop device: %s' % r.stderr.strip())
                    sys.exit(77)
                self.loops.append(r.stdout.strip())
                self.paths[h] = r.stdout.strip()
            else:
                self.paths[h] = self.lease
        self.run = {h: env.path('sanlock-h%d' % h) for h in (1, 2)}
        self.daemons = {}
        for h in (1, 2):
            os.makedirs(self.run[h])
            e = dict(os.environ, SANLOCK_PRIVILEGED='0', SANLOCK_RUN_DIR=self.run[h])
            p = subprocess.Popen(['sanlock', 'daemon', '-D', '-w', '0', '-l', '0', '-h', '0', '-U', 'root', '-G', 'root',
                                  '-L', '-1', '-e', 'host%d' % h], env=e, stdin=subprocess.DEVNULL,
                                 stdout=open(env.path('sanlock-h%d.log' % h), 'w'), stderr=subprocess.STDOUT,
                                 start_new_session=True)
            env.procs.append(p)
            env.track(p.pid, 'sanlock daemon host %d' % h)
            self.daemons[h] = p
        for h in (1, 2):
            sock = os.path.join(self.run[h], 'sanlock.sock')
            wait_for(lambda: os.path.exists(sock), 10, 'sanlock daemon of host %d' % h)
        # Join both hosts in parallel (each ~2*io+1 s); ftd's own join then finds it joined.
        t = time.time()
        joins = [subprocess.Popen(['sanlock', 'client', 'add_lockspace', '-o', str(IO), '-s',
                                   'ftvm:%d:%s:0' % (h, self.paths[h])],
                                  env=dict(os.environ, SANLOCK_RUN_DIR=self.run[h]), stdout=subprocess.DEVNULL,
                                  stderr=subprocess.STDOUT) for h in (1, 2)]
        for j in joins:
            check(j.wait(60) == 0, 'sanlock add_lockspace failed')
        log('sanlock lab up: lockspace joined by both hosts in %.1f s (io_timeout %d s)' % (time.time() - t, IO))

    def ftd_args(self, h):
        return ['--arbiter', 'sanlock', '--sanlock-lease', self.paths[h], '--sanlock-host-id', str(h),
                '--sanlock-io-timeout', str(IO)]

    def prefix(self, h):
        return ['env', 'SANLOCK_RUN_DIR=%s' % self.run[h]]

    def kill_daemon(self, h):
        os.kill(self.daemons[h].pid, signal.SIGKILL)
        self.daemons[h].wait(10)

    def close(self):
        # The lease keepers ftd started (their command line names our lease area; in LOOP mode a
        # loop device, which Env's clean-up by directory name would not match): by PID.
        for pid in all_keepers():
            try:
                res = open('/proc/%d/cmdline' % pid, 'rb').read().split(b'\0')[2].decode()
            except (OSError, IndexError):
                continue
            if any(':%s:' % path in res for path in self.paths.values()):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for d in self.loops:
            subprocess.run(['blockdev', '--setrw', d])
            subprocess.run(['losetup', '-d', d])
        self.loops = []


def all_keepers():
    """PIDs of every sanlock keeper process (`ftd __sanlock-keeper ...`) on this machine."""
    res = []
    for d in os.listdir('/proc'):
        if not d.isdigit():
            continue
        try:
            cmd = open('/proc/%s/cmdline' % d, 'rb').read().split(b'\0')
        except OSError:
            continue
        if len(cmd) > 1 and cmd[1] == b'__sanlock-keeper':
            res.append(int(d))
    return res


def keepers_of(ftd):
    """PIDs of the sanlock keepers an ftd started (its children running __sanlock-keeper)."""
    res = []
    for d in os.listdir('/proc'):
        if not d.isdigit():
            continue
        try:
            cmd = open('/proc/%s/cmdline' % d, 'rb').read().split(b'\0')
            ppid = int(open('/proc/%s/stat' % d).read().rsplit(')', 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if len(cmd) > 1 and cmd[1] == b'__sanlock-keeper' and ppid == ftd.proc.pid:
            res.append(int(d))
    return res


def setup(env, lab):
    g = env.boot_guest(mem=256, dirty_kib_s=1024)
    g.serial.wait_ticks(3, 90)
    P = env.start_ftd('primary', listen=False, extra=lab.ftd_args(1) + ['--libvirt-uri', ''], prefix=lab.prefix(1))
    S = env.start_ftd('standby', extra=lab.ftd_args(2) + ['--libvirt-uri', ''], prefix=lab.prefix(2))
    P.ctl('enable', '--qmp', g.qmp, '--peer', '127.0.0.1:%d' % env.port, '--name', VM, '--epoch-ms', '25',
          '--timeout', '120')
    v = P.vm(VM, 'primary')
    check(v and v['state'] == 'protected', 'VM not protected after enable: %s' % v)
    holds = v['arbiter']['holds']
    log('primary arbiter: %s' % v['arbiter'])
    check(v['arbiter']['kind'] == 'sanlock' and "%s: lease ftvm-slot-" % VM in holds and ' held since' in holds,
          'the primary does not hold the lease of %s: %s' % (VM, v['arbiter']))
    check(len(keepers_of(P)) == 1, 'expected one lease keeper under the primary ftd, found %s' % keepers_of(P))
    twin = env.twin_serial(S, VM)
    time.sleep(1.5)
    check(not twin.all(), 'paused twin printed output: %s' % twin.all()[:3])
    return g, P, S, twin


def lease_held_line(ftd):
    return "sanlock: VM '%s': lease held" % VM


def partition():
    skip_unless_possible()
    with Env('sl-partition') as env:
        lab = SanlockLab(env)
        try:
            g, P, S, twin = setup(env, lab)
            with Partition(env.port, 'both'):
                wait_for(lambda: 'running on alone' in P.log_text(), 30, 'the primary to run on alone')
                time.sleep(5)  # five heartbeat timeouts: the standby keeps asking, the lease stays put
                check('arbiter sanlock lets this side run alone' in P.log_text(),
                      'the primary ran on alone, but not on the sanlock arbiter\'s Yes')
                ticks_advance(g.serial, 'the primary guest during the partition')
                check(pid_alive(g.pid), 'the primary QEMU died although it holds the lease')
                check('arbiter sanlock answers wait' in S.log_text(),
                      'the standby did not ask the sanlock arbiter (or it did not answer Wait)')
                check('ACTIVATED' not in S.log_text() and lease_held_line(S) not in S.log_text(),
                      'SPLIT BRAIN: the standby got the lease / resumed the twin while the primary holds it')
                check(not twin.all(), 'SPLIT BRAIN: the twin printed output: %s' % twin.all()[:3])
            no_overlap(g.serial, twin)
            # After the heal the primary protects the VM again; the standby's waiting keeper
            # (of the dropped twin) must not linger and take the lease some day.
            wait_for(lambda: state(P, 'primary') == 'protected', 90, 'the primary to protect the VM again')
            wait_for(lambda: not keepers_of(S), 20, 'the standby\'s keeper of the dropped twin to exit')
            log('partition: the lease holder (primary) ran on alone; the standby waited, the twin never ran; '
                'protected again after the heal')
        finally:
            lab.close()


def host_death():
    skip_unless_possible()
    with Env('sl-host-death') as env:
        lab = SanlockLab(env)
        try:
            g, P, S, twin = setup(env, lab)
            keepers = keepers_of(P)
            t_kill = time.time()
            # The whole host at once: freeze every process of host 1 first, so that none of them
            # reacts to another's death (the keeper kills QEMU when its daemon goes, and ftd then
            # reports PrimaryLost, which resumes the twin at once: a process death, not a host
            # death; seen in a CI run), then kill them all, the sanlock daemon first.
            host1 = [lab.daemons[1].pid] + keepers + [P.proc.pid, g.pid]
            for pid in host1:
                try:
                    os.kill(pid, signal.SIGSTOP)
                except ProcessLookupError:
                    pass
            for pid in host1:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            lab.daemons[1].wait(10)
            log('host 1 killed at %.3f (sanlock daemon, keeper %s, ftd %d, QEMU %d)' %
                (t_kill, keepers, P.proc.pid, g.pid))
            v = wait_active(S, VM, timeout=200)
            a = v['activation']
            text = S.log_text()
            check(lease_held_line(S) in text, 'the standby resumed the twin without holding the lease')
            check(text.index(lease_held_line(S)) < text.index('ACTIVATED'),
                  'the standby resumed the twin before it held the lease')
            log('MEASURED host-death takeover: twin resumed %.1f s after host 1 was killed (sanlock: 8*io_timeout + '
                '60 s = %d s plus up to one renewal)' % (a['cont_wall_ms'] / 1000 - t_kill, 8 * IO + 60))
            check_continuity(g.serial, twin, P.committed_cut_ms(VM, a['epoch']) if P.epochs(VM) else 0)
            no_overlap(g.serial, twin)
        finally:
            lab.close()


def lease_lost(cut):
    def run():
        skip_unless_possible()
        with Env('sl-lease-lost-%s' % cut) as env:
            lab = SanlockLab(env, loop=(cut == 'storage'))
            try:
                g, P, S, twin = setup(env, lab)
                gone = watch_exit(g.pid)
                t0 = time.time()
                if cut == 'storage':
                    subprocess.run(['blockdev', '--setro', lab.paths[1]], check=True)
                    log('storage cut for host 1 (%s read-only) at %.3f' % (lab.paths[1], t0))
                else:
                    lab.kill_daemon(1)
                    log('host 1 sanlock daemon killed at %.3f' % t0)
                wait_for(gone, 8 * IO + 30, 'the primary QEMU to be fenced after its lease was lost')
                log('MEASURED lease lost (%s): primary QEMU killed %.1f s after the fault' % (cut, gone() - t0))
                wait_for(lambda: 'LEASE LOST' in P.log_text(), 10, 'the primary ftd to log the lost lease')
                expect = 'SIGTERM' if cut == 'storage' else 'daemon connection closed'
                check(expect in P.log_text(), 'the keeper did not fence for the expected reason (%s):\n%s' %
                      (expect, [l for l in P.log_text().splitlines() if 'LEASE LOST' in l]))
                v = wait_active(S, VM, timeout=60)
                a = v['activation']
                check(gone() * 1000 < a['cont_wall_ms'], 'SPLIT BRAIN: primary QEMU exited at %.3f, after the twin '
                      'resumed at %.3f' % (gone(), a['cont_wall_ms'] / 1000))
                check_continuity(g.serial, twin, P.committed_cut_ms(VM, a['epoch']) if P.epochs(VM) else 0)
                no_overlap(g.serial, twin)
                # The new primary takes the lease once host 1's frees (8*io_timeout + 60 s after
                # its last renewal).
                wait_for(lambda: lease_held_line(S) in S.log_text(), 8 * IO + 90, 'the standby to hold the lease')
                log('MEASURED the standby holds the lease %.1f s after the fault' % (time.time() - t0))
            finally:
                lab.close()
    return run


def planned():
    skip_unless_possible()
    with Env('sl-planned') as env:
        lab = SanlockLab(env)
        try:
            g, P, S, twin = setup(env, lab)
            gone = watch_exit(g.pid)
            t0 = time.time()
            P.ctl('failover', VM)
            wait_active(S, VM)
            wait_for(gone, 20, 'the old primary QEMU to quit')
            wait_for(lambda: lease_held_line(S) in S.log_text(), 30, 'the new primary to hold the lease')
            log('MEASURED planned failover: the new primary holds the lease %.2f s after `ftctl failover`' %
                (time.time() - t0))
            wait_for(lambda: 'lease released' in P.log_text(), 10, 'the old primary\'s keeper to release the lease')
            twin.wait_ticks(3, 30)
            check_continuity(g.serial, twin, 0, planned=True)
            check(state(P, 'primary') == 'failed-over', 'old primary state: %s' % state(P, 'primary'))
        finally:
            lab.close()


def refused():
    skip_unless_possible()
    with Env('sl-refused') as env:
        lab = SanlockLab(env)
        try:
            g, P, S, twin = setup(env, lab)
            # Another copy of "vm1" on host 2, protected by a second ftd there: its lease is host 1's.
            g2 = env.boot_guest(name='g2', mem=256, dirty_kib_s=64)
            X = env.start_ftd('host2-primary', listen=False, extra=lab.ftd_args(2) + ['--libvirt-uri', ''],
                              prefix=lab.prefix(2))
            r = X.ctl('enable', '--qmp', g2.qmp, '--peer', '127.0.0.1:%d' % env.port, '--name', VM, '--timeout', '120',
                      check_rc=False)
            log('ftctl enable on host 2 -> rc %d: %s' % (r.returncode, r.stderr.strip()[:400]))
            check(r.returncode != 0 and 'cannot hold the lease' in r.stderr and 'another live host' in r.stderr,
                  'protection was not refused with the lease held by host 1: rc %d %s' % (r.returncode, r.stderr))
            check(not keepers_of(X), 'a refused protection left a keeper running: %s' % keepers_of(X))
            check(pid_alive(g2.pid) and pid_alive(g.pid), 'a guest died')
            v = P.vm(VM, 'primary')
            check(v['state'] == 'protected' and ' held since' in v['arbiter']['holds'],
                  'the refusal disturbed the holder: %s' % v)
        finally:
            lab.close()


def ftd_restart():
    skip_unless_possible()
    with Env('sl-ftd-restart') as env:
        lab = SanlockLab(env)
        try:
            g, P, S, twin = setup(env, lab)
            old = keepers_of(P)
            P.proc.terminate()
            P.proc.wait(30)
            check(pid_alive(g.pid), 'the guest died with ftd')
            check(all(pid_alive(k) for k in old), 'the keeper did not outlive ftd while the guest runs')
            try:
                os.unlink(P.control)
            except FileNotFoundError:
                pass
            P = env.start_ftd('primary', listen=False, extra=lab.ftd_args(1) + ['--libvirt-uri', ''],
                              prefix=lab.prefix(1))
            wait_for(lambda: state(P, 'primary') == 'protected', 90, 'the restarted primary ftd to protect the VM')
            v = P.vm(VM, 'primary')
            check(' held since' in v['arbiter']['holds'], 'the new ftd does not hold the lease: %s' % v['arbiter'])
            check('taking over the lease from keeper pid %d' % old[0] in P.log_text(), 'no takeover from the old keeper')
            wait_for(lambda: not any(pid_alive(k) for k in old), 10, 'the old keeper to be gone')
            check(len(keepers_of(P)) == 1, 'keepers under the new ftd: %s' % keepers_of(P))
            ticks_advance(g.serial, 'the guest after the restart')
            log('ftd restart: the new ftd holds the lease: %s' % v['arbiter']['holds'])
        finally:
            lab.close()


if __name__ == '__main__':
    main({'partition': partition, 'host-death': host_death, 'daemon-lost': lease_lost('daemon'),
          'storage-cut': lease_lost('storage'), 'planned': planned,
          'ftd-restart': ftd_restart, 'refused': refused})
