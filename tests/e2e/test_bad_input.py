#!/usr/bin/python3
"""Bad input end to end (CTest label `badinput`): ftctl misuse, garbage on the control socket
and on the replication port, a QMP socket that is not QEMU, VMs that cannot be protected.
Each gets a clear error, and ftd keeps serving."""
import json
import os
import socket
import subprocess
import threading
import time

from ftvm_e2e import BUILD, Env, check, log, main, qmp, wait_for

FTCTL = os.path.join(BUILD, 'ftctl')


def run(*args):
    return subprocess.run([FTCTL] + list(args), capture_output=True, text=True, timeout=60)


def raw_control(path, data, read=True):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(path)
    try:
        s.sendall(data)
    except (BrokenPipeError, ConnectionResetError):
        pass  # ftd may answer and hang up before reading it all (oversized requests)
    out = b''
    if read:
        while not out.endswith(b'\n'):
            try:
                d = s.recv(65536)
            except ConnectionResetError:
                break
            if not d:
                break
            out += d
    s.close()
    return out


def fake_server(path, payload):
    """A unix socket that is not QEMU: sends `payload` to each client."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(4)

    def loop():
        while True:
            try:
                c, _ = srv.accept()
            except OSError:
                return
            try:
                c.sendall(payload)
                time.sleep(0.5)
            except OSError:
                pass
            c.close()
    threading.Thread(target=loop, daemon=True).start()
    return srv


def alive(P):
    r = P.ctl('status', '--json')
    check(r.returncode == 0, 'ftd stopped answering')


def scenario():
    with Env('bad-input') as env:
        P = env.start_ftd('primary')
        ctl = ['--control', P.control]

        # ftctl misuse: usage errors exit 2, unknown VMs 4, unreachable ftd 3.
        cases = [
            ([], 2), (ctl + ['enable'], 2), (ctl + ['enable', '--qmp', '/x'], 2),
            (ctl + ['enable', '--qmp', '/x', '--peer', '127.0.0.1:1', '--epoch-ms', '0'], 2),
            (ctl + ['frobnicate'], 2), (ctl + ['failover'], 2), (ctl + ['status', 'nosuchvm'], 4),
            (ctl + ['failover', 'nosuchvm'], 4), (ctl + ['disable', 'nosuchvm'], 4),
            (['--control', env.path('nothing.sock'), 'status'], 3),
        ]
        for args, rc in cases:
            r = run(*args)
            log('ftctl %s -> %d: %s' % (' '.join(args), r.returncode, (r.stderr or r.stdout).strip().splitlines()[:1]))
            check(r.returncode == rc, 'ftctl %s: rc %d, expected %d (%s)' % (args, r.returncode, rc, r.stderr))
            check(rc == 0 or r.stderr.strip(), 'ftctl %s failed without a message' % args)
        r = run('--help')
        check(r.returncode == 0 and 'enable' in r.stdout, '--help')

        # Garbage on the control socket.
        for data, expect in [(b'garbage\n', 'malformed request'), (b'[1,2,3]\n', 'malformed request'),
                             (b'{"cmd":"explode"}\n', 'unknown command'),
                             (b'{"cmd":"enable","qmp":5}\n', "missing or empty string argument 'qmp'"),
                             (b'{"cmd":"failover"}\n', "argument 'name'"),
                             (b'{"cmd":"enable","qmp":"/x","peer":"h:1","epoch_ms":-4}\n', 'positive integer')]:
            out = json.loads(raw_control(P.control, data))
            log('control %r -> %s' % (data[:40], out))
            check(out['ok'] is False and expect in out['error'], 'control %r: %s' % (data, out))
        out = raw_control(P.control, b'x' * (2 << 20))
        check(b'too long' in out, 'oversized request: %r' % out[:200])
        raw_control(P.control, b'{"cmd":"status"', read=False)  # half a request, then hang up
        alive(P)

        # A QMP socket that is not QEMU, and one that does not exist.
        for name, payload in [('http.sock', b'HTTP/1.1 200 OK\r\n\r\n'), ('junk.sock', b'\x00\xff{{{not json\n'),
                              ('json.sock', b'{"hello": "world"}\n')]:
            p = env.path(name)
            srv = fake_server(p, payload)
            r = run(*ctl, 'enable', '--qmp', p, '--peer', '127.0.0.1:%d' % env.port)
            srv.close()
            log('enable on %s -> %d: %s' % (name, r.returncode, r.stderr.strip()))
            check(r.returncode == 5 and p in r.stderr, 'not-QEMU socket %s: rc %d %s' % (name, r.returncode, r.stderr))
        r = run(*ctl, 'enable', '--qmp', env.path('missing.sock'), '--peer', '127.0.0.1:1')
        check(r.returncode == 5 and 'missing.sock' in r.stderr, 'missing socket: %s' % r.stderr)
        r = run(*ctl, 'enable', '--qmp', env.path('missing.sock'), '--peer', 'no-port-here:')
        check(r.returncode != 0 and r.stderr.strip(), 'bad peer address accepted')

        # A VM that cannot be protected: RAM not in a shared memfd, a balloon. The message names
        # each problem; the VM is untouched (still answers QMP, same run state).
        qdir = env.path('unprot')
        os.makedirs(qdir)
        qsock = os.path.join(qdir, 'qmp.sock')
        qp = subprocess.Popen(['qemu-system-x86_64', '-machine', 'q35', '-accel', 'tcg', '-m', '64', '-nodefaults',
                               '-display', 'none', '-S', '-device', 'virtio-balloon-pci',
                               '-qmp', 'unix:%s,server=on,wait=off' % qsock],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        env.track(qp.pid, 'unprotectable qemu')
        env.procs.append(qp)
        wait_for(lambda: os.path.exists(qsock), 20, 'QEMU QMP socket')
        time.sleep(0.3)
        r = run(*ctl, 'enable', '--qmp', qsock, '--peer', '127.0.0.1:%d' % env.port)
        log('unprotectable VM -> %d:\n%s' % (r.returncode, r.stderr))
        check(r.returncode == 5, 'unprotectable VM: rc %d' % r.returncode)
        for word in ('memory-backend-memfd', 'balloon'):
            check(word in r.stderr, 'refusal does not mention %s: %s' % (word, r.stderr))
        st = qmp(qsock, ['query-status'])[0]
        check(st['status'] == 'prelaunch', 'VM changed by the refused enable: %s' % st)

        # Garbage and a wrong-protocol peer on the replication port.
        for data in [b'GET / HTTP/1.0\r\n\r\n', os.urandom(4096), b'FTVM' + b'\x02\x00' + b'\x00' * 26]:
            s = socket.create_connection(('127.0.0.1', env.port), timeout=10)
            try:
                s.sendall(data)
                s.settimeout(5)
                try:
                    s.recv(4096)
                except OSError:
                    pass
            finally:
                s.close()
        time.sleep(0.5)
        alive(P)
        text = P.log_text()
        check('rejected an incoming replication connection' in text, 'ftd did not log the bad replication peers')
        check(P.proc.poll() is None, 'ftd died')


if __name__ == '__main__':
    main({'all': scenario})
