// Pure functions on a QEMU command line (argv[0] is the binary). No processes, no filesystem.
//
// Parsing follows QEMU 7.2's rules (vl.c lookup_opt): options may be written `-opt` or `--opt`,
// the value is always the next argument (QEMU rejects `-opt=value` as "invalid option", so it is
// treated as an unknown option name, never split); options QEMU declares without an argument
// (-S, -daemonize, -nodefaults, ...) never consume the next argument; a bare argument that is not
// an option is QEMU's legacy `-hda` image and is kept untouched. Option values in QEMU's keyval
// syntax ("driver,key=val,..." where ",," is a literal comma) and in JSON syntax (libvirt >= 7
// passes `-object '{"qom-type":...}'`, `-device '{...}'`, `-blockdev '{...}'`, `-netdev '{...}'`)
// are both understood; a rewritten value keeps the syntax it was written in.
#pragma once

#include <map>
#include <string>
#include <vector>

namespace ftvm::vmm {

// Problems that make the VM unprotectable by ftvm, one human-readable sentence each, naming the
// option and what to change. Empty means protectable. Refused (and why):
//  * main RAM not one `memory-backend-memfd` with share=on used as the machine's RAM
//    (`-machine memory-backend=ID`, or a single `-numa node,memdev=ID`): ftd must map the guest
//    RAM from outside QEMU through the memfd (see process.h). `-m` alone, `-mem-path`,
//    memory-backend-ram / -file and share=off are refused; so is hugetlb=on (dirty tracking and
//    copying would work at 2 MiB / 1 GiB granularity and soft-dirty does not cover hugetlb).
//  * more than one RAM backend (several -numa nodes, pc-dimm, nvdimm, virtio-pmem, ivshmem):
//    only the main backend is replicated.
//  * any virtio-balloon device: inflation (and free-page reporting) discards guest pages with
//    MADV_DONTNEED / fallocate(PUNCH_HOLE), which neither dirty tracker sees, so the replica
//    would silently diverge. Refusing every balloon is the simple, safe rule.
//  * virtio-mem: plugs/unplugs RAM by discarding, same reason as the balloon.
//  * vhost-user devices and `-netdev vhost-user`: another process writes guest RAM.
//  * vhost in the kernel (`-netdev tap,vhost=on|vhostforce=on|vhostfd=`, vhost-vsock, vhost-scsi)
//    and vfio-pci: writes by vhost worker threads / device DMA are not verified to be tracked.
//  * `-incoming`: the process is a migration target, not a running guest — unless
//    `incoming_completed` (the caller asked QEMU: its incoming migration completed and the guest
//    runs: a twin that took over, which is an ordinary guest from then on and can be protected
//    again; the standby's twin command line drops the old `-incoming`/`-S`).
std::vector<std::string> check_protectable(const std::vector<std::string>& argv, bool incoming_completed = false);

struct TwinOptions {
  std::string run_dir;      // directory for every file/socket the twin creates (must not be
                            // the primary's); paths are rewritten to run_dir/<basename>
  std::string qmp_socket;   // the twin's QMP socket (ftd's own monitor connection)
  std::string name_suffix;  // appended to -name guest= (and process=), e.g. "-ftvm-twin"
  // `-netdev tap,ifname=P` becomes `ifname=S` for each entry P -> S: the twin must not open the
  // primary's tap (on one host the open fails with EBUSY; on two hosts the names may differ).
  // Taps not listed keep their ifname.
  std::map<std::string, std::string> tap_ifnames;
  // Replicated disks: the primary's image file (as QEMU reports it in query-block) -> the
  // twin's raw replica. Rewritten in -drive file= (format becomes raw), -blockdev
  // driver=file filename= (keyval, dotted file.filename= and JSON, nested or not; the format
  // node above such a file node becomes driver=raw, keeping only generic block options), and
  // -hda/-hdb/... or a bare image argument. A path listed here but absent from the command
  // line is an error (the twin would otherwise open the primary's image).
  std::map<std::string, std::string> disk_files;
};

// The standby twin's command line: same binary, machine, CPUs, devices and RAM backend (size,
// memfd), started paused as an incoming-migration target:
//   removed: -daemonize, -pidfile, -qmp, -qmp-pretty, -monitor (except `none`), -mon and the
//            -chardev each monitor uses, -incoming, -loadvm, -S, -preconfig;
//   added:   -S -incoming defer -global migration.send-configuration=off
//            -qmp unix:<qmp_socket>,server=on,wait=off;
//   rewritten into run_dir (basename kept, made unique): every -chardev path= / logfile=,
//            -serial/-parallel/-monitor-style `unix:` `file:` `pipe:` backends, -D, -vnc unix:;
//   renamed: -name X -> X<suffix>.
//   mapped:  -netdev tap ifname= through opts.tap_ifnames (keyval and JSON syntax).
//   mapped:  disk images through opts.disk_files (see TwinOptions).
// Kept as they are (documented limitation): disk files not in opts.disk_files (read-only
// disks and CD-ROMs: the twin opens the same path), other -netdev settings, -kernel/-initrd/-bios and
// other inputs QEMU only reads.
// Throws ftvm::Error when the command line hands QEMU inherited file descriptors the twin cannot
// have (fd=, fds=, vhostfd=, /dev/fdset/, -add-fd) outside the removed monitors: such VMs
// (libvirt-managed ones) must get their twin through libvirt instead.
std::vector<std::string> make_twin_cmdline(const std::vector<std::string>& argv,
                                           const TwinOptions& opts);

// ---- what the standby will execute (issue 12) --------------------------------------------------
//
// The twin's command line comes from the primary, over the network: the standby must not run
// whatever it names. Policy (docs/ARCHITECTURE.md, "Security"):
//  * the binary is one of the standby's own (ftd --qemu-binary, an allow-list of absolute
//    paths); the primary's argv[0] only picks among them by basename (pick_qemu_binary);
//  * every option of the twin's final command line (after make_twin_cmdline) is on an
//    allow-list, and each option value that names a file is inside a directory the standby
//    allows for that use (check_twin_cmdline). Everything else is refused, nothing is started.
struct TwinPolicy {
  std::vector<std::string> qemu_binaries;  // absolute paths the standby may execute
  std::string run_dir;   // the twin's run dir (RUN/vms/NAME): every file/socket QEMU creates
  std::string disk_dir;  // the twin's replica dir (DISK_DIR/NAME): writable disks; "" = none
  // --allow-path: kernels, initrds, firmware, ROMs, read-only images and CD-ROMs.
  std::vector<std::string> read_dirs;
};

// The allowed binary whose basename equals the basename of `requested` (the primary's argv[0]
// or libvirt <emulator>); an empty `requested` picks allowed[0]. Throws ftvm::Error naming the
// requested binary and the allowed ones when none matches (or `allowed` is empty).
std::string pick_qemu_binary(const std::string& requested, const std::vector<std::string>& allowed);

// Problems with the twin's command line under `policy`, one sentence each naming the option,
// the rule and what to do; empty = the standby may execute it. argv[0] must be one of
// policy.qemu_binaries exactly. Never throws for bad input (a malformed value is a problem).
std::vector<std::string> check_twin_cmdline(const std::vector<std::string>& argv, const TwinPolicy& policy);

// True when `path` is absolute, has no "." or ".." component, and lies strictly inside one of
// `dirs`, both as written and after resolving the symbolic links of its existing prefix (and of
// the dirs). Empty entries of `dirs` are ignored.
bool path_inside(const std::string& path, const std::vector<std::string>& dirs);

// Helpers exposed for tests and for other vmm-glue code.

// Splits a QEMU keyval string at single commas (",," is a literal comma, unescaped in the
// result). "a,,b,c=d" -> {"a,b", "c=d"}.
std::vector<std::string> split_keyval(const std::string& s);
// Joins items back, escaping every literal comma as ",,".
std::string join_keyval(const std::vector<std::string>& items);
// QEMU's boolean spelling: on/yes/true/y -> true; anything else (off/no/false/n/"") -> false.
bool qemu_bool(const std::string& v);

}  // namespace ftvm::vmm
