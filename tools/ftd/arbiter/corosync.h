// CorosyncArbiter: split-brain arbitration by the quorum of a corosync 3 cluster (votequorum,
// normally two nodes plus a corosync-qnetd quorum device on a third host). Only one partition
// of a cluster can be quorate, so "this node is quorate and the peer's node is not in its
// membership" is something at most one side of a partition can hold.
//
// A background thread keeps a libquorum tracking connection to the local corosync
// (quorum_initialize, quorum_trackstart(CS_TRACK_CURRENT|CS_TRACK_CHANGES), quorum_fd_get +
// poll + quorum_dispatch) and confirms it every `confirm_period` with quorum_getquorate; a
// dispatch or query error (corosync stopped or restarted) drops the view ("not connected") and
// the thread reconnects. It also reads the nodelist (nodelist.node.N.{nodeid,name,ringK_addr})
// and this node's id through libcmap at each (re)connection, and the vote counts through
// libvotequorum. Questions are answered from that cached view: they never block on corosync.
//
// Answers (see corosync_answer(); docs/ARCHITECTURE.md "Corosync arbiter"):
//   * Yes   : connected, confirmed recently, quorate, the peer's node is not a member, and this
//             (quorate, members) view has held for `settle` (the safety margin: libquorum may
//             report the new membership on the winner before the loser has been told it lost).
//   * Fence : may_run_alone only: connected and this node has been NOT quorate for `settle`:
//             this side lost and the primary must kill its own copy.
//   * Wait  : everything else: corosync unreachable or not confirmed for `stale_after`, the
//             peer still a member, the view younger than `settle`, the peer's node id unknown.
//             may_activate never answers Fence (a standby that lost only keeps waiting; its
//             twin stays ready for when the partition heals).
//
// The peer's node id: `peer_nodeid` when non-zero (every session of this ftd then has its
// standby/primary on that node), otherwise the nodelist entry whose name or any ringK_addr
// equals the subject's peer_host (the other side's replication address; compared as IP
// addresses when both parse, else as strings).
#pragma once

#include <chrono>
#include <cstdint>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "checkpoint/arbiter.h"

namespace ftvm::ftd {

// What the tracking thread knows. `since` is when (connected, quorate, members) last changed.
struct CorosyncView {
  bool connected = false;      // a tracking connection to corosync is up
  bool members_known = false;  // a membership callback has arrived on this connection
  bool quorate = false;
  std::vector<uint32_t> members;  // node ids of the current membership (sorted)
  uint32_t this_nodeid = 0;       // 0 = unknown
  uint32_t total_votes = 0, expected_votes = 0, quorum = 0;  // 0 = unknown
  std::chrono::steady_clock::time_point since{};      // start of the current state
  std::chrono::steady_clock::time_point confirmed{};  // last successful query of corosync
  double confirmed_wall_ms = 0;                       // the same, unix ms (status)
  struct Node {
    uint32_t nodeid = 0;
    std::string name;
    std::vector<std::string> addrs;  // ring0_addr .. ring7_addr that are set
  };
  std::vector<Node> nodelist;
  std::string error;  // why not connected (for status and logs)
};

enum class CorosyncQuestion { Activate, RunAlone };

// The decision, pure (unit-tested): see the header comment. `peer` 0 = unknown.
checkpoint::ArbiterAnswer corosync_answer(CorosyncQuestion q, const CorosyncView& v, uint32_t peer,
                                          std::chrono::steady_clock::time_point now, std::chrono::milliseconds settle,
                                          std::chrono::milliseconds stale_after);

// The node whose name or ring address is `host` (0 = none). `host` may be "[v6]" bracketed.
uint32_t corosync_find_node(const std::vector<CorosyncView::Node>& nodes, const std::string& host);

class CorosyncArbiter final : public checkpoint::Arbiter {
 public:
  // peer_nodeid: 0 = resolve through the nodelist. settle: the safety margin (>= 0). Starts the
  // tracking thread (all signals blocked in it). The destructor stops and joins it; a corosync
  // that hangs inside an IPC call (not seen; libqb replies or fails) would delay that join.
  CorosyncArbiter(uint32_t peer_nodeid, std::chrono::milliseconds settle,
                  std::chrono::milliseconds confirm_period = std::chrono::milliseconds(200));
  ~CorosyncArbiter() override;
  CorosyncArbiter(const CorosyncArbiter&) = delete;
  CorosyncArbiter& operator=(const CorosyncArbiter&) = delete;

  std::string kind() const override { return "corosync"; }
  checkpoint::ArbiterAnswer may_activate(const checkpoint::ArbiterSubject& s, std::chrono::milliseconds budget) override;
  checkpoint::ArbiterAnswer may_run_alone(const checkpoint::ArbiterSubject& s, std::chrono::milliseconds budget) override;
  checkpoint::ArbiterStatus status() const override;

  // A copy of the current view (tools, tests).
  CorosyncView view() const;
  // The peer's node id for `peer_host` (the flag, else the nodelist; 0 = unknown).
  uint32_t peer_of(const std::string& peer_host) const;

  // Called from the libquorum callback (internal; public for the C callback trampoline).
  void on_membership(bool quorate, const uint32_t* ids, size_t n);

 private:
  checkpoint::ArbiterAnswer ask(CorosyncQuestion q, const checkpoint::ArbiterSubject& s);
  void run();                        // the tracking thread
  bool track_once();                 // one connection's lifetime; false = stop requested
  void set_disconnected(const std::string& why);
  void set_quorate(bool q);          // from a confirmation
  void sleep_or_stop(std::chrono::milliseconds d);

  const uint32_t peer_nodeid_;
  const std::chrono::milliseconds settle_, confirm_period_, stale_after_;
  mutable std::mutex mu_;
  CorosyncView view_;
  std::string last_logged_;  // last state line written to the log
  int wake_fd_ = -1;         // eventfd: the destructor wakes the thread
  bool stop_ = false;
  std::thread thread_;
};

}  // namespace ftvm::ftd
