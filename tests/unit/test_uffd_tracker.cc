// UffdWpTracker against a full-memory diff oracle: a child writes random pages of a shared
// memory region; the test maps the same memory, keeps a shadow copy, and requires every page
// whose content changed to be reported (zero false negatives), counting false positives.
#include <algorithm>
#include <catch2/catch.hpp>
#include <chrono>
#include <cstring>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include "common/error.h"
#include "tests/unit/tracker_oracle.h"
#include "vmm-glue/uffd_wp_tracker.h"

using ftvm::testing::MemTarget;
using ftvm::testing::Oracle;
using ftvm::testing::run_tracker_exactness;
using ftvm::vmm::UffdWpTracker;

namespace {

constexpr size_t kPage = 4096;

bool tracker_supported() {
  std::string why;
  if (UffdWpTracker::supported(&why)) return true;
  WARN("uffd-wp tracker not supported here, test skipped: " << why);
  return false;
}

uint64_t smaps_pmd_kb(pid_t pid) {
  std::ifstream f("/proc/" + std::to_string(pid) + "/smaps_rollup");
  std::string line;
  uint64_t kb = 0;
  while (std::getline(f, line))
    if (line.rfind("FilePmdMapped:", 0) == 0 || line.rfind("ShmemPmdMapped:", 0) == 0)
      kb += std::strtoull(line.c_str() + line.find(':') + 1, nullptr, 10);
  return kb;
}

void run_exactness(MemTarget& t, int epochs, uint64_t seed) {
  UffdWpTracker tr(t.pid(), t.addr(), t.size());
  Oracle o = run_tracker_exactness(tr, t, epochs, seed);
  WARN("uffd-wp exactness, " << t.size() / (1 << 20) << " MiB, " << o.epochs
                             << " epochs: changed pages " << o.total_changed << ", reported "
                             << o.total_reported << ", false positives " << o.total_fp
                             << ", false negatives 0, THP splits " << tr.thp_splits());
}

}  // namespace

TEST_CASE("uffd-wp tracker is exact against a full-memory diff (memfd, 64 MiB)", "[tracker]") {
  if (!tracker_supported()) return;
  SECTION("unpopulated region, child touches everything it writes") {
    MemTarget t({.size = 64 << 20});
    run_exactness(t, 220, 1000);
  }
  SECTION("populated region with pages the child never touches") {
    MemTarget t({.size = 64 << 20, .prefault = true, .sparse = true});
    run_exactness(t, 220, 2000);
  }
  SECTION("unpopulated sparse region") {
    MemTarget t({.size = 16 << 20, .sparse = true});
    run_exactness(t, 200, 3000);
  }
}

TEST_CASE("uffd-wp tracker is exact with the scan split across threads (issue 17)", "[tracker]") {
  if (!tracker_supported()) return;
  // The same oracle, with the range walked in 4 slices on 4 threads (large guests scan in
  // parallel; the test range is small, so the slices are too). Boundaries fall inside written
  // runs and between them.
  for (uint64_t slice : {uint64_t{2} << 20, uint64_t{16} << 20}) {
    MemTarget t({.size = 64 << 20});
    UffdWpTracker tr(t.pid(), t.addr(), t.size());
    tr.set_scan_slices(slice, 4);
    Oracle o = run_tracker_exactness(tr, t, 150, 4000 + slice);
    WARN("uffd-wp exactness, 4 threads, slices >= " << (slice >> 20) << " MiB: changed " << o.total_changed
                                                     << ", reported " << o.total_reported << ", false negatives 0");
  }
}

TEST_CASE("uffd-wp tracker re-arms atomically while the target writes", "[tracker]") {
  if (!tracker_supported()) return;
  MemTarget t({.size = 16 << 20, .prefault = true});
  UffdWpTracker tr(t.pid(), t.addr(), t.size());
  std::vector<uint64_t> rep;
  tr.collect_and_reset(rep);
  Oracle o(t);
  uint64_t writes = 0, fn_concurrent = 0;
  for (int ep = 0; ep < 200; ++ep) {
    t.start_running(5000 + static_cast<uint64_t>(ep));
    std::this_thread::sleep_for(std::chrono::microseconds(500 + (ep % 7) * 300));
    std::vector<uint64_t> r1;
    tr.collect_and_reset(r1);  // concurrent with the writer
    std::vector<uint8_t> mid(t.view(), t.view() + t.size());  // taken after r1 completed
    writes += t.stop_running();
    std::vector<uint64_t> r2;
    tr.collect_and_reset(r2);
    o.check_format(r1);
    o.check_format(r2);
    // A page that changed after r1 re-armed it (mid -> now) must be in r2.
    auto late = o.changed_since(mid);
    auto fn2 = Oracle::missing(late, r2);
    fn_concurrent += fn2.size();
    INFO("epoch " << ep << ": pages changed after the concurrent scan " << late.size()
                  << ", missing from the next report " << fn2.size());
    REQUIRE(fn2.empty());
    // Everything changed this epoch must be in r1 or r2.
    std::vector<uint64_t> both;
    std::set_union(r1.begin(), r1.end(), r2.begin(), r2.end(), std::back_inserter(both));
    o.epoch(both);
  }
  WARN("uffd-wp concurrent: 200 epochs, " << writes << " child writes, changed pages "
                                          << o.total_changed << ", false positives " << o.total_fp
                                          << ", false negatives " << fn_concurrent);
}

TEST_CASE("uffd-wp tracker splits shmem THP so tracking is 4 KiB exact", "[tracker]") {
  if (!tracker_supported()) return;
  MemTarget t({.size = 32 << 20, .backing = MemTarget::Backing::ThpTmpfs, .prefault = true});
  if (!t.thp_backing_ok()) {
    WARN("no PMD-mapped shmem THP obtainable here (huge=always tmpfs mount failed or the "
         "kernel did not map huge pages); THP split path NOT tested");
    return;
  }
  uint64_t pmd_before = smaps_pmd_kb(t.pid());
  REQUIRE(pmd_before > 0);
  UffdWpTracker tr(t.pid(), t.addr(), t.size());
  std::vector<uint64_t> rep;
  tr.collect_and_reset(rep);
  REQUIRE(rep.size() == t.pages());
  CHECK(smaps_pmd_kb(t.pid()) == 0);  // split by the first collect
  Oracle o(t);
  for (int ep = 0; ep < 200; ++ep) {
    t.write_random(1 + static_cast<uint32_t>(ep % 50), 7000 + static_cast<uint64_t>(ep));
    rep.clear();
    tr.collect_and_reset(rep);
    o.epoch(rep);
  }
  WARN("uffd-wp on shmem THP (" << pmd_before << " KiB PMD-mapped before start): changed "
                                << o.total_changed << ", reported " << o.total_reported
                                << ", false positives " << o.total_fp << ", THP splits "
                                << tr.thp_splits());
  // 4 KiB exact means false positives stay far below one 2 MiB chunk per write.
  CHECK(o.total_fp < o.total_changed);
}

TEST_CASE("uffd-wp tracker throws a clear Error once the target died", "[tracker]") {
  if (!tracker_supported()) return;
  MemTarget t({.size = 8 << 20});
  UffdWpTracker tr(t.pid(), t.addr(), t.size());
  std::vector<uint64_t> rep;
  tr.collect_and_reset(rep);
  t.touch_random(10, 1);
  rep.clear();
  tr.collect_and_reset(rep);
  CHECK(!rep.empty());
  pid_t pid = t.pid();
  t.kill();
  try {
    rep.clear();
    tr.collect_and_reset(rep);
    FAIL("collect_and_reset on a dead target did not throw");
  } catch (const ftvm::Error& e) {
    std::string msg = e.what();
    INFO(msg);
    CHECK(msg.find(std::to_string(pid)) != std::string::npos);
    CHECK(msg.find("gone") != std::string::npos);
  }
}

TEST_CASE("uffd-wp tracker rejects bad ranges with clear Errors", "[tracker]") {
  if (!tracker_supported()) return;
  MemTarget t({.size = 4 << 20});
  CHECK_THROWS_WITH(UffdWpTracker(t.pid(), t.addr() + 1, t.size()),
                    Catch::Contains("not page-aligned"));
  // Past the end of the user address space: never mapped (64 MiB past the target sometimes was,
  // by mappings the forked target inherited from this test process: a flaky check).
  CHECK_THROWS_WITH(UffdWpTracker(t.pid(), t.addr(), t.size() + (uint64_t{1} << 47)),
                    Catch::Contains("not mapped"));
  // A second tracker on the same range would double-register.
  UffdWpTracker first(t.pid(), t.addr(), t.size());
  CHECK_THROWS_AS(UffdWpTracker(t.pid(), t.addr(), t.size()), ftvm::Error);
}

TEST_CASE("uffd-wp tracker scan time at 256 MiB and 1 GiB", "[tracker][perf]") {
  if (!tracker_supported()) return;
  for (size_t size : {size_t{256} << 20, size_t{1} << 30}) {
    MemTarget t({.size = size, .prefault = true});
    UffdWpTracker tr(t.pid(), t.addr(), t.size());
    std::vector<uint64_t> rep;
    auto t0 = std::chrono::steady_clock::now();
    tr.collect_and_reset(rep);
    double first_ms =
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    std::vector<double> ms;
    size_t reported = 0;
    for (int i = 0; i < 25; ++i) {
      t.touch_random(1000, 9000 + static_cast<uint64_t>(i));
      rep.clear();
      auto s = std::chrono::steady_clock::now();
      tr.collect_and_reset(rep);
      ms.push_back(
          std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - s).count());
      reported += rep.size();
      CHECK(rep.size() <= 1000);
      CHECK(rep.size() >= 950);  // 1000 random picks, a few collide
    }
    std::sort(ms.begin(), ms.end());
    WARN("uffd-wp scan, " << size / (1 << 20) << " MiB populated, ~1000 dirty pages: median "
                          << ms[ms.size() / 2] << " ms, min " << ms.front() << " ms, max "
                          << ms.back() << " ms (first collect incl. arming " << first_ms
                          << " ms); avg reported " << reported / ms.size());
  }
}

TEST_CASE("uffd-wp tracker scan time of a sparse 8 GiB range by thread count", "[tracker][perf][.]") {
  if (!tracker_supported()) return;
  MemTarget t({.size = size_t{8} << 30, .sparse = true});
  for (unsigned threads : {1u, 2u, 4u, 1u, 2u, 4u}) {
    UffdWpTracker tr(t.pid(), t.addr(), t.size());
    tr.set_scan_slices(size_t{64} << 20, threads);
    std::vector<uint64_t> rep;
    tr.collect_and_reset(rep);
    std::vector<double> ms;
    for (int i = 0; i < 15; ++i) {
      t.touch_random(200, 77 + static_cast<uint64_t>(i));
      rep.clear();
      auto s = std::chrono::steady_clock::now();
      tr.collect_and_reset(rep);
      ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - s).count());
    }
    std::sort(ms.begin(), ms.end());
    WARN("sparse 8 GiB, " << threads << " threads: scan median " << ms[ms.size() / 2] << " ms, min " << ms.front());
  }
}
