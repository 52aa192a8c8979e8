// SoftDirtyTracker against the same full-memory diff oracle as the uffd-wp tracker. Needs a
// kernel with CONFIG_MEM_SOFT_DIRTY: the host's 6.18 has none, Debian's generic 6.1 has it, so
// CTest runs these inside the RDMA lab guest (label `rdma`, see tests/rdma-lab/). On a kernel
// without it they report the reason and are skipped.
#include <catch2/catch.hpp>

#include <chrono>

#include "common/error.h"
#include "tests/unit/tracker_oracle.h"
#include "vmm-glue/soft_dirty_tracker.h"

using ftvm::testing::MemTarget;
using ftvm::vmm::SoftDirtyTracker;

namespace {
bool soft_dirty_here() {
  std::string why;
  if (SoftDirtyTracker::supported(&why)) return true;
  WARN("soft-dirty not available on this kernel, test skipped (runs in the lab guest): " << why);
  return false;
}
}  // namespace

TEST_CASE("soft-dirty tracker is exact against a full-memory diff", "[softdirty]") {
  if (!soft_dirty_here()) return;
  for (bool sparse : {false, true}) {
    MemTarget::Options o;
    o.size = 32 << 20;
    o.sparse = sparse;
    o.prefault = !sparse;
    MemTarget t(o);
    SoftDirtyTracker tr(t.pid(), t.addr(), t.size());
    auto orc = ftvm::testing::run_tracker_exactness(tr, t, 200, sparse ? 77 : 7);
    WARN("soft-dirty exactness, " << (sparse ? "sparse" : "prefaulted") << ", " << orc.epochs
                                  << " epochs: changed " << orc.total_changed << ", reported "
                                  << orc.total_reported << ", false positives " << orc.total_fp
                                  << ", false negatives 0");
  }
}

TEST_CASE("soft-dirty tracker loses no write while the target keeps writing", "[softdirty]") {
  if (!soft_dirty_here()) return;
  MemTarget::Options o;
  o.size = 16 << 20;
  o.prefault = true;
  MemTarget t(o);
  SoftDirtyTracker tr(t.pid(), t.addr(), t.size());
  std::vector<uint64_t> rep;
  tr.collect_and_reset(rep);
  ftvm::testing::Oracle orc(t);
  for (int ep = 0; ep < 100; ++ep) {
    // Writes run concurrently with the collect; the freeze makes read+clear atomic. Every
    // page that differs from the shadow after the writer stopped must be in this report or
    // the next one.
    t.start_running(1000 + static_cast<uint64_t>(ep));
    rep.clear();
    tr.collect_and_reset(rep);
    t.stop_running();
    std::vector<uint64_t> next;
    tr.collect_and_reset(next);
    std::vector<uint64_t> both;
    std::set_union(rep.begin(), rep.end(), next.begin(), next.end(), std::back_inserter(both));
    orc.epoch(both);
  }
  WARN("soft-dirty concurrent: " << orc.epochs << " epochs, changed " << orc.total_changed
                                 << ", false negatives 0");
}

TEST_CASE("soft-dirty tracker reports a dead target clearly", "[softdirty]") {
  if (!soft_dirty_here()) return;
  MemTarget::Options o;
  o.size = 4 << 20;
  MemTarget t(o);
  SoftDirtyTracker tr(t.pid(), t.addr(), t.size());
  std::vector<uint64_t> rep;
  tr.collect_and_reset(rep);
  const pid_t pid = t.pid();
  t.kill();
  REQUIRE_THROWS_WITH(tr.collect_and_reset(rep), Catch::Contains(std::to_string(pid)));
}

TEST_CASE("soft-dirty tracker refuses what it cannot track", "[softdirty][unit]") {
  std::string why;
  if (!SoftDirtyTracker::supported(&why)) {
    // The refusal must say why, naming the kernel feature.
    REQUIRE_THROWS_WITH(SoftDirtyTracker(getpid(), 0x10000, 4096), Catch::Contains("CONFIG_MEM_SOFT_DIRTY"));
    return;
  }
  REQUIRE_THROWS_AS(SoftDirtyTracker(getpid(), 0x1001, 4096), ftvm::Error);
}
