#include "checkpoint/stats.h"

#include <algorithm>
#include <cmath>
#include <numeric>

namespace ftvm::checkpoint {

void Window::add(double v) {
  v_.push_back(v);
  while (v_.size() > cap_) v_.pop_front();
}

double percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  double rank = std::ceil(p / 100.0 * static_cast<double>(v.size()));
  size_t i = rank < 1 ? 0 : static_cast<size_t>(rank) - 1;
  return v[std::min(i, v.size() - 1)];
}

double Window::percentile(double p) const { return checkpoint::percentile({v_.begin(), v_.end()}, p); }

double Window::mean() const {
  if (v_.empty()) return 0;
  return std::accumulate(v_.begin(), v_.end(), 0.0) / static_cast<double>(v_.size());
}

}  // namespace ftvm::checkpoint
