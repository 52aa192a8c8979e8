// A failover=manual twin kept across a standby ftd restart (issue 11: "a standby ftd restart
// costs at most a resync"; a twin waiting in `primary-lost` has no primary left to resync from).
//
// What is kept, and where:
//  * The twin QEMU itself. It is started in its own session (setsid) without a parent-death
//    signal, so it outlives its ftd (kill -9, or a clean stop that leaves it: StandbySession::
//    shutdown()). It stays paused in `inmigrate`: it has never executed guest code. Its RAM (the
//    replica of the committed epoch: a staged, uncommitted epoch lives in ftd's staging buffer,
//    never in twin RAM) lives in the twin's memfd; its disk replicas hold exactly the committed
//    epoch (checkpoint/disk_journal.h: uncommitted writes never reach the image).
//  * What lived only in ftd: the committed device state (the migration stream the twin loads on
//    activation) and the decision inputs. They are written when the session enters primary-lost
//    with failover=manual, before the state is shown, as
//      STATE_DIR/manual-wait/<vm>.json       the record below (replaced atomically)
//      STATE_DIR/manual-wait/<vm>.devstate   the device state of the committed epoch
//    and removed when the twin is resumed or dropped.
//
// A restarted ftd (Daemon's start-up scan) adopts a record's twin only when the record parses,
// its device state file has the recorded digest, and the twin pid of RUN/vms/<vm>/twin.pid is the
// recorded one and still runs that VM dir's QEMU; otherwise the record is discarded and the twin
// killed as a stale paused twin, as before. A paused twin without a record (never part of a
// primary-lost decision) is killed as before: it is safe to remove, the primary runs the guest.
//
// The adopted twin (WaitingTwin) waits exactly like the session did: `ftctl failover --force` on
// this host resumes it under the same rules (StandbySession::force_failover): never while the
// primary is heard (a Resolve or a new OpenSession from it drops the twin: the primary runs the
// guest); without a PrimaryLost report the arbiter is asked again at the time of --force (Yes
// resumes, Wait answers "wait", Fence drops the twin). Plain-QEMU twins only: a libvirt twin is
// not kept (documented limit).
#pragma once

#include <sys/types.h>

#include <atomic>
#include <chrono>
#include <cstddef>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "checkpoint/arbiter.h"
#include "checkpoint/protocol.h"
#include "tools/ftd/session.h"

namespace ftvm::ftd {

// Everything a restarted ftd needs to keep waiting for, and then perform, the operator's
// decision. Field meanings as in StandbySession.
struct ManualWaitRecord {
  static constexpr int kVersion = 1;
  std::string vm;
  uint64_t session_id = 0;
  pid_t twin_pid = -1;
  std::string vm_dir;      // RUN/vms/<vm>
  std::string qmp_socket;  // the twin's QMP socket
  uint64_t ram_size = 0;
  uint64_t epoch = 0;              // the committed epoch the twin holds
  uint64_t ram_digest = 0;         // the primary's digest of that epoch's RAM (Commit)
  uint64_t devstate_digest = 0;    // digest_file() of the .devstate file
  uint64_t devstate_size = 0;
  bool reported_dead = false;      // the primary said its QEMU died (PrimaryLost)
  std::string peer;                // the primary ftd's data connection "addr:port"
  std::string peer_host;           // its host part
  std::string second_path_host;    // the primary's declared second-path address ("" = none)
  std::string key_id;              // key of the session ("" = insecure)
  std::string origin;              // the primary ftd's node name
  std::string arbiter;             // the session's arbiter kind ("none" = opted out / none)
  double last_heard_wall_ms = 0;   // unix ms of the primary's last frame on any path
  double lost_wall_ms = 0;         // unix ms the session entered primary-lost
  std::string reason;              // why the primary was declared lost
  std::string history_in;          // the VM's history as received in OpenSession
  nlohmann::json local_events = nlohmann::json::array();  // the session's own events
  std::vector<std::string> disk_paths;  // replicas (RUN-independent: --disk-dir)
  std::string disk_dir;
  uint32_t reprotect_port = 0;

  nlohmann::json to_json() const;
  static ManualWaitRecord from_json(const nlohmann::json& j);  // throws Error naming the field
};

// STATE_DIR/manual-wait
std::string manual_wait_dir(const std::string& state_dir);
// Writes the device state, then the record (each to a temporary file, fsync, rename), so that a
// record never names a device state that is not complete. Throws SysError/Error naming the file.
void save_manual_wait(const std::string& state_dir, ManualWaitRecord r, std::span<const std::byte> device_state);
// Removes both files of `vm` (missing files are fine; other failures are logged).
void forget_manual_wait(const std::string& state_dir, const std::string& vm);
// Every record under STATE_DIR/manual-wait that parses; unreadable ones are logged and removed.
std::vector<ManualWaitRecord> load_manual_waits(const std::string& state_dir);

// A paused failover=manual twin adopted by a restarted ftd. Thread-safe (one mutex: force,
// primary_heard, drop and status serialize; force holds it while it asks the arbiter, up to 5 s;
// state() never blocks).
class WaitingTwin {
 public:
  enum class State { Waiting, Active, Dropped };
  // `arbiter`: this ftd's (DaemonConfig::arbiter); the record's kind decides which one is asked.
  WaitingTwin(const DaemonConfig& cfg, ManualWaitRecord rec);

  const std::string& name() const { return rec_.vm; }
  const ManualWaitRecord& record() const { return rec_; }
  pid_t twin_pid() const { return rec_.twin_pid; }
  State state() const { return state_; }  // lock-free: the daemon asks under its own mutex
  nlohmann::json status() const;
  // Whether `host` is this VM's primary (the data host or its declared second-path host).
  bool is_primary_host(const std::string& host) const;

  // `ftctl failover --force`: see the file comment. Blocks up to `timeout` (the arbiter).
  struct ForceResult {
    enum class Code { Done, Refused, Wait, Failed } code = Code::Failed;
    std::string text;
  };
  ForceResult force(std::chrono::milliseconds timeout);
  // The primary of the session was heard (Resolve, a new OpenSession): it runs the guest. A
  // waiting twin is dropped (Dropped); an activated one stays (Active). Returns the verdict.
  checkpoint::Verdict primary_heard(const std::string& why, std::string& text);
  // Drops a waiting twin (kills it, removes its record and replicas); no-op otherwise.
  void drop(const std::string& why);

 private:
  void drop_locked(const std::string& why);
  bool twin_alive_locked() const;
  void activate_locked(const std::string& reason);
  std::shared_ptr<checkpoint::Arbiter> arbiter_for() const;

  DaemonConfig cfg_;
  ManualWaitRecord rec_;
  mutable std::mutex mu_;
  std::atomic<State> state_{State::Waiting};  // written under mu_
  std::string reason_;
  nlohmann::json activation_ = nullptr;
};

}  // namespace ftvm::ftd
