#!/usr/bin/python3
"""ftvm core-replication benchmarks (not tests: nothing here passes or fails).

Boots real test guests under QEMU and protects them with two real ftd daemons on loopback,
through the e2e harness (tests/e2e/ftvm_e2e.py), and measures:

  pause     per-epoch pause time and its breakdown (stop, scan, copy, device state, cont),
            checkpoint size, pages, replication throughput and ack latency, for several guest
            sizes / dirty rates / vCPU counts; the pause floor (QMP stop + xen-save-devices-state
            + cont with nothing to copy) measured on the same guest before protection; primary
            and standby ftd memory.
  slowdown  the guest workload's progress (KiB written/s, ticks/s) with protection off, then on,
            on the same guest.
  failover  kill -9 of the primary QEMU and of the primary ftd: detection, activation and the
            first tick the twin prints; with and without --no-verify-activation on the standby.

Results: bench/results/ftvm-bench-<time>.json (+ latest.json, latest.txt). See docs/BENCHMARKS.md.
Usage: bench/ftvm_bench.py [--quick] [--only pause,slowdown,failover] [--out DIR]
"""
import argparse
import datetime
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, '..', 'tests', 'e2e'))
import ftvm_e2e as e2e  # noqa: E402
from ftvm_e2e import Env, log, protect, wait_for, watch_exit  # noqa: E402

VM = 'vm1'


# ---- statistics --------------------------------------------------------------------------------
def pct(xs, p):
    """Percentile with linear interpolation between closest ranks (numpy's default)."""
    xs = sorted(xs)
    if not xs:
        return None
    k = (len(xs) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summ(xs, scale=1.0, nd=3):
    xs = [x * scale for x in xs if x is not None]
    if not xs:
        return {'n': 0}
    r = lambda v: round(v, nd)  # noqa: E731
    return {'n': len(xs), 'mean': r(sum(xs) / len(xs)), 'p50': r(pct(xs, 50)), 'p90': r(pct(xs, 90)),
            'p99': r(pct(xs, 99)), 'max': r(max(xs)), 'min': r(min(xs))}


def cpu_s(pid):
    """User + system CPU seconds of a process (all threads) so far."""
    try:
        f = open('/proc/%d/stat' % pid).read().rsplit(') ', 1)[1].split()
        return (int(f[11]) + int(f[12])) / os.sysconf('SC_CLK_TCK')
    except (OSError, IndexError, ValueError):
        return None


def proc_mem(pid):
    out = {}
    try:
        for l in open('/proc/%d/status' % pid):
            k, _, v = l.partition(':')
            if k in ('VmRSS', 'VmHWM', 'RssAnon', 'RssFile', 'RssShmem'):
                out[k + '_mib'] = round(int(v.split()[0]) / 1024.0, 1)
    except (OSError, ValueError):
        pass
    return out


# ---- QMP client with fd passing, for the pause floor ------------------------------------------
class Qmp:
    def __init__(self, path):
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.settimeout(10)
        self.s.connect(path)
        self.f = self.s.makefile('rb')
        json.loads(self.f.readline())
        self.execute('qmp_capabilities')

    def execute(self, name, args=None, fd=None):
        msg = {'execute': name}
        if args is not None:
            msg['arguments'] = args
        data = json.dumps(msg).encode() + b'\n'
        if fd is None:
            self.s.sendall(data)
        else:
            socket.send_fds(self.s, [data], [fd])
        while True:
            r = json.loads(self.f.readline())
            if 'event' in r:
                continue
            if 'error' in r:
                raise e2e.Failure('QMP %s: %s' % (name, r['error']))
            return r['return']

    def close(self):
        self.s.close()


def measure_floor(qmp_path, n, gap_s=0.02):
    """n iterations of QMP stop / xen-save-devices-state (to a memfd through /dev/fdset, read
    back, as ftd does) / cont on an unprotected guest: the part of a checkpoint pause that does
    not depend on how much memory is dirty."""
    q = Qmp(qmp_path)
    mfd = os.memfd_create('bench-devstate', os.MFD_CLOEXEC)
    wo = os.open('/proc/self/fd/%d' % mfd, os.O_WRONLY | os.O_CLOEXEC)
    # QEMU writes through a dup of `wo` (same file offset): rewind that one, like ftd does.
    fdset = q.execute('add-fd', {'opaque': 'ftvm bench floor'}, fd=wo)['fdset-id']
    path = '/dev/fdset/%d' % fdset
    stop, save, cont, tot, sizes = [], [], [], [], []
    try:
        for _ in range(n):
            time.sleep(gap_s)
            t0 = time.perf_counter()
            q.execute('stop')
            t1 = time.perf_counter()
            os.lseek(wo, 0, os.SEEK_SET)
            q.execute('xen-save-devices-state', {'filename': path, 'live': False})
            size = os.fstat(mfd).st_size
            os.pread(mfd, size, 0)
            t2 = time.perf_counter()
            q.execute('cont')
            t3 = time.perf_counter()
            stop.append((t1 - t0) * 1e3)
            save.append((t2 - t1) * 1e3)
            cont.append((t3 - t2) * 1e3)
            tot.append((t3 - t0) * 1e3)
            sizes.append(size)
    finally:
        try:
            q.execute('remove-fd', {'fdset-id': fdset})
        except e2e.Failure:
            pass
        st = q.execute('query-status')['status']
        if st != 'running':
            q.execute('cont')
        q.close()
        os.close(wo)
        os.close(mfd)
    return {'iterations': n, 'gap_ms': gap_s * 1e3, 'total_ms': summ(tot), 'stop_ms': summ(stop),
            'devstate_ms': summ(save), 'cont_ms': summ(cont), 'devstate_bytes': max(sizes) if sizes else None}


# ---- 1. pause time per epoch ---------------------------------------------------------------------
def epoch_stats(recs, window_s):
    pause = [r['pause_us'] / 1e3 for r in recs]
    out = {'epochs': len(recs), 'window_s': round(window_s, 2),
           'epochs_per_s': round(len(recs) / window_s, 2) if window_s else None,
           'pause_ms': summ(pause)}
    for k in ('stop', 'scan', 'copy', 'devstate', 'cont', 'send', 'ack'):
        out[k + '_ms'] = summ([r[k + '_us'] / 1e3 for r in recs if k + '_us' in r])
    out['pages'] = summ([r['pages'] for r in recs], nd=1)
    out['staged_kib'] = summ([r['staged_bytes'] / 1024.0 for r in recs], nd=1)
    out['devstate_bytes'] = summ([r['devstate_bytes'] for r in recs], nd=0)
    total = sum(r['staged_bytes'] for r in recs)
    out['replicated_mib'] = round(total / 2 ** 20, 2)
    out['throughput_mib_s'] = round(total / 2 ** 20 / window_s, 3) if window_s else None
    out['dirty_rate_kib_s'] = round(sum(r['pages'] for r in recs) * 4 / window_s, 1) if window_s else None
    # Fraction of wall time the guest is paused by checkpoints.
    out['paused_fraction'] = round(sum(pause) / 1e3 / window_s, 4) if window_s else None
    return out


def run_pause(cfg, steady_s, floor_n, epoch_ms=25):
    name = 'm%d-s%d-%s' % (cfg['mem'], cfg['smp'], cfg['label'])
    log('pause: %s (dirty %d KiB/s, %d s steady state)' % (name, cfg['dirty'], steady_s))
    res = {'config': dict(cfg, epoch_ms=epoch_ms)}
    with Env('bench-' + name) as env:
        g = env.boot_guest(mem=cfg['mem'], smp=cfg['smp'], dirty_kib_s=cfg['dirty'])
        g.serial.wait_ticks(3, 120)
        time.sleep(1.0)
        res['floor_same_guest'] = measure_floor(g.qmp, floor_n)
        log('  floor (same guest, unprotected): p50 %.3f ms p99 %.3f ms' %
            (res['floor_same_guest']['total_ms']['p50'], res['floor_same_guest']['total_ms']['p99']))
        P = env.start_ftd('primary', listen=False)
        S = env.start_ftd('standby')
        t_en = time.time()
        protect(env, P, S, g, VM, epoch_ms=epoch_ms)
        res['enable_s'] = round(time.time() - t_en, 2)
        time.sleep(2.0)  # warm-up: initial sync epochs, twin start
        w0 = time.time()
        time.sleep(steady_s)
        w1 = time.time()
        st = P.vm(VM, 'primary')
        sst = S.vm(VM, 'standby')
        recs = [r for r in P.epochs(VM) if w0 * 1e3 <= r['wall_ms'] <= w1 * 1e3]
        res['steady'] = epoch_stats(recs, w1 - w0)
        res['primary_status'] = {k: st.get(k) for k in ('state', 'epoch', 'epochs_cut', 'tracker', 'pause_ms',
                                                        'dirty_pages', 'checkpoint_bytes', 'throughput_mib_s',
                                                        'sync', 'rejected_epochs')}
        all_recs = P.epochs(VM)
        largest = max([r['staged_bytes'] for r in all_recs] or [0])
        largest_steady = max([r['staged_bytes'] for r in recs] or [0])
        twin_pid = sst.get('twin_pid') if sst else None
        res['memory'] = {
            'guest_ram_mib': cfg['mem'],
            'largest_epoch_mib': round(largest / 2 ** 20, 3),
            'largest_steady_epoch_mib': round(largest_steady / 2 ** 20, 3),
            'primary_ftd': proc_mem(P.proc.pid),
            'standby_ftd': proc_mem(S.proc.pid),
            'primary_qemu': proc_mem(g.pid),
            'twin_qemu': proc_mem(twin_pid) if twin_pid and twin_pid > 0 else {},
        }
        s = res['steady']
        fl = res['floor_same_guest']['total_ms']['p50']
        res['ratio_p99_to_floor_p50'] = round(s['pause_ms']['p99'] / fl, 2) if fl and s['epochs'] else None
        if s['epochs']:
            log('  %d epochs: pause p50 %.2f p99 %.2f max %.2f ms (stop %.2f scan %.2f copy %.2f dev %.2f cont %.2f '
                'p50), %.1f pages/epoch, %.3f MiB/s, ack p50 %.2f ms, ratio %.2f' %
                (s['epochs'], s['pause_ms']['p50'], s['pause_ms']['p99'], s['pause_ms']['max'], s['stop_ms']['p50'],
                 s['scan_ms']['p50'], s['copy_ms']['p50'], s['devstate_ms']['p50'], s['cont_ms']['p50'],
                 s['pages']['mean'], s['throughput_mib_s'], s['ack_ms']['p50'], res['ratio_p99_to_floor_p50']))
        m = res['memory']
        log('  memory: primary ftd RSS %s HWM %s MiB, standby ftd RSS %s HWM %s MiB (guest %d MiB, largest epoch %.2f MiB)'
            % (m['primary_ftd'].get('VmRSS_mib'), m['primary_ftd'].get('VmHWM_mib'), m['standby_ftd'].get('VmRSS_mib'),
               m['standby_ftd'].get('VmHWM_mib'), cfg['mem'], m['largest_epoch_mib']))
    return res


def run_idle_floor(floor_n, mem=256):
    log('floor: idle unprotected guest (%d MiB, dirty 0)' % mem)
    with Env('bench-floor') as env:
        g = env.boot_guest(mem=mem, smp=1, dirty_kib_s=0)
        g.serial.wait_ticks(3, 120)
        time.sleep(1.0)
        r = measure_floor(g.qmp, floor_n)
        r['config'] = {'mem': mem, 'smp': 1, 'dirty': 0}
        log('  floor p50 %.3f p99 %.3f max %.3f ms (stop %.3f dev %.3f cont %.3f p50), devstate %d bytes' %
            (r['total_ms']['p50'], r['total_ms']['p99'], r['total_ms']['max'], r['stop_ms']['p50'],
             r['devstate_ms']['p50'], r['cont_ms']['p50'], r['devstate_bytes']))
        return r


# ---- 4. guest slowdown -----------------------------------------------------------------------------
def wl_window(serial, t0, t1):
    """KiB written per second and ticks per second in [t0, t1] (host times of serial lines)."""
    stats = []
    for ts, l in serial.all():
        if t0 <= ts <= t1 and l.startswith('WL stat '):
            kv = dict(x.split('=', 1) for x in l.split()[2:] if '=' in x)
            stats.append((ts, int(kv.get('kib_written', 0))))
    ticks = [(ts, n) for ts, n in serial.ticks() if t0 <= ts <= t1]
    out = {'window_s': round(t1 - t0, 2), 'wl_reports': len(stats), 'ticks': len(ticks)}
    if len(stats) >= 2:
        out['kib_written_per_s'] = round((stats[-1][1] - stats[0][1]) / (stats[-1][0] - stats[0][0]), 1)
    if len(ticks) >= 2:
        out['ticks_per_s'] = round((ticks[-1][1] - ticks[0][1]) / (ticks[-1][0] - ticks[0][0]), 3)
    return out


def run_slowdown(window_s, mem=256, dirty=24000, wss_mib=8):
    log('slowdown: %d MiB guest, requested %d KiB/s, %d s windows: off, on, off again' % (mem, dirty, window_s))
    res = {'config': {'mem': mem, 'smp': 1, 'dirty_requested_kib_s': dirty, 'wss_mib': wss_mib, 'epoch_ms': 25,
                      'window_s': window_s}}
    with Env('bench-slowdown') as env:
        g = env.boot_guest(mem=mem, smp=1, dirty_kib_s=dirty,
                           extra_append='ftvm_wl_report_s=1 ftvm_wss_mib=%d' % wss_mib)
        g.serial.wait_ticks(3, 120)
        time.sleep(3.0)

        pids = {'qemu': g.pid}

        def window(key):
            c0 = {k: cpu_s(p) for k, p in pids.items()}
            t0 = time.time()
            time.sleep(window_s)
            t1 = time.time()
            c1 = {k: cpu_s(p) for k, p in pids.items()}
            res[key] = wl_window(g.serial, t0, t1)
            # CPU used per second of wall time (1.0 = one core) by QEMU and the ftd daemons
            res[key]['cpu_cores'] = {k: round((c1[k] - c0[k]) / (t1 - t0), 3) for k in pids
                                     if c0[k] is not None and c1[k] is not None}
            log('  %-4s %s' % (key + ':', res[key]))
            return t0, t1
        window('off')
        P = env.start_ftd('primary', listen=False)
        S = env.start_ftd('standby')
        pids.update({'primary_ftd': P.proc.pid, 'standby_ftd': S.proc.pid})
        protect(env, P, S, g, VM)
        time.sleep(3.0)
        t2, t3 = window('on')
        recs = [r for r in P.epochs(VM) if t2 * 1e3 <= r['wall_ms'] <= t3 * 1e3]
        res['on_epochs'] = epoch_stats(recs, t3 - t2)
        P.ctl('disable', VM, timeout=60)
        time.sleep(2.0)
        window('off2')
        for k in ('kib_written_per_s', 'ticks_per_s'):
            offs = [res[w].get(k) for w in ('off', 'off2') if res[w].get(k)]
            on = res['on'].get(k)
            res['ratio_on_off_' + k] = round(on / (sum(offs) / len(offs)), 3) if offs and on else None
        log('  on/off (off = mean of both unprotected windows): KiB/s %s, ticks/s %s; pause p50 %s p99 %s ms, '
            'paused %.1f%% of the time' %
            (res['ratio_on_off_kib_written_per_s'], res['ratio_on_off_ticks_per_s'],
             res['on_epochs']['pause_ms'].get('p50'), res['on_epochs']['pause_ms'].get('p99'),
             100 * (res['on_epochs'].get('paused_fraction') or 0)))
    return res


# ---- 3. failover -----------------------------------------------------------------------------------
def run_failover(kind, verify, tick_ms=20, dirty=2048, mem=256):
    tag = 'fo-%s-%s' % (kind, 'verify' if verify else 'noverify')
    with Env('bench-' + tag, hb_timeout_ms=400) as env:
        g = env.boot_guest(mem=mem, dirty_kib_s=dirty, extra_append='ftvm_tick_ms=%d' % tick_ms)
        g.serial.wait_ticks(3, 120)
        P = env.start_ftd('primary', listen=False)
        S = env.start_ftd('standby', extra=() if verify else ('--no-verify-activation',))
        protect(env, P, S, g, VM)
        twin = env.twin_serial(S, VM)
        time.sleep(2.0)
        if not e2e.pid_alive(g.pid):
            v = S.vm(VM, 'active') or S.vm(VM, 'standby') or {}
            log('  %s: primary QEMU gone BEFORE the kill (standby: %s, %s)' % (tag, v.get('state'), v.get('reason')))
            return {'kind': kind, 'verify': verify, 'state': 'spurious-takeover-before-kill',
                    'error': '%s: %s' % (v.get('state'), v.get('reason'))}
        gone = watch_exit(g.pid)
        t_kill = time.time()
        if kind == 'qemu':
            os.kill(g.pid, signal.SIGKILL)
        else:
            os.kill(P.proc.pid, signal.SIGKILL)

        def active():
            v = S.vm(VM, 'active') or S.vm(VM, 'standby')
            return v if v and v['state'] in ('active', 'activation-failed', 'closed') else None
        v = wait_for(active, 30, 'standby activation')
        tt = twin.wait_ticks(1, 20)
        wait_for(gone, 5, 'primary QEMU exit')
        a = v.get('activation') or {}
        r = {'kind': kind, 'verify': verify, 'state': v['state'], 'epoch': a.get('epoch')}
        if v['state'] != 'active':
            r['error'] = v.get('reason')
            log('  %s: standby state %s: %s' % (tag, v['state'], v.get('reason')))
            return r
        dec, cont = a['declared_wall_ms'], a['cont_wall_ms']
        first_tick = tt[0][0] * 1e3
        r.update({
            'detect_ms': round(dec - t_kill * 1e3, 2),                      # kill -> declared dead
            'declared_to_cont_ms': round(cont - dec, 2),                    # activation as the twin sees it
            'declared_to_first_tick_ms': round(first_tick - dec, 2),        # (a)
            'kill_to_first_tick_ms': round(first_tick - t_kill * 1e3, 2),   # (b)
            'kill_to_cont_ms': round(cont - t_kill * 1e3, 2),
            'primary_qemu_gone_after_kill_ms': round((gone() - t_kill) * 1e3, 2),
            'activation_ms': a.get('activation_ms'), 'verify_ms': a.get('verify_ms'), 'load_ms': a.get('load_ms'),
            'cont_ms': a.get('cont_ms'), 'reason': a.get('reason'), 'first_twin_tick': tt[0][1],
            'last_primary_tick': g.serial.ticks()[-1][1] if g.serial.ticks() else None,
        })
        r['verified'] = 'verify_ms' in a      # what the standby actually did
        if r['verified']:
            r['digest_ok'] = a.get('ram_digest') == a.get('expected_ram_digest')
        log('  %s: detect %.1f ms, declared->cont %.1f ms (verify %s load %.1f), declared->first tick %.1f ms, '
            'kill->first tick %.1f ms' % (tag, r['detect_ms'], r['declared_to_cont_ms'], a.get('verify_ms'),
                                          a.get('load_ms', 0), r['declared_to_first_tick_ms'],
                                          r['kill_to_first_tick_ms']))
        return r


def summarize_failover(runs):
    out = {}
    for kind in ('qemu', 'ftd'):
        for verify in (True, False):
            rs = [r for r in runs if r['kind'] == kind and r['verify'] == verify and r['state'] == 'active']
            if not rs and not [r for r in runs if r['kind'] == kind and r['verify'] == verify]:
                continue
            key = '%s-%s' % (kind, 'verify' if verify else 'noverify')
            out[key] = {'runs': len([r for r in runs if r['kind'] == kind and r['verify'] == verify]),
                        'activated': len(rs),
                        'other_outcomes': [r.get('state') + ': ' + str(r.get('error')) for r in runs
                                           if r['kind'] == kind and r['verify'] == verify and r['state'] != 'active']}
            for k in ('detect_ms', 'declared_to_cont_ms', 'declared_to_first_tick_ms', 'kill_to_first_tick_ms',
                      'kill_to_cont_ms', 'activation_ms', 'verify_ms', 'load_ms', 'cont_ms'):
                out[key][k] = summ([r.get(k) for r in rs], nd=2)
    return out


# ---- report ------------------------------------------------------------------------------------------
def fmt_ms(s, k='p50'):
    v = s.get(k) if s else None
    return '-' if v is None else '%.2f' % v


def text_report(R):
    L = []
    m = R['meta']
    L.append('ftvm benchmark %s (%s mode), %s, kernel %s, %s, %d CPUs, accel %s, %.0f s' %
             (m['date'], m['mode'], m['host'], m['kernel'], m['qemu'], m['cpus'], m['accel'], m['runtime_s']))
    if 'floor_idle' in R:
        f = R['floor_idle']
        L.append('')
        L.append('Pause floor, idle unprotected %d MiB guest, %d x (stop + xen-save-devices-state + cont):' %
                 (f['config']['mem'], f['iterations']))
        L.append('  total p50 %s p99 %s max %s ms; stop %s, devstate %s, cont %s ms (p50); device state %d bytes' %
                 (fmt_ms(f['total_ms']), fmt_ms(f['total_ms'], 'p99'), fmt_ms(f['total_ms'], 'max'),
                  fmt_ms(f['stop_ms']), fmt_ms(f['devstate_ms']), fmt_ms(f['cont_ms']), f['devstate_bytes']))
    if R.get('pause'):
        L.append('')
        L.append('Pause per epoch (25 ms epochs, steady state), ms:')
        hdr = ('%-18s %6s %7s %7s %7s | %6s %6s %6s %6s %6s | %7s %7s | %8s %8s %7s %6s | %7s %7s'
               % ('config', 'epochs', 'p50', 'p99', 'max', 'stop', 'scan', 'copy', 'dev', 'cont', 'floor50',
                  'p99/fl', 'pages', 'KiB/ep', 'MiB/s', 'ack50', 'P-RSS', 'S-RSS'))
        L.append(hdr)
        for p in R['pause']:
            c, s, mm = p['config'], p['steady'], p['memory']
            if not s['epochs']:
                L.append('%-18s no epochs' % c['name'])
                continue
            L.append('%-18s %6d %7s %7s %7s | %6s %6s %6s %6s %6s | %7s %7s | %8.1f %8.1f %7.3f %6s | %7s %7s' % (
                c['name'], s['epochs'], fmt_ms(s['pause_ms']), fmt_ms(s['pause_ms'], 'p99'),
                fmt_ms(s['pause_ms'], 'max'), fmt_ms(s['stop_ms']), fmt_ms(s['scan_ms']), fmt_ms(s['copy_ms']),
                fmt_ms(s['devstate_ms']), fmt_ms(s['cont_ms']), fmt_ms(p['floor_same_guest']['total_ms']),
                p['ratio_p99_to_floor_p50'], s['pages']['mean'], s['staged_kib']['mean'], s['throughput_mib_s'],
                fmt_ms(s['ack_ms']), mm['primary_ftd'].get('VmRSS_mib'), mm['standby_ftd'].get('VmRSS_mib')))
        L.append('  (breakdown columns are p50s; floor50 = p50 of the floor on the same guest before protection;'
                 ' pages/KiB per epoch are means; P-/S-RSS = primary/standby ftd VmRSS MiB)')
        L.append('')
        L.append('Memory (MiB): config: primary ftd RSS/HWM, standby ftd RSS/HWM, twin QEMU RSS; guest RAM; '
                 'largest epoch')
        for p in R['pause']:
            mm = p['memory']
            L.append('  %-18s %s/%s, %s/%s, %s; %d; %.2f' % (
                p['config']['name'], mm['primary_ftd'].get('VmRSS_mib'), mm['primary_ftd'].get('VmHWM_mib'),
                mm['standby_ftd'].get('VmRSS_mib'), mm['standby_ftd'].get('VmHWM_mib'),
                mm['twin_qemu'].get('VmRSS_mib'), mm['guest_ram_mib'], mm['largest_epoch_mib']))
    if R.get('slowdown'):
        s = R['slowdown']
        L.append('')
        L.append('Guest slowdown (%d MiB, workload asks %d KiB/s, %d s windows; off, on, off again):' % (
            s['config']['mem'], s['config']['dirty_requested_kib_s'], s['config']['window_s']))
        for w in ('off', 'on', 'off2'):
            L.append('  %-4s %8s KiB/s written, %6s ticks/s, CPU cores used %s' % (
                w, s[w].get('kib_written_per_s'), s[w].get('ticks_per_s'), s[w].get('cpu_cores')))
        L.append('  on / mean(off, off2): %s (KiB/s), %s (ticks/s); paused %.1f%% of the time while protected' % (
            s['ratio_on_off_kib_written_per_s'], s['ratio_on_off_ticks_per_s'],
            100 * (s['on_epochs'].get('paused_fraction') or 0)))
    if R.get('failover'):
        L.append('')
        L.append('Failover (256 MiB guest, heartbeat timeout 400 ms, tick every %d ms), ms, p50 [max]:' %
                 R['failover']['tick_ms'])
        L.append('%-14s %4s %13s %15s %15s %15s %9s %9s' % ('kill -9 of', 'n', 'detect', 'declared->cont',
                                                              'declared->tick', 'kill->tick', 'verify', 'load'))
        for key, s in R['failover']['summary'].items():
            def pm(k):
                x = s.get(k, {})
                return '-' if not x.get('n') else '%.1f [%.1f]' % (x['p50'], x['max'])
            L.append('%-14s %4s %13s %15s %15s %15s %9s %9s' % (key, '%d/%d' % (s['activated'], s['runs']),
                                                                 pm('detect_ms'), pm('declared_to_cont_ms'),
                                                                 pm('declared_to_first_tick_ms'),
                                                                 pm('kill_to_first_tick_ms'),
                                                                 fmt_ms(s.get('verify_ms')), fmt_ms(s.get('load_ms'))))
    return '\n'.join(L) + '\n'


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--quick', action='store_true', help='shorter windows, fewer configs and repetitions (~3 min)')
    ap.add_argument('--only', default='pause,slowdown,failover', help='comma list of pause, slowdown, failover')
    ap.add_argument('--out', default=os.path.join(HERE, 'results'))
    ap.add_argument('--steady-s', type=float, help='steady-state window per pause config (default 20, quick 6)')
    ap.add_argument('--failover-reps', type=int, help='kill -9 repetitions per kind with verification (default 5)')
    a = ap.parse_args()
    only = set(a.only.split(','))
    for f in ('vmlinux', 'initramfs.cpio.gz'):
        if not os.path.exists(os.path.join(e2e.GUEST, f)):
            sys.exit('test guest missing in %s: run bench/run-bench.sh (builds guest-image)' % e2e.GUEST)
    quick = a.quick
    steady = a.steady_s or (6 if quick else 20)
    floor_n = 100 if quick else 200
    reps = a.failover_reps or (2 if quick else 5)
    noverify_reps = 1 if quick else 3
    t0 = time.time()
    qv = subprocess.run(['qemu-system-x86_64', '--version'], capture_output=True, text=True).stdout.split('\n')[0]
    R = {'meta': {'date': datetime.datetime.now().astimezone().isoformat(timespec='seconds'),
                  'mode': 'quick' if quick else 'full', 'host': platform.node(), 'kernel': platform.release(),
                  'os': open('/etc/debian_version').read().strip() if os.path.exists('/etc/debian_version') else '',
                  'qemu': qv, 'cpus': os.cpu_count(), 'accel': e2e.ACCEL,
                  'git': subprocess.run(['git', '-C', e2e.SRC, 'rev-parse', '--short', 'HEAD'], capture_output=True,
                                        text=True).stdout.strip()}}
    if 'pause' in only:
        R['floor_idle'] = run_idle_floor(floor_n)
        cfgs = [dict(mem=256, smp=1, dirty=256, label='low'), dict(mem=256, smp=1, dirty=8192, label='high'),
                dict(mem=1024, smp=1, dirty=256, label='low'), dict(mem=1024, smp=1, dirty=8192, label='high'),
                dict(mem=256, smp=2, dirty=256, label='low')]
        if not quick:
            cfgs.append(dict(mem=256, smp=2, dirty=8192, label='high'))
        else:
            cfgs = [c for c in cfgs if not (c['mem'] == 1024 and c['label'] == 'low')]
        R['pause'] = []
        for c in cfgs:
            c['name'] = '%s/%dcpu/%s' % ('1G' if c['mem'] == 1024 else '%dM' % c['mem'], c['smp'], c['label'])
            try:
                R['pause'].append(run_pause(c, steady, floor_n))
            except Exception as e:  # noqa: BLE001
                log('  pause %s failed: %r' % (c['name'], e))
                R.setdefault('errors', []).append('pause %s: %s' % (c['name'], e))
    if 'slowdown' in only:
        try:
            R['slowdown'] = run_slowdown(8 if quick else 15)
        except Exception as e:  # noqa: BLE001
            log('  slowdown failed: %r' % e)
            R.setdefault('errors', []).append('slowdown: %s' % e)
    if 'failover' in only:
        runs = []
        log('failover: %d x kill -9 QEMU / ftd with full-RAM verification, %d x each with --no-verify-activation' %
            (reps, noverify_reps))
        for verify, n in ((True, reps), (False, noverify_reps)):
            for i in range(n):
                for kind in ('qemu', 'ftd'):
                    try:
                        runs.append(run_failover(kind, verify))
                    except Exception as e:  # noqa: BLE001 (a benchmark reports and goes on)
                        log('  failover %s verify=%s failed: %r' % (kind, verify, e))
                        runs.append({'kind': kind, 'verify': verify, 'state': 'error', 'error': str(e)})
        R['failover'] = {'tick_ms': 20, 'hb_timeout_ms': 400, 'runs': runs, 'summary': summarize_failover(runs)}
    R['meta']['runtime_s'] = round(time.time() - t0, 1)
    os.makedirs(a.out, exist_ok=True)
    stamp = time.strftime('%Y%m%d-%H%M%S')
    for fn in ('ftvm-bench-%s.json' % stamp, 'latest.json'):
        with open(os.path.join(a.out, fn), 'w') as f:
            json.dump(R, f, indent=1)
    txt = text_report(R)
    with open(os.path.join(a.out, 'latest.txt'), 'w') as f:
        f.write(txt)
    print()
    print(txt)
    log('results: %s' % os.path.join(a.out, 'ftvm-bench-%s.json' % stamp))


if __name__ == '__main__':
    main()
