// StandbySession: the standby side of one protected VM. Owns the paused twin QEMU, the replica
// (checkpoint/replica.h) over the twin's RAM, and the decision to activate.
//
// Activation happens exactly when the twin holds a committed checkpoint and one of: the
// primary reports its QEMU dead (PrimaryLost), a planned failover (Activate), or the primary
// is silent (no frame, including heartbeats, for DaemonConfig::heartbeat_timeout; a closed
// connection counts as silence from the moment of the last frame). With failover=manual
// (OpenSession.failover) PrimaryLost and silence only make the session wait ("primary-lost",
// twin paused) for force_failover() (`ftctl failover --force VM` on this host). A protocol violation or an
// explicit Disable destroys the twin instead: the primary is alive then, and two running
// copies must never exist. A session without a committed checkpoint never activates.
//
// The session's fate is settled exactly once (Fate): the twin is either resumed (Activating)
// or dropped (Dropped), never both, whichever comes first of the session's own decision and a
// Resolve from the primary (resolve(), another thread). Activation on silence additionally
// needs the arbiter's Yes (checkpoint/arbiter.h); PrimaryLost and a planned Activate do not
// (the primary itself says its copy is gone or stopped for good).
#pragma once

#include <sys/types.h>

#include <atomic>
#include <condition_variable>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>

#include <nlohmann/json.hpp>

#include "checkpoint/arbiter.h"
#include "checkpoint/disk_journal.h"
#include "checkpoint/failover.h"
#include "checkpoint/protocol.h"
#include "checkpoint/replica.h"
#include "tools/ftd/session.h"
#include "transport/transport.h"
#include "vmm-glue/process.h"
#include "vmm-glue/libvirt.h"
#include "vmm-glue/libvirt_xml.h"
#include "vmm-glue/qemu_cmdline.h"
#include "vmm-glue/qmp.h"

namespace ftvm::ftd {

// Makes `vm_dir` (a directory inside `run_dir`, ftd's --run-dir) reachable for QEMU running as
// another user (libvirt's): adds o+x to vm_dir and its parents up to run_dir, which ftd owns.
// Directories above run_dir are the operator's and are never changed: if one is not searchable
// by others, throws ftvm::Error naming it and the fix. Throws SysError when stat/chmod fail.
void make_run_dir_reachable(const std::string& vm_dir, const std::string& run_dir);

class StandbySession {
 public:
  // `claim` is called with the VM name from OpenSession before a twin is created; it throws
  // to refuse the session (e.g. the VM already failed over to this host).
  using Claim = std::function<void(const std::string& name, StandbySession* self)>;
  // Hands a second-path connection to the session with that id; false if there is none.
  using Adopt = std::function<bool(uint64_t session_id, std::unique_ptr<transport::Connection>& conn)>;
  // Answers a Resolve (a fresh connection from a primary whose session broke); see protocol.h.
  using Resolver = std::function<checkpoint::Resolution(const checkpoint::Resolve&, const StandbySession& from)>;
  // Called on the session thread after the twin took over and the session let go of it, with
  // the VM name, the twin's QMP socket (plain QEMU) or libvirt domain UUID (the other one ""),
  // "host:port" to protect it towards (reprotect=auto) and the VM's failover policy.
  using Reprotect = std::function<void(const std::string& vm, const std::string& qmp, const std::string& domain,
                                       const std::string& peer, const std::string& failover)>;
  void set_reprotect(Reprotect r) { reprotect_ = std::move(r); }
  StandbySession(const DaemonConfig& cfg, std::unique_ptr<transport::Connection> conn, Claim claim, Adopt adopt,
                 Resolver resolver, std::shared_ptr<checkpoint::Arbiter> arbiter);
  ~StandbySession();

  void start();
  // Ends the session without activating: the twin is destroyed (unless already active).
  void abort(const std::string& why);
  // ftd stops: as abort(), except that a failover=manual twin waiting in primary-lost (and
  // recorded, standby_persist.h) is left paused for the next ftd instead of being destroyed.
  void shutdown(const std::string& why) {
    shutdown_ = true;
    abort(why);
  }
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
  // Whether `host` is this session's primary: the data connection's host, or the address the
  // OpenSession declared for the second path (a second network). Thread-safe.
  bool is_primary_host(const std::string& host) const {
    std::lock_guard<std::mutex> g(mu_);
    return host == peer_host_ || (!second_path_host_.empty() && host == second_path_host_);
  }
  // Whether a checkpoint was ever committed (the twin holds a usable replica).
  bool committed_any() const {
    std::lock_guard<std::mutex> g(mu_);
    return committed_ > 0;
  }
  // Thread-safe: takes `conn` as this session's second path if `session_id` is ours and `conn`
  // comes from the primary's host (is_primary_host) with the same key (else logs why and
  // returns false).
  bool adopt_heartbeat_link(uint64_t session_id, std::unique_ptr<transport::Connection>& conn);
  nlohmann::json status() const;
  uint64_t session_id() const { return sid_; }
  // The twin's QEMU pid (-1 before it exists / after it was destroyed); stable once finished().
  pid_t twin_pid() const { return twin_pid_; }

  // Thread-safe. Settles this session's fate for the primary's Resolve: a twin not yet being
  // resumed is dropped for good (the session ends and destroys it); returns the verdict.
  checkpoint::Verdict resolve(std::string& text);

  using Fate = checkpoint::failover::Fate;

  // `ftctl failover --force VM` on this host: the operator (or a cluster manager) decides that
  // the VM runs here now, from the last committed checkpoint. Thread-safe; blocks until the
  // session thread answered or `timeout`. It overrides only the failover=manual hold (and works
  // the same for failover=auto, whose twin resumes by itself anyway); never the safety rules:
  //  * Refused while the primary is heard on any path within the heartbeat timeout, unless it
  //    reported its QEMU dead (PrimaryLost): that primary runs the guest.
  //  * Refused without a committed checkpoint (nothing to resume).
  //  * On silence the arbiter is asked again: Yes resumes; Wait answers Code::Wait (retry);
  //    Fence drops the twin (Code::Refused): this side lost.
  //  * A Resolve from the primary that came first (it runs on alone) wins: Refused.
  enum class ForceCode { Done, Refused, Wait, Failed };
  struct ForceResult {
    ForceCode code = ForceCode::Failed;
    std::string text;
  };
  ForceResult force_failover(std::chrono::milliseconds timeout);

 private:
  // Moves the fate from Open to `f` (true), or reports whether it already is `f`.
  bool settle(Fate f);
  Fate fate() const;
  // Silence: asks the arbiter whether the twin may be resumed; true = go ahead.
  bool arbiter_allows_activation(std::chrono::milliseconds silent_for);
  // checkpoint/failover.h, StandbyView::watched: a gap of T or more between two polls of the
  // session thread makes the session unwatched until a Commit arrives T after the gap.
  void note_poll();
  std::chrono::steady_clock::time_point last_poll_{};
  std::optional<std::chrono::steady_clock::time_point> unwatched_since_;
  void run();
  void open(const checkpoint::OpenSession& o);
  void check_memory_for(const checkpoint::OpenSession& o);
  vmm::TwinPolicy twin_policy() const;  // what this session's twin may run and touch
  bool handle(const transport::ControlMessage& m);  // false = session over
  // `reported_dead`: the primary itself said its QEMU is gone (PrimaryLost).
  void primary_silent(const std::string& why, bool reported_dead = false);
  // failover=manual: keeps the paused twin until force_failover() (true: resume now) or until
  // the session ends otherwise (false: Resolve, Disable, abort, arbiter Fence; twin destroyed).
  bool await_operator(const std::string& why, bool reported_dead);
  // Session thread: answers a pending force_failover() that cannot proceed now (the primary is
  // heard, nothing committed); no-op otherwise.
  void check_force(bool reported_dead);
  bool force_pending() const;
  // standby_persist.cc: records the waiting twin under STATE_DIR/manual-wait (primary-lost with
  // failover=manual) so that a restarted ftd adopts it; forgets that record once the twin is
  // resumed or dropped; on shutdown() leaves the recorded twin paused (true) instead of
  // destroying it.
  void persist_manual_wait(bool reported_dead);
  void forget_manual_wait();
  bool keep_for_restart();
  bool manual_persisted_ = false;  // session thread
  std::atomic<bool> shutdown_{false};
  void answer_force(ForceCode c, const std::string& text);
  mutable std::mutex force_mu_;
  std::condition_variable force_cv_;
  bool force_requested_ = false;           // under force_mu_
  std::optional<ForceResult> force_result_;  // under force_mu_
  bool failover_manual_ = false;            // from OpenSession
  std::string origin_;                      // the primary ftd's node name (OpenSession)
  std::string history_in_;                  // the VM's history as received in OpenSession
  nlohmann::json local_events_ = nlohmann::json::array();  // under mu_: recorded by this session
  void activate(const std::string& reason, double declared_wall_ms);
  void activation_failed(const std::string& why);
  void destroy_twin(const std::string& why);
  void set_state(const std::string& s, const std::string& reason = {});

  DaemonConfig cfg_;
  std::unique_ptr<transport::Connection> conn_;
  Claim claim_;
  Adopt adopt_;
  Resolver resolver_;
  Reprotect reprotect_;
  uint32_t reprotect_port_ = 0;  // from OpenSession
  std::string second_path_host_;  // from OpenSession (guarded by mu_)
  std::shared_ptr<checkpoint::Arbiter> arbiter_;
  bool suspect_sent_ = false;
  std::chrono::steady_clock::time_point arbiter_log_{};
  checkpoint::ArbiterAnswer last_answer_ = checkpoint::ArbiterAnswer::Invalid;
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
  // The paused twin's process: a twin that dies before it was resumed ends the session with an
  // Error (the primary settles and resynchronizes with a new twin) instead of acking epochs into
  // the RAM of a dead process and failing at activation.
  std::unique_ptr<vmm::ProcessWatch> twin_watch_;
  void check_twin_alive();
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
  bool ram_region_open_ = false;  // region 1 (twin RAM) registered: only until the first Commit
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
  checkpoint::failover::FateCell fate_;
  std::string abort_reason_;
  std::string abort_reason() const {
    std::lock_guard<std::mutex> g(mu_);
    return abort_reason_;
  }
  std::thread thread_;
};

}  // namespace ftvm::ftd
