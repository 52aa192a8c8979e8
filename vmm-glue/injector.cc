#include "vmm-glue/injector.h"
#include "vmm-glue/process.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/ptrace.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <string>

#include "common/error.h"
#include "common/fd.h"
#include "common/log.h"
#include "vmm-glue/pagemap_scan.h"

namespace ftvm::vmm {

namespace {

constexpr uint64_t kRedZone = 128;
constexpr unsigned kMaxStepAttempts = 1000;

// Kernel-internal restart codes a syscall can show in RAX at a signal-delivery stop; the kernel
// rewinds RIP and re-executes the syscall when the signal is not delivered.
bool is_restart_code(long rax) {
  return rax == -512 /*ERESTARTSYS*/ || rax == -513 /*ERESTARTNOINTR*/ ||
         rax == -514 /*ERESTARTNOHAND*/ || rax == -516 /*ERESTART_RESTARTBLOCK*/;
}

std::string describe_status(int st) {
  if (WIFEXITED(st)) return fmt::format("exited with status {}", WEXITSTATUS(st));
  if (WIFSIGNALED(st)) return fmt::format("was killed by signal {}", WTERMSIG(st));
  return fmt::format("reported wait status {:#x}", st);
}


}  // namespace

Injector::Injector(pid_t tid) : tid_(tid) {
  check_sys(ptrace(PTRACE_SEIZE, tid_, nullptr, nullptr),
            fmt::format("PTRACE_SEIZE tid {}", tid_),
            "check the process exists, run as root or set kernel.yama.ptrace_scope=0, and that no "
            "debugger is attached");
  attached_ = true;
  try {
    ptrace_call(ptrace(PTRACE_INTERRUPT, tid_, nullptr, nullptr), "PTRACE_INTERRUPT");
    // A signal-delivery stop can precede the interrupt stop (the signal was already being
    // delivered); suppress it, remember it, and continue until the interrupt trap fires.
    for (unsigned i = 0;; ++i) {
      int st = wait_stop("attach");
      if ((st >> 16) == PTRACE_EVENT_STOP) break;
      if ((st >> 16) == 0) defer_signal(WSTOPSIG(st));
      if (i >= kMaxStepAttempts)
        fail("attach to tid {}: no interrupt stop after {} stops (target is receiving a signal "
             "storm); retry later",
             tid_, i);
      ptrace_call(ptrace(PTRACE_CONT, tid_, nullptr, nullptr), "PTRACE_CONT (attach)");
    }
    ptrace_call(ptrace(PTRACE_GETREGS, tid_, nullptr, &saved_), "PTRACE_GETREGS");
    find_syscall_insn();
    scratch_ = (saved_.rsp - kRedZone - kScratchSize) & ~uint64_t{15};
    log::debug("injector", "attached tid {}: rip={:#x} rsp={:#x} syscall insn at {:#x}", tid_,
               saved_.rip, saved_.rsp, syscall_ip_);
  } catch (...) {
    detach_quietly();
    throw;
  }
}

Injector::~Injector() { detach_quietly(); }

void Injector::detach_quietly() noexcept {
  try {
    detach();
  } catch (const std::exception& e) {
    log::warn("injector", "detach from tid {}: {}", tid_, e.what());
    attached_ = false;
  }
}

int Injector::wait_stop(const char* step) {
  int st = 0;
  for (;;) {
    pid_t r = waitpid(tid_, &st, __WALL);
    if (r < 0 && errno == EINTR) continue;
    check_sys(r, fmt::format("waitpid tid {} ({})", tid_, step));
    break;
  }
  if (!WIFSTOPPED(st)) {
    attached_ = false;  // a dead tracee is detached by the kernel
    fail("injecting into tid {} ({}): target {}", tid_, step, describe_status(st));
  }
  return st;
}

void Injector::ptrace_call(long ret, const char* what) {
  if (ret >= 0) return;
  int err = errno;
  if (err == ESRCH) {
    // The tracee is no longer in a ptrace stop: usually it was killed. Collect its exit (it is
    // reported to us as tracer) so the message says so.
    for (int i = 0; i < 200; ++i) {
      int st = 0;
      pid_t r = waitpid(tid_, &st, __WALL | WNOHANG);
      if (r == tid_ && !WIFSTOPPED(st)) {
        attached_ = false;
        fail("{} tid {}: target {}", what, tid_, describe_status(st));
      }
      if (r < 0) break;
      usleep(5000);
    }
  }
  throw SysError(err, fmt::format("{} tid {}", what, tid_));
}

void Injector::defer_signal(int sig) {
  if (sig < SIGRTMIN && std::find(pending_sigs_.begin(), pending_sigs_.end(), sig) !=
                            pending_sigs_.end())
    return;  // standard signals do not queue
  pending_sigs_.push_back(sig);
  log::debug("injector", "tid {}: deferring signal {} until detach", tid_, sig);
}

void Injector::find_syscall_insn() {
  auto maps = read_maps(tid_);
  std::string mem_path = fmt::format("/proc/{}/mem", tid_);
  UniqueFd mem(check_sys(::open(mem_path.c_str(), O_RDONLY | O_CLOEXEC), "open " + mem_path,
                         "run as root"));
  // [vdso] always contains the fallback `syscall` of its time functions; any other executable
  // mapping is a last resort (e.g. a kernel booted with vdso=0).
  for (int pass = 0; pass < 2; ++pass) {
    for (const auto& m : maps) {
      if (m.perms.size() < 3 || m.perms[2] != 'x' || m.path == "[vsyscall]") continue;
      if ((pass == 0) != (m.path == "[vdso]")) continue;
      std::vector<uint8_t> buf(std::min<uint64_t>(m.end - m.start, 1 << 20));
      ssize_t n = pread(mem.get(), buf.data(), buf.size(), static_cast<off_t>(m.start));
      if (n < 2) continue;
      for (ssize_t i = 0; i + 1 < n; ++i) {
        if (buf[i] == 0x0f && buf[i + 1] == 0x05) {
          syscall_ip_ = m.start + static_cast<uint64_t>(i);
          return;
        }
      }
    }
  }
  fail("injecting into tid {}: no `syscall` instruction found in its [vdso] or executable "
       "mappings; cannot inject",
       tid_);
}

long Injector::syscall(long nr, uint64_t a1, uint64_t a2, uint64_t a3, uint64_t a4, uint64_t a5,
                       uint64_t a6) {
  if (!attached_) fail("inject syscall {} into tid {}: not attached", nr, tid_);
  user_regs_struct r = saved_;
  r.rip = syscall_ip_;
  r.rax = static_cast<uint64_t>(nr);
  // Not "inside a syscall": keeps the kernel's -ERESTART* rewind of the interrupted syscall
  // (if the thread was stopped in one) from touching our RIP/RAX.
  r.orig_rax = static_cast<uint64_t>(-1);
  r.rdi = a1;
  r.rsi = a2;
  r.rdx = a3;
  r.r10 = a4;
  r.r8 = a5;
  r.r9 = a6;
  r.rsp = scratch_ - kRedZone;  // nothing is pushed by `syscall`, but keep scratch untouched
  ptrace_call(ptrace(PTRACE_SETREGS, tid_, nullptr, &r), "PTRACE_SETREGS");
  for (unsigned i = 0; i < kMaxStepAttempts; ++i) {
    ptrace_call(ptrace(PTRACE_SINGLESTEP, tid_, nullptr, nullptr), "PTRACE_SINGLESTEP");
    int st = wait_stop("single-step over syscall");
    user_regs_struct o{};
    ptrace_call(ptrace(PTRACE_GETREGS, tid_, nullptr, &o), "PTRACE_GETREGS");
    const int event = st >> 16;
    const int sig = WSTOPSIG(st);
    const long rax = static_cast<long>(o.rax);
    if (o.rip == syscall_ip_ + 2 && event == 0 && sig == SIGTRAP) return rax;
    if (event == 0 && sig != SIGTRAP) {
      // Signal-delivery stop: suppress now, re-deliver at detach. If the syscall already ran
      // and completed, its result is final; if it was interrupted, resuming without the signal
      // lets the kernel restart it.
      defer_signal(sig);
      if (o.rip == syscall_ip_ + 2 && !is_restart_code(rax)) return rax;
    } else if (o.rip != syscall_ip_ && o.rip != syscall_ip_ + 2) {
      fail("inject syscall {} into tid {}: thread stopped at unexpected rip {:#x} (expected "
           "{:#x}); target state unknown",
           nr, tid_, o.rip, syscall_ip_ + 2);
    }
    // Otherwise (interrupt or group stop, or stop before the instruction) keep stepping.
  }
  fail("inject syscall {} into tid {}: no completion after {} single-steps", nr, tid_,
       kMaxStepAttempts);
}

void Injector::write_mem(uint64_t addr, std::span<const std::byte> data) {
  iovec local{const_cast<std::byte*>(data.data()), data.size()};
  iovec remote{reinterpret_cast<void*>(addr), data.size()};
  ssize_t n = process_vm_writev(tid_, &local, 1, &remote, 1, 0);
  check_sys(n, fmt::format("process_vm_writev {} bytes at {:#x} in tid {}", data.size(), addr, tid_));
  if (static_cast<size_t>(n) != data.size())
    fail("process_vm_writev at {:#x} in tid {}: wrote {} of {} bytes (address not mapped?)", addr,
         tid_, n, data.size());
}

void Injector::read_mem(uint64_t addr, std::span<std::byte> out) {
  iovec local{out.data(), out.size()};
  iovec remote{reinterpret_cast<void*>(addr), out.size()};
  ssize_t n = process_vm_readv(tid_, &local, 1, &remote, 1, 0);
  check_sys(n, fmt::format("process_vm_readv {} bytes at {:#x} in tid {}", out.size(), addr, tid_));
  if (static_cast<size_t>(n) != out.size())
    fail("process_vm_readv at {:#x} in tid {}: read {} of {} bytes (address not mapped?)", addr,
         tid_, n, out.size());
}

void Injector::detach() {
  if (!attached_) return;
  attached_ = false;
  ptrace_call(ptrace(PTRACE_SETREGS, tid_, nullptr, &saved_), "PTRACE_SETREGS (restore)");
  int first = pending_sigs_.empty() ? 0 : pending_sigs_.front();
  ptrace_call(ptrace(PTRACE_DETACH, tid_, nullptr, reinterpret_cast<void*>(static_cast<long>(first))),
              "PTRACE_DETACH");
  if (pending_sigs_.size() > 1) {
    pid_t group = tid_;
    std::ifstream f(fmt::format("/proc/{}/status", tid_));
    std::string line;
    while (std::getline(f, line))
      if (line.rfind("Tgid:", 0) == 0) group = static_cast<pid_t>(std::stol(line.substr(5)));
    for (size_t i = 1; i < pending_sigs_.size(); ++i)
      if (::syscall(SYS_tgkill, group, tid_, pending_sigs_[i]) < 0)
        log::warn("injector", "re-delivering signal {} to tid {}: {} (signal lost)",
                  pending_sigs_[i], tid_, std::strerror(errno));
  }
  pending_sigs_.clear();
}

int inject_userfaultfd(pid_t pid) {
  Injector inj(pid);
  long tfd = inj.syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
  if (tfd == -EPERM) {
    // vm.unprivileged_userfaultfd=0 and the target lacks CAP_SYS_PTRACE (e.g. QEMU under
    // libvirt). User-mode-only is enough: WP-async faults are resolved without the uffd's
    // fault handling, for kernel-mode writes too.
    tfd = inj.syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK | uapi::kUffdUserModeOnly);
  }
  if (tfd < 0)
    fail("userfaultfd() inside pid {}: {} (needs a kernel with CONFIG_USERFAULTFD; for an "
         "unprivileged target set vm.unprivileged_userfaultfd=1)",
         pid, std::strerror(static_cast<int>(-tfd)));
  int ours = -1, getfd_err = 0;
  std::string getfd_what;
  int pidfd = static_cast<int>(::syscall(SYS_pidfd_open, pid, 0));
  if (pidfd < 0) {
    getfd_err = errno;
    getfd_what = fmt::format("pidfd_open pid {}", pid);
  } else {
    ours = static_cast<int>(::syscall(SYS_pidfd_getfd, pidfd, static_cast<int>(tfd), 0));
    if (ours < 0) {
      getfd_err = errno;
      getfd_what = fmt::format("pidfd_getfd fd {} of pid {}", tfd, pid);
    }
    ::close(pidfd);
  }
  UniqueFd guard(ours);
  long rc = inj.syscall(SYS_close, static_cast<uint64_t>(tfd));
  if (rc < 0)
    fail("close(fd {}) inside pid {}: {} (the target keeps a stray userfaultfd)", tfd, pid,
         std::strerror(static_cast<int>(-rc)));
  inj.detach();
  if (!guard) throw SysError(getfd_err, getfd_what, "needs Linux >= 5.6 and CAP_SYS_PTRACE");
  return guard.release();
}

}  // namespace ftvm::vmm
