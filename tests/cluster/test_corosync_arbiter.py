#!/usr/bin/env python3
"""corosync_arbiter_lab (CTest label arbiter): the corosync arbiter against a real two-node
corosync 3 cluster with a qnetd quorum device (tests/cluster/corosync-lab.sh).

One ftvm-arbiter-probe per node (same CorosyncArbiter code as `ftd --arbiter corosync`) samples
may_activate / may_run_alone every 50 ms about the other node: n1 finds its peer through the
nodelist (peer host 10.213.0.2), n2 is given --peer-nodeid 1. Scenarios:
  A  all up: both quorate, members 1 2, both answer Wait
  B  cut n2: n1 answers Yes to both questions after the margin, n2 Fence to may_run_alone and
     never Yes to may_activate
  C  heal: back to A
  D  qnetd down, both nodes up: still quorate, Wait
  E  cut n2 while qnetd is down: neither says Yes (both lose quorum)
  F  heal, qnetd back: back to A
  G  corosync stopped on n1 under the probe: n1 answers Wait (unreachable, unhealthy), n2 (now
     alone with qnetd's vote) says Yes after the margin; corosync back: n1 reconnects, back to A
Throughout: at no sampled moment do both nodes answer Yes (to either question).
Usage: test_corosync_arbiter.py LAB_SCRIPT PROBE_BINARY. Exit 77 (skip) without root or corosync.
"""
import os
import shutil
import subprocess
import sys
import tempfile
import time

SETTLE_MS = 1000
INTERVAL_MS = 50


def now_ms():
    return int(time.time() * 1000)


class Probe:
    def __init__(self, lab, labdir, node, probe, args, logdir):
        self.node = node
        self.path = os.path.join(logdir, f"probe-{node}.log")
        self.out = open(self.path, "w")
        # `exec` ends in nsenter's exec of the probe: proc.pid is the probe's PID.
        self.proc = subprocess.Popen([lab, "--dir", labdir, "exec", node, probe, "--settle-ms", str(SETTLE_MS),
                                      "--interval-ms", str(INTERVAL_MS)] + args,
                                     stdout=self.out, stderr=subprocess.STDOUT)

    def samples(self):
        res = []
        with open(self.path) as f:
            for line in f:
                parts = line.rstrip("\n").split(" ", 5)
                if len(parts) < 6 or not parts[0].isdigit():
                    continue
                kv = dict(p.split("=", 1) for p in parts[1:5])
                res.append({"t": int(parts[0]), "activate": kv["activate"], "run_alone": kv["run_alone"],
                            "healthy": kv["healthy"], "peer": kv["peer"], "holds": parts[5][len("holds="):]})
        return res

    def last(self):
        s = self.samples()
        return s[-1] if s else None

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.out.close()


def wait_for(what, pred, timeout_s):
    end = time.time() + timeout_s
    while time.time() < end:
        r = pred()
        if r:
            return r
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s} s waiting for: {what}")


def normal(s):
    return (s is not None and s["holds"].startswith("quorate (3 votes") and "members 1 2;" in s["holds"]
            and s["activate"] == "wait" and s["run_alone"] == "wait" and s["healthy"] == "1")


def main():
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    lab, probe = sys.argv[1], sys.argv[2]
    if os.geteuid() != 0:
        print("SKIP: needs root (network namespaces)")
        return 77
    for b in ("corosync", "corosync-qdevice", "corosync-qnetd"):
        if not shutil.which(b):
            print(f"SKIP: {b} not installed (scripts/install-deps.sh)")
            return 77
    labdir = tempfile.mkdtemp(prefix="ftvm-corosync-lab.")
    probes = []
    ok = False
    try:
        t = now_ms()
        subprocess.run([lab, "--dir", labdir, "up"], check=True)
        print(f"lab up in {now_ms() - t} ms")

        def act(*a):
            r = subprocess.run([lab, "--dir", labdir] + list(a), check=True, capture_output=True, text=True)
            return int(r.stdout.split()[0])

        n1 = Probe(lab, labdir, "n1", probe, ["--peer-host", "10.213.0.2"], labdir)
        probes.append(n1)
        n2 = Probe(lab, labdir, "n2", probe, ["--peer-host", "10.213.0.1", "--peer-nodeid", "1"], labdir)
        probes.append(n2)

        # A: all up
        wait_for("both probes: quorate, 3 votes, members 1 2, Wait",
                 lambda: normal(n1.last()) and normal(n2.last()), 20)
        assert n1.last()["peer"] == "2", f"n1 resolved its peer 10.213.0.2 to node {n1.last()['peer']}, expected 2"
        assert n2.last()["peer"] == "1"
        print("A all up: both quorate with members 1 2, answering wait/wait")

        # B: cut n2
        t_cut = act("cut", "n2")
        s_yes = wait_for("n1 answers Yes to both questions",
                         lambda: next((s for s in n1.samples() if s["t"] >= t_cut and s["activate"] == "yes"
                                       and s["run_alone"] == "yes"), None), 40)
        s_fence = wait_for("n2 answers Fence to may_run_alone",
                           lambda: next((s for s in n2.samples() if s["t"] >= t_cut and s["run_alone"] == "fence"),
                                        None), 40)
        time.sleep(2)
        first_yes = min(s["t"] for s in n1.samples() if s["t"] >= t_cut and "yes" in (s["activate"], s["run_alone"]))
        print(f"B cut n2: n1 Yes after {first_yes - t_cut} ms (both questions: {s_yes['t'] - t_cut} ms), "
              f"n2 Fence after {s_fence['t'] - t_cut} ms; n1 holds: {n1.last()['holds']}; n2 holds: {n2.last()['holds']}")
        assert s_fence["t"] < first_yes, (
            f"the loser was told to fence at {s_fence['t']} only after the winner said Yes at {first_yes}")
        bad = [s for s in n2.samples() if s["t"] >= t_cut and s["activate"] == "yes"]
        assert not bad, f"n2 (cut off) answered Yes to may_activate: {bad[0]}"
        assert n1.last()["run_alone"] == "yes" and n2.last()["run_alone"] == "fence"

        # C: heal
        t_heal = act("heal", "n2")
        wait_for("both back to normal after heal", lambda: normal(n1.last()) and normal(n2.last()), 40)
        print(f"C heal: both back to quorate/3 votes/wait after {now_ms() - t_heal} ms")

        # D: qnetd down, both up: still quorate (2 of 3 votes), Wait
        t_q = act("qnetd-stop")
        time.sleep(6)  # > qdevice timeout (3 s)
        for p in (n1, n2):
            s = p.last()
            assert s["holds"].startswith("quorate") and s["activate"] == "wait" and s["run_alone"] == "wait", (
                f"{p.node} with qnetd down {now_ms() - t_q} ms: {s}")
        print(f"D qnetd down: both still quorate: n1 {n1.last()['holds']}")

        # E: cut n2 while qnetd is down: neither quorate, neither says Yes
        t_cut2 = act("cut", "n2")
        wait_for("both nodes NOT quorate", lambda: all(p.last()["holds"].startswith("NOT quorate") for p in (n1, n2)), 30)
        time.sleep(3)
        for p in (n1, n2):
            bad = [s for s in p.samples() if s["t"] >= t_cut2 and "yes" in (s["activate"], s["run_alone"])]
            assert not bad, f"{p.node} said Yes with qnetd down and the cluster split: {bad[0]}"
        print(f"E cut n2 with qnetd down: neither says Yes; n1 {n1.last()['holds']} -> run_alone={n1.last()['run_alone']}")

        # F: heal, qnetd back
        act("heal", "n2")
        t_q2 = act("qnetd-start")
        wait_for("both back to normal after heal and qnetd start", lambda: normal(n1.last()) and normal(n2.last()), 40)
        print(f"F heal + qnetd start: normal after {now_ms() - t_q2} ms")

        # G: corosync stopped under the client, then started again
        t_stop = act("corosync-stop", "n1")
        wait_for("n1 reports corosync unreachable",
                 lambda: n1.last()["holds"].startswith("corosync unreachable") and n1.last()["healthy"] == "0", 20)
        print(f"G corosync stopped on n1: unreachable after {now_ms() - t_stop} ms: {n1.last()['holds'][:90]}")
        s_g = wait_for("n2 (alone with qnetd) answers Yes",
                       lambda: next((s for s in n2.samples() if s["t"] >= t_stop and s["activate"] == "yes"), None), 40)
        print(f"G n2 Yes {s_g['t'] - t_stop} ms after corosync stopped on n1")
        t_start = act("corosync-start", "n1")
        wait_for("both back to normal after corosync restart", lambda: normal(n1.last()) and normal(n2.last()), 40)
        print(f"G corosync started on n1: back to normal after {now_ms() - t_start} ms")
        bad = [s for s in n1.samples() if t_stop <= s["t"] < t_start and (s["activate"], s["run_alone"]) != ("wait", "wait")]
        assert not bad, f"n1 without corosync answered other than Wait: {bad[0]}"

        # Never both Yes at once: a sample's answer holds until that node's next sample.
        def yes_intervals(p):
            s = p.samples()
            return [(a["t"], b["t"]) for a, b in zip(s, s[1:]) if "yes" in (a["activate"], a["run_alone"])]
        y1, y2 = yes_intervals(n1), yes_intervals(n2)
        overlaps = [(a, b) for a in y1 for b in y2 if a[0] < b[1] and b[0] < a[1]]
        assert not overlaps, f"both nodes answered Yes at once: n1 {overlaps[0][0]}, n2 {overlaps[0][1]}"
        print(f"no overlap: n1 said Yes in {len(y1)} samples, n2 in {len(y2)}")
        ok = True
        return 0
    finally:
        for p in probes:
            p.stop()
        subprocess.run([lab, "--dir", labdir, "down"])
        if ok:
            shutil.rmtree(labdir, ignore_errors=True)
        else:
            print(f"FAILED: logs kept in {labdir}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
