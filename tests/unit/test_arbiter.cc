// Arbiters (checkpoint/arbiter.h): the no-arbiter policy and the fence-command arbiter, with a
// real /bin/sh command.
#include <catch2/catch.hpp>

#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <fstream>
#include <string>
#include <thread>

#include "checkpoint/arbiter.h"
#include "tools/ftd/arbiter/fence_command.h"

using namespace std::chrono_literals;
using ftvm::checkpoint::ArbiterAnswer;
using ftvm::checkpoint::ArbiterSubject;

namespace {
std::string tmpdir() {
  char t[] = "/tmp/ftvm-arbiter.XXXXXX";
  REQUIRE(::mkdtemp(t) != nullptr);
  return t;
}
std::string slurp(const std::string& p) {
  std::ifstream f(p);
  return std::string((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
}
ArbiterAnswer ask_until_decided(ftvm::checkpoint::Arbiter& a, bool standby, const ArbiterSubject& s,
                                std::chrono::milliseconds limit) {
  auto end = std::chrono::steady_clock::now() + limit;
  for (;;) {
    auto r = standby ? a.may_activate(s, 50ms) : a.may_run_alone(s, 50ms);
    if (r != ArbiterAnswer::Wait || std::chrono::steady_clock::now() > end) return r;
    std::this_thread::sleep_for(10ms);
  }
}
}  // namespace

TEST_CASE("no arbiter: the standby activates on silence, the primary runs alone only after twice the standby's timeout",
          "[arbiter]") {
  auto a = ftvm::checkpoint::make_no_arbiter(500ms);
  REQUIRE(a->kind() == "none");
  REQUIRE(a->may_activate({"vm", "h", 400ms, 400ms}, 0ms) == ArbiterAnswer::Yes);
  REQUIRE(a->may_run_alone({"vm", "h", 499ms, 100ms}, 0ms) == ArbiterAnswer::Wait);
  REQUIRE(a->may_run_alone({"vm", "h", 500ms, 100ms}, 0ms) == ArbiterAnswer::Yes);
  // A standby with a long timeout: never before twice that timeout.
  REQUIRE(a->may_run_alone({"vm", "h", 1500ms, 1000ms}, 0ms) == ArbiterAnswer::Wait);
  REQUIRE(a->may_run_alone({"vm", "h", 2000ms, 1000ms}, 0ms) == ArbiterAnswer::Yes);
  REQUIRE(a->status().holds.find("split-brain unprotected") != std::string::npos);
}

TEST_CASE("fence-command arbiter: Yes only after the command reports the peer fenced", "[arbiter]") {
  const auto d = tmpdir();
  const std::string log = d + "/calls";
  // Fails twice, then succeeds; records its environment.
  const std::string cmd = "echo \"$FTVM_FENCE_ACTION $FTVM_PEER $FTVM_VM\" >> " + log +
                          "; n=$(wc -l < " + log + "); [ \"$n\" -ge 3 ]";
  ftvm::ftd::FenceCommandArbiter a(cmd, 5000ms, 0ms);
  REQUIRE(a.kind() == "fence-command");
  ArbiterSubject s{"vm1", "10.0.0.2", 1000ms, 400ms};
  REQUIRE(ask_until_decided(a, true, s, 10s) == ArbiterAnswer::Yes);
  const auto calls = slurp(log);
  REQUIRE(calls == "fence-primary 10.0.0.2 vm1\nfence-primary 10.0.0.2 vm1\nfence-primary 10.0.0.2 vm1\n");
  REQUIRE(a.status().holds.find("fenced") != std::string::npos);
  // The success was consumed: the next episode fences again (and succeeds: n >= 3).
  REQUIRE(ask_until_decided(a, false, s, 10s) == ArbiterAnswer::Yes);
  REQUIRE(slurp(log).find("fence-standby 10.0.0.2 vm1") != std::string::npos);
  std::system(("rm -rf " + d).c_str());
}

TEST_CASE("fence-command arbiter: a failing or hanging command never says Yes", "[arbiter]") {
  SECTION("always failing") {
    ftvm::ftd::FenceCommandArbiter a("echo cannot reach the PDU; exit 1", 5000ms, 0ms);
    REQUIRE(ask_until_decided(a, true, {"vm1", "h", 1000ms, 400ms}, 500ms) == ArbiterAnswer::Wait);
    REQUIRE(a.status().holds.find("NOT fenced") != std::string::npos);
    REQUIRE(a.status().holds.find("cannot reach the PDU") != std::string::npos);
  }
  SECTION("hangs past its timeout: killed, not fenced") {
    ftvm::ftd::FenceCommandArbiter a("sleep 30", 200ms, 0ms);
    const auto t0 = std::chrono::steady_clock::now();
    REQUIRE(ask_until_decided(a, false, {"vm1", "h", 1000ms, 400ms}, 700ms) == ArbiterAnswer::Wait);
    REQUIRE(std::chrono::steady_clock::now() - t0 < 5s);
    REQUIRE(a.status().holds.find("NOT fenced") != std::string::npos);
  }
  SECTION("an empty command is refused") {
    REQUIRE_THROWS(ftvm::ftd::FenceCommandArbiter("", 1000ms, 0ms));
  }
}
