#!/usr/bin/python3
"""What a standby ftd runs (issue 12; CTest label `security`): a fake primary that speaks the
replication protocol to a real standby ftd sends OpenSessions with hostile QEMU command lines
(argv[0] = /bin/sh, -plugin, a kernel outside the allowed directories) and a hostile libvirt
domain XML. Each is refused with an Error message naming the problem, the standby logs it, and
no process is started (ftd has no children). Then a harmless synthvm twin is started and sent
Activate before any Commit: refused (ActivateDone ok=0, no checkpoint), the twin destroyed.

Starts ftd with --insecure when that flag exists (key authentication on the replication port,
added separately), so the test works before and after it."""
import os
import socket
import struct
import subprocess
import sys
import time

from ftvm_e2e import BUILD, Env, Failure, check, log, wait_for

FTD = os.path.join(BUILD, 'ftd')
SYNTHVM = os.path.join(BUILD, 'tests', 'synthetic-vmm', 'synthvm')

# ---- XXH32 (the frame header checksum), pure Python -------------------------------------------
P1, P2, P3, P4, P5 = 2654435761, 2246822519, 3266489917, 668265263, 374761393
M32 = 0xFFFFFFFF


def _rotl(x, r):
    return ((x << r) | (x >> (32 - r))) & M32


def xxh32(data, seed=0):
    n = len(data)
    i = 0
    if n >= 16:
        v = [(seed + P1 + P2) & M32, (seed + P2) & M32, seed & M32, (seed - P1) & M32]
        while i + 16 <= n:
            for k in range(4):
                lane = struct.unpack_from('<I', data, i + 4 * k)[0]
                v[k] = (_rotl((v[k] + lane * P2) & M32, 13) * P1) & M32
            i += 16
        h = (_rotl(v[0], 1) + _rotl(v[1], 7) + _rotl(v[2], 12) + _rotl(v[3], 18)) & M32
    else:
        h = (seed + P5) & M32
    h = (h + n) & M32
    while i + 4 <= n:
        h = (_rotl((h + struct.unpack_from('<I', data, i)[0] * P3) & M32, 17) * P4) & M32
        i += 4
    while i < n:
        h = (_rotl((h + data[i] * P5) & M32, 11) * P1) & M32
        i += 1
    h ^= h >> 15
    h = (h * P2) & M32
    h ^= h >> 13
    h = (h * P3) & M32
    h ^= h >> 16
    return h


# ---- frames and messages (transport/frame.h, checkpoint/protocol.h) ---------------------------
HELLO, WRITE, CONTROL, HEARTBEAT, GOODBYE = 1, 2, 3, 4, 5
OPEN_SESSION, SESSION_READY, EPOCH_BEGIN, COMMIT, ACK, ACTIVATE, ACTIVATE_DONE, ERROR = 1, 2, 5, 6, 7, 8, 9, 12
PROTOCOL_VERSION = 5  # checkpoint/protocol.h kProtocolVersion (5: failover/origin/history, Commit.staged_tag)
WIRE_VERSION = 3      # transport/frame.h kWireVersion (3: RDMA handshake and tags; TCP framing as in 2)


def frame(kind, field=0, payload=b'', offset=0):
    h = struct.pack('<IHBBIIQI', 0x4D565446, WIRE_VERSION, kind, 0, field, len(payload), offset, 0)
    return h + struct.pack('<I', xxh32(h)) + payload


def s(x):
    b = x.encode() if isinstance(x, str) else x
    return struct.pack('<I', len(b)) + b


def open_session(sid, name, ram, argv, disks=(), xml=''):
    b = struct.pack('<IQQI', PROTOCOL_VERSION, sid, ram, 4096) + s(name)
    b += struct.pack('<I', len(argv)) + b''.join(s(a) for a in argv)
    b += struct.pack('<I', len(disks)) + b''.join(s(i) + s(src) + struct.pack('<Q', sz) for i, src, sz in disks)
    # arbiter kind, reprotect port (manual), second-path host (none), RAM in use (0: unknown),
    # failover policy (auto), origin, history
    return (b + s(xml) + s('none') + struct.pack('<I', 0) + s('') + struct.pack('<QI', 0, 1) + s('fake-primary') +
            s('[]'))


class FakePrimary:
    def __init__(self, port):
        self.sock = socket.create_connection(('127.0.0.1', port), timeout=30)
        self.buf = b''
        # An unauthenticated Hello (the standby runs --insecure): version, reserved, capabilities 0,
        # max write payload, reserved, zero nonce, zero key id, reserved (64 bytes).
        self.sock.sendall(frame(HELLO, payload=struct.pack('<HHIII', WIRE_VERSION, 0, 0, 16 << 20, 0) + b'\0' * 48))
        k, _, _ = self.read_frame()
        check(k == HELLO, 'standby did not answer Hello (kind %d)' % k)

    def read_frame(self, timeout=60):
        end = time.time() + timeout
        while True:
            if len(self.buf) >= 32:
                _, _, kind, _, field, length, _, _, _ = struct.unpack_from('<IHBBIIQII', self.buf)
                if len(self.buf) >= 32 + length:
                    p = self.buf[32:32 + length]
                    self.buf = self.buf[32 + length:]
                    return kind, field, p
            self.sock.settimeout(max(0.1, end - time.time()))
            d = self.sock.recv(65536)
            if not d:
                raise Failure('standby closed the connection')
            self.buf += d

    def control(self, typ, body):
        self.sock.sendall(frame(CONTROL, typ, body))

    def reply(self, timeout=60):
        """The next control message (heartbeats answered, skipped)."""
        end = time.time() + timeout
        while time.time() < end:
            kind, field, p = self.read_frame(end - time.time())
            if kind == HEARTBEAT:
                self.sock.sendall(frame(HEARTBEAT))
            elif kind == CONTROL:
                return field, p
            elif kind == GOODBYE:
                raise Failure('standby said Goodbye')
        raise Failure('no reply from the standby')

    def close(self):
        self.sock.close()


def children(pid):
    out = []
    for d in os.listdir('/proc'):
        if d.isdigit():
            try:
                st = open('/proc/%s/stat' % d).read()
            except OSError:
                continue
            if int(st.rsplit(')', 1)[1].split()[1]) == pid:
                out.append((int(d), open('/proc/%s/cmdline' % d, 'rb').read().replace(b'\0', b' ')))
    return out


def error_text(p):
    n = struct.unpack_from('<I', p)[0]
    return p[4:4 + n].decode(errors='replace')


def refused(S, port, what, argv=(), xml='', expect=()):
    fp = FakePrimary(port)
    fp.control(OPEN_SESSION, open_session(0x5EC0 + len(what), 'sec-' + what, 64 << 20, list(argv), xml=xml))
    typ, p = fp.reply()
    fp.close()
    check(typ == ERROR, '%s: expected Error, got message type %d' % (what, typ))
    text = error_text(p)
    log('%s -> Error: %s' % (what, text[:300]))
    for w in expect:
        check(w in text, '%s: the error does not mention %r: %s' % (what, w, text))
    wait_for(lambda: 'refusing session' in S.log_text() and expect[0] in S.log_text(), 10,
             'the standby to log the refusal of %s' % what)
    kids = children(S.proc.pid)
    check(not kids, '%s: ftd started a process: %s' % (what, kids))


HOSTILE_XML = """<domain type='kvm' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>evil</name>
  <memory unit='KiB'>65536</memory>
  <os><type arch='x86_64' machine='q35'>hvm</type></os>
  <devices>
    <emulator>/bin/sh</emulator>
    <disk type='file' device='disk'><source file='/etc/shadow'/><target dev='vda' bus='virtio'/></disk>
  </devices>
  <qemu:commandline><qemu:arg value='-plugin'/><qemu:arg value='file=/tmp/evil.so'/></qemu:commandline>
</domain>
"""


FAILURES = []


def case(what, fn, *args, **kw):
    """Runs one case; a failure is recorded and the next case runs (all are reported)."""
    try:
        fn(*args, **kw)
        log('case %s: ok' % what)
    except Failure as e:
        log('case %s: FAILED: %s' % (what, e))
        FAILURES.append('%s: %s' % (what, e))


def scenario():
    help_text = subprocess.run([FTD, '--help'], capture_output=True, text=True).stdout
    # The fake primary speaks without a key: the standby runs --insecure (the harness's key=False)
    # where it has that flag; an ftd from before issue 12 gets neither.
    insecure = '--insecure' in help_text
    with Env('security') as env:
        S = env.start_ftd('standby', extra=['--libvirt-uri', ''], key=False if insecure else True)
        port = env.port
        base = [SYNTHVM, '-name', 'guest=g', '-machine', 'q35,memory-backend=mem0', '-m', '64',
                '-object', 'memory-backend-memfd,id=mem0,size=64M,share=on', '-nodefaults', '-display', 'none',
                '-append', 'synth_rate_kib_s=256 synth_tick_ms=100']
        case('shell', refused, S, port, 'shell', ['/bin/sh', '-c', 'touch %s' % env.path('pwned')],
             expect=['/bin/sh', '--qemu-binary'])
        case('plugin', refused, S, port, 'plugin', base + ['-plugin', env.path('evil.so')], expect=['-plugin'])
        case('kernel', refused, S, port, 'kernel', base + ['-kernel', '/etc/shadow'],
             expect=['/etc/shadow', '--allow-path'])
        case('script', refused, S, port, 'script', base + ['-netdev', 'tap,id=n0,script=%s' % env.path('evil.sh')],
             expect=['script='])
        case('xml', refused, S, port, 'xml', ['qemu-system-x86_64'], xml=HOSTILE_XML,
             expect=['<emulator>', '/bin/sh', '/etc/shadow', 'qemu:commandline'])
        # A process the old behaviour started (the shell, a twin) is gone before the next case.
        for pid, _ in children(S.proc.pid):
            os.kill(pid, 9)
        case('shell-not-run', lambda: check(not os.path.exists(env.path('pwned')), 'the hostile command line ran'))
        check(S.proc.poll() is None, 'ftd died')
        if os.path.exists(SYNTHVM):
            case('ram-locked', ram_locked, S, port, base)
            case('activate-before-commit', activate_early, S, port, base)
        check(S.proc.poll() is None, 'ftd died')
        check(not FAILURES, '%d case(s) failed: %s' % (len(FAILURES), ' | '.join(FAILURES)))


def ram_locked(S, port, base):
    # After the first Commit the twin's RAM is no longer writable by the primary: a
    # region-1 write then ends the session with a protocol error.
    fp = FakePrimary(port)
    sid = 0x5A11
    fp.control(OPEN_SESSION, open_session(sid, 'ramlock', 64 << 20, base))
    typ, p = fp.reply()
    check(typ == SESSION_READY, 'synthvm twin: expected SessionReady, got %d %r' % (typ, p[:200]))
    fp.sock.sendall(frame(WRITE, 1, b'\xab' * 4096, offset=0))  # sync: allowed
    # A Commit that does not verify (digest 0): Ack Rejected, but the sync is over.
    fp.control(COMMIT, struct.pack('<QQQQQQIQQ', sid, 1, 0, 0, 0, 0, 0, 0, 0) + b'\0' * 16)
    typ, p = fp.reply()
    check(typ == ACK and struct.unpack_from('<QQI', p)[2] == 2, 'expected Ack Rejected, got %d' % typ)
    fp.sock.sendall(frame(WRITE, 1, b'\xcd' * 4096, offset=0))
    fp.control(EPOCH_BEGIN, struct.pack('<QQQ', sid, 2, 0))
    try:  # the standby's transport rejects the write: an Error or the link closes
        typ, p = fp.reply(timeout=10)
        log('region-1 write after the first Commit -> message %d: %s' % (typ, p[:200]))
    except (Failure, OSError) as e:
        log('region-1 write after the first Commit -> %s' % e)
    fp.close()
    wait_for(lambda: 'into region 1, which is not registered' in S.log_text(), 10,
             'the standby to reject a region-1 write after the first Commit')
    wait_for(lambda: not children(S.proc.pid), 10, 'the twin to be destroyed')


def activate_early(S, port, base):
    # Activate before any Commit: refused, the twin destroyed (no children left).
    fp = FakePrimary(port)
    sid = 0xAC71
    fp.control(OPEN_SESSION, open_session(sid, 'early', 64 << 20, base))
    typ, p = fp.reply()
    check(typ == SESSION_READY, 'synthvm twin: expected SessionReady, got %d %r' % (typ, p[:200]))
    twin = struct.unpack_from('<QQq', p)[2]
    log('twin pid %d paused; sending Activate before any Commit' % twin)
    check(any(pid == twin for pid, _ in children(S.proc.pid)), 'twin is not a child of ftd')
    fp.control(ACTIVATE, struct.pack('<Q', sid))
    typ, p = fp.reply()
    check(typ == ACTIVATE_DONE, 'expected ActivateDone, got %d' % typ)
    _, ok = struct.unpack_from('<QI', p)
    text = error_text(p[12:])
    log('ActivateDone ok=%d: %s' % (ok, text))
    check(ok == 0 and 'before any checkpoint was committed' in text, 'Activate before Commit: %d %s' % (ok, text))
    fp.close()
    wait_for(lambda: not children(S.proc.pid), 10, 'the twin to be destroyed')


if __name__ == '__main__':
    t0 = time.time()
    try:
        scenario()
    except Failure as e:
        log('FAIL security: %s' % e)
        sys.exit(1)
    log('PASS security (%.1f s)' % (time.time() - t0))
