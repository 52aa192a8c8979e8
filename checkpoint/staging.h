// EpochStager: the primary's copy of one checkpoint, in exactly the layout the standby stages
// it in (region kRegionStaging):
//
//   [u64 page index] * n | [4 KiB page] * n | device state bytes
//
// Contract: stage_pages() is called while the guest is paused and takes a consistent copy of
// the listed pages; after it returns the guest may run again and `bytes()` no longer depends
// on guest RAM. The buffer is reused across epochs (its capacity is that of the largest epoch
// seen), so the primary's staging memory is one epoch's dirty pages plus the device state.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "checkpoint/digest.h"

namespace ftvm::checkpoint {

// Merges `carry` (pages written during the last sync pass, collected while the guest ran: any
// order, duplicates possible) into `dirty` (this pause's scan, any order): afterwards `dirty`
// is strictly ascending without duplicates (what EpochStager::stage_pages and the standby's
// Replica require) and `carry` is empty. Issue 17: epoch 1 used std::set_union on the
// unsorted carried list and the standby rejected it ("page index ... is out of range or not
// ascending"), in a resync loop for 4 GiB guests.
void merge_page_lists(std::vector<uint64_t>& dirty, std::vector<uint64_t>& carry);

class EpochStager {
 public:
  // Copies `pages` (ascending page numbers) from `ram` and records their indices. Resets any
  // device state staged before. Throws ftvm::Error if a page lies outside `ram`.
  void stage_pages(std::span<const uint64_t> pages, std::span<const std::byte> ram);

  // Returns a writable area of `bytes` bytes after the pages for the device state, which the
  // caller fills (e.g. with pread). Must follow stage_pages().
  std::span<std::byte> device_state_area(size_t bytes);

  uint64_t page_count() const { return page_count_; }
  uint64_t device_state_bytes() const { return devstate_bytes_; }
  std::span<const std::byte> bytes() const { return {buf_.data(), size_}; }
  std::span<std::byte> mutable_bytes() { return {buf_.data(), size_}; }
  // The whole allocation (moves only when an epoch outgrows it): what a fabric registers once.
  std::span<const std::byte> allocation() const { return {buf_.data(), buf_.size()}; }
  uint64_t digest() const { return digest_bytes(bytes()); }
  uint64_t page_index(uint64_t i) const;
  const std::byte* page_data(uint64_t i) const;

  // Feeds every staged page into `d` (the primary's running full-RAM digest).
  void update_ram_digest(RamDigest& d) const;

 private:
  std::vector<std::byte> buf_;
  size_t size_ = 0;
  uint64_t page_count_ = 0;
  uint64_t devstate_bytes_ = 0;
};

}  // namespace ftvm::checkpoint
