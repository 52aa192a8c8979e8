#!/usr/bin/python3
"""Replication security end to end (issue 12; CTest label `security`).

Real daemons (the ftd binary) on loopback, the synthetic VMM (tests/synthetic-vmm/synthvm) as
the protected guest, hostile peers as raw Python sockets, a recording/tampering TCP relay, and
tests/security/peer_tool.cc (a peer that holds a key, built on the real transport) connecting
from another loopback address (127.0.0.2). Every hostile attempt must be refused, logged by the
standby with the peer's address, and leave the standby unchanged: no twin process started for
it, the existing twin untouched (same pid, still receiving epochs, never activated).

Scenarios:
  rogue        peers without the key, with another key, with a forged key id, a Hello announcing
               max_write_payload 1, a replay of a recorded authenticated session, and an
               authenticated peer on another host sending OpenSession / HeartbeatLink for the
               protected VM's session
  tamper       one flipped byte in the OpenSession frame (no twin may start) and one in the
               middle of the epoch stream (the session ends, the twin is never activated)
  idle         silent connections that never send Hello while a legitimate primary connects
               (it must be served at once), and the per-address limit on them
  allow-peer   --allow-peer: other addresses are closed before the handshake
  no-key       ftd refuses to start without --key-file unless --insecure, which is loud
"""
import os
import socket
import struct
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'e2e'))
from ftvm_e2e import BUILD, Env, Failure, check, log, make_key, main, protect, wait_for  # noqa: E402
from test_synthetic import boot_synthvm  # noqa: E402

VM = 'vm1'
PEER_TOOL = os.path.join(BUILD, 'tests', 'security', 'ftvm-peer-tool')
HELLO_BODY = 64
HANDSHAKE_C2S = 32 + HELLO_BODY + 32 + 32  # client's Hello frame + Auth frame


# ---- wire helpers (transport/frame.h) ---------------------------------------------------------

def _xxh32(data, seed=0):
    P1, P2, P3, P4, P5 = 2654435761, 2246822519, 3266489917, 668265263, 374761393
    M = 0xFFFFFFFF
    rotl = lambda x, r: ((x << r) | (x >> (32 - r))) & M  # noqa: E731
    n, i = len(data), 0
    if n >= 16:
        v = [(seed + P1 + P2) & M, (seed + P2) & M, seed & M, (seed - P1) & M]
        while i + 16 <= n:
            for k in range(4):
                lane = struct.unpack_from('<I', data, i + 4 * k)[0]
                v[k] = (rotl((v[k] + lane * P2) & M, 13) * P1) & M
            i += 16
        h = (rotl(v[0], 1) + rotl(v[1], 7) + rotl(v[2], 12) + rotl(v[3], 18)) & M
    else:
        h = (seed + P5) & M
    h = (h + n) & M
    while i + 4 <= n:
        h = (rotl((h + struct.unpack_from('<I', data, i)[0] * P3) & M, 17) * P4) & M
        i += 4
    while i < n:
        h = (rotl((h + data[i] * P5) & M, 11) * P1) & M
        i += 1
    h ^= h >> 15
    h = (h * P2) & M
    h ^= h >> 13
    h = (h * P3) & M
    h ^= h >> 16
    return h


WIRE_VERSION = 3  # transport/frame.h kWireVersion (3: the RDMA handshake and tags; TCP framing as in 2)


def frame(kind, payload=b'', version=WIRE_VERSION):
    hdr = struct.pack('<IHBBIIQI', 0x4D565446, version, kind, 0, 0, len(payload), 0, 0)
    return hdr + struct.pack('<I', _xxh32(hdr)) + payload


def hello(caps=0, max_write=16 << 20, key_id=b'\0' * 8):
    body = struct.pack('<HHIII', WIRE_VERSION, 0, caps, max_write, 0) + os.urandom(32) + key_id + b'\0' * 8
    return frame(1, body)


def key_id(path):
    """The key id ftd announces (transport/auth.cc: BLAKE2b-64 keyed with the key)."""
    import hashlib
    return hashlib.blake2b(b'ftvm-key-id-v2', digest_size=8, key=open(path, 'rb').read()).digest()


def raw_peer(port, data, wait=1.5, source='127.0.0.1'):
    """Connects from `source`, sends `data`, returns what the standby sent before closing."""
    s = socket.socket()
    s.bind((source, 0))
    s.settimeout(wait)
    s.connect(('127.0.0.1', port))
    got = b''
    try:
        s.sendall(data)
        while True:
            d = s.recv(65536)
            if not d:
                break
            got += d
    except (socket.timeout, ConnectionResetError, BrokenPipeError):
        pass
    s.close()
    return got


def peer_tool(env, *args, key=None, source='127.0.0.2'):
    a = [PEER_TOOL, '--connect', '127.0.0.1:%d' % env.port] + (['--key', key] if key else ['--insecure'])
    a += ['--source', source] + list(args)
    r = subprocess.run(a, capture_output=True, text=True, timeout=60)
    check(r.returncode == 0, 'peer tool %s failed: %s %s' % (args, r.stdout, r.stderr))
    log('peer tool %s from %s: %s' % (' '.join(args), source, r.stdout.strip()[:300]))
    return r.stdout.strip()


class Relay(threading.Thread):
    """TCP relay 127.0.0.1:listen -> 127.0.0.1:target. Records the client->server bytes of the
    first connection; flips the byte at client->server offset `flip_at` (None = never; may be
    set while running). Later connections are relayed unchanged."""

    def __init__(self, target):
        super().__init__(daemon=True)
        self.target = target
        self.ls = socket.socket()
        self.ls.bind(('127.0.0.1', 0))
        self.ls.listen(8)
        self.port = self.ls.getsockname()[1]
        self.recorded = bytearray()
        self.c2s = 0
        self.flip_at = None
        self.flipped = False
        self.first = True
        self.lock = threading.Lock()

    def run(self):
        while True:
            try:
                c, _ = self.ls.accept()
            except OSError:
                return
            s = socket.create_connection(('127.0.0.1', self.target))
            first, self.first = self.first, False
            threading.Thread(target=self.pump, args=(c, s, first), daemon=True).start()
            threading.Thread(target=self.pump, args=(s, c, False, True), daemon=True).start()

    def pump(self, a, b, record, back=False):
        try:
            while True:
                d = a.recv(65536)
                if not d:
                    break
                if record:
                    with self.lock:
                        d = bytearray(d)
                        if self.flip_at is not None and not self.flipped and self.c2s <= self.flip_at < self.c2s + len(d):
                            d[self.flip_at - self.c2s] ^= 0x01
                            self.flipped = True
                            log('relay: flipped client->server byte %d' % self.flip_at)
                        if len(self.recorded) < (8 << 20):
                            self.recorded += d
                        self.c2s += len(d)
                b.sendall(d)
        except OSError:
            pass
        for x in (a, b):
            try:
                x.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


# ---- shared setup ---------------------------------------------------------------------------

def twin_pids(env):
    """PIDs of processes whose command line mentions a standby twin directory."""
    out = []
    for d in os.listdir('/proc'):
        if not d.isdigit():
            continue
        try:
            cmd = open('/proc/%s/cmdline' % d, 'rb').read()
        except OSError:
            continue
        if (env.path('standby', 'vms') + '/').encode() in cmd:
            out.append(int(d))
    return sorted(out)


def protected(env, via_port=None, extra_standby=()):
    g = boot_synthvm(env)
    g.serial.wait_ticks(2, 30)
    S = env.start_ftd('standby', extra=list(extra_standby))
    P = env.start_ftd('primary', listen=False)
    P.ctl('enable', '--qmp', g.qmp, '--peer', '127.0.0.1:%d' % (via_port or env.port), '--name', VM,
          '--epoch-ms', '25', '--timeout', '120')
    wait_for(lambda: (S.vm(VM, 'standby') or {}).get('epoch', 0) >= 10, 60, 'ten committed epochs on the standby')
    return g, S, P


def standby_untouched(env, S, twin_pid, epoch_before, log_before):
    """The existing twin is the same process, alive, still receiving epochs, never activated;
    no other twin was started."""
    v = S.vm(VM, 'standby')
    check(v is not None and v['twin_pid'] == twin_pid, 'the twin changed: %s (was pid %d)' % (v, twin_pid))
    wait_for(lambda: S.vm(VM, 'standby')['epoch'] > epoch_before + 5, 20, 'epochs still committed after the attacks')
    check(S.vm(VM, 'standby')['state'] == 'protected', 'session state: %s' % S.vm(VM, 'standby'))
    check(os.path.exists('/proc/%d' % twin_pid), 'the twin pid %d died' % twin_pid)
    check(twin_pids(env) == [twin_pid], 'twin processes on the standby: %s, expected only %d' % (twin_pids(env), twin_pid))
    text = S.log_text()[log_before:]
    check('starting twin' not in text, 'a twin was started by an attack: %s' % text[-2000:])
    check('ACTIVATED' not in text and 'replaces the previous one' not in text,
          'the existing session was replaced or activated: %s' % text[-2000:])
    check(sorted(os.listdir(env.path('standby', 'vms'))) == [VM], 'twin dirs: %s' % os.listdir(env.path('standby', 'vms')))


def expect_log(S, since, *needles, timeout=10):
    def found():
        t = S.log_text()[since:]
        return all(n in t for n in needles)
    wait_for(found, timeout, 'standby log lines with %s' % (needles,))
    t = S.log_text()[since:]
    line = next((l for l in t.splitlines() if needles[0] in l), '')
    log('standby logged: %s' % line[:400])


def run_step(failures, fn):
    """Runs one hostile attempt; a failed check is recorded and the next attempt still runs
    (so that each attempt's outcome is visible on its own)."""
    try:
        fn()
        log('   -> as expected')
    except Failure as e:
        log('   -> FAILED: %s' % e)
        failures.append('%s: %s' % (fn.__name__, e))


# ---- scenarios ----------------------------------------------------------------------------------

def rogue():
    with Env('sec-rogue') as env:
        relay = Relay(env.port)
        relay.start()
        g, S, P = protected(env, via_port=relay.port)
        v = S.vm(VM, 'standby')
        twin_pid, epoch0, sid = v['twin_pid'], v['epoch'], v['session_id']
        check(v['security'].startswith('authenticated'), 'session not authenticated: %s' % v)
        mark = len(S.log_text())

        failures = []

        log('1. a peer without a key')
        def step1():
            got = raw_peer(env.port, hello())
            check(b'FTVM' not in got[64:], 'the standby sent more than its handshake to a keyless peer: %r' % got[:200])
            expect_log(S, mark, 'did not authenticate', 'from 127.0.0.1:')
        run_step(failures, step1)

        log('2. a Hello announcing max_write_payload 1')
        def step2():
            m = len(S.log_text())
            raw_peer(env.port, hello(max_write=1))
            expect_log(S, m, 'max_write_payload 1, below the minimum', 'from 127.0.0.1:')
        run_step(failures, step2)

        log('3. a forged key id with a made-up proof')
        def step3():
            m = len(S.log_text())
            raw_peer(env.port, hello(caps=1, key_id=key_id(env.key)) + frame(6, os.urandom(32)))
            expect_log(S, m, 'proof does not match', 'from 127.0.0.1:')
        run_step(failures, step3)

        log('4. another key (another host pair)')
        def step4():
            other = make_key(env.path('other.key'))
            m = len(S.log_text())
            out = peer_tool(env, 'open', VM, key=other)
            check(out.startswith('REFUSED') and 'different key files' in out, 'other key not refused: %s' % out)
            expect_log(S, m, 'different key files', 'from 127.0.0.2:')
        run_step(failures, step4)

        log('5. replaying the recorded authenticated session (%d bytes)' % len(relay.recorded))
        def step5():
            check(len(relay.recorded) > 100000, 'too little recorded: %d bytes' % len(relay.recorded))
            m = len(S.log_text())
            raw_peer(env.port, bytes(relay.recorded[:4 << 20]), wait=3)
            expect_log(S, m, 'proof does not match', 'from 127.0.0.1:')
        run_step(failures, step5)

        log('6. an authenticated peer on another host: OpenSession for the protected VM')
        def step6():
            m = len(S.log_text())
            out = peer_tool(env, 'open', VM, key=env.key)
            check(out.startswith('REPLY Error') and 'already protected by a session from 127.0.0.1' in out,
                  'OpenSession from another peer not refused: %s' % out)
            expect_log(S, m, 'refusing session from 127.0.0.2:', 'leaving that session untouched')
        run_step(failures, step6)

        log('7. HeartbeatLink for the session from another host (with the key) and without a key')
        def step7():
            m = len(S.log_text())
            out = peer_tool(env, 'heartbeat-link', sid, key=env.key)
            check(out.startswith('REPLY Error'), 'HeartbeatLink from another peer not refused: %s' % out)
            expect_log(S, m, 'refused a second path from 127.0.0.2:')
            out = peer_tool(env, 'heartbeat-link', sid, key=None, source='127.0.0.1')
            check(out.startswith('REFUSED') or out.startswith('CLOSED'), 'keyless HeartbeatLink not refused: %s' % out)
            expect_log(S, m, 'did not authenticate')
        run_step(failures, step7)

        log('8. Disable for the session as the first message of another authenticated connection')
        def step8():
            out = peer_tool(env, 'disable', sid, key=env.key)
            check('REPLY' not in out or 'Error' in out or 'none' in out, 'unexpected answer to a foreign Disable: %s' % out)
        run_step(failures, step8)

        log('9. afterwards: the standby is unchanged')

        def untouched():
            standby_untouched(env, S, twin_pid, epoch0, mark)
            check(P.vm(VM, 'primary')['state'] == 'protected', 'primary: %s' % P.vm(VM, 'primary'))
        run_step(failures, untouched)

        log('10. the same primary host (127.0.0.1, the key) opening the VM again replaces its paused twin')

        def same_host():
            m = len(S.log_text())
            out = peer_tool(env, 'open', VM, key=env.key, source='127.0.0.1')
            expect_log(S, m, 'a new session from the same primary (127.0.0.1:', 'replaces the previous one')
            check('already protected' not in out, 'the same host was refused: %s' % out)
            check('ACTIVATED' not in S.log_text()[m:], 'the replaced twin was activated')
        run_step(failures, same_host)
        check(not failures, '%d of 10 checks failed: %s' % (len(failures), failures))


def tamper():
    with Env('sec-tamper') as env:
        relay = Relay(env.port)
        relay.flip_at = HANDSHAKE_C2S + 40  # inside the OpenSession frame
        relay.start()
        g = boot_synthvm(env)
        g.serial.wait_ticks(2, 30)
        S = env.start_ftd('standby')
        P = env.start_ftd('primary', listen=False, extra=['--reconnect-ms', '60000'])
        r = P.ctl('enable', '--qmp', g.qmp, '--peer', '127.0.0.1:%d' % relay.port, '--name', VM, '--epoch-ms', '25',
                  '--timeout', '15', check_rc=False)
        log('enable through a relay flipping byte %d: rc %d %s' % (relay.flip_at, r.returncode, r.stderr.strip()[:300]))
        check(relay.flipped, 'the relay never flipped the byte')
        expect_log(S, 0, 'failed authentication', 'from 127.0.0.1:')
        check('starting twin' not in S.log_text(), 'a twin was started from a tampered OpenSession')
        check(twin_pids(env) == [], 'twin processes: %s' % twin_pids(env))
        P.ctl('disable', VM, check_rc=False)

        log('one flipped byte in the middle of the epoch stream')
        relay2 = Relay(env.port)
        relay2.start()
        P.ctl('enable', '--qmp', g.qmp, '--peer', '127.0.0.1:%d' % relay2.port, '--name', VM, '--epoch-ms', '25',
              '--timeout', '120')
        wait_for(lambda: (S.vm(VM, 'standby') or {}).get('epoch', 0) >= 10, 60, 'ten committed epochs')
        twin_pid = S.vm(VM, 'standby')['twin_pid']
        m = len(S.log_text())
        with relay2.lock:
            relay2.flip_at = relay2.c2s + 20000
        wait_for(lambda: relay2.flipped, 30, 'the relay to flip a byte of an epoch')
        expect_log(S, m, 'failed authentication', 'from 127.0.0.1:')
        t = S.log_text()[m:]
        check('ACTIVATED' not in t, 'the standby activated after a tampered frame: %s' % t[-2000:])
        wait_for(lambda: not os.path.exists('/proc/%d' % twin_pid) or
                 open('/proc/%d/stat' % twin_pid).read().split(') ')[1][0] == 'Z', 20,
                 'the twin of the tampered session to be destroyed (the primary resynchronizes)')
        v = S.vm(VM, 'active')
        check(v is None, 'twin activated: %s' % v)


def idle():
    with Env('sec-idle') as env:
        g = boot_synthvm(env)
        g.serial.wait_ticks(2, 30)
        S = env.start_ftd('standby')
        P = env.start_ftd('primary', listen=False)
        # Silent clients on another host (127.0.0.3), up to the per-address limit. Each holds a
        # handshake for the full handshake timeout (3 s); the legitimate primary must not wait.
        silent = []
        for _ in range(4):
            s = socket.socket()
            s.bind(('127.0.0.3', 0))
            s.connect(('127.0.0.1', env.port))
            silent.append(s)
        time.sleep(0.3)
        m = len(S.log_text())
        t0 = time.time()
        r = P.ctl('enable', '--qmp', g.qmp, '--peer', '127.0.0.1:%d' % env.port, '--name', VM, '--epoch-ms', '25',
                  '--timeout', '60', check_rc=False)
        took = time.time() - t0
        log('enable with 4 silent connections open: rc %d, %.2f s' % (r.returncode, took))
        check(r.returncode == 0, 'enable failed: %s %s' % (r.stdout, r.stderr))
        check('replication to' not in P.log_text(), 'the primary failed to connect at first: %s' % P.log_text()[-1500:])
        check(took < 10, 'enable took %.1f s' % took)
        check(S.vm(VM, 'standby')['state'] == 'protected', 'standby: %s' % S.vm(VM, 'standby'))
        # The silent ones are dropped after the handshake timeout, logged with their address.
        expect_log(S, m, 'no Hello from 127.0.0.3:', timeout=10)
        for s in silent:
            s.close()
        # The per-address limit: a fifth silent client while four are in their handshake is closed.
        silent = []
        for _ in range(5):
            s = socket.socket()
            s.bind(('127.0.0.3', 0))
            s.connect(('127.0.0.1', env.port))
            silent.append(s)
        expect_log(S, m, 'unauthenticated connections from 127.0.0.3', 'closed')
        for s in silent:
            s.close()


def allow_peer():
    with Env('sec-allow') as env:
        S = env.start_ftd('standby', extra=['--allow-peer', '127.0.0.2'])
        m = len(S.log_text())
        out = peer_tool(env, 'heartbeat-link', '1234', key=env.key, source='127.0.0.1')
        check(out.startswith('REFUSED') or out.startswith('CLOSED'), 'peer outside the allow-list served: %s' % out)
        expect_log(S, m, 'refused replication connection from 127.0.0.1:', 'not an allowed peer')
        out = peer_tool(env, 'heartbeat-link', '1234', key=env.key, source='127.0.0.2')
        check(out.startswith('REPLY Error') and 'unknown session' in out, 'allowed peer not served: %s' % out)


def no_key():
    with Env('sec-nokey') as env:
        ftd = os.path.join(BUILD, 'ftd')
        try:
            r = subprocess.run([ftd, '--run-dir', env.path('x'), '--listen', '127.0.0.1:%d' % env.port],
                               capture_output=True, text=True, timeout=20)
        except subprocess.TimeoutExpired:
            raise Failure('ftd without --key-file and without --insecure started and kept running')
        check(r.returncode == 2 and '--key-file' in r.stderr and '--insecure' in r.stderr,
              'ftd without a key: rc %d %s' % (r.returncode, r.stderr))
        os.chmod(env.key, 0o644)
        r = subprocess.run([ftd, '--run-dir', env.path('x'), '--key-file', env.key], capture_output=True, text=True,
                           timeout=20)
        check(r.returncode != 0 and 'chmod 600' in r.stderr, 'world-readable key accepted: %s' % r.stderr)
        os.chmod(env.key, 0o600)
        S = env.start_ftd('standby', key=None)
        check('--insecure' in S.log_text() and 'NOT authenticated' in S.log_text(), 'no loud warning at start')
        st = S.ctl('status')
        check('WARNING' in st.stderr and 'INSECURE' in st.stdout, 'ftctl status is quiet about --insecure: %r %r' %
              (st.stdout, st.stderr))
        m = len(S.log_text())
        out = peer_tool(env, 'heartbeat-link', '1234', key=env.key)
        check(out.startswith('REFUSED'), 'an insecure standby accepted an authenticating peer: %s' % out)
        expect_log(S, m, 'requires authentication')


if __name__ == '__main__':
    # These scenarios need no QEMU guest image (synthvm stands in): skip main()'s image check.
    scenarios = {'rogue': rogue, 'tamper': tamper, 'idle': idle, 'allow-peer': allow_peer, 'no-key': no_key}
    if len(sys.argv) != 2 or sys.argv[1] not in scenarios:
        print('usage: %s {%s}' % (sys.argv[0], '|'.join(scenarios)))
        sys.exit(2)
    t0 = time.time()
    try:
        scenarios[sys.argv[1]]()
    except Failure as e:
        log('FAIL %s: %s' % (sys.argv[1], e))
        sys.exit(1)
    log('PASS %s (%.1f s)' % (sys.argv[1], time.time() - t0))
