// The failover decision rules (checkpoint/failover.h). The deterministic simulation
// (tests/simulation, label "simulation") runs the same rules under random faults; these cases
// pin the individual rules.
#include <catch2/catch.hpp>

#include "checkpoint/arbiter.h"
#include "checkpoint/failover.h"

using namespace std::chrono_literals;
namespace fo = ftvm::checkpoint::failover;
using ftvm::checkpoint::ArbiterAnswer;
using ftvm::checkpoint::Verdict;

TEST_CASE("failover: a fate is settled once, first come (decision or Resolve)", "[failover]") {
  fo::FateCell f;
  bool dropped = false;
  REQUIRE(f.settle(fo::Fate::Activating));
  REQUIRE(f.resolve(dropped) == Verdict::Active);
  REQUIRE_FALSE(dropped);
  REQUIRE_FALSE(f.settle(fo::Fate::Dropped));

  fo::FateCell g;
  REQUIRE(g.resolve(dropped) == Verdict::Dropped);
  REQUIRE(dropped);
  REQUIRE_FALSE(g.settle(fo::Fate::Activating));  // the primary runs on: never resume
  REQUIRE(fo::standby_resume(true, false, false, g) == fo::Resume::Drop);

  fo::FateCell h;
  REQUIRE(h.settle(fo::Fate::Activating));
  h.activation_failed();
  REQUIRE(h.resolve(dropped) == Verdict::Dropped);
}

TEST_CASE("failover: the standby's silence rule", "[failover]") {
  const auto T = 400ms;
  fo::StandbyView v;
  v.session_open = true;
  v.has_checkpoint = true;
  v.silence = 100ms;
  REQUIRE(fo::standby_next(v, T) == fo::StandbyAction::Listen);
  v.silence = 200ms;
  REQUIRE(fo::standby_next(v, T) == fo::StandbyAction::SendSuspect);
  v.suspect_sent = true;
  REQUIRE(fo::standby_next(v, T) == fo::StandbyAction::Listen);
  v.silence = 401ms;
  REQUIRE(fo::standby_next(v, T) == fo::StandbyAction::AskArbiter);
  v.has_checkpoint = false;
  REQUIRE(fo::standby_next(v, T) == fo::StandbyAction::NothingToResume);
  v.has_checkpoint = true;
  v.watched = false;  // this side was stopped: it never asks, it drops
  REQUIRE(fo::standby_next(v, T) == fo::StandbyAction::DropUnwatched);
  v.watched = true;
  // Data path lost: life on the second path means the primary lives.
  v.data_path_up = false;
  v.second_path_idle = 50ms;
  v.since_data_path_lost = 1000ms;
  REQUIRE(fo::standby_next(v, T) == fo::StandbyAction::Listen);
  v.since_data_path_lost = 4001ms;
  REQUIRE(fo::standby_next(v, T) == fo::StandbyAction::DropPrimaryAlive);
  v.second_path_idle = 450ms;
  REQUIRE(fo::standby_next(v, T) == fo::StandbyAction::AskArbiter);
  REQUIRE(fo::standby_on_arbiter(ArbiterAnswer::Wait) == fo::OnSilence::Listen);
  REQUIRE(fo::standby_on_arbiter(ArbiterAnswer::Invalid) == fo::OnSilence::Listen);
  REQUIRE(fo::standby_on_arbiter(ArbiterAnswer::Yes) == fo::OnSilence::DeclareLost);
  REQUIRE(fo::standby_on_arbiter(ArbiterAnswer::Fence) == fo::OnSilence::DropThisSide);
  fo::FateCell f;
  REQUIRE(fo::standby_resume(true, true, false, f) == fo::Resume::WaitForOperator);
  REQUIRE(fo::standby_resume(true, true, true, f) == fo::Resume::Activate);
  REQUIRE(fo::standby_resume(false, false, false, f) == fo::Resume::NothingToResume);
}

TEST_CASE("failover: the primary settles, then runs alone or fences", "[failover]") {
  const auto T = 400ms;
  REQUIRE_FALSE(fo::must_settle(false, false));
  REQUIRE(fo::must_settle(true, false));
  REQUIRE(fo::must_settle(false, true));
  REQUIRE_FALSE(fo::standby_presumed_lost(300ms, T, false));
  REQUIRE_FALSE(fo::standby_presumed_lost(200ms, T, true));
  REQUIRE(fo::standby_presumed_lost(201ms, T, true));
  REQUIRE(fo::primary_on_resolution(Verdict::Active) == fo::Settle::Fence);
  REQUIRE(fo::primary_on_resolution(Verdict::Dropped) == fo::Settle::RunAlone);
  REQUIRE(fo::primary_on_resolution(Verdict::Unknown) == fo::Settle::RunAlone);
  REQUIRE(fo::primary_on_resolution(Verdict::Invalid) == fo::Settle::Retry);
  REQUIRE_FALSE(fo::primary_asks_arbiter(10s, T, true));  // after Activate only the standby's word counts
  REQUIRE_FALSE(fo::primary_asks_arbiter(199ms, T, false));
  REQUIRE(fo::primary_asks_arbiter(200ms, T, false));
  REQUIRE(fo::primary_on_arbiter(ArbiterAnswer::Wait) == fo::Settle::Retry);
  REQUIRE(fo::primary_on_arbiter(ArbiterAnswer::Yes) == fo::Settle::RunAlone);
  REQUIRE(fo::primary_on_arbiter(ArbiterAnswer::Fence) == fo::Settle::Fence);
  REQUIRE(fo::may_release_output(5, 5, false));
  REQUIRE_FALSE(fo::may_release_output(6, 5, false));
  REQUIRE(fo::may_release_output(6, 5, true));
  REQUIRE(fo::guard_watchdog(400ms, 50ms) == 300ms);
  REQUIRE(fo::guard_watchdog(1000ms, 50ms) == 800ms);
  REQUIRE(fo::guard_watchdog(30ms, 50ms) == 20ms);
}

TEST_CASE("no arbiter: a standby that measured 1.5 T of silence or more answers Fence (it may have been stopped "
          "while the primary ran on alone); an operator's force is Yes",
          "[arbiter][failover]") {
  auto a = ftvm::checkpoint::make_no_arbiter(1000ms);
  ftvm::checkpoint::ArbiterSubject s{"vm", "h", 401ms, 0ms};
  s.heartbeat_timeout = 400ms;
  REQUIRE(a->may_activate(s, 0ms) == ArbiterAnswer::Yes);
  s.silent_for = 599ms;
  REQUIRE(a->may_activate(s, 0ms) == ArbiterAnswer::Yes);
  s.silent_for = 600ms;
  REQUIRE(a->may_activate(s, 0ms) == ArbiterAnswer::Fence);
  s.forced = true;
  REQUIRE(a->may_activate(s, 0ms) == ArbiterAnswer::Yes);
}
