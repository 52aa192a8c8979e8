// UffdWpTracker: DirtyTracker for a range of another process's memory, using a userfaultfd in
// write-protect async mode (UFFD_FEATURE_WP_ASYNC) plus PAGEMAP_SCAN get-and-reset.
//
// The userfaultfd must belong to the target's mm, so it is created inside the target by
// syscall injection (vmm-glue/injector.h) and pulled into this process with pidfd_getfd; the
// UFFDIO_API/REGISTER ioctls are then issued from here. Needs Linux >= 6.7 (PAGEMAP_SCAN),
// CAP_SYS_PTRACE over the target. Huge pages in the range are split at start so tracking is
// 4 KiB exact. Construction throws ftvm::Error naming the missing kernel feature or privilege.
//
// Granularity: transparent huge pages (shmem or anonymous THP) that are PMD-mapped when the
// tracker starts are split on the first collect; a THP that becomes PMD-mapped later is
// reported whole (512 pages) while written and split again at the next collect, so tracking
// returns to 4 KiB. hugetlbfs cannot be split: a written huge page is reported whole.
// Not seen (the tracker cannot see them; the caller must refuse such configurations): pages
// discarded with fallocate(PUNCH_HOLE) / MADV_REMOVE, and writes by other processes through
// their own mappings of the same memory (vhost-user backends).
//
// Closing the tracker (destructor) unregisters the range and removes all write protection in
// the target. Not thread-safe.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <string>
#include <vector>

#include "checkpoint/tracker.h"
#include "common/fd.h"
#include "vmm-glue/pagemap_scan.h"

namespace ftvm::vmm {

class UffdWpTracker final : public checkpoint::DirtyTracker {
 public:
  // Tracks [addr, addr + len) in process `pid`; addr and len page-aligned, the range fully
  // mapped in the target. The target is stopped (one thread) only for the two injected
  // syscalls; tracking starts before the constructor returns.
  UffdWpTracker(pid_t pid, uint64_t addr, uint64_t len);
  ~UffdWpTracker() override;

  uint64_t page_count() const override { return len_ / checkpoint::kPageSize; }
  void collect_and_reset(std::vector<uint64_t>& out) override;
  const char* name() const override { return "uffd-wp"; }

  // True if this kernel supports the mechanism (PAGEMAP_SCAN + UFFD_FEATURE_WP_ASYNC). On
  // false, *why (if given) says what is missing. Never throws.
  static bool supported(std::string* why = nullptr);

  // uffdio_api features in effect (uapi::kUffdFeature*), for logs and tests.
  uint64_t features() const { return features_; }
  // Number of 2 MiB chunks re-split after the first collect because a huge page became
  // PMD-mapped again (for tests and stats; the initial split pass is not counted).
  // Parallel steady-state scan: the range is split into `threads` slices of at least
  // `min_slice` bytes (2 MiB aligned), each walked by its own thread. Defaults: 2 GiB slices,
  // min(4, hardware threads / 2) threads (guests under 4 GiB, and 2-core hosts, scan on one). For tests (small
  // ranges in many slices) and tuning; call before collect_and_reset().
  void set_scan_slices(uint64_t min_slice, unsigned threads) {
    scan_slice_ = min_slice;
    scan_threads_ = threads;
  }
  uint64_t thp_splits() const { return thp_splits_; }

 private:
  // Walks [start, end) with PAGEMAP_SCAN using `flags`, collecting regions whose categories
  // include kPageIsWritten into regions_ (cleared first). Throws a clear Error when the target
  // is gone or the range is no longer registered.
  void scan(uint64_t start, uint64_t end, uint64_t flags);
  // scan() into `out` instead of regions_ (thread-safe: PAGEMAP_SCAN walks under the mmap
  // read lock, so disjoint ranges may be scanned concurrently).
  void scan_into(uint64_t start, uint64_t end, uint64_t flags, std::vector<uapi::PageRegion>& out) const;
  // The steady-state re-arming scan of the whole range into regions_: split into slices of at
  // least kParallelSlice scanned on up to kScanThreads threads (issue 17: the scan walks every
  // page-table entry of the range, so its cost grows with RAM size, not with the dirty rate).
  void scan_all_parallel(uint64_t flags);
  uint64_t scan_slice_ = uint64_t{2} << 30;
  unsigned scan_threads_ = 0;  // 0 = min(4, hardware threads / 2)
  std::vector<std::vector<uapi::PageRegion>> slice_regions_;
  // Throws if the target has exited; called after every scan so a dead target is never
  // mistaken for one that wrote nothing.
  void check_alive(const char* step) const;
  [[noreturn]] void scan_failed(int err, uint64_t start, uint64_t end) const;
  void split_chunk(uint64_t chunk);

  pid_t pid_;
  uint64_t addr_, len_;
  UniqueFd uffd_;
  UniqueFd pagemap_;
  UniqueFd pidfd_;                  // identifies the target across pid reuse; polls on exit
  uint64_t features_ = 0;
  uint64_t hugetlb_page_ = 0;       // hugetlbfs page size if the range is hugetlbfs, else 0
  bool first_ = true;
  uint64_t thp_splits_ = 0;
  std::vector<uint64_t> huge_chunks_;  // 2 MiB chunks reported PMD-mapped by the last scan
  std::vector<uapi::PageRegion> regions_;  // scan output, reused across calls
};

}  // namespace ftvm::vmm
