#include "tools/ftd/arbiter/sanlock.h"

#include <dirent.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <fstream>
#include <iterator>
#include <vector>

extern "C" {
#include <sanlock.h>
#include <sanlock_admin.h>
#include <sanlock_resource.h>
#include <sanlock_rv.h>
}

#include "common/error.h"
#include "common/log.h"

namespace ftvm::ftd {

namespace cp = ftvm::checkpoint;
using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

constexpr uint64_t kMiB = 1 << 20;

const char* to_string(KeeperState s) {
  switch (s) {
    case KeeperState::Invalid: return "invalid";
    case KeeperState::None: return "none";
    case KeeperState::Acquiring: return "acquiring";
    case KeeperState::Held: return "held";
    case KeeperState::Lost: return "LOST";
    case KeeperState::Released: return "released";
  }
  return "?";
}

cp::ArbiterAnswer sanlock_answer(SanlockQuestion q, KeeperState s) {
  if (s == KeeperState::Held) return cp::ArbiterAnswer::Yes;
  if (q == SanlockQuestion::Activate) return cp::ArbiterAnswer::Wait;  // a standby never fences
  // The primary: it held the lease from the start of protection; without it, it lost.
  if (s == KeeperState::Lost || s == KeeperState::Released || s == KeeperState::None) return cp::ArbiterAnswer::Fence;
  return cp::ArbiterAnswer::Wait;
}

uint32_t sanlock_slot(const std::string& vm, uint32_t slots) {
  uint32_t h = 2166136261u;
  for (unsigned char c : vm) {
    h ^= c;
    h *= 16777619u;
  }
  return slots ? h % slots : 0;
}

uint32_t sanlock_slots(uint64_t bytes) { return bytes < 2 * kMiB ? 0 : static_cast<uint32_t>(bytes / kMiB - 1); }

std::string sanlock_resource_string(const std::string& lockspace, const std::string& path, uint32_t slot) {
  std::string p;
  for (char c : path) {
    if (c == ':') p += '\\';
    p += c;
  }
  return fmt::format("{}:ftvm-slot-{}:{}:{}", lockspace, slot, p, (uint64_t{slot} + 1) * kMiB);
}

std::string sanlock_rc_text(int rc) {
  switch (rc) {
    case 0: return "ok";
    case SANLK_ACQUIRE_IDLIVE: return "held by another live host (-243 SANLK_ACQUIRE_IDLIVE)";
    case SANLK_ACQUIRE_OWNED: return "held by another host (-244 SANLK_ACQUIRE_OWNED)";
    case SANLK_ACQUIRE_OWNED_RETRY: return "held by another host, retry (-247)";
    case SANLK_ACQUIRE_OTHER: return "held by another host (-245 SANLK_ACQUIRE_OTHER)";
    case SANLK_ACQUIRE_IDDISK: return "the owner's host id is unreadable on disk (-242)";
    case SANLK_ACQUIRE_LOCKSPACE: return "the lockspace is not joined on this host (-241)";
    case SANLK_LEADER_MAGIC:
      return "the slot is not initialised (-223 SANLK_LEADER_MAGIC): run scripts/ftvm-sanlock-init on the area";
    case SANLK_LEADER_RESOURCE:
      return "the slot holds another resource name (-227): the area was initialised for another layout; "
             "re-run scripts/ftvm-sanlock-init while no ftd uses it";
    case SANLK_LEADER_LOCKSPACE: return "the slot belongs to another lockspace (-226): check --sanlock-lockspace";
    case SANLK_AIO_TIMEOUT: return "I/O timeout on the lease area (-202)";
    case -ENOENT: return "not found (-ENOENT): lockspace not joined or area missing";
    case -EEXIST:
      return "already held on this host (-EEXIST): another VM with the same slot runs here (more slots: a bigger "
             "area), or another process holds it";
    case -ECONNREFUSED: return "the sanlock daemon is not running (connection refused; SANLOCK_RUN_DIR?)";
    default: return fmt::format("sanlock error {} ({})", rc, rc < 0 && rc > -200 ? std::strerror(-rc) : "sanlock code");
  }
}

namespace {

double now_wall_ms() {
  return std::chrono::duration<double, std::milli>(std::chrono::system_clock::now().time_since_epoch()).count();
}

std::string hms(double wall_ms) {
  const time_t t = static_cast<time_t>(wall_ms / 1000);
  struct tm tm{};
  gmtime_r(&t, &tm);
  return fmt::format("{:02}:{:02}:{:02}Z", tm.tm_hour, tm.tm_min, tm.tm_sec);
}

void set_lockspace(struct sanlk_lockspace& ls, const SanlockOptions& o) {
  std::memset(&ls, 0, sizeof ls);
  std::memcpy(ls.name, o.lockspace.data(), std::min<size_t>(o.lockspace.size(), SANLK_NAME_LEN - 1));
  ls.host_id = o.host_id;
  std::memcpy(ls.host_id_disk.path, o.lease_path.data(), std::min<size_t>(o.lease_path.size(), SANLK_PATH_LEN - 1));
  ls.host_id_disk.offset = 0;
}

// ---- the keeper process (async-signal-safe handler) ----
constexpr int kCtlFd = 3, kGuestFd = 4;
volatile sig_atomic_t g_held = 0;

void keeper_say(const char* m) {
  ssize_t w = ::write(kCtlFd, m, std::strlen(m));
  (void)w;
}

void keeper_on_term(int) {
  if (g_held) {
    // This host lost the lease (sanlock's kill action): the guest must be dead before the
    // other host can acquire it (60 s from now at the earliest).
    syscall(SYS_pidfd_send_signal, kGuestFd, SIGKILL, nullptr, 0);
    const char m[] = "F sanlock sent SIGTERM: this host lost the lease (lockspace renewal failed); killed the guest QEMU\n";
    ssize_t w = ::write(kCtlFd, m, sizeof m - 1);
    (void)w;
    const char e[] = "ftd sanlock keeper: lease lost (SIGTERM from sanlock); killed the guest QEMU\n";
    w = ::write(2, e, sizeof e - 1);
    (void)w;
    _exit(3);
  }
  _exit(0);
}

}  // namespace

int sanlock_keeper_main(int argc, char** argv) {
  if (argc != 6) {
    fmt::print(stderr, "ftd __sanlock-keeper: internal helper of ftd --arbiter sanlock (RESOURCE once|retry MS "
                       "GUEST_PID)\n");
    return 2;
  }
  ::syscall(SYS_close_range, 5u, ~0u, 0u);
  struct sigaction sa{};
  sa.sa_handler = keeper_on_term;
  sigfillset(&sa.sa_mask);
  sigaction(SIGTERM, &sa, nullptr);
  signal(SIGINT, SIG_IGN);
  signal(SIGHUP, SIG_IGN);
  signal(SIGPIPE, SIG_IGN);
  sigset_t none;
  sigemptyset(&none);
  sigprocmask(SIG_SETMASK, &none, nullptr);
  prctl(PR_SET_NAME, "ftd-sl-keeper", 0, 0, 0);
  const bool once = std::strcmp(argv[3], "once") == 0;
  const int retry_ms = std::max(50, std::atoi(argv[4]));
  std::string spec = argv[2];
  struct sanlk_resource* res = nullptr;
  int rv = sanlock_str_to_res(spec.data(), &res);
  if (rv != 0 || !res) {
    keeper_say(fmt::format("E {} cannot parse the resource string '{}'\n", rv, argv[2]).c_str());
    return 6;
  }
  const int sock = sanlock_register();
  if (sock < 0) {
    keeper_say(fmt::format("E {} sanlock_register failed: is the sanlock daemon running (SANLOCK_RUN_DIR)?\n", sock).c_str());
    return 6;
  }
  bool ctl_open = true;
  // Acquire.
  for (;;) {
    // Armed before the call: a SIGTERM that races with a successful acquire still fences.
    g_held = 1;
    rv = sanlock_acquire(sock, -1, 0, 1, &res, nullptr);
    if (rv == 0) break;
    g_held = 0;
    keeper_say(fmt::format("W {}\n", rv).c_str());
    if (once) return 5;
    struct pollfd p[2] = {{kCtlFd, POLLIN, 0}, {kGuestFd, POLLIN, 0}};
    const auto end = Clock::now() + milliseconds(retry_ms);
    for (;;) {
      const auto left = std::chrono::duration_cast<milliseconds>(end - Clock::now()).count();
      if (left <= 0) break;
      int n = ::poll(p, 2, static_cast<int>(left));
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) return 6;
      if (n == 0) break;
      if (p[1].revents) return 0;  // the guest exited: nothing to hold a lease for
      if (p[0].revents) return 0;  // ftd said release, or died: stop trying
    }
  }
  keeper_say("H\n");
  for (;;) {
    struct pollfd p[3] = {{sock, POLLIN, 0}, {kGuestFd, POLLIN, 0}, {ctl_open ? kCtlFd : -1, POLLIN, 0}};
    int n = ::poll(p, 3, -1);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) continue;  // cannot happen with valid fds; keep holding
    if (p[0].revents) {
      // The daemon hung up (died): it renews nothing any more, so this host's lease will expire
      // and the other host acquire it at 8*io_timeout + 60 s. The guest dies now.
      g_held = 0;
      syscall(SYS_pidfd_send_signal, kGuestFd, SIGKILL, nullptr, 0);
      keeper_say("F the sanlock daemon connection closed (daemon died); killed the guest QEMU\n");
      return 4;
    }
    if (p[1].revents) {
      g_held = 0;
      sanlock_release(sock, -1, 0, 1, &res);
      keeper_say("R the guest QEMU exited; lease released\n");
      return 0;
    }
    if (p[2].revents) {
      char c = 0;
      ssize_t r = ::read(kCtlFd, &c, 1);
      if (r == 1 && c == 'R') {
        g_held = 0;
        sanlock_release(sock, -1, 0, 1, &res);
        keeper_say("R released on request\n");
        return 0;
      }
      if (r == 0 || (r < 0 && errno != EINTR && errno != EAGAIN)) ctl_open = false;  // ftd gone: hold on
    }
  }
}

// ---- ftd side ----

SanlockArbiter::SanlockArbiter(SanlockOptions o) : o_(std::move(o)) {
  if (o_.lease_path.empty()) fail("--arbiter sanlock needs --sanlock-lease PATH (the shared lease area)");
  if (o_.host_id < 1 || o_.host_id > 2000) fail("--sanlock-host-id must be 1..2000 and differ between the two hosts");
  if (o_.lockspace.empty() || o_.lockspace.size() >= SANLK_NAME_LEN || o_.lockspace.find(':') != std::string::npos)
    fail("--sanlock-lockspace '{}': give 1..47 characters without ':'", o_.lockspace);
  {
    UniqueFd fd(check_sys(::open(o_.lease_path.c_str(), O_RDONLY | O_CLOEXEC), "open the sanlock lease area " + o_.lease_path,
                          "give the shared file or device both hosts see (--sanlock-lease)"));
    const off_t size = check_sys(::lseek(fd.get(), 0, SEEK_END), "size of the sanlock lease area " + o_.lease_path);
    slots_ = sanlock_slots(static_cast<uint64_t>(size));
  }
  if (slots_ == 0)
    fail("sanlock lease area {} is smaller than 2 MiB (lockspace + one slot): create and initialise it with "
         "scripts/ftvm-sanlock-init {} SLOTS", o_.lease_path, o_.lease_path);
  struct sanlk_lockspace ls;
  set_lockspace(ls, o_);
  log::info("arbiter", "sanlock: joining lockspace {} as host {} on {} (io timeout {} s; takes ~{} s)", o_.lockspace,
            o_.host_id, o_.lease_path, o_.io_timeout_s, 2 * o_.io_timeout_s + 1);
  int rv = sanlock_add_lockspace_timeout(&ls, 0, o_.io_timeout_s);
  if (rv == -ENOENT || rv == -ECONNREFUSED) {
    const char* dir = std::getenv("SANLOCK_RUN_DIR");
    fail("sanlock: no sanlock daemon answers at {}/sanlock.sock ({}): start it (systemctl start sanlock, with wdmd "
         "and a watchdog), or set SANLOCK_RUN_DIR for ftd to the daemon's", dir ? dir : "/run/sanlock",
         std::strerror(-rv));
  }
  if (rv != 0 && rv != -EEXIST)
    fail("sanlock: joining lockspace {} as host {} on {} failed: {} (is the sanlock daemon running, with "
         "SANLOCK_RUN_DIR as ftd's? was the area initialised with scripts/ftvm-sanlock-init?)",
         o_.lockspace, o_.host_id, o_.lease_path, sanlock_rc_text(rv));
  ls_joined_ = true;
  ls_state_ = "joined";
  ls_checked_ = Clock::now();
  confirmed_wall_ms_ = now_wall_ms();
  log::info("arbiter", "sanlock: joined lockspace {} as host {} ({} VM lease slots)", o_.lockspace, o_.host_id, slots_);
  // The thread must not take process signals (ftd reads SIGTERM/SIGINT from a signalfd).
  sigset_t all, old;
  sigfillset(&all);
  if (int e = pthread_sigmask(SIG_SETMASK, &all, &old); e != 0)
    throw SysError(e, "pthread_sigmask before starting the sanlock arbiter thread");
  try {
    watcher_ = std::thread([this] {
      std::unique_lock<std::mutex> g(mu_);
      while (!stop_) {
        cv_.wait_for(g, milliseconds(200));
        for (auto& [vm, k] : keepers_) refresh(vm, k);
      }
    });
  } catch (...) {
    pthread_sigmask(SIG_SETMASK, &old, nullptr);
    throw;
  }
  pthread_sigmask(SIG_SETMASK, &old, nullptr);
}

SanlockArbiter::~SanlockArbiter() {
  {
    std::lock_guard<std::mutex> g(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (watcher_.joinable()) watcher_.join();
  std::lock_guard<std::mutex> g(mu_);
  for (auto& [vm, k] : keepers_) {
    refresh(vm, k);
    if (!k.exited && k.state != KeeperState::Held) release(k);  // an unfinished acquire: stop it
  }
}

void SanlockArbiter::spawn(const std::string& vm, pid_t guest_pid, bool once) {
  if (guest_pid <= 0) fail("sanlock: VM '{}': the guest's QEMU pid is unknown; cannot hold its lease", vm);
  int sv[2];
  check_sys(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), "socketpair for the sanlock keeper");
  UniqueFd mine(sv[0]), theirs(sv[1]);
  const int gfd = static_cast<int>(syscall(SYS_pidfd_open, guest_pid, 0));
  if (gfd < 0) throw SysError(errno, fmt::format("pidfd_open of the guest QEMU pid {} of VM '{}'", guest_pid, vm));
  UniqueFd guest(gfd);
  // Above 4, so that dup2 into 3 and 4 in the child cannot clobber one with the other.
  UniqueFd hi_ctl(check_sys(::fcntl(theirs.get(), F_DUPFD_CLOEXEC, 10), "dup of the keeper socket"));
  UniqueFd hi_guest(check_sys(::fcntl(guest.get(), F_DUPFD_CLOEXEC, 10), "dup of the guest pidfd"));
  const std::string res = sanlock_resource_string(o_.lockspace, o_.lease_path, sanlock_slot(vm, slots_));
  const std::string retry = std::to_string(o_.retry.count()), gpid = std::to_string(guest_pid);
  const char* args[] = {"ftd", "__sanlock-keeper", res.c_str(), once ? "once" : "retry", retry.c_str(), gpid.c_str(),
                        nullptr};
  const pid_t pid = ::fork();
  if (pid < 0) throw SysError(errno, "fork of the sanlock keeper of VM " + vm);
  if (pid == 0) {
    if (::dup2(hi_ctl.get(), kCtlFd) < 0 || ::dup2(hi_guest.get(), kGuestFd) < 0) _exit(127);
    ::setsid();  // a terminal's ^C must not reach it
    ::execv(o_.keeper_exe.c_str(), const_cast<char* const*>(args));
    _exit(127);
  }
  const int kfd = static_cast<int>(syscall(SYS_pidfd_open, pid, 0));
  Keeper k;
  k.pid = pid;
  k.guest_pid = guest_pid;
  k.ctl = std::move(mine);
  k.pidfd = UniqueFd(kfd);  // may be -1 (old kernel): then waitpid by pid
  check_sys(::fcntl(k.ctl.get(), F_SETFL, O_NONBLOCK), "O_NONBLOCK on the keeper socket");
  log::info("arbiter", "sanlock: VM '{}': keeper pid {} {} lease {} for QEMU pid {}", vm, pid,
            once ? "acquires" : "waits for", res, guest_pid);
  keepers_.erase(vm);
  keepers_.emplace(vm, std::move(k));
}

std::vector<pid_t> sanlock_find_keepers(const std::string& resource, pid_t guest_pid) {
  std::vector<pid_t> res;
  DIR* d = ::opendir("/proc");
  if (!d) return res;
  while (struct dirent* e = ::readdir(d)) {
    char* end = nullptr;
    const long pid = std::strtol(e->d_name, &end, 10);
    if (!end || *end || pid <= 0) continue;
    std::ifstream f(fmt::format("/proc/{}/cmdline", pid), std::ios::binary);
    std::string cmd((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    std::vector<std::string> argv;
    for (size_t i = 0, j; i < cmd.size(); i = j + 1) {
      j = cmd.find('\0', i);
      if (j == std::string::npos) j = cmd.size();
      argv.push_back(cmd.substr(i, j - i));
    }
    if (argv.size() == 6 && argv[1] == "__sanlock-keeper" && argv[2] == resource && argv[5] == std::to_string(guest_pid))
      res.push_back(static_cast<pid_t>(pid));
  }
  ::closedir(d);
  return res;
}

void SanlockArbiter::adopt_orphans(const std::string& vm, pid_t guest_pid) {
  const std::string res = sanlock_resource_string(o_.lockspace, o_.lease_path, sanlock_slot(vm, slots_));
  for (pid_t pid : sanlock_find_keepers(res, guest_pid)) {
    auto it = keepers_.find(vm);
    if (it != keepers_.end() && it->second.pid == pid) continue;
    // A keeper an earlier ftd left holding this guest's lease (ftd restarted, the guest ran on).
    // SIGKILL is no fence (only SIGTERM is): it releases the lease, which this ftd takes next.
    const int pfd = static_cast<int>(syscall(SYS_pidfd_open, pid, 0));
    if (pfd < 0) continue;  // gone meanwhile
    UniqueFd p(pfd);
    log::info("arbiter", "sanlock: VM '{}': taking over the lease from keeper pid {} left by an earlier ftd", vm, pid);
    syscall(SYS_pidfd_send_signal, pfd, SIGKILL, nullptr, 0);
    struct pollfd w{pfd, POLLIN, 0};
    if (::poll(&w, 1, 2000) <= 0)
      fail("sanlock: VM '{}': the old keeper pid {} did not exit after SIGKILL within 2 s", vm, pid);
  }
}

void SanlockArbiter::refresh(const std::string& vm, Keeper& k) const {
  if (k.exited) return;
  char b[512];
  for (;;) {
    ssize_t n = ::read(k.ctl.get(), b, sizeof b);
    if (n > 0) {
      k.buf.append(b, static_cast<size_t>(n));
      continue;
    }
    break;  // 0 (EOF), EAGAIN, or an error: the waitpid below decides
  }
  size_t nl;
  while ((nl = k.buf.find('\n')) != std::string::npos) {
    const std::string line = k.buf.substr(0, nl);
    k.buf.erase(0, nl + 1);
    if (line.empty()) continue;
    const char t = line[0];
    const std::string rest = line.size() > 2 ? line.substr(2) : "";
    if (t == 'H') {
      k.state = KeeperState::Held;
      k.held_since_wall_ms = now_wall_ms();
      confirmed_wall_ms_ = k.held_since_wall_ms;
      log::info("arbiter", "sanlock: VM '{}': lease held (keeper pid {}, QEMU pid {})", vm, k.pid, k.guest_pid);
    } else if (t == 'W' || t == 'E') {
      const int rc = std::atoi(rest.c_str());
      if (rc != k.last_rc)
        log::warn("arbiter", "sanlock: VM '{}': lease not acquired: {}{}", vm, sanlock_rc_text(rc),
                  t == 'E' ? " (" + rest + ")" : "");
      k.last_rc = rc;
      if (t == 'E') k.why = rest;
    } else if (t == 'F') {
      k.state = KeeperState::Lost;
      k.why = rest;
      log::error("arbiter", "sanlock: VM '{}': LEASE LOST: {}", vm, rest);
    } else if (t == 'R') {
      k.state = KeeperState::Released;
      k.why = rest;
      log::info("arbiter", "sanlock: VM '{}': {}", vm, rest);
    }
  }
  int st = 0;
  const pid_t r = ::waitpid(k.pid, &st, WNOHANG);
  if (r == k.pid || (r < 0 && errno == ECHILD)) {
    k.exited = true;
    if (k.state == KeeperState::Held) {
      k.state = KeeperState::Lost;
      k.why = fmt::format("the keeper died while holding the lease ({})",
                          WIFSIGNALED(st) ? fmt::format("signal {}", WTERMSIG(st)) : fmt::format("exit {}", WEXITSTATUS(st)));
      log::error("arbiter", "sanlock: VM '{}': LEASE LOST: {}", vm, k.why);
    } else if (k.state == KeeperState::Acquiring) {
      k.state = KeeperState::Released;
      if (k.why.empty()) k.why = "gave up: " + sanlock_rc_text(k.last_rc);
    }
  }
}

void SanlockArbiter::release(Keeper& k) const {
  if (k.exited) return;
  const char r = 'R';
  if (::write(k.ctl.get(), &r, 1) != 1 || k.state != KeeperState::Held) ::kill(k.pid, SIGKILL);  // not holding
  for (int i = 0; i < 200; ++i) {
    int st;
    if (::waitpid(k.pid, &st, WNOHANG) != 0) break;
    ::usleep(10000);
  }
  k.exited = true;
  if (k.state != KeeperState::Lost) k.state = KeeperState::Released;
}

KeeperState SanlockArbiter::state_of(const std::string& vm) const {
  std::lock_guard<std::mutex> g(mu_);
  auto it = keepers_.find(vm);
  if (it == keepers_.end()) return KeeperState::None;
  refresh(vm, it->second);
  return it->second.state;
}

cp::ArbiterAnswer SanlockArbiter::may_activate(const cp::ArbiterSubject& s, milliseconds) {
  std::lock_guard<std::mutex> g(mu_);
  auto it = keepers_.find(s.vm);
  if (it != keepers_.end()) refresh(s.vm, it->second);
  if (it == keepers_.end() || it->second.exited || it->second.guest_pid != s.guest_pid) {
    if (it != keepers_.end()) release(it->second);
    if (s.guest_pid <= 0) return cp::ArbiterAnswer::Wait;
    spawn(s.vm, s.guest_pid, false);
    return cp::ArbiterAnswer::Wait;
  }
  return sanlock_answer(SanlockQuestion::Activate, it->second.state);
}

cp::ArbiterAnswer SanlockArbiter::may_run_alone(const cp::ArbiterSubject& s, milliseconds) {
  std::lock_guard<std::mutex> g(mu_);
  auto it = keepers_.find(s.vm);
  if (it == keepers_.end()) return sanlock_answer(SanlockQuestion::RunAlone, KeeperState::None);
  refresh(s.vm, it->second);
  if (s.guest_pid > 0 && it->second.guest_pid != s.guest_pid)  // a lease for another QEMU is not this one's
    return sanlock_answer(SanlockQuestion::RunAlone, KeeperState::None);
  return sanlock_answer(SanlockQuestion::RunAlone, it->second.state);
}

void SanlockArbiter::runs_here(const cp::ArbiterSubject& s, milliseconds budget) {
  std::unique_lock<std::mutex> g(mu_);
  auto it = keepers_.find(s.vm);
  if (it != keepers_.end()) {
    refresh(s.vm, it->second);
    if (it->second.exited || it->second.guest_pid != s.guest_pid) {
      release(it->second);
      it = keepers_.end();
    }
  }
  const bool fresh = it == keepers_.end();
  if (fresh) adopt_orphans(s.vm, s.guest_pid);
  if (fresh) spawn(s.vm, s.guest_pid, /*once=*/budget.count() > 0);
  if (budget.count() == 0) return;
  const auto end = Clock::now() + budget;
  for (;;) {
    Keeper& k = keepers_.at(s.vm);
    refresh(s.vm, k);
    if (k.state == KeeperState::Held) return;
    if (k.exited || Clock::now() >= end) {
      const std::string why = k.last_rc ? sanlock_rc_text(k.last_rc) : (k.why.empty() ? "no answer in time" : k.why);
      // A keeper this call started stops; one that was already waiting (the twin's, started at
      // its activation) goes on waiting for the lease to free.
      if (!k.exited && fresh) release(k);
      fail("sanlock: cannot hold the lease of VM '{}' (slot {} of {} on {}, lockspace {} host {}): {}. The side that "
           "runs the VM must hold it: if the VM runs on the other host, protect it there; if a dead host held it, "
           "its lease frees 8*io_timeout+60 s after its last renewal; check `sanlock client status`",
           s.vm, sanlock_slot(s.vm, slots_), slots_, o_.lease_path, o_.lockspace, o_.host_id, why);
    }
    g.unlock();
    ::usleep(20000);
    g.lock();
  }
}

std::string SanlockArbiter::describe(const std::string& vm, const Keeper& k) const {
  std::string d = fmt::format("{}: lease ftvm-slot-{} {}", vm, sanlock_slot(vm, slots_), to_string(k.state));
  if (k.state == KeeperState::Held) d += fmt::format(" since {} (keeper {}, QEMU {})", hms(k.held_since_wall_ms), k.pid, k.guest_pid);
  else if (k.state == KeeperState::Acquiring && k.last_rc) d += ": " + sanlock_rc_text(k.last_rc);
  else if (!k.why.empty()) d += ": " + k.why;
  return d;
}

cp::ArbiterStatus SanlockArbiter::status() const {
  std::lock_guard<std::mutex> g(mu_);
  if (Clock::now() - ls_checked_ > std::chrono::seconds(1)) {
    struct sanlk_lockspace ls;
    set_lockspace(ls, o_);
    const int rv = sanlock_inq_lockspace(&ls, 0);
    ls_checked_ = Clock::now();
    ls_joined_ = rv == 0;
    ls_state_ = rv == 0 ? "joined" : fmt::format("NOT joined ({})", sanlock_rc_text(rv));
    if (rv == 0) confirmed_wall_ms_ = now_wall_ms();
  }
  cp::ArbiterStatus st;
  st.kind = "sanlock";
  st.holds = fmt::format("lockspace {} host {} on {}: {}", o_.lockspace, o_.host_id, o_.lease_path, ls_state_);
  bool lost = false;
  for (auto& [vm, k] : keepers_) {
    refresh(vm, k);
    if (k.state == KeeperState::Released) continue;
    lost |= k.state == KeeperState::Lost;
    st.holds += "; " + describe(vm, k);
  }
  st.healthy = ls_joined_ && !lost;
  st.last_confirmed_wall_ms = confirmed_wall_ms_;
  return st;
}

}  // namespace ftvm::ftd
