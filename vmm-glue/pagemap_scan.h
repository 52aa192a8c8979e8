// Kernel ABI for PAGEMAP_SCAN (Linux >= 6.7, include/uapi/linux/fs.h) and the userfaultfd
// write-protect features the tracker needs (include/uapi/linux/userfaultfd.h), defined here
// because the build headers (Debian 12: Linux 6.1) lack them.
//
// Everything lives in ftvm::vmm::uapi under names that cannot collide with the macros newer
// kernel headers define (PAGE_IS_WRITTEN, PM_SCAN_WP_MATCHING, ...). Layouts and values are
// fixed by the kernel ABI; the static_asserts pin them.
#pragma once

#include <linux/ioctl.h>
#include <linux/userfaultfd.h>

#include <cstdint>

namespace ftvm::vmm::uapi {

// struct page_region: pages [start, end) that share the categories `categories`.
struct PageRegion {
  uint64_t start;
  uint64_t end;
  uint64_t categories;
};

// struct pm_scan_arg.
struct PmScanArg {
  uint64_t size;                 // sizeof(PmScanArg)
  uint64_t flags;                // kPmScan*
  uint64_t start, end;           // range to walk, page-aligned start
  uint64_t walk_end;             // out: where the walk stopped (== end when complete)
  uint64_t vec;                  // PageRegion array
  uint64_t vec_len;              // its capacity in entries
  uint64_t max_pages;            // 0: unlimited
  uint64_t category_inverted;    // categories tested inverted
  uint64_t category_mask;        // all of these must match
  uint64_t category_anyof_mask;  // at least one of these must match
  uint64_t return_mask;          // categories reported in PageRegion::categories
};
static_assert(sizeof(PageRegion) == 24, "struct page_region ABI");
static_assert(sizeof(PmScanArg) == 96, "struct pm_scan_arg ABI");

// ioctl on /proc/PID/pagemap; returns the number of PageRegion entries filled.
inline constexpr unsigned long kPagemapScan = _IOWR('f', 16, PmScanArg);

// pm_scan_arg.flags
inline constexpr uint64_t kPmScanWpMatching = 1ull << 0;    // write-protect what matches
inline constexpr uint64_t kPmScanCheckWpAsync = 1ull << 1;  // EPERM unless range is WP-async

// Page categories.
inline constexpr uint64_t kPageIsWpAllowed = 1ull << 0;
inline constexpr uint64_t kPageIsWritten = 1ull << 1;
inline constexpr uint64_t kPageIsFile = 1ull << 2;
inline constexpr uint64_t kPageIsPresent = 1ull << 3;
inline constexpr uint64_t kPageIsSwapped = 1ull << 4;
inline constexpr uint64_t kPageIsPfnZero = 1ull << 5;
inline constexpr uint64_t kPageIsHuge = 1ull << 6;
inline constexpr uint64_t kPageIsSoftDirty = 1ull << 7;

// userfaultfd(2) flag: only user-mode faults are handled; allowed without privilege.
inline constexpr int kUffdUserModeOnly = 1;

// uffdio_api.features bits added after Linux 6.1.
inline constexpr uint64_t kUffdFeatureWpHugetlbfsShmem = 1ull << 12;  // 6.1
inline constexpr uint64_t kUffdFeatureWpUnpopulated = 1ull << 13;     // 6.7
inline constexpr uint64_t kUffdFeatureWpAsync = 1ull << 15;           // 6.7

}  // namespace ftvm::vmm::uapi
