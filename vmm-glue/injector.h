// Injector: runs system calls inside another process (x86-64 Linux), as CRIU's parasite-free
// mode does: PTRACE_SEIZE + PTRACE_INTERRUPT one thread, point RIP at a `syscall` instruction
// found in the target's [vdso], single-step, read RAX, restore registers, detach.
//
// Contract: while an Injector is attached, the chosen thread is stopped; other threads of the
// target keep running. Registers are restored exactly and signals that arrived meanwhile are
// re-delivered on detach. The destructor detaches if still attached. Errors throw ftvm::Error
// naming the target pid and step ("PTRACE_SEIZE pid 123: Operation not permitted (run as root
// or set kernel.yama.ptrace_scope=0)").
#pragma once

#include <sys/types.h>
#include <sys/user.h>

#include <cstdint>
#include <span>

namespace ftvm::vmm {

class Injector {
 public:
  explicit Injector(pid_t tid);
  ~Injector();
  Injector(const Injector&) = delete;
  Injector& operator=(const Injector&) = delete;

  // Runs syscall `nr` in the target; returns its raw result (negative errno on failure).
  long syscall(long nr, uint64_t a1 = 0, uint64_t a2 = 0, uint64_t a3 = 0, uint64_t a4 = 0,
               uint64_t a5 = 0, uint64_t a6 = 0);
  // Scratch memory in the target (on its stack below the red zone), for syscall arguments.
  uint64_t scratch_addr() const { return scratch_; }
  void write_mem(uint64_t addr, std::span<const std::byte> data);
  void read_mem(uint64_t addr, std::span<std::byte> out);
  void detach();

 private:
  pid_t tid_;
  bool attached_ = false;
  user_regs_struct saved_{};
  uint64_t syscall_ip_ = 0, scratch_ = 0;
  int pending_sig_ = 0;
};

// Creates a userfaultfd inside process `pid` (flags O_CLOEXEC|O_NONBLOCK), copies it into this
// process with pidfd_getfd, closes the target's copy, and returns ours.
int inject_userfaultfd(pid_t pid);

}  // namespace ftvm::vmm
