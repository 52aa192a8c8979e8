#!/usr/bin/python3
"""Robustness tests for the libvirt hook (tools/hook/ftvm_hook.cc).

Runs the built binary the way libvirtd does (`ftvm DOMAIN PHASE SUBPHASE EXTRA`, domain XML on
stdin) with a temporary configuration (FTVM_HOOK_CONF), state dir and log file, against a fake
ftd: a unix-socket server thread that records every request line and answers (or not).

Usage: test_hook.py PATH/TO/ftvm-hook
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback

HOOK = None
TEMP_DIRS = []
NS = "https://ftvm.dev/xmlns/protection/1"
UUID = "4a0f2c3e-9b1d-4e6f-8a2b-1c3d5e7f9a0b"


def domain_xml(name="vm1", uuid=UUID, protection="peer='standby.example:7410' transport='tcp' "
               "epoch-ms='40' failover='auto'", extra_metadata=""):
    prot = f"<ftvm:protection xmlns:ftvm='{NS}' {protection}/>" if protection is not None else ""
    return f"""<domain type='kvm' id='3'>
  <name>{name}</name>
  <uuid>{uuid}</uuid>
  <metadata>
    <other:thing xmlns:other='https://example.org/other'/>
    {prot}{extra_metadata}
  </metadata>
  <memory unit='KiB'>1048576</memory>
  <devices><emulator>/usr/bin/qemu-system-x86_64</emulator></devices>
</domain>
"""


class FakeFtd:
    """A unix stream server that records request lines. mode: 'answer' | 'refuse' | 'silent' | 'close'."""

    def __init__(self, path, mode="answer"):
        self.path = path
        self.mode = mode
        self.lines = []
        self.connections = 0
        self.lock = threading.Lock()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(16)
        self.sock.settimeout(0.1)
        self.stop = threading.Event()
        self.held = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            with self.lock:
                self.connections += 1
            threading.Thread(target=self._client, args=(conn,), daemon=True).start()

    def _client(self, conn):
        conn.settimeout(5)
        buf = b""
        try:
            while b"\n" not in buf:
                d = conn.recv(65536)
                if not d:
                    break
                buf += d
        except OSError:
            pass
        line = buf.split(b"\n", 1)[0].decode("utf-8", "replace")
        with self.lock:
            self.lines.append(line)
        if self.mode == "answer":
            conn.sendall(b'{"ok":true,"message":"protecting vm1 asynchronously"}\n')
        elif self.mode == "refuse":
            conn.sendall(b'{"ok":false,"code":"refused","error":"guest RAM is not a shared memfd"}\n')
        elif self.mode == "silent":
            self.held.append(conn)  # keep it open, never answer
            return
        conn.close()

    def wait_lines(self, n, timeout=2.0):
        end = time.time() + timeout
        while time.time() < end:
            with self.lock:
                if len(self.lines) >= n:
                    return list(self.lines)
            time.sleep(0.01)
        with self.lock:
            return list(self.lines)

    def close(self):
        self.stop.set()
        self.sock.close()
        self.thread.join(2)
        for c in self.held:
            c.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


class Env:
    def __init__(self, timeout_ms=300, extra_conf=""):
        self.dir = tempfile.mkdtemp(prefix="ftvm-hook-")
        TEMP_DIRS.append(self.dir)
        self.sock = os.path.join(self.dir, "ftd.sock")
        self.state = os.path.join(self.dir, "state")
        self.log = os.path.join(self.dir, "hook.log")
        os.makedirs(os.path.join(self.state, "failed-over"))
        self.conf = os.path.join(self.dir, "hook.conf")
        with open(self.conf, "w") as f:
            f.write(f"# test configuration\ncontrol={self.sock}\nstate_dir={self.state}\nlog={self.log}\n"
                    f"timeout_ms={timeout_ms}\n{extra_conf}")

    def run(self, args, stdin="", conf=None):
        env = {"PATH": "/usr/bin:/bin", "FTVM_HOOK_CONF": conf or self.conf}
        t0 = time.monotonic()
        p = subprocess.run([HOOK] + args, input=stdin.encode(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           env=env, timeout=20)
        return p.returncode, p.stdout.decode(), p.stderr.decode(), time.monotonic() - t0

    def logtext(self):
        try:
            with open(self.log) as f:
                return f.read()
        except FileNotFoundError:
            return ""


def check(cond, what):
    if not cond:
        raise AssertionError(what)


def expected_line(phase, protection=True, name="vm1"):
    obj = {"cmd": "hook", "phase": phase, "domain": name, "uuid": UUID}
    if protection:
        obj["protection"] = {"peer": "standby.example:7410", "transport": "tcp", "epoch_ms": 40,
                             "failover": "auto"}
    return json.dumps(obj, separators=(",", ":"))


# ---------------------------------------------------------------------------------------------

def test_started_sends_exact_json():
    e = Env()
    ftd = FakeFtd(e.sock)
    try:
        rc, out, err, dt = e.run(["vm1", "started", "begin", "-"], domain_xml())
        check(rc == 0, f"exit {rc}, stderr {err!r}")
        check(dt < 1.0, f"took {dt:.3f} s")
        check(out == "", f"stdout must stay empty (libvirt reads it for some phases): {out!r}")
        lines = ftd.wait_lines(1)
        check(lines == [expected_line("started")], f"ftd got {lines!r}\nexpected {expected_line('started')!r}")
        log = e.logtext()
        check("vm1 started: sent started to ftd" in log and "ftd accepted" in log, f"log: {log!r}")
    finally:
        ftd.close()


def test_reconnect_sends_full_json_with_defaults():
    e = Env()
    ftd = FakeFtd(e.sock)
    try:
        rc, _, err, _ = e.run(["vm1", "reconnect", "begin", "-"], domain_xml(protection="peer='10.0.0.2'"))
        check(rc == 0, f"exit {rc}, stderr {err!r}")
        lines = ftd.wait_lines(1)
        exp = json.dumps({"cmd": "hook", "phase": "reconnect", "domain": "vm1", "uuid": UUID,
                          "protection": {"peer": "10.0.0.2", "transport": "auto", "epoch_ms": 25,
                                         "failover": "auto"}}, separators=(",", ":"))
        check(lines == [exp], f"ftd got {lines!r}, expected {exp!r}")
    finally:
        ftd.close()


def test_stopped_and_release_send_short_message():
    e = Env()
    ftd = FakeFtd(e.sock)
    try:
        for i, phase in enumerate(["stopped", "release"]):
            rc, _, err, dt = e.run(["vm1", phase, "end", "-"], domain_xml())
            check(rc == 0 and dt < 1.0, f"{phase}: exit {rc} in {dt:.3f} s, stderr {err!r}")
            lines = ftd.wait_lines(i + 1)
            check(lines[i] == expected_line(phase, protection=False), f"{phase}: ftd got {lines!r}")
    finally:
        ftd.close()


def test_ftd_down():
    e = Env()  # no fake ftd: nothing listens at the socket path
    rc, _, err, dt = e.run(["vm1", "started", "begin", "-"], domain_xml())
    check(rc == 0, f"exit {rc}, stderr {err!r}")
    check(dt < 1.0, f"took {dt:.3f} s")
    log = e.logtext()
    check(f"ftd not reachable at {e.sock} (connect: No such file or directory)" in log
          and "domain runs unprotected; ftd protects it when it starts" in log, f"log: {log!r}")


def test_ftd_socket_without_listener():
    e = Env()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(e.sock)  # bound, never listening: a stale socket left by a dead ftd
    try:
        rc, _, _, dt = e.run(["vm1", "started", "begin", "-"], domain_xml())
        check(rc == 0 and dt < 1.0, f"exit {rc} in {dt:.3f} s")
        check("Connection refused" in e.logtext(), f"log: {e.logtext()!r}")
    finally:
        s.close()


def test_ftd_silent():
    e = Env(timeout_ms=300)
    ftd = FakeFtd(e.sock, mode="silent")
    try:
        rc, _, err, dt = e.run(["vm1", "started", "begin", "-"], domain_xml())
        check(rc == 0, f"exit {rc}, stderr {err!r}")
        check(0.25 <= dt < 1.5, f"expected about 300 ms, took {dt:.3f} s")
        check(ftd.wait_lines(1) == [expected_line("started")], "request not received")
        check("did not answer within 300 ms" in e.logtext(), f"log: {e.logtext()!r}")
    finally:
        ftd.close()


def test_ftd_closes_without_answer():
    e = Env()
    ftd = FakeFtd(e.sock, mode="close")
    try:
        rc, _, _, dt = e.run(["vm1", "started", "begin", "-"], domain_xml())
        check(rc == 0 and dt < 1.0, f"exit {rc} in {dt:.3f} s")
        check("closed the connection without an answer" in e.logtext(), f"log: {e.logtext()!r}")
    finally:
        ftd.close()


def test_ftd_refuses():
    e = Env()
    ftd = FakeFtd(e.sock, mode="refuse")
    try:
        rc, _, _, _ = e.run(["vm1", "started", "begin", "-"], domain_xml())
        check(rc == 0, f"exit {rc}")
        log = e.logtext()
        check("ftd refused (refused): guest RAM is not a shared memfd" in log, f"log: {log!r}")
    finally:
        ftd.close()


def test_malformed_xml():
    e = Env()
    ftd = FakeFtd(e.sock)
    try:
        for xml in ["<domain><name>vm1</name><uuid>", "not xml at all", "<foo/>",
                    "<!DOCTYPE d [<!ENTITY x SYSTEM 'file:///etc/passwd'>]><domain><name>&x;</name></domain>",
                    "\x00\x01\x02binary"]:
            rc, out, err, dt = e.run(["vm1", "started", "begin", "-"], xml)
            check(rc == 0 and dt < 1.0, f"{xml!r}: exit {rc} in {dt:.3f} s, stderr {err!r}")
            check(out == "" and err == "", f"{xml!r}: output {out!r} {err!r}")
        log = e.logtext()
        check(log.count("; ignored") >= 4 and "malformed domain XML on stdin (libxml2: " in log, f"log: {log!r}")
        check(ftd.connections == 0, f"{ftd.connections} connections made for malformed XML")
    finally:
        ftd.close()


def test_empty_stdin():
    e = Env()
    for phase in ["started", "prepare", "stopped"]:
        rc, _, err, dt = e.run(["vm1", phase, "begin", "-"], "")
        check(rc == 0 and dt < 1.0, f"{phase}: exit {rc} in {dt:.3f} s, stderr {err!r}")
    check("empty domain XML on stdin; ignored" in e.logtext(), f"log: {e.logtext()!r}")


def test_unknown_and_other_phases():
    e = Env()
    ftd = FakeFtd(e.sock)
    try:
        rc, _, _, _ = e.run(["vm1", "foo", "bar", "-"], domain_xml())
        check(rc == 0, f"unknown phase: exit {rc}")
        check("unknown phase 'foo'" in e.logtext(), f"log: {e.logtext()!r}")
        for phase, sub in [("start", "begin"), ("migrate", "begin"), ("restore", "begin"), ("attach", "begin"),
                           ("prepare", "end")]:
            rc, out, _, _ = e.run(["vm1", phase, sub, "-"], domain_xml())
            check(rc == 0 and out == "", f"{phase}: exit {rc}, stdout {out!r}")
        rc, _, _, _ = e.run([], "")
        check(rc == 0, f"no arguments: exit {rc}")
        rc, _, _, _ = e.run(["vm1"], "")
        check(rc == 0, f"one argument: exit {rc}")
        check(ftd.connections == 0, f"{ftd.connections} connections made")
    finally:
        ftd.close()


def test_domain_without_element():
    e = Env()
    ftd = FakeFtd(e.sock)
    try:
        for phase in ["started", "reconnect", "stopped", "release", "prepare"]:
            rc, _, err, dt = e.run(["plain", phase, "begin", "-"], domain_xml(name="plain", protection=None))
            check(rc == 0 and dt < 1.0, f"{phase}: exit {rc} in {dt:.3f} s, stderr {err!r}")
        # An element of another namespace with the same local name does not count.
        rc, _, _, _ = e.run(["plain", "started", "begin", "-"],
                            domain_xml(name="plain", protection=None,
                                       extra_metadata="<x:protection xmlns:x='https://example.org/x' peer='h'/>"))
        check(rc == 0, f"exit {rc}")
        time.sleep(0.1)
        check(ftd.connections == 0, f"{ftd.connections} connections made for an unprotected domain")
        check(e.logtext() == "", f"log lines for an unprotected domain: {e.logtext()!r}")
    finally:
        ftd.close()


def test_prepare_with_marker_refuses():
    e = Env()
    marker = os.path.join(e.state, "failed-over", UUID)
    open(marker, "w").close()
    rc, out, err, dt = e.run(["vm1", "prepare", "begin", "-"], domain_xml())
    check(rc == 1, f"exit {rc}, expected 1")
    check(dt < 1.0, f"took {dt:.3f} s")
    check(err.count("\n") == 1, f"stderr must be one line: {err!r}")
    check(marker in err and "ftctl release vm1" in err and "delete" in err, f"stderr: {err!r}")
    check("start refused" in e.logtext(), f"log: {e.logtext()!r}")
    # Upper-case UUID in the XML maps to the same (lower-case) marker.
    rc, _, _, _ = e.run(["vm1", "prepare", "begin", "-"], domain_xml(uuid=UUID.upper()))
    check(rc == 1, f"upper-case uuid: exit {rc}")
    # Other phases are not refused by the marker.
    rc, _, _, _ = e.run(["vm1", "stopped", "end", "-"], domain_xml())
    check(rc == 0, f"stopped with marker: exit {rc}")


def test_prepare_with_protected_marker_refuses():
    # Left behind when ftd or the host died while the domain was protected: the standby has
    # most likely resumed the twin.
    e = Env()
    os.makedirs(os.path.join(e.state, "protected"))
    marker = os.path.join(e.state, "protected", UUID)
    open(marker, "w").close()
    rc, out, err, dt = e.run(["vm1", "prepare", "begin", "-"], domain_xml())
    check(rc == 1, f"exit {rc}, expected 1")
    check(marker in err and "died" in err and "ftctl release vm1" in err, f"stderr: {err!r}")
    os.unlink(marker)
    rc, _, _, _ = e.run(["vm1", "prepare", "begin", "-"], domain_xml())
    check(rc == 0, f"after removing the marker: exit {rc}")


def test_prepare_marker_unreadable_refuses():
    # The marker cannot be checked (here: STATE_DIR/protected is a file, so lstat fails with
    # ENOTDIR; an unreadable state dir fails alike): the start is refused, not allowed.
    e = Env()
    open(os.path.join(e.state, "protected"), "w").close()
    rc, out, err, dt = e.run(["vm1", "prepare", "begin", "-"], domain_xml())
    check(rc == 1, f"exit {rc}, expected 1 (fail closed)")
    check(err.count("\n") == 1 and "cannot check" in err and e.state in err, f"stderr: {err!r}")
    check("start refused" in e.logtext(), f"log: {e.logtext()!r}")
    # Other phases are not affected.
    rc, _, _, _ = e.run(["vm1", "stopped", "end", "-"], domain_xml())
    check(rc == 0, f"stopped: exit {rc}")


def test_prepare_without_marker():
    e = Env()
    rc, out, err, dt = e.run(["vm1", "prepare", "begin", "-"], domain_xml())
    check(rc == 0 and err == "" and dt < 1.0, f"exit {rc} in {dt:.3f} s, stderr {err!r}")
    # A marker for another domain does not matter; a hostile uuid is not used as a path.
    open(os.path.join(e.state, "failed-over", "11111111-2222-3333-4444-555555555555"), "w").close()
    rc, _, _, _ = e.run(["vm1", "prepare", "begin", "-"], domain_xml())
    check(rc == 0, f"other domain's marker: exit {rc}")
    rc, _, _, _ = e.run(["vm1", "prepare", "begin", "-"], domain_xml(uuid="../../../etc/passwd"))
    check(rc == 0, f"hostile uuid: exit {rc}")


def test_invalid_attributes():
    e = Env()
    ftd = FakeFtd(e.sock)
    try:
        cases = ["peer='h' epoch-ms='0'", "peer='h' epoch-ms='10001'", "peer='h' epoch-ms='25ms'",
                 "peer='h' transport='udp'", "peer='h' failover='sometimes'", "transport='tcp'", "peer=''"]
        for attrs in cases:
            rc, _, err, dt = e.run(["vm1", "started", "begin", "-"], domain_xml(protection=attrs))
            check(rc == 0 and dt < 1.0, f"{attrs}: exit {rc} in {dt:.3f} s, stderr {err!r}")
        time.sleep(0.1)
        check(ftd.connections == 0, f"{ftd.connections} connections made for invalid elements")
        log = e.logtext()
        check(log.count("invalid ftvm protection element") == len(cases), f"log: {log!r}")
        check("epoch-ms='0' is not an integer in 1..10000" in log, f"log: {log!r}")
        check("attribute peer" in log and "transport='udp'" in log, f"log: {log!r}")
    finally:
        ftd.close()


def test_reprotect_attribute():
    # reprotect= (issue 11): passed to ftd only when not the default (absent = auto); a bad value
    # makes the element invalid, naming the attribute and the accepted values.
    e = Env()
    ftd = FakeFtd(e.sock)
    try:
        rc, _, err, _ = e.run(["vm1", "started", "begin", "-"],
                              domain_xml(protection="peer='10.0.0.2' reprotect='manual'"))
        check(rc == 0, f"exit {rc}, stderr {err!r}")
        lines = ftd.wait_lines(1)
        exp = json.dumps({"cmd": "hook", "phase": "started", "domain": "vm1", "uuid": UUID,
                          "protection": {"peer": "10.0.0.2", "transport": "auto", "epoch_ms": 25,
                                         "failover": "auto", "reprotect": "manual"}}, separators=(",", ":"))
        check(lines == [exp], f"ftd got {lines!r}, expected {exp!r}")
        rc, _, _, _ = e.run(["vm1", "started", "begin", "-"], domain_xml(protection="peer='h' reprotect='auto'"))
        lines = ftd.wait_lines(2)
        check(rc == 0 and len(lines) == 2 and "reprotect" not in lines[1], f"reprotect='auto': ftd got {lines!r}")
        rc, _, _, _ = e.run(["vm1", "started", "begin", "-"], domain_xml(protection="peer='h' reprotect='later'"))
        check(rc == 0, f"exit {rc}")
        time.sleep(0.1)
        check(ftd.connections == 2, f"{ftd.connections} connections: an invalid element reached ftd")
        log = e.logtext()
        check("invalid ftvm protection element (reprotect='later' is not accepted (use auto" in log and
              "manual" in log, f"log: {log!r}")
    finally:
        ftd.close()


def test_config_problems():
    e = Env(extra_conf="bogus line\nfrobnicate=1\ntimeout_ms=abc\n")
    rc, _, _, _ = e.run(["vm1", "started", "begin", "-"], domain_xml())
    check(rc == 0, f"exit {rc}")
    log = e.logtext()
    check("expected key=value" in log and "unknown key 'frobnicate'" in log and "timeout_ms 'abc'" in log,
          f"log: {log!r}")
    # Missing configuration file: defaults (the default log may not be writable here: stderr is fine).
    rc, _, _, _ = e.run(["vm1", "foo", "x", "-"], "", conf=os.path.join(e.dir, "missing.conf"))
    check(rc == 0, f"missing conf: exit {rc}")


def test_log_unwritable_falls_back_to_stderr():
    e = Env()
    conf = os.path.join(e.dir, "bad.conf")
    with open(conf, "w") as f:
        f.write(f"control={e.sock}\nlog={e.dir}/no/such/dir/hook.log\n")
    rc, _, err, _ = e.run(["vm1", "started", "begin", "-"], domain_xml(), conf=conf)
    check(rc == 0, f"exit {rc}")
    check("cannot open log file" in err and "ftd not reachable" in err, f"stderr: {err!r}")


def test_large_and_odd_input():
    e = Env()
    ftd = FakeFtd(e.sock)
    try:
        big = domain_xml(extra_metadata="<x:pad xmlns:x='urn:x'>" + "A" * (4 << 20) + "</x:pad>")
        rc, _, _, dt = e.run(["vm1", "started", "begin", "-"], big)
        check(rc == 0 and dt < 2.0, f"4 MiB XML: exit {rc} in {dt:.3f} s")
        check(len(ftd.wait_lines(1)) == 1, "4 MiB XML: request not sent")
        # Names with quotes and newlines are escaped in JSON and in the log.
        rc, _, _, _ = e.run(["v\"m", "started", "begin", "-"], domain_xml(name="v&quot;m\u00e9"))
        lines = ftd.wait_lines(2)
        check(len(lines) == 2 and json.loads(lines[1])["domain"] == "v\"m\u00e9", f"ftd got {lines!r}")
    finally:
        ftd.close()


def main():
    global HOOK
    if len(sys.argv) != 2:
        print(__doc__)
        return 2
    HOOK = os.path.abspath(sys.argv[1])
    tests = [(n, f) for n, f in globals().items() if n.startswith("test_") and callable(f)]
    failed = 0
    for name, fn in tests:
        t0 = time.monotonic()
        try:
            fn()
            print(f"PASS {name} ({time.monotonic() - t0:.2f} s)")
        except Exception:
            failed += 1
            print(f"FAIL {name}")
            traceback.print_exc()
    print(f"{len(tests) - failed}/{len(tests)} passed")
    if not failed:
        for d in TEMP_DIRS:
            shutil.rmtree(d, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
