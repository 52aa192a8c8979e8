#include "tools/ftd/standby.h"


#include <fcntl.h>
#include <signal.h>
#include <net/if.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>

#include "checkpoint/digest.h"
#include "checkpoint/failover.h"
#include "common/error.h"
#include "common/log.h"
#include "tools/ftd/history.h"
#include "transport/tcp/tcp_transport.h"
#include "vmm-glue/qemu_cmdline.h"

namespace ftvm::ftd {

namespace cp = checkpoint;
using cp::MsgType;
using Clock = std::chrono::steady_clock;

namespace {

// Sets the administrative state of network interface `ifname` (the twin's tap).
void set_link(const std::string& ifname, bool up) {
  if (ifname.empty() || ifname.size() >= IFNAMSIZ) fail("bad interface name '{}' in --twin-tap-map", ifname);
  UniqueFd s(check_sys(::socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0), "socket for interface ioctls"));
  ifreq r{};
  std::memcpy(r.ifr_name, ifname.c_str(), ifname.size());
  check_sys(::ioctl(s.get(), SIOCGIFFLAGS, &r), "SIOCGIFFLAGS on " + ifname, "does the twin's tap exist?");
  if (up) r.ifr_flags = static_cast<short>(r.ifr_flags | IFF_UP);
  else r.ifr_flags = static_cast<short>(r.ifr_flags & ~IFF_UP);
  check_sys(::ioctl(s.get(), SIOCSIFFLAGS, &r), fmt::format("set {} {}", ifname, up ? "up" : "down"));
}

bool link_exists(const std::string& ifname) {
  return std::filesystem::exists("/sys/class/net/" + ifname);
}

bool safe_name(const std::string& n) {
  if (n.empty() || n.size() > 128 || n[0] == '.') return false;
  for (char c : n)
    if (!(isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_' || c == '.')) return false;
  return true;
}

// Starts `argv` with stdin from /dev/null and stdout/stderr appended to `log_path`.
pid_t spawn(const std::vector<std::string>& argv, const std::string& log_path) {
  UniqueFd logfd(::open(log_path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0640));
  if (!logfd) throw SysError(errno, "open twin log " + log_path);
  UniqueFd nullfd(::open("/dev/null", O_RDONLY | O_CLOEXEC));
  if (!nullfd) throw SysError(errno, "open /dev/null");
  std::vector<char*> cargv;
  for (const auto& a : argv) cargv.push_back(const_cast<char*>(a.c_str()));
  cargv.push_back(nullptr);
  pid_t pid = ::fork();
  if (pid < 0) throw SysError(errno, "fork for the twin QEMU");
  if (pid == 0) {
    ::setsid();
    ::setpriority(PRIO_PROCESS, 0, 0);  // the twin runs the guest: not at ftd's raised priority
    if (int fd = ::open("/proc/self/oom_score_adj", O_WRONLY | O_CLOEXEC); fd >= 0) {  // nor its OOM shield
      ssize_t w = ::write(fd, "0\n", 2);
      (void)w;
      ::close(fd);
    }
    ::dup2(nullfd.get(), 0);
    ::dup2(logfd.get(), 1);
    ::dup2(logfd.get(), 2);
    ::syscall(SYS_close_range, 3, ~0U, 0);
    ::execv(cargv[0], cargv.data());  // an absolute path from --qemu-binary: no PATH search
    const char m[] = "ftvm: exec of the twin QEMU failed\n";
    ssize_t w = ::write(2, m, sizeof m - 1);
    (void)w;
    _exit(127);
  }
  return pid;
}

}  // namespace

StandbySession::StandbySession(const DaemonConfig& cfg, std::unique_ptr<transport::Connection> conn, Claim claim,
                               Adopt adopt, Resolver resolver, std::shared_ptr<cp::Arbiter> arbiter)
    : cfg_(cfg),
      conn_(std::move(conn)),
      claim_(std::move(claim)),
      adopt_(std::move(adopt)),
      resolver_(std::move(resolver)),
      arbiter_(std::move(arbiter)),
      peer_(conn_->peer()),
      peer_host_(transport::tcp::peer_host(peer_)),
      key_id_(conn_->key_id()),
      security_(conn_->security()) {
  if (!arbiter_) arbiter_ = cp::make_no_arbiter(cfg_.heartbeat_timeout * 2);
}

bool StandbySession::settle(Fate f) { return fate_.settle(f); }

StandbySession::Fate StandbySession::fate() const { return fate_.get(); }

cp::Verdict StandbySession::resolve(std::string& text) {
  bool dropped_now = false;
  const auto v = fate_.resolve(dropped_now);
  if (v == cp::Verdict::Active) {
    text = active_ ? fmt::format("the twin of '{}' runs on this host (it took over)", name())
                   : fmt::format("the twin of '{}' is being resumed on this host", name());
    return v;
  }
  if (dropped_now) {
    text = fmt::format("the paused twin of '{}' is dropped and will never run", name());
    log::warn("standby", "{}: the primary settled the broken session: it runs on alone; the twin is dropped", name());
    abort("the primary settled the broken session (Resolve): it runs on alone");
  } else {
    text = fmt::format("the twin of '{}' was already dropped", name());
  }
  return cp::Verdict::Dropped;
}

// The primary has been silent on every path for the heartbeat timeout. The arbiter decides
// whether that is a dead primary (Yes) or a partition this side lost (Fence) or cannot tell yet
// (Wait: the caller keeps polling the paths and asks again).
bool StandbySession::arbiter_allows_activation(std::chrono::milliseconds silent_for) {
  if (unwatched_since_) {
    // checkpoint/failover.h, StandbyView::watched: the primary may have run on alone while this
    // side was stopped; its twin could be older than output the primary released.
    destroy_twin(fmt::format("primary silent for {} ms, but this standby was itself stopped for {} ms or more while "
                             "the session ran ({} ms ago) and has not seen a Commit since: the primary may have run on "
                             "alone meanwhile, so the twin is dropped",
                             silent_for.count(), cfg_.heartbeat_timeout.count(),
                             std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - *unwatched_since_).count()));
    abort_ = true;
    return false;
  }
  cp::ArbiterSubject subj{name(), peer_host_, silent_for};
  subj.guest_pid = twin_pid_;
  subj.heartbeat_timeout = cfg_.heartbeat_timeout;
  cp::ArbiterAnswer a = cp::ArbiterAnswer::Wait;
  try {
    a = arbiter_->may_activate(subj, std::chrono::milliseconds(20));
  } catch (const std::exception& e) {
    log::error("standby", "{}: arbiter {}: {}; not activating", name(), arbiter_->kind(), e.what());
    a = cp::ArbiterAnswer::Wait;
  }
  if (a != last_answer_ || Clock::now() - arbiter_log_ > std::chrono::seconds(5)) {
    if (a != cp::ArbiterAnswer::Yes || arbiter_->kind() != "none")
      log::warn("standby", "{}: primary silent for {} ms; arbiter {} answers {}", name(), silent_for.count(),
                arbiter_->kind(), cp::to_string(a));
    last_answer_ = a;
    arbiter_log_ = Clock::now();
  }
  {
    std::lock_guard<std::mutex> g(mu_);
    if (a == cp::ArbiterAnswer::Wait && state_ == "protected")
      reason_ = fmt::format("primary silent for {} ms; waiting for arbiter {}", silent_for.count(), arbiter_->kind());
  }
  if (a == cp::ArbiterAnswer::Wait && force_pending())
    answer_force(ForceCode::Wait, fmt::format("the primary of '{}' has been silent for {} ms but arbiter {} cannot tell "
                                              "yet whether it is gone (Wait): the twin stays paused; retry",
                                              name(), silent_for.count(), arbiter_->kind()));
  switch (cp::failover::standby_on_arbiter(a)) {
    case cp::failover::OnSilence::DropThisSide:
      destroy_twin(fmt::format("primary silent for {} ms but arbiter {} says this side lost: the twin is dropped",
                               silent_for.count(), arbiter_->kind()));
      abort_ = true;
      return false;
    case cp::failover::OnSilence::DeclareLost: return true;
    case cp::failover::OnSilence::Listen: return false;
  }
  return false;
}

// StandbyView::watched (checkpoint/failover.h): called at every poll of the session thread.
void StandbySession::note_poll() {
  const auto now = Clock::now();
  if (last_poll_ != Clock::time_point{} && now - last_poll_ >= cfg_.heartbeat_timeout && sid_) {
    log::warn("standby", "{}: this standby did not run for {} ms (stopped or starved): until a Commit arrives from {} "
              "ms on, silence of the primary drops the twin instead of resuming it",
              name(), std::chrono::duration_cast<std::chrono::milliseconds>(now - last_poll_).count(),
              cfg_.heartbeat_timeout.count());
    unwatched_since_ = now;
  }
  last_poll_ = now;
}

bool StandbySession::adopt_heartbeat_link(uint64_t session_id, std::unique_ptr<transport::Connection>& conn) {
  if (session_id == 0 || session_id != sid_ || finished_) return false;
  // The second path must come from the host the data connection came from, with the same key:
  // another peer (even one holding the key) must not keep a session alive or end it.
  const auto host = transport::tcp::peer_host(conn->peer());
  if (!is_primary_host(host) || conn->key_id() != key_id_) {
    log::warn("standby", "{}: refused a second path from {} (key {}) for session {:016x}: the session's data "
              "connection comes from {} (key {}); a second path must come from the same host (or the second "
              "address its OpenSession declared) with the same key",
              name(), conn->peer(), conn->key_id().empty() ? "none" : conn->key_id(), session_id, peer_,
              key_id_.empty() ? "none" : key_id_);
    return false;
  }
  std::lock_guard<std::mutex> g(mu_);
  pending_hb_ = std::move(conn);
  return true;
}

std::chrono::milliseconds StandbySession::silence() const {
  auto s = conn_ ? conn_->idle_for() : std::chrono::milliseconds::max();
  if (hb_) s = std::min(s, hb_->idle_for());
  return s;
}

// Polls the second path once. Life on it keeps the session from declaring the primary dead;
// Disable/PrimaryLost/Takeover may arrive on it when the data path is broken.
bool StandbySession::poll_second_path() {
  {
    std::lock_guard<std::mutex> g(mu_);
    if (pending_hb_) {
      hb_ = std::move(pending_hb_);
      log::info("standby", "{}: second path {} attached", name_, hb_->peer());
    }
  }
  if (!hb_) return true;
  try {
    auto m = hb_->poll(std::chrono::milliseconds(0));
    if (!m) return true;
    switch (static_cast<MsgType>(m->type)) {
      case MsgType::Disable:
      case MsgType::PrimaryLost:
      case MsgType::Error:
        return handle(*m);
      default:
        throw ProtocolError(fmt::format("unexpected {} on the second path", cp::to_string(static_cast<MsgType>(m->type))));
    }
  } catch (const LinkDown& e) {
    log::warn("standby", "{}: second path lost: {}", name(), e.what());
    hb_.reset();
  }
  return true;
}

StandbySession::~StandbySession() {
  abort("ftd is shutting down");
  join();
}

void StandbySession::start() { thread_ = std::thread([this] { run(); }); }

void StandbySession::join() {
  if (thread_.joinable()) thread_.join();
}

void StandbySession::abort(const std::string& why) {
  {
    std::lock_guard<std::mutex> g(mu_);
    abort_reason_ = why;
  }
  abort_ = true;
}

std::string StandbySession::name() const {
  std::lock_guard<std::mutex> g(mu_);
  return name_;
}

void StandbySession::set_state(const std::string& s, const std::string& reason) {
  std::lock_guard<std::mutex> g(mu_);
  if (s != state_)
    log::info("standby", "{}: state {} -> {}{}{}", name_.empty() ? conn_->peer() : name_, state_, s,
              reason.empty() ? "" : ": ", reason);
  state_ = s;
  reason_ = reason;
}

void StandbySession::run() {
  auto last_heard = Clock::now();
  try {
    for (;;) {
      if (abort_) {
        destroy_twin(abort_reason());
        break;
      }
      note_poll();
      if (!poll_second_path()) break;
      check_twin_alive();
      check_force(false);
      std::optional<transport::ControlMessage> m;
      try {
        m = conn_->poll(std::chrono::milliseconds(20));
        last_heard = Clock::now() - silence();
      } catch (const LinkDown& e) {
        // The data path is gone. With a live second path the primary is alive (only the path
        // broke): wait for its Disable there, never activate. Otherwise treat it as silence that
        // began with the last frame on any path, so the guard on the primary has the full
        // heartbeat timeout to fence its QEMU.
        const auto lost_at = Clock::now();
        for (;;) {
          if (abort_) break;
          note_poll();
          if (!poll_second_path()) {
            conn_.reset();
            finished_ = true;
            return;
          }
          check_force(false);
          if (hb_ && hb_->idle_for() <= cfg_.heartbeat_timeout) {
            last_heard = Clock::now() - hb_->idle_for();
            if (Clock::now() - lost_at > 10 * cfg_.heartbeat_timeout) {
              destroy_twin(fmt::format("data path lost ({}) but the primary is alive on the second path", e.what()));
              conn_.reset();
              finished_ = true;
              return;
            }
          } else if (Clock::now() >= last_heard + cfg_.heartbeat_timeout) {
            if (fate() != Fate::Open) break;  // settled by a Resolve meanwhile
            if (!replica_ || !replica_->has_checkpoint()) break;  // nothing to resume: closes below
            if (arbiter_allows_activation(std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - last_heard)))
              break;
            if (abort_) break;
          }
          std::this_thread::sleep_for(std::chrono::milliseconds(2));
        }
        if (abort_) continue;
        primary_silent(fmt::format("link to the primary lost ({}) and silent for {} ms", e.what(),
                                   cfg_.heartbeat_timeout.count()));
        break;
      }
      if (m) {
        if (!handle(*m)) break;
        continue;
      }
      // The rule is checkpoint::failover::standby_next (the simulation runs the same).
      const auto quiet = silence();
      if (quiet < cp::failover::suspect_after(cfg_.heartbeat_timeout)) suspect_sent_ = false;
      cp::failover::StandbyView v;
      v.silence = quiet;
      v.has_checkpoint = replica_ && replica_->has_checkpoint();
      v.suspect_sent = suspect_sent_;
      v.session_open = replica_ && sid_;
      v.watched = !unwatched_since_;
      auto next = cp::failover::standby_next(v, cfg_.heartbeat_timeout);
      if (next == cp::failover::StandbyAction::SendSuspect) {
        // Our frames may still reach the primary (one-way cut): it pauses and settles.
        suspect_sent_ = v.suspect_sent = true;
        log::warn("standby", "{}: primary silent for {} ms: asking it to settle (Suspect)", name(), quiet.count());
        try {
          cp::send(*conn_, cp::Suspect{session_id_, static_cast<uint32_t>(quiet.count())});
          conn_->flush();
        } catch (const std::exception& e) {
          log::warn("standby", "{}: sending Suspect failed: {}", name(), e.what());
        }
        next = cp::failover::standby_next(v, cfg_.heartbeat_timeout);
      }
      if (next == cp::failover::StandbyAction::AskArbiter || next == cp::failover::StandbyAction::DropUnwatched) {
        if (!arbiter_allows_activation(quiet)) continue;  // Wait, or dropped (Fence, unwatched)
        primary_silent(fmt::format("no heartbeat from the primary for {} ms", quiet.count()));
        break;
      }
      if (next == cp::failover::StandbyAction::NothingToResume) {
        primary_silent(fmt::format("no heartbeat from the primary for {} ms", quiet.count()));  // destroys the twin
        break;
      }
    }
  } catch (const ProtocolError& e) {
    log::error("standby", "{}: protocol error from {}: {}", name(), conn_->peer(), e.what());
    try {
      cp::send(*conn_, cp::ErrorMsg{e.what()});
      conn_->flush();
    } catch (const std::exception&) {
    }
    destroy_twin(std::string("protocol error: ") + e.what());
  } catch (const std::exception& e) {
    log::error("standby", "{}: session failed: {}", name(), e.what());
    try {
      cp::send(*conn_, cp::ErrorMsg{e.what()});
      conn_->flush();
    } catch (const std::exception&) {
    }
    destroy_twin(std::string("error: ") + e.what());
  }
  conn_.reset();
  {
    std::lock_guard<std::mutex> g(force_mu_);
    finished_ = true;
    if (force_requested_ && !force_result_) {
      std::lock_guard<std::mutex> g2(mu_);
      force_result_ = active_ ? ForceResult{ForceCode::Done, fmt::format("the twin of '{}' runs on this host", name_)}
                              : ForceResult{ForceCode::Refused, fmt::format("the session of '{}' ended ({}: {})", name_,
                                                                            state_, reason_)};
    }
  }
  force_cv_.notify_all();
}

vmm::TwinPolicy StandbySession::twin_policy() const {
  vmm::TwinPolicy p;
  p.qemu_binaries = cfg_.qemu_binaries;
  p.run_dir = vm_dir_;
  p.disk_dir = disk_dir_;
  p.read_dirs = cfg_.allow_paths;
  return p;
}

namespace {
// MemAvailable and SwapFree from /proc/meminfo, in bytes (0 when unreadable).
std::pair<uint64_t, uint64_t> mem_available() {
  std::ifstream f("/proc/meminfo");
  std::string key;
  uint64_t v = 0, avail = 0, swap = 0;
  std::string unit;
  while (f >> key >> v) {
    std::getline(f, unit);
    if (key == "MemAvailable:") avail = v << 10;
    if (key == "SwapFree:") swap = v << 10;
  }
  return {avail, swap};
}
}  // namespace

// Issue 17: a twin that cannot get the memory the guest uses now is refused up front (the
// primary's `ftctl enable` exits 5 with this text) rather than being OOM-killed during the sync,
// or having the OOM killer pick something else on this host. A guest that later touches more
// of its RAM can still outgrow the host: that is logged as a warning here.
void StandbySession::check_memory_for(const cp::OpenSession& o) {
  const auto [avail, swap] = mem_available();
  if (avail == 0) {
    log::warn("standby", "{}: cannot read MemAvailable from /proc/meminfo; admitting the twin unchecked", o.vm_name);
    return;
  }
  const uint64_t reserve = cfg_.memory_reserve_bytes;
  const uint64_t need = o.ram_used + (64u << 20);  // the guest's data + QEMU's own overhead
  if (need + reserve > avail)
    fail("this standby host has {} MiB of memory available and keeps {} MiB free (--memory-reserve-mib); the twin "
         "of VM '{}' needs {} MiB now ({} MiB of its {} MiB of RAM in use, plus 64 MiB for QEMU): free memory on the "
         "standby, lower its --memory-reserve-mib, or protect the VM towards another host",
         avail >> 20, reserve >> 20, o.vm_name, need >> 20, o.ram_used >> 20, o.ram_size >> 20);
  if (o.ram_size + reserve > avail + swap)
    log::warn("standby", "{}: the guest may grow to {} MiB, more than this host has available ({} MiB + {} MiB "
              "swap, {} MiB reserved); if it does, the OOM killer ends the twin (never ftd: oom_score_adj)",
              o.vm_name, o.ram_size >> 20, avail >> 20, swap >> 20, reserve >> 20);
}

void StandbySession::open(const cp::OpenSession& o) {
  if (!safe_name(o.vm_name))
    throw ProtocolError(fmt::format("VM name '{}' is not usable as a file name ([A-Za-z0-9._-], up to 128)", o.vm_name));
  if (o.arbiter == "none" && arbiter_->kind() != "none") {
    log::warn("standby", "{}: this VM opts out of arbitration (arbiter=none): the twin resumes on silence alone", o.vm_name);
    arbiter_ = cp::make_no_arbiter(cfg_.alone_after);
  } else if (o.arbiter != arbiter_->kind()) {
    fail("VM '{}' asks for arbiter '{}' but this ftd arbitrates with '{}'; configure both hosts alike (ftd --arbiter)",
         o.vm_name, o.arbiter, arbiter_->kind());
  }
  check_memory_for(o);
  // Claim before taking the name: a refused session must not show up as that VM's session.
  {
    std::lock_guard<std::mutex> g(mu_);
    second_path_host_ = o.second_path_host;
  }
  claim_(o.vm_name, this);
  {
    std::lock_guard<std::mutex> g(mu_);
    name_ = o.vm_name;
  }
  session_id_ = o.session_id;
  reprotect_port_ = o.reprotect_port;
  failover_manual_ = o.failover == cp::FailoverPolicy::Manual;
  origin_ = o.origin;
  history_in_ = o.history;
  sid_ = o.session_id;
  vm_dir_ = cfg_.run_dir + "/vms/" + o.vm_name;
  std::filesystem::create_directories(vm_dir_);
  // The claim passed: no activated twin of this VM runs here. A marker left by one that ran
  // here earlier (and died since, e.g. as the primary of a later failover) is stale.
  if (::unlink((vm_dir_ + "/active").c_str()) == 0)
    log::info("standby", "{}: removed the stale 'active' marker of an earlier twin", o.vm_name);
  const std::string qmp = vm_dir_ + "/twin-qmp.sock";
  ::unlink(qmp.c_str());
  vmm::TwinOptions to;
  to.run_dir = vm_dir_;
  to.qmp_socket = qmp;
  to.tap_ifnames = cfg_.twin_tap_map;
  if (!o.disks.empty()) {
    // Fresh replicas: the primary's mirror jobs copy every disk in full before epoch 1.
    disk_dir_ = cfg_.disk_dir + "/" + o.vm_name;
    std::filesystem::create_directories(disk_dir_);
    std::vector<checkpoint::DiskImage*> imgs;
    for (size_t i = 0; i < o.disks.size(); i++) {
      const auto path = fmt::format("{}/{}.img", disk_dir_, i);
      images_.push_back(checkpoint::RawImage::create(path, o.disks[i].size));
      imgs.push_back(images_.back().get());
      disk_paths_.push_back(path);
      to.disk_files[o.disks[i].source] = path;
      log::info("standby", "{}: disk '{}' ({}, {} MiB) -> replica {}", o.vm_name, o.disks[i].id, o.disks[i].source,
                o.disks[i].size >> 20, path);
    }
    // Spill files go beside the replicas (--disk-dir, a real file system), not into the run
    // dir (tmpfs /run: spilling there would eat RAM), and are capped (--disk-spill-max-mib).
    journal_ = std::make_unique<checkpoint::DiskJournal>(imgs, cfg_.disk_buffer_bytes, disk_dir_, 1,
                                                         cfg_.disk_spill_max_bytes);
    update_disk_status();
  }
  if (!o.libvirt_xml.empty()) {
    start_libvirt_twin(o, to.disk_files);
  } else {
    // What the standby executes is its own decision (issue 12): the binary is one of
    // --qemu-binary, and every option and file of the final command line passes the twin policy.
    if (o.qemu_argv.empty()) throw ProtocolError("OpenSession without a QEMU command line and without libvirt XML");
    auto peer_argv = o.qemu_argv;
    peer_argv[0] = vmm::pick_qemu_binary(peer_argv[0], cfg_.qemu_binaries);
    auto argv = vmm::make_twin_cmdline(peer_argv, to);
    if (auto problems = vmm::check_twin_cmdline(argv, twin_policy()); !problems.empty())
      throw Error(fmt::format("refusing to start the twin: its command line breaks this standby's policy "
                              "(docs/ARCHITECTURE.md, \"Security\"): {}",
                              fmt::join(problems, "; ")));
    // The twin's taps stay admin-down until activation: frames queued on a paused twin's tap
    // would reach the guest stale when it resumes (and confuse its TCP).
    for (const auto& [p, tap] : cfg_.twin_tap_map)
      if (link_exists(tap)) set_link(tap, false);
    {
      std::string line;
      for (const auto& a : argv) line += (line.empty() ? "" : " ") + a;
      log::info("standby", "{}: starting twin: {}", o.vm_name, line);
    }
    twin_pid_ = spawn(argv, vm_dir_ + "/twin.log");
    {
      auto pidfile = vm_dir_ + "/twin.pid";
      auto s = std::to_string(twin_pid_) + "\n";
      UniqueFd f(::open(pidfile.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
      if (f && ::write(f.get(), s.data(), s.size()) < 0) log::warn("standby", "writing {} failed", pidfile);
    }
    twin_qmp_ = std::make_unique<vmm::QmpClient>(vmm::QmpClient::connect(qmp, std::chrono::milliseconds(30000)));
  }
  auto st = twin_qmp_->execute("query-status").value("status", "");
  if (st != "inmigrate")
    throw Error(fmt::format("twin QEMU pid {} is in state '{}', expected 'inmigrate' (see {}/twin.log)", twin_pid_, st,
                            vm_dir_));
  for (const auto& [p, tap] : cfg_.twin_tap_map)  // QEMU may have created them just now
    if (link_exists(tap)) set_link(tap, false);
  auto gr = vmm::find_guest_ram(twin_pid_, o.ram_size);
  twin_ram_ = std::make_unique<vmm::MappedRam>(twin_pid_, gr, vmm::MappedRam::Access::ReadWrite);
  twin_watch_ = std::make_unique<vmm::ProcessWatch>(twin_pid_);
  replica_ = std::make_unique<cp::Replica>(as_span(*twin_ram_), uint64_t{8} << 20);
  conn_->register_region(cp::kRegionRam, as_span(*twin_ram_));
  ram_region_open_ = true;
  conn_->register_region(cp::kRegionStaging, replica_->staging());
  set_state("syncing");
  cp::send(*conn_, cp::SessionReady{session_id_, replica_->staging().size(), twin_pid_,
                                    static_cast<uint32_t>(cfg_.heartbeat_timeout.count())});
  conn_->flush();
  log::info("standby", "{}: twin pid {} paused (inmigrate), RAM {} MiB mapped; receiving full sync from {}", o.vm_name,
            twin_pid_, o.ram_size >> 20, conn_->peer());
}

bool StandbySession::handle(const transport::ControlMessage& m) {
  const auto type = static_cast<MsgType>(m.type);
  if (type != MsgType::OpenSession && type != MsgType::HeartbeatLink && type != MsgType::Resolve && !replica_ && !sid_)
    throw ProtocolError(fmt::format("{} before OpenSession", cp::to_string(type)));
  auto check_sid = [&](uint64_t sid) {
    if (sid != session_id_)
      throw ProtocolError(fmt::format("{} for unknown session {:016x} (this session is {:016x})", cp::to_string(type),
                                      sid, session_id_));
  };
  switch (type) {
    case MsgType::OpenSession: {
      if (replica_) throw ProtocolError("second OpenSession on one connection");
      cp::OpenSession o;
      try {
        o = cp::decode<cp::OpenSession>(m.body);
        open(o);
      } catch (const std::exception& e) {
        log::error("standby", "refusing session from {}: {}", conn_->peer(), e.what());
        cp::send(*conn_, cp::ErrorMsg{e.what()});
        conn_->flush();
        destroy_twin(std::string("session refused: ") + e.what());
        return false;
      }
      return true;
    }
    case MsgType::HeartbeatLink: {
      if (replica_) throw ProtocolError("HeartbeatLink on a data connection");
      auto h = cp::decode<cp::HeartbeatLink>(m.body);
      transient_ = true;
      if (!adopt_ || !adopt_(h.session_id, conn_)) {
        log::warn("standby", "second path from {} names unknown session {:016x}", conn_->peer(), h.session_id);
        cp::send(*conn_, cp::ErrorMsg{fmt::format("unknown session {:016x}", h.session_id)});
        conn_->flush();
      }
      return false;
    }
    case MsgType::Resolve: {
      if (replica_ || sid_) throw ProtocolError("Resolve on a session's connection");
      auto r = cp::decode<cp::Resolve>(m.body);
      transient_ = true;
      cp::Resolution res{r.session_id, cp::Verdict::Unknown, "no resolver"};
      if (resolver_) {
        try {
          res = resolver_(r, *this);
        } catch (const Error& e) {  // not this peer's session: refused, nothing changed
          log::warn("standby", "refusing Resolve from {}: {}", conn_->peer(), e.what());
          cp::send(*conn_, cp::ErrorMsg{e.what()});
          conn_->flush();
          return false;
        }
      }
      log::warn("standby", "Resolve from {} for session {:016x} of '{}': {} ({})", conn_->peer(), r.session_id,
                r.vm_name, cp::to_string(res.verdict), res.text);
      cp::send(*conn_, res);
      conn_->flush();
      return false;
    }
    case MsgType::StagingGrow: {
      auto g = cp::decode<cp::StagingGrow>(m.body);
      check_sid(g.session_id);
      conn_->unregister_region(cp::kRegionStaging);
      uint64_t cap = replica_->grow_staging(g.bytes);
      conn_->register_region(cp::kRegionStaging, replica_->staging());
      cp::send(*conn_, cp::StagingGranted{session_id_, cap});
      conn_->flush();
      log::info("standby", "{}: staging grown to {} KiB", name(), cap >> 10);
      return true;
    }
    case MsgType::EpochBegin: {
      auto b = cp::decode<cp::EpochBegin>(m.body);
      check_sid(b.session_id);
      begun_epoch_ = b.epoch;
      return true;
    }
    case MsgType::DiskWrite: {
      auto d = cp::decode<cp::DiskWrite>(m.body);
      check_sid(d.session_id);
      if (!journal_) throw ProtocolError("DiskWrite in a session without disks");
      journal_->add(d.epoch, d.disk, d.op, d.offset, d.length, d.data);
      return true;
    }
    case MsgType::Commit: {
      auto c = cp::decode<cp::Commit>(m.body);
      check_sid(c.session_id);
      if (ram_region_open_) {
        // The full sync is over (every region-1 write precedes the first Commit on the wire):
        // from now on the twin's RAM changes only through verified epochs (Replica::apply), so
        // the peer loses direct write access to it. A region-1 write after this is a
        // ProtocolError and ends the session.
        conn_->unregister_region(cp::kRegionRam);
        ram_region_open_ = false;
        log::info("standby", "{}: full sync done; twin RAM no longer writable by the primary", name());
      }
      // The epoch's disk writes must be complete before its RAM is applied: RAM and disk move
      // to epoch N together. Missing or altered disk writes cannot be retransmitted: the
      // ProtocolError ends the session (the primary resynchronizes).
      if (journal_) journal_->verify(c.epoch, c.disk_ops, c.disk_digest);
      else if (c.disk_ops) throw ProtocolError(fmt::format("Commit {} counts {} disk writes in a session without disks", c.epoch, c.disk_ops));
      try {
        replica_->apply(c, conn_->epoch_key());
      } catch (const ProtocolError& e) {
        last_rejection_ = e.what();
        log::warn("standby", "{}: rejected epoch {}: {}; the replica stays at epoch {}", name(), c.epoch, e.what(),
                  replica_->committed_epoch());
        cp::send(*conn_, cp::Ack{session_id_, c.epoch, cp::AckStatus::Rejected, e.what()});
        conn_->flush();
        return true;
      }
      if (journal_) {
        journal_->commit(c.epoch, c.disk_ops, c.disk_digest);
        update_disk_status();
      }
      if (cfg_.verify_every_commit) {
        // Test mode: the whole twin RAM must now equal the primary's RAM at this checkpoint.
        const uint64_t d = cp::digest_ram_sparse(as_span(*twin_ram_), twin_ram_->data_ranges());
        if (d != c.ram_digest)
          fail("after applying epoch {} the twin's RAM digest is {:016x}, the primary's is {:016x}", c.epoch, d,
               c.ram_digest);
        std::lock_guard<std::mutex> g(mu_);
        verified_commits_++;
      }
      cp::send(*conn_, cp::Ack{session_id_, c.epoch, cp::AckStatus::Applied, {}});
      conn_->flush();
      {
        std::lock_guard<std::mutex> g(mu_);
        committed_ = c.epoch;
        if (unwatched_since_ && Clock::now() >= *unwatched_since_ + cfg_.heartbeat_timeout) {
          log::info("standby", "{}: watching again: epoch {} committed {} ms after this side's own stall", name_, c.epoch,
                    std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - *unwatched_since_).count());
          unwatched_since_.reset();
        }
        last_commit_wall_ms_ = wall_ms();
      }
      if (state_ != "protected") {
        set_state("protected");
        std::lock_guard<std::mutex> g(mu_);
        local_events_.push_back({{"wall_ms", wall_ms()}, {"event", "protected"}, {"host", History::node_name()},
                                 {"primary", origin_.empty() ? peer_host_ : origin_}, {"standby", History::node_name()},
                                 {"session", fmt::format("{:016x}", session_id_)},
                                 {"failover", failover_manual_ ? "manual" : "auto"}});
      }
      return true;
    }
    case MsgType::Activate: {
      auto a = cp::decode<cp::Activate>(m.body);
      check_sid(a.session_id);
      if (!replica_ || !replica_->has_checkpoint()) {
        // Nothing committed: the twin holds no state to resume. The primary still runs the
        // guest; the twin goes.
        const std::string why = "planned failover requested before any checkpoint was committed: the twin holds no "
                                "state to resume (the primary keeps running the guest; wait for the first Commit)";
        log::error("standby", "{}: refusing Activate: {}", name(), why);
        cp::send(*conn_, cp::ActivateDone{session_id_, 0u, why});
        conn_->flush();
        destroy_twin("Activate before any committed checkpoint");
        return false;
      }
      activate("planned failover requested by the primary", wall_ms());
      bool ok = active_;
      std::string text;
      {
        std::lock_guard<std::mutex> g(mu_);
        text = ok ? "twin running" : reason_;
      }
      cp::send(*conn_, cp::ActivateDone{session_id_, ok ? 1u : 0u, text});
      conn_->flush();
      return false;
    }
    case MsgType::PrimaryLost: {
      auto p = cp::decode<cp::PrimaryLost>(m.body);
      check_sid(p.session_id);
      primary_silent("primary reports its QEMU died: " + p.reason, true);  // no arbiter: the primary says it is gone
      return false;
    }
    case MsgType::Disable: {
      auto d = cp::decode<cp::Disable>(m.body);
      check_sid(d.session_id);
      destroy_twin("protection disabled by the primary");
      return false;
    }
    case MsgType::Error:
      destroy_twin("primary reported an error: " + cp::decode<cp::ErrorMsg>(m.body).text);
      return false;
    default:
      throw ProtocolError(fmt::format("unexpected message type {} ({}) from the primary", m.type, cp::to_string(type)));
  }
}

// The twin of a libvirt domain is a libvirt domain too: created (transient, paused) from the
// primary's XML with the replicas for its disks, its unix sockets moved into this VM's run
// dir, no ftvm protection element, and `-incoming defer` so that QEMU waits for the device
// state exactly like a plain twin. After activation it is defined persistently (without the
// -incoming argument): a normal domain of this host.
void StandbySession::start_libvirt_twin(const cp::OpenSession& o, const std::map<std::string, std::string>& disks) {
  vmm::TwinXmlOptions x;
  x.name = o.vm_name + cfg_.twin_name_suffix;
  x.uuid = cfg_.twin_name_suffix.empty() ? "" : "generate";
  x.disk_files = disks;
  x.socket_dir = vm_dir_;
  const vmm::TwinPolicy policy = twin_policy();
  x.policy = &policy;
  // As for a plain twin: the device state from xen-save-devices-state has no configuration
  // section, so the twin must not expect one.
  x.extra_qemu_args = {"-incoming", "defer", "-global", "migration.send-configuration=off"};
  const auto xml = vmm::twin_xml(o.libvirt_xml, x);  // checks the policy (throws): before libvirt sees it
  if (cfg_.libvirt_uri.empty())
    throw Error(fmt::format("the primary protects libvirt domain '{}' but this ftd runs without libvirt "
                            "(--libvirt-uri ''); start the standby ftd with a libvirt URI", o.vm_name));
  // QEMU runs as libvirt's user: it must reach the sockets it creates in the VM's run dir.
  make_run_dir_reachable(vm_dir_, cfg_.run_dir);
  auto conn = vmm::lv::Connection::open(cfg_.libvirt_uri);
  {
    UniqueFd f(::open((vm_dir_ + "/twin.xml").c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
    if (f && ::write(f.get(), xml.data(), xml.size()) < 0) log::warn("standby", "writing twin.xml failed");
  }
  log::info("standby", "{}: creating twin libvirt domain '{}' (paused, incoming) on {}; XML in {}/twin.xml", o.vm_name,
            x.name, conn.uri(), vm_dir_);
  // A paused transient domain of that name is a twin left behind by an earlier session (its
  // activation failed, or ftd died): it never ran the guest, so it goes. Anything else of that
  // name is a real domain and is not touched.
  try {
    auto old = vmm::lv::Domain::lookup(conn, x.name);
    if (old.active() && !old.persistent() && old.state().state == "paused") {
      log::warn("standby", "{}: destroying the stale paused twin domain '{}' of an earlier session", o.vm_name, x.name);
      old.destroy();
    } else {
      throw Error(fmt::format("a libvirt domain named '{}' already exists here ({}{}); it may be this VM after an "
                              "earlier failover: refusing to create another twin", x.name, old.state().str(),
                              old.persistent() ? ", persistent" : ""));
    }
  } catch (const vmm::lv::NoSuchDomain&) {
  }
  auto twin = vmm::lv::create_paused(conn, xml);
  twin_uuid_ = twin.uuid();
  // What gets defined after activation: the same domain (name, UUID libvirt gave it) without
  // the -incoming arguments.
  x.extra_qemu_args.clear();
  x.uuid = twin_uuid_;
  twin_persistent_xml_ = vmm::twin_xml(o.libvirt_xml, x);
  twin_pid_ = twin.qemu_pid();
  // The monitor keeps its own references (and reconnects across libvirtd restarts); later
  // define/destroy look the twin up again by UUID, so no handle here can go stale.
  twin_qmp_ = std::make_unique<vmm::LibvirtMonitor>(conn, twin);
}

void StandbySession::primary_silent(const std::string& why_in, bool reported_dead) {
  double declared = wall_ms();
  std::string why = why_in;
  if (!replica_ || !replica_->has_checkpoint()) {
    destroy_twin(why + "; no committed checkpoint yet, nothing to resume");
    return;
  }
  if (failover_manual_) {
    if (!await_operator(why, reported_dead)) return;
    forget_manual_wait();  // resuming now: a restarted ftd must not adopt it again
    why = fmt::format("ftctl failover --force (failover=manual; {})", why);
    declared = wall_ms();
  }
  if (!settle(Fate::Activating)) {
    destroy_twin("not activating (" + why + "): the primary already settled the session and runs on");
    return;
  }
  log::warn("standby", "{}: primary declared dead: {}", name(), why);
  // If the primary was only stalled and the link still works, this makes it fence itself.
  if (conn_) {
    try {
      cp::send(*conn_, cp::Takeover{session_id_, why});
      conn_->flush();
    } catch (const std::exception&) {
    }
  }
  activate(why, declared);
  if (force_pending()) {
    std::string text;
    {
      std::lock_guard<std::mutex> g(mu_);
      text = active_ ? fmt::format("VM '{}' runs on this host now (twin pid {}, resumed from epoch {})", name_,
                                   twin_pid_, committed_)
                     : fmt::format("resuming the twin of '{}' failed: {}", name_, reason_);
    }
    answer_force(active_ ? ForceCode::Done : ForceCode::Failed, text);
  }
}

bool StandbySession::force_pending() const {
  std::lock_guard<std::mutex> g(force_mu_);
  return force_requested_ && !force_result_;
}

void StandbySession::answer_force(ForceCode c, const std::string& text) {
  {
    std::lock_guard<std::mutex> g(force_mu_);
    if (!force_requested_ || force_result_) return;
    force_result_ = ForceResult{c, text};
  }
  log::warn("standby", "{}: ftctl failover --force: {}", name(), text);
  force_cv_.notify_all();
}

StandbySession::ForceResult StandbySession::force_failover(std::chrono::milliseconds timeout) {
  std::unique_lock<std::mutex> l(force_mu_);
  if (force_requested_) return {ForceCode::Refused, fmt::format("another `ftctl failover --force {}` is running", name())};
  if (finished_) return {ForceCode::Refused, fmt::format("the session of '{}' has ended", name())};
  force_requested_ = true;
  force_result_.reset();
  log::warn("standby", "{}: ftctl failover --force requested", name());
  const bool answered = force_cv_.wait_for(l, timeout, [&] { return force_result_.has_value() || finished_.load(); });
  ForceResult r = force_result_ ? *force_result_
                                : ForceResult{ForceCode::Failed, answered ? fmt::format("the session of '{}' ended", name())
                                                                          : fmt::format("no decision within {} ms",
                                                                                        timeout.count())};
  force_requested_ = false;
  force_result_.reset();
  return r;
}

void StandbySession::check_force(bool reported_dead) {
  if (!force_pending()) return;
  if (!replica_ || !replica_->has_checkpoint()) {
    answer_force(ForceCode::Refused, fmt::format("the twin of '{}' holds no committed checkpoint yet: nothing to "
                                                 "resume (the primary runs the guest)", name()));
    return;
  }
  const auto q = silence();
  if (!reported_dead && q < cfg_.heartbeat_timeout)
    answer_force(ForceCode::Refused,
                 fmt::format("the primary of '{}' ({}) is heard: last frame {} ms ago on {} (the timeout is {} ms); it "
                             "runs the guest and two copies must never run. For a planned switchover run `ftctl "
                             "failover {}` on the primary host",
                             name(), peer_, q.count(), hb_ ? "one of two paths" : "the data path",
                             cfg_.heartbeat_timeout.count(), name()));
  // Silent for the timeout: the silence handling asks the arbiter (Wait is answered there).
}

bool StandbySession::await_operator(const std::string& why, bool reported_dead) {
  auto set_waiting = [&] {
    set_state("primary-lost", fmt::format("{}; failover=manual: the twin stays paused, waiting for `ftctl failover "
                                          "--force {}` on this host", why, name()));
  };
  set_waiting();
  {
    std::lock_guard<std::mutex> g(mu_);
    local_events_.push_back({{"wall_ms", wall_ms()}, {"event", "primary-lost"}, {"host", History::node_name()},
                             {"primary", origin_}, {"reason", why.substr(0, 300)}, {"failover", "manual"}});
  }
  persist_manual_wait(reported_dead);  // standby_persist.h: the wait survives an ftd restart
  bool data_up = conn_ != nullptr;
  // Messages the primary may still send: PrimaryLost (its QEMU is dead), Disable and Error (it
  // runs: the twin goes). Anything else means the primary runs on: a protocol error (the twin goes).
  auto take = [&](const transport::ControlMessage& m) -> bool {
    const auto type = static_cast<MsgType>(m.type);
    switch (type) {
      case MsgType::PrimaryLost:
        if (!reported_dead) {
          log::warn("standby", "{}: the primary reports its QEMU died: {}", name(),
                    cp::decode<cp::PrimaryLost>(m.body).reason);
          persist_manual_wait(true);
        }
        reported_dead = true;
        return true;
      case MsgType::Disable:
        destroy_twin("protection disabled by the primary");
        return false;
      case MsgType::Error:
        destroy_twin("primary reported an error: " + cp::decode<cp::ErrorMsg>(m.body).text);
        return false;
      default:
        throw ProtocolError(fmt::format("{} from the primary while its twin waits for `ftctl failover --force` (the "
                                        "primary was declared lost)", cp::to_string(type)));
    }
  };
  for (;;) {
    if (abort_) {
      if (!keep_for_restart()) destroy_twin(abort_reason());
      return false;
    }
    check_twin_alive();
    if (data_up) {
      try {
        if (auto m = conn_->poll(std::chrono::milliseconds(20)); m && !take(*m)) return false;
      } catch (const LinkDown&) {
        data_up = false;
      }
    } else {
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    {
      std::lock_guard<std::mutex> g(mu_);
      if (pending_hb_) hb_ = std::move(pending_hb_);
    }
    if (hb_) {
      try {
        if (auto m = hb_->poll(std::chrono::milliseconds(0)); m && !take(*m)) return false;
      } catch (const LinkDown&) {
        hb_.reset();
      }
    }
    if (!force_pending()) continue;
    if (!reported_dead && silence() < cfg_.heartbeat_timeout) {
      check_force(false);  // answers: the primary is heard
      continue;
    }
    if (reported_dead) return true;
    cp::ArbiterAnswer a = cp::ArbiterAnswer::Wait;
    try {
      cp::ArbiterSubject subj{name(), peer_host_, silence()};
      subj.guest_pid = twin_pid_;
      subj.heartbeat_timeout = cfg_.heartbeat_timeout;
      subj.forced = true;  // the operator asserts the primary is gone; an arbiter still decides
      a = arbiter_->may_activate(subj, std::chrono::milliseconds(20));
    } catch (const std::exception& e) {
      log::error("standby", "{}: arbiter {}: {}", name(), arbiter_->kind(), e.what());
    }
    if (a == cp::ArbiterAnswer::Yes) return true;
    if (a == cp::ArbiterAnswer::Fence) {
      destroy_twin(fmt::format("ftctl failover --force: arbiter {} says this side lost: the twin is dropped",
                               arbiter_->kind()));
      return false;
    }
    answer_force(ForceCode::Wait, fmt::format("arbiter {} cannot tell yet whether the primary of '{}' is gone "
                                              "(Wait): the twin stays paused; retry",
                                              arbiter_->kind(), name()));
  }
}

void StandbySession::activate(const std::string& reason, double declared_wall_ms) {
  const auto t0 = Clock::now();
  if (!replica_ || !replica_->has_checkpoint()) {  // callers check; never resume a twin without state
    log::error("standby", "{}: not activating ({}): no committed checkpoint", name(), reason);
    destroy_twin("activation without a committed checkpoint");
    set_state("activation-failed", "no committed checkpoint");
    return;
  }
  if (!settle(Fate::Activating)) {
    // The primary settled the session first (Resolve): it runs on; this twin never will.
    destroy_twin("not activating (" + reason + "): the primary already settled the session and runs on");
    return;
  }
  const auto& c = *replica_->last_commit();
  if (begun_epoch_ > c.epoch)
    log::warn("standby", "{}: discarding epoch {} (begun, never committed{}{}); resuming from epoch {}", name(),
              begun_epoch_, last_rejection_.empty() ? "" : "; rejected: ", last_rejection_, c.epoch);
  log::info("standby", "{}: activating twin pid {} from committed epoch {} ({})", name(), twin_pid_, c.epoch, reason);
  // The twin becomes the running copy: it takes what the running side holds (a lease arbiter's
  // lease). After a silence the arbiter's Yes already gave it; after a planned failover or
  // PrimaryLost it starts taking it now (the old side's copy is quitting) without delaying
  // the resume.
  try {
    cp::ArbiterSubject subj{name(), peer_host_};
    subj.guest_pid = twin_pid_;
    arbiter_->runs_here(subj, std::chrono::milliseconds(0));
  } catch (const std::exception& e) {
    log::error("standby", "{}: arbiter {}: {}; the activated twin runs without what the arbiter hands the running "
               "side", name(), arbiter_->kind(), e.what());
  }
  try {
    nlohmann::json act = {{"reason", reason}, {"epoch", c.epoch}, {"declared_wall_ms", declared_wall_ms}};
    if (cfg_.verify_activation) {
      const auto v0 = Clock::now();
      uint64_t d = cp::digest_ram_sparse(as_span(*twin_ram_), twin_ram_->data_ranges());
      act["verify_ms"] = ms_since(v0);
      act["ram_digest"] = fmt::format("{:016x}", d);
      act["expected_ram_digest"] = fmt::format("{:016x}", c.ram_digest);
      if (d != c.ram_digest)
        throw Error(fmt::format("twin RAM digest {:016x} differs from the primary's {:016x} for epoch {}", d,
                                c.ram_digest, c.epoch));
      log::info("standby", "{}: twin RAM digest {:016x} equals the primary's digest of epoch {}", name(), d, c.epoch);
    }
    if (journal_) {
      // The disks go to the same checkpoint as RAM: writes of epochs after it never happened.
      auto [ops, bytes] = journal_->drop_uncommitted();
      act["disk_dropped_ops"] = ops;
      act["disk_dropped_bytes"] = bytes;
      // No fsync here: the twin opens the same files, so it sees these writes through the page
      // cache; its own flushes (fdatasync of the image) later make them durable with its writes.
      if (cfg_.verify_activation) {
        auto digests = nlohmann::json::array();
        for (const auto& p : disk_paths_) digests.push_back(fmt::format("{:016x}", cp::digest_file(p)));
        act["disk_digests"] = digests;
      }
      act["disks"] = disk_paths_;
      log::info("standby", "{}: disk replicas at epoch {} ({} uncommitted writes, {} bytes dropped)", name(), c.epoch,
                ops, bytes);
    }
    // Device state goes in through an fd the twin reads as an incoming migration stream.
    UniqueFd mfd(check_sys(::memfd_create("ftvm-devstate-in", MFD_CLOEXEC), "memfd_create for device state"));
    auto ds = replica_->device_state();
    size_t off = 0;
    while (off < ds.size()) {
      ssize_t n = ::write(mfd.get(), ds.data() + off, ds.size() - off);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) throw SysError(errno, "write device state into memfd");
      off += static_cast<size_t>(n);
    }
    check_sys(::lseek(mfd.get(), 0, SEEK_SET), "rewind device-state memfd");
    const auto l0 = Clock::now();
    twin_qmp_->execute_with_fd("getfd", {{"fdname", "ftvm-devstate"}}, mfd.get());
    twin_qmp_->execute("migrate-incoming", {{"uri", "fd:ftvm-devstate"}});
    std::string mst;
    for (;;) {
      auto q = twin_qmp_->execute("query-migrate");
      mst = q.value("status", "");
      if (mst == "completed" || mst == "failed") break;
      if (ms_since(l0) > 30000) break;
      std::this_thread::sleep_for(std::chrono::microseconds(500));
    }
    if (mst != "completed")
      throw Error(fmt::format("loading device state of epoch {} into the twin failed (migration status '{}'; see {}/twin.log)",
                              c.epoch, mst, vm_dir_));
    act["load_ms"] = ms_since(l0);
    for (const auto& [p, tap] : cfg_.twin_tap_map)  // the twin's NIC goes live
      if (link_exists(tap)) set_link(tap, true);
    const auto c0 = Clock::now();
    // libvirt domains too: libvirt follows the RESUME event; the monitor reconnects by itself if
    // libvirtd restarted since the twin was created (a virDomainPtr would be stale then).
    twin_qmp_->execute("cont");
    act["cont_ms"] = ms_since(c0);
    act["cont_wall_ms"] = wall_ms();
    try {
      twin_qmp_->execute("announce-self", {{"initial", 50}, {"max", 550}, {"rounds", 5}, {"step", 100}});
    } catch (const std::exception& e) {
      log::warn("standby", "{}: announce-self failed: {}", name(), e.what());
    }
    auto st = twin_qmp_->execute("query-status").value("status", "");
    act["status_after"] = st;
    act["activation_ms"] = ms_since(t0);
    if (st != "running") throw Error(fmt::format("twin is '{}' after cont, expected 'running'", st));
    active_ = true;
    {
      std::lock_guard<std::mutex> g(mu_);
      activation_ = act;
    }
    {
      // Marks the twin as activated: an ftd that restarts adopts it instead of killing it as a
      // stale paused twin, and answers a Resolve for this VM with "active".
      auto mark = vm_dir_ + "/active";
      auto text = fmt::format("{}\n", twin_pid_);
      UniqueFd f(::open(mark.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
      if (!f || ::write(f.get(), text.data(), text.size()) < 0)
        log::error("standby", "{}: writing {} failed: {}", name(), mark, std::strerror(errno));
    }
    // The VM's history continues here (history.h): what the primary sent, this session's
    // events, the failover (before the state says "active": a reader of that state sees it).
    // Written before re-protection starts from this host.
    nlohmann::json ev = {{"wall_ms", wall_ms()}, {"event", "failover"}, {"host", History::node_name()},
                         {"from", origin_.empty() ? peer_host_ : origin_}, {"to", History::node_name()},
                         {"reason", reason.substr(0, 300)}, {"epoch", c.epoch},
                         {"failover", failover_manual_ ? "manual" : "auto"}};
    nlohmann::json local;
    {
      std::lock_guard<std::mutex> g(mu_);
      local_events_.push_back(ev);
      local = local_events_;
    }
    // A libvirt twin named with --twin-name-suffix is protected again under that name: its
    // history is written under both.
    std::vector<std::string> names = {name()};
    if (!twin_uuid_.empty() && !cfg_.twin_name_suffix.empty()) names.push_back(name() + cfg_.twin_name_suffix);
    for (const auto& n : names) {
      History h(cfg_.state_dir, n);
      h.adopt(history_in_);
      for (const auto& e : local) h.append(e);
    }
    set_state("active", reason);
    log::info("standby", "{}: ACTIVATED twin pid {} at epoch {}: query-status {}, load {:.1f} ms, total {:.1f} ms after "
              "the primary was declared dead", name(), twin_pid_, c.epoch, st, act["load_ms"].get<double>(),
              wall_ms() - declared_wall_ms);
    // Evidence that the guest executes: its RAM keeps changing after resuming (off the
    // activation path: the twin already runs).
    const uint64_t d0 = cp::digest_ram_sparse(as_span(*twin_ram_), twin_ram_->data_ranges());
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    const uint64_t d1 = cp::digest_ram_sparse(as_span(*twin_ram_), twin_ram_->data_ranges());
    auto st2 = twin_qmp_->execute("query-status").value("status", "");
    const bool executing = d0 != d1 && st2 == "running";
    log::info("standby", "{}: twin {} 300 ms after activation: status {}, RAM {}", name(),
              executing ? "is executing the guest" : "may NOT be executing", st2,
              d0 != d1 ? "changing" : "unchanged");
    std::lock_guard<std::mutex> g(mu_);
    activation_["executing"] = executing;
  } catch (const std::exception& e) {
    activation_failed(e.what());
  }
  if (!twin_uuid_.empty() && active_) {
    // The twin is this host's domain now: make it persistent (without -incoming).
    try {
      auto conn = vmm::lv::Connection::open(cfg_.libvirt_uri);
      auto d = vmm::lv::define(conn, twin_persistent_xml_);
      log::info("standby", "{}: twin defined persistently as libvirt domain '{}'", name(), d.name());
      std::lock_guard<std::mutex> g(mu_);
      activation_["libvirt_domain"] = d.name();
    } catch (const std::exception& e) {
      log::error("standby", "{}: the twin runs but defining it persistently failed: {}; it stays a transient domain",
                 name(), e.what());
    }
  }
  // The twin is the VM now (or broken, for an operator to inspect): ftd lets go of it.
  conn_->unregister_region(cp::kRegionRam);
  conn_->unregister_region(cp::kRegionStaging);
  twin_qmp_.reset();  // frees QEMU's single QMP connection for the operator
  if (active_ && reprotect_port_ && reprotect_) {
    const auto peer = (peer_host_.find(':') != std::string::npos ? "[" + peer_host_ + "]" : peer_host_) + ":" +
                      std::to_string(reprotect_port_);
    log::info("standby", "{}: reprotect=auto: protecting the VM again towards {} (its old primary host)", name(), peer);
    // A libvirt twin by its domain (UUID): protection writes the ftvm element into it, so the
    // hook protects it whenever it starts again; a plain twin by its QMP socket.
    reprotect_(name(), twin_uuid_.empty() ? vm_dir_ + "/twin-qmp.sock" : "", twin_uuid_, peer,
               failover_manual_ ? "manual" : "auto");
  }

}

// The twin could not be resumed. Its state is uncertain (it may even run): kill it, so that the
// primary (if alive) is the only copy; the logs keep what happened.
void StandbySession::activation_failed(const std::string& why) {
  log::error("standby", "{}: activation failed: {}; killing the twin (pid {}) so that it never runs beside the primary",
             name(), why, twin_pid_);
  if (twin_pid_ > 0) ::kill(twin_pid_, SIGKILL);
  fate_.activation_failed();  // a later Resolve: the primary may run on
  set_state("activation-failed", why);
}

void StandbySession::destroy_twin(const std::string& why) {
  if (active_ || !settle(Fate::Dropped)) return;  // a resumed (or resuming) twin is the VM now
  forget_manual_wait();
  if (twin_pid_ > 0) {
    log::info("standby", "{}: destroying twin pid {}: {}", name(), twin_pid_, why);
    if (conn_) {
      try {
        conn_->unregister_region(cp::kRegionRam);
        conn_->unregister_region(cp::kRegionStaging);
      } catch (const std::exception&) {
      }
    }
    twin_qmp_.reset();
    twin_ram_.reset();
    replica_.reset();
    if (!twin_uuid_.empty()) {
      try {
        auto conn = vmm::lv::Connection::open(cfg_.libvirt_uri);  // libvirtd may have restarted
        vmm::lv::Domain::lookup(conn, twin_uuid_).destroy();  // transient: gone with its QEMU
      } catch (const std::exception& e) {
        // The paused twin must not survive its session: kill its QEMU (libvirt notices).
        log::error("standby", "{}: destroying the twin domain through libvirt failed ({}); killing its QEMU pid {}",
                   name(), e.what(), twin_pid_);
        ::kill(twin_pid_, SIGKILL);
      }
      twin_uuid_.clear();
    } else {
      ::kill(twin_pid_, SIGKILL);
      int st;
      while (::waitpid(twin_pid_, &st, 0) < 0 && errno == EINTR) {
      }
    }
    ::unlink((vm_dir_ + "/twin.pid").c_str());
    twin_pid_ = -1;
    twin_watch_.reset();
  }
  // The replicas of a twin that never ran are worthless (the primary lives on, or nothing was
  // committed): remove them.
  journal_.reset();
  images_.clear();
  if (!disk_dir_.empty()) {
    std::error_code ec;
    std::filesystem::remove_all(disk_dir_, ec);
    if (ec) log::warn("standby", "{}: removing the disk replicas in {} failed: {}", name(), disk_dir_, ec.message());
    disk_dir_.clear();
  }
  disk_paths_.clear();
  update_disk_status();
  set_state("closed", why);
  answer_force(ForceCode::Refused, "the twin was dropped: " + why);
}

void StandbySession::check_twin_alive() {
  if (!twin_watch_ || active_ || twin_watch_->alive()) return;
  twin_watch_.reset();
  throw Error(fmt::format("the paused twin QEMU pid {} exited (see {}/twin.log); the session ends and the primary "
                          "protects the VM again with a new twin", twin_pid_, vm_dir_));
}

void StandbySession::update_disk_status() {
  nlohmann::json j = nullptr;
  if (!disk_paths_.empty()) {
    j = {{"images", disk_paths_}};
    if (journal_) {
      auto st = journal_->stats();
      j["buffered_ops"] = st.buffered_ops;
      j["buffered_bytes"] = st.buffered_bytes;
      j["spilled_bytes"] = st.spilled_bytes;
      j["peak_buffered_bytes"] = st.peak_buffered_bytes;
      j["applied_ops"] = st.applied_ops;
      j["applied_bytes"] = st.applied_bytes;
    }
  }
  std::lock_guard<std::mutex> g(mu_);
  disk_status_ = std::move(j);
}

nlohmann::json StandbySession::status() const {
  std::lock_guard<std::mutex> g(mu_);
  return {{"name", name_},
          {"role", active_ ? "active (failed over here)" : "standby"},
          {"state", state_},
          {"peer", peer_},
          {"session_id", fmt::format("{:016x}", sid_.load())},
          {"security", key_id_.empty() ? security_ : security_ + " (key " + key_id_ + ")"},
          {"reason", reason_},
          {"epoch", committed_},
          {"twin_pid", twin_pid_},
          {"verified_commits", verified_commits_},
          {"last_commit_age_ms", last_commit_wall_ms_ > 0 ? wall_ms() - last_commit_wall_ms_ : 0.0},
          {"activation", activation_},
          {"disk", disk_status_},
          {"failover", failover_manual_ ? "manual" : "auto"},
          {"pair", {{"primary", origin_}, {"standby", History::node_name()}}},
          {"history", [&] {
             nlohmann::json h = nlohmann::json::array();
             if (!history_in_.empty()) {
               try {
                 h = nlohmann::json::parse(history_in_);
                 if (!h.is_array()) h = nlohmann::json::array();
               } catch (const std::exception&) {
               }
             }
             for (const auto& e : local_events_) h.push_back(e);
             return h;
           }()}};
}

void make_run_dir_reachable(const std::string& vm_dir, const std::string& run_dir) {
  namespace fs = std::filesystem;
  const fs::path run = fs::path(run_dir).lexically_normal();
  const fs::path vm = fs::path(vm_dir).lexically_normal();
  auto rel = vm.lexically_relative(run);
  if (rel.empty() || *rel.begin() == "..")
    fail("twin run directory {} is not inside ftd's run directory {} (caller bug)", vm_dir, run_dir);
  // ftd's own directories: RUN_DIR and below.
  for (fs::path d = vm;; d = d.parent_path()) {
    struct stat st {};
    check_sys(::stat(d.c_str(), &st), fmt::format("stat {}", d.string()));
    if ((st.st_mode & 0111) != 0111)
      check_sys(::chmod(d.c_str(), (st.st_mode & 07777) | 0111), fmt::format("chmod o+x {}", d.string()));
    if (d == run || d == d.parent_path()) break;
  }
  // Above RUN_DIR: the operator's directories, never changed; check instead.
  for (fs::path d = run.parent_path(); !d.empty(); d = d.parent_path()) {
    struct stat st {};
    check_sys(::stat(d.c_str(), &st), fmt::format("stat {}", d.string()));
    if ((st.st_mode & 0001) == 0)
      fail("QEMU of a libvirt twin runs as libvirt's user and cannot reach its sockets in {}: the directory {} above "
           "ftd's --run-dir is not searchable by others (mode {:o}); ftd does not change directories it does not "
           "own: choose a --run-dir whose parents are (e.g. /run/ftvm), or `chmod o+x {}` yourself",
           vm_dir, d.string(), st.st_mode & 07777, d.string());
    if (d == d.parent_path()) break;
  }
}

}  // namespace ftvm::ftd
