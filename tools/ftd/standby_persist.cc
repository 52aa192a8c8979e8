#include "tools/ftd/standby_persist.h"

#include <fcntl.h>
#include <net/if.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <thread>

#include "checkpoint/digest.h"
#include "common/error.h"
#include "common/fd.h"
#include "common/log.h"
#include "tools/ftd/history.h"
#include "tools/ftd/standby.h"
#include "vmm-glue/process.h"
#include "vmm-glue/qmp.h"

namespace ftvm::ftd {

namespace cp = checkpoint;
using Clock = std::chrono::steady_clock;

namespace {

// Writes `data` to `path` atomically: a temporary file beside it, fsync, rename.
void write_atomic(const std::string& path, std::span<const std::byte> data) {
  const auto tmp = path + ".tmp";
  UniqueFd f(::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600));
  if (!f) throw SysError(errno, "create " + tmp);
  size_t off = 0;
  while (off < data.size()) {
    ssize_t n = ::write(f.get(), data.data() + off, data.size() - off);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) throw SysError(errno, "write " + tmp);
    off += static_cast<size_t>(n);
  }
  check_sys(::fsync(f.get()), "fsync " + tmp);
  f.reset();
  check_sys(::rename(tmp.c_str(), path.c_str()), fmt::format("rename {} to {}", tmp, path));
}

std::span<const std::byte> bytes_of(const std::string& s) {
  return {reinterpret_cast<const std::byte*>(s.data()), s.size()};
}

std::string record_path(const std::string& state_dir, const std::string& vm) {
  return manual_wait_dir(state_dir) + "/" + vm + ".json";
}
std::string devstate_path(const std::string& state_dir, const std::string& vm) {
  return manual_wait_dir(state_dir) + "/" + vm + ".devstate";
}

// The twin's tap (--twin-tap-map) goes live on activation, as in StandbySession::activate().
void set_link_up(const std::string& ifname) {
  if (ifname.empty() || ifname.size() >= IFNAMSIZ) fail("bad interface name '{}' in --twin-tap-map", ifname);
  if (!std::filesystem::exists("/sys/class/net/" + ifname)) return;
  UniqueFd s(check_sys(::socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0), "socket for interface ioctls"));
  ifreq r{};
  std::memcpy(r.ifr_name, ifname.c_str(), ifname.size());
  check_sys(::ioctl(s.get(), SIOCGIFFLAGS, &r), "SIOCGIFFLAGS on " + ifname, "does the twin's tap exist?");
  r.ifr_flags = static_cast<short>(r.ifr_flags | IFF_UP);
  check_sys(::ioctl(s.get(), SIOCSIFFLAGS, &r), "set " + ifname + " up");
}

const char* to_string(WaitingTwin::State s) {
  switch (s) {
    case WaitingTwin::State::Waiting: return "primary-lost";
    case WaitingTwin::State::Active: return "active";
    case WaitingTwin::State::Dropped: return "closed";
  }
  return "?";
}

}  // namespace

nlohmann::json ManualWaitRecord::to_json() const {
  return {{"version", kVersion},
          {"vm", vm},
          {"session_id", session_id},
          {"twin_pid", twin_pid},
          {"vm_dir", vm_dir},
          {"qmp_socket", qmp_socket},
          {"ram_size", ram_size},
          {"epoch", epoch},
          {"ram_digest", ram_digest},
          {"devstate_digest", devstate_digest},
          {"devstate_size", devstate_size},
          {"reported_dead", reported_dead},
          {"peer", peer},
          {"peer_host", peer_host},
          {"second_path_host", second_path_host},
          {"key_id", key_id},
          {"origin", origin},
          {"arbiter", arbiter},
          {"last_heard_wall_ms", last_heard_wall_ms},
          {"lost_wall_ms", lost_wall_ms},
          {"reason", reason},
          {"history_in", history_in},
          {"local_events", local_events},
          {"disk_paths", disk_paths},
          {"disk_dir", disk_dir},
          {"reprotect_port", reprotect_port},
          {"failover", "manual"}};
}

ManualWaitRecord ManualWaitRecord::from_json(const nlohmann::json& j) {
  auto need = [&](const char* k) -> const nlohmann::json& {
    if (!j.contains(k)) fail("field '{}' missing", k);
    return j.at(k);
  };
  if (need("version").get<int>() != kVersion)
    fail("version {} (this ftd reads version {})", j.at("version").dump(), kVersion);
  ManualWaitRecord r;
  r.vm = need("vm").get<std::string>();
  r.session_id = need("session_id").get<uint64_t>();
  r.twin_pid = need("twin_pid").get<pid_t>();
  r.vm_dir = need("vm_dir").get<std::string>();
  r.qmp_socket = need("qmp_socket").get<std::string>();
  r.ram_size = need("ram_size").get<uint64_t>();
  r.epoch = need("epoch").get<uint64_t>();
  r.ram_digest = need("ram_digest").get<uint64_t>();
  r.devstate_digest = need("devstate_digest").get<uint64_t>();
  r.devstate_size = need("devstate_size").get<uint64_t>();
  r.reported_dead = need("reported_dead").get<bool>();
  r.peer = need("peer").get<std::string>();
  r.peer_host = need("peer_host").get<std::string>();
  r.second_path_host = need("second_path_host").get<std::string>();
  r.key_id = need("key_id").get<std::string>();
  r.origin = need("origin").get<std::string>();
  r.arbiter = need("arbiter").get<std::string>();
  r.last_heard_wall_ms = need("last_heard_wall_ms").get<double>();
  r.lost_wall_ms = need("lost_wall_ms").get<double>();
  r.reason = need("reason").get<std::string>();
  r.history_in = need("history_in").get<std::string>();
  r.local_events = need("local_events");
  r.disk_paths = need("disk_paths").get<std::vector<std::string>>();
  r.disk_dir = need("disk_dir").get<std::string>();
  r.reprotect_port = need("reprotect_port").get<uint32_t>();
  if (r.vm.empty() || r.vm.find('/') != std::string::npos || r.vm[0] == '.') fail("bad VM name '{}'", r.vm);
  if (r.twin_pid <= 0 || r.epoch == 0) fail("no twin pid or no committed epoch");
  return r;
}

std::string manual_wait_dir(const std::string& state_dir) { return state_dir + "/manual-wait"; }

void save_manual_wait(const std::string& state_dir, ManualWaitRecord r, std::span<const std::byte> device_state) {
  std::filesystem::create_directories(manual_wait_dir(state_dir));
  const auto ds = devstate_path(state_dir, r.vm);
  write_atomic(ds, device_state);
  r.devstate_size = device_state.size();
  r.devstate_digest = cp::digest_file(ds);
  write_atomic(record_path(state_dir, r.vm), bytes_of(r.to_json().dump(1) + "\n"));
}

void forget_manual_wait(const std::string& state_dir, const std::string& vm) {
  for (const auto& p : {record_path(state_dir, vm), devstate_path(state_dir, vm)})
    if (::unlink(p.c_str()) != 0 && errno != ENOENT)
      log::warn("ftd", "{}: removing {} failed: {}; remove it by hand", vm, p, std::strerror(errno));
}

std::vector<ManualWaitRecord> load_manual_waits(const std::string& state_dir) {
  std::vector<ManualWaitRecord> out;
  std::error_code ec;
  for (const auto& e : std::filesystem::directory_iterator(manual_wait_dir(state_dir), ec)) {
    if (e.path().extension() != ".json") continue;
    const auto path = e.path().string();
    try {
      std::ifstream f(path);
      auto r = ManualWaitRecord::from_json(nlohmann::json::parse(f));
      if (r.vm + ".json" != e.path().filename().string()) fail("record of '{}' under another name", r.vm);
      const auto ds = devstate_path(state_dir, r.vm);
      std::error_code ec2;
      const auto size = std::filesystem::file_size(ds, ec2);
      if (ec2) fail("its device state {} cannot be read: {}", ds, ec2.message());
      if (size != r.devstate_size || cp::digest_file(ds) != r.devstate_digest)
        fail("its device state {} does not match the record (size {} vs {}, or digest)", ds, size, r.devstate_size);
      out.push_back(std::move(r));
    } catch (const std::exception& ex) {
      log::error("ftd", "discarding the failover=manual record {}: {}; its twin (if any) is killed as a stale paused "
                 "twin", path, ex.what());
      std::error_code ec3;
      std::filesystem::remove(path, ec3);
      std::filesystem::remove(e.path().parent_path() / (e.path().stem().string() + ".devstate"), ec3);
    }
  }
  return out;
}

// ---- the session's side (StandbySession members that keep a waiting twin) -------------------

void StandbySession::persist_manual_wait(bool reported_dead) {
  if (!twin_uuid_.empty()) {
    log::warn("standby", "{}: a libvirt twin is not kept across an ftd restart: a standby ftd that stops now takes it "
              "along (docs/ARCHITECTURE.md, known limits)", name());
    return;
  }
  if (!replica_ || !replica_->has_checkpoint() || !twin_ram_ || twin_pid_ <= 0) return;
  ManualWaitRecord r;
  r.vm = name();
  r.session_id = session_id_;
  r.twin_pid = twin_pid_;
  r.vm_dir = vm_dir_;
  r.qmp_socket = vm_dir_ + "/twin-qmp.sock";
  r.ram_size = twin_ram_->size();
  r.epoch = replica_->last_commit()->epoch;
  r.ram_digest = replica_->last_commit()->ram_digest;
  r.reported_dead = reported_dead;
  r.peer = peer_;
  r.peer_host = peer_host_;
  r.key_id = key_id_;
  r.origin = origin_;
  r.arbiter = arbiter_->kind();
  r.last_heard_wall_ms = wall_ms() - static_cast<double>(silence().count());
  r.lost_wall_ms = wall_ms();
  r.history_in = history_in_;
  r.disk_paths = disk_paths_;
  r.disk_dir = disk_dir_;
  r.reprotect_port = reprotect_port_;
  {
    std::lock_guard<std::mutex> g(mu_);
    r.second_path_host = second_path_host_;
    r.reason = reason_;
    r.local_events = local_events_;
  }
  try {
    save_manual_wait(cfg_.state_dir, r, replica_->device_state());
    manual_persisted_ = true;
    log::info("standby", "{}: the waiting twin pid {} (epoch {}) is recorded in {}: it survives a restart of this ftd",
              name(), twin_pid_, r.epoch, manual_wait_dir(cfg_.state_dir));
  } catch (const std::exception& e) {
    log::error("standby", "{}: recording the waiting twin failed: {}; it still waits, but a restart of this ftd now "
               "takes it along", name(), e.what());
  }
}

void StandbySession::forget_manual_wait() {
  if (!manual_persisted_) return;
  manual_persisted_ = false;
  ftd::forget_manual_wait(cfg_.state_dir, name());
}

bool StandbySession::keep_for_restart() {
  if (!shutdown_ || !manual_persisted_ || fate() != Fate::Open) return false;
  if (twin_watch_ && !twin_watch_->alive()) return false;
  log::warn("standby", "{}: ftd stops while the twin waits for `ftctl failover --force`: the paused twin pid {} is left "
            "for the next ftd (recorded in {})", name(), twin_pid_, manual_wait_dir(cfg_.state_dir));
  if (conn_) {
    try {
      conn_->unregister_region(cp::kRegionRam);
      conn_->unregister_region(cp::kRegionStaging);
    } catch (const std::exception&) {
    }
  }
  twin_qmp_.reset();  // QEMU's single QMP connection: the next ftd takes it
  twin_watch_.reset();
  replica_.reset();
  twin_ram_.reset();
  journal_.reset();  // uncommitted writes only: the images hold the committed epoch
  images_.clear();
  set_state("kept", "ftd stopped; the paused twin waits for the next ftd");
  return true;
}

// ---- the adopted twin ---------------------------------------------------------------------------

WaitingTwin::WaitingTwin(const DaemonConfig& cfg, ManualWaitRecord rec) : cfg_(cfg), rec_(std::move(rec)) {
  reason_ = fmt::format("{}; failover=manual: the twin stays paused, waiting for `ftctl failover --force {}` on this "
                        "host (adopted by this ftd after a restart)", rec_.reason, rec_.vm);
}

bool WaitingTwin::is_primary_host(const std::string& host) const {
  return host == rec_.peer_host || (!rec_.second_path_host.empty() && host == rec_.second_path_host);
}

std::shared_ptr<cp::Arbiter> WaitingTwin::arbiter_for() const {
  if (rec_.arbiter == "none") return cp::make_no_arbiter(cfg_.alone_after);
  if (cfg_.arbiter && cfg_.arbiter->kind() == rec_.arbiter) return cfg_.arbiter;
  return nullptr;
}

bool WaitingTwin::twin_alive_locked() const {
  std::ifstream cf(fmt::format("/proc/{}/cmdline", rec_.twin_pid));
  std::string cmd((std::istreambuf_iterator<char>(cf)), std::istreambuf_iterator<char>());
  return !cmd.empty() && cmd.find(rec_.vm_dir) != std::string::npos;
}

nlohmann::json WaitingTwin::status() const {
  std::lock_guard<std::mutex> g(mu_);
  nlohmann::json h = nlohmann::json::array();
  try {
    if (!rec_.history_in.empty()) h = nlohmann::json::parse(rec_.history_in);
    if (!h.is_array()) h = nlohmann::json::array();
  } catch (const std::exception&) {
  }
  for (const auto& e : rec_.local_events) h.push_back(e);
  if (state_ == State::Active && activation_.is_object())
    h.push_back({{"wall_ms", activation_.value("cont_wall_ms", 0.0)}, {"event", "failover"},
                 {"host", History::node_name()}, {"from", rec_.origin.empty() ? rec_.peer_host : rec_.origin},
                 {"to", History::node_name()}, {"reason", activation_.value("reason", "")}, {"epoch", rec_.epoch},
                 {"failover", "manual"}});
  return {{"name", rec_.vm},
          {"role", state_ == State::Active ? "active (failed over here)" : "standby (twin adopted after an ftd restart)"},
          {"state", to_string(state_.load())},
          {"peer", rec_.peer},
          {"session_id", fmt::format("{:016x}", rec_.session_id)},
          {"security", rec_.key_id.empty() ? "insecure" : "key " + rec_.key_id},
          {"reason", reason_},
          {"epoch", rec_.epoch},
          {"twin_pid", rec_.twin_pid},
          {"verified_commits", 0},
          {"last_commit_age_ms", wall_ms() - rec_.lost_wall_ms},  // at least: nothing commits any more
          {"adopted", true},
          {"primary_reported_dead", rec_.reported_dead},
          {"activation", activation_},
          {"disk", rec_.disk_paths.empty() ? nlohmann::json(nullptr) : nlohmann::json{{"images", rec_.disk_paths}}},
          {"failover", "manual"},
          {"pair", {{"primary", rec_.origin}, {"standby", History::node_name()}}},
          {"history", h}};
}

void WaitingTwin::drop(const std::string& why) {
  std::lock_guard<std::mutex> g(mu_);
  drop_locked(why);
}

void WaitingTwin::drop_locked(const std::string& why) {
  if (state_ != State::Waiting) return;
  state_ = State::Dropped;
  reason_ = why;
  if (twin_alive_locked()) {
    log::info("standby", "{}: destroying the adopted paused twin pid {}: {}", rec_.vm, rec_.twin_pid, why);
    ::kill(rec_.twin_pid, SIGKILL);
  }
  ::unlink((rec_.vm_dir + "/twin.pid").c_str());
  forget_manual_wait(cfg_.state_dir, rec_.vm);
  if (!rec_.disk_dir.empty()) {  // replicas of a twin that never ran: worthless now
    std::error_code ec;
    std::filesystem::remove_all(rec_.disk_dir, ec);
    if (ec) log::warn("standby", "{}: removing the disk replicas in {} failed: {}", rec_.vm, rec_.disk_dir, ec.message());
  }
  log::info("standby", "{}: state primary-lost -> closed: {}", rec_.vm, why);
}

cp::Verdict WaitingTwin::primary_heard(const std::string& why, std::string& text) {
  std::lock_guard<std::mutex> g(mu_);
  if (state_ == State::Active) {
    text = fmt::format("VM '{}' failed over to this host and runs here (twin pid {})", rec_.vm, rec_.twin_pid);
    return cp::Verdict::Active;
  }
  drop_locked(fmt::format("the primary is heard again ({}): it runs the guest; the waiting twin is dropped", why));
  text = fmt::format("the waiting twin of '{}' (adopted after an ftd restart) is dropped", rec_.vm);
  return cp::Verdict::Dropped;
}

WaitingTwin::ForceResult WaitingTwin::force(std::chrono::milliseconds timeout) {
  using C = ForceResult::Code;
  std::lock_guard<std::mutex> g(mu_);
  if (state_ == State::Active)
    return {C::Done, fmt::format("VM '{}' already runs on this host (its twin took over)", rec_.vm)};
  if (state_ == State::Dropped) return {C::Refused, fmt::format("the twin of '{}' was dropped: {}", rec_.vm, reason_)};
  if (!twin_alive_locked()) {
    drop_locked(fmt::format("the paused twin pid {} is gone", rec_.twin_pid));
    return {C::Failed, fmt::format("the paused twin of '{}' (pid {}) no longer runs (see {}/twin.log): nothing to "
                                   "resume; restart the VM from its disks", rec_.vm, rec_.twin_pid, rec_.vm_dir)};
  }
  std::string why;
  if (rec_.reported_dead) {
    why = "ftctl failover --force (failover=manual; the primary reported its QEMU dead; adopted after an ftd restart)";
  } else {
    // The decision of the session before the restart is not reused: the arbiter answers about now.
    auto arb = arbiter_for();
    if (!arb)
      return {C::Refused, fmt::format("the twin of '{}' was recorded under arbiter '{}' but this ftd arbitrates with "
                                      "'{}': start ftd with the arbiter it had (ftd --arbiter)", rec_.vm, rec_.arbiter,
                                      cfg_.arbiter ? cfg_.arbiter->kind() : "none")};
    const auto deadline = Clock::now() + std::min(timeout, std::chrono::milliseconds(5000));
    cp::ArbiterAnswer a = cp::ArbiterAnswer::Wait;
    for (;;) {
      cp::ArbiterSubject s{rec_.vm, rec_.peer_host,
                           std::chrono::milliseconds(static_cast<int64_t>(wall_ms() - rec_.last_heard_wall_ms))};
      s.guest_pid = rec_.twin_pid;
      s.heartbeat_timeout = cfg_.heartbeat_timeout;
      s.forced = true;  // the operator asserts the primary is gone; an arbiter still decides (as the session does)
      try {
        a = arb->may_activate(s, std::chrono::milliseconds(100));
      } catch (const std::exception& e) {
        log::error("standby", "{}: arbiter {}: {}", rec_.vm, arb->kind(), e.what());
        a = cp::ArbiterAnswer::Wait;
      }
      if (a != cp::ArbiterAnswer::Wait || Clock::now() >= deadline) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    if (a == cp::ArbiterAnswer::Fence) {
      drop_locked(fmt::format("ftctl failover --force: arbiter {} says this side lost: the twin is dropped", arb->kind()));
      return {C::Refused, reason_};
    }
    if (a != cp::ArbiterAnswer::Yes)
      return {C::Wait, fmt::format("arbiter {} cannot tell yet whether the primary of '{}' is gone (Wait): the twin "
                                   "stays paused; retry", arb->kind(), rec_.vm)};
    why = fmt::format("ftctl failover --force (failover=manual; primary silent since {:.0f} ms ago, arbiter {} says "
                      "Yes; adopted after an ftd restart)", wall_ms() - rec_.last_heard_wall_ms, arb->kind());
  }
  try {
    activate_locked(why);
  } catch (const std::exception& e) {
    // Uncertain state (it may even run): kill it, as StandbySession::activation_failed() does.
    log::error("standby", "{}: activation of the adopted twin failed: {}; killing it (pid {})", rec_.vm, e.what(),
               rec_.twin_pid);
    ::kill(rec_.twin_pid, SIGKILL);
    state_ = State::Dropped;
    reason_ = std::string("activation failed: ") + e.what();
    forget_manual_wait(cfg_.state_dir, rec_.vm);
    return {C::Failed, fmt::format("resuming the twin of '{}' failed: {}", rec_.vm, e.what())};
  }
  return {C::Done, fmt::format("VM '{}' runs on this host now (twin pid {}, resumed from epoch {})", rec_.vm,
                               rec_.twin_pid, rec_.epoch)};
}

void WaitingTwin::activate_locked(const std::string& reason) {
  const auto t0 = Clock::now();
  const double declared = wall_ms();
  auto qmp = vmm::QmpClient::connect(rec_.qmp_socket, std::chrono::milliseconds(10000));
  const auto st0 = qmp.execute("query-status").value("status", "");
  if (st0 != "inmigrate")
    fail("the adopted twin pid {} is in state '{}', expected 'inmigrate' (it never ran); not resuming it", rec_.twin_pid,
         st0);
  nlohmann::json act = {{"reason", reason}, {"epoch", rec_.epoch}, {"declared_wall_ms", declared}, {"adopted", true}};
  if (cfg_.verify_activation) {
    const auto v0 = Clock::now();
    vmm::MappedRam ram(rec_.twin_pid, vmm::find_guest_ram(rec_.twin_pid, rec_.ram_size), vmm::MappedRam::Access::ReadOnly);
    const uint64_t d = cp::digest_ram_sparse(as_span(ram), ram.data_ranges());
    act["verify_ms"] = ms_since(v0);
    act["ram_digest"] = fmt::format("{:016x}", d);
    act["expected_ram_digest"] = fmt::format("{:016x}", rec_.ram_digest);
    if (d != rec_.ram_digest)
      fail("twin RAM digest {:016x} differs from the primary's {:016x} for epoch {}", d, rec_.ram_digest, rec_.epoch);
    log::info("standby", "{}: adopted twin RAM digest {:016x} equals the primary's digest of epoch {}", rec_.vm, d,
              rec_.epoch);
  }
  if (!rec_.disk_paths.empty()) {
    act["disks"] = rec_.disk_paths;
    if (cfg_.verify_activation) {
      auto digests = nlohmann::json::array();
      for (const auto& p : rec_.disk_paths) digests.push_back(fmt::format("{:016x}", cp::digest_file(p)));
      act["disk_digests"] = digests;
    }
  }
  // The twin becomes the running copy: it takes what the running side holds (a lease).
  if (auto arb = arbiter_for()) {
    try {
      cp::ArbiterSubject subj{rec_.vm, rec_.peer_host};
      subj.guest_pid = rec_.twin_pid;
      arb->runs_here(subj, std::chrono::milliseconds(0));
    } catch (const std::exception& e) {
      log::error("standby", "{}: arbiter {}: {}; the activated twin runs without what the arbiter hands the running "
                 "side", rec_.vm, arb->kind(), e.what());
    }
  }
  // The device state of the committed epoch, read back from the record, as an incoming stream.
  const auto dsp = devstate_path(cfg_.state_dir, rec_.vm);
  if (cp::digest_file(dsp) != rec_.devstate_digest) fail("device state {} changed since it was recorded", dsp);
  UniqueFd src(::open(dsp.c_str(), O_RDONLY | O_CLOEXEC));
  if (!src) throw SysError(errno, "open " + dsp);
  UniqueFd mfd(check_sys(::memfd_create("ftvm-devstate-in", MFD_CLOEXEC), "memfd_create for device state"));
  std::vector<char> buf(1 << 20);
  for (;;) {
    ssize_t n = ::read(src.get(), buf.data(), buf.size());
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) throw SysError(errno, "read " + dsp);
    if (n == 0) break;
    for (ssize_t off = 0; off < n;) {
      ssize_t w = ::write(mfd.get(), buf.data() + off, static_cast<size_t>(n - off));
      if (w < 0 && errno == EINTR) continue;
      if (w <= 0) throw SysError(errno, "write device state into memfd");
      off += w;
    }
  }
  check_sys(::lseek(mfd.get(), 0, SEEK_SET), "rewind device-state memfd");
  const auto l0 = Clock::now();
  qmp.execute_with_fd("getfd", {{"fdname", "ftvm-devstate"}}, mfd.get());
  qmp.execute("migrate-incoming", {{"uri", "fd:ftvm-devstate"}});
  std::string mst;
  for (;;) {
    mst = qmp.execute("query-migrate").value("status", "");
    if (mst == "completed" || mst == "failed" || ms_since(l0) > 30000) break;
    std::this_thread::sleep_for(std::chrono::microseconds(500));
  }
  if (mst != "completed")
    fail("loading device state of epoch {} into the twin failed (migration status '{}'; see {}/twin.log)", rec_.epoch,
         mst, rec_.vm_dir);
  act["load_ms"] = ms_since(l0);
  for (const auto& [p, tap] : cfg_.twin_tap_map) set_link_up(tap);
  state_ = State::Active;  // from here a Resolve answers Active
  qmp.execute("cont");
  act["cont_wall_ms"] = wall_ms();
  try {
    qmp.execute("announce-self", {{"initial", 50}, {"max", 550}, {"rounds", 5}, {"step", 100}});
  } catch (const std::exception& e) {
    log::warn("standby", "{}: announce-self failed: {}", rec_.vm, e.what());
  }
  const auto st = qmp.execute("query-status").value("status", "");
  act["status_after"] = st;
  act["activation_ms"] = ms_since(t0);
  if (st != "running") fail("twin is '{}' after cont, expected 'running'", st);
  activation_ = act;
  reason_ = reason;
  // The activated-twin marker: a later ftd leaves it running and answers Resolve with "active".
  {
    const auto mark = rec_.vm_dir + "/active";
    const auto text = fmt::format("{}\n", rec_.twin_pid);
    UniqueFd f(::open(mark.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
    if (!f || ::write(f.get(), text.data(), text.size()) < 0)
      log::error("standby", "{}: writing {} failed: {}", rec_.vm, mark, std::strerror(errno));
  }
  History h(cfg_.state_dir, rec_.vm);
  h.adopt(rec_.history_in);
  for (const auto& e : rec_.local_events) h.append(e);
  h.append({{"event", "failover"}, {"from", rec_.origin.empty() ? rec_.peer_host : rec_.origin},
            {"to", History::node_name()}, {"reason", reason.substr(0, 300)}, {"epoch", rec_.epoch},
            {"failover", "manual"}});
  forget_manual_wait(cfg_.state_dir, rec_.vm);
  log::info("standby", "{}: ACTIVATED adopted twin pid {} at epoch {}: query-status {}, load {:.1f} ms, total {:.1f} ms",
            rec_.vm, rec_.twin_pid, rec_.epoch, st, act["load_ms"].get<double>(), wall_ms() - declared);
}

}  // namespace ftvm::ftd
