// Guard: a small process per protected VM that outlives ftd and fences the primary guest when
// ftd dies while the standby may take over (the "no split brain" invariant).
//
// Contract: start() forks a child that holds a pidfd on the QEMU process and the read end of
// a pipe whose only write end stays in ftd. ftd tells it arm()/disarm(). When the pipe reaches
// EOF (ftd exited or was killed) and the last word was "armed", the guard SIGKILLs QEMU
// through its pidfd (no PID-reuse race) and exits; disarmed, it exits quietly. It also exits
// when QEMU exits. The guard reacts within milliseconds, well under the standby's heartbeat
// timeout, so the twin never resumes while the primary guest still runs. stop() disarms and
// reaps it. The guard uses only async-signal-safe calls after fork().
//
// Watchdog: arm(W) also makes the guard kill QEMU when ftd, though alive, sends no ping() for
// W (ftd hung, stopped with SIGSTOP, starved): such an ftd sends no heartbeats either, so the
// standby resumes the twin after its timeout; W is chosen below that timeout. Words on the pipe:
// 'A' + 4 bytes little-endian W in ms (0 = no watchdog), 'D' disarm, 'P' ping.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <string>

#include "common/fd.h"

namespace ftvm::ftd {

class Guard {
 public:
  Guard(pid_t qemu_pid, const char* vm_name);
  ~Guard();
  Guard(const Guard&) = delete;
  Guard& operator=(const Guard&) = delete;

  // Armed: the guard fences QEMU if ftd dies, or stops pinging for `watchdog` (0 = never).
  void arm(std::chrono::milliseconds watchdog = std::chrono::milliseconds(0));
  void disarm();
  // Proof of life for the watchdog; cheap (one byte on a pipe). Call at least every watchdog/4.
  void ping();
  pid_t pid() const { return pid_; }
  // How many times the guard process died and was replaced (status).
  unsigned respawns() const { return respawns_; }

 private:
  // Forks the guard process (constructor, and again when it died: a write to it fails with
  // EPIPE; the new one gets the current armed state and watchdog before anything else).
  void spawn();
  void say(const char* bytes, size_t n);
  pid_t qemu_pid_ = -1;
  std::string vm_name_;
  bool armed_ = false;
  uint32_t watchdog_ms_ = 0;
  unsigned respawns_ = 0;
  pid_t pid_ = -1;
  UniqueFd ctl_;
  UniqueFd pidfd_;  // ftd's own pidfd on the guard, for reaping without races
};

}  // namespace ftvm::ftd
