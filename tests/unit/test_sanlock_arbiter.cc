// The sanlock arbiter's pure parts (tools/ftd/arbiter/sanlock.h) without a sanlock daemon: the
// answer table, the slot layout and the resource strings. The behaviour against real sanlock
// daemons is tests/e2e/test_sanlock_arbiter.py (labels arbiter, split-brain).
#ifdef FTVM_HAVE_SANLOCK
#include <catch2/catch.hpp>

#include <set>

#include "tools/ftd/arbiter/sanlock.h"

using namespace ftvm::ftd;
using ftvm::checkpoint::ArbiterAnswer;

TEST_CASE("sanlock arbiter: Yes only while the lease is held; never Yes by default", "[arbiter]") {
  for (auto q : {SanlockQuestion::Activate, SanlockQuestion::RunAlone}) {
    CHECK(sanlock_answer(q, KeeperState::Held) == ArbiterAnswer::Yes);
    for (auto s : {KeeperState::Invalid, KeeperState::None, KeeperState::Acquiring, KeeperState::Lost,
                   KeeperState::Released})
      CHECK(sanlock_answer(q, s) != ArbiterAnswer::Yes);
  }
}

TEST_CASE("sanlock arbiter: a standby waits, a primary without its lease fences", "[arbiter]") {
  for (auto s : {KeeperState::Invalid, KeeperState::None, KeeperState::Acquiring, KeeperState::Lost,
                 KeeperState::Released})
    CHECK(sanlock_answer(SanlockQuestion::Activate, s) == ArbiterAnswer::Wait);
  CHECK(sanlock_answer(SanlockQuestion::RunAlone, KeeperState::Lost) == ArbiterAnswer::Fence);
  CHECK(sanlock_answer(SanlockQuestion::RunAlone, KeeperState::Released) == ArbiterAnswer::Fence);
  CHECK(sanlock_answer(SanlockQuestion::RunAlone, KeeperState::None) == ArbiterAnswer::Fence);
  CHECK(sanlock_answer(SanlockQuestion::RunAlone, KeeperState::Acquiring) == ArbiterAnswer::Wait);
  CHECK(sanlock_answer(SanlockQuestion::RunAlone, KeeperState::Invalid) == ArbiterAnswer::Wait);
}

TEST_CASE("sanlock arbiter: slots from the area size, one per MiB after the lockspace", "[arbiter]") {
  CHECK(sanlock_slots(0) == 0);
  CHECK(sanlock_slots((2u << 20) - 1) == 0);
  CHECK(sanlock_slots(2u << 20) == 1);
  CHECK(sanlock_slots(65u << 20) == 64);
  CHECK(sanlock_slots((65u << 20) + 4095) == 64);
}

TEST_CASE("sanlock arbiter: a VM's slot is the same on both hosts and spread over the area", "[arbiter]") {
  CHECK(sanlock_slot("vm1", 64) == sanlock_slot("vm1", 64));
  CHECK(sanlock_slot("vm1", 64) < 64);
  CHECK(sanlock_slot("anything", 1) == 0);
  CHECK(sanlock_slot("", 7) < 7);
  std::set<uint32_t> used;
  for (int i = 0; i < 16; ++i) used.insert(sanlock_slot("vm" + std::to_string(i), 64));
  CHECK(used.size() >= 12);  // FNV-1a spreads similar names
  // The value is part of the on-disk contract between two ftd versions: pin it.
  CHECK(sanlock_slot("vm1", 1u << 31) == (0x511c93a7u % (1u << 31)));
}

TEST_CASE("sanlock arbiter: resource strings name the slot at its offset and escape ':'", "[arbiter]") {
  CHECK(sanlock_resource_string("ftvm", "/dev/sdb", 0) == "ftvm:ftvm-slot-0:/dev/sdb:1048576");
  CHECK(sanlock_resource_string("ls", "/mnt/nfs/lease", 3) == "ls:ftvm-slot-3:/mnt/nfs/lease:4194304");
  CHECK(sanlock_resource_string("ftvm", "/a:b", 1) == "ftvm:ftvm-slot-1:/a\\:b:2097152");
}

TEST_CASE("sanlock arbiter: return codes explain themselves", "[arbiter]") {
  CHECK(sanlock_rc_text(-243).find("another live host") != std::string::npos);
  CHECK(sanlock_rc_text(-223).find("ftvm-sanlock-init") != std::string::npos);
  CHECK(sanlock_rc_text(-12345).find("-12345") != std::string::npos);
}
#endif
