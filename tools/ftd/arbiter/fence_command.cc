#include "tools/ftd/arbiter/fence_command.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>
#include <thread>

#include "common/error.h"
#include "common/log.h"
#include "tools/ftd/session.h"

namespace ftvm::ftd {

namespace cp = ftvm::checkpoint;
using Clock = std::chrono::steady_clock;

FenceCommandArbiter::FenceCommandArbiter(std::string command, std::chrono::milliseconds timeout,
                                         std::chrono::milliseconds retry)
    : command_(std::move(command)), timeout_(timeout), retry_(retry) {
  if (command_.empty()) fail("--fence-command is empty: give the command that fences the other host");
}

FenceCommandArbiter::~FenceCommandArbiter() {
  std::lock_guard<std::mutex> g(mu_);
  for (auto& [k, r] : runs_) {
    if (r.pid > 0 && !r.done) {
      ::kill(-r.pid, SIGKILL);
      int st;
      while (::waitpid(r.pid, &st, 0) < 0 && errno == EINTR) {
      }
    }
    if (r.out >= 0) ::close(r.out);
  }
}

void FenceCommandArbiter::start(Run& r, const char* action, const cp::ArbiterSubject& s) {
  int p[2];
  check_sys(::pipe2(p, O_CLOEXEC), "pipe2 for the fence command");
  const std::string env_action = std::string("FTVM_FENCE_ACTION=") + action;
  const std::string env_peer = "FTVM_PEER=" + s.peer_host;
  const std::string env_vm = "FTVM_VM=" + s.vm;
  pid_t pid = ::fork();
  if (pid < 0) {
    int e = errno;
    ::close(p[0]);
    ::close(p[1]);
    throw SysError(e, "fork for the fence command");
  }
  if (pid == 0) {
    ::setpgid(0, 0);  // its own process group: a timeout kills the whole command
    ::dup2(p[1], 1);
    ::dup2(p[1], 2);
    int devnull = ::open("/dev/null", O_RDONLY);
    if (devnull >= 0) ::dup2(devnull, 0);
    ::putenv(const_cast<char*>(env_action.c_str()));
    ::putenv(const_cast<char*>(env_peer.c_str()));
    ::putenv(const_cast<char*>(env_vm.c_str()));
    ::execl("/bin/sh", "sh", "-c", command_.c_str(), static_cast<char*>(nullptr));
    _exit(127);
  }
  ::close(p[1]);
  ::fcntl(p[0], F_SETFL, O_NONBLOCK);
  r = Run{};
  r.pid = pid;
  r.out = p[0];
  r.started = Clock::now();
  log::warn("arbiter", "{}: fencing {} ({}): running `{}`", s.vm, s.peer_host, action, command_);
}

// Collects output and the exit status; kills the command when it ran past the timeout.
void FenceCommandArbiter::reap(Run& r, const std::string& key, bool block, Clock::time_point deadline) {
  for (;;) {
    char buf[4096];
    for (;;) {
      ssize_t n = ::read(r.out, buf, sizeof buf);
      if (n > 0) {
        if (r.output.size() < 16384) r.output.append(buf, static_cast<size_t>(n));
        continue;
      }
      break;
    }
    int st = 0;
    pid_t w = ::waitpid(r.pid, &st, WNOHANG);
    if (w == r.pid) {
      r.done = true;
      r.finished = Clock::now();
      r.fenced = WIFEXITED(st) && WEXITSTATUS(st) == 0;
      ::close(r.out);
      r.out = -1;
      while (!r.output.empty() && (r.output.back() == '\n' || r.output.back() == '\r')) r.output.pop_back();
      const auto what = WIFEXITED(st) ? fmt::format("exit status {}", WEXITSTATUS(st))
                                      : fmt::format("signal {}", WTERMSIG(st));
      last_ = fmt::format("{}: {} after {:.0f} ms{}{}", key, r.fenced ? "fenced" : "NOT fenced (" + what + ")",
                          std::chrono::duration<double, std::milli>(r.finished - r.started).count(),
                          r.output.empty() ? "" : "; output: ", r.output);
      if (r.fenced) {
        last_ok_wall_ms_ = wall_ms();
        log::warn("arbiter", "fence command succeeded: {}", last_);
      } else {
        log::error("arbiter", "fence command failed: {}; will retry", last_);
      }
      return;
    }
    if (Clock::now() - r.started > timeout_) {
      ::kill(-r.pid, SIGKILL);
      log::error("arbiter", "{}: fence command `{}` ran longer than {} ms: killed; will retry", key, command_,
                 timeout_.count());
      // The next loop iteration reaps it.
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
      continue;
    }
    if (!block || Clock::now() >= deadline) return;
    pollfd pf{r.out, POLLIN, 0};
    ::poll(&pf, 1, 10);
  }
}

cp::ArbiterAnswer FenceCommandArbiter::ask(const char* action, const cp::ArbiterSubject& s,
                                           std::chrono::milliseconds budget) {
  const auto deadline = Clock::now() + budget;
  const std::string key = fmt::format("{} {} {}", action, s.vm, s.peer_host);
  std::lock_guard<std::mutex> g(mu_);
  auto& r = runs_[key];
  if (r.pid <= 0 || (r.done && !r.fenced && Clock::now() - r.finished >= retry_)) start(r, action, s);
  if (!r.done) reap(r, key, true, deadline);
  if (!r.done) return cp::ArbiterAnswer::Wait;
  if (r.fenced) {
    runs_.erase(key);  // consumed: a later episode fences again
    return cp::ArbiterAnswer::Yes;
  }
  return cp::ArbiterAnswer::Wait;
}

cp::ArbiterAnswer FenceCommandArbiter::may_activate(const cp::ArbiterSubject& s, std::chrono::milliseconds budget) {
  return ask("fence-primary", s, budget);
}

cp::ArbiterAnswer FenceCommandArbiter::may_run_alone(const cp::ArbiterSubject& s, std::chrono::milliseconds budget) {
  return ask("fence-standby", s, budget);
}

cp::ArbiterStatus FenceCommandArbiter::status() const {
  std::lock_guard<std::mutex> g(mu_);
  return {"fence-command", last_.empty() ? fmt::format("nothing fenced yet (command: {})", command_) : last_, true,
          last_ok_wall_ms_};
}

}  // namespace ftvm::ftd
