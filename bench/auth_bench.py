#!/usr/bin/python3
"""Per-epoch cost of replication security through the real daemons (issue 12).

The synthetic VMM (tests/synthetic-vmm/synthvm; no QEMU) is protected by a primary and a standby
ftd on loopback three times in one run: --insecure, with --key-file (authenticated, the default)
and with --key-file --encrypt. Each mode: a fresh synthvm dirtying RATE KiB/s, protected for
SECONDS with EPOCH ms epochs; the primary's per-epoch records (--stats-dir) give send (writes +
Commit handed to the transport), ack (Commit sent -> Ack received: the standby's receive, tag
check, decrypt, verify and apply) and send+ack, as median and p99 over the epochs after the
first second. Not a test: prints a table and writes JSON.

Usage: bench/auth_bench.py [--seconds 10] [--rate-kib-s 20480] [--epoch-ms 25] [--mem-mib 256]
                           [--json FILE]
"""
import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'tests', 'e2e'))
from ftvm_e2e import Env, log, wait_for  # noqa: E402
from test_synthetic import boot_synthvm  # noqa: E402


def pct(v, p):
    v = sorted(v)
    if not v:
        return float('nan')
    k = (len(v) - 1) * p / 100.0
    lo, hi = int(k), min(int(k) + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def run_mode(mode, a):
    with Env('auth-bench-%s' % mode) as env:
        g = boot_synthvm(env, mem_mib=a.mem_mib, rate_kib_s=a.rate_kib_s)
        g.serial.wait_ticks(2, 30)
        key = None if mode == 'insecure' else True
        extra = ['--encrypt'] if mode == 'encrypt' else []
        S = env.start_ftd('standby', key=key, extra=extra)
        P = env.start_ftd('primary', listen=False, key=key, extra=extra)
        P.ctl('enable', '--qmp', g.qmp, '--peer', '127.0.0.1:%d' % env.port, '--name', 'vm1', '--epoch-ms',
              str(a.epoch_ms), '--timeout', '120')
        t0 = time.time()
        time.sleep(a.seconds + 1)
        recs = [r for r in P.epochs('vm1') if r['wall_ms'] / 1000 > t0 + 1]
        v = S.vm('vm1', 'standby')
        P.ctl('disable', 'vm1')
        send = [r['send_us'] for r in recs]
        ack = [r['ack_us'] for r in recs]
        tot = [r['send_us'] + r['ack_us'] for r in recs]
        kib = [r['staged_bytes'] / 1024 for r in recs]
        out = {'mode': mode, 'epochs': len(recs), 'security': v.get('security'),
               'staged_kib_mean': statistics.mean(kib) if kib else 0}
        for name, xs in (('send_us', send), ('ack_us', ack), ('send_ack_us', tot), ('pause_us', [r['pause_us'] for r in recs])):
            out[name] = {'p50': pct(xs, 50), 'p99': pct(xs, 99)}
        log('%s: %s' % (mode, json.dumps(out)))
        return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--seconds', type=float, default=10)
    ap.add_argument('--rate-kib-s', type=int, default=20480)
    ap.add_argument('--epoch-ms', type=int, default=25)
    ap.add_argument('--mem-mib', type=int, default=256)
    ap.add_argument('--json')
    a = ap.parse_args()
    res = [run_mode(m, a) for m in ('insecure', 'auth', 'encrypt')]
    print('\nper-epoch cost through ftd, synthvm %d MiB dirtying %d KiB/s, %d ms epochs, %.0f s per mode (us):'
          % (a.mem_mib, a.rate_kib_s, a.epoch_ms, a.seconds))
    print('%-9s %7s %10s %18s %18s %20s %16s' % ('mode', 'epochs', 'KiB/epoch', 'send p50/p99', 'ack p50/p99',
                                                 'send+ack p50/p99', 'pause p50/p99'))
    for r in res:
        print('%-9s %7d %10.0f %18s %18s %20s %16s' % (
            r['mode'], r['epochs'], r['staged_kib_mean'],
            '%.0f / %.0f' % (r['send_us']['p50'], r['send_us']['p99']),
            '%.0f / %.0f' % (r['ack_us']['p50'], r['ack_us']['p99']),
            '%.0f / %.0f' % (r['send_ack_us']['p50'], r['send_ack_us']['p99']),
            '%.0f / %.0f' % (r['pause_us']['p50'], r['pause_us']['p99'])))
    if a.json:
        with open(a.json, 'w') as f:
            json.dump({'config': vars(a), 'results': res}, f, indent=1)


if __name__ == '__main__':
    main()
