// Shared definitions of ftd's per-VM sessions (primary and standby) and the daemon settings.
#pragma once

#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>
#include <span>

#include "checkpoint/arbiter.h"
#include "transport/auth.h"
#include "vmm-glue/process.h"

namespace ftvm::ftd {

struct DaemonConfig {
  std::string run_dir = "/run/ftvm";          // control socket, twins' run dirs, logs
  std::string control_socket;                 // default: run_dir/ftd.sock
  std::string listen;                         // replication listener HOST:PORT ("" = primary-only host)
  // Further replication listeners (--listen-also), e.g. on a second network for the second
  // heartbeat path of primaries that name it (`ftctl enable --peer-alt`).
  std::vector<std::string> listen_also;
  // Replication security (issue 12; docs/ARCHITECTURE.md "Security"). Every replication
  // connection, both directions, proves knowledge of `key` (loaded from key_file) and tags
  // every frame; without a key ftd runs only with `insecure` (loud warnings, status shows it).
  std::string key_file;
  std::shared_ptr<const transport::auth::Key> key;
  bool insecure = false;
  bool encrypt = false;                       // ask for encrypted replication payloads
  // standby: addresses (numeric, as the peer's address reads) that may connect for
  // replication; empty = any. Others are closed before the handshake and logged.
  std::vector<std::string> allow_peers;
  std::chrono::milliseconds heartbeat_interval{50};
  std::chrono::milliseconds heartbeat_timeout{400};  // standby: silence before takeover
  std::chrono::milliseconds ack_timeout{3000};        // primary: no ack this long -> degraded
  std::chrono::milliseconds reconnect_interval{1000}; // primary: degraded -> retry standby
  bool fault_injection = false;               // accept `ftctl fault` (tests only)
  bool verify_every_commit = false;          // standby: full-RAM digest after every apply (tests)
  bool verify_activation = false;             // standby: full-RAM digest check before resuming
  std::string stats_dir;                      // primary: per-epoch JSON lines (benchmarks)
  std::string tracker = "auto";               // auto | uffd-wp | soft-dirty
  bool output_commit = true;                  // primary: hold guest frames until their epoch is acked
  uint64_t output_cap_bytes = uint64_t{16} << 20;  // primary: held bytes per VM before an early cut
  // standby: the twin's tap for each primary tap ifname (--twin-tap-map P=S); see standby.h
  std::map<std::string, std::string> twin_tap_map;
  // standby: where the twins' disk replicas are created (<disk_dir>/<vm>/<n>.img)
  std::string disk_dir = "/var/lib/ftvm/disks";
  // standby: disk writes of open epochs kept in RAM before spilling to a file in the VM's dir
  uint64_t disk_buffer_bytes = uint64_t{64} << 20;
  // primary: disk writes queued for the standby before the guest's writes wait
  uint64_t disk_queue_bytes = uint64_t{64} << 20;
  // libvirt: the local libvirtd ftd talks to (primary: protected domains; standby: twins as
  // libvirt domains); "" = no libvirt (plain QEMU only, no start-up scan)
  std::string libvirt_uri = "qemu:///system";
  // standby: name suffix of a twin domain ("" = the primary's name and UUID; with a suffix the
  // twin also gets a new UUID, needed when primary and standby share one libvirtd)
  std::string twin_name_suffix;
  // persistent state: STATE_DIR/failed-over/<uuid> marks a libvirt domain that failed over
  // away from this host (the hook then refuses to start it here)
  std::string state_dir = "/var/lib/ftvm";
  // Split-brain arbitration (checkpoint/arbiter.h), shared by every session of this ftd; null
  // = none (a pair without a third party: "split-brain unprotected").
  std::shared_ptr<checkpoint::Arbiter> arbiter;
  // Without an arbiter: how long a primary whose standby cannot be reached keeps its guest
  // paused (output held) before it runs on alone (at least twice the standby's timeout).
  std::chrono::milliseconds alone_after{1000};
  // standby: the QEMU binaries a twin may run (--qemu-binary, absolute paths). The primary's
  // argv[0] / <emulator> only picks one of them by basename (vmm::pick_qemu_binary).
  std::vector<std::string> qemu_binaries = {"/usr/bin/qemu-system-x86_64"};
  // standby: directories whose files a twin may read (--allow-path: kernels, firmware, ROMs,
  // read-only images); see vmm::TwinPolicy.
  std::vector<std::string> allow_paths;
  // standby: the most bytes of disk writes spilled to files per VM (--disk-spill-max-mib);
  // beyond it the session ends (the primary resynchronizes) instead of filling the disk.
  uint64_t disk_spill_max_bytes = uint64_t{4} << 30;
  // standby: memory kept free for the host (--memory-reserve-mib). A session whose twin needs
  // more than MemAvailable minus this now (the primary's RAM in use) is refused at OpenSession,
  // instead of the OOM killer ending the twin or ftd later.
  uint64_t memory_reserve_bytes = uint64_t{256} << 20;
};

// What `ftctl enable` asks for.
struct EnableRequest {
  std::string qmp_socket;  // plain QEMU: its QMP socket; or
  std::string domain;      // a libvirt domain (name or UUID) on libvirt_uri
  std::string libvirt_uri;  // "" = DaemonConfig::libvirt_uri
  std::string peer;  // host:port of the standby ftd
  // host:port of the same standby ftd on a second network (its --listen-also); "" = none. The
  // second heartbeat path goes there, so the standby activates only when both networks are silent.
  std::string peer_alt;
  std::string name;  // VM name; default from QEMU (-name) or the QMP socket's file name
  unsigned epoch_ms = 25;
  unsigned max_sync_passes = 8;
  std::string transport = "auto";  // rdma | tcp | auto
  // Both hosts see the same disks (no replication). Refused: see PrimarySession's constructor.
  bool shared_disk = false;
  // After a failover the twin, now the VM, is protected again towards this host by the standby
  // ftd on its own ("auto", needs this ftd to listen), or only by `ftctl enable` ("manual").
  std::string reprotect = "auto";
  // Split-brain arbitration for this VM: "" = this ftd's (--arbiter); "none" = this VM opts out
  // (split-brain unprotected, warned); anything else must name this ftd's arbiter.
  std::string arbiter;
};

// Fault injection points for tests (only with --enable-fault-injection).
enum class Fault {
  None,
  CrashMidEpoch,     // primary ftd writes half of the next epoch's pages, then _exit(9)
  CorruptThenCrash,  // corrupt the next epoch on the wire, wait for the standby's rejection, _exit(9)
  CorruptOnce,       // corrupt the next epoch on the wire once; the primary retransmits it
  NbdDrop,           // close QEMU's NBD connections to the disk mirror targets (mirror failure)
  LoseActivateDone,  // planned failover: the link breaks right after Activate was sent (no answer)
};
Fault parse_fault(const std::string& s);

inline std::span<std::byte> as_span(const vmm::MappedRam& m) {
  return {reinterpret_cast<std::byte*>(m.data()), static_cast<size_t>(m.size())};
}

inline double ms_since(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t).count();
}
inline double wall_ms() {
  return std::chrono::duration<double, std::milli>(std::chrono::system_clock::now().time_since_epoch()).count();
}

}  // namespace ftvm::ftd
