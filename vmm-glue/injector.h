// Injector: runs system calls inside another process (x86-64 Linux), as CRIU's parasite-free
// mode does: PTRACE_SEIZE + PTRACE_INTERRUPT one thread, point RIP at a `syscall` instruction
// found in the target's [vdso], single-step, read RAX, restore registers, detach.
//
// Contract: while an Injector is attached, the chosen thread is stopped; other threads of the
// target keep running. Registers are restored exactly and signals that arrived meanwhile are
// re-delivered on detach (the first with its original siginfo through PTRACE_DETACH, others by
// tgkill; standard signals are coalesced as the kernel would). The destructor detaches if still
// attached and never throws. Errors throw ftvm::Error naming the target and step
// ("PTRACE_SEIZE tid 123: Operation not permitted (run as root or set
// kernel.yama.ptrace_scope=0)"). If the target dies while attached, calls throw an Error saying
// so. Not thread-safe: one Injector is used by one thread (ptrace binds the tracer thread).
#pragma once

#include <sys/types.h>
#include <sys/user.h>

#include <cstdint>
#include <span>
#include <vector>

namespace ftvm::vmm {

class Injector {
 public:
  explicit Injector(pid_t tid);
  ~Injector();
  Injector(const Injector&) = delete;
  Injector& operator=(const Injector&) = delete;

  // Bytes available at scratch_addr().
  static constexpr uint64_t kScratchSize = 4096;

  // Runs syscall `nr` in the target; returns its raw result (negative errno on failure). A
  // syscall interrupted by a signal is restarted by the kernel as usual. Throws if not attached
  // or the target dies.
  long syscall(long nr, uint64_t a1 = 0, uint64_t a2 = 0, uint64_t a3 = 0, uint64_t a4 = 0,
               uint64_t a5 = 0, uint64_t a6 = 0);
  // Scratch memory in the target (kScratchSize bytes on its stack below the red zone, 16-byte
  // aligned), for syscall arguments. Its contents are not restored on detach.
  uint64_t scratch_addr() const { return scratch_; }
  // Whole-buffer copies to/from the target's memory; throw on any short transfer.
  void write_mem(uint64_t addr, std::span<const std::byte> data);
  void read_mem(uint64_t addr, std::span<std::byte> out);
  // Restores registers, detaches, re-delivers deferred signals. Idempotent.
  void detach();

  pid_t tid() const { return tid_; }

 private:
  // Waits for the next stop of tid_; throws if it exited instead. Returns the wait status.
  int wait_stop(const char* step);
  // Throws for a failed ptrace request (ret < 0); when the cause is that the target died, the
  // Error says so and the Injector counts as detached.
  void ptrace_call(long ret, const char* what);
  void defer_signal(int sig);
  void find_syscall_insn();
  void detach_quietly() noexcept;  // detach(), logging instead of throwing

  pid_t tid_;
  bool attached_ = false;
  user_regs_struct saved_{};
  uint64_t syscall_ip_ = 0, scratch_ = 0;
  std::vector<int> pending_sigs_;  // signals suppressed while attached, in arrival order
};

// Creates a userfaultfd inside process `pid` (flags O_CLOEXEC|O_NONBLOCK; when the target may
// not create a full one, retried with UFFD_USER_MODE_ONLY), copies it into this process with
// pidfd_getfd, closes the target's copy, and returns ours (O_CLOEXEC). The target's fd table is
// left as it was, also on failure. Injects into the main thread (tid == pid). The uffd is not
// yet initialised (UFFDIO_API is the caller's). Throws ftvm::Error naming pid and step.
int inject_userfaultfd(pid_t pid);

}  // namespace ftvm::vmm
