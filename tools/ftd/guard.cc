#include "tools/ftd/guard.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <ctime>

#include "common/error.h"
#include "common/log.h"

namespace ftvm::ftd {
namespace {

void say_stderr(const char* prefix, const char* m) {
  ssize_t w = ::write(2, prefix, strlen(prefix));
  w = ::write(2, m, strlen(m));
  (void)w;
}

int64_t now_ms() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<int64_t>(ts.tv_sec) * 1000 + ts.tv_nsec / 1000000;
}

[[noreturn]] void guard_main(int ctl, int qemu_pidfd, const char* msg_prefix) {
  bool armed = false;
  int64_t watchdog_ms = 0, last_ping = now_ms();
  // Parser state for 'A' + 4 bytes.
  int want = 0;
  uint32_t acc = 0;
  for (;;) {
    int timeout = -1;
    if (armed && watchdog_ms > 0) {
      const int64_t left = last_ping + watchdog_ms - now_ms();
      if (left <= 0) {
        syscall(SYS_pidfd_send_signal, qemu_pidfd, SIGKILL, nullptr, 0);
        say_stderr(msg_prefix, " guard: ftd sent no sign of life within its watchdog while protected (hung or stopped?); "
                               "killed the primary QEMU so the standby alone resumes\n");
        _exit(1);
      }
      timeout = static_cast<int>(left);
    }
    pollfd fds[2] = {{ctl, POLLIN, 0}, {qemu_pidfd, POLLIN, 0}};
    int n = ::poll(fds, 2, timeout);
    if (n < 0) {
      if (errno == EINTR) continue;
      _exit(2);
    }
    if (n == 0) continue;  // the watchdog check above decides
    if (fds[1].revents) _exit(0);  // QEMU exited: nothing left to guard
    if (fds[0].revents) {
      unsigned char buf[256];
      ssize_t r = ::read(ctl, buf, sizeof buf);
      if (r < 0 && errno == EINTR) continue;
      if (r > 0) {
        for (ssize_t i = 0; i < r; i++) {
          if (want > 0) {
            acc |= static_cast<uint32_t>(buf[i]) << (8 * (4 - want));
            if (--want == 0) {
              watchdog_ms = acc;
              armed = true;
              last_ping = now_ms();
            }
            continue;
          }
          switch (buf[i]) {
            case 'A': want = 4; acc = 0; break;
            case 'D': armed = false; break;
            case 'P': last_ping = now_ms(); break;
            default: break;
          }
        }
        continue;
      }
      // EOF: ftd is gone.
      if (armed) {
        syscall(SYS_pidfd_send_signal, qemu_pidfd, SIGKILL, nullptr, 0);
        say_stderr(msg_prefix, " guard: ftd died while protected; killed the primary QEMU so the standby alone resumes\n");
        _exit(1);
      }
      _exit(0);
    }
  }
}

}  // namespace

Guard::Guard(pid_t qemu_pid, const char* vm_name) : qemu_pid_(qemu_pid), vm_name_(vm_name) { spawn(); }

void Guard::spawn() {
  UniqueFd qfd(static_cast<int>(::syscall(SYS_pidfd_open, qemu_pid_, 0)));
  if (!qfd) throw SysError(errno, fmt::format("pidfd_open of QEMU pid {}", qemu_pid_), "is the VM still running?");
  int p[2];
  check_sys(::pipe2(p, O_CLOEXEC), "pipe2 for the guard of " + vm_name_);
  UniqueFd rd(p[0]), wr(p[1]);
  static thread_local char prefix[128];
  snprintf(prefix, sizeof prefix, "ftvm[%s]", vm_name_.c_str());
  pid_t pid = ::fork();
  if (pid < 0) throw SysError(errno, "fork of the guard process");
  if (pid == 0) {
    // Child: keep only the pipe's read end and the QEMU pidfd (as fds 3 and 4).
    ::prctl(PR_SET_NAME, "ftd-guard", 0, 0, 0);
    ::setsid();  // not killed with ftd's process group
    // Move both above the target slots first: either may already sit on fd 3 or 4.
    int a = ::fcntl(rd.get(), F_DUPFD, 16), b = ::fcntl(qfd.get(), F_DUPFD, 16);
    if (a < 0 || b < 0 || ::dup2(a, 3) < 0 || ::dup2(b, 4) < 0) _exit(2);
    ::syscall(SYS_close_range, 5, ~0U, 0);
    guard_main(3, 4, prefix);
  }
  pid_ = pid;
  ctl_ = std::move(wr);
  pidfd_.reset(static_cast<int>(::syscall(SYS_pidfd_open, pid, 0)));
  log::info("guard", "{}: guard pid {} watches QEMU pid {}", vm_name_, pid, qemu_pid_);
}

void Guard::say(const char* bytes, size_t n) {
  size_t done = 0;
  bool respawned = false;
  while (done < n) {
    ssize_t w = ::write(ctl_.get(), bytes + done, n - done);
    if (w > 0) {
      done += static_cast<size_t>(w);
      continue;
    }
    if (w < 0 && errno == EINTR) continue;
    if (w < 0 && errno == EPIPE && !respawned) {
      // The guard died (killed by someone, or it fenced QEMU). Never run unguarded: reap it and
      // start a new one with the same state; if QEMU is gone, spawn() throws.
      const int e = errno;
      int st;
      while (::waitpid(pid_, &st, 0) < 0 && errno == EINTR) {
      }
      log::error("guard", "{}: guard pid {} died ({}); starting a new guard", vm_name_, pid_, std::strerror(e));
      spawn();
      respawns_++;
      respawned = true;
      if (armed_) {
        const uint32_t ms = watchdog_ms_;
        const char a[5] = {'A', static_cast<char>(ms & 0xff), static_cast<char>((ms >> 8) & 0xff),
                           static_cast<char>((ms >> 16) & 0xff), static_cast<char>((ms >> 24) & 0xff)};
        say(a, sizeof a);
      }
      continue;
    }
    throw SysError(errno, fmt::format("telling guard pid {}", pid_), "the guard process died; re-enable protection");
  }
}

void Guard::arm(std::chrono::milliseconds watchdog) {
  const auto ms = static_cast<uint32_t>(std::max<int64_t>(0, watchdog.count()));
  armed_ = true;
  watchdog_ms_ = ms;
  const char w[5] = {'A', static_cast<char>(ms & 0xff), static_cast<char>((ms >> 8) & 0xff),
                     static_cast<char>((ms >> 16) & 0xff), static_cast<char>((ms >> 24) & 0xff)};
  say(w, sizeof w);
}
void Guard::disarm() {
  armed_ = false;
  say("D", 1);
}
void Guard::ping() { say("P", 1); }

Guard::~Guard() {
  if (pid_ <= 0) return;
  char d = 'D';
  ssize_t w = ::write(ctl_.get(), &d, 1);
  (void)w;
  ctl_.reset();  // EOF after "disarmed": the guard exits quietly
  int st;
  while (::waitpid(pid_, &st, 0) < 0 && errno == EINTR) {
  }
}

}  // namespace ftvm::ftd
