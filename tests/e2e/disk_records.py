#!/usr/bin/python3
"""Host side of the guest disk record writer (tests/guest/guest-init.sh, ftvm_disk=vdX).

The guest appends numbered records to /records on an ext4 filesystem the host made with
make_fs(). Record i (1, 2, ...) sits at offset (i-1)*4096 and is exactly 4096 bytes:
  header: "REC <i> <md5 hex of body>" padded with spaces to 63 bytes, then "\\n" (64 bytes)
  body:   ("ftvm-record-%d\\n" % i) repeated, cut at 4032 bytes
After every K records the guest fsyncs and prints "DISK synced <i>": records 1..i must then
survive anything (failover included). Stdlib only; needs e2fsprogs (mkfs.ext4, e2fsck, debugfs).

Usage: disk_records.py IMAGE [--upto N] [--replay]
  --upto N   records 1..N must be present and intact (e.g. the last "DISK synced N")
  --replay   replay the ext4 journal first (on a sparse copy; for images of a guest that did not
             unmount, e.g. killed without "disk-stop")
Exit status 0 when verify() finds no problem.
"""
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile

REC_SIZE = 4096
HDR_SIZE = 64
BODY_SIZE = REC_SIZE - HDR_SIZE
RECORDS_PATH = '/records'
OK = 'ok'
MISSING = 'missing'       # all-zero 4096 bytes (a hole or never written): not a "present" record

_SBIN = ['/usr/sbin', '/sbin']


def _tool(name):
    p = shutil.which(name)
    if p:
        return p
    for d in _SBIN:
        if os.access(os.path.join(d, name), os.X_OK):
            return os.path.join(d, name)
    raise FileNotFoundError('%s not found (apt-get install e2fsprogs)' % name)


def body(i):
    """The deterministic body of record i (bytes, BODY_SIZE long)."""
    unit = b'ftvm-record-%d\n' % i
    return (unit * (BODY_SIZE // len(unit) + 1))[:BODY_SIZE]


def record(i):
    """The full 4096 bytes the guest writes for record i."""
    b = body(i)
    hdr = ('REC %d %s' % (i, hashlib.md5(b).hexdigest())).encode().ljust(HDR_SIZE - 1) + b'\n'
    return hdr + b


def make_fs(path, size_mib):
    """Creates a sparse raw image of size_mib MiB with an ext4 filesystem (4 KiB blocks, inode
    tables and journal initialised now, so nothing is written lazily by the guest later)."""
    with open(path, 'wb') as f:
        f.truncate(size_mib * 1024 * 1024)
    subprocess.run([_tool('mkfs.ext4'), '-F', '-q', '-b', '4096',
                    '-E', 'lazy_itable_init=0,lazy_journal_init=0', path],
                   check=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _replayed_copy(path, tmpdir):
    """Sparse copy of path with its journal replayed (e2fsck -E journal_only)."""
    cp = os.path.join(tmpdir, 'replayed.img')
    subprocess.run(['cp', '--sparse=always', path, cp], check=True)
    r = subprocess.run([_tool('e2fsck'), '-y', '-E', 'journal_only', cp],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if r.returncode not in (0, 1):
        raise RuntimeError('journal replay failed (rc %d): %s' % (r.returncode, r.stdout.strip()))
    return cp


def fsck(path, replay=False):
    """e2fsck -fn (read-only, forced). Returns (clean, output). With replay=True the journal is
    replayed first on a temporary copy (an image whose guest never unmounted needs that)."""
    with tempfile.TemporaryDirectory(prefix='ftvm-fsck.') as td:
        img = _replayed_copy(path, td) if replay else path
        r = subprocess.run([_tool('e2fsck'), '-fn', img],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = r.stdout
    clean = r.returncode == 0 and 'needs_recovery' not in out and 'skipping journal recovery' not in out
    return clean, '(rc %d)\n%s' % (r.returncode, out)


class RecordsError(Exception):
    pass


def _dump(path, replay=False):
    with tempfile.TemporaryDirectory(prefix='ftvm-records.') as td:
        img = _replayed_copy(path, td) if replay else path
        out = os.path.join(td, 'records')
        r = subprocess.run([_tool('debugfs'), '-R', 'dump %s %s' % (RECORDS_PATH, out), img],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if not os.path.exists(out):
            raise RecordsError('no %s in %s: %s' % (RECORDS_PATH, path, r.stdout.strip()))
        with open(out, 'rb') as f:
            return f.read()


def parse(data):
    """Checks every 4096-byte record of a records file's contents: dict i -> OK, MISSING (all
    zero) or a string saying what is wrong (a trailing partial record gets a key too)."""
    res = {}
    n = (len(data) + REC_SIZE - 1) // REC_SIZE
    for i in range(1, n + 1):
        rec = data[(i - 1) * REC_SIZE:i * REC_SIZE]
        if len(rec) < REC_SIZE:
            res[i] = 'bad: partial record (%d bytes; file size %d)' % (len(rec), len(data))
            continue
        if rec.count(0) == REC_SIZE:
            res[i] = MISSING
            continue
        hdr, b = rec[:HDR_SIZE], rec[HDR_SIZE:]
        f = hdr.rstrip(b'\n ').split(b' ')
        if hdr[-1:] != b'\n' or len(f) != 3 or f[0] != b'REC' or not f[1].isdigit():
            res[i] = 'bad: header %r' % hdr.rstrip()
            continue
        num, md5 = int(f[1]), f[2].decode(errors='replace')
        probs = []
        if num != i:
            probs.append('header says record %d' % num)
        got = hashlib.md5(b).hexdigest()
        if md5 != got:
            probs.append('md5 in header %s != md5 of body %s' % (md5, got))
        if b != body(i):
            exp = body(i)
            at = next(k for k in range(BODY_SIZE) if b[k] != exp[k])
            probs.append('body differs from expected at byte %d (record offset %d): %r != %r'
                         % (at, HDR_SIZE + at, b[at:at + 16], exp[at:at + 16]))
        res[i] = OK if not probs else 'bad: ' + '; '.join(probs)
    return res


def read_records(path, replay=False):
    """Extracts /records with debugfs and returns parse() of it: dict i -> OK / MISSING / reason.
    Raises RecordsError when the file does not exist."""
    return parse(_dump(path, replay))


def verify(path, must_have_upto, replay=False):
    """fsck clean AND records 1..must_have_upto present and intact AND every record present in
    the file intact. Returns a list of problems (empty = good)."""
    probs = []
    clean, out = fsck(path, replay)
    if not clean:
        probs.append('fsck not clean: ' + out.strip().replace('\n', ' | '))
    try:
        recs = read_records(path, replay)
    except RecordsError as e:
        recs = None
        if must_have_upto > 0:
            probs.append(str(e).strip().replace('\n', ' | '))
    if recs is None:
        return probs
    end = max(recs, default=0)
    if end < must_have_upto:
        probs.append('records %d..%d: missing (the file ends after record %d)'
                     % (end + 1, must_have_upto, end))
    i = 1
    while i <= min(end, must_have_upto):
        st = recs[i]
        if st == MISSING:                   # collapse runs of zero records
            j = i
            while j + 1 <= min(end, must_have_upto) and recs[j + 1] == MISSING:
                j += 1
            probs.append('records %d..%d: missing (all-zero blocks)' % (i, j))
            i = j
        elif st != OK:
            probs.append('record %d: %s' % (i, st))
        i += 1
    for i, st in sorted(recs.items()):
        if i > must_have_upto and st not in (OK, MISSING):
            probs.append('record %d: %s' % (i, st))
    return probs


def summary(recs):
    """(records ok, highest i with 1..i all ok, highest ok i)."""
    ok = [i for i, s in recs.items() if s == OK]
    contig = 0
    while recs.get(contig + 1) == OK:
        contig += 1
    return len(ok), contig, max(ok, default=0)


def main(argv):
    import argparse
    ap = argparse.ArgumentParser(description='Verify the guest disk records in an ext4 image.')
    ap.add_argument('image')
    ap.add_argument('--upto', type=int, default=0,
                    help='records 1..N must be present and intact (last "DISK synced N")')
    ap.add_argument('--replay', action='store_true',
                    help='replay the ext4 journal first (on a copy)')
    a = ap.parse_args(argv)
    probs = verify(a.image, a.upto, a.replay)
    try:
        n, contig, top = summary(read_records(a.image, a.replay))
        print('disk_records: %s: %d records ok, 1..%d contiguous, highest ok %d'
              % (a.image, n, contig, top))
    except RecordsError:
        pass
    for p in probs:
        print('disk_records: PROBLEM: ' + p)
    print('disk_records: %s (must have 1..%d, fsck%s)'
          % ('OK' if not probs else 'FAILED (%d problems)' % len(probs), a.upto,
             ' after journal replay' if a.replay else ''))
    return 0 if not probs else 1


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
