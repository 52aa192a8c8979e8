#!/usr/bin/python3
"""Network cost of output commit (issue 4): ping RTT, request/response latency (the guest's TCP
counter service, one request in flight) and TCP echo throughput (guest port 7000, `cat`) from a
client in a network namespace, with protection off and on at two epoch lengths, measured on one
guest in one run; ratios are against "off" of the same run. Also the held-bytes peak and the
early cuts of each protected run.

Usage: sudo bench/net_bench.py [--epochs 25,50] [--output-min-ms 0,2] [--seconds 5] [--json OUT]
Needs the build (ftd, ftctl) and the test guest (`ninja guest-image`); creates its own bridge,
taps and namespace (unique names) and removes them at the end.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'tests', 'e2e'))
from ftvm_e2e import Env, log, protect, qmp, wait_for  # noqa: E402
from test_output_commit import Net, start_guest  # noqa: E402

CLIENT = r'''
import json, socket, sys, threading, time
mode, host, secs = sys.argv[1], sys.argv[2], float(sys.argv[3])
if mode == 'rr':
    s = socket.create_connection((host, 7001), timeout=30)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    f = s.makefile('rb'); lat = []; end = time.time() + secs
    while time.time() < end:
        t0 = time.perf_counter(); s.sendall(b'x\n'); f.readline(); lat.append((time.perf_counter() - t0) * 1000)
    lat.sort()
    print(json.dumps({'n': len(lat), 'p50_ms': lat[len(lat) // 2], 'p99_ms': lat[int(len(lat) * .99)]}))
else:
    s = socket.create_connection((host, 7000), timeout=30); s.settimeout(30)
    stop = False; got = [0]
    def rd():
        while True:
            try: d = s.recv(65536)
            except OSError: return
            if not d: return
            got[0] += len(d)
    t = threading.Thread(target=rd, daemon=True); t.start()
    chunk = b'y' * 16384; t0 = time.time()
    s.settimeout(1)
    while time.time() - t0 < 1: s.sendall(chunk)      # warm-up
    b0, t1 = got[0], time.time()
    while time.time() - t1 < secs:
        try: s.sendall(chunk)
        except socket.timeout: pass
    b1, t2 = got[0], time.time()
    print(json.dumps({'echo_mib_s': (b1 - b0) / (t2 - t1) / 2**20}))
    s.close()
'''


def client(env, net, mode, secs):
    script = env.path('netbench_client.py')
    open(script, 'w').write(CLIENT)
    r = subprocess.run(['ip', 'netns', 'exec', net.ns, sys.executable, script, mode, net.guest_ip, str(secs)],
                       capture_output=True, text=True, timeout=secs + 60)
    if r.returncode != 0:
        raise RuntimeError('bench client %s failed: %s' % (mode, r.stderr[-800:]))
    return json.loads(r.stdout.strip().splitlines()[-1])


def ping(net, count=100):
    r = subprocess.run(['ip', 'netns', 'exec', net.ns, 'ping', '-q', '-c', str(count), '-i', '0.02', net.guest_ip],
                       capture_output=True, text=True, timeout=120)
    m = re.search(r'= ([\d.]+)/([\d.]+)/([\d.]+)/([\d.]+) ms', r.stdout)
    loss = re.search(r'([\d.]+)% packet loss', r.stdout)
    return {'ping_avg_ms': float(m.group(2)) if m else None, 'ping_loss_pct': float(loss.group(1)) if loss else None}


def measure(env, net, secs):
    out = ping(net)
    out.update(client(env, net, 'rr', secs))
    out.update(client(env, net, 'tput', secs))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--epochs', default='25,50')
    ap.add_argument('--seconds', type=float, default=5)
    ap.add_argument('--output-min-ms', default='0,2',
                    help='ftctl enable --output-epoch-min-ms values to compare (0 = wait for the epoch boundary)')
    ap.add_argument('--json')
    a = ap.parse_args()
    results = {}
    with Net(None) as net, Env('netbench') as env:
        g = start_guest(env, net)
        P = env.start_ftd('primary', listen=False)
        env.start_ftd('standby', extra=['--twin-tap-map', '%s=%s' % (net.ptap, net.ttap)])
        time.sleep(1)
        results['off'] = measure(env, net, a.seconds)
        log('off: %s' % results['off'])
        for e in [int(x) for x in a.epochs.split(',')]:
            # Two ways to let output out: at the epoch boundary (--output-epoch-min-ms 0, the
            # behaviour before issue 14) and by cutting as soon as output waits (the default).
            for cut_ms in [int(x) for x in a.output_min_ms.split(',')]:
                P.ctl('enable', '--qmp', g.qmp, '--peer', '127.0.0.1:%d' % env.port, '--name', 'vm1',
                      '--epoch-ms', str(e), '--output-epoch-min-ms', str(cut_ms), '--timeout', '120')
                time.sleep(1)
                r = measure(env, net, a.seconds)
                st = P.vm('vm1', 'primary')
                r['held_bytes_peak'] = st['output']['held_bytes_peak']
                r['early_cuts'] = st['output']['early_cuts']
                r['output_cuts'] = st['output'].get('output_cuts', 0)
                r['frames_released'] = st['output']['frames_released']
                r['pause_ms_p50'] = st['pause_ms']['p50']
                r['epochs_per_s'] = st.get('epochs_cut', 0)
                key = 'on_%dms' % e if cut_ms == 0 else 'on_%dms_cut%d' % (e, cut_ms)
                results[key] = r
                log('on, epoch %d ms, output cut after %d ms: %s' % (e, cut_ms, r))
                P.ctl('disable', 'vm1', timeout=120)
                wait_for(lambda: _free(g.qmp), 20, 'guest QMP free after disable')
        off = results['off']
        for k, r in results.items():
            if k == 'off':
                continue
            r['ratio'] = {'ping': r['ping_avg_ms'] / off['ping_avg_ms'] if off['ping_avg_ms'] else None,
                          'rr_p50': r['p50_ms'] / off['p50_ms'],
                          'echo_tput': r['echo_mib_s'] / off['echo_mib_s'] if off['echo_mib_s'] else None}
    print(json.dumps(results, indent=1))
    if a.json:
        json.dump(results, open(a.json, 'w'), indent=1)


def _free(path):
    try:
        qmp(path, ['query-status'], timeout=2)
        return True
    except Exception:
        return False


if __name__ == '__main__':
    main()
