#!/usr/bin/python3
"""Output commit scenarios (CTest label `output-commit`): a real guest on a tap in a bridge the
test creates (unique names per run, removed at the end even on failure), a TCP client in a network
namespace with a veth into the bridge, the twin on its own tap (ftd --twin-tap-map) kept down
until activation.

  kill-qemu / planned: one TCP connection to the guest's counter service (port 7001) runs through
      a failover; it must survive, the totals must go 1, 2, 3, ... with no gap or repeat (a total
      the client saw before the failover is part of the guest state the twin resumed from).
  checker: capture on the bridge port of the client: no frame of the guest appears before the ftd
      log line releasing its epoch (cumulative count of captured guest frames at time t <= frames
      released by lines logged at or before t); then disable: no filter or chardev of ftvm is left
      in QEMU and the same connection keeps working.
"""
import os
import re
import signal
import struct
import subprocess
import sys
import time

from ftvm_e2e import (Env, Failure, check, log, main, protect, qmp, wait_for, watch_exit)

VM = 'vm1'
HERE = os.path.dirname(os.path.abspath(__file__))

CLIENT = r'''
import socket, sys, time, os
host, port, out, stop = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
f = open(out, 'w', buffering=1)
try:
    s = socket.create_connection((host, port), timeout=30)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.settimeout(60)
    fr = s.makefile('rb')
    f.write('CONNECTED %.6f\n' % time.time())
    while not os.path.exists(stop):
        t0 = time.time()
        s.sendall(b'x\n')
        line = fr.readline()
        if not line:
            f.write('ERR connection closed by the guest %.6f\n' % time.time()); break
        f.write('%.6f %.6f %s\n' % (t0, time.time(), line.decode().strip()))
        time.sleep(0.01)
except Exception as e:
    f.write('ERR %s %.6f\n' % (e, time.time()))
f.write('END\n')
'''


def sh(*cmd, ok=False):
    r = subprocess.run(list(cmd), capture_output=True, text=True)
    if r.returncode != 0 and not ok:
        raise Failure('%s failed: %s' % (' '.join(cmd), r.stderr.strip()))
    return r


class Net:
    """bridge + primary tap + twin tap + client netns with a veth into the bridge."""

    def __init__(self, env):
        tag = os.urandom(3).hex()
        self.br, self.ptap, self.ttap = 'ocb' + tag, 'ocp' + tag, 'oct' + tag
        self.veth, self.peer, self.ns = 'ocv' + tag, 'ocw' + tag, 'ftvm-oc-' + tag
        b = os.urandom(2)
        self.subnet = '10.%d.%d' % (200 + b[0] % 50, b[1])
        self.client_ip, self.guest_ip = self.subnet + '.1', self.subnet + '.2'
        self.mac = '52:54:00:%02x:%02x:%02x' % tuple(os.urandom(3))
        self.env = env

    def __enter__(self):
        try:
            sh('ip', 'link', 'add', self.br, 'type', 'bridge', 'stp_state', '0', 'forward_delay', '0')
            sh('ip', 'link', 'set', self.br, 'up')
            for t in (self.ptap, self.ttap):
                sh('ip', 'tuntap', 'add', t, 'mode', 'tap')
                sh('ip', 'link', 'set', t, 'master', self.br, 'up')
            sh('ip', 'netns', 'add', self.ns)
            sh('ip', 'link', 'add', self.veth, 'type', 'veth', 'peer', 'name', self.peer)
            sh('ip', 'link', 'set', self.peer, 'netns', self.ns)
            sh('ip', 'link', 'set', self.veth, 'master', self.br, 'up')
            sh('ip', '-n', self.ns, 'addr', 'add', self.client_ip + '/24', 'dev', self.peer)
            sh('ip', '-n', self.ns, 'link', 'set', self.peer, 'up')
            sh('ip', '-n', self.ns, 'link', 'set', 'lo', 'up')
        except Exception:
            self.__exit__(None, None, None)
            raise
        log('network: bridge %s, taps %s (primary) %s (twin), netns %s %s, guest %s mac %s' %
            (self.br, self.ptap, self.ttap, self.ns, self.client_ip, self.guest_ip, self.mac))
        return self

    def __exit__(self, *a):
        for l in (self.veth, self.ptap, self.ttap, self.br):
            sh('ip', 'link', 'del', l, ok=True)
        sh('ip', 'netns', 'del', self.ns, ok=True)
        return False

    def guest_args(self):
        return ['-netdev', 'tap,id=n0,ifname=%s,script=no,downscript=no' % self.ptap,
                '-device', 'virtio-net-pci,netdev=n0,mac=%s,romfile=' % self.mac]


class Client:
    def __init__(self, env, net, port=7001):
        self.out, self.stopf = env.path('client.out'), env.path('client.stop')
        script = env.path('client.py')
        open(script, 'w').write(CLIENT)
        self.p = subprocess.Popen(['ip', 'netns', 'exec', net.ns, sys.executable, script, net.guest_ip, str(port),
                                   self.out, self.stopf], stdin=subprocess.DEVNULL)
        env.procs.append(self.p)
        env.track(self.p.pid, 'client')
        wait_for(lambda: os.path.exists(self.out) and open(self.out).read(), 30, 'client connected')

    def lines(self):
        return open(self.out).read().splitlines()

    def replies(self):
        out = []
        for l in self.lines():
            p = l.split()
            if len(p) == 3 and p[2].isdigit():
                out.append((float(p[0]), float(p[1]), int(p[2])))
        return out

    def errors(self):
        return [l for l in self.lines() if l.startswith('ERR')]

    def stop(self):
        open(self.stopf, 'w').close()
        self.p.wait(90)

    def check_sequence(self):
        r = self.replies()
        errs = self.errors()
        check(not errs, 'client connection broke: %s' % errs)
        nums = [n for _, _, n in r]
        check(nums, 'client got no replies')
        check(nums == list(range(1, len(nums) + 1)),
              'totals are not 1, 2, 3, ... (gap or repeat): first %s, bad at %s' %
              (nums[:5], [(a, b) for a, b in zip(nums, nums[1:]) if b != a + 1][:5]))
        return r


def start_guest(env, net):
    g = env.boot_guest(dirty_kib_s=256, extra_append=' ftvm_ip=%s/24' % net.guest_ip, extra_args=net.guest_args())
    wait_for(lambda: any('INIT: eth0' in l for _, l in g.serial.all()), 90, 'guest network up')
    g.serial.wait_ticks(2, 90)
    return g


def setup(env, net, epoch_ms=25):
    g = start_guest(env, net)
    P = env.start_ftd('primary', listen=False)
    S = env.start_ftd('standby', extra=['--twin-tap-map', '%s=%s' % (net.ptap, net.ttap)])
    protect(env, P, S, g, VM, epoch_ms=epoch_ms)
    v = P.vm(VM, 'primary')
    check(v['output'] and v['output']['netdevs'][0]['netdev'] == 'n0', 'no output buffer on netdev n0: %s' % v['output'])
    check(open('/sys/class/net/%s/operstate' % net.ttap).read().strip() == 'down' and
          not (int(open('/sys/class/net/%s/flags' % net.ttap).read(), 16) & 1),
          'twin tap %s is not admin-down before failover' % net.ttap)
    return g, P, S


def failover_scenario(planned):
    with Net(None) as net, Env('oc-' + ('planned' if planned else 'kill')) as env:
        g, P, S = setup(env, net)
        c = Client(env, net)
        wait_for(lambda: len(c.replies()) >= 40, 60, '40 replies before failover')
        v = P.vm(VM, 'primary')
        check(v['output']['mode'] == 'holding', 'output not held while protected: %s' % v['output'])
        check(v['output']['frames_released'] > 0, 'no frame released: %s' % v['output'])
        n_before = len(c.replies())
        t_fail = time.time()
        if planned:
            r = P.ctl('failover', VM, timeout=120)
            log('planned failover: %s' % r.stdout.strip())
        else:
            gone = watch_exit(g.pid)
            os.kill(g.pid, signal.SIGKILL)
            wait_for(gone, 10, 'primary QEMU exit')
        wait_for(lambda: (S.vm(VM) or {}).get('state') == 'active', 60, 'twin active')
        t_active = time.time()
        check(open('/sys/class/net/%s/flags' % net.ttap).read().strip() != '' and
              int(open('/sys/class/net/%s/flags' % net.ttap).read(), 16) & 1, 'twin tap not up after activation')
        wait_for(lambda: len([x for x in c.replies() if x[0] > t_active]) >= 30 or c.errors(), 90,
                 '30 replies from the twin')
        c.stop()
        r = c.check_sequence()
        before = [n for t0, t1, n in r if t1 < t_fail]
        after = [(t0, t1, n) for t0, t1, n in r if t1 >= t_fail]
        stall = max(b[1] - a[1] for a, b in zip(r, r[1:]))
        log('%d replies before failover (last total %d), %d after (first %d); longest wait between replies %.2f s; '
            'totals gap-free 1..%d, %d of them requested after the twin was active' %
            (len(before), before[-1], len(after), after[0][2], stall, r[-1][2],
             len([x for x in r if x[0] > t_active])))
        check(len(before) >= n_before - 1, 'replies missing')
        check(after[0][2] == before[-1] + 1, 'first total after failover %d does not continue from %d' %
              (after[0][2], before[-1]))


def parse_pcap(path):
    """(timestamp, src mac) per frame of a classic pcap file (µs timestamps, Ethernet)."""
    d = open(path, 'rb').read()
    check(len(d) >= 24, 'empty capture %s' % path)
    magic = struct.unpack('<I', d[:4])[0]
    check(magic == 0xa1b2c3d4, 'unexpected pcap magic %x' % magic)
    off, out = 24, []
    while off + 16 <= len(d):
        ts, tu, incl, _ = struct.unpack('<IIII', d[off:off + 16])
        fr = d[off + 16:off + 16 + incl]
        out.append((ts + tu / 1e6, fr[6:12].hex(':')))
        off += 16 + incl
    return out


RELEASE_RE = re.compile(r'released epoch (\d+): (\d+) frames, \d+ bytes \(released total (\d+) frames\) wall_us (\d+)')


def releases(P):
    return [(int(m.group(4)) / 1e6, int(m.group(1)), int(m.group(3))) for m in RELEASE_RE.finditer(P.log_text())]


def checker_scenario():
    with Net(None) as net, Env('oc-checker') as env:
        g, P, S = setup(env, net)
        pcap = env.path('guest-frames.pcap')
        tcpd = subprocess.Popen(['tcpdump', '-i', net.veth, '-nn', '-U', '--immediate-mode', '-w', pcap,
                                 'ether src %s' % net.mac], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=open(env.path('tcpdump.err'), 'w'))
        env.procs.append(tcpd)
        env.track(tcpd.pid, 'tcpdump')
        wait_for(lambda: 'listening on' in open(env.path('tcpdump.err')).read(), 20, 'tcpdump ready')
        time.sleep(0.5)
        t_cap = time.time()
        base = [tot for ts, _, tot in releases(P) if ts < t_cap]
        base = base[-1] if base else 0
        c = Client(env, net)
        wait_for(lambda: len(c.replies()) >= 150, 120, '150 replies')
        time.sleep(0.3)
        tcpd.send_signal(signal.SIGINT)
        tcpd.wait(10)
        frames = [f for f in parse_pcap(pcap) if f[1] == net.mac and f[0] >= t_cap]
        rel = releases(P)
        check(len(frames) >= 150, 'only %d guest frames captured' % len(frames))
        # Cumulative check: k-th captured guest frame (k from 1) at time t needs k frames released
        # (beyond the baseline) by log lines at or before t.
        j, released, worst = 0, 0, None
        for k, (t, _) in enumerate(sorted(frames), 1):
            while j < len(rel) and rel[j][0] <= t:
                released = rel[j][2] - base
                j += 1
            if k > released:
                raise Failure('guest frame #%d seen on %s at %.6f before its release: only %d frames released by '
                              'then (last release line before it: %s)' % (k, net.veth, t, released,
                                                                           rel[j - 1] if j else None))
            margin = released - k
            worst = margin if worst is None else min(worst, margin)
        lat = sorted(t1 - t0 for t0, t1, _ in c.replies())
        log('output-commit checker: %d guest frames captured, each after the ftd line releasing it (%d release lines, '
            'min slack %d frames); request/response p50 %.1f ms' % (len(frames), len(rel), worst,
                                                                  lat[len(lat) // 2] * 1000))
        # Output at the speed of a checkpoint (issue 14; --output-epoch-min-ms 2 by default): the
        # replies above made the primary cut epochs for waiting output, and every one of those
        # frames still waited for its release (checked above).
        out = P.vm(VM, 'primary')['output']
        log('epochs cut because output waited: %d' % out.get('output_cuts', 0))
        check(out.get('output_cuts', 0) > 0, 'no epoch was cut for waiting output: %s' % out)
        # Disable restores the plain path.
        n0 = len(c.replies())
        P.ctl('disable', VM, timeout=120)
        objs = wait_for(lambda: _try_qmp(g.qmp, [('qom-list', {'path': '/objects'}), 'query-chardev']), 20,
                        'guest QMP free after disable')
        left = [o for o in objs[0] if 'filter' in o.get('type', '') or o['name'].startswith('ftvm-')]
        check(not left, 'objects left in QEMU after disable: %s' % left)
        chr_left = [ch['label'] for ch in objs[1] if ch['label'].startswith('ftvm-')]
        check(not chr_left, 'chardevs left in QEMU after disable: %s' % chr_left)
        wait_for(lambda: len(c.replies()) >= n0 + 50 or c.errors(), 60, '50 replies after disable')
        c.stop()
        c.check_sequence()
        log('disable: no filters or chardevs left; %d more replies on the same connection' % (len(c.replies()) - n0))


def degraded_scenario():
    """Standby lost: the guest's frames flow without holding (status says so), the client's
    connection carries on; a returning standby re-protects and frames are held again."""
    with Net(None) as net, Env('oc-degraded') as env:
        g, P, S = setup(env, net)
        c = Client(env, net)
        wait_for(lambda: len(c.replies()) >= 20, 60, '20 replies while protected')
        twin_pid = S.vm(VM, 'standby')['twin_pid']
        S.kill9()
        os.kill(twin_pid, signal.SIGKILL)
        wait_for(lambda: P.vm(VM, 'primary')['state'] == 'degraded', 20, 'primary degraded')
        o = P.vm(VM, 'primary')['output']
        log('degraded output: mode %s (%s), passed through %d' % (o['mode'], o['mode_reason'], o['frames_passed_through']))
        check(o['mode'] == 'pass-through', 'output still held while degraded: %s' % o)
        t_deg = time.time()
        wait_for(lambda: len([x for x in c.replies() if x[0] > t_deg]) >= 20 or c.errors(), 60,
                 '20 replies while degraded')
        o = P.vm(VM, 'primary')['output']
        check(o['frames_passed_through'] > 0 and o['held_bytes'] == 0, 'frames not passed through: %s' % o)
        S2 = env.start_ftd('standby', extra=['--twin-tap-map', '%s=%s' % (net.ptap, net.ttap)])
        wait_for(lambda: P.vm(VM, 'primary')['state'] == 'protected', 90, 'protection to resume')
        wait_for(lambda: P.vm(VM, 'primary')['output']['mode'] == 'holding', 10, 'output held again')
        r0 = P.vm(VM, 'primary')['output']['frames_released']
        n = len(c.replies())
        wait_for(lambda: len(c.replies()) >= n + 20 or c.errors(), 60, '20 replies after re-protection')
        check(P.vm(VM, 'primary')['output']['frames_released'] > r0, 'no frame released after re-protection')
        c.stop()
        r = c.check_sequence()
        log('degraded and re-protected: %d replies, totals gap-free 1..%d, standby %s' %
            (len(r), r[-1][2], S2.vm(VM, 'standby')['state']))


def _try_qmp(path, cmds):
    try:
        return qmp(path, cmds, timeout=3)
    except (OSError, Failure):
        return None


if __name__ == '__main__':
    main({'kill-qemu': lambda: failover_scenario(False), 'planned': lambda: failover_scenario(True),
          'checker': checker_scenario, 'degraded': degraded_scenario})
