// The guard fences the primary QEMU when ftd dies while protected, and only then.
#include <catch2/catch.hpp>

#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <thread>

#include "common/error.h"
#include "tools/ftd/guard.h"
#include "vmm-glue/process.h"

using namespace std::chrono_literals;

namespace {

// A stand-in for QEMU: sleeps until killed. Killed and reaped by PID at scope exit.
struct Victim {
  pid_t pid;
  Victim() {
    pid = ::fork();
    if (pid == 0) {
      ::prctl(PR_SET_PDEATHSIG, SIGKILL);
      for (;;) ::pause();
    }
    REQUIRE(pid > 0);
  }
  ~Victim() {
    if (pid <= 0) return;  // already reaped (never kill(-1, ...): that is every process)
    ::kill(pid, SIGKILL);
    ::waitpid(pid, nullptr, 0);
  }
  // Reaped here (it is our child); true if it died of SIGKILL within the timeout.
  bool killed_within(std::chrono::milliseconds t) {
    auto end = std::chrono::steady_clock::now() + t;
    while (std::chrono::steady_clock::now() < end) {
      int st = 0;
      pid_t r = ::waitpid(pid, &st, WNOHANG);
      if (r == pid) {
        pid = -1;
        return WIFSIGNALED(st) && WTERMSIG(st) == SIGKILL;
      }
      std::this_thread::sleep_for(5ms);
    }
    return false;
  }
};

// Runs "ftd": a process that starts a guard for `victim`, arms it or not, and dies abruptly.
void ftd_dies(pid_t victim, bool armed) {
  pid_t ftd = ::fork();
  if (ftd == 0) {
    try {
      auto* g = new ftvm::ftd::Guard(victim, "unit");  // leaked on purpose: ftd dies holding it
      if (armed) g->arm();
    } catch (...) {
      _exit(3);
    }
    _exit(9);  // no destructors: like kill -9
  }
  REQUIRE(ftd > 0);
  int st = 0;
  REQUIRE(::waitpid(ftd, &st, 0) == ftd);
  REQUIRE(WIFEXITED(st));
  REQUIRE(WEXITSTATUS(st) == 9);
}

}  // namespace

TEST_CASE("guard kills the guarded process when ftd dies while armed", "[guard]") {
  Victim v;
  ftd_dies(v.pid, true);
  REQUIRE(v.killed_within(2000ms));
}

TEST_CASE("guard leaves the process alone when ftd dies disarmed", "[guard]") {
  Victim v;
  ftd_dies(v.pid, false);
  REQUIRE_FALSE(v.killed_within(300ms));
}

TEST_CASE("guard disarmed and destroyed normally never kills", "[guard]") {
  Victim v;
  {
    ftvm::ftd::Guard g(v.pid, "unit");
    g.arm();
    g.disarm();
  }
  REQUIRE_FALSE(v.killed_within(300ms));
}

TEST_CASE("guard refuses a process that does not exist", "[guard]") {
  REQUIRE_THROWS_AS(ftvm::ftd::Guard(999999999, "unit"), ftvm::SysError);
}

// Watchdog (split brain under a hung ftd): an ftd that is alive but stops pinging the guard
// (SIGSTOP, a stuck thread) sends no heartbeats either, so the standby resumes the twin after its
// timeout; the guard must have fenced QEMU before that.
TEST_CASE("guard watchdog kills the guarded process when ftd stops pinging while armed", "[guard]") {
  Victim v;
  ftvm::ftd::Guard g(v.pid, "unit");
  g.arm(150ms);
  for (int i = 0; i < 10; i++) {  // 400 ms of regular pings: nothing happens
    std::this_thread::sleep_for(40ms);
    g.ping();
  }
  REQUIRE(::kill(v.pid, 0) == 0);
  // Silence: killed after ~150 ms.
  const auto t0 = std::chrono::steady_clock::now();
  REQUIRE(v.killed_within(2000ms));
  const auto took = std::chrono::steady_clock::now() - t0;
  REQUIRE(took >= 100ms);
}

TEST_CASE("guard watchdog is off when disarmed or armed without one", "[guard]") {
  Victim v;
  ftvm::ftd::Guard g(v.pid, "unit");
  g.arm(100ms);
  g.disarm();
  REQUIRE_FALSE(v.killed_within(300ms));
  g.arm();  // no watchdog: only ftd's death fences
  REQUIRE_FALSE(v.killed_within(300ms));
  g.disarm();
}

TEST_CASE("a guard that died is replaced, armed with the same watchdog", "[guard]") {
  Victim v;
  ftvm::ftd::Guard g(v.pid, "unit");
  g.arm(150ms);
  const pid_t first = g.pid();
  REQUIRE(::kill(first, SIGKILL) == 0);
  std::this_thread::sleep_for(50ms);
  g.ping();  // EPIPE -> a new guard, armed again
  REQUIRE(g.pid() != first);
  REQUIRE(g.respawns() == 1);
  for (int i = 0; i < 5; i++) {
    std::this_thread::sleep_for(40ms);
    g.ping();
  }
  REQUIRE(::kill(v.pid, 0) == 0);
  REQUIRE(v.killed_within(2000ms));  // no more pings: the new guard's watchdog fences
}
