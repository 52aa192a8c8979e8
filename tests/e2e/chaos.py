#!/usr/bin/python3
"""Chaos suite (CTest label `chaos`, issue 10): Jepsen-style randomized faults against a real
guest protected by two real ftd daemons, each in its own network namespace ("host").

Layout (names unique per run, everything removed at the end, pass or fail):

  root ns:  bridge chbXXXX  <- ptap (the guest QEMU's tap), veths of the three namespaces
  ns P:     veth, address .11           ftd (primary), no listener
  ns S:     bridge with veth + ttap, address .12   ftd (standby, listens on .12), twin QEMU (ttap)
  ns C:     veth, address .1            the client: one TCP connection to the guest's counter

Per seed: a schedule of random faults drawn from the seed (reset of the replication
connections, partitions both ways and one way, shorter and longer than the timeouts, SIGSTOP of
either ftd shorter and longer than the timeouts, kill -9 of the primary QEMU / the standby's
paused twin / either ftd / the guard, a graceful restart of either ftd). Both ftds arbitrate with a fence command that has
one shot (a shared STONITH switch): the side whose fence fires first kills the other "host".
A fenced standby host is "rebooted" (its ftd started again); a seed ends when the twin took over.

Checked after every fault:
  * never two copies: the guest prints a tick every 100 ms on its serial console; the primary's
    ticks and the twin's never overlap in time;
  * the client's counter totals are exactly 1, 2, 3, ... (never back, never a jump: a total the
    client saw is part of the state that survives), and the connection survives;
  * the survivor continues from a committed checkpoint (tick continuity at a failover);
  * never two copies, seen through /proc independently of the guest: every 50 ms the CPU time of
    the vCPU threads ("CPU n/TCG", "CPU n/KVM") of the primary QEMU and of the current twin is
    read from /proc/PID/task/*/stat; a paused (QMP `stop`, or `-S -incoming`) QEMU's vCPU threads
    use no CPU. Both advancing in two consecutive samples is a split brain.

Usage: chaos.py [--seeds N] [--first-seed S] [--seed S] [--faults K] [--minutes M] [--report FILE]
A failing seed is printed with its schedule; `chaos.py --seed S` replays the same schedule (the
timing of the machine is not replayed: the same faults at the same offsets).
"""
import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import threading  # noqa: E402

from ftvm_e2e import (BUILD, Env, Failure, Ftd, Serial, check, check_continuity, log, pid_alive,  # noqa: E402
                      wait_for, watch_exit, write_fence)
from test_output_commit import CLIENT, sh  # noqa: E402

VM = 'vm1'
HB_MS = 1000
FAULTS = [
    # (name, weight, ends the seed when it works as designed?)
    ('reset', 3), ('part-short-both', 2), ('part-short-to-standby', 1), ('part-short-to-primary', 1),
    ('part-long-both', 2), ('part-long-to-standby', 1), ('part-long-to-primary', 1),
    ('stop-primary-ftd-short', 2), ('stop-primary-ftd-long', 1), ('stop-standby-ftd-short', 2),
    ('stop-standby-ftd-long', 1), ('kill-qemu', 1), ('kill-primary-ftd', 1), ('kill-standby-ftd', 2),
    ('kill-guard', 2), ('restart-standby-ftd', 2), ('kill-twin', 2), ('restart-primary-ftd', 1),
]




class Hosts:
    def __init__(self):
        tag = os.urandom(3).hex()
        self.tag = tag
        self.br = 'chb' + tag
        self.nsP, self.nsS, self.nsC = 'ftvm-chp-' + tag, 'ftvm-chs-' + tag, 'ftvm-chc-' + tag
        self.ptap, self.ttap = 'chp' + tag, 'cht' + tag
        b = os.urandom(2)
        self.subnet = '10.%d.%d' % (150 + b[0] % 50, b[1])
        self.cip, self.gip, self.pip, self.sip = (self.subnet + x for x in ('.1', '.2', '.11', '.12'))
        self.mac = '52:54:00:%02x:%02x:%02x' % tuple(os.urandom(3))
        self.links = []

    def veth_into(self, ns, name):
        a, b = name + 'a', name + 'b'
        sh('ip', 'link', 'add', a, 'type', 'veth', 'peer', 'name', b)
        self.links.append(a)
        sh('ip', 'link', 'set', b, 'netns', ns)
        sh('ip', 'link', 'set', a, 'master', self.br, 'up')
        return b

    def __enter__(self):
        try:
            sh('ip', 'link', 'add', self.br, 'type', 'bridge', 'stp_state', '0', 'forward_delay', '0')
            self.links.append(self.br)
            sh('ip', 'link', 'set', self.br, 'up')
            sh('ip', 'tuntap', 'add', self.ptap, 'mode', 'tap')
            self.links.append(self.ptap)
            sh('ip', 'link', 'set', self.ptap, 'master', self.br, 'up')
            for ns in (self.nsP, self.nsS, self.nsC):
                sh('ip', 'netns', 'add', ns)
                sh('ip', '-n', ns, 'link', 'set', 'lo', 'up')
            vp = self.veth_into(self.nsP, 'chvp' + self.tag[:4])
            sh('ip', '-n', self.nsP, 'addr', 'add', self.pip + '/24', 'dev', vp)
            sh('ip', '-n', self.nsP, 'link', 'set', vp, 'up')
            vc = self.veth_into(self.nsC, 'chvc' + self.tag[:4])
            sh('ip', '-n', self.nsC, 'addr', 'add', self.cip + '/24', 'dev', vc)
            sh('ip', '-n', self.nsC, 'link', 'set', vc, 'up')
            vs = self.veth_into(self.nsS, 'chvs' + self.tag[:4])
            # ns S: its own bridge joins its uplink and the twin's tap (the standby host's NIC).
            sh('ip', '-n', self.nsS, 'link', 'add', 'brs', 'type', 'bridge', 'stp_state', '0', 'forward_delay', '0')
            sh('ip', '-n', self.nsS, 'link', 'set', vs, 'master', 'brs', 'up')
            sh('ip', '-n', self.nsS, 'tuntap', 'add', self.ttap, 'mode', 'tap')
            sh('ip', '-n', self.nsS, 'link', 'set', self.ttap, 'master', 'brs')
            sh('ip', '-n', self.nsS, 'addr', 'add', self.sip + '/24', 'dev', 'brs')
            sh('ip', '-n', self.nsS, 'link', 'set', 'brs', 'up')
        except Exception:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *a):
        for ns in (self.nsP, self.nsS, self.nsC):
            for pid in sh('ip', 'netns', 'pids', ns, ok=True).stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
        for l in reversed(self.links):
            sh('ip', 'link', 'del', l, ok=True)
        for ns in (self.nsP, self.nsS, self.nsC):
            sh('ip', 'netns', 'del', ns, ok=True)
        return False

    def partition(self, direction, on):
        """Replication traffic between P and S only (the client keeps its path): iptables in ns S."""
        rules = []
        if direction in ('both', 'to-standby'):
            rules.append(['INPUT', '-s', self.pip, '-j', 'DROP'])
        if direction in ('both', 'to-primary'):
            rules.append(['OUTPUT', '-d', self.pip, '-j', 'DROP'])
        for r in rules:
            sh('ip', 'netns', 'exec', self.nsS, 'iptables', '-w', '-I' if on else '-D', *r, ok=not on)


def vcpu_time(pid):
    """Clock ticks of CPU time used so far by `pid`'s vCPU threads (None when it is gone)."""
    try:
        tids = os.listdir('/proc/%d/task' % pid)
    except OSError:
        return None
    total = 0
    for t in tids:
        try:
            with open('/proc/%d/task/%s/stat' % (pid, t)) as f:
                st = f.read()
        except OSError:
            continue
        comm = st[st.index('(') + 1:st.rindex(')')]
        if not comm.startswith('CPU '):
            continue
        fields = st[st.rindex(')') + 2:].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total


class CpuWatch:
    """Samples the vCPU CPU time of the primary QEMU and the current twin every 50 ms (see the
    module doc). `overlaps` lists (time, pids) of consecutive samples in which more than one copy
    executed guest code; `max_running` is the most copies seen running in one sample."""

    def __init__(self, primary_pid, twin_pid_file):
        self.primary_pid, self.twin_pid_file = primary_pid, twin_pid_file
        self.last, self.prev_running = {}, set()
        self.overlaps, self.max_running, self.samples = [], 0, 0
        self.running_samples = {}  # pid -> samples in which it executed guest code
        self.stop = threading.Event()
        self.t = threading.Thread(target=self.run, daemon=True)
        self.t.start()

    def pids(self):
        ps = [self.primary_pid]
        try:
            ps.append(int(open(self.twin_pid_file()).read()))
        except (OSError, ValueError, AttributeError):  # no twin (yet), or no standby started yet
            pass
        return ps

    def run(self):
        while not self.stop.is_set():
            running = set()
            for pid in self.pids():
                v = vcpu_time(pid)
                if v is None:
                    self.last.pop(pid, None)
                    continue
                if pid in self.last and v > self.last[pid]:
                    running.add(pid)
                    self.running_samples[pid] = self.running_samples.get(pid, 0) + 1
                self.last[pid] = v
            self.samples += 1
            self.max_running = max(self.max_running, len(running))
            if len(running) > 1 and len(self.prev_running) > 1:
                self.overlaps.append((time.time(), sorted(running)))
            self.prev_running = running
            time.sleep(0.05)

    def check(self):
        check(not self.overlaps, 'SPLIT BRAIN (/proc): two QEMUs executed guest code in consecutive 50 ms samples at '
              '%s' % self.overlaps[:3])


class Chaos:
    def __init__(self, seed, faults):
        self.seed, self.nfaults = seed, faults
        self.rng = random.Random(seed)
        self.done = []      # (fault, outcome)
        self.outcome = 'ok'

    def start_ftd(self, env, h, role):
        ns = h.nsP if role == 'primary' else h.nsS
        run = env.path(role)
        os.makedirs(run, exist_ok=True)
        logf = env.path('%s.ftd.log' % role)
        fence = env.path('fence.sh')
        args = ['ip', 'netns', 'exec', ns, os.path.join(BUILD, 'ftd'), '--run-dir', run, '--log', logf,
                '--listen', ('%s:%d' % (h.sip, env.port)) if role == 'standby' else '',
                '--heartbeat-timeout-ms', str(HB_MS), '--enable-fault-injection', '--stats-dir', env.dir,
                '--libvirt-uri', '', '--arbiter', 'fence-command', '--fence-command', fence,
                '--fence-timeout-ms', '5000', '--state-dir', env.path('%s-state' % role),
                '--key-file', env.key] + env.twin_policy_args()
        if role == 'standby':
            args += ['--twin-tap-map', '%s=%s' % (h.ptap, h.ttap), '--disk-dir', env.path('disks')]
        p = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=open(logf + '.out', 'a'), stderr=subprocess.STDOUT)
        env.procs.append(p)
        env.track(p.pid, 'ftd ' + role)
        d = Ftd(env, role, p, run, logf)
        wait_for(lambda: os.path.exists(d.control) or p.poll() is not None, 10, 'ftd %s control socket' % role)
        check(p.poll() is None, 'ftd %s exited at start: %s' % (role, open(logf + '.out').read()[-2000:]))
        with open(env.path('%s.ftd.pid' % role), 'w') as f:
            f.write('%d\n' % p.pid)
        return d

    def state(self, ftd, role):
        try:
            v = ftd.vm(VM, role)
        except Exception:
            return None
        return v['state'] if v else None

    def client_ok(self, out):
        lines = open(out).read().splitlines()
        errs = [l for l in lines if l.startswith('ERR')]
        check(not errs, 'client connection broke: %s' % errs)
        nums = [int(l.split()[2]) for l in lines if len(l.split()) == 3 and l.split()[2].isdigit()]
        bad = [(a, b) for a, b in zip(nums, nums[1:]) if b != a + 1]
        check(not bad, 'SPLIT BRAIN or lost output: client totals not consecutive at %s' % bad[:5])
        check(not nums or nums[0] == 1, 'client totals start at %d' % (nums[0] if nums else -1))
        return nums

    def no_overlap(self, ps, twins):
        for ts in twins:
            tt = ts.ticks()
            if not tt:
                continue
            first = tt[0][0]
            late = [n for t, n in ps.ticks() if t > first + 0.15]
            check(not late, 'SPLIT BRAIN: primary ticks %s after a twin started at %.3f' % (late[:5], first))

    def attach_twin(self, env, S, twins):
        """A reader on the current twin's serial console (each new session starts a new twin;
        QEMU drops console output while nobody reads, so a reader must be there before the twin
        resumes: the watcher thread started in run() attaches one as soon as a twin appears)."""
        if twins and twins[-1].is_alive():
            return
        sock = os.path.join(S.run_dir, 'vms', VM, 'serial.sock')
        if not os.path.exists(sock):
            return
        ser = Serial(sock, env.path('twin-%s.%d.serial.log' % (VM, len(twins))))
        ser.start()
        env.serials.append(ser)
        ser.connected.wait(5)
        twins.append(ser)

    def watch_twins(self, env, twins, stop):
        while not stop.is_set():
            try:
                self.attach_twin(env, self.S, twins)
            except Exception as e:  # keep watching; the checks report what matters
                log('twin serial watcher: %s' % e)
            time.sleep(0.02)

    def run(self):
        t0 = time.time()
        with Hosts() as h, Env('chaos-%d' % self.seed) as env:
            write_fence(env, VM)
            g = env.boot_guest(dirty_kib_s=256, extra_append=' ftvm_ip=%s/24' % h.gip,
                               extra_args=['-name', '%s,debug-threads=on' % VM,  # vCPU threads named (CpuWatch)
                                           '-netdev', 'tap,id=n0,ifname=%s,script=no,downscript=no' % h.ptap,
                                           '-device', 'virtio-net-pci,netdev=n0,mac=%s,romfile=' % h.mac])
            wait_for(lambda: any('INIT: eth0' in l for _, l in g.serial.all()), 90, 'guest network up')
            g.serial.wait_ticks(2, 90)
            gone = watch_exit(g.pid)
            cpu = CpuWatch(g.pid, lambda: os.path.join(self.S.run_dir, 'vms', VM, 'twin.pid'))
            self.cpu = cpu
            with open(env.path('primary.qemu.pid'), 'w') as f:
                f.write('%d\n' % g.pid)
            P = self.start_ftd(env, h, 'primary')
            S = self.start_ftd(env, h, 'standby')
            P.ctl('enable', '--qmp', g.qmp, '--peer', '%s:%d' % (h.sip, env.port), '--name', VM, '--timeout', '120')
            twins = []
            self.S = S
            stop_watch = threading.Event()
            threading.Thread(target=self.watch_twins, args=(env, twins, stop_watch), daemon=True).start()
            wait_for(lambda: twins, 30, 'a reader on the twin console')
            out, stopf = env.path('client.out'), env.path('client.stop')
            open(env.path('client.py'), 'w').write(CLIENT)
            cp = subprocess.Popen(['ip', 'netns', 'exec', h.nsC, sys.executable, env.path('client.py'), h.gip, '7001',
                                   out, stopf], stdin=subprocess.DEVNULL)
            env.procs.append(cp)
            env.track(cp.pid, 'client')
            wait_for(lambda: os.path.exists(out) and len(self.client_ok(out)) >= 10, 60, 'client replies')
            names = [n for n, w in FAULTS for _ in range(w)]
            for i in range(self.nfaults):
                S = self.wait_protected(env, h, P, S, 'protection before fault %d' % i)
                self.S = S
                time.sleep(0.3 + self.rng.uniform(0.0, 1.2))
                fault = self.rng.choice(names)
                log('seed %d fault %d: %s' % (self.seed, i, fault))
                ended = self.inject(fault, env, h, g, P, S)
                S = ended.get('standby', S)
                P = ended.get('primary', P)
                self.S = S
                n_before = len(self.client_ok(out))
                # Let it settle; then the invariants.
                time.sleep(3.0)
                self.no_overlap(g.serial, twins)
                cpu.check()
                active = self.state(S, 'active') == 'active'
                if active or gone():
                    v = wait_for(lambda: S.vm(VM, 'active') if self.state(S, 'active') == 'active' else None, 30,
                                 'the twin to take over (the primary QEMU is gone)')
                    a = v['activation']
                    wait_for(gone, 20, 'the primary QEMU to be gone once the twin runs')
                    check(gone() * 1000 < a['cont_wall_ms'], 'SPLIT BRAIN: primary QEMU exited at %.3f, after the '
                          'twin resumed at %.3f' % (gone(), a['cont_wall_ms'] / 1000))
                    check_continuity(g.serial, twins[-1], P.committed_cut_ms(VM, a['epoch']) if P.epochs(VM) else 0)
                    wait_for(lambda: len(self.client_ok(out)) >= n_before + 10, 90, 'client replies from the twin')
                    self.no_overlap(g.serial, twins)
                    self.done.append((fault, 'failed over'))
                    self.outcome = 'failed over'
                    break
                check(pid_alive(g.pid), 'neither copy runs after %s' % fault)
                wait_for(lambda: len(self.client_ok(out)) >= n_before + 5, 60, 'client replies after %s' % fault)
                if os.path.exists(env.path('fence.lock')) or S.proc.poll() is not None:
                    S = self.reboot_standby(env, h, S)
                    self.done.append((fault, 'standby fenced or down, rebooted'))
                else:
                    self.done.append((fault, 'primary ran on'))
            stop_watch.set()
            open(stopf, 'w').close()
            cp.wait(90)
            nums = self.client_ok(out)
            self.no_overlap(g.serial, twins)
            cpu.stop.set()
            cpu.check()
            check(cpu.samples > 0 and cpu.max_running >= 1, '/proc watch never saw a QEMU execute (%d samples)' %
                  cpu.samples)
            log('seed %d: %d faults %s; client totals 1..%d consecutive; /proc: %d samples, vCPU busy per pid %s, '
                'never two at once; %.0f s' % (self.seed, len(self.done), [f for f, _ in self.done],
                                               nums[-1] if nums else 0, cpu.samples, cpu.running_samples,
                                               time.time() - t0))
        return self.done

    def wait_protected(self, env, h, P, S, what, timeout=120):
        """Waits for protection, rebooting the standby host whenever a fence fired or it is down."""
        end = time.time() + timeout
        while time.time() < end:
            if os.path.exists(env.path('fence.lock')) or S.proc.poll() is not None:
                S = self.reboot_standby(env, h, S)
            if self.state(P, 'primary') == 'protected':
                return S
            time.sleep(0.1)
        raise Failure('timed out after %d s waiting for %s' % (timeout, what))

    def reboot_standby(self, env, h, S):
        """The fenced (or killed) standby host comes back: leftovers killed, fence re-armed, ftd
        started. A fence that fired at an earlier incarnation (the current ftd runs) only re-arms."""
        if S.proc.poll() is None:
            sh('rm', '-rf', env.path('fence.lock'))
            return S
        S.proc.wait(10)
        try:
            tp = int(open(os.path.join(S.run_dir, 'vms', VM, 'twin.pid')).read())
            os.kill(tp, signal.SIGKILL)
        except (OSError, ValueError):
            pass
        sh('rm', '-rf', env.path('fence.lock'))
        self.S = self.start_ftd(env, h, 'standby')
        return self.S

    def inject(self, fault, env, h, g, P, S):
        r = {}
        if fault == 'reset':
            sh('ip', 'netns', 'exec', h.nsP, 'ss', '-K', 'dst', h.sip)
        elif fault.startswith('part-'):
            _, length, direction = fault.split('-', 2)
            h.partition(direction, True)
            try:
                time.sleep(0.3 if length == 'short' else 3.5)
            finally:
                h.partition(direction, False)
        elif fault.startswith('stop-'):
            who = P if 'primary' in fault else S
            os.kill(who.proc.pid, signal.SIGSTOP)
            time.sleep(0.2 if fault.endswith('short') else 2.5)
            os.kill(who.proc.pid, signal.SIGCONT)
        elif fault == 'kill-qemu':
            os.kill(g.pid, signal.SIGKILL)
        elif fault == 'kill-primary-ftd':
            os.kill(P.proc.pid, signal.SIGKILL)
        elif fault == 'kill-standby-ftd':
            os.kill(S.proc.pid, signal.SIGKILL)
        elif fault == 'kill-guard':
            v = P.vm(VM, 'primary')
            os.kill(v['guard_pid'], signal.SIGKILL)
        elif fault == 'restart-standby-ftd':
            S.proc.terminate()
            S.proc.wait(30)
            r['standby'] = self.start_ftd(env, h, 'standby')
        elif fault == 'kill-twin':  # the standby's paused twin QEMU
            try:
                os.kill(int(open(os.path.join(S.run_dir, 'vms', VM, 'twin.pid')).read()), signal.SIGKILL)
            except (OSError, ValueError) as e:
                log('kill-twin: no twin to kill (%s)' % e)
        elif fault == 'restart-primary-ftd':  # an upgrade: the new ftd protects the VM again by itself
            P.proc.terminate()
            P.proc.wait(30)
            try:
                os.unlink(P.control)
            except FileNotFoundError:
                pass
            r['primary'] = self.start_ftd(env, h, 'primary')
        return r


def main():
    # SIGTERM (ctest's timeout, a user) unwinds like an exception: every `with` block cleans up
    # (processes by PID, namespaces, links).
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--seed', type=int, help='run (replay) only this seed')
    ap.add_argument('--seeds', type=int, default=2, help='number of seeds (default 2)')
    ap.add_argument('--first-seed', type=int, default=int(os.environ.get('FTVM_CHAOS_FIRST_SEED', '1')))
    ap.add_argument('--faults', type=int, default=6, help='faults per seed at most (default 6)')
    ap.add_argument('--minutes', type=float, default=0, help='keep drawing seeds for this long (overrides --seeds)')
    ap.add_argument('--report', help='append one JSON line per seed here')
    a = ap.parse_args()
    for f in ('vmlinux', 'initramfs.cpio.gz'):
        if not os.path.exists(os.path.join(os.environ.get('FTVM_GUEST_DIR', os.path.join(BUILD, 'guest')), f)):
            print('test guest missing: build it with `cmake --build build --target guest-image`')
            sys.exit(1)
    seeds = [a.seed] if a.seed is not None else None
    t_end = time.time() + a.minutes * 60
    s = a.first_seed
    total, kinds, failed = 0, {}, []
    while True:
        if seeds is not None:
            if not seeds:
                break
            seed = seeds.pop()
        else:
            if a.minutes > 0:
                if time.time() > t_end:
                    break
            elif s >= a.first_seed + a.seeds:
                break
            seed = s
            s += 1
        c = Chaos(seed, a.faults)
        ok, err = True, None
        try:
            c.run()
        except Failure as e:
            ok, err = False, str(e)
            failed.append(seed)
            log('FAIL seed %d after faults %s: %s (replay: chaos.py --seed %d --faults %d)' %
                (seed, [f for f, _ in c.done], e, seed, a.faults))
        total += len(c.done) + (0 if ok else 1)
        for f, _ in c.done:
            kinds[f] = kinds.get(f, 0) + 1
        if a.report:
            with open(a.report, 'a') as rf:
                rf.write(json.dumps({'seed': seed, 'faults': c.done, 'outcome': c.outcome, 'passed': ok,
                                     'error': err}) + '\n')
    log('chaos: %d faults, by kind %s; seeds failed: %s' % (total, json.dumps(kinds, sort_keys=True), failed or 'none'))
    print('%d passed, %d failed' % (total - len(failed), len(failed)))
    sys.exit(1 if failed else 0)


if __name__ == '__main__':
    main()
