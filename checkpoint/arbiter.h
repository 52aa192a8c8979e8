// Arbiter: the third party that decides which side may run a protected VM when the primary and
// the standby cannot hear each other (a partition, a dead host, a hung daemon: from one side
// they all look alike). The replication engine asks; an arbiter answers from something both
// sides can reach independently of the replication link — a cluster's quorum (corosync), a
// fencing device (STONITH, a configured command), a lease on shared storage (sanlock).
//
// Contract shared by both questions:
//  * The answer is about *now*. The caller asks again (every few tens of milliseconds) until it
//    gets Yes or Fence, or until it hears the other side again (which ends the question).
//  * A call may block, but not longer than `budget`; an arbiter that cannot decide in time (its
//    daemon unreachable, a fence command still running) answers Wait. Never Yes by default:
//    "cannot tell" is Wait.
//  * Implementations are thread-safe: sessions of different VMs ask concurrently.
//  * The safety argument (docs/ARCHITECTURE.md, "Split brain"): the standby resumes a twin on
//    silence only after may_activate() said Yes; the primary resumes its guest and releases
//    output while the standby is unreachable only after may_run_alone() said Yes; an arbiter
//    never says Yes to both sides of one partition (quorum: only one partition is quorate; a
//    fence: the loser is dead; a lease: one holder).
#pragma once

#include <chrono>
#include <memory>
#include <string>

namespace ftvm::checkpoint {

enum class ArbiterAnswer {
  Invalid = 0,
  Yes = 1,    // go ahead: the other side is dead, fenced or outside this (quorate) partition
  Wait = 2,   // undecided (membership changing, arbiter unreachable, fence still running)
  Fence = 3,  // this side lost (quorum or lease gone): it must fence its own copy
};
const char* to_string(ArbiterAnswer a);

// What a question is about.
struct ArbiterSubject {
  std::string vm;         // the VM's name
  std::string peer_host;  // the other side's replication address (host part)
  std::chrono::milliseconds silent_for{0};  // how long the other side has not been heard
  std::chrono::milliseconds peer_timeout{0};  // the other side's heartbeat timeout (0 = unknown)
  int guest_pid = 0;  // this side's copy of the guest: the primary's QEMU, the standby's twin (0 = unknown)
  // may_activate only: the standby's own heartbeat timeout T (0 = unknown), and whether an
  // operator asserts that the primary is gone (`ftctl failover --force`).
  std::chrono::milliseconds heartbeat_timeout{0};
  bool forced = false;
};

// For `ftctl status`: which arbiter, what it holds, when it last confirmed it.
struct ArbiterStatus {
  std::string kind;     // "none", "fence-command", "corosync", "sanlock"
  std::string holds;    // e.g. "quorate (3 votes, members 1 2)", "nothing (split-brain unprotected)"
  bool healthy = false;  // reachable and (for quorum) quorate
  double last_confirmed_wall_ms = 0;  // unix ms of the last successful check; 0 = never
};

class Arbiter {
 public:
  virtual ~Arbiter() = default;

  // Short identifier ("none", "fence-command", "corosync"): sent in OpenSession so that both
  // sides of a VM use the same kind, shown in status.
  virtual std::string kind() const = 0;

  // Standby: the primary of `s.vm` has been silent on every path for at least the heartbeat
  // timeout. Yes: the twin may be resumed (the primary is dead, fenced, or outside this side's
  // quorate partition). Wait: not yet (ask again). Fence: this side lost: never resume the
  // twin for this silence (the caller drops it).
  virtual ArbiterAnswer may_activate(const ArbiterSubject& s, std::chrono::milliseconds budget) = 0;

  // Primary: the standby of `s.vm` cannot be reached (no answer to Resolve) and the guest is
  // paused with its output held. Yes: this side may run the VM alone (resume, release output).
  // Wait: keep the guest paused and ask again. Fence: this side lost: kill the guest here
  // (the standby resumes it).
  virtual ArbiterAnswer may_run_alone(const ArbiterSubject& s, std::chrono::milliseconds budget) = 0;

  // This side runs (or is about to run) `s.vm` as `s.guest_pid`: take what the running side must
  // hold (a lease arbiter: the VM's lease). Called by the primary when protection starts, with
  // a budget: throws Error saying why when this side cannot hold it in that time (protection
  // is then refused). Called by the standby when its twin is activated without asking
  // may_activate (a planned failover, PrimaryLost), with a zero budget: starts taking it and
  // returns at once. The default (arbiters with nothing to hold) does nothing.
  virtual void runs_here(const ArbiterSubject& s, std::chrono::milliseconds budget) {
    (void)s;
    (void)budget;
  }

  virtual ArbiterStatus status() const = 0;
};

// The arbiter of a pair without a third party. The primary runs on alone once the standby has
// been unreachable for `alone_after` and for twice the standby's heartbeat timeout T, whichever
// is longer. The standby activates on silence at once, but only while the silence it measured
// is below 1.5 T (`s.heartbeat_timeout`): a standby that was itself stopped or starved for
// longer (SIGSTOP, a frozen host) cannot tell whether the primary has meanwhile run on alone
// (from 2 T on, after its Resolve found nobody answering), so it answers Fence and the twin is
// dropped (found by the deterministic simulation, tests/simulation: two copies after a standby
// ftd stall of 2 T or more). An operator's force (`s.forced`) is always Yes: with no third party
// the operator is the arbiter. A partition between two live hosts still runs two copies:
// status says "split-brain unprotected" and `ftctl enable` warns. A connection reset or a stall
// with both hosts up never does: the primary's Resolve settles that (protocol.h).
std::unique_ptr<Arbiter> make_no_arbiter(std::chrono::milliseconds alone_after);

}  // namespace ftvm::checkpoint
