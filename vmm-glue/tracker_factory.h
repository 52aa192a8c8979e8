// Picks the dirty-page tracker for a QEMU process: uffd-wp (userfaultfd write-protect +
// PAGEMAP_SCAN, Linux >= 6.7) where the kernel has it, else soft-dirty (CONFIG_MEM_SOFT_DIRTY).
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <memory>
#include <string>

#include "checkpoint/tracker.h"

namespace ftvm::vmm {

enum class TrackerKind { Auto, UffdWp, SoftDirty };

// Parses "auto", "uffd-wp" or "soft-dirty"; throws ftvm::Error naming the accepted values.
TrackerKind parse_tracker_kind(const std::string& s);

// Returns "" if `kind` can work on this kernel, else the reason(s) it cannot.
std::string tracker_unavailable(TrackerKind kind);

// Creates the tracker over [addr, addr+len) of `pid`. Throws ftvm::Error with the reasons when
// none is available.
std::unique_ptr<checkpoint::DirtyTracker> make_tracker(TrackerKind kind, pid_t pid, uint64_t addr, uint64_t len);

}  // namespace ftvm::vmm
