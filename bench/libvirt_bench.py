#!/usr/bin/python3
"""Cost of driving QEMU through libvirt (issue 6): the same test guest protected once as a plain
QEMU (ftd holds the QMP socket) and once as a libvirt domain (QMP through
virDomainQemuMonitorCommand), in one run; per-epoch pause (stop + scan + copy + device state +
cont: three QMP round trips) from ftd's per-epoch records, medians and percentiles, ratio
libvirt / plain.

Usage: bench/libvirt_bench.py [--seconds 20] [--epoch-ms 25] [--json OUT]
Needs the build, the test guest and a libvirtd with the hook (scripts/libvirtd.sh).
"""
import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'tests', 'e2e'))
from ftvm_e2e import Env, log, protect  # noqa: E402
from test_libvirt import Lab, ftds, virsh, wait_protected  # noqa: E402


def pct(v, p):
    v = sorted(v)
    return v[min(len(v) - 1, int(round(p / 100 * (len(v) - 1))))]


def summarize(recs):
    out = {'epochs': len(recs)}
    for k in ('pause_us', 'stop_us', 'devstate_us', 'cont_us'):
        ms = [r[k] / 1000 for r in recs]
        out[k.replace('_us', '_ms')] = {'p50': statistics.median(ms), 'p90': pct(ms, 90), 'p99': pct(ms, 99),
                                        'max': max(ms)}
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--seconds', type=float, default=20)
    ap.add_argument('--epoch-ms', type=int, default=25)
    ap.add_argument('--json')
    a = ap.parse_args()
    res = {'date': time.strftime('%Y-%m-%d %H:%M'), 'host': os.uname().nodename, 'cpus': os.cpu_count(),
           'seconds': a.seconds, 'epoch_ms': a.epoch_ms}
    with Env('lv-bench') as env:
        lab = Lab(env)
        try:
            P, S = ftds(env, lab)
            lab.hook_conf(P.control)
            # plain QEMU
            g = env.boot_guest(dirty_kib_s=512)
            g.serial.wait_ticks(3, 90)
            protect(env, P, S, g, 'plain', epoch_ms=a.epoch_ms)
            time.sleep(a.seconds)
            P.ctl('disable', 'plain')
            res['plain'] = summarize(P.epochs('plain')[5:])
            log('plain: %s' % res['plain']['pause_ms'])
            os.kill(g.pid, 9)
            # libvirt domain, same guest files and workload
            name = 'ftvmb%d' % os.getpid()
            lab.define(name)
            virsh('start', name)
            time.sleep(3)
            P.ctl('enable', name, '--peer', '127.0.0.1:%d' % env.port, '--epoch-ms', str(a.epoch_ms), '--timeout', '120')
            wait_protected(P, name)
            time.sleep(a.seconds)
            P.ctl('disable', name)
            res['libvirt'] = summarize(P.epochs(name)[5:])
            log('libvirt: %s' % res['libvirt']['pause_ms'])
        finally:
            lab.close()
    res['ratio_libvirt_plain'] = {k: res['libvirt'][k]['p50'] / res['plain'][k]['p50']
                                  for k in ('pause_ms', 'stop_ms', 'devstate_ms', 'cont_ms')}
    print(json.dumps(res, indent=1))
    if a.json:
        json.dump(res, open(a.json, 'w'), indent=1)


if __name__ == '__main__':
    main()
