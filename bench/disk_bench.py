#!/usr/bin/python3
"""Cost of disk replication (issue 5), measured on one guest in one run:

  * guest disk write latency and throughput with protection off and on (ratios against "off"
    of the same run): the guest's own `disk-bench` (tests/guest/guest-init.sh) runs ROUNDS
    rounds of (a) 256 synchronous 4 KiB writes, each `dd oflag=direct conv=fsync` (write +
    flush; one dd process per op, so the per-op time includes a process start, reported as
    exec_ms and subtracted in sync4k_net_ms) and (b) one 32 MiB sequential 1 MiB direct write;
  * the initial full copy: time for the mirror job to copy the whole disk (filled with random
    data, so every byte crosses) to the standby, per GiB.

Usage: bench/disk_bench.py [--disk-mib 1024] [--rounds 9] [--seq-mib 128] [--epoch-ms 25] [--json OUT]
Needs the build (ftd, ftctl) and the test guest (`ninja guest-image`).
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'tests', 'e2e'))
from ftvm_e2e import Env, log, protect, wait_for  # noqa: E402

VM = 'dbench'


def pct(vals, p):
    v = sorted(vals)
    return v[min(len(v) - 1, int(round(p / 100 * (len(v) - 1))))]


def run_bench(serial, dev, rounds, timeout):
    n0 = len(serial.all())
    serial.send('disk-bench %s' % dev)
    wait_for(lambda: any('DISKBENCH done' in l or 'DISKBENCH failed' in l for _, l in serial.all()[n0:]), timeout,
             'the guest disk benchmark')
    lines = [l for _, l in serial.all()[n0:]]
    bad = [l for l in lines if 'DISKBENCH failed' in l or 'DISKBENCH error' in l]
    if bad:
        raise SystemExit('guest benchmark failed: %s' % bad)
    info = [l for l in lines if l.startswith('DISKBENCH info')][0]
    exec_ms = int(re.search(r'exec_ms=(\d+)', info).group(1))
    out = []
    for l in lines:
        m = re.match(r'DISKBENCH round=(\d+) sync4k_ops=(\d+) sync4k_ms=(\d+) seq_mib=(\d+) seq_ms=(\d+)', l)
        if m:
            r, ops, sms, mib, qms = map(int, m.groups())
            out.append({'ops': ops, 'sync4k_ms': sms, 'sync4k_net_ms': max(sms - exec_ms, 1),
                        'seq_mib': mib, 'seq_ms': max(qms, 1)})
    return exec_ms, out


def summarize(exec_ms, rounds):
    lat = [r['sync4k_ms'] / r['ops'] for r in rounds]
    net = [r['sync4k_net_ms'] / r['ops'] for r in rounds]
    tput = [r['seq_mib'] / (r['seq_ms'] / 1000) for r in rounds]
    return {'rounds': len(rounds), 'exec_ms_per_256_dd': exec_ms,
            'sync4k_ms_per_op': {'p50': statistics.median(lat), 'p10': pct(lat, 10), 'p90': pct(lat, 90)},
            'sync4k_net_ms_per_op': {'p50': statistics.median(net), 'p10': pct(net, 10), 'p90': pct(net, 90)},
            'seq_mib_s': {'p50': statistics.median(tput), 'p10': pct(tput, 10), 'p90': pct(tput, 90)}}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--disk-mib', type=int, default=1024)
    ap.add_argument('--rounds', type=int, default=9)
    ap.add_argument('--epoch-ms', type=int, default=25)
    ap.add_argument('--seq-mib', type=int, default=128, help='size of each sequential pass (10 ms timer resolution)')
    ap.add_argument('--json')
    a = ap.parse_args()
    res = {'date': time.strftime('%Y-%m-%d %H:%M'), 'host': os.uname().nodename, 'cpus': os.cpu_count(),
           'disk_mib': a.disk_mib, 'epoch_ms': a.epoch_ms, 'seq_mib': a.seq_mib}
    with Env('disk-bench') as env:
        img = env.path('bench.img')
        log('filling a %d MiB disk image with random data' % a.disk_mib)
        subprocess.run(['dd', 'if=/dev/urandom', 'of=' + img, 'bs=1M', 'count=%d' % a.disk_mib, 'status=none'],
                       check=True)
        g = env.boot_guest(dirty_kib_s=0, extra_append='ftvm_disk_bench_rounds=%d ftvm_disk_bench_seq_mib=%d' % (a.rounds, a.seq_mib),
                           extra_args=['-drive', 'file=%s,if=virtio,format=raw,cache=writeback' % img])
        g.serial.wait_ticks(3, 90)
        tmo = 60 + 20 * a.rounds
        log('protection off: %d rounds' % a.rounds)
        ex, off = run_bench(g.serial, 'vda', a.rounds, tmo)
        res['off'] = summarize(ex, off)
        P = env.start_ftd('primary', listen=False)
        S = env.start_ftd('standby', extra=['--disk-dir', env.path('replicas')])
        t0 = time.time()
        protect(env, P, S, g, VM, epoch_ms=a.epoch_ms)
        v = P.vm(VM, 'primary')
        d = v['disk']
        res['initial_copy'] = {'bytes': d['initial_copy_bytes'], 'ms': d['initial_copy_ms'],
                               's_per_gib': d['initial_copy_ms'] / 1000 / (a.disk_mib / 1024),
                               'mib_s': a.disk_mib / (d['initial_copy_ms'] / 1000),
                               'enable_total_s': time.time() - t0}
        log('initial copy: %s' % res['initial_copy'])
        log('protection on: %d rounds' % a.rounds)
        ex, on = run_bench(g.serial, 'vda', a.rounds, tmo)
        res['on'] = summarize(ex, on)
        v = P.vm(VM, 'primary')
        res['on']['pause_ms'] = v['pause_ms']
        res['on']['disk_status'] = v['disk']
        P.ctl('disable', VM)
    o, n = res['off'], res['on']
    res['ratio_on_off'] = {
        'sync4k_ms_per_op_p50': n['sync4k_ms_per_op']['p50'] / o['sync4k_ms_per_op']['p50'],
        'sync4k_net_ms_per_op_p50': n['sync4k_net_ms_per_op']['p50'] / o['sync4k_net_ms_per_op']['p50'],
        'seq_mib_s_p50': n['seq_mib_s']['p50'] / o['seq_mib_s']['p50'],
    }
    print(json.dumps(res, indent=1))
    if a.json:
        json.dump(res, open(a.json, 'w'), indent=1)


if __name__ == '__main__':
    main()
