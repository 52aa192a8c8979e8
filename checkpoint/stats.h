// Per-epoch measurements and rolling summaries for status output and benchmarks.
#pragma once

#include <cstddef>
#include <cstdint>
#include <deque>
#include <vector>

namespace ftvm::checkpoint {

// One checkpoint as the primary saw it. Times in microseconds.
struct EpochRecord {
  uint64_t epoch = 0;
  uint64_t pages = 0;
  uint64_t devstate_bytes = 0;
  uint64_t staged_bytes = 0;
  double stop_us = 0, scan_us = 0, copy_us = 0, devstate_us = 0, cont_us = 0;
  double pause_us = 0;   // from before `stop` until `cont` returned
  double send_us = 0;    // writes + commit record handed to the transport
  double ack_us = 0;     // from commit sent to ack received
  double wall_ms = 0;    // wall-clock time at the start of the pause (ms since epoch)
  uint64_t ram_digest = 0;
};

// Keeps the last `capacity` values and answers percentiles over them.
class Window {
 public:
  explicit Window(size_t capacity = 1000) : cap_(capacity) {}
  void add(double v);
  size_t size() const { return v_.size(); }
  double last() const { return v_.empty() ? 0 : v_.back(); }
  // p in [0,100]; nearest-rank percentile; 0 when empty.
  double percentile(double p) const;
  double mean() const;

 private:
  size_t cap_;
  std::deque<double> v_;
};

double percentile(std::vector<double> v, double p);

}  // namespace ftvm::checkpoint
