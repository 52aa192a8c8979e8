// FenceCommandArbiter: STONITH through a command the site configures (a fence agent from
// Debian's fence-agents, sbd, or the site's own script), the way DRBD's fence-peer handler and
// Pacemaker's stonith devices work: before one side runs the VM alone, it has the other side
// fenced, and only a fence that reported success lets it go ahead.
//
// The command runs as `/bin/sh -c COMMAND` with
//   FTVM_FENCE_ACTION  fence-primary (standby, before resuming a twin on silence) or
//                      fence-standby (primary, before running on alone)
//   FTVM_PEER          the other side's host (its replication address)
//   FTVM_VM            the VM's name
// and must exit 0 only once the other side can no longer run the VM (host powered off, its
// QEMU killed, its storage cut off). Any other exit status, a signal, or a run longer than
// `timeout` means "not fenced": the question is answered Wait and the command runs again on
// the next question (at most once per `retry` interval). Its output goes to ftd's log.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <map>
#include <memory>
#include <mutex>
#include <string>

#include "checkpoint/arbiter.h"

namespace ftvm::ftd {

class FenceCommandArbiter final : public checkpoint::Arbiter {
 public:
  FenceCommandArbiter(std::string command, std::chrono::milliseconds timeout, std::chrono::milliseconds retry);
  ~FenceCommandArbiter() override;

  std::string kind() const override { return "fence-command"; }
  checkpoint::ArbiterAnswer may_activate(const checkpoint::ArbiterSubject& s, std::chrono::milliseconds budget) override;
  checkpoint::ArbiterAnswer may_run_alone(const checkpoint::ArbiterSubject& s, std::chrono::milliseconds budget) override;
  checkpoint::ArbiterStatus status() const override;

 private:
  struct Run {
    pid_t pid = -1;
    int out = -1;  // read end of the command's stdout+stderr
    std::string output;
    std::chrono::steady_clock::time_point started, finished;
    bool done = false;
    bool fenced = false;
  };
  checkpoint::ArbiterAnswer ask(const char* action, const checkpoint::ArbiterSubject& s,
                                std::chrono::milliseconds budget);
  void start(Run& r, const char* action, const checkpoint::ArbiterSubject& s);
  void reap(Run& r, const std::string& key, bool block_until_deadline, std::chrono::steady_clock::time_point deadline);

  const std::string command_;
  const std::chrono::milliseconds timeout_, retry_;
  mutable std::mutex mu_;
  std::map<std::string, Run> runs_;  // by "action vm peer"
  std::string last_;                 // last result, for status
  double last_ok_wall_ms_ = 0;
};

}  // namespace ftvm::ftd
