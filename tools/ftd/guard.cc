#include "tools/ftd/guard.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>

#include "common/error.h"
#include "common/log.h"

namespace ftvm::ftd {
namespace {

[[noreturn]] void guard_main(int ctl, int qemu_pidfd, const char* msg_prefix) {
  bool armed = false;
  for (;;) {
    pollfd fds[2] = {{ctl, POLLIN, 0}, {qemu_pidfd, POLLIN, 0}};
    int n = ::poll(fds, 2, -1);
    if (n < 0) {
      if (errno == EINTR) continue;
      _exit(2);
    }
    if (fds[1].revents) _exit(0);  // QEMU exited: nothing left to guard
    if (fds[0].revents) {
      char buf[64];
      ssize_t r = ::read(ctl, buf, sizeof buf);
      if (r < 0 && errno == EINTR) continue;
      if (r > 0) {
        for (ssize_t i = 0; i < r; i++) armed = buf[i] == 'A' ? true : buf[i] == 'D' ? false : armed;
        continue;
      }
      // EOF: ftd is gone.
      if (armed) {
        syscall(SYS_pidfd_send_signal, qemu_pidfd, SIGKILL, nullptr, 0);
        const char* m = " guard: ftd died while protected; killed the primary QEMU so the standby alone resumes\n";
        ssize_t w = ::write(2, msg_prefix, strlen(msg_prefix));
        w = ::write(2, m, strlen(m));
        (void)w;
        _exit(1);
      }
      _exit(0);
    }
  }
}

}  // namespace

Guard::Guard(pid_t qemu_pid, const char* vm_name) {
  UniqueFd qfd(static_cast<int>(::syscall(SYS_pidfd_open, qemu_pid, 0)));
  if (!qfd) throw SysError(errno, fmt::format("pidfd_open of QEMU pid {}", qemu_pid), "is the VM still running?");
  int p[2];
  check_sys(::pipe2(p, O_CLOEXEC), "pipe2 for the guard of " + std::string(vm_name));
  UniqueFd rd(p[0]), wr(p[1]);
  static thread_local char prefix[128];
  snprintf(prefix, sizeof prefix, "ftvm[%s]", vm_name);
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
  log::info("guard", "{}: guard pid {} watches QEMU pid {}", vm_name, pid, qemu_pid);
}

void Guard::say(char c) {
  for (;;) {
    ssize_t n = ::write(ctl_.get(), &c, 1);
    if (n == 1) return;
    if (n < 0 && errno == EINTR) continue;
    throw SysError(errno, fmt::format("telling guard pid {}", pid_), "the guard process died; re-enable protection");
  }
}

void Guard::arm() { say('A'); }
void Guard::disarm() { say('D'); }

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
