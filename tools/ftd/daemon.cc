#include "tools/ftd/daemon.h"

#include <dirent.h>
#include <poll.h>
#include <signal.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <thread>

#include <fmt/ranges.h>

#include "common/error.h"
#include "common/log.h"
#include "tools/control/control.h"
#include "tools/ftd/history.h"
#include "vmm-glue/libvirt.h"
#include "vmm-glue/libvirt_xml.h"

namespace ftvm::ftd {

namespace {

// A failed control response (tools/control/control.h); `code` is one of its Code names.
nlohmann::json err(const std::string& code, const std::string& msg) {
  return control::error_response(control::parse_code(code).value_or(control::Code::Failed), msg);
}

// What a declared libvirt domain (its protection element, read by the hook or the start-up
// scan) asks for: every attribute of the element, in one place.
EnableRequest enable_request_for(const std::string& domain, const vmm::Protection& p) {
  EnableRequest r;
  r.domain = domain;
  r.peer = p.peer;
  r.peer_alt = p.peer_alt;
  r.transport = p.transport;
  r.epoch_ms = p.epoch_ms;
  r.arbiter = p.arbiter;
  r.failover = p.failover;
  r.reprotect = p.reprotect;
  return r;
}

std::string need_string(const nlohmann::json& req, const char* key) {
  auto it = req.find(key);
  if (it == req.end() || !it->is_string() || it->get<std::string>().empty())
    throw std::invalid_argument(fmt::format("missing or empty string argument '{}'", key));
  return it->get<std::string>();
}

unsigned opt_uint(const nlohmann::json& req, const char* key, unsigned def) {
  auto it = req.find(key);
  if (it == req.end() || it->is_null()) return def;
  if (!it->is_number_unsigned()) throw std::invalid_argument(fmt::format("argument '{}' must be a positive integer", key));
  return it->get<unsigned>();
}

}  // namespace

// A declared domain whose standby is this very ftd (its replication listener) is the twin side's
// business, not ours: only possible when primary and standby ftd share a host and a libvirtd
// (tests); protecting it from here would make this ftd its own standby.
bool Daemon::is_own_listener(const std::string& peer) const {
  if (cfg_.listen.empty()) return false;
  try {
    auto l = transport::tcp::parse_host_port(cfg_.listen);
    auto p = transport::tcp::parse_host_port(peer);
    const uint16_t pport = p.port ? p.port : 7410;
    if (l.port != pport) return false;
    return l.host == p.host || l.host == "::" || l.host == "0.0.0.0" || l.host.empty();
  } catch (const std::exception&) {
    return false;
  }
}

Daemon::Daemon(DaemonConfig cfg) : cfg_(std::move(cfg)) {
  if (cfg_.control_socket.empty()) cfg_.control_socket = cfg_.run_dir + "/ftd.sock";
  if (!cfg_.arbiter) cfg_.arbiter = checkpoint::make_no_arbiter(cfg_.alone_after);
  {
    const auto st = cfg_.arbiter->status();
    if (cfg_.arbiter->kind() == "none")
      log::warn("ftd", "no arbiter configured: {}; configure one with --arbiter", st.holds);
    else
      log::info("ftd", "arbiter {}: {}", st.kind, st.holds);
  }
  History::set_node_name(cfg_.listen);
  std::filesystem::create_directories(cfg_.run_dir);
  // 0711: QEMU processes of other users (libvirt-qemu) must reach the sockets ftd makes for
  // them below it (nbd/, output commit); the control socket has its own mode.
  ::chmod(cfg_.run_dir.c_str(), 0711);
  kill_stale_twins();
  if (cfg_.key) {
    security_ = fmt::format("authenticated (key {}, {}){}", cfg_.key->id_hex(), cfg_.key_file,
                            cfg_.encrypt ? ", encryption requested" : "");
  } else {
    if (!cfg_.insecure)
      throw Error("no replication key: start ftd with --key-file FILE (create one with `ftd --generate-key FILE` and "
                  "copy it to the peer host), or with --insecure on a trusted, isolated network only");
    security_ = "INSECURE: replication connections are not authenticated (--insecure)";
    log::warn("ftd", "*** --insecure: replication connections are NOT authenticated; anyone who can reach {} can "
              "open sessions, inject checkpoints and make this host run a guest. Use --key-file. ***",
              cfg_.listen.empty() ? "this host's primaries' peers" : cfg_.listen);
  }
  if (!cfg_.listen.empty()) {
    auto hp = transport::tcp::parse_host_port(cfg_.listen);
    transport::Options o;
    o.heartbeat_interval = cfg_.heartbeat_interval;
    o.key = cfg_.key;
    o.encrypt = cfg_.encrypt;
    listener_ = std::make_unique<transport::MultiListener>(hp.host, hp.port, o);
    listen_address_ = listener_->describe();
    for (const auto& a : cfg_.listen_also) {
      auto ap = transport::tcp::parse_host_port(a);
      listeners_also_.push_back(std::make_unique<transport::MultiListener>(ap.host, ap.port ? ap.port : hp.port, o));
      listen_address_ += "; " + listeners_also_.back()->describe();
    }
  } else if (!cfg_.listen_also.empty()) {
    throw Error("--listen-also needs --listen (the first replication address)");
  }
}

Daemon::~Daemon() = default;

namespace {
pid_t read_pid(const std::string& path) {
  std::ifstream f(path);
  pid_t pid = 0;
  if (!(f >> pid) || pid <= 0) return -1;
  return pid;
}
// True if `pid` runs and its command line mentions `dir` (a twin started in that VM dir).
bool twin_alive(pid_t pid, const std::string& dir) {
  std::ifstream cf(fmt::format("/proc/{}/cmdline", pid));
  std::string cmd((std::istreambuf_iterator<char>(cf)), std::istreambuf_iterator<char>());
  return !cmd.empty() && cmd.find(dir) != std::string::npos;
}
}  // namespace

// A paused twin left by an earlier ftd whose session is gone can never be resumed: kill it
// (it never ran: the primary runs the guest, or nothing committed). Except a failover=manual
// twin that waited in primary-lost for `ftctl failover --force` (the primary is gone): its
// record (STATE_DIR/manual-wait, standby_persist.h) makes this ftd adopt it, still paused and
// still waiting. An activated twin (RUN/vms/VM/active) runs the guest: never touch it.
void Daemon::kill_stale_twins() {
  std::map<std::string, ManualWaitRecord> records;
  for (auto& r : load_manual_waits(cfg_.state_dir)) records.emplace(r.vm, std::move(r));
  const auto dir = cfg_.run_dir + "/vms";
  std::error_code ec;
  for (const auto& e : std::filesystem::directory_iterator(dir, ec)) {
    const auto vmdir = e.path().string();
    const auto vm = e.path().filename().string();
    const pid_t active = read_pid(vmdir + "/active");
    if (active > 0 && twin_alive(active, vmdir)) {
      log::warn("ftd", "twin pid {} in {} was activated by an earlier ftd and runs the guest: left running", active,
                vmdir);
      continue;
    }
    if (active > 0) std::filesystem::remove(e.path() / "active", ec);
    const pid_t pid = read_pid(vmdir + "/twin.pid");
    if (auto r = records.find(vm); r != records.end()) {
      if (pid > 0 && pid == r->second.twin_pid && r->second.vm_dir == vmdir && twin_alive(pid, vmdir)) {
        log::warn("ftd", "{}: adopting the paused twin pid {} (epoch {}) that waited for `ftctl failover --force {}` "
                  "when the previous ftd stopped: it stays paused and waits (primary {} {})", vm, pid,
                  r->second.epoch, vm, r->second.origin.empty() ? r->second.peer : r->second.origin,
                  r->second.reported_dead ? "reported its QEMU dead" : "was silent");
        waiting_.push_back(std::make_shared<WaitingTwin>(cfg_, std::move(r->second)));
        records.erase(r);
        continue;
      }
      log::error("ftd", "{}: the failover=manual record names twin pid {} in {}, but {}: the record is discarded", vm,
                 r->second.twin_pid, r->second.vm_dir,
                 pid <= 0 ? "no twin.pid is there" : fmt::format("pid {} is not that twin or no longer runs", pid));
      forget_manual_wait(cfg_.state_dir, vm);
      records.erase(r);
    }
    if (pid <= 0) continue;
    if (twin_alive(pid, vmdir)) {
      log::warn("ftd", "killing stale paused twin pid {} left by an earlier ftd in {}", pid, vmdir);
      ::kill(pid, SIGKILL);
    }
    std::filesystem::remove(e.path() / "twin.pid", ec);
  }
  for (const auto& [vm, r] : records) {
    log::error("ftd", "{}: the failover=manual record names twin pid {} in {}, which does not exist any more: the "
               "record is discarded (the VM must be restarted from its disks)", vm, r.twin_pid, r.vm_dir);
    forget_manual_wait(cfg_.state_dir, vm);
  }
}

std::shared_ptr<WaitingTwin> Daemon::waiting_twin_locked(const std::string& vm) const {
  for (const auto& w : waiting_)
    if (w->name() == vm && w->state() == WaitingTwin::State::Waiting) return w;
  return nullptr;
}

pid_t Daemon::adopted_twin(const std::string& vm) const {
  if (vm.empty() || vm.find('/') != std::string::npos || vm[0] == '.') return -1;
  const auto vmdir = cfg_.run_dir + "/vms/" + vm;
  const pid_t pid = read_pid(vmdir + "/active");
  return pid > 0 && twin_alive(pid, vmdir) ? pid : -1;
}

checkpoint::Resolution Daemon::resolve(const checkpoint::Resolve& r, const StandbySession& from) {
  using checkpoint::Verdict;
  std::shared_ptr<StandbySession> hit;
  {
    std::lock_guard<std::mutex> g(mu_);
    for (auto& s : standbys_)
      if (!s->transient() && s->session_id() == r.session_id) hit = s;
  }
  if (hit && (!hit->is_primary_host(from.peer_host()) || hit->key_id() != from.key_id()))
    fail("Resolve for session {:016x} of '{}' from {} (key {}), but that session belongs to {} (key {}): refused, the "
         "session is untouched", r.session_id, r.vm_name, from.peer(), from.key_id().empty() ? "none" : from.key_id(),
         hit->peer(), hit->key_id().empty() ? "none" : hit->key_id());
  if (hit) {
    std::string text;
    auto v = hit->resolve(text);
    return {r.session_id, v, text};
  }
  std::shared_ptr<WaitingTwin> w;
  {
    std::lock_guard<std::mutex> g(mu_);
    w = waiting_twin_locked(r.vm_name);
  }
  if (w && w->record().session_id == r.session_id) {
    // The primary of the waiting twin's session is heard: it runs the guest.
    if (!w->is_primary_host(from.peer_host()) || w->record().key_id != from.key_id())
      fail("Resolve for session {:016x} of '{}' from {} (key {}), but that session belongs to {} (key {}): refused, "
           "the waiting twin is untouched", r.session_id, r.vm_name, from.peer(),
           from.key_id().empty() ? "none" : from.key_id(), w->record().peer,
           w->record().key_id.empty() ? "none" : w->record().key_id);
    std::string text;
    auto v = w->primary_heard(fmt::format("Resolve from {}", from.peer()), text);
    return {r.session_id, v, text};
  }
  if (pid_t p = adopted_twin(r.vm_name); p > 0)
    return {r.session_id, Verdict::Active,
            fmt::format("VM '{}' failed over to this host and runs here (twin pid {})", r.vm_name, p)};
  return {r.session_id, Verdict::Unknown,
          fmt::format("no session {:016x} and no running twin of '{}' on this host", r.session_id, r.vm_name)};
}

int Daemon::run() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGINT);
  UniqueFd sfd(check_sys(::signalfd(-1, &set, SFD_CLOEXEC), "signalfd"));
  UniqueFd ctl = control::listen_control(cfg_.control_socket);
  log::info("ftd", "ftd ready: control {}, replication {}, {}{}", cfg_.control_socket,
            listen_address_.empty() ? "(not listening)" : listen_address_, security_,
            cfg_.allow_peers.empty() ? "" : ", peers allowed: " + fmt::format("{}", fmt::join(cfg_.allow_peers, " ")));
  std::thread lt;
  std::vector<std::thread> lt_also;
  if (listener_) lt = std::thread([this] { listen_loop(*listener_); });
  for (auto& l : listeners_also_) lt_also.emplace_back([this, lp = l.get()] { listen_loop(*lp); });
  if (!cfg_.libvirt_uri.empty()) {
    std::lock_guard<std::mutex> g(mu_);
    workers_.emplace_back([this] { scan_libvirt(); });
  }
  {
    std::lock_guard<std::mutex> g(mu_);
    workers_.emplace_back([this] { reattach_recorded(); });
  }

  for (;;) {
    pollfd p[2] = {{ctl.get(), POLLIN, 0}, {sfd.get(), POLLIN, 0}};
    int r = ::poll(p, 2, -1);
    if (r < 0 && errno == EINTR) continue;
    check_sys(r, "poll control socket");
    if (p[1].revents) {
      signalfd_siginfo si{};
      if (::read(sfd.get(), &si, sizeof si) < 0) log::warn("ftd", "reading signalfd failed");
      log::info("ftd", "signal {} received: shutting down", si.ssi_signo);
      break;
    }
    if (p[0].revents) {
      UniqueFd c(::accept4(ctl.get(), nullptr, nullptr, SOCK_CLOEXEC));
      if (!c) continue;
      std::thread([this, c = std::move(c)]() mutable {
        control::serve_control_client(std::move(c), [this](const nlohmann::json& req) { return handle(req); });
      }).detach();
    }
  }
  stop_ = true;
  if (lt.joinable()) lt.join();
  for (auto& t : lt_also) t.join();
  std::vector<std::thread> workers;
  {
    std::lock_guard<std::mutex> g(mu_);
    workers.swap(workers_);
  }
  for (auto& w : workers) w.join();
  std::map<std::string, std::shared_ptr<PrimarySession>> prim;
  std::vector<std::shared_ptr<StandbySession>> stb;
  {
    std::lock_guard<std::mutex> g(mu_);
    prim = primaries_;
    stb = standbys_;
  }
  for (auto& [n, s] : prim) {
    if (s->finished()) continue;
    try {
      log::info("ftd", "{}: {}", n, s->disable(std::chrono::seconds(10)));
    } catch (const std::exception& e) {
      log::error("ftd", "{}: disable at shutdown failed: {}", n, e.what());
    }
  }
  for (auto& s : stb) s->shutdown("ftd is shutting down");
  {
    std::lock_guard<std::mutex> g(mu_);
    for (auto& w : waiting_)
      if (w->state() == WaitingTwin::State::Waiting)
        log::warn("ftd", "{}: ftd stops while the adopted twin pid {} waits for `ftctl failover --force`: it is left "
                  "paused for the next ftd", w->name(), w->twin_pid());
  }
  for (auto& s : stb) s->join();
  ::unlink(cfg_.control_socket.c_str());
  log::info("ftd", "ftd stopped");
  return 0;
}

namespace {
// Unauthenticated connections (handshake in progress) allowed at once, per client address and
// in all. A client over the limit is closed at once (and logged): a flood of silent
// connections cannot exhaust threads, and one silent client never delays another.
constexpr unsigned kMaxHandshakesPerHost = 4;
constexpr unsigned kMaxHandshakes = 64;
}  // namespace

bool Daemon::peer_allowed(const std::string& host) const {
  if (cfg_.allow_peers.empty()) return true;
  return std::find(cfg_.allow_peers.begin(), cfg_.allow_peers.end(), host) != cfg_.allow_peers.end();
}

// Accepts replication clients. The loop never reads from a client: it filters by address
// (--allow-peer), caps the handshakes in progress, and hands each client to a thread of its own
// that runs the handshake (bounded by the connect timeout) and then the session.
void Daemon::listen_loop(transport::MultiListener& listener) {
  std::vector<HandshakeThread> hs_threads;  // this listener's handshakes (joined when done and at the end)
  while (!stop_) {
    std::erase_if(hs_threads, [](HandshakeThread& h) {
      if (!*h.done) return false;
      h.t.join();
      return true;
    });
    std::optional<transport::MultiListener::Pending> p;
    try {
      p = listener.accept_pending(std::chrono::milliseconds(200));
    } catch (const std::exception& e) {
      log::warn("ftd", "rejected an incoming replication connection: {}", e.what());
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
      continue;
    }
    if (!p) continue;
    if (!peer_allowed(p->peer_host)) {
      log::warn("ftd", "refused replication connection from {}: {} is not an allowed peer (--allow-peer {}); closed "
                "before the handshake", p->peer, p->peer_host, fmt::join(cfg_.allow_peers, ", "));
      continue;  // destroying p closes the socket
    }
    {
      std::lock_guard<std::mutex> g(hs_mu_);
      unsigned& n = handshaking_[p->peer_host];
      if (n >= kMaxHandshakesPerHost || handshaking_total_ >= kMaxHandshakes) {
        log::warn("ftd", "refused replication connection from {}: {} unauthenticated connections from {} ({} in all) "
                  "are already in their handshake (limit {} per address, {} in all); closed",
                  p->peer, n, p->peer_host, handshaking_total_, kMaxHandshakesPerHost, kMaxHandshakes);
        if (n == 0) handshaking_.erase(p->peer_host);
        continue;
      }
      ++n;
      ++handshaking_total_;
    }
    auto done = std::make_shared<std::atomic<bool>>(false);
    hs_threads.push_back(HandshakeThread{std::thread([this, p = std::move(*p), done]() mutable {
                                            handshake_and_serve(std::move(p));
                                            *done = true;
                                          }),
                                          done});
  }
  for (auto& h : hs_threads) h.t.join();
  hs_threads.clear();
}

void Daemon::handshake_and_serve(transport::MultiListener::Pending p) {
  std::unique_ptr<transport::Connection> c;
  try {
    c = p.handshake();
  } catch (const std::exception& e) {
    log::warn("ftd", "rejected an incoming replication connection from {}: {}", p.peer, e.what());
  }
  {
    std::lock_guard<std::mutex> g(hs_mu_);
    if (--handshaking_[p.peer_host] == 0) handshaking_.erase(p.peer_host);
    --handshaking_total_;
  }
  if (!c || stop_) return;
  log::info("ftd", "replication connection from {} ({}{})", c->peer(), c->security(),
            c->key_id().empty() ? "" : ", key " + c->key_id());
  auto s = std::make_shared<StandbySession>(
      cfg_, std::move(c), [this](const std::string& n, StandbySession* self) { claim_standby(n, self); },
      [this](uint64_t sid, std::unique_ptr<transport::Connection>& conn) {
        std::lock_guard<std::mutex> g(mu_);
        for (auto& s : standbys_)
          if (s->adopt_heartbeat_link(sid, conn)) return true;
        return false;
      },
      [this](const checkpoint::Resolve& r, const StandbySession& from) { return resolve(r, from); }, cfg_.arbiter);
  s->set_reprotect([this](const std::string& vm, const std::string& qmp, const std::string& domain,
                           const std::string& peer, const std::string& failover) {
    reprotect_twin(vm, qmp, domain, peer, failover);
  });
  {
    std::lock_guard<std::mutex> g(mu_);
    if (stop_) return;
    // Forget sessions that ended without activating, and activated ones whose twin no longer
    // runs (it died later, e.g. killed as the primary of the next failover).
    std::erase_if(standbys_, [this](const auto& x) {
      if (!x->finished()) return false;
      if (x->active()) return x->twin_pid() <= 0 || adopted_twin(x->name()) != x->twin_pid();
      return x.use_count() == 1 || x->transient();
    });
    standbys_.push_back(s);
  }
  s->start();
}

// reprotect=auto: the twin that took over is protected again, towards its old primary's host,
// with the same failover policy; while that host is down the new session stays degraded and
// keeps retrying. A libvirt twin gets the ftvm element (the hook protects it on its next starts
// too).
void Daemon::reprotect_twin(const std::string& vm, const std::string& qmp, const std::string& domain,
                            const std::string& peer, const std::string& failover) {
  nlohmann::json req = {{"cmd", "enable"}, {"peer", peer}, {"reprotect", "auto"}, {"failover", failover}};
  if (domain.empty()) {
    req["qmp"] = qmp;
    req["name"] = vm;
  } else {
    req["domain"] = domain;
  }
  auto r = handle(req);
  if (r.value("ok", false))
    log::info("ftd", "{}: protected again after the failover: {}", vm, r.value("message", ""));
  else
    log::error("ftd", "{}: reprotect=auto failed: {}; protect it with `ftctl enable {} --peer {}`", vm,
               r.value("error", "?"), domain.empty() ? "--qmp " + qmp : domain, peer);
}

// A new session for VM `name` from `self`'s peer. Refused (the existing session untouched)
// when the VM failed over to this host, or when a live session of it came from another peer
// host or with another key: only the primary that owns a session may replace it. The same
// primary reconnecting after a link failure either disabled its old session first (then that
// one is finished) or its old session is still alive here (the primary gave up on it): that
// session's twin is paused and never ran, so it is replaced.
void Daemon::claim_standby(const std::string& name, StandbySession* self) {
  std::vector<std::shared_ptr<StandbySession>> old;
  std::shared_ptr<WaitingTwin> waiting;
  {
    std::lock_guard<std::mutex> g(mu_);
    auto p = primaries_.find(name);
    if (p != primaries_.end() && !p->second->finished())
      fail("VM '{}' is protected from this host as a primary; a host cannot be its own standby", name);
    if (pid_t p = adopted_twin(name); p > 0)
      fail("VM '{}' already failed over to this host and runs here (twin pid {}); refusing to create another twin",
           name, p);
    // An adopted twin waiting for `ftctl failover --force`: its primary opening a new session
    // runs the guest (the twin is dropped below); anyone else is refused.
    if (auto w = waiting_twin_locked(name)) {
      if (!w->is_primary_host(self->peer_host()) || w->record().key_id != self->key_id())
        fail("VM '{}' has a twin here waiting for `ftctl failover --force` after its primary {} (key {}) was lost; "
             "refusing this session from {} (key {}); decide first: `ftctl failover --force {}` here",
             name, w->record().peer, w->record().key_id.empty() ? "none" : w->record().key_id, self->peer(),
             self->key_id().empty() ? "none" : self->key_id(), name);
      waiting = w;
    }
    // (an activated twin that ran here and died since, e.g. killed as the primary of a later
    // failover, no longer counts: adopted_twin() checks that it still runs)
    for (auto& s : standbys_) {
      if (s.get() == self || s->name() != name) continue;
      if (s->active() || s->finished()) continue;  // a running twin was checked above (adopted_twin)
      if (!(s->is_primary_host(self->peer_host()) || self->is_primary_host(s->peer_host())) ||
          s->key_id() != self->key_id())
        fail("VM '{}' is already protected by a session from {} (key {}); refusing this session from {} (key {}) "
             "and leaving that session untouched: disable protection on that primary first (`ftctl disable {}`)",
             name, s->peer(), s->key_id().empty() ? "none" : s->key_id(), self->peer(),
             self->key_id().empty() ? "none" : self->key_id(), name);
      old.push_back(s);
    }
  }
  if (waiting) {
    std::string text;
    waiting->primary_heard(fmt::format("a new session from {}", self->peer()), text);
  }
  for (auto& s : old) {
    log::info("ftd", "{}: a new session from the same primary ({}) replaces the previous one from {} (twin paused, "
              "never activated)", name, self->peer(), s->peer());
    s->abort("replaced by a new session from the same primary");
    s->join();
  }
}

std::shared_ptr<PrimarySession> Daemon::primary(const std::string& name) {
  std::lock_guard<std::mutex> g(mu_);
  auto it = primaries_.find(name);
  return it == primaries_.end() ? nullptr : it->second;
}

nlohmann::json Daemon::handle(const nlohmann::json& req) {
  std::string cmd = req.value("cmd", "");
  try {
    if (cmd == "ping")
      return {{"ok", true}, {"version", FTVM_VERSION}, {"listen", listen_address_}, {"security", security_}};
    if (cmd == "enable") return cmd_enable(req);
    if (cmd == "status") return cmd_status(req);
    if (cmd == "failover") return cmd_failover(req);
    if (cmd == "disable") return cmd_disable(req);
    if (cmd == "fault") return cmd_fault(req);
    if (cmd == "hook") return cmd_hook(req);
    return err("bad_request", fmt::format("unknown command '{}' (known: ping, enable, status, failover, disable, hook)", cmd));
  } catch (const std::invalid_argument& e) {
    return err("bad_request", fmt::format("{}: {}", cmd, e.what()));
  } catch (const std::exception& e) {
    return err("failed", e.what());
  }
}

void Daemon::record_protection(const std::string& name, const nlohmann::json& req) {
  const auto dir = cfg_.state_dir + "/protect";
  const auto path = dir + "/" + name + ".json";
  try {
    std::filesystem::create_directories(dir);
    auto rec = req;
    rec.erase("cmd");
    rec["name"] = name;
    const auto tmp = path + ".tmp";
    {
      std::ofstream f(tmp, std::ios::trunc);
      f << rec.dump() << "\n";
      if (!f) throw Error("write " + tmp + " failed");
    }
    std::filesystem::rename(tmp, path);
  } catch (const std::exception& e) {
    log::error("ftd", "{}: recording the protection in {} failed ({}); a restarted ftd will not protect it again by "
               "itself", name, path, e.what());
  }
}

void Daemon::forget_protection(const std::string& name) {
  std::error_code ec;
  std::filesystem::remove(cfg_.state_dir + "/protect/" + name + ".json", ec);
}

// At start: the plain-QEMU VMs this host protected before ftd stopped (or was restarted) are
// protected again (a new full sync) if their QEMU still runs; records of VMs that are gone are
// dropped. libvirt domains come back through the start-up scan (their XML declares them).
void Daemon::reattach_recorded() {
  const auto dir = cfg_.state_dir + "/protect";
  std::error_code ec;
  std::vector<std::filesystem::path> files;
  for (const auto& e : std::filesystem::directory_iterator(dir, ec))
    if (e.path().extension() == ".json") files.push_back(e.path());
  for (const auto& p : files) {
    nlohmann::json req;
    try {
      std::ifstream f(p);
      req = nlohmann::json::parse(f);
    } catch (const std::exception& e) {
      log::error("ftd", "ignoring the unreadable protection record {}: {}", p.string(), e.what());
      continue;
    }
    const std::string name = req.value("name", p.stem().string());
    if (primary(name)) continue;  // enabled meanwhile
    req["cmd"] = "enable";
    auto r = handle(req);
    if (r.value("ok", false)) {
      log::info("ftd", "{}: protected again after this ftd restarted: {}", name, r.value("message", ""));
    } else {
      log::warn("ftd", "{}: not protected again after this ftd restarted ({}); record {} dropped", name,
                r.value("error", "?"), p.string());
      std::filesystem::remove(p, ec);
    }
  }
}

nlohmann::json Daemon::cmd_enable(const nlohmann::json& req) {
  EnableRequest r;
  if (req.contains("domain")) {
    r.domain = need_string(req, "domain");
    r.libvirt_uri = req.value("uri", "");
  }
  else r.qmp_socket = need_string(req, "qmp");
  r.peer = need_string(req, "peer");
  r.peer_alt = req.value("peer_alt", "");
  r.name = req.value("name", "");
  r.epoch_ms = opt_uint(req, "epoch_ms", 25);
  r.output_epoch_min_ms = opt_uint(req, "output_epoch_min_ms", 2);
  r.max_sync_passes = opt_uint(req, "max_sync_passes", 8);
  r.transport = req.value("transport", "auto");
  r.shared_disk = req.value("shared_disk", false);
  r.reprotect = req.value("reprotect", "auto");
  r.failover = req.value("failover", "auto");
  r.arbiter = req.value("arbiter", "");
  std::shared_ptr<PrimarySession> s;
  try {
    s = std::make_shared<PrimarySession>(cfg_, r);
  } catch (const vmm::lv::NoSuchDomain& e) {
    return err("not_found", e.what());
  } catch (const std::exception& e) {
    return err("refused", e.what());
  }
  if (req.contains("expect_qemu_pid") && s->status()["qemu_pid"] != req["expect_qemu_pid"])
    return err("refused", fmt::format("the QEMU behind {} is pid {}, not pid {} that was protected: it was started "
                                      "anew since (the VM may run elsewhere after a failover); protect it explicitly "
                                      "if that is intended", r.qmp_socket, s->status()["qemu_pid"].dump(),
                                      req["expect_qemu_pid"].dump()));
  if (!r.domain.empty()) {
    // The declaration in the domain XML (live and persistent): the hook protects the domain
    // again whenever it starts, and a reader of the XML sees it is protected and where to.
    try {
      vmm::Protection p;
      p.peer = r.peer;
      p.transport = r.transport;
      p.epoch_ms = r.epoch_ms;
      p.arbiter = r.arbiter;
      p.failover = r.failover;
      p.peer_alt = r.peer_alt;
      p.reprotect = r.reprotect;
      s->set_protection_metadata(vmm::protection_element(p));
    } catch (const std::exception& e) {
      return err("failed", fmt::format("writing the ftvm metadata element into domain '{}' failed: {}", s->name(), e.what()));
    }
  }
  {
    std::lock_guard<std::mutex> g(mu_);
    auto it = primaries_.find(s->name());
    if (it != primaries_.end() && !it->second->finished())
      return err("refused", fmt::format("VM '{}' is already protected (state {}); disable it first", s->name(),
                                        it->second->status()["state"].get<std::string>()));
    primaries_[s->name()] = s;
  }
  if (r.domain.empty()) {
    auto rec = req;
    rec["expect_qemu_pid"] = s->status()["qemu_pid"];  // a QEMU started anew later is not this VM's copy
    record_protection(s->name(), rec);
  }
  s->start();
  return {{"ok", true}, {"name", s->name()}, {"message", fmt::format("protecting VM '{}': syncing to {}", s->name(), r.peer)}};
}

nlohmann::json Daemon::cmd_status(const nlohmann::json& req) {
  std::string want = req.value("name", "");
  nlohmann::json vms = nlohmann::json::array();
  std::vector<std::shared_ptr<WaitingTwin>> waiting;
  {
    std::lock_guard<std::mutex> g(mu_);
    for (auto& [n, s] : primaries_)
      if (want.empty() || n == want) vms.push_back(s->status());
    for (auto& s : standbys_)
      if (!s->transient() && (want.empty() || s->name() == want)) vms.push_back(s->status());
    for (auto& w : waiting_)
      if (want.empty() || w->name() == want) waiting.push_back(w);
  }
  // Outside mu_: an adopted twin's status waits while its `--force` asks the arbiter (up to 5 s).
  for (auto& w : waiting) vms.push_back(w->status());
  if (!want.empty() && vms.empty()) return err("not_found", fmt::format("no VM named '{}' on this host", want));
  return {{"ok", true}, {"vms", vms}, {"listen", listen_address_}, {"security", security_},
          {"insecure", !cfg_.key}};
}

// Without "force": a planned switchover, run on the primary. With "force" (the standby host): the
// VM runs here now from its last committed checkpoint, under StandbySession::force_failover()'s
// rules. Codes: ok; "refused" (the primary is heard, nothing committed, the arbiter says this side
// lost, the wrong host); "wait" (the arbiter cannot tell yet: retry); "not_found"; "failed".
nlohmann::json Daemon::cmd_failover(const nlohmann::json& req) {
  auto name = need_string(req, "name");
  const auto timeout = std::chrono::milliseconds(opt_uint(req, "timeout_ms", 60000));
  std::shared_ptr<StandbySession> sb, ran;
  {
    std::lock_guard<std::mutex> g(mu_);
    for (auto& x : standbys_) {
      if (x->transient() || x->name() != name) continue;
      if (!x->finished()) sb = x;
      else if (x->active() && x->twin_pid() > 0 && adopted_twin(name) == x->twin_pid()) ran = x;
    }
  }
  if (req.value("force", false)) {
    std::shared_ptr<WaitingTwin> w;
    {
      std::lock_guard<std::mutex> g(mu_);
      w = waiting_twin_locked(name);
    }
    if (!sb && w) {  // adopted after an ftd restart (standby_persist.h)
      const auto r = w->force(timeout);
      using C = WaitingTwin::ForceResult::Code;
      log::warn("standby", "{}: ftctl failover --force (adopted twin): {}", name, r.text);
      switch (r.code) {
        case C::Done: {
          const auto& rec = w->record();
          if (rec.reprotect_port) {
            const auto peer = (rec.peer_host.find(':') != std::string::npos ? "[" + rec.peer_host + "]" : rec.peer_host) +
                              ":" + std::to_string(rec.reprotect_port);
            // Off the control thread (the old primary's host may be down: enable retries).
            std::lock_guard<std::mutex> g(mu_);
            workers_.emplace_back([this, name, qmp = rec.qmp_socket, peer] { reprotect_twin(name, qmp, "", peer, "manual"); });
          }
          return {{"ok", true}, {"message", r.text}};
        }
        case C::Refused: return err("refused", r.text);
        case C::Wait: return err("wait", r.text);
        case C::Failed: return err("failed", r.text);
      }
      return err("failed", r.text);
    }
    if (sb) {
      const auto r = sb->force_failover(timeout);
      using C = StandbySession::ForceCode;
      switch (r.code) {
        case C::Done: return {{"ok", true}, {"message", r.text}};
        case C::Refused: return err("refused", r.text);
        case C::Wait: return err("wait", r.text);
        case C::Failed: return err("failed", r.text);
      }
      return err("failed", r.text);
    }
    if (ran || adopted_twin(name) > 0)
      return {{"ok", true}, {"message", fmt::format("VM '{}' already runs on this host (its twin took over)", name)}};
    if (auto p = primary(name); p && !p->finished())
      return err("refused", fmt::format("VM '{}' is protected from this host (its primary runs here): --force is for "
                                        "the standby host after the primary was lost; a planned switchover is `ftctl "
                                        "failover {}` here, without --force", name, name));
    return err("not_found", fmt::format("no standby session of VM '{}' on this host", name));
  }
  auto s = primary(name);
  if (!s && sb)
    return err("refused", fmt::format("this host is the standby of VM '{}': a planned switchover runs on the primary "
                                      "(`ftctl failover {}` there); after the primary was lost with failover=manual, "
                                      "run `ftctl failover --force {}` here", name, name, name));
  if (!s) return err("not_found", fmt::format("no VM named '{}' is protected from this host (run ftctl on the primary)", name));
  try {
    return {{"ok", true}, {"message", s->failover(timeout)}};
  } catch (const std::exception& e) {
    return err("failed", e.what());
  }
}

nlohmann::json Daemon::cmd_disable(const nlohmann::json& req) {
  auto name = need_string(req, "name");
  auto s = primary(name);
  if (!s) {  // a libvirt domain may be named by its UUID
    std::lock_guard<std::mutex> g(mu_);
    for (auto& [n, p] : primaries_)
      if (!p->domain_uuid().empty() && p->domain_uuid() == name) {
        s = p;
        name = n;
      }
  }
  if (!s) return err("not_found", fmt::format("no VM named '{}' is protected from this host", name));
  auto msg = s->disable(std::chrono::seconds(30));
  if (!s->domain_uuid().empty()) {
    try {
      s->set_protection_metadata("");  // the domain is no longer declared protected
      msg += "; the ftvm element is removed from its libvirt definition";
    } catch (const std::exception& e) {
      msg += fmt::format("; removing the ftvm element from the domain failed ({}): remove it with `virsh metadata {} "
                         "{} --remove --live --config`", e.what(), name, vmm::kProtectionNs);
    }
  }
  std::lock_guard<std::mutex> g(mu_);
  primaries_.erase(name);
  forget_protection(name);
  return {{"ok", true}, {"message", msg}};
}

nlohmann::json Daemon::cmd_fault(const nlohmann::json& req) {
  if (!cfg_.fault_injection)
    return err("refused", "fault injection is disabled (start ftd with --enable-fault-injection; tests only)");
  auto name = need_string(req, "name");
  Fault f;
  try {
    f = parse_fault(need_string(req, "fault"));
  } catch (const Error& e) {
    return err("bad_request", e.what());
  }
  auto s = primary(name);
  if (!s) return err("not_found", fmt::format("no VM named '{}' is protected from this host", name));
  s->inject_fault(f);
  return {{"ok", true}, {"message", "fault armed"}};
}

// The hook (tools/hook/ftvm_hook.cc) runs inside libvirtd's start of the domain: answer at once,
// do the work later. `started`/`reconnect` of a declared domain -> protect it; `stopped`/`release`
// -> its QEMU is gone: the session itself tells a guest shutdown (protection ends) from a death
// (the standby takes over); nothing to do here but note it.
nlohmann::json Daemon::cmd_hook(const nlohmann::json& req) {
  const control::HookRequest h = control::decode_hook_request(req);  // std::invalid_argument -> bad_request
  const std::string& phase = h.phase;
  const std::string& name = h.domain;
  const std::string& uuid = h.uuid;
  if (phase == "started" || phase == "reconnect") {
    if (!h.protection) return err("bad_request", "hook " + phase + " without a protection object");
    EnableRequest r = enable_request_for(uuid.empty() ? name : uuid, *h.protection);
    if (cfg_.libvirt_uri.empty())
      return err("refused", "ftd runs without libvirt (--libvirt-uri ''); cannot protect domain " + name);
    if (is_own_listener(r.peer))
      return err("refused", fmt::format("domain '{}' names this ftd ({}) as its standby; not protecting it from here",
                                        name, r.peer));
    if (auto s = primary(name); s && !s->finished())
      return {{"ok", true}, {"message", fmt::format("domain '{}' is already protected", name)}};
    protect_domain_async(uuid, name, r, "hook " + phase);
    return {{"ok", true}, {"message", fmt::format("protection of domain '{}' will start", name)}};
  }
  if (phase == "stopped" || phase == "release") {
    auto s = primary(name);
    log::info("ftd", "{}: libvirt reports the domain {} ({})", name, phase,
              s ? "session " + s->status()["state"].get<std::string>() : "not protected here");
    return {{"ok", true}, {"message", "noted"}};
  }
  return err("bad_request", fmt::format("hook phase '{}' is not handled", phase));
}

void Daemon::protect_domain_async(const std::string& uuid, const std::string& name, EnableRequest r,
                                  std::string origin) {
  std::lock_guard<std::mutex> g(mu_);
  workers_.emplace_back([this, uuid, name, r, origin] {
    // libvirtd is still starting the domain (the hook runs inside that job): wait until it runs.
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(120);
    std::string last;
    while (!stop_ && std::chrono::steady_clock::now() < deadline) {
      try {
        auto c = vmm::lv::Connection::open(cfg_.libvirt_uri);
        auto d = vmm::lv::Domain::lookup(c, uuid.empty() ? name : uuid);
        auto st = d.state();
        if (st.state == "shutoff") {
          log::warn("ftd", "{}: domain is shut off ({}); not protecting it", name, origin);
          return;
        }
        if (st.state == "running" || st.state == "paused") {
          auto s = std::make_shared<PrimarySession>(cfg_, r);
          {
            std::lock_guard<std::mutex> g2(mu_);
            auto it = primaries_.find(s->name());
            if (it != primaries_.end() && !it->second->finished()) return;  // someone was faster
            primaries_[s->name()] = s;
          }
          s->start();
          log::info("ftd", "{}: protecting libvirt domain ({}), standby {}", name, origin, r.peer);
          return;
        }
        last = "domain state " + st.str();
      } catch (const std::exception& e) {
        last = e.what();
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(200));
    }
    if (!stop_) log::error("ftd", "{}: could not protect the domain ({}): {}", name, origin, last);
  });
}

// At start: protect every running domain that carries the ftvm element (ftd was down when the
// hook fired, or ftd restarted).
void Daemon::scan_libvirt() {
  try {
    auto c = vmm::lv::Connection::open(cfg_.libvirt_uri);
    for (const auto& n : vmm::lv::list_active(c)) {
      try {
        auto d = vmm::lv::Domain::lookup(c, n);
        auto m = d.metadata(vmm::kProtectionNs);
        if (!m) continue;
        auto p = vmm::parse_protection(*m);
        if (!p || is_own_listener(p->peer)) continue;
        EnableRequest r = enable_request_for(d.uuid(), *p);
        log::info("ftd", "{}: running domain declares ftvm protection (standby {}): protecting it", n, p->peer);
        protect_domain_async(d.uuid(), n, r, "found running at ftd start");
      } catch (const std::exception& e) {
        log::warn("ftd", "{}: not protected at start: {}", n, e.what());
      }
    }
  } catch (const std::exception& e) {
    log::info("ftd", "libvirt ({}) not available: {}; libvirt domains are protected once it runs and the hook "
              "fires", cfg_.libvirt_uri, e.what());
  }
}

}  // namespace ftvm::ftd
