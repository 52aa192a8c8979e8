// UffdWpTracker: DirtyTracker for a range of another process's memory, using a userfaultfd in
// write-protect async mode (UFFD_FEATURE_WP_ASYNC) plus PAGEMAP_SCAN get-and-reset.
//
// The userfaultfd must belong to the target's mm, so it is created inside the target by
// syscall injection (vmm-glue/injector.h) and pulled into this process with pidfd_getfd; the
// UFFDIO_API/REGISTER ioctls are then issued from here. Needs Linux >= 6.7 (PAGEMAP_SCAN),
// CAP_SYS_PTRACE over the target. Huge pages in the range are split at start so tracking is
// 4 KiB exact. Construction throws ftvm::Error naming the missing kernel feature or privilege.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <vector>

#include "checkpoint/tracker.h"
#include "common/fd.h"

namespace ftvm::vmm {

class UffdWpTracker final : public checkpoint::DirtyTracker {
 public:
  // Tracks [addr, addr + len) in process `pid`; addr and len page-aligned.
  UffdWpTracker(pid_t pid, uint64_t addr, uint64_t len);
  ~UffdWpTracker() override;

  uint64_t page_count() const override { return len_ / checkpoint::kPageSize; }
  void collect_and_reset(std::vector<uint64_t>& out) override;
  const char* name() const override { return "uffd-wp"; }

  // True if this kernel supports the mechanism (PAGEMAP_SCAN + UFFD_FEATURE_WP_ASYNC).
  static bool supported(std::string* why = nullptr);

 private:
  pid_t pid_;
  uint64_t addr_, len_;
  UniqueFd uffd_;
  UniqueFd pagemap_;
  bool first_ = true;
  std::vector<uint64_t> regions_;  // scratch: page_region triples (start,end,categories)
};

}  // namespace ftvm::vmm
