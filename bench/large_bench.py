#!/usr/bin/python3
"""Guest size vs sync time, resident memory and pause (issue 17). Not a test: prints a table and
writes JSON.

For each size (default 1, 4 and 16 GiB), one after the other in the same run: the project's test
guest (sparse: it touches a few hundred MiB) dirtying RATE KiB/s, protected by a primary and a
standby ftd on loopback with EPOCH ms epochs for SECONDS. Reported per size: the initial sync
(ms, pages, passes), the guest's RAM in use (memfd blocks), the twin's, each ftd's RSS and its
mapped guest RAM (RssShmem), and from the primary's per-epoch records after the first second:
pause p50/p99 and the dirty-page scan's p50 (the part of the pause that grows with RAM size).

Usage: bench/large_bench.py [--sizes-mib 1024,4096,16384] [--seconds 10] [--rate-kib-s 1024]
                            [--epoch-ms 25] [--json FILE]
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'tests', 'e2e'))
from ftvm_e2e import Env, log, protect  # noqa: E402
from test_large import memfd_mib, status_kib  # noqa: E402
from auth_bench import pct  # noqa: E402  (same folder: interpolated percentile)


def run_size(mib, a):
    with Env('large-bench-%d' % mib) as env:
        g = env.boot_guest(mem=mib, dirty_kib_s=a.rate_kib_s)
        g.serial.wait_ticks(3, 120)
        P = env.start_ftd('primary', listen=False)
        S = env.start_ftd('standby')
        t0 = time.time()
        protect(env, P, S, g, 'vm1', epoch_ms=a.epoch_ms)
        enable_s = time.time() - t0
        time.sleep(a.seconds)
        v = P.vm('vm1', 'primary')
        tpid = int(open(os.path.join(S.run_dir, 'vms', 'vm1', 'twin.pid')).read())
        recs = P.epochs('vm1')
        start = recs[0].get('wall_ms', 0) + 1000 if recs else 0
        recs = [r for r in recs if r.get('wall_ms', start) >= start] or recs
        pause = [r['pause_us'] / 1000 for r in recs if 'pause_us' in r]
        scan = [r['scan_us'] / 1000 for r in recs if 'scan_us' in r]
        row = {
            'mem_mib': mib, 'enable_s': round(enable_s, 2), 'sync_ms': round(v['sync']['ms']),
            'sync_pages': v['sync']['pages'], 'sync_passes': v['sync']['passes'],
            'guest_used_mib': round(memfd_mib(g.pid)), 'twin_mib': round(memfd_mib(tpid)),
            'primary_ftd_rss_mib': round(status_kib(P.proc.pid, 'VmRSS') / 1024),
            'primary_ftd_guest_ram_mib': round(status_kib(P.proc.pid, 'RssShmem') / 1024),
            'standby_ftd_rss_mib': round(status_kib(S.proc.pid, 'VmRSS') / 1024),
            'standby_ftd_twin_ram_mib': round(status_kib(S.proc.pid, 'RssShmem') / 1024),
            'epochs': len(pause), 'pause_p50_ms': round(pct(pause, 50), 2), 'pause_p99_ms': round(pct(pause, 99), 2),
            'scan_p50_ms': round(pct(scan, 50), 2),
            'dirty_pages_mean': round(sum(r.get('pages', 0) for r in recs) / max(1, len(recs)), 1),
        }
        log('row: %s' % json.dumps(row))
        return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--sizes-mib', default='1024,4096,16384')
    ap.add_argument('--seconds', type=float, default=10)
    ap.add_argument('--rate-kib-s', type=int, default=1024)
    ap.add_argument('--epoch-ms', type=int, default=25)
    ap.add_argument('--json')
    a = ap.parse_args()
    rows = [run_size(int(s), a) for s in a.sizes_mib.split(',')]
    cols = ['mem_mib', 'sync_ms', 'sync_pages', 'guest_used_mib', 'twin_mib', 'primary_ftd_rss_mib',
            'standby_ftd_rss_mib', 'pause_p50_ms', 'pause_p99_ms', 'scan_p50_ms', 'dirty_pages_mean']
    print(' | '.join(cols))
    for r in rows:
        print(' | '.join(str(r[c]) for c in cols))
    if len(rows) > 1 and rows[0]['pause_p50_ms'] > 0:
        print('pause p50 %d MiB / %d MiB: %.2fx' % (rows[-1]['mem_mib'], rows[0]['mem_mib'],
                                                   rows[-1]['pause_p50_ms'] / rows[0]['pause_p50_ms']))
    if a.json:
        with open(a.json, 'w') as f:
            json.dump({'date': time.strftime('%Y-%m-%d %H:%M'), 'args': vars(a), 'rows': rows}, f, indent=1)


if __name__ == '__main__':
    main()
