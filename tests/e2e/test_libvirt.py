#!/usr/bin/python3
"""libvirt integration (CTest label `libvirt`, issue 6): real libvirtd (scripts/libvirtd.sh starts
it with ftvm's hook installed), real `type='qemu'` domains booting the test guest, two real ftd
daemons on loopback; the standby's twin is a libvirt domain of the same libvirtd, named
<domain>-twin (--twin-name-suffix) because both "hosts" share it.

  hook-failover  a domain (with an ext4 disk the guest writes records to) defined with the ftvm
                 metadata element and started with `virsh start` becomes protected with no other
                 command and stays protected across a libvirtd restart; `virsh destroy` of the
                 primary makes the twin domain run on the disk replica (virsh list shows it, the
                 tick counter continues, fsck and every record check out); the primary host then
                 refuses to start its copy until `ftctl release`.
  unprepared     `ftctl enable` on a running domain without shared memfd memory and with a
                 balloon fails naming each setting and the fixing command; `ftctl prepare --yes`
                 fixes the definition; after a restart `ftctl enable` protects it and writes the
                 element (live and persistent); `ftctl disable` removes it.
  failback       a domain fails over (virsh destroy of the primary), its twin domain is protected
                 again towards the first host by the standby ftd itself (reprotect=auto: the
                 ftvm element is written into the twin domain) and fails back (virsh destroy of
                 the twin): the tick counter continues both times and the history on the first
                 host shows both failovers.
  hook-robust    ftd down when the domain starts: it starts anyway and the hook logs why; ftd
                 started later finds and protects it; a guest poweroff ends protection without
                 a failover.
  reprotect-manual  a domain whose element says reprotect='manual' is protected with
                 reprotect manual (`ftctl status --json`) by the hook, and again by the start-up
                 scan of a restarted primary ftd; `ftctl enable DOMAIN --reprotect manual` writes
                 reprotect='manual' into the element (live and persistent).
"""
import os
import shutil
import subprocess
import time
import uuid as uuidlib

import disk_records
from ftvm_e2e import (BUILD, GUEST, Env, Serial, check, check_continuity, free_port, log, main, wait_for)

NS = 'https://ftvm.dev/xmlns/protection/1'
URI = 'qemu:///system'
HOOK_CONF = '/etc/ftvm/hook.conf'


def virsh(*args, check_rc=True, timeout=120):
    r = subprocess.run(['virsh', '-c', URI] + list(args), capture_output=True, text=True, timeout=timeout)
    if check_rc and r.returncode != 0:
        raise AssertionError('virsh %s -> rc %d: %s %s' % (' '.join(args), r.returncode, r.stdout, r.stderr))
    return r


def domstate(name):
    r = virsh('domstate', name, check_rc=False)
    return r.stdout.strip() if r.returncode == 0 else None


class Lab:
    """Per-scenario libvirt fixtures: guest files readable by libvirt-qemu, the hook's config
    pointed at this scenario's ftd, and every domain it defines removed at the end."""

    def __init__(self, env):
        self.env = env
        self.domains = []
        os.chmod(env.dir, 0o755)  # QEMU runs as libvirt-qemu: kernel, initrd, sockets live here
        self.files = env.path('guestfiles')
        os.makedirs(self.files, mode=0o755)
        for f in ('vmlinux', 'initramfs.cpio.gz'):
            shutil.copy(os.path.join(GUEST, f), os.path.join(self.files, f))
        self.state = env.path('state')
        self.hook_log = env.path('hook.log')
        self.saved_conf = open(HOOK_CONF).read() if os.path.exists(HOOK_CONF) else None

    def hook_conf(self, control):
        os.makedirs(os.path.dirname(HOOK_CONF), exist_ok=True)
        with open(HOOK_CONF, 'w') as f:
            f.write('# written by tests/e2e/test_libvirt.py (restored afterwards)\n')
            f.write('control=%s\nstate_dir=%s\nlog=%s\ntimeout_ms=1000\n' % (control, self.state, self.hook_log))

    def close(self):
        for d in self.domains + [d + '-twin' for d in self.domains]:
            if domstate(d) not in (None, 'shut off'):
                virsh('destroy', d, check_rc=False)
            virsh('undefine', d, check_rc=False)
        if self.saved_conf is None:
            if os.path.exists(HOOK_CONF):
                os.unlink(HOOK_CONF)
        else:
            open(HOOK_CONF, 'w').write(self.saved_conf)

    def define(self, name, peer=None, prepared=True, append='', disk=None, protection_extra=''):
        self.domains.append(name)
        disk_xml = ''
        if disk:
            disk_xml = ("<disk type='file' device='disk'><driver name='qemu' type='raw' cache='writeback'/>"
                        "<source file='%s'/><target dev='vda' bus='virtio'/></disk>" % disk)
            append += ' ftvm_disk=vda ftvm_disk_rec_s=20'
        serial = self.env.path(name + '.serial.sock')
        mem = ("<memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>" if prepared else '')
        balloon = "<memballoon model='none'/>" if prepared else "<memballoon model='virtio'/>"
        meta = ("<metadata><ftvm:protection xmlns:ftvm='%s' peer='%s' transport='tcp' epoch-ms='25' "
                "failover='auto'%s/></metadata>" % (NS, peer, protection_extra) if peer else '')
        xml = f"""<domain type='qemu'>
  <name>{name}</name>
  <uuid>{uuidlib.uuid4()}</uuid>
  {meta}
  <memory unit='MiB'>256</memory>
  {mem}
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{self.files}/vmlinux</kernel><initrd>{self.files}/initramfs.cpio.gz</initrd>
    <cmdline>console=ttyS0 panic=-1 quiet ftvm_dirty_kib_s=512 {append}</cmdline></os>
  <cpu mode='maximum'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    {disk_xml}
    <serial type='unix'><source mode='bind' path='{serial}'/><target port='0'/></serial>
    <console type='unix'><source mode='bind' path='{serial}'/><target type='serial' port='0'/></console>
    {balloon}
  </devices>
</domain>
"""
        p = self.env.path(name + '.xml')
        open(p, 'w').write(xml)
        virsh('define', p)
        return serial

    def serial(self, path, name):
        s = Serial(path, self.env.path(name + '.serial.log'))
        s.start()
        self.env.serials.append(s)
        s.connected.wait(30)
        check(s.connected.is_set(), 'serial socket %s never appeared' % path)
        return s

    def uuid(self, name):
        return virsh('domuuid', name).stdout.strip()


def restart_libvirtd():
    """Restarts the (systemd-less) libvirtd the way an operator or an upgrade does; running
    domains survive and libvirt runs the hook's `reconnect` phase for each."""
    pid = int(open('/run/libvirtd.pid').read())
    os.kill(pid, 15)
    wait_for(lambda: not os.path.exists('/proc/%d' % pid), 30, 'libvirtd pid %d to exit' % pid)
    subprocess.run(['libvirtd', '-d'], check=True)
    wait_for(lambda: virsh('version', check_rc=False).returncode == 0, 60, 'libvirtd to answer again')


def ftds(env, lab):
    P = env.start_ftd('primary', listen=False, extra=['--state-dir', lab.state])
    S = env.start_ftd('standby', extra=['--twin-name-suffix', '-twin', '--disk-dir', env.path('replicas'),
                                        '--state-dir', env.path('standby-state')])
    return P, S


def wait_protected(P, name, timeout=180):
    def ok():
        v = P.vm(name, 'primary')
        return v if v and v['state'] == 'protected' else None
    return wait_for(ok, timeout, 'domain %s to become protected' % name)


def hook_failover():
    with Env('lv-hook') as env:
        lab = Lab(env)
        try:
            name = 'ftvmt%d' % os.getpid()
            P, S = ftds(env, lab)
            lab.hook_conf(P.control)
            img = env.path('disk.img')  # the guest writes records to it; replicated with the RAM
            disk_records.make_fs(img, 64)
            sock = lab.define(name, peer='127.0.0.1:%d' % env.port, disk=img)
            virsh('start', name)
            ser = lab.serial(sock, name)
            ser.wait_ticks(3, 120)
            v = wait_protected(P, name)
            check(v['disk'] and v['disk']['disks'][0]['ready'], 'disk not mirrored: %s' % v['disk'])
            log('protected by the hook: epoch %d, libvirt %s' % (v['epoch'], v['libvirt']))
            check('started' in open(lab.hook_log).read(), 'hook log does not show the started phase')
            twin_name = name + '-twin'
            check(domstate(twin_name) == 'paused', 'twin domain %s is %s, expected paused' % (twin_name, domstate(twin_name)))
            twin = lab.serial(os.path.join(S.run_dir, 'vms', name, os.path.basename(sock)), name + '-twin')
            time.sleep(2)
            check(not twin.all(), 'the paused twin printed output: %s' % twin.all()[:3])
            uuid = lab.uuid(name)

            # libvirtd restarts while the domain is protected: protection goes on (ftd reconnects
            # its monitor; the hook's `reconnect` phase finds the domain already protected).
            e0 = P.vm(name, 'primary')['epoch']
            log('restarting libvirtd (epoch %d)' % e0)
            restart_libvirtd()
            wait_for(lambda: P.vm(name, 'primary')['epoch'] > e0 + 40, 60, 'epochs to go on after the libvirtd restart')
            v = P.vm(name, 'primary')
            check(v['state'] == 'protected', 'after the libvirtd restart: %s %s' % (v['state'], v['reason']))
            check(domstate(twin_name) == 'paused', 'twin after the libvirtd restart: %s' % domstate(twin_name))
            wait_for(lambda: 'reconnect' in open(lab.hook_log).read(), 10, 'the hook to run its reconnect phase')
            log('protected across the libvirtd restart: epoch %d -> %d' % (e0, v['epoch']))

            log('virsh destroy %s (the primary)' % name)
            virsh('destroy', name)
            sv = wait_for(lambda: (S.vm(name, 'active') or {}).get('state') == 'active' and S.vm(name, 'active'), 30,
                          'the standby to activate the twin')
            a = sv['activation']
            log('activation: %s' % {k: a.get(k) for k in ('epoch', 'activation_ms', 'status_after', 'libvirt_domain')})
            check(a['ram_digest'] == a['expected_ram_digest'], 'twin RAM digest differs: %s' % a)
            check(domstate(twin_name) == 'running', 'twin domain is %s after failover' % domstate(twin_name))
            listing = virsh('list').stdout
            check(twin_name in listing and 'running' in listing.split(twin_name)[1].splitlines()[0],
                  'virsh list does not show %s running:\n%s' % (twin_name, listing))
            # Defined persistently right after it runs (off the activation path).
            wait_for(lambda: 'Persistent:     yes' in virsh('dominfo', twin_name).stdout, 15,
                     'the twin domain to be defined persistently')
            cut = P.committed_cut_ms(name, a['epoch'])
            check_continuity(ser, twin, cut)
            check(not virsh('dumpxml', twin_name).stdout.count(NS), 'the twin carries the ftvm element')
            # The twin domain runs on the disk replica: the guest goes on writing there.
            check(a['disks'][0] in virsh('dumpxml', twin_name).stdout, 'twin does not use the replica %s' % a['disks'])
            twin.send('disk-stop')
            stopped = wait_for(lambda: twin.matching('DISK stopped') or twin.matching('DISK umount'), 60,
                               'the record writer on the twin to stop')[-1][1]
            last = int(stopped.split('last=')[1]) if 'last=' in stopped else 0
            problems = disk_records.verify(a['disks'][0], last)
            check(last > 0 and not problems, 'replica after the libvirt failover (%s): %s' % (stopped, problems))
            log('twin domain runs on the replica: fsck clean, records 1..%d intact' % last)

            # The old primary must not start its copy while the twin runs.
            marker = os.path.join(lab.state, 'failed-over', uuid)
            wait_for(lambda: os.path.exists(marker), 10, 'the failed-over marker %s' % marker)
            r = virsh('start', name, check_rc=False)
            log('virsh start of the failed-over primary: rc %d: %s' % (r.returncode, (r.stderr or r.stdout).strip()))
            check(r.returncode != 0 and 'failed over' in (r.stderr + r.stdout), 'the failed-over primary started again')
            check(domstate(name) == 'shut off', 'primary domain is %s' % domstate(name))
            r = P.ctl('release', name, '--state-dir', lab.state)
            check(not os.path.exists(marker), 'ftctl release left the marker: %s' % r.stdout)
        finally:
            lab.close()


def failback():
    with Env('lv-failback') as env:
        lab = Lab(env)
        try:
            name = 'ftvmf%d' % os.getpid()
            port_b = env.port
            env.port = free_port()
            # Host A (the first primary) listens too: the VM comes back to it. Both "hosts" share
            # one libvirtd, so each standby names its twin domains with a suffix of its own.
            A = env.start_ftd('a', extra=['--twin-name-suffix', '-back', '--disk-dir', env.path('replicas-a'),
                                          '--state-dir', lab.state])
            port_a = env.port
            env.port = port_b
            B = env.start_ftd('b', extra=['--twin-name-suffix', '-twin', '--disk-dir', env.path('replicas-b'),
                                          '--state-dir', env.path('b-state')])
            lab.hook_conf(A.control)
            sock = lab.define(name, peer='127.0.0.1:%d' % port_b)
            twin_name, back_name = name + '-twin', name + '-twin-back'
            lab.domains.append(twin_name + '-back')  # removed at the end (with its '-twin' variant)
            virsh('start', name)
            ser = lab.serial(sock, name)
            ser.wait_ticks(3, 120)
            wait_protected(A, name)
            twin = lab.serial(os.path.join(B.run_dir, 'vms', name, os.path.basename(sock)), twin_name)
            time.sleep(1)
            log('virsh destroy %s (the primary on host a)' % name)
            virsh('destroy', name)
            a1 = wait_for(lambda: (B.vm(name, 'active') or {}).get('activation'), 30, 'the twin to take over on b')
            # libvirt learns of the resume from QEMU's RESUME event, a moment after ftd's `cont`.
            wait_for(lambda: domstate(twin_name) == 'running', 10, 'libvirt to report the twin domain running')
            check_continuity(ser, twin, A.committed_cut_ms(name, a1['epoch']))
            wait_for(lambda: 'Persistent:     yes' in virsh('dominfo', twin_name).stdout, 15,
                     'the twin domain to be defined persistently')
            # reprotect=auto: nobody runs ftctl; b protects the twin domain towards a by itself.
            wait_protected(B, twin_name)
            log('%s protected again from b towards a %.1f s after it resumed (reprotect=auto)' %
                (twin_name, time.time() - a1['cont_wall_ms'] / 1000))
            check(NS in virsh('dumpxml', twin_name).stdout and str(port_a) in
                  virsh('dumpxml', twin_name).stdout, 'the twin domain does not declare its protection towards a')
            check(domstate(back_name) == 'paused', 'the twin on a (%s) is %s' % (back_name, domstate(back_name)))
            back = lab.serial(os.path.join(A.run_dir, 'vms', twin_name, os.path.basename(sock)), back_name)
            time.sleep(1)
            log('virsh destroy %s (the primary on host b)' % twin_name)
            virsh('destroy', twin_name)
            a2 = wait_for(lambda: (A.vm(twin_name, 'active') or {}).get('activation'), 30, 'the VM to fail back to a')
            wait_for(lambda: domstate(back_name) == 'running', 10,
                     'libvirt to report the domain on a running after the fail-back (seen paused for a moment in CI)')
            check_continuity(twin, back, B.committed_cut_ms(twin_name, a2['epoch']))
            v = A.vm(twin_name, 'active')
            fo = [e for e in v.get('history', []) if e.get('event') == 'failover']
            log('history on a: %s' % [(e['event'], e.get('from'), e.get('to')) for e in v.get('history', [])])
            check(len(fo) == 2 and fo[0]['from'] == fo[1]['to'] and fo[0]['to'] == fo[1]['from'],
                  'history on a after the fail-back: %s' % v.get('history'))
        finally:
            lab.close()


def unprepared():
    with Env('lv-prepare') as env:
        lab = Lab(env)
        try:
            name = 'ftvmu%d' % os.getpid()
            P, S = ftds(env, lab)
            lab.hook_conf(P.control)
            sock = lab.define(name, prepared=False)
            virsh('start', name)
            lab.serial(sock, name).wait_ticks(2, 120)
            r = P.ctl('enable', name, '--peer', '127.0.0.1:%d' % env.port, '--timeout', '120', check_rc=False)
            log('enable of an unprepared domain: rc %d\n%s' % (r.returncode, r.stderr.strip()))
            check(r.returncode == 5, 'enable of an unprepared domain: rc %d' % r.returncode)
            for needle in ('memfd', 'memballoon', 'ftctl prepare %s' % name):
                check(needle in r.stderr, 'refusal does not mention %r: %s' % (needle, r.stderr))
            check(not virsh('dumpxml', name).stdout.count(NS), 'a refused enable wrote the element')

            r = P.ctl('prepare', name, '--yes', check_rc=False)
            log('prepare: rc %d\n%s' % (r.returncode, r.stdout.strip()))
            check(r.returncode == 0, 'prepare --yes: rc %d %s %s' % (r.returncode, r.stdout, r.stderr))
            check('restart' in r.stdout, 'prepare does not say a restart is needed: %s' % r.stdout)
            inactive = virsh('dumpxml', '--inactive', name).stdout
            check("type='memfd'" in inactive and "model='none'" in inactive, 'prepare did not fix the definition')
            virsh('destroy', name)
            time.sleep(0.5)
            virsh('start', name)
            ser = Serial(sock, env.path(name + '.serial2.log'))
            ser.start()
            env.serials.append(ser)
            ser.wait_ticks(2, 120)
            r = P.ctl('prepare', name, check_rc=False)
            check(r.returncode == 0 and 'ready' in r.stdout, 'prepare after restart: %s' % r.stdout)

            P.ctl('enable', name, '--peer', '127.0.0.1:%d' % env.port, '--transport', 'tcp', '--timeout', '180')
            wait_protected(P, name)
            for flag in ([], ['--inactive']):
                x = virsh('dumpxml', *(flag + [name])).stdout
                check(NS in x and "peer='127.0.0.1:%d'" % env.port in x.replace('"', "'"),
                      'element missing from dumpxml %s' % flag)
            human = P.ctl('status', name).stdout
            check('state=protected' in human, human)
            r = P.ctl('disable', name)
            log(r.stdout.strip())
            for flag in ([], ['--inactive']):
                check(NS not in virsh('dumpxml', *(flag + [name])).stdout, 'element still in dumpxml %s' % flag)
            wait_for(lambda: domstate(name + '-twin') is None, 20, 'the twin domain to go away after disable')
            check(domstate(name) == 'running', 'guest not running after disable')
        finally:
            lab.close()


def hook_robust():
    with Env('lv-robust') as env:
        lab = Lab(env)
        try:
            name = 'ftvmr%d' % os.getpid()
            lab.hook_conf(env.path('primary', 'ftd.sock'))  # ftd is not running yet
            sock = lab.define(name, peer='127.0.0.1:%d' % env.port)
            t0 = time.time()
            virsh('start', name)
            log('virsh start with ftd down took %.2f s' % (time.time() - t0))
            ser = lab.serial(sock, name)
            ser.wait_ticks(2, 120)
            hl = open(lab.hook_log).read()
            check('not reachable' in hl or 'No such file' in hl, 'hook log does not say ftd is down:\n%s' % hl)
            # Unknown phase and malformed XML, straight from the command line: exit 0, logged.
            env_ = dict(os.environ, FTVM_HOOK_CONF=HOOK_CONF)
            r = subprocess.run([os.path.join(BUILD, 'ftvm-hook'), name, 'frobnicate', 'begin', '-'], input='<domain>',
                               capture_output=True, text=True, env=env_, timeout=10)
            check(r.returncode == 0, 'hook with an unknown phase: rc %d' % r.returncode)
            r = subprocess.run([os.path.join(BUILD, 'ftvm-hook'), name, 'started', 'begin', '-'], input='<domain><name',
                               capture_output=True, text=True, env=env_, timeout=10)
            check(r.returncode == 0, 'hook with malformed XML: rc %d' % r.returncode)
            check('malformed' in open(lab.hook_log).read(), 'hook did not log the malformed XML')

            # ftd starts later and picks the running domain up on its own.
            P, S = ftds(env, lab)
            v = wait_protected(P, name)
            log('protected by the start-up scan: epoch %d' % v['epoch'])
            check('found running at ftd start' in P.log_text(), 'primary log does not show the start-up scan')
            # The guest powers itself off: protection ends; the twin is destroyed, not resumed.
            ser.send('poweroff')
            wait_for(lambda: P.vm(name, 'primary')['state'] == 'shut-down', 60, 'the primary to report shut-down')
            wait_for(lambda: domstate(name + '-twin') is None, 30, 'the twin domain to be destroyed')
            check(not (S.vm(name) or {}).get('activation'), 'the standby activated after a guest poweroff')
            wait_for(lambda: domstate(name) == 'shut off', 30, 'the domain to be off')
            check(not os.path.exists(os.path.join(lab.state, 'failed-over')) or
                  not os.listdir(os.path.join(lab.state, 'failed-over')), 'a poweroff left a failed-over marker')
        finally:
            lab.close()


def reprotect_manual():
    with Env('lv-reprotect-manual') as env:
        lab = Lab(env)
        try:
            name = 'ftvmm%d' % os.getpid()
            P, S = ftds(env, lab)
            lab.hook_conf(P.control)
            peer = '127.0.0.1:%d' % env.port
            sock = lab.define(name, peer=peer, protection_extra=" reprotect='manual'")
            virsh('start', name)
            lab.serial(sock, name).wait_ticks(2, 120)
            # The hook reads the element and passes reprotect to ftd's enable.
            v = wait_protected(P, name)
            check('started' in open(lab.hook_log).read(), 'hook log does not show the started phase')
            check(v.get('reprotect') == 'manual', 'protected by the hook with reprotect=%s, expected manual'
                  % v.get('reprotect'))
            log('protected by the hook with reprotect=%s' % v['reprotect'])

            # ftd's start-up scan reads the same element: the primary ftd restarts (SIGTERM ends the
            # session, the element stays) and protects the running domain again by itself.
            P.proc.terminate()
            P.proc.wait(30)
            P = env.start_ftd('primary', listen=False, extra=['--state-dir', lab.state])
            v = wait_protected(P, name)
            check('found running at ftd start' in P.log_text(), 'primary log does not show the start-up scan')
            check(v.get('reprotect') == 'manual', 'protected by the start-up scan with reprotect=%s, expected '
                  'manual' % v.get('reprotect'))
            log('protected by the start-up scan with reprotect=%s' % v['reprotect'])

            # `ftctl enable --reprotect manual` declares it in the element, live and persistent.
            P.ctl('disable', name)
            check(NS not in virsh('dumpxml', name).stdout, 'disable left the element')
            P.ctl('enable', name, '--peer', peer, '--transport', 'tcp', '--reprotect', 'manual', '--timeout', '180')
            v = wait_protected(P, name)
            check(v.get('reprotect') == 'manual', 'ftctl enable --reprotect manual: status says %s'
                  % v.get('reprotect'))
            for flag in ([], ['--inactive']):
                x = virsh('dumpxml', *(flag + [name])).stdout.replace('"', "'")
                check(NS in x and "reprotect='manual'" in x, 'reprotect not in dumpxml %s:\n%s' % (flag, x))
            P.ctl('disable', name)
        finally:
            lab.close()


if __name__ == '__main__':
    main({'failback': failback, 'hook-failover': hook_failover, 'unprepared': unprepared, 'hook-robust': hook_robust,
          'reprotect-manual': reprotect_manual})
