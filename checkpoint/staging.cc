#include "checkpoint/staging.h"

#include <algorithm>

#include <cstring>

#include "checkpoint/tracker.h"
#include "common/error.h"

namespace ftvm::checkpoint {

void merge_page_lists(std::vector<uint64_t>& dirty, std::vector<uint64_t>& carry) {
  dirty.insert(dirty.end(), carry.begin(), carry.end());
  std::sort(dirty.begin(), dirty.end());
  dirty.erase(std::unique(dirty.begin(), dirty.end()), dirty.end());
  carry.clear();
}

void EpochStager::stage_pages(std::span<const uint64_t> pages, std::span<const std::byte> ram) {
  const uint64_t ram_pages = ram.size() / kPageSize;
  const size_t need = pages.size() * (8 + kPageSize);
  if (buf_.size() < need) buf_.resize(need);
  std::byte* idx = buf_.data();
  std::byte* data = buf_.data() + pages.size() * 8;
  for (size_t i = 0; i < pages.size(); i++) {
    const uint64_t p = pages[i];
    if (p >= ram_pages) fail("staging: page {} outside guest RAM of {} pages", p, ram_pages);
    std::memcpy(idx + i * 8, &p, 8);  // little-endian host (x86-64) == wire order
    std::memcpy(data + i * kPageSize, ram.data() + p * kPageSize, kPageSize);
  }
  page_count_ = pages.size();
  devstate_bytes_ = 0;
  size_ = need;
}

std::span<std::byte> EpochStager::device_state_area(size_t bytes) {
  const size_t pages_end = page_count_ * (8 + kPageSize);
  if (buf_.size() < pages_end + bytes) buf_.resize(pages_end + bytes);
  devstate_bytes_ = bytes;
  size_ = pages_end + bytes;
  return {buf_.data() + pages_end, bytes};
}

uint64_t EpochStager::page_index(uint64_t i) const {
  uint64_t p;
  std::memcpy(&p, buf_.data() + i * 8, 8);
  return p;
}

const std::byte* EpochStager::page_data(uint64_t i) const {
  return buf_.data() + page_count_ * 8 + i * kPageSize;
}

void EpochStager::update_ram_digest(RamDigest& d) const {
  for (uint64_t i = 0; i < page_count_; i++) d.update(page_index(i), page_data(i));
}

}  // namespace ftvm::checkpoint
