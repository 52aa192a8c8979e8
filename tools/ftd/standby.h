// StandbySession: the standby side of one protected VM. Owns the paused twin QEMU, the replica
// (checkpoint/replica.h) over the twin's RAM, and the decision to activate.
//
// Activation happens exactly when the twin holds a committed checkpoint and one of: the
// primary reports its QEMU dead (PrimaryLost), a planned failover (Activate), or the primary
// is silent (no frame, including heartbeats, for DaemonConfig::heartbeat_timeout; a closed
// connection counts as silence from the moment of the last frame). A protocol violation or an
// explicit Disable destroys the twin instead: the primary is alive then, and two running
// copies must never exist. A session without a committed checkpoint never activates.
#pragma once

#include <sys/types.h>

#include <atomic>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>

#include <nlohmann/json.hpp>

#include "checkpoint/disk_journal.h"
#include "checkpoint/protocol.h"
#include "checkpoint/replica.h"
#include "tools/ftd/session.h"
#include "transport/transport.h"
#include "vmm-glue/process.h"
#include "vmm-glue/libvirt.h"
#include "vmm-glue/libvirt_xml.h"
#include "vmm-glue/qmp.h"

namespace ftvm::ftd {

class StandbySession {
 public:
  // `claim` is called with the VM name from OpenSession before a twin is created; it throws
  // to refuse the session (e.g. the VM already failed over to this host).
  using Claim = std::function<void(const std::string& name, StandbySession* self)>;
  // Hands a second-path connection to the session with that id; false if there is none.
  using Adopt = std::function<bool(uint64_t session_id, std::unique_ptr<transport::Connection>& conn)>;
  StandbySession(const DaemonConfig& cfg, std::unique_ptr<transport::Connection> conn, Claim claim, Adopt adopt);
  ~StandbySession();

  void start();
  // Ends the session without activating: the twin is destroyed (unless already active).
  void abort(const std::string& why);
  void join();

  std::string name() const;
  bool finished() const { return finished_; }
  bool active() const { return active_; }
  // A connection that only delivered a second path to another session (not a VM session).
  bool transient() const { return transient_; }
  // Who the session's data connection came from ("addr:port", the address alone) and the id
  // of the key it authenticated with ("" = insecure). Fixed at construction.
  const std::string& peer() const { return peer_; }
  const std::string& peer_host() const { return peer_host_; }
  const std::string& key_id() const { return key_id_; }
  // Whether a checkpoint was ever committed (the twin holds a usable replica).
  bool committed_any() const {
    std::lock_guard<std::mutex> g(mu_);
    return committed_ > 0;
  }
  // Thread-safe: takes `conn` as this session's second path if `session_id` is ours and `conn`
  // comes from the data connection's host with the same key (else logs why and returns false).
  bool adopt_heartbeat_link(uint64_t session_id, std::unique_ptr<transport::Connection>& conn);
  nlohmann::json status() const;

 private:
  void run();
  void open(const checkpoint::OpenSession& o);
  bool handle(const transport::ControlMessage& m);  // false = session over
  void primary_silent(const std::string& why);
  void activate(const std::string& reason, double declared_wall_ms);
  void destroy_twin(const std::string& why);
  void set_state(const std::string& s, const std::string& reason = {});

  DaemonConfig cfg_;
  std::unique_ptr<transport::Connection> conn_;
  Claim claim_;
  Adopt adopt_;
  std::unique_ptr<transport::Connection> hb_;          // session thread
  std::unique_ptr<transport::Connection> pending_hb_;  // under mu_
  std::atomic<uint64_t> sid_{0};
  std::atomic<bool> transient_{false};
  const std::string peer_, peer_host_, key_id_, security_;
  std::chrono::milliseconds silence() const;
  bool poll_second_path();  // false = session over

  uint64_t session_id_ = 0;
  std::string vm_dir_;
  pid_t twin_pid_ = -1;
  std::unique_ptr<vmm::Monitor> twin_qmp_;
  // libvirt twins (issue 6): see start_libvirt_twin().
  std::string twin_uuid_;  // non-empty: the twin is a libvirt domain (looked up by this UUID)
  std::string twin_persistent_xml_;
  void start_libvirt_twin(const checkpoint::OpenSession& o, const std::map<std::string, std::string>& disks);
  std::unique_ptr<vmm::MappedRam> twin_ram_;
  std::unique_ptr<checkpoint::Replica> replica_;
  // The twin's disk replicas (raw images in DaemonConfig::disk_dir/<vm>/) and the per-epoch
  // buffer of their writes; see checkpoint/disk_journal.h.
  std::string disk_dir_;
  std::vector<std::string> disk_paths_;
  std::vector<std::unique_ptr<checkpoint::RawImage>> images_;
  std::unique_ptr<checkpoint::DiskJournal> journal_;
  void update_disk_status();  // session thread: refreshes disk_status_ (under mu_)
  uint64_t begun_epoch_ = 0;  // last EpochBegin seen (diagnosis of torn epochs)
  std::string last_rejection_;

  mutable std::mutex mu_;
  std::string name_, state_ = "opening", reason_;
  uint64_t committed_ = 0;
  uint64_t verified_commits_ = 0;
  double last_commit_wall_ms_ = 0;
  nlohmann::json activation_ = nullptr;
  nlohmann::json disk_status_ = nullptr;
  std::atomic<bool> finished_{false}, active_{false}, abort_{false};
  std::string abort_reason_;
  std::thread thread_;
};

}  // namespace ftvm::ftd
