#include "vmm-glue/tracker_factory.h"

#include "common/error.h"
#include "vmm-glue/soft_dirty_tracker.h"
#include "vmm-glue/uffd_wp_tracker.h"

namespace ftvm::vmm {

TrackerKind parse_tracker_kind(const std::string& s) {
  if (s == "auto") return TrackerKind::Auto;
  if (s == "uffd-wp") return TrackerKind::UffdWp;
  if (s == "soft-dirty") return TrackerKind::SoftDirty;
  fail("unknown tracker '{}' (use auto, uffd-wp or soft-dirty)", s);
}

std::string tracker_unavailable(TrackerKind kind) {
  std::string uffd, sd;
  const bool has_uffd = UffdWpTracker::supported(&uffd);
  const bool has_sd = SoftDirtyTracker::supported(&sd);
  switch (kind) {
    case TrackerKind::UffdWp: return has_uffd ? "" : "uffd-wp: " + uffd;
    case TrackerKind::SoftDirty: return has_sd ? "" : "soft-dirty: " + sd;
    case TrackerKind::Auto:
      return has_uffd || has_sd ? "" : "no dirty-page tracker on this kernel (uffd-wp: " + uffd + "; soft-dirty: " + sd + ")";
  }
  return "unknown tracker kind";
}

std::unique_ptr<checkpoint::DirtyTracker> make_tracker(TrackerKind kind, pid_t pid, uint64_t addr, uint64_t len) {
  if (auto why = tracker_unavailable(kind); !why.empty()) fail("{}", why);
  if (kind == TrackerKind::UffdWp || (kind == TrackerKind::Auto && UffdWpTracker::supported()))
    return std::make_unique<UffdWpTracker>(pid, addr, len);
  return std::make_unique<SoftDirtyTracker>(pid, addr, len);
}

}  // namespace ftvm::vmm
