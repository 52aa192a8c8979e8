// SoftDirtyTracker: DirtyTracker for a range of another process's memory using the kernel's
// soft-dirty bits (CONFIG_MEM_SOFT_DIRTY): writing "4" to /proc/PID/clear_refs clears them for
// the whole process; a write sets bit 55 of the page's /proc/PID/pagemap entry again.
//
// This is the tracker for kernels without PAGEMAP_SCAN (< 6.7, e.g. Debian 12's 6.1). It needs
// no syscall injection. Reading the bits and clearing them are two steps, so a write landing
// between them would be lost; collect_and_reset() therefore freezes the target (SIGSTOP, waits
// until every thread is stopped, SIGCONT afterwards, also on error) around the two steps, which
// makes the report exact (never a false negative) while the target runs. The freeze costs a few
// hundred microseconds plus the pagemap read (8 bytes per page). Pages the target maps as
// transparent huge pages are reported per 4 KiB page whose bit is set (the kernel sets all of a
// huge mapping's bits: false positives only). Needs CAP_SYS_ADMIN-level access to the target's
// /proc files (root).
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <string>
#include <vector>

#include "checkpoint/tracker.h"
#include "common/fd.h"

namespace ftvm::vmm {

class SoftDirtyTracker final : public checkpoint::DirtyTracker {
 public:
  // Tracks [addr, addr + len) of process `pid`; page-aligned. Throws ftvm::Error when the range
  // is not mapped or the kernel lacks soft-dirty support.
  SoftDirtyTracker(pid_t pid, uint64_t addr, uint64_t len);

  uint64_t page_count() const override { return len_ / checkpoint::kPageSize; }
  void collect_and_reset(std::vector<uint64_t>& out) override;
  const char* name() const override { return "soft-dirty"; }

  // True if this kernel maintains soft-dirty bits (probed on this process).
  static bool supported(std::string* why = nullptr);

 private:
  pid_t pid_;
  uint64_t addr_, len_;
  UniqueFd pagemap_, clear_refs_, pidfd_;
  bool first_ = true;
  std::vector<uint64_t> entries_;
};

}  // namespace ftvm::vmm
