#include "tools/ftd/primary.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <random>

#include "checkpoint/failover.h"
#include "common/error.h"
#include "common/log.h"
#include "transport/tcp/tcp_transport.h"
#include "vmm-glue/qemu_cmdline.h"
#include "transport/address.h"
#include "transport/select.h"
#include "vmm-glue/libvirt_xml.h"
#include "vmm-glue/tracker_factory.h"

namespace ftvm::ftd {

using checkpoint::kPageSize;
using checkpoint::MsgType;
using Clock = std::chrono::steady_clock;
namespace cp = checkpoint;

namespace {

// The QEMU process is gone; the session ends (the standby takes over).
class QemuGone : public Error {
 public:
  using Error::Error;
};

// The guest powered itself off (QMP SHUTDOWN with guest=true): protection ends, the twin is
// destroyed; nothing fails over (the VM is meant to be off everywhere).
class GuestShutdown : public Error {
 public:
  using Error::Error;
};

double us_between(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double, std::micro>(b - a).count();
}

uid_t process_uid(pid_t pid) {
  auto path = fmt::format("/proc/{}/status", pid);
  FILE* f = ::fopen(path.c_str(), "re");
  if (!f) throw SysError(errno, "open " + path);
  char line[256];
  long uid = -1;
  while (::fgets(line, sizeof line, f))
    if (std::sscanf(line, "Uid: %ld", &uid) == 1) break;
  ::fclose(f);
  if (uid < 0) fail("no Uid line in {}", path);
  return static_cast<uid_t>(uid);
}

std::string default_name(const std::vector<std::string>& argv, const std::string& qmp_path) {
  for (size_t i = 0; i + 1 < argv.size(); i++) {
    if (argv[i] == "-name" || argv[i] == "--name") {
      for (const auto& kv : vmm::split_keyval(argv[i + 1])) {
        if (kv.rfind("guest=", 0) == 0) return kv.substr(6);
        if (kv.find('=') == std::string::npos) return kv;
      }
    }
  }
  auto base = qmp_path.substr(qmp_path.find_last_of('/') + 1);
  auto dot = base.find('.');
  return dot == std::string::npos ? base : base.substr(0, dot);
}

}  // namespace

PrimarySession::PrimarySession(const DaemonConfig& cfg, EnableRequest req) : cfg_(cfg), req_(std::move(req)) {
  if (req_.epoch_ms < 1 || req_.epoch_ms > 10000)
    fail("--epoch-ms {} is out of range (1..10000 ms; 25 is the default)", req_.epoch_ms);
  auto hp = transport::tcp::parse_host_port(req_.peer);
  host_ = hp.host;
  port_ = hp.port ? hp.port : 7410;
  if (!req_.peer_alt.empty()) {
    auto alt = transport::tcp::parse_host_port(req_.peer_alt);
    alt_host_ = alt.host;
    alt_port_ = alt.port ? alt.port : port_;
    if (alt_host_ == host_ && alt_port_ == port_)
      fail("--peer-alt {} is the same address as --peer {}: give the standby's address on a second network (its "
           "`ftd --listen-also`), or leave --peer-alt out", req_.peer_alt, req_.peer);
  }
  std::vector<std::string> problems;
  if (!req_.domain.empty()) {
    // A libvirt domain: libvirt owns QEMU's monitor; ftd goes through libvirt's QMP passthrough.
    const std::string uri = req_.libvirt_uri.empty() ? cfg_.libvirt_uri : req_.libvirt_uri;
    if (uri.empty()) fail("ftd runs without libvirt (--libvirt-uri ''); cannot protect domain '{}'", req_.domain);
    auto conn = vmm::lv::Connection::open(uri);
    auto dom = vmm::lv::Domain::lookup(conn, req_.domain);
    libvirt_uri_ = conn.uri();
    name_ = dom.name();
    domain_uuid_ = dom.uuid();
    if (!dom.active())
      fail("libvirt domain '{}' is not running ({}); start it first (virsh start {})", name_, dom.state().str(), name_);
    domain_xml_ = dom.xml(false, false, /*migratable=*/true);
    for (const auto& i : vmm::prepare_check(domain_xml_))
      problems.push_back(fmt::format("{} -- fix: {}{}", i.what, i.fix, i.needs_restart ? " (takes effect after a domain restart)" : ""));
    if (!problems.empty())
      problems.push_back(fmt::format("`ftctl prepare {0} --yes` applies the fixable settings to the persistent definition; "
                                     "then restart the domain (virsh shutdown {0}; virsh start {0}) and enable again", name_));
    qemu_pid_ = dom.qemu_pid();
    qmp_ = std::make_unique<vmm::LibvirtMonitor>(conn, dom);  // keeps its own references
  } else {
    qmp_ = std::make_unique<vmm::QmpClient>(vmm::QmpClient::connect(req_.qmp_socket));
    qemu_pid_ = static_cast<vmm::QmpClient&>(*qmp_).peer_pid();
  }
  qmp_->set_idle_hook([this] { keepalive(); }, std::max(std::chrono::milliseconds(5), cfg_.heartbeat_interval / 2));
  argv_ = vmm::read_cmdline(qemu_pid_);
  if (name_.empty()) name_ = req_.name.empty() ? default_name(argv_, req_.qmp_socket) : req_.name;

  bool incoming_completed = false;
  if (std::find(argv_.begin(), argv_.end(), "-incoming") != argv_.end()) {
    // A twin that took over (here, from an earlier failover) still carries `-incoming defer`:
    // once its incoming migration completed it is an ordinary guest and may be protected again.
    try {
      incoming_completed = qmp_->execute("query-migrate").value("status", "") == "completed";
    } catch (const std::exception& e) {
      log::warn("primary", "{}: query-migrate: {}", name_, e.what());
    }
  }
  if (problems.empty()) problems = vmm::check_protectable(argv_, incoming_completed);
  if (incoming_completed)
    log::info("primary", "{}: QEMU pid {} was a migration target whose state arrived (a twin that took over): "
              "protecting it like any running guest", name_, qemu_pid_);
  auto st = qmp_->execute("query-status");
  const std::string run_state = st.value("status", "");
  if (run_state != "running" && run_state != "paused")
    problems.push_back(fmt::format("the VM is in state '{}'; only a running (or paused) VM can be protected", run_state));
  std::string why;
  const auto tracker_kind = vmm::parse_tracker_kind(cfg_.tracker);
  why = vmm::tracker_unavailable(tracker_kind);
  if (!why.empty()) problems.push_back("dirty-page tracking unavailable: " + why);
  transport_kind_ = transport::parse_kind(req_.transport);
  arbiter_ = cfg_.arbiter ? cfg_.arbiter : checkpoint::make_no_arbiter(cfg_.alone_after);
  if (req_.arbiter == "none" && arbiter_->kind() != "none") {
    log::warn("primary", "{}: this VM opts out of arbitration (arbiter=none): a partition between the two live hosts "
              "runs two copies of it", name_);
    arbiter_ = checkpoint::make_no_arbiter(cfg_.alone_after);
  } else if (!req_.arbiter.empty() && req_.arbiter != arbiter_->kind()) {
    problems.push_back(fmt::format("arbiter '{}' requested, but this ftd arbitrates with '{}' (ftd --arbiter); give "
                                   "--arbiter {} or none, or configure ftd", req_.arbiter, arbiter_->kind(),
                                   arbiter_->kind()));
  }
  if (req_.reprotect != "auto" && req_.reprotect != "manual")
    problems.push_back(fmt::format("reprotect '{}' is not one of auto, manual", req_.reprotect));
  if (req_.failover != "auto" && req_.failover != "manual")
    problems.push_back(fmt::format("failover '{}' is not one of auto, manual", req_.failover));
  if (req_.shared_disk)
    problems.push_back("--shared-disk is refused: with one disk seen by both hosts, the twin would resume checkpoint N "
                       "on a disk that already holds the primary's writes made after N (a filesystem can be "
                       "corrupted by that); holding every write until its epoch commits is not implemented. Give "
                       "each host its own copy (the default: ftvm replicates the disk)");
  auto disks = find_disks(*qmp_, problems);
  if (!disks.empty() && !domain_uuid_.empty()) {
    vmm::TwinXmlOptions to;
    for (size_t i = 0; i < disks.size(); i++) to.disk_files[disks[i].source] = fmt::format("/nonexistent/{}.img", i);
    try {
      vmm::twin_xml(domain_xml_, to);
    } catch (const std::exception& e) {
      problems.push_back(e.what());
    }
  } else if (!disks.empty()) {
    // The twin's command line must be buildable with replicas in place of these images.
    vmm::TwinOptions to;
    to.run_dir = "/nonexistent";
    to.qmp_socket = "/nonexistent/qmp.sock";
    for (size_t i = 0; i < disks.size(); i++) to.disk_files[disks[i].source] = fmt::format("/nonexistent/{}.img", i);
    try {
      vmm::make_twin_cmdline(argv_, to);
    } catch (const std::exception& e) {
      problems.push_back(e.what());
    }
  }
  if (!problems.empty()) {
    std::string msg = fmt::format("VM '{}' (QEMU pid {}, {}) cannot be protected:", name_, qemu_pid_, qmp_->describe());
    for (const auto& p : problems) msg += "\n  - " + p;
    throw Error(msg);
  }
  // The running side holds what the arbiter hands it (sanlock: this VM's lease); protection is
  // refused when it cannot (the VM's lease held by another host, storage unreachable).
  {
    cp::ArbiterSubject subj{name_, host_};
    subj.guest_pid = qemu_pid_;
    arbiter_->runs_here(subj, std::chrono::seconds(30));
  }
  history_ = std::make_unique<History>(cfg_.state_dir, name_);

  // The main RAM backend: the memdev the tracker and the copies work on.
  auto memdevs = qmp_->execute("query-memdev");
  if (!memdevs.is_array() || memdevs.size() != 1)
    fail("VM '{}': expected exactly one memory backend from query-memdev, got {}", name_, memdevs.dump());
  ram_size_ = memdevs[0].value("size", uint64_t{0});
  auto gr = vmm::find_guest_ram(qemu_pid_, ram_size_);
  ram_ = std::make_unique<vmm::MappedRam>(qemu_pid_, gr, vmm::MappedRam::Access::ReadOnly);
  watch_ = std::make_unique<vmm::ProcessWatch>(qemu_pid_);
  tracker_ = vmm::make_tracker(tracker_kind, qemu_pid_, gr.addr, gr.size);
  ram_digest_ = std::make_unique<cp::RamDigest>(ram_size_ / kPageSize);
  tracker_name_ = tracker_->name();

  // Device state goes into a memfd that QEMU writes through /dev/fdset/N. QEMU insists on
  // the access mode it asks for (O_WRONLY), so it gets a write-only description of the same
  // file; ftd reads through its own read-write one.
  devstate_rw_.reset(check_sys(::memfd_create(("ftvm-devstate-" + name_).c_str(), MFD_CLOEXEC),
                               "memfd_create for device state"));
  devstate_wo_.reset(check_sys(::open(fmt::format("/proc/self/fd/{}", devstate_rw_.get()).c_str(), O_WRONLY | O_CLOEXEC),
                               "reopen device-state memfd write-only"));
  add_devstate_fd();

  if (!cfg_.stats_dir.empty()) {
    auto p = fmt::format("{}/{}.epochs.jsonl", cfg_.stats_dir, name_);
    stats_fd_.reset(::open(p.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
    if (!stats_fd_) throw SysError(errno, "open stats file " + p, "check --stats-dir");
  }
  // Output commit: divert the guest's transmitted frames through ftd (last: it changes the VM).
  if (cfg_.output_commit) {
    const auto netdevs = guest_netdevs(argv_);
    if (!netdevs.empty()) {
      output_ = std::make_unique<OutputBuffer>(name_, OutputOptions{cfg_.output_cap_bytes, true});
      try {
        for (const auto& n : netdevs) output_->attach(*qmp_, n, cfg_.run_dir);
      } catch (...) {
        output_->detach(*qmp_);  // what was attached goes away again
        throw;
      }
      output_->start();
    }
  }
  if (!disks.empty())
    disks_ = std::make_unique<DiskMirror>(name_, cfg_.run_dir, std::move(disks), qemu_pid_, process_uid(qemu_pid_),
                                          DiskMirror::Options{cfg_.disk_queue_bytes});
  std::random_device rd;
  session_id_ = (uint64_t{rd()} << 32) | rd();
  log::info("primary", "{}: QEMU pid {}, RAM {} MiB at {:#x} ({}), tracker {}, epoch {} ms, {} disk(s), standby {}:{}",
            name_, qemu_pid_, ram_size_ >> 20, gr.addr, gr.backing, tracker_->name(), req_.epoch_ms,
            disks_ ? disks_->infos().size() : 0, host_, port_);
}

PrimarySession::~PrimarySession() {
  stop_ = true;
  if (thread_.joinable()) thread_.join();
}

void PrimarySession::start() {
  guard_ = std::make_unique<Guard>(qemu_pid_, name_.c_str());
  {
    std::lock_guard<std::mutex> g(mu_);
    guard_pid_ = guard_->pid();
  }
  thread_ = std::thread([this] { run(); });
}

void PrimarySession::set_state(const std::string& s, const std::string& reason) {
  std::lock_guard<std::mutex> g(mu_);
  if (s != state_) log::info("primary", "{}: state {} -> {}{}{}", name_, state_, s, reason.empty() ? "" : ": ", reason);
  state_ = s;
  reason_ = reason;
}

void PrimarySession::inject_fault(Fault f) {
  fault_ = f;
  log::warn("primary", "{}: fault injection armed", name_);
}

// ---------------------------------------------------------------------------------------------
// Thread body

void PrimarySession::run() {
  while (!stop_) {
    try {
      if (!conn_) connect_and_sync();
      if (service_command()) break;
      wait_for_epoch_boundary();
      if (service_command()) break;
      checkpoint(false);
    } catch (const GuestShutdown& e) {
      guest_shut_down(e.what());
      break;
    } catch (const QemuGone& e) {
      if (saw_guest_shutdown()) {
        guest_shut_down("the guest shut itself down and QEMU exited");
        break;
      }
      primary_lost(e.what());
      break;
    } catch (const LinkDown& e) {
      link_failed(e.what(), activate_sent_);
    } catch (const ProtocolError& e) {
      link_failed(e.what(), activate_sent_);
    } catch (const std::exception& e) {
      // A failure on the QEMU side (QMP, tracker, guest memory). QEMU may be dying right now:
      // its sockets close before its pidfd reports the exit, so give it time to finish. A
      // guest that powered off makes `cont` fail (QEMU wants a reset) or QEMU exit.
      if (saw_guest_shutdown()) {
        guest_shut_down(std::string("the guest shut itself down (") + e.what() + ")");
        break;
      }
      if (qemu_exits_within(std::chrono::milliseconds(2000))) {
        if (saw_guest_shutdown()) {
          guest_shut_down("the guest shut itself down and QEMU exited");
          break;
        }
        primary_lost(fmt::format("primary QEMU (pid {}) exited ({})", qemu_pid_, e.what()));
        break;
      }
      if (!qmp_->connected()) {
        // QEMU lives but cannot be checkpointed or controlled any more. It must not run on
        // beside a twin that may take over: fence it, and let the standby resume the guest.
        watch_->send_signal(SIGKILL);
        primary_lost(fmt::format("lost control of the primary QEMU (pid {}): {}; killed it so the standby "
                                 "resumes the guest from the last checkpoint", qemu_pid_, e.what()));
        break;
      }
      link_failed(e.what(), activate_sent_);
    }
  }
  // Whatever happened, never leave the guest paused behind, nor its output diverted.
  try {
    // Not while settling either: a paused guest whose twin may run stays paused (the guard,
    // still armed, fences it when ftd exits).
    if (state_ != "failed-over" && state_ != "primary-lost" && state_ != "shut-down" && state_ != "settling") {
      ensure_running();
      if (output_ && qmp_->connected()) output_->detach(*qmp_);
    }
  } catch (const std::exception& e) {
    log::error("primary", "{}: could not resume the guest: {}", name_, e.what());
  }
  std::deque<std::unique_ptr<Command>> left;
  {
    std::lock_guard<std::mutex> g(mu_);
    left.swap(commands_);
  }
  for (auto& c : left) c->done.set_exception(std::make_exception_ptr(Error("session of " + name_ + " ended: " + state_)));
  finished_ = true;
}

void PrimarySession::primary_lost(const std::string& why) {
  log::error("primary", "{}: {}", name_, why);
  if (conn_) {
    try {
      send_both(cp::PrimaryLost{session_id_, why});
    } catch (const std::exception& e2) {
      log::warn("primary", "{}: could not tell the standby: {}", name_, e2.what());
    }
  }
  set_state("primary-lost", why);
  history_->append({{"event", "primary-lost"}, {"reason", why.substr(0, 300)},
                    {"standby", last_acked_ > 0 && conn_ ? (link_peer_.empty() ? req_.peer : link_peer_) : ""},
                    {"failover", req_.failover}});
  if (conn_ && last_acked_ > 0) mark_failed_over(why);  // the standby resumes the twin
  else set_marker("protected", false, {});
}

void PrimarySession::set_protection_metadata(const std::string& element) {
  if (domain_uuid_.empty()) fail("VM '{}' is not a libvirt domain", name_);
  // A fresh connection: libvirtd may have restarted since enable.
  auto conn = vmm::lv::Connection::open(libvirt_uri_);
  auto dom = vmm::lv::Domain::lookup(conn, domain_uuid_);
  const bool persistent = dom.persistent();
  if (element.empty()) dom.remove_metadata(vmm::kProtectionNs, dom.active(), persistent);
  else dom.set_metadata(element, vmm::kProtectionPrefix, vmm::kProtectionNs, dom.active(), persistent);
}

// Markers for the libvirt hook (tools/hook/ftvm_hook.cc), which refuses to start a domain here
// while either exists: STATE_DIR/protected/<uuid> while the domain is protected (a committed
// checkpoint on the standby; if ftd or this host dies, the twin takes over and the marker stays
// behind), STATE_DIR/failed-over/<uuid> once the twin took over. `ftctl release` removes them.
void PrimarySession::set_marker(const char* kind, bool present, const std::string& why) {
  if (domain_uuid_.empty()) return;
  const auto dir = cfg_.state_dir + "/" + kind;
  const auto path = dir + "/" + domain_uuid_;
  try {
    if (!present) {
      if (::unlink(path.c_str()) != 0 && errno != ENOENT) throw SysError(errno, "unlink " + path);
      return;
    }
    std::filesystem::create_directories(dir);
    const auto text = fmt::format("domain {} ({}), standby {}, {:.0f} (unix ms): {}\n", name_, domain_uuid_,
                                  link_peer_.empty() ? req_.peer : link_peer_, wall_ms(), why);
    UniqueFd f(::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
    if (!f) throw SysError(errno, "create " + path);
    if (::write(f.get(), text.data(), text.size()) < 0) throw SysError(errno, "write " + path);
  } catch (const std::exception& e) {
    log::error("primary", "{}: marker {}: {}", name_, path, e.what());
  }
}

void PrimarySession::mark_failed_over(const std::string& why) {
  if (domain_uuid_.empty()) return;
  set_marker("failed-over", true, why);
  set_marker("protected", false, {});
  log::info("primary", "{}: marked as failed over ({}/failed-over/{}): libvirt will not start it here until "
            "`ftctl release {}`", name_, cfg_.state_dir, domain_uuid_, name_);
}

bool PrimarySession::saw_guest_shutdown() {
  if (!guest_shutdown_.empty()) return true;
  try {
    process_events();  // also the events queued before the monitor broke
  } catch (const GuestShutdown&) {
    return true;
  } catch (const std::exception&) {
  }
  return !guest_shutdown_.empty();
}

void PrimarySession::guest_shut_down(const std::string& why) {
  log::info("primary", "{}: {}; protection ends and the twin is destroyed (nothing to fail over)", name_, why);
  if (conn_) {
    try {
      send_both(cp::Disable{session_id_});
    } catch (const std::exception& e) {
      log::warn("primary", "{}: could not tell the standby to drop the twin: {}", name_, e.what());
    }
    conn_.reset();
    hb_.reset();
  }
  try {
    if (guard_) guard_->disarm();
  } catch (const std::exception& e) {
    log::warn("primary", "{}: {}", name_, e.what());
  }
  paused_by_us_ = false;  // never `cont` a powered-off guest
  set_marker("protected", false, {});
  set_state("shut-down", why);
}

// Waits up to `t` for the QEMU process to exit, keeping the links alive meanwhile (the standby
// must not take a primary that is only deciding for dead). Never throws.
bool PrimarySession::qemu_exits_within(std::chrono::milliseconds t) {
  const auto until = Clock::now() + t;
  for (;;) {
    if (watch_->wait_exit(std::chrono::milliseconds(10))) return true;
    if (Clock::now() >= until) return false;
    keepalive();
  }
}

void PrimarySession::check_qemu() {
  if (!watch_->alive()) throw QemuGone(fmt::format("primary QEMU (pid {}) exited", qemu_pid_));
}

void PrimarySession::ensure_running() {
  if (!paused_by_us_) return;
  qmp_->execute("cont");
  paused_by_us_ = false;
  last_cont_ = Clock::now();
}

void PrimarySession::link_failed(const std::string& why, bool activate_sent) {
  log::error("primary", "{}: replication to {}:{} failed: {}", name_, host_, port_, why);
  try {
    if (cp::failover::must_settle(commit_sent_this_session_, activate_sent)) {
      // The standby may hold a checkpoint and resume the twin: settle before running on.
      if (!settle_broken_session(why, activate_sent)) {
        stop_ = true;  // fenced here (or ftd stops while settling): the session is over
        return;
      }
    } else {
      // No checkpoint ever reached the standby in this session: its twin can never run.
      if (output_) output_->pass_through("degraded: " + why);  // the guest runs alone: its output is final
      if (disks_ && qmp_->connected()) disks_->stop(*qmp_);  // re-protection starts a new full copy
      ensure_running();
      if (conn_) {
        try {
          send_both(cp::Disable{session_id_});  // best effort: frees the standby's paused twin at once
        } catch (const std::exception&) {
        }
      }
      conn_.reset();
      hb_.reset();
    }
  } catch (const QemuGone& e) {
    if (state_ != "failed-over") set_state("primary-lost", std::string("QEMU died while the session was settled: ") + e.what());
    stop_ = true;
    return;
  } catch (const std::exception& e) {
    log::error("primary", "{}: {}", name_, e.what());
  }
  conn_.reset();
  hb_.reset();
  try {
    guard_->disarm();
  } catch (const std::exception& e) {
    log::error("primary", "{}: {}", name_, e.what());
  }
  inflight_ = 0;
  retransmits_ = 0;
  activate_sent_ = false;
  commit_sent_this_session_ = false;
  set_marker("protected", false, {});  // the standby dropped the twin: this copy is the only one
  set_state("degraded", why);
  // Wait before retrying, still answering commands and noticing QEMU's death.
  auto until = Clock::now() + cfg_.reconnect_interval;
  // Never throws: it runs inside run()'s exception handlers. QEMU's death is noticed again by
  // the next connect attempt.
  try {
    while (!stop_ && Clock::now() < until && watch_->alive()) {
      if (service_command()) {
        stop_ = true;
        return;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
  } catch (const std::exception& e) {
    log::warn("primary", "{}: {}", name_, e.what());
  }
}

void PrimarySession::ping_guard() {
  const auto now = Clock::now();
  if (!guard_ || now - last_guard_ping_ < std::chrono::milliseconds(10)) return;
  last_guard_ping_ = now;
  try {
    guard_->ping();  // a dead guard is replaced here (guard.h)
    if (guard_->pid() != guard_pid_) {
      std::lock_guard<std::mutex> g(mu_);
      guard_pid_ = guard_->pid();
    }
  } catch (const std::exception& e) {
    log::error("primary", "{}: {}", name_, e.what());
    last_guard_ping_ = now + std::chrono::seconds(1);  // QEMU gone: check_qemu() ends the session
  }
}

std::chrono::milliseconds PrimarySession::standby_silence() const {
  auto s = conn_ ? conn_->idle_for() : std::chrono::milliseconds::max();
  if (hb_) s = std::min(s, hb_->idle_for());
  return s;
}

// The twin runs (or an arbiter says this side lost): this guest must not run on. SIGKILL through
// the pidfd; its held output dies with it (never released).
void PrimarySession::fence_self(const std::string& why) {
  watch_->send_signal(SIGKILL);
  log::error("primary", "{}: FENCED: killed the primary QEMU pid {}: {}", name_, qemu_pid_, why);
  paused_by_us_ = false;
  try {
    if (guard_) guard_->disarm();
  } catch (const std::exception&) {
  }
  set_state("failed-over", "fenced: " + why);
  mark_failed_over("fenced: " + why);
}

std::optional<cp::Resolution> PrimarySession::try_resolve(uint64_t sid) {
  transport::Options o;
  o.heartbeat_interval = cfg_.heartbeat_interval;
  o.key = cfg_.key;  // Resolve is honoured only from the authenticated peer (issue 12)
  o.encrypt = cfg_.encrypt;
  // connect() blocks without pinging the guard: stay well inside its watchdog.
  o.connect_timeout = std::max(std::chrono::milliseconds(30), std::min(standby_timeout_ / 2, guard_watchdog_ / 3));
  // Both of the standby's addresses: a Resolve must get through whichever network still works.
  std::vector<std::pair<std::string, uint16_t>> to{{host_, port_}};
  if (!alt_host_.empty()) to.emplace_back(alt_host_, alt_port_);
  std::string failures;
  for (const auto& [h, p] : to) {
    if (auto r = try_resolve_at(sid, h, p, o, failures)) return r;
    ping_guard();
  }
  std::lock_guard<std::mutex> g(mu_);
  reason_ = fmt::format("settling: standby unreachable ({})", failures);
  return std::nullopt;
}

std::optional<cp::Resolution> PrimarySession::try_resolve_at(uint64_t sid, const std::string& host, uint16_t port,
                                                             const transport::Options& o, std::string& failures) {
  try {
    auto c = transport::tcp::connect_tcp(host, port, o);
    cp::send(*c, cp::Resolve{sid, name_});
    c->flush();
    const auto deadline = Clock::now() + std::max(std::chrono::milliseconds(1000), 2 * standby_timeout_);
    while (Clock::now() < deadline) {
      ping_guard();
      auto m = c->poll(std::chrono::milliseconds(20));
      if (!m) continue;
      if (m->type == static_cast<uint16_t>(MsgType::Resolution)) {
        auto r = cp::decode<cp::Resolution>(m->body);
        if (r.session_id != sid) throw ProtocolError("Resolution names another session");
        return r;
      }
      if (m->type == static_cast<uint16_t>(MsgType::Error))
        throw ProtocolError("standby refused Resolve: " + cp::decode<cp::ErrorMsg>(m->body).text);
      throw ProtocolError(fmt::format("standby answered Resolve with {}", cp::to_string(static_cast<MsgType>(m->type))));
    }
    throw LinkDown("no Resolution within the deadline");
  } catch (const std::exception& e) {
    log::debug("primary", "{}: Resolve at {}:{}: {}", name_, host, port, e.what());
    failures += fmt::format("{}{}:{}: {}", failures.empty() ? "" : "; ", host, port, e.what());
    return std::nullopt;
  }
}

bool PrimarySession::settle_broken_session(const std::string& why, bool activate_sent) {
  const auto heard_at = Clock::now() - std::min(standby_silence(), std::chrono::milliseconds(3600 * 1000));
  set_state("settling", why);
  // 1. This guest must not run while the twin might: pause it; its output stays held.
  if (!paused_by_us_) {
    try {
      qmp_->execute("stop");
      paused_by_us_ = true;
    } catch (const std::exception& e) {
      check_qemu();  // QemuGone: it died meanwhile
      fence_self(fmt::format("the guest could not be paused while the broken session is settled ({})", e.what()));
      return false;
    }
  }
  // Paused, the guest cannot run by itself and only this thread resumes it, after settling: the
  // watchdog has nothing to guard against now (and settling blocks in connects and handshakes).
  // ftd's death still fences it (the guard stays armed).
  try {
    guard_->arm(std::chrono::milliseconds(0));
  } catch (const std::exception& e) {
    log::error("primary", "{}: {}", name_, e.what());
  }
  const uint64_t sid = session_id_;
  conn_.reset();
  hb_.reset();
  try {
    if (disks_ && qmp_->connected()) disks_->stop(*qmp_);  // re-protection starts a new full copy
  } catch (const std::exception& e) {
    log::warn("primary", "{}: stopping the disk mirror: {}", name_, e.what());
  }
  log::warn("primary", "{}: guest paused, output held: settling session {:016x} with the standby ({}){}", name_, sid,
            arbiter_->kind() == "none" ? "no arbiter" : "arbiter " + arbiter_->kind(),
            activate_sent ? "; Activate was sent: the guest is never resumed unless the standby says its twin will not run" : "");
  auto backoff = std::chrono::milliseconds(10);
  cp::ArbiterAnswer last = cp::ArbiterAnswer::Invalid;
  std::string alone_because;
  for (;;) {
    ping_guard();
    check_qemu();
    if (stop_) {
      log::warn("primary", "{}: ftd stops while the session is unsettled: the guest stays paused (the guard fences it)",
                name_);
      return false;
    }
    if (auto r = try_resolve(sid)) {
      log::warn("primary", "{}: standby says: {} ({})", name_, cp::to_string(r->verdict), r->text);
      const auto d = cp::failover::primary_on_resolution(r->verdict);
      if (d == cp::failover::Settle::Fence) {
        fence_self("the twin runs on the standby: " + r->text);
        return false;
      }
      if (d == cp::failover::Settle::RunAlone) {
        alone_because = "the standby dropped the twin: " + r->text;
        break;
      }
    }
    const auto silent = std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - heard_at);
    // The arbiter (a fence fires!) only once the standby has been silent for T/2: a standby ftd
    // that restarts, or a reset, is answered by Resolve long before; the standby itself cannot act
    // before T, so this side still asks first.
    if (cp::failover::primary_asks_arbiter(silent, standby_timeout_, activate_sent)) {
      cp::ArbiterAnswer a = cp::ArbiterAnswer::Wait;
      try {
        cp::ArbiterSubject subj{name_, host_, silent, standby_timeout_};
        subj.guest_pid = qemu_pid_;
        a = arbiter_->may_run_alone(subj, std::chrono::milliseconds(50));
      } catch (const std::exception& e) {
        log::error("primary", "{}: arbiter {}: {}", name_, arbiter_->kind(), e.what());
      }
      if (a != last) {
        log::warn("primary", "{}: standby unreachable for {} ms; arbiter {} answers {}", name_, silent.count(),
                  arbiter_->kind(), cp::to_string(a));
        last = a;
      }
      const auto d = cp::failover::primary_on_arbiter(a);
      if (d == cp::failover::Settle::Fence) {
        fence_self(fmt::format("the standby is unreachable and arbiter {} says this side lost", arbiter_->kind()));
        return false;
      }
      if (d == cp::failover::Settle::RunAlone) {
        alone_because = fmt::format("standby unreachable for {} ms; arbiter {} lets this side run alone{}", silent.count(),
                                    arbiter_->kind(),
                                    arbiter_->kind() == "none" ? " (split-brain unprotected)" : "");
        break;
      }
    }
    // Sleep in slices, pinging the guard: a failed Resolve (a connect timeout of half the
    // standby's timeout) plus a whole backoff without a ping outlasts the guard's watchdog
    // (0.8 x that timeout, when armed), which then killed the paused guest although the arbiter may still
    // say Yes (the standby's side lost). Seen with the corosync arbiter, which answers Wait
    // for seconds while corosync settles the new membership.
    ping_guard();
    for (const auto until = Clock::now() + backoff; Clock::now() < until;) {
      std::this_thread::sleep_for(std::min<Clock::duration>(std::chrono::milliseconds(20), until - Clock::now()));
      ping_guard();
    }
    backoff = std::min(backoff * 2, std::chrono::milliseconds(250));
  }
  // 2. This is the only copy: its output is final, the guest runs on.
  log::warn("primary", "{}: running on alone: {}", name_, alone_because);
  if (output_) output_->pass_through("degraded: " + alone_because);
  ensure_running();
  return true;
}

// ---------------------------------------------------------------------------------------------
// Setup and full sync

void PrimarySession::connect_and_sync() {
  set_state(state_ == "degraded" ? "degraded" : "connecting", reason_);
  transport::Options opts;
  opts.heartbeat_interval = cfg_.heartbeat_interval;
  // A send that makes no progress for half the (standby's) heartbeat timeout is a lost link:
  // the guest must be paused before the standby may resume the twin.
  opts.stall_timeout = std::max(std::chrono::milliseconds(100), cfg_.heartbeat_timeout / 2);
  opts.key = cfg_.key;  // both paths authenticate with the host pair's key (issue 12)
  opts.encrypt = cfg_.encrypt;
  std::string chosen;
  commit_sent_this_session_ = false;
  activate_sent_ = false;
  pending_.clear();
  pending_hb_.clear();
  link_error_.clear();
  std::string data_host = host_;
  uint16_t data_port = port_;
  try {
    conn_ = transport::connect(host_, port_, transport_kind_, opts, {}, &chosen);
  } catch (const std::exception& e) {
    if (alt_host_.empty()) throw;
    // The standby's first address is unreachable (that network is down?): its second one
    // carries the session, and the second path goes to the first (it may come back).
    log::warn("primary", "{}: standby {}:{} unreachable ({}); trying its second address {}:{}", name_, host_, port_,
              e.what(), alt_host_, alt_port_);
    conn_ = transport::tcp::connect_tcp(alt_host_, alt_port_, opts);
    chosen = "tcp (second address)";
    data_host = alt_host_;
    data_port = alt_port_;
  }
  if (alt_host_.empty()) {
    hb_host_ = host_;
    hb_port_ = port_;
  } else if (data_host == host_ && data_port == port_) {
    hb_host_ = alt_host_;
    hb_port_ = alt_port_;
  } else {
    hb_host_ = host_;
    hb_port_ = port_;
  }
  log::info("primary", "{}: connected to the standby {} over {}, {}{}", name_, conn_->peer(), chosen,
            conn_->security(), conn_->key_id().empty() ? " (--insecure: NOT AUTHENTICATED)" : " (key " + conn_->key_id() + ")");
  {
    std::lock_guard<std::mutex> g(mu_);
    link_peer_ = conn_->peer();
    link_backend_ = conn_->backend();
    link_security_ = conn_->key_id().empty() ? conn_->security() : conn_->security() + " (key " + conn_->key_id() + ")";
  }
  std::random_device rd;
  session_id_ = (uint64_t{rd()} << 32) | rd();
  cp::OpenSession o;
  o.session_id = session_id_;
  o.ram_size = ram_size_;
  o.vm_name = name_;
  o.qemu_argv = argv_;
  o.libvirt_xml = domain_xml_;
  o.arbiter = arbiter_->kind();
  o.failover = req_.failover == "manual" ? cp::FailoverPolicy::Manual : cp::FailoverPolicy::Auto;
  o.origin = History::node_name();
  o.history = history_->dump();
  if (req_.reprotect == "auto" && !cfg_.listen.empty()) {
    try {
      o.reprotect_port = transport::tcp::parse_host_port(cfg_.listen).port;
    } catch (const std::exception& e) {
      log::warn("primary", "{}: reprotect=auto but --listen '{}' does not parse ({}): manual", name_, cfg_.listen, e.what());
    }
  }
  if (!alt_host_.empty()) {
    // Where the second path will come from: the standby binds it (and Resolve) to that host.
    try {
      o.second_path_host = transport::source_host_for(hb_host_, hb_port_);
    } catch (const std::exception& e) {
      log::warn("primary", "{}: second address {}:{}: {}; the second path may be refused", name_, hb_host_, hb_port_,
                e.what());
    }
  }
  for (const auto& [first, end] : ram_->data_ranges()) o.ram_used += (end - first) * kPageSize;
  if (disks_) o.disks = disks_->infos();
  cp::send(*conn_, o);
  auto deadline = Clock::now() + std::chrono::seconds(60);
  std::optional<transport::ControlMessage> m;
  while (!m) {
    if (Clock::now() > deadline) throw LinkDown("standby did not answer OpenSession within 60 s");
    check_qemu();
    m = conn_->poll(std::chrono::milliseconds(50));
  }
  if (m->type == static_cast<uint16_t>(MsgType::Error))
    throw ProtocolError("standby refused the session: " + cp::decode<cp::ErrorMsg>(m->body).text);
  if (m->type != static_cast<uint16_t>(MsgType::SessionReady))
    throw ProtocolError(fmt::format("standby answered OpenSession with message type {}", m->type));
  auto ready = cp::decode<cp::SessionReady>(m->body);
  if (ready.session_id != session_id_) throw ProtocolError("standby answered for another session id");
  capacity_ = ready.staging_capacity;
  standby_timeout_ = std::chrono::milliseconds(ready.heartbeat_timeout_ms);
  if (standby_timeout_ != cfg_.heartbeat_timeout)
    log::warn("primary", "{}: the standby's heartbeat timeout is {} ms, this ftd's {} ms: configure both alike", name_,
              standby_timeout_.count(), cfg_.heartbeat_timeout.count());
  hb_.reset();
  {
    // The second path: a separate TCP connection (RDMA sessions: beside the RDMA data path;
    // TCP sessions: beside the data connection; to the standby's second address when it has
    // one) whose heartbeats keep the standby from taking a live primary for dead when one
    // connection or network breaks (activation needs silence on both).
    try {
      hb_ = transport::tcp::connect_tcp(hb_host_, hb_port_, opts);
      cp::send(*hb_, cp::HeartbeatLink{session_id_});
      hb_->flush();
      set_hb_state("up");
      log::info("primary", "{}: second path (tcp {}) carries heartbeats beside the {} data path", name_, hb_->peer(),
                conn_->backend());
    } catch (const std::exception& e) {
      log::warn("primary", "{}: no second path to the standby ({}:{}: {}); heartbeats use the data path only until it "
                "is re-dialed", name_, hb_host_, hb_port_, e.what());
      set_hb_state(fmt::format("down ({})", e.what()));
      hb_.reset();
    }
    hb_dial_at_ = Clock::now();
    std::lock_guard<std::mutex> g(mu_);
    hb_peer_ = fmt::format("{}:{}", hb_host_, hb_port_);
  }
  log::info("primary", "{}: standby {} ready (twin pid {}, staging {} KiB); full sync of {} MiB", name_,
            conn_->peer(), ready.twin_pid, capacity_ >> 10, ram_size_ >> 20);
  set_state("syncing");
  registered_staging_ = {};
  register_sources(/*ram=*/true);

  epoch_ = 0;
  inflight_ = 0;
  if (disks_) wait_disks_ready();
  auto t0 = Clock::now();
  inflight_ = 0;
  carry_.clear();
  dirty_.clear();
  tracker_->collect_and_reset(dirty_);  // arms tracking before the copy; reports every page
  // Only the pages that hold data: holes in the guest's memfd (RAM the guest never touched) read
  // as zeros on both sides and stay holes in the twin; reading them here would allocate them
  // (a sparse 16 GiB guest cost 16 GiB resident on each host). A hole the guest writes from now
  // on is reported by the tracker armed above and goes in a later pass or epoch.
  dirty_.clear();
  const auto extents = ram_->data_ranges();
  for (const auto& [first, end] : extents)
    for (uint64_t i = first; i < end; i++) dirty_.push_back(i);
  log::info("primary", "{}: {} of {} MiB of guest RAM hold data ({} extents); holes are not copied", name_,
            dirty_.size() * kPageSize >> 20, ram_size_ >> 20, extents.size());
  // The digest of this session starts from zeros: every page sent updates its hash.
  ram_digest_ = std::make_unique<cp::RamDigest>(ram_size_ / kPageSize);
  uint64_t total = 0;
  unsigned pass = 0;
  const uint64_t small = std::max<uint64_t>(256, ram_size_ / kPageSize / 512);
  for (;;) {
    send_ram_pages(dirty_);
    total += dirty_.size();
    pass++;
    dirty_.clear();
    tracker_->collect_and_reset(dirty_);
    log::info("primary", "{}: sync pass {} done, {} pages written meanwhile", name_, pass, dirty_.size());
    if (dirty_.size() <= small || pass >= req_.max_sync_passes) break;
  }
  carry_ = dirty_;  // goes into epoch 1, together with what the pause finds
  conn_->flush();
  {
    std::lock_guard<std::mutex> g(mu_);
    sync_ms_ = ms_since(t0);
    sync_pages_ = total;
    sync_passes_ = pass;
  }
  log::info("primary", "{}: sync sent {} pages in {} passes, {:.0f} ms", name_, total, pass, ms_since(t0));
  last_cont_ = Clock::now() - std::chrono::milliseconds(req_.epoch_ms);  // first checkpoint at once
}

// The mirror jobs copy every disk in full while their writes are forwarded (tagged epoch 1:
// the standby writes them straight into the twin's images); the first checkpoint may only be
// cut once every job is ready (disk_mirror.h).
void PrimarySession::wait_disks_ready() {
  const auto t0 = Clock::now();
  disks_->start(*qmp_, 1);
  auto last_poll = Clock::time_point{}, last_log = Clock::now();
  while (!disks_->ready()) {
    check_qemu();
    if (Clock::now() - last_poll > std::chrono::milliseconds(100)) {
      disks_->poll_jobs(*qmp_);
      last_poll = Clock::now();
    }
    pump(std::chrono::milliseconds(5));  // forwards the copy, keeps heartbeats going
    if (Clock::now() - last_log > std::chrono::seconds(5)) {
      last_log = Clock::now();
      uint64_t done = 0, total = 0;
      for (const auto& d : disks_->status()["disks"]) {
        done += d.value("copied", uint64_t{0});
        total += d.value("total", uint64_t{0});
      }
      log::info("primary", "{}: initial disk copy: {} of {} MiB", name_, done >> 20, total >> 20);
    }
    if (stop_) throw LinkDown("ftd is shutting down");
  }
  conn_->flush();
  log::info("primary", "{}: initial disk copy complete in {:.0f} ms", name_, ms_since(t0));
}

void PrimarySession::send_ram_pages(const std::vector<uint64_t>& pages) {
  auto ram = as_span(*ram_);
  constexpr uint64_t kMaxRun = 256;  // 1 MiB per write
  size_t i = 0, since_pump = 0;
  auto last_pump = Clock::now();
  while (i < pages.size()) {
    size_t j = i + 1;
    while (j < pages.size() && pages[j] == pages[j - 1] + 1 && j - i < kMaxRun) j++;
    const uint64_t off = pages[i] * kPageSize, len = (j - i) * kPageSize;
    for (size_t k = i; k < j; k++) ram_digest_->update(pages[k], ram.data() + pages[k] * kPageSize);
    conn_->write(cp::kRegionRam, off, std::span<const std::byte>(ram.data() + off, len));
    since_pump += j - i;
    // Keep heartbeats and inbound errors flowing: one-sided RDMA writes are invisible to the
    // standby, and a heartbeat SEND queued behind them on the same queue pair arrives only after
    // them, so at most kSyncWindowPages may be outstanding when the heartbeat goes out: the
    // flush drains them first. 2 MiB takes 0.2 s at 10 MiB/s (Soft-RoCE between two TCG lab
    // guests); with 16 MiB the lab's standby heard nothing for over 1 s and dropped the sync
    // (CI, synthetic_lab_two_host_rdma). On hardware a drain per 2 MiB costs one round trip.
    constexpr size_t kSyncWindowPages = 512;
    if (since_pump >= kSyncWindowPages || Clock::now() - last_pump > cfg_.heartbeat_interval) {
      since_pump = 0;
      last_pump = Clock::now();
      conn_->flush();
      pump(std::chrono::milliseconds(0));
      check_qemu();
    }
    i = j;
  }
}

// ---------------------------------------------------------------------------------------------
// Steady state

// Sends on the data path and, best effort, on the second path: these messages must reach the
// standby even when only one of the paths works.
template <typename T>
void PrimarySession::send_both(const T& m) {
  if (hb_) {
    try {
      cp::send(*hb_, m);
      hb_->flush();
    } catch (const std::exception& e) {
      log::warn("primary", "{}: second path: {}", name_, e.what());
      hb_.reset();
    }
  }
  cp::send(*conn_, m);
  conn_->flush();
}

// A lost second path is dialed again in the background, at most once a second, while the
// session is protected: the second network may come back, and until it does the data path is
// the only thing keeping the standby from taking over. A dial that finishes after its session
// ended is dropped (its HeartbeatLink named the old session).
void PrimarySession::dial_second_path_async() {
  transport::Options o;
  o.heartbeat_interval = cfg_.heartbeat_interval;
  o.key = cfg_.key;
  o.encrypt = cfg_.encrypt;
  o.connect_timeout = std::max(std::chrono::milliseconds(100), standby_timeout_);
  hb_dial_at_ = Clock::now();
  hb_dial_sid_ = session_id_;
  set_hb_state("redialing");
  hb_dial_ = std::async(std::launch::async, [host = hb_host_, port = hb_port_, o, sid = session_id_] {
    auto c = transport::tcp::connect_tcp(host, port, o);
    cp::send(*c, cp::HeartbeatLink{sid});
    c->flush();
    return c;
  });
}

void PrimarySession::adopt_redialed_second_path() {
  if (hb_dial_.valid()) {
    if (hb_dial_.wait_for(std::chrono::seconds(0)) != std::future_status::ready) return;
    try {
      auto c = hb_dial_.get();
      if (hb_dial_sid_ == session_id_ && conn_) {
        hb_ = std::move(c);
        set_hb_state("up");
        log::info("primary", "{}: second path (tcp {}) re-established", name_, hb_->peer());
      }
    } catch (const std::exception& e) {
      set_hb_state(fmt::format("down ({})", e.what()));
      log::debug("primary", "{}: re-dialing the second path: {}", name_, e.what());
    }
    return;
  }
  if (state_ == "protected" && !hb_host_.empty() && Clock::now() - hb_dial_at_ >= std::chrono::seconds(1))
    dial_second_path_async();
}

// Takes QEMU's queued events: the mirror jobs' to the disk mirror; a guest-initiated SHUTDOWN
// ends protection (GuestShutdown). STOP/RESUME of every epoch are dropped (must not pile up).
void PrimarySession::process_events() {
  auto events = qmp_->take_events();
  for (const auto& e : events) {
    if (e.value("event", "") != "SHUTDOWN" || !e.contains("data")) continue;
    const bool by_guest = e["data"].value("guest", false);
    const std::string why = e["data"].value("reason", "");
    log::info("primary", "{}: QEMU reports SHUTDOWN ({}, {})", name_, by_guest ? "by the guest" : "by the host", why);
    if (by_guest) guest_shutdown_ = why.empty() ? "guest-shutdown" : why;
  }
  if (disks_ && disks_->running()) disks_->on_events(events);
  if (!guest_shutdown_.empty()) throw GuestShutdown("the guest shut itself down (" + guest_shutdown_ + ")");
}

// Runs inside QMP commands that take long (QEMU or libvirt slow to answer): heartbeats must
// go on, or the standby takes a live primary for dead. Messages that arrive meanwhile are kept
// for next_message(); a broken link is remembered and reported by the next pump().
void PrimarySession::keepalive() {
  if (in_keepalive_) return;
  in_keepalive_ = true;
  ping_guard();
  try {
    if (conn_ && link_error_.empty())
      if (auto m = conn_->poll(std::chrono::milliseconds(0))) pending_.push_back(std::move(*m));
  } catch (const std::exception& e) {
    link_error_ = e.what();
  }
  try {
    if (hb_)
      if (auto m = hb_->poll(std::chrono::milliseconds(0))) pending_hb_.push_back(std::move(*m));
  } catch (const std::exception&) {
  }
  in_keepalive_ = false;
}

std::optional<transport::ControlMessage> PrimarySession::next_message(std::chrono::milliseconds timeout) {
  ping_guard();
  if (!link_error_.empty()) {
    auto e = std::exchange(link_error_, {});
    throw LinkDown(e);
  }
  if (!pending_.empty()) {
    auto m = std::move(pending_.front());
    pending_.pop_front();
    return m;
  }
  return conn_->poll(timeout);
}

void PrimarySession::pump(std::chrono::milliseconds timeout) {
  ping_guard();
  if (cp::failover::standby_presumed_lost(standby_silence(), standby_timeout_, commit_sent_this_session_))
    throw LinkDown(fmt::format("nothing heard from the standby for {} ms (its takeover timeout is {} ms)",
                               standby_silence().count(), standby_timeout_.count()));
  process_events();
  while (!pending_hb_.empty()) {
    auto m = std::move(pending_hb_.front());
    pending_hb_.pop_front();
    handle(m);
  }
  if (disks_ && disks_->running()) {
    if (auto f = disks_->failure(); !f.empty()) {
      // A QEMU that is being stopped or killed closes its NBD connections before its pidfd
      // reports the exit: that is the primary dying (the standby takes over), not a mirror
      // failure (which would make the standby drop the twin).
      if (qemu_exits_within(std::chrono::milliseconds(2000)))
        throw QemuGone(fmt::format("primary QEMU (pid {}) exited ({})", qemu_pid_, f));
      while (!pending_.empty()) {  // what arrived meanwhile (a Takeover still fences)
        auto m = std::move(pending_.front());
        pending_.pop_front();
        handle(m);
      }
      throw LinkDown(f);
    }
    if (disks_->forward(*conn_, session_id_, UINT64_MAX)) conn_->flush();
  }
  if (hb_) {
    try {
      if (auto hm = hb_->poll(std::chrono::milliseconds(0))) handle(*hm);
    } catch (const LinkDown& e) {
      log::warn("primary", "{}: second path to the standby lost: {}; the data path carries heartbeats alone "
                "until it is re-dialed", name_, e.what());
      set_hb_state(fmt::format("down ({})", e.what()));
      hb_.reset();
    }
  } else {
    adopt_redialed_second_path();
  }
  auto m = next_message(timeout);
  {
    std::lock_guard<std::mutex> g(mu_);
    link_idle_ms_ = static_cast<double>(conn_->idle_for().count());
    bytes_sent_total_ = conn_->bytes_sent();
  }
  if (m) handle(*m);
}

void PrimarySession::handle(const transport::ControlMessage& m) {
  switch (static_cast<MsgType>(m.type)) {
    case MsgType::Ack: {
      auto a = cp::decode<cp::Ack>(m.body);
      if (a.session_id != session_id_) throw ProtocolError("Ack for an unknown session id");
      if (a.epoch != inflight_)
        throw ProtocolError(fmt::format("Ack for epoch {} but epoch {} is in flight", a.epoch, inflight_));
      if (a.status == cp::AckStatus::Rejected) {
        std::lock_guard<std::mutex> g(mu_);
        rejected_++;
      }
      if (a.status == cp::AckStatus::Rejected) {
        log::warn("primary", "{}: standby rejected epoch {}: {}", name_, a.epoch, a.reason);
        if (fault_ == Fault::CorruptThenCrash) {
          log::error("primary", "{}: fault injection: exiting after the rejection of epoch {}", name_, a.epoch);
          _exit(9);
        }
        if (++retransmits_ > 3) throw ProtocolError(fmt::format("epoch {} rejected 4 times: {}", a.epoch, a.reason));
        send_epoch(a.epoch, false);
        return;
      }
      const double ack_ms = ms_since(commit_sent_);
      inflight_ = 0;
      retransmits_ = 0;
      if (output_) output_->release(a.epoch);  // committed on the standby: its output may leave
      std::lock_guard<std::mutex> g(mu_);
      last_acked_ = a.epoch;
      acked_cut_wall_ms_ = inflight_cut_wall_ms_;
      ack_ms_.add(ack_ms);
      if (pending_rec_) {
        pending_rec_->ack_us = ack_ms * 1000;
        last_rec_ = *pending_rec_;
        if (stats_fd_) {
          const auto& r = *pending_rec_;
          nlohmann::json j = {{"epoch", r.epoch}, {"pages", r.pages}, {"devstate_bytes", r.devstate_bytes},
                              {"staged_bytes", r.staged_bytes}, {"stop_us", r.stop_us}, {"scan_us", r.scan_us},
                              {"copy_us", r.copy_us}, {"devstate_us", r.devstate_us}, {"cont_us", r.cont_us},
                              {"pause_us", r.pause_us}, {"send_us", r.send_us}, {"ack_us", r.ack_us},
                              {"wall_ms", r.wall_ms}, {"ram_digest", fmt::format("{:016x}", r.ram_digest)}};
          auto line = j.dump() + "\n";
          if (::write(stats_fd_.get(), line.data(), line.size()) < 0)
            log::warn("primary", "{}: writing stats failed: {}", name_, std::strerror(errno));
        }
        pending_rec_.reset();
      }
      if (state_ == "syncing" || state_ == "degraded" || state_ == "connecting") {
        set_marker("protected", true, "protected (a committed checkpoint on the standby)");
        state_ = "protected";
        reason_.clear();
        log::info("primary", "{}: state -> protected (epoch {} committed on the standby)", name_, a.epoch);
        history_->append({{"event", "protected"}, {"primary", History::node_name()},
                          {"standby", link_peer_.empty() ? req_.peer : link_peer_},
                          {"session", fmt::format("{:016x}", session_id_)}, {"failover", req_.failover},
                          {"reprotect", req_.reprotect}});
      }
      return;
    }
    case MsgType::Error:
      throw ProtocolError("standby reported: " + cp::decode<cp::ErrorMsg>(m.body).text);
    case MsgType::Suspect: {
      auto su = cp::decode<cp::Suspect>(m.body);
      throw LinkDown(fmt::format("the standby has not heard this primary for {} ms (one-way cut?)", su.silent_ms));
    }
    case MsgType::Takeover: {
      // The standby gave up on us (we were silent too long) and is resuming the twin. This
      // guest must not run on: fence it now, before anything else.
      auto t = cp::decode<cp::Takeover>(m.body);
      watch_->send_signal(SIGKILL);
      log::error("primary", "{}: the standby is taking over ({}); killed the primary QEMU pid {} so only the twin runs",
                 name_, t.reason, qemu_pid_);
      throw QemuGone("fenced: the standby took over after this primary was silent");
    }
    default:
      throw ProtocolError(fmt::format("unexpected message {} from the standby",
                                      cp::to_string(static_cast<MsgType>(m.type))));
  }
}

void PrimarySession::wait_for_epoch_boundary() {
  const auto deadline = last_cont_ + std::chrono::milliseconds(req_.epoch_ms);
  for (;;) {
    check_qemu();
    auto now = Clock::now();
    if (inflight_ && now - commit_sent_ > cfg_.ack_timeout)
      throw LinkDown(fmt::format("no ack for epoch {} within {} ms", inflight_, cfg_.ack_timeout.count()));
    if (!inflight_ && (now >= deadline || (output_ && output_->cut_requested()))) return;  // cap: cut early
    if (!inflight_ && output_ && req_.output_epoch_min_ms && output_->output_waiting() &&
        now - last_cont_ >= std::max<Clock::duration>(std::chrono::milliseconds(req_.output_epoch_min_ms),
                                                        last_pause_)) {
      output_->note_output_cut();  // the guest waits for its output: checkpoint now
      return;
    }
    auto wait = inflight_ ? std::chrono::milliseconds(20)
                          : std::chrono::duration_cast<std::chrono::milliseconds>(deadline - now);
    if (output_) wait = std::min(wait, std::chrono::milliseconds(1));  // notice output and cut requests promptly
    pump(std::max(wait, std::chrono::milliseconds(0)));
    if (stop_) return;
  }
}

void PrimarySession::wait_ack(uint64_t epoch) {
  while (inflight_ == epoch) {
    check_qemu();
    if (Clock::now() - commit_sent_ > cfg_.ack_timeout)
      throw LinkDown(fmt::format("no ack for epoch {} within {} ms", epoch, cfg_.ack_timeout.count()));
    pump(std::chrono::milliseconds(20));
  }
}

// QEMU keeps an add-fd fdset only while a monitor is connected (or a user holds a dup): after
// libvirtd restarted, the fdset is gone and must be added again (Monitor::generation()).
void PrimarySession::add_devstate_fd() {
  auto r = qmp_->execute_with_fd("add-fd", {{"opaque", "ftvm device state"}}, devstate_wo_.get());
  devstate_path_ = fmt::format("/dev/fdset/{}", r.at("fdset-id").get<int64_t>());
  devstate_gen_ = qmp_->generation();
}

void PrimarySession::read_device_state() {
  struct stat st {};
  check_sys(::fstat(devstate_rw_.get(), &st), "fstat device-state memfd");
  auto area = stager_.device_state_area(static_cast<size_t>(st.st_size));
  size_t got = 0;
  while (got < area.size()) {
    ssize_t n = ::pread(devstate_rw_.get(), area.data() + got, area.size() - got, static_cast<off_t>(got));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) throw SysError(n < 0 ? errno : EIO, "read device state back from its memfd");
    got += static_cast<size_t>(n);
  }
}

void PrimarySession::checkpoint(bool final) {
  cp::EpochRecord rec;
  rec.epoch = ++epoch_;
  rec.wall_ms = wall_ms();
  if (disks_) disks_->allow_overflow(true);  // `stop` drains disk writes: they must not wait for us
  const auto t0 = Clock::now();
  try {
    qmp_->execute("stop");
  } catch (const std::exception& e) {
    check_qemu();
    throw;
  }
  paused_by_us_ = true;
  if (disks_) disks_->cut(rec.epoch);  // drained: every write of this epoch is queued
  if (output_) output_->seal(rec.epoch);  // guest paused at the cut: frames so far belong to this epoch
  const auto t1 = Clock::now();
  dirty_.clear();
  tracker_->collect_and_reset(dirty_);
  if (!carry_.empty()) cp::merge_page_lists(dirty_, carry_);
  const auto t2 = Clock::now();
  stager_.stage_pages(dirty_, as_span(*ram_));
  const auto t3 = Clock::now();
  check_sys(::lseek(devstate_wo_.get(), 0, SEEK_SET), "rewind device-state memfd");
  if (qmp_->generation() != devstate_gen_) add_devstate_fd();
  try {
    qmp_->execute("xen-save-devices-state", {{"filename", devstate_path_}, {"live", false}});
  } catch (const vmm::QmpError&) {
    if (qmp_->generation() == devstate_gen_) throw;
    add_devstate_fd();  // the monitor reconnected during this very command
    qmp_->execute("xen-save-devices-state", {{"filename", devstate_path_}, {"live", false}});
  }
  read_device_state();
  const auto t4 = Clock::now();
  if (!final) {
    qmp_->execute("cont");
    paused_by_us_ = false;
  }
  const auto t5 = Clock::now();
  if (disks_) disks_->allow_overflow(false);
  last_cont_ = t5;
  rec.stop_us = us_between(t0, t1);
  rec.scan_us = us_between(t1, t2);
  rec.copy_us = us_between(t2, t3);
  rec.devstate_us = us_between(t3, t4);
  rec.cont_us = us_between(t4, t5);
  rec.pause_us = us_between(t0, t5);
  last_pause_ = t5 - t0;
  rec.pages = stager_.page_count();
  rec.devstate_bytes = stager_.device_state_bytes();
  rec.staged_bytes = stager_.bytes().size();
  stager_.update_ram_digest(*ram_digest_);
  rec.ram_digest = ram_digest_->value();

  const auto s0 = Clock::now();
  send_epoch(rec.epoch, final);
  rec.send_us = us_between(s0, Clock::now());
  {
    std::lock_guard<std::mutex> g(mu_);
    epochs_cut_++;
    if (!final) pause_ms_.add(rec.pause_us / 1000);
    pages_.add(static_cast<double>(rec.pages));
    bytes_.add(static_cast<double>(rec.staged_bytes));
    last_ram_digest_ = rec.ram_digest;
    inflight_cut_wall_ms_ = rec.wall_ms;
    tput_.emplace_back(Clock::now(), conn_->bytes_sent());
    while (tput_.size() > 2 && Clock::now() - tput_.front().first > std::chrono::seconds(5)) tput_.pop_front();
  }
  pending_rec_ = rec;
  log::debug("primary", "{}: epoch {} cut: {} pages, pause {:.2f} ms, ram digest {:016x}", name_, rec.epoch, rec.pages,
             rec.pause_us / 1000, rec.ram_digest);
}

// Guest RAM (the sync source) and the staging buffer are registered once as write sources
// (transport.h, register_source(): zero-copy on RDMA, nothing on TCP); the staging buffer again
// only when an epoch outgrew (reallocated) it.
void PrimarySession::register_sources(bool ram) {
  auto* rc = conn_.get();
  if (ram) {
    // ftd maps guest RAM read-only; kernels before 6.2 pin RDMA memory for writing even for a
    // read-only registration and refuse it (EFAULT). Then the sync copies through the
    // connection's registered send buffer instead: slower, same bytes.
    try {
      rc->register_source(as_span(*ram_));
    } catch (const std::exception& e) {
      log::warn("primary", "{}: guest RAM not registered for zero-copy RDMA writes ({}); the full sync copies "
                "through the send buffer", name_, e.what());
    }
  }
  auto a = stager_.allocation();
  if (!a.empty() && (a.data() != registered_staging_.data() || a.size() != registered_staging_.size())) {
    if (!registered_staging_.empty()) rc->unregister_source(registered_staging_);
    rc->register_source(a);
    registered_staging_ = a;
  }
}

void PrimarySession::send_epoch(uint64_t epoch, bool final) {
  register_sources(/*ram=*/false);
  const auto bytes = stager_.bytes();
  if (bytes.size() > capacity_) {
    const uint64_t want = bytes.size() + bytes.size() / 4;
    cp::send(*conn_, cp::StagingGrow{session_id_, want});
    auto deadline = Clock::now() + std::chrono::seconds(10);
    for (;;) {
      if (Clock::now() > deadline) throw LinkDown("standby did not grant staging space within 10 s");
      auto m = next_message(std::chrono::milliseconds(20));
      if (!m) continue;
      if (m->type == static_cast<uint16_t>(MsgType::StagingGranted)) {
        auto g = cp::decode<cp::StagingGranted>(m->body);
        capacity_ = g.capacity;
        if (capacity_ < bytes.size())
          throw ProtocolError(fmt::format("standby granted {} bytes of staging, epoch needs {}", capacity_, bytes.size()));
        break;
      }
      handle(*m);
    }
  }
  std::pair<uint64_t, uint64_t> disk_summary{0, 0};
  if (disks_) {
    disks_->forward(*conn_, session_id_, epoch);  // every disk write of the epoch precedes its Commit
    disk_summary = disks_->epoch_summary(epoch);
  }
  cp::send(*conn_, cp::EpochBegin{session_id_, epoch, bytes.size()});
  cp::Commit c;
  c.disk_ops = disk_summary.first;
  c.disk_digest = disk_summary.second;
  c.session_id = session_id_;
  c.epoch = epoch;
  c.page_count = stager_.page_count();
  c.devstate_bytes = stager_.device_state_bytes();
  // Authenticated sessions: the keyed digest, so that nothing that can write into the
  // standby's staging area without the session key gets an epoch applied (one-sided RDMA
  // writes are not tagged by the transport). One content per epoch number: a retransmission
  // tags the same staged bytes (checkpoint/digest.h).
  if (const auto* k = conn_->epoch_key()) c.staged_tag = cp::staged_tag(*k, epoch, bytes);
  else c.staged_digest = stager_.digest();
  c.ram_digest = ram_digest_->value();
  c.flags = final ? cp::Commit::kFinal : 0;

  Fault f = fault_.load();
  if (f == Fault::LoseActivateDone) f = Fault::None;  // do_failover's, not an epoch's
  else f = fault_.exchange(Fault::None);
  if (f == Fault::NbdDrop) {
    if (disks_) disks_->drop_connections();
    log::warn("primary", "{}: fault injection: closed QEMU's NBD connections to the disk mirror", name_);
  }
  if (f == Fault::CrashMidEpoch) {
    conn_->write(cp::kRegionStaging, 0, bytes.subspan(0, bytes.size() / 2));
    conn_->flush();
    log::error("primary", "{}: fault injection: exiting in the middle of epoch {} ({} of {} bytes sent)", name_, epoch,
               bytes.size() / 2, bytes.size());
    _exit(9);
  }
  std::vector<std::byte> corrupted;
  if (f == Fault::CorruptThenCrash || f == Fault::CorruptOnce) {
    corrupted.assign(bytes.begin(), bytes.end());
    corrupted[corrupted.size() / 2] ^= std::byte{0x5a};
    log::warn("primary", "{}: fault injection: corrupting epoch {} on the wire", name_, epoch);
    if (f == Fault::CorruptThenCrash) fault_ = Fault::CorruptThenCrash;  // crash once it is rejected
    conn_->write(cp::kRegionStaging, 0, corrupted);
  } else {
    conn_->write(cp::kRegionStaging, 0, bytes);
  }
  commit_sent_this_session_ = true;  // from here on the standby may hold a checkpoint
  if (epoch == 1 || state_ != "protected") {
    // The standby may take over from now on: the guard kills QEMU if ftd dies or stops pinging
    // it for 0.8 x the standby's timeout, at most T - 2 heartbeat periods: the standby acts no
    // earlier than T after the last frame, which left at most one heartbeat period before the
    // last ping, and resuming the twin takes tens of ms more.
    guard_watchdog_ = cp::failover::guard_watchdog(standby_timeout_, cfg_.heartbeat_interval);
    guard_->arm(guard_watchdog_);
    last_guard_ping_ = Clock::now();
  }
  cp::send(*conn_, c);
  conn_->flush();
  if (f == Fault::CorruptThenCrash) {
    // Wait for the rejection (handle() exits the process then).
    commit_sent_ = Clock::now();
    inflight_ = epoch;
    for (;;) pump(std::chrono::milliseconds(100));
  }
  commit_sent_ = Clock::now();
  inflight_ = epoch;
}

// ---------------------------------------------------------------------------------------------
// Commands from the control thread

bool PrimarySession::service_command() {
  std::unique_ptr<Command> cmd;
  {
    std::lock_guard<std::mutex> g(mu_);
    if (commands_.empty()) return false;
    cmd = std::move(commands_.front());
    commands_.pop_front();
  }
  try {
    std::string r = cmd->kind == CmdKind::Failover ? do_failover() : do_disable();
    cmd->done.set_value(r);
    return true;  // both end the session
  } catch (const QemuGone&) {
    cmd->done.set_exception(std::current_exception());
    throw;
  } catch (const std::exception& e) {
    cmd->done.set_exception(std::current_exception());
    if (cmd->kind == CmdKind::Disable) return true;
    throw;  // failed failover: treated like a link failure (guest resumed here, degraded)
  }
}

std::string PrimarySession::do_failover() {
  if (!conn_ || state_ != "protected")
    fail("VM '{}' is {}; a planned failover needs state 'protected'", name_, state_);
  log::info("primary", "{}: planned failover to {}", name_, conn_->peer());
  if (inflight_) wait_ack(inflight_);
  const auto t0 = Clock::now();
  checkpoint(true);  // guest stays paused
  wait_ack(epoch_);
  // The final epoch is committed and its frames released (handle()): let QEMU send them out
  // before the twin resumes and this QEMU quits.
  if (output_) output_->flush(std::chrono::milliseconds(2000));
  activate_sent_ = true;  // from here on this guest never resumes unless the standby says its twin won't run
  cp::send(*conn_, cp::Activate{session_id_});
  conn_->flush();
  if (fault_ == Fault::LoseActivateDone) {
    fault_ = Fault::None;
    log::warn("primary", "{}: fault injection: the link breaks right after Activate", name_);
    throw LinkDown("fault injection: link lost right after Activate (no ActivateDone)");
  }
  auto deadline = Clock::now() + std::chrono::seconds(30);
  for (;;) {
    if (Clock::now() > deadline) throw LinkDown("standby did not confirm activation within 30 s");
    auto m = next_message(std::chrono::milliseconds(20));
    if (!m) continue;
    if (m->type != static_cast<uint16_t>(MsgType::ActivateDone)) {
      handle(*m);
      continue;
    }
    auto d = cp::decode<cp::ActivateDone>(m->body);
    if (!d.ok) throw Error("standby could not activate the twin: " + d.text);
    break;
  }
  const double ms = ms_since(t0);
  guard_->disarm();
  try {
    qmp_->execute("quit");
  } catch (const std::exception&) {
    // QEMU closes the monitor while quitting; that is the expected end.
  }
  paused_by_us_ = false;
  conn_.reset();
  hb_.reset();
  set_state("failed-over", fmt::format("planned failover at epoch {}", epoch_));
  history_->append({{"event", "failover-planned"}, {"to", link_peer_}, {"epoch", epoch_}});
  mark_failed_over("planned failover");
  return fmt::format("VM '{}' now runs on the standby ({}); final epoch {}, switchover took {:.1f} ms", name_,
                     link_peer_, epoch_, ms);
}

std::string PrimarySession::do_disable() {
  if (conn_) {
    try {
      if (inflight_) wait_ack(inflight_);
      send_both(cp::Disable{session_id_});
    } catch (const std::exception& e) {
      log::warn("primary", "{}: could not tell the standby to drop the twin: {}", name_, e.what());
    }
    conn_.reset();
    hb_.reset();
  }
  guard_.reset();
  ensure_running();
  if (disks_) disks_->stop(*qmp_);
  if (output_) output_->detach(*qmp_);  // held frames go out; filters and chardevs removed
  tracker_.reset();
  set_marker("protected", false, {});
  set_state("disabled");
  history_->append({{"event", "disabled"}});
  return fmt::format("protection of VM '{}' ended; the twin on the standby is destroyed", name_);
}

std::string PrimarySession::failover(std::chrono::milliseconds timeout) {
  auto c = std::make_unique<Command>();
  c->kind = CmdKind::Failover;
  auto fut = c->done.get_future();
  {
    std::lock_guard<std::mutex> g(mu_);
    if (finished_) fail("VM '{}' is no longer protected ({})", name_, state_);
    commands_.push_back(std::move(c));
  }
  if (fut.wait_for(timeout) != std::future_status::ready) fail("failover of '{}' did not finish in time", name_);
  return fut.get();
}

std::string PrimarySession::disable(std::chrono::milliseconds timeout) {
  auto c = std::make_unique<Command>();
  c->kind = CmdKind::Disable;
  auto fut = c->done.get_future();
  {
    std::lock_guard<std::mutex> g(mu_);
    if (finished_) return fmt::format("VM '{}' was no longer protected ({})", name_, state_);
    commands_.push_back(std::move(c));
  }
  if (fut.wait_for(timeout) != std::future_status::ready) fail("disable of '{}' did not finish in time", name_);
  return fut.get();
}

nlohmann::json PrimarySession::status() const {
  std::lock_guard<std::mutex> g(mu_);
  double tput = 0;
  if (tput_.size() >= 2) {
    double s = std::chrono::duration<double>(tput_.back().first - tput_.front().first).count();
    if (s > 0) tput = static_cast<double>(tput_.back().second - tput_.front().second) / s;
  }
  double lag = 0;
  if (inflight_cut_wall_ms_ > acked_cut_wall_ms_) lag = wall_ms() - acked_cut_wall_ms_;
  return {
      {"name", name_},
      {"role", "primary"},
      {"state", state_},
      {"reason", reason_},
      {"failover", req_.failover},
      {"reprotect", req_.reprotect},
      {"pair", {{"primary", History::node_name()}, {"standby", link_peer_.empty() ? req_.peer : link_peer_}}},
      {"history", history_->events()},
      {"epoch", last_acked_},
      {"epochs_cut", epochs_cut_},
      {"epoch_ms", req_.epoch_ms},
      {"qemu_pid", qemu_pid_},
      {"libvirt", domain_uuid_.empty() ? nlohmann::json(nullptr)
                                       : nlohmann::json{{"uri", libvirt_uri_}, {"uuid", domain_uuid_}}},
      {"guard_pid", guard_pid_},
      {"arbiter", [&] {
         const auto a = arbiter_->status();
         return nlohmann::json{{"kind", a.kind}, {"holds", a.holds}, {"healthy", a.healthy},
                               {"last_confirmed_wall_ms", a.last_confirmed_wall_ms}};
       }()},
      {"ram_mib", ram_size_ >> 20},
      {"tracker", tracker_name_},
      {"pause_ms", {{"last", pause_ms_.last()}, {"p50", pause_ms_.percentile(50)}, {"p99", pause_ms_.percentile(99)},
                    {"max", pause_ms_.percentile(100)}}},
      {"last_epoch",
       {{"pages", last_rec_.pages}, {"stop_ms", last_rec_.stop_us / 1000}, {"scan_ms", last_rec_.scan_us / 1000},
        {"copy_ms", last_rec_.copy_us / 1000}, {"devstate_ms", last_rec_.devstate_us / 1000},
        {"cont_ms", last_rec_.cont_us / 1000}, {"devstate_bytes", last_rec_.devstate_bytes},
        {"ack_ms", last_rec_.ack_us / 1000}}},
      {"dirty_pages", {{"last", pages_.last()}, {"mean", pages_.mean()}, {"p99", pages_.percentile(99)}}},
      {"checkpoint_bytes", {{"last", bytes_.last()}, {"mean", bytes_.mean()}}},
      {"throughput_mib_s", tput / (1 << 20)},
      {"standby_lag_ms", lag},
      {"ram_digest", fmt::format("{:016x}", last_ram_digest_)},
      {"rejected_epochs", rejected_},
      {"output", output_ ? output_->status() : nlohmann::json(nullptr)},
      {"disk", disks_ ? disks_->status() : nlohmann::json(nullptr)},
      {"sync", {{"passes", sync_passes_}, {"pages", sync_pages_}, {"ms", sync_ms_}}},
      {"link",
       {{"peer", link_peer_.empty() ? req_.peer : link_peer_},
        {"second_path", {{"peer", hb_peer_}, {"state", hb_state_}}},
        {"transport", link_backend_.empty() ? "tcp" : link_backend_},
        {"security", link_security_},
        {"idle_ms", link_idle_ms_},
        {"healthy", state_ == "protected" || state_ == "syncing"}}},
  };
}

Fault parse_fault(const std::string& s) {
  if (s == "crash-mid-epoch") return Fault::CrashMidEpoch;
  if (s == "corrupt-then-crash") return Fault::CorruptThenCrash;
  if (s == "corrupt-once") return Fault::CorruptOnce;
  if (s == "nbd-drop") return Fault::NbdDrop;
  if (s == "lose-activate-done") return Fault::LoseActivateDone;
  fail("unknown fault '{}' (known: crash-mid-epoch, corrupt-then-crash, corrupt-once, nbd-drop, lose-activate-done)", s);
}

}  // namespace ftvm::ftd
