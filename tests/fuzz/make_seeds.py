#!/usr/bin/python3
"""Writes the seed corpora in tests/fuzz/corpus/<target>/ (run once; the files are committed).
Inputs found by fuzzing (regressions) are added next to these by hand, named crash-*."""
import json
import os
import struct
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'e2e'))
from test_security import frame, xxh32, s, open_session  # noqa: E402 (frame encoding, XXH32)

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'corpus')


def put(target, name, data):
    d = os.path.join(HERE, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), 'wb') as f:
        f.write(data if isinstance(data, bytes) else data.encode())


# frame_fuzz: [chunk selector] frames...
hello = frame(1, payload=struct.pack('<HHII', 1, 0, 0, 16 << 20) + b'\0' * 4)
stream = hello + frame(3, 1, b'body') + frame(2, 2, b'x' * 100, offset=4096) + frame(4) + frame(5)
put('frame_fuzz', 'stream-fixup', b'\x07' + stream)
put('frame_fuzz', 'stream-chunk16', b'\x10' + stream)
put('frame_fuzz', 'hello-only', b'\x01' + hello)

# protocol_fuzz: [type selector] body
argv = ['qemu-system-x86_64', '-m', '64', '-name', 'g']
put('protocol_fuzz', 'open-session', b'\x00' + open_session(7, 'vm1', 64 << 20, argv, disks=[('d0', '/i.img', 1 << 20)]))
put('protocol_fuzz', 'open-session-xml', b'\x00' + open_session(7, 'vm1', 64 << 20, [], xml='<domain/>'))
put('protocol_fuzz', 'session-ready', b'\x01' + struct.pack('<QQq', 7, 8 << 20, 1234))
put('protocol_fuzz', 'staging-grow', b'\x02' + struct.pack('<QQ', 7, 16 << 20))
put('protocol_fuzz', 'epoch-begin', b'\x04' + struct.pack('<QQQ', 7, 3, 4096))
put('protocol_fuzz', 'commit', b'\x05' + struct.pack('<QQQQQQIQQ', 7, 3, 2, 100, 1, 2, 1, 1, 5) + bytes(range(16)))
put('protocol_fuzz', 'ack', b'\x06' + struct.pack('<QQI', 7, 3, 2) + s('digest mismatch'))
put('protocol_fuzz', 'activate-done', b'\x08' + struct.pack('<QI', 7, 1) + s('twin running'))
put('protocol_fuzz', 'error', b'\x0b' + s('refused'))
put('protocol_fuzz', 'disk-write', b'\x0e' + struct.pack('<QQIIQQ', 7, 2, 0, 1, 512, 4) + s(b'abcd'))

# replica_fuzz: [flags][epoch][pages u16][devstate u16][staged len u16] staged...
def rec(flags, epoch, pages, dev, staged):
    return struct.pack('<BBHHH', flags, epoch, pages, dev, len(staged)) + staged
page = struct.pack('<Q', 3) + b'\x11' * 4096
put('replica_fuzz', 'one-page', rec(1, 1, 1, 4, page + b'dev!'))
put('replica_fuzz', 'two-epochs', rec(1, 1, 1, 0, page) + rec(3, 2, 1, 2, struct.pack('<Q', 5) + b'\x22' * 4096 + b'ds'))
put('replica_fuzz', 'one-page-keyed', rec(5, 1, 1, 4, page + b'dev!'))  # keyed tag (flag 4)
put('replica_fuzz', 'bad-index', rec(1, 1, 1, 0, struct.pack('<Q', 99) + b'\x33' * 4096))

# redir_fuzz: [vnet bit | chunk] frames (u32 BE len, u32 BE vnet len, bytes)
def rf(data, v=10):
    return struct.pack('>II', len(data), v) + data
put('redir_fuzz', 'frames-vnet', b'\x21' + rf(b'\0' * 10 + b'E' * 60) + rf(b'\0' * 10 + b'F' * 1500))
put('redir_fuzz', 'frames-plain', b'\x40' + struct.pack('>I', 60) + b'G' * 60)

# control_fuzz: request lines
put('control_fuzz', 'requests', '{"cmd":"status"}\n{"cmd":"enable","qmp":"/x","peer":"h:1","epoch_ms":25}\n[1,2]\ngarbage\n')
put('control_fuzz', 'partial', '{"cmd":"ping"}\n{"cmd":"status"')

# nbd_fuzz: client flags, NBD_OPT_GO "ftvm", then write/flush/trim/disc requests
NBD_OPT = 0x49484156454F5054
go = struct.pack('>QII', NBD_OPT, 7, 4 + 4 + 2) + struct.pack('>I', 4) + b'ftvm' + struct.pack('>H', 0)
def req(cmd, off, length, data=b'', flags=0, handle=1):
    return struct.pack('>IHHQQI', 0x25609513, flags, cmd, handle, off, length) + data
put('nbd_fuzz', 'go-write-flush', struct.pack('>I', 3) + go + req(1, 4096, 8, b'12345678') + req(3, 0, 0) +
    req(4, 0, 4096) + req(6, 8192, 512) + req(2, 0, 0))
put('nbd_fuzz', 'go-read', struct.pack('>I', 3) + go + req(0, 0, 512) + req(2, 0, 0))
put('nbd_fuzz', 'abort', struct.pack('>I', 3) + struct.pack('>QII', NBD_OPT, 2, 0))

# qmp_fuzz: what QEMU writes
greet = json.dumps({"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""},
                            "capabilities": ["oob"]}}) + '\r\n'
put('qmp_fuzz', 'session', greet + '{"return": {}}\r\n{"event": "STOP", "timestamp": {"seconds": 1, "microseconds": 2}}\r\n'
    '{"return": {"status": "running", "running": true}}\r\n{"error": {"class": "GenericError", "desc": "no"}}\r\n')
put('qmp_fuzz', 'pretty', greet.replace(', ', ',\n  ') + '{\n  "return": {}\n}\n{"return": {"status": "paused"}, "id": 2}\n')

# libvirt_xml_fuzz / hook_fuzz: domain XML
dom = open(os.path.join(os.path.dirname(__file__), '..', 'e2e', 'test_security.py')).read()
dom = dom[dom.index('HOSTILE_XML = """') + 17:]
dom = dom[:dom.index('"""')]
good = """<domain type='kvm' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>ft1</name>
  <uuid>8a1d5c2e-3f3b-4f4e-9a7e-2b1c0d9e8f70</uuid>
  <metadata><ftvm:protection xmlns:ftvm="https://ftvm.dev/xmlns/protection/1" peer="standby:7410" transport="tcp" epoch-ms="40" failover="auto"/></metadata>
  <memory unit='KiB'>262144</memory>
  <memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>
  <os><type arch='x86_64' machine='q35'>hvm</type><kernel>/var/lib/ftvm/images/vmlinux</kernel></os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/var/lib/libvirt/images/ft1.qcow2'/><backingStore type='file'><source file='/var/lib/ftvm/images/base.qcow2'/></backingStore><target dev='vda' bus='virtio'/></disk>
    <serial type='unix'><source mode='bind' path='/var/lib/libvirt/qemu/ser.sock'/><log file='/var/log/x.log'/></serial>
    <console type='pty'/>
    <interface type='network'><source network='default'/><model type='virtio'/><driver name='qemu'/></interface>
    <rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>
    <memballoon model='none'/>
  </devices>
</domain>
"""
put('libvirt_xml_fuzz', 'good', good)
put('libvirt_xml_fuzz', 'hostile', dom)
put('libvirt_xml_fuzz', 'protection-only', '<protection peer="h:1" transport="rdma" epoch-ms="10" failover="auto"/>')
put('hook_fuzz', 'xml-good', b'\x01' + good.encode())
put('hook_fuzz', 'xml-hostile', b'\x01' + dom.encode())
put('hook_fuzz', 'config', b'\x00' + b'# c\ncontrol=/run/ftvm/ftd.sock\nstate_dir=/var/lib/ftvm\nlog=-\ntimeout_ms=300\ndebug=1\nbad line\n')

# twin_cmdline_fuzz: NUL-separated argv
guest = ['qemu-system-x86_64', '-accel', 'tcg', '-machine', 'q35,memory-backend=mem0', '-cpu', 'max', '-smp', '1',
         '-m', '256M', '-object', 'memory-backend-memfd,id=mem0,size=256M,share=on', '-kernel',
         '/var/lib/ftvm/images/vmlinux', '-append', 'console=ttyS0', '-nodefaults', '-display', 'none',
         '-chardev', 'socket,id=ser0,path=/p/serial.sock,server=on,wait=off', '-serial', 'chardev:ser0',
         '-qmp', 'unix:/p/qmp.sock,server=on,wait=off', '-netdev', 'tap,id=n0,ifname=tap0,script=no,downscript=no',
         '-device', 'virtio-net-pci,netdev=n0,romfile=', '-pidfile', '/p/q.pid', '-daemonize']
put('twin_cmdline_fuzz', 'guest', '\0'.join(guest))
put('twin_cmdline_fuzz', 'libvirt-json', '\0'.join(['/usr/bin/qemu-system-x86_64', '-blockdev',
    '{"driver":"file","filename":"/var/lib/ftvm/images/a.img","node-name":"s","read-only":true}', '-blockdev',
    '{"node-name":"f","driver":"qcow2","file":"s","read-only":true}', '-device', '{"driver":"virtio-blk-pci","drive":"f"}',
    '-object', '{"qom-type":"memory-backend-memfd","id":"pc.ram","share":true,"size":268435456}']))
put('twin_cmdline_fuzz', 'hostile', '\0'.join(['/bin/sh', '-plugin', 'x.so', '-netdev', 'tap,script=/x', '-add-fd', 'fd=3,set=1']))
