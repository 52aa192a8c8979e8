// DirtyTracker: which guest pages were written since the last call.
//
// The checkpoint engine sees guest RAM as one contiguous range of `page_count()` pages of
// kPageSize bytes, numbered from 0. A tracker observes writes to that range made by whoever
// owns it (for QEMU: the vCPUs and device emulation inside the QEMU process) and reports them
// as page numbers. Implementations live where the owner is known (vmm-glue/: userfaultfd
// write-protect + PAGEMAP_SCAN, soft-dirty); this header knows nothing of processes.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace ftvm::checkpoint {

inline constexpr size_t kPageSize = 4096;

class DirtyTracker {
 public:
  virtual ~DirtyTracker() = default;

  // Number of pages in the tracked range.
  virtual uint64_t page_count() const = 0;

  // Appends to `out` (sorted ascending, no duplicates) every page written since the previous
  // call, and re-arms tracking for all pages atomically with respect to the report: a write
  // that lands after a page was reported is reported by the next call. The first call after
  // construction reports every page (the baseline is a full copy). Never reports a false
  // negative; may report false positives (pages rewritten with identical content, or pages
  // tracked at a coarser granularity). Throws ftvm::Error when the tracked memory is gone
  // (owner died) or the kernel refuses the scan.
  virtual void collect_and_reset(std::vector<uint64_t>& out) = 0;

  // Short name for logs and status ("uffd-wp", "soft-dirty").
  virtual const char* name() const = 0;
};

}  // namespace ftvm::checkpoint
