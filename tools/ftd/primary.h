// PrimarySession: protects one running QEMU guest: tracks its written pages, cuts a checkpoint
// every epoch, streams it to the standby ftd and keeps the guest running whatever the standby
// does. One thread per session; the control thread talks to it only through the methods
// below, which are thread-safe.
//
// States: connecting -> syncing -> protected; any link failure -> settling -> degraded (the
// guest runs on unprotected; the session reconnects and starts a fresh full sync) or
// failed-over (the twin runs: this QEMU is fenced); planned failover -> failed-over; QEMU died
// -> primary-lost; disable -> disabled; the guest powered itself off (QMP SHUTDOWN with
// guest=true) -> shut-down (the twin is destroyed, nothing fails over).
//
// Split brain (docs/ARCHITECTURE.md): once the standby holds a checkpoint it may resume the
// twin after `heartbeat_timeout` of silence. So whenever this side loses the session (link
// error, no frame from the standby for half that timeout, a Suspect, no ack) it pauses the
// guest and keeps its output held ("settling") until it knows it is the only copy: the standby
// answers a Resolve (protocol.h) with "dropped"/"unknown", or the arbiter says Yes. "active"
// (or an arbiter's Fence) kills the guest here. The guard (guard.h) kills QEMU when ftd itself
// stops pinging it for 0.8 x the standby's timeout (ftd hung, stopped or dead).
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <future>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "checkpoint/digest.h"
#include "checkpoint/protocol.h"
#include "checkpoint/staging.h"
#include "checkpoint/stats.h"
#include "checkpoint/tracker.h"
#include "common/fd.h"
#include "tools/ftd/disk_mirror.h"
#include "tools/ftd/guard.h"
#include "tools/ftd/history.h"
#include "tools/ftd/output_buffer.h"
#include "tools/ftd/session.h"
#include "transport/select.h"
#include "transport/transport.h"
#include "vmm-glue/libvirt.h"
#include "vmm-glue/process.h"
#include "vmm-glue/qmp.h"

namespace ftvm::ftd {

class PrimarySession {
 public:
  // Connects to the guest's QMP socket and checks that the VM can be protected; throws
  // ftvm::Error listing every problem (nothing is changed in the VM then).
  PrimarySession(const DaemonConfig& cfg, EnableRequest req);
  ~PrimarySession();

  void start();
  const std::string& name() const { return name_; }
  const std::string& domain_uuid() const { return domain_uuid_; }  // "" for plain QEMU
  // libvirt domains: writes (element non-empty) or removes the ftvm protection element in the
  // domain's live and persistent XML. Thread-safe (libvirt handles are).
  void set_protection_metadata(const std::string& element);
  nlohmann::json status() const;
  bool finished() const { return finished_; }

  // Planned switchover: final checkpoint with the guest paused, standby activates, primary
  // QEMU quits. Returns a human-readable summary; throws ftvm::Error when it could not be
  // done (the guest then keeps running here).
  std::string failover(std::chrono::milliseconds timeout);
  // Ends protection: the standby destroys the twin; the guest here is untouched.
  std::string disable(std::chrono::milliseconds timeout);
  void inject_fault(Fault f);

 private:
  enum class CmdKind { Failover, Disable };
  struct Command {
    CmdKind kind;
    std::promise<std::string> done;
  };

  void run();
  void connect_and_sync();
  void wait_for_epoch_boundary();
  void checkpoint(bool final);
  void send_epoch(uint64_t epoch, bool final);
  void send_ram_pages(const std::vector<uint64_t>& pages);
  void wait_ack(uint64_t epoch);
  void handle(const transport::ControlMessage& m);
  void pump(std::chrono::milliseconds timeout);
  void process_events();
  void keepalive();
  bool qemu_exits_within(std::chrono::milliseconds t);
  std::optional<transport::ControlMessage> next_message(std::chrono::milliseconds timeout);
  std::deque<transport::ControlMessage> pending_, pending_hb_;  // received inside keepalive()
  std::string link_error_;                                      // ditto: the link broke
  bool in_keepalive_ = false;
  bool saw_guest_shutdown();
  void guest_shut_down(const std::string& why);
  std::string guest_shutdown_;  // SHUTDOWN reason when the guest powered itself off
  void check_qemu();
  void primary_lost(const std::string& why);
  void link_failed(const std::string& why, bool activate_sent = false);
  // Pauses the guest and settles the broken session (Resolve / arbiter). True: this side is the
  // only copy (guest resumed, output released); false: the guest was fenced here.
  bool settle_broken_session(const std::string& why, bool activate_sent);
  // One Resolve round trip on a fresh connection; nullopt when the standby cannot be reached.
  std::optional<checkpoint::Resolution> try_resolve(uint64_t sid);
  std::optional<checkpoint::Resolution> try_resolve_at(uint64_t sid, const std::string& host, uint16_t port,
                                                       const transport::Options& o, std::string& failures);
  void fence_self(const std::string& why);
  std::chrono::milliseconds standby_silence() const;
  void ping_guard();
  std::shared_ptr<checkpoint::Arbiter> arbiter_;     // this VM's (ftd's, or none by request)
  std::chrono::milliseconds standby_timeout_{400};  // from SessionReady
  std::chrono::milliseconds guard_watchdog_{240};   // what the guard was armed with
  bool commit_sent_this_session_ = false;             // the standby may hold a checkpoint
  bool activate_sent_ = false;                        // planned failover: never resume on our own
  std::chrono::steady_clock::time_point last_standby_frame_{};             // last frame heard from the standby
  std::chrono::steady_clock::time_point last_guard_ping_{};
  void ensure_running();
  bool service_command();
  std::string do_failover();
  std::string do_disable();
  void set_state(const std::string& s, const std::string& reason = {});
  std::string exec_with_fd_into_fdset(int fd);
  void read_device_state();
  void add_devstate_fd();
  uint64_t devstate_gen_ = 0;

  DaemonConfig cfg_;
  EnableRequest req_;
  std::string name_;
  std::unique_ptr<History> history_;  // this VM's (history.h); set in the constructor
  std::string host_;
  uint16_t port_ = 0;
  // The standby's second address (`ftctl enable --peer-alt`, a second NIC); "" = none. The
  // second path goes there, Resolve tries it after host_, and the data path falls back to it.
  std::string alt_host_;
  uint16_t alt_port_ = 0;

  // libvirt domains: fresh handles are opened by UUID when needed (libvirtd may restart).
  std::string libvirt_uri_, domain_uuid_, domain_xml_;  // all "" for plain QEMU
  void mark_failed_over(const std::string& why);
  void set_marker(const char* kind, bool present, const std::string& why);

  // VM handles (session thread only after start()).
  std::unique_ptr<vmm::Monitor> qmp_;
  pid_t qemu_pid_ = -1;
  std::vector<std::string> argv_;
  uint64_t ram_size_ = 0;
  std::unique_ptr<vmm::MappedRam> ram_;
  std::unique_ptr<vmm::ProcessWatch> watch_;
  std::unique_ptr<checkpoint::DirtyTracker> tracker_;
  std::unique_ptr<Guard> guard_;
  // Output commit (null when the VM has no netdev or --no-output-commit): guest frames are
  // held per epoch and released on the standby's ack; see output_buffer.h.
  std::unique_ptr<OutputBuffer> output_;
  // Disk replication (null when the VM has no writable disk); see disk_mirror.h.
  std::unique_ptr<DiskMirror> disks_;
  void wait_disks_ready();
  UniqueFd devstate_rw_, devstate_wo_;
  std::string devstate_path_;
  bool paused_by_us_ = false;

  // Replication state (session thread).
  std::unique_ptr<transport::Connection> conn_;
  std::unique_ptr<transport::Connection> hb_;  // the second path (TCP) beside the data path
  // Where the second path goes this session (the address the data path does not use when
  // there are two; else the data path's) and the re-dial of a lost second path, off-thread
  // (a connect must not stall an epoch): started at most once a second while protected.
  std::string hb_host_, hb_peer_;
  uint16_t hb_port_ = 0;
  std::future<std::unique_ptr<transport::Connection>> hb_dial_;
  std::chrono::steady_clock::time_point hb_dial_at_{};
  uint64_t hb_dial_sid_ = 0;  // the session the re-dial announces itself for
  std::string hb_state_ = "none";  // for status: "up", "down (...)", "redialing", "none"
  void dial_second_path_async();
  void set_hb_state(std::string s) {
    std::lock_guard<std::mutex> g(mu_);
    hb_state_ = std::move(s);
  }
  void adopt_redialed_second_path();
  template <typename T> void send_both(const T& m);
  transport::Kind transport_kind_ = transport::Kind::Auto;
  std::span<const std::byte> registered_staging_;  // RDMA: the staging allocation registered as a source
  void register_sources(bool ram);
  uint64_t session_id_ = 0;
  uint64_t capacity_ = 0;
  uint64_t epoch_ = 0;        // last epoch cut
  uint64_t inflight_ = 0;     // epoch committed but not yet acked (0 = none)
  unsigned retransmits_ = 0;
  std::chrono::steady_clock::time_point commit_sent_, last_cont_;
  std::chrono::steady_clock::duration last_pause_{};  // of the last epoch cut (output cuts wait at least this)
  checkpoint::EpochStager stager_;
  std::unique_ptr<checkpoint::RamDigest> ram_digest_;
  std::vector<uint64_t> dirty_, carry_;
  std::optional<checkpoint::EpochRecord> pending_rec_;
  UniqueFd stats_fd_;
  std::atomic<Fault> fault_{Fault::None};

  // Shared with the control thread.
  mutable std::mutex mu_;
  std::string state_ = "connecting", reason_;
  std::string tracker_name_;
  pid_t guard_pid_ = -1;
  uint64_t last_acked_ = 0;
  uint64_t epochs_cut_ = 0, rejected_ = 0, resyncs_ = 0;
  checkpoint::EpochRecord last_rec_;
  checkpoint::Window pause_ms_{2000}, pages_{2000}, bytes_{2000}, ack_ms_{2000};
  double sync_ms_ = 0;
  uint64_t sync_pages_ = 0;
  unsigned sync_passes_ = 0;
  uint64_t last_ram_digest_ = 0;
  std::string link_peer_, link_backend_, link_security_;
  double link_idle_ms_ = 0;
  uint64_t bytes_sent_total_ = 0;
  std::deque<std::pair<std::chrono::steady_clock::time_point, uint64_t>> tput_;
  double acked_cut_wall_ms_ = 0;
  double inflight_cut_wall_ms_ = 0;
  std::deque<std::unique_ptr<Command>> commands_;

  std::thread thread_;
  std::atomic<bool> finished_{false};
  std::atomic<bool> stop_{false};
};

}  // namespace ftvm::ftd
