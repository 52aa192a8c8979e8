// Pure functions on libvirt domain XML (libxml2; no libvirt calls, no filesystem).
//
// Input is what `virsh dumpxml` / virDomainGetXMLDesc returns (live or inactive). Malformed XML,
// or XML whose root is not <domain>, throws ftvm::Error naming the line and libxml2's message.
// Rewritten XML keeps the document's layout (added elements are indented like their siblings)
// and has no `<?xml ...?>` declaration; attributes come out double-quoted. Unknown elements,
// comments and other namespaces' metadata are kept untouched.
#pragma once

#include <map>
#include <optional>
#include <string>
#include <vector>

#include "vmm-glue/protection_xml.h"
#include "vmm-glue/qemu_cmdline.h"

namespace ftvm::vmm {

// The protection element (Protection, parse_protection, protection_element, looks_like_uuid)
// lives in vmm-glue/protection_xml.h (libxml2 only, linked by the hook); included here.

// ---- what protection needs from the domain definition -----------------------------------------

struct PrepareIssue {
  std::string what;    // the problem, naming the element
  std::string fix;     // the exact XML to write instead (or what to do when not fixable)
  bool needs_restart;  // takes effect only when the domain is started again (all of them so far)
  bool fixable;        // prepare_fix() changes it
};

// What the definition must change before ftd can protect the domain (empty: nothing). The
// rules mirror check_protectable() on the QEMU command line libvirt generates:
//  * guest RAM in a shared memfd: <memoryBacking><source type='memfd'/><access mode='shared'/>
//    (fixable); a NUMA <cell memAccess='private'> overrides it (fixable: memAccess='shared');
//    more than one NUMA cell means several RAM backends (not fixable);
//  * no hugepages in <memoryBacking> (fixable: removed);
//  * <memballoon model='none'/>: libvirt adds a virtio balloon when the element is absent, and
//    every balloon (free-page reporting included) discards pages the trackers cannot see
//    (fixable);
//  * every virtio <interface> uses QEMU's userspace backend, not in-kernel vhost:
//    <driver name='qemu'/> (fixable);
//  * no vhost-user / vDPA devices (interface type vhostuser or vdpa, disk type vhostuser or
//    vhostvdpa, virtiofs <filesystem>, vhost-user <video>), no <hostdev> or
//    <interface type='hostdev'>, no <vsock> (in-kernel vhost), no <shmem>, no <memory> devices
//    (dimm, nvdimm, virtio-mem, virtio-pmem, ...) (none fixable: another process or device
//    writes guest RAM, or RAM that is not replicated);
//  * every writable disk is type='file' (a local image ftd can mirror; not fixable).
std::vector<PrepareIssue> prepare_check(const std::string& domain_xml);

// `domain_xml` with every fixable issue of prepare_check() fixed (for virDomainDefineXML of the
// persistent definition). Issues that are not fixable are left as they are: run prepare_check()
// on the result to see them.
std::string prepare_fix(const std::string& domain_xml);

// ---- the standby twin's definition ------------------------------------------------------------

struct TwinXmlOptions {
  std::string name;  // new <name>; "" = keep
  std::string uuid;  // new <uuid>; "" = keep; "generate" = remove it so libvirt makes one
  // Replicated disks: the primary's image file (<source file=...>) -> the twin's raw replica.
  std::map<std::string, std::string> disk_files;
  // Appended as <qemu:commandline><qemu:arg value='...'/> (existing entries kept).
  std::vector<std::string> extra_qemu_args;
  // "" = keep. Otherwise the files the twin's QEMU would create where the primary's does are
  // moved into this directory (basename kept; ".1", ".2", ... appended when two differ only in
  // their directory; one original path always maps to one new path, so a <console> mirroring
  // <serial> stays identical): the source path of chardevs (<serial>, <parallel>, <console>,
  // <channel>, <redirdev>, <smartcard>, <rng><backend>) of type='unix' with mode='bind' and of
  // type='file', their <log file=...>, and VNC/SPICE unix sockets (<graphics socket=...>,
  // <listen type='socket' socket=...>). Unix sockets in connect mode (someone else's server),
  // ptys and disks are kept.
  std::string socket_dir;
  // The standby's policy (issue 12; the standby always sets it, with socket_dir = its run_dir):
  //  * <emulator> becomes pick_qemu_binary(<emulator>, policy->qemu_binaries) (inserted when
  //    absent); a binary whose basename is not allowed is refused;
  //  * elements in libvirt's QEMU namespace (<qemu:commandline>, <qemu:override>,
  //    <qemu:capabilities>, ...) are refused, except <qemu:arg>s equal to the ones ftd itself adds
  //    (-incoming defer -global migration.send-configuration=off), which are dropped first;
  //  * after the replica rewrite and the relocation into socket_dir: every <disk> is type='file'
  //    (or has no source), writable ones inside policy->disk_dir, read-only ones and CD-ROMs
  //    (and every <backingStore>) inside policy->read_dirs or disk_dir; chardevs are pty, null,
  //    spicevmc, spiceport, qemu-vdagent, or unix/file inside socket_dir; <os> kernel, initrd, dtb,
  //    loader, nvram template, ACPI tables, fw_cfg files and ROMs inside the read dirs; an explicit
  //    <nvram> path inside socket_dir; interfaces without <script>/<downscript>/<backend tap|vhost>
  //    and not vhostuser/vdpa/hostdev; no <hostdev>, <filesystem>, <shmem>, evdev/passthrough
  //    <input>, passthrough <tpm>, rng other than /dev/{u,}random|/dev/hwrng;
  //  * <seclabel>, graphics ports and passwords are left to libvirt.
  // Any violation throws ftvm::Error listing every problem; nothing is defined.
  const TwinPolicy* policy = nullptr;
};

// The twin's domain XML, from the primary's:
//  * <name>/<uuid> set (or the uuid removed), the live-only id= attribute of <domain> removed;
//  * each <disk> whose <source file=...> is in opts.disk_files points at the replica, with
//    <driver type='raw'> and without <backingStore> (the replica is a flat raw image); a listed
//    file that no disk uses throws ftvm::Error naming it (the twin would otherwise open the
//    primary's image);
//  * the ftvm protection element removed from <metadata> (the twin is not itself protected);
//  * opts.extra_qemu_args appended to <qemu:commandline> (xmlns:qemu declared on <domain>);
//  * sockets and output files moved into opts.socket_dir (see TwinXmlOptions).
// Kept as they are (documented limitation): <seclabel> elements (a static label, e.g.
// type='static' relabel='no', is reused by the twin and may clash on the same host), MAC
// addresses, fixed <graphics> ports, disks not listed (read-only disks, CD-ROMs: the twin opens
// the same path).
std::string twin_xml(const std::string& domain_xml, const TwinXmlOptions& opts);

// The file sources of the writable disks (<disk type='file'> that is not a cdrom and has no
// <readonly/>), in document order: the names to match against QEMU's query-block file names.
std::vector<std::string> disk_sources(const std::string& domain_xml);

}  // namespace ftvm::vmm
