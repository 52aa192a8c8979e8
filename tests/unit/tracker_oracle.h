// Exactness oracle shared by the tracker tests: a shadow copy of the target's memory and a
// full-memory diff after every epoch. Header-only (tests/CMakeLists.txt compiles test_*.cc).
#pragma once

#include <catch2/catch.hpp>

#include <algorithm>
#include <cstring>
#include <iterator>
#include <vector>

#include "tests/unit/tracker_target.h"

namespace ftvm::testing {

// Shadow of the target memory; diffs against the live view.
constexpr size_t kOraclePage = 4096;

struct Oracle {
  const MemTarget& t;
  std::vector<uint8_t> shadow;
  uint64_t total_changed = 0, total_reported = 0, total_fp = 0, epochs = 0;

  explicit Oracle(const MemTarget& target)
      : t(target), shadow(target.view(), target.view() + target.size()) {}

  std::vector<uint64_t> changed_since(const std::vector<uint8_t>& base) const {
    std::vector<uint64_t> out;
    for (uint64_t p = 0; p < t.pages(); ++p)
      if (std::memcmp(base.data() + p * kOraclePage, t.view() + p * kOraclePage, kOraclePage) != 0) out.push_back(p);
    return out;
  }

  // Checks the report format and returns pages in `changed` missing from `reported`.
  static std::vector<uint64_t> missing(const std::vector<uint64_t>& changed,
                                       const std::vector<uint64_t>& reported) {
    std::vector<uint64_t> m;
    std::set_difference(changed.begin(), changed.end(), reported.begin(), reported.end(),
                        std::back_inserter(m));
    return m;
  }

  void check_format(const std::vector<uint64_t>& reported) const {
    REQUIRE(std::is_sorted(reported.begin(), reported.end()));
    REQUIRE(std::adjacent_find(reported.begin(), reported.end()) == reported.end());
    if (!reported.empty()) REQUIRE(reported.back() < t.pages());
  }

  // Quiescent epoch: the target is not writing. Every changed page must be reported.
  void epoch(const std::vector<uint64_t>& reported) {
    check_format(reported);
    auto changed = changed_since(shadow);
    auto fn = missing(changed, reported);
    INFO("epoch " << epochs << ": changed " << changed.size() << " reported " << reported.size());
    REQUIRE(fn.empty());
    total_changed += changed.size();
    total_reported += reported.size();
    total_fp += reported.size() - changed.size();
    for (uint64_t p : changed) std::memcpy(shadow.data() + p * kOraclePage, t.view() + p * kOraclePage, kOraclePage);
    ++epochs;
  }
};


// Runs `epochs` quiescent epochs of random writes against tracker `tr` (any DirtyTracker over
// the whole of `t`) and checks each report against a full-memory diff: zero false negatives.
template <typename Tracker>
Oracle run_tracker_exactness(Tracker& tr, MemTarget& t, int epochs, uint64_t seed) {
  REQUIRE(tr.page_count() == t.pages());
  std::vector<uint64_t> rep;
  tr.collect_and_reset(rep);
  REQUIRE(rep.size() == t.pages());  // the first report is every page
  Oracle o(t);
  for (int ep = 0; ep < epochs; ++ep) {
    // Vary the amount: none, a few, many.
    uint32_t n = ep % 17 == 0 ? 0 : (ep % 5 == 0 ? 2000 : 1 + static_cast<uint32_t>(ep * 7 % 300));
    t.write_random(n, seed + static_cast<uint64_t>(ep));
    rep.clear();
    tr.collect_and_reset(rep);
    o.epoch(rep);
  }
  rep.clear();
  tr.collect_and_reset(rep);
  CHECK(rep.empty());  // nothing written since the last collect
  return o;
}
}  // namespace ftvm::testing
