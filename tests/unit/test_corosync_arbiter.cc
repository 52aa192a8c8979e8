// The corosync arbiter's decision table (tools/ftd/arbiter/corosync.h) without a cluster; the
// behaviour against real corosync is tests/cluster/test_corosync_arbiter.py (label arbiter).
#ifdef FTVM_HAVE_COROSYNC
#include <catch2/catch.hpp>

#include "tools/ftd/arbiter/corosync.h"

using namespace ftvm::ftd;
using ftvm::checkpoint::ArbiterAnswer;
using Clock = std::chrono::steady_clock;
using ms = std::chrono::milliseconds;

namespace {
CorosyncView view(bool quorate, std::vector<uint32_t> members, Clock::time_point since, Clock::time_point now) {
  CorosyncView v;
  v.connected = true;
  v.members_known = true;
  v.quorate = quorate;
  v.members = std::move(members);
  v.this_nodeid = 1;
  v.since = since;
  v.confirmed = now;
  return v;
}
constexpr auto A = CorosyncQuestion::Activate;
constexpr auto R = CorosyncQuestion::RunAlone;
}  // namespace

TEST_CASE("corosync arbiter: Yes only when quorate without the peer for the settle margin", "[arbiter]") {
  const auto now = Clock::now();
  const ms settle(1000), stale(1000);
  // peer 2 still a member: never Yes, whatever the age
  CHECK(corosync_answer(A, view(true, {1, 2}, now - ms(5000), now), 2, now, settle, stale) == ArbiterAnswer::Wait);
  CHECK(corosync_answer(R, view(true, {1, 2}, now - ms(5000), now), 2, now, settle, stale) == ArbiterAnswer::Wait);
  // peer gone but the view is younger than the margin: Wait
  CHECK(corosync_answer(A, view(true, {1}, now - ms(999), now), 2, now, settle, stale) == ArbiterAnswer::Wait);
  CHECK(corosync_answer(R, view(true, {1}, now - ms(999), now), 2, now, settle, stale) == ArbiterAnswer::Wait);
  // settled: Yes to both questions
  CHECK(corosync_answer(A, view(true, {1}, now - ms(1000), now), 2, now, settle, stale) == ArbiterAnswer::Yes);
  CHECK(corosync_answer(R, view(true, {1}, now - ms(1000), now), 2, now, settle, stale) == ArbiterAnswer::Yes);
  // the peer unknown (0) or this node itself: Wait
  CHECK(corosync_answer(A, view(true, {1}, now - ms(5000), now), 0, now, settle, stale) == ArbiterAnswer::Wait);
  CHECK(corosync_answer(A, view(true, {1}, now - ms(5000), now), 1, now, settle, stale) == ArbiterAnswer::Wait);
}

TEST_CASE("corosync arbiter: not quorate fences a primary after the margin, never a standby", "[arbiter]") {
  const auto now = Clock::now();
  const ms settle(1000), stale(1000);
  CHECK(corosync_answer(R, view(false, {2}, now - ms(500), now), 1, now, settle, stale) == ArbiterAnswer::Wait);
  CHECK(corosync_answer(R, view(false, {2}, now - ms(1500), now), 1, now, settle, stale) == ArbiterAnswer::Fence);
  CHECK(corosync_answer(A, view(false, {2}, now - ms(1500), now), 1, now, settle, stale) == ArbiterAnswer::Wait);
}

TEST_CASE("corosync arbiter: unreachable, unconfirmed or membership unknown is Wait", "[arbiter]") {
  const auto now = Clock::now();
  const ms settle(0), stale(1000);
  auto v = view(true, {1}, now - ms(5000), now);
  v.connected = false;
  CHECK(corosync_answer(A, v, 2, now, settle, stale) == ArbiterAnswer::Wait);
  CHECK(corosync_answer(R, v, 2, now, settle, stale) == ArbiterAnswer::Wait);
  v = view(false, {1}, now - ms(5000), now - ms(1001));  // stale confirmation: not even Fence
  CHECK(corosync_answer(R, v, 2, now, settle, stale) == ArbiterAnswer::Wait);
  v = view(true, {}, now - ms(5000), now);
  v.members_known = false;  // connected, no membership callback yet
  CHECK(corosync_answer(A, v, 2, now, settle, stale) == ArbiterAnswer::Wait);
}

TEST_CASE("corosync arbiter: the peer's node id from the nodelist", "[arbiter]") {
  std::vector<CorosyncView::Node> nodes{{1, "alpha", {"10.0.0.1", "192.168.5.1"}}, {2, "beta", {"fd00::2"}}};
  CHECK(corosync_find_node(nodes, "10.0.0.1") == 1);
  CHECK(corosync_find_node(nodes, "192.168.5.1") == 1);   // a second link
  CHECK(corosync_find_node(nodes, "::ffff:10.0.0.1") == 1);  // v4-mapped peer address
  CHECK(corosync_find_node(nodes, "[fd00:0::2]") == 2);     // bracketed, another spelling
  CHECK(corosync_find_node(nodes, "beta") == 2);
  CHECK(corosync_find_node(nodes, "10.0.0.3") == 0);
}
#endif
