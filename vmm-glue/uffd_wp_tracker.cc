#include "vmm-glue/uffd_wp_tracker.h"

#include <thread>

#include <future>

#include <fcntl.h>
#include <poll.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <future>
#include <thread>

#include "common/error.h"
#include "common/log.h"
#include "vmm-glue/injector.h"

namespace ftvm::vmm {

namespace {

using checkpoint::kPageSize;
constexpr uint64_t kPmdSize = 2ull << 20;
constexpr size_t kRegionBatch = 4096;  // PageRegion entries per ioctl (96 KiB)

constexpr uint64_t kWantedFeatures =
    uapi::kUffdFeatureWpAsync | uapi::kUffdFeatureWpUnpopulated | uapi::kUffdFeatureWpHugetlbfsShmem;

// Features this kernel offers, learned on a throwaway uffd of our own (UFFDIO_API can be issued
// once per uffd, so the real one must be initialised with a known-good set). 0 with *why set
// when userfaultfd or PAGEMAP_SCAN is unusable.
uint64_t probe_features(std::string* why) {
  auto no = [&](std::string msg) {
    if (why) *why = std::move(msg);
    return uint64_t{0};
  };
  UniqueFd u(static_cast<int>(::syscall(SYS_userfaultfd, O_CLOEXEC | uapi::kUffdUserModeOnly)));
  if (!u)
    return no(fmt::format("userfaultfd(): {} (kernel needs CONFIG_USERFAULTFD)",
                          std::strerror(errno)));
  uffdio_api api{};
  api.api = UFFD_API;
  if (ioctl(u.get(), UFFDIO_API, &api) < 0)
    return no(fmt::format("UFFDIO_API probe: {}", std::strerror(errno)));
  if (!(api.features & uapi::kUffdFeatureWpAsync))
    return no("kernel lacks UFFD_FEATURE_WP_ASYNC (needs Linux >= 6.7 with "
              "CONFIG_PTE_MARKER_UFFD_WP); use the soft-dirty tracker");
  UniqueFd pm(::open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC));
  if (!pm) return no(fmt::format("open /proc/self/pagemap: {}", std::strerror(errno)));
  uapi::PageRegion r{};
  uapi::PmScanArg a{};
  a.size = sizeof a;
  a.start = reinterpret_cast<uint64_t>(&r) & ~(kPageSize - 1);
  a.end = a.start + kPageSize;
  a.vec = reinterpret_cast<uint64_t>(&r);
  a.vec_len = 1;
  a.category_mask = uapi::kPageIsPresent;
  a.return_mask = uapi::kPageIsPresent;
  if (ioctl(pm.get(), uapi::kPagemapScan, &a) < 0)
    return no(fmt::format("PAGEMAP_SCAN on /proc/self/pagemap: {} (needs Linux >= 6.7); use the "
                          "soft-dirty tracker",
                          std::strerror(errno)));
  return api.features;
}

// True once the process behind `pidfd` has exited (zombie or reaped).
bool exited(int pidfd) {
  pollfd p{pidfd, POLLIN, 0};
  int r = poll(&p, 1, 0);
  return r > 0 && (p.revents & (POLLIN | POLLHUP));
}

struct VmaInfo {
  uint64_t start, end;
  uint64_t kernel_page;  // bytes
};

// VMAs of `pid` from /proc/PID/smaps (start, end, KernelPageSize).
std::vector<VmaInfo> read_vmas(pid_t pid) {
  std::string path = fmt::format("/proc/{}/smaps", pid);
  std::ifstream f(path);
  if (!f) throw SysError(errno, "open " + path, "is the process running? run as root");
  std::vector<VmaInfo> out;
  std::string line;
  while (std::getline(f, line)) {
    unsigned long long s, e;
    char dash;
    unsigned long kb;
    if (!line.empty() && std::isxdigit(static_cast<unsigned char>(line[0])) &&
        std::sscanf(line.c_str(), "%llx%c%llx", &s, &dash, &e) == 3 && dash == '-') {
      out.push_back({s, e, kPageSize});
    } else if (!out.empty() && std::sscanf(line.c_str(), "KernelPageSize: %lu kB", &kb) == 1) {
      out.back().kernel_page = kb * 1024;
    }
  }
  return out;
}

}  // namespace

bool UffdWpTracker::supported(std::string* why) {
  try {
    return probe_features(why) != 0;
  } catch (const std::exception& e) {
    if (why) *why = e.what();
    return false;
  }
}

UffdWpTracker::UffdWpTracker(pid_t pid, uint64_t addr, uint64_t len)
    : pid_(pid), addr_(addr), len_(len) {
  if (len == 0 || addr % kPageSize || len % kPageSize || addr + len < addr)
    fail("uffd-wp tracker for pid {}: range {:#x}+{:#x} is empty or not page-aligned", pid, addr,
         len);
  std::string why;
  uint64_t avail = probe_features(&why);
  if (!avail) fail("uffd-wp tracker for pid {}: {}", pid, why);

  pidfd_.reset(static_cast<int>(::syscall(SYS_pidfd_open, pid, 0)));
  if (!pidfd_)
    throw SysError(errno, fmt::format("pidfd_open pid {}", pid),
                   "the process must exist and be a thread-group leader");

  // The whole range must be mapped: UFFDIO_REGISTER would only say EINVAL.
  uint64_t cursor = addr;
  for (const auto& v : read_vmas(pid)) {
    if (v.end <= cursor || v.start >= addr + len) continue;
    if (v.start > cursor) break;
    if (v.kernel_page > kPageSize) hugetlb_page_ = std::max(hugetlb_page_, v.kernel_page);
    cursor = v.end;
    if (cursor >= addr + len) break;
  }
  if (cursor < addr + len)
    fail("uffd-wp tracker for pid {}: {:#x}..{:#x} is not mapped in the process (range "
         "{:#x}+{:#x}); pass the guest RAM mapping exactly",
         pid, cursor, addr + len, addr, len);

  std::string pm_path = fmt::format("/proc/{}/pagemap", pid);
  pagemap_.reset(::open(pm_path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!pagemap_) throw SysError(errno, "open " + pm_path, "run as root (CAP_SYS_PTRACE)");

  uffd_.reset(inject_userfaultfd(pid));

  // The pulled uffd still refers to the target's mm: API and REGISTER from here act on it.
  uffdio_api api{};
  api.api = UFFD_API;
  api.features = avail & kWantedFeatures;
  check_sys(ioctl(uffd_.get(), UFFDIO_API, &api),
            fmt::format("UFFDIO_API (features {:#x}) on the userfaultfd of pid {}", api.features,
                        pid));
  features_ = api.features;
  uffdio_register reg{};
  reg.range.start = addr;
  reg.range.len = len;
  reg.mode = UFFDIO_REGISTER_MODE_WP;
  check_sys(ioctl(uffd_.get(), UFFDIO_REGISTER, &reg),
            fmt::format("UFFDIO_REGISTER (write-protect) {:#x}+{:#x} in pid {}", addr, len, pid),
            "the range must be anonymous, shmem/memfd or hugetlbfs memory not already registered "
            "with another userfaultfd (is another tracker running?)");
  if (!(features_ & uapi::kUffdFeatureWpUnpopulated))
    log::warn("tracker", "pid {}: no UFFD_FEATURE_WP_UNPOPULATED; first touches of empty pages "
                         "are reported even when only read",
              pid);
  if (hugetlb_page_)
    log::warn("tracker", "pid {}: range is hugetlbfs; tracking granularity is {} KiB", pid,
              hugetlb_page_ / 1024);
  regions_.resize(kRegionBatch);
  log::info("tracker", "uffd-wp tracking pid {} range {:#x}+{:#x} ({} pages), features {:#x}", pid,
            addr, len, page_count(), features_);
}

UffdWpTracker::~UffdWpTracker() = default;

void UffdWpTracker::check_alive(const char* step) const {
  if (exited(pidfd_.get()))
    fail("uffd-wp tracker: process {} is gone (exited or was killed) during {}; its memory "
         "cannot be tracked any more (fail over or restart protection)",
         pid_, step);
}

void UffdWpTracker::scan_failed(int err, uint64_t start, uint64_t end) const {
  check_alive("PAGEMAP_SCAN");
  if (err == EPERM)
    fail("PAGEMAP_SCAN {:#x}..{:#x} in pid {}: range is no longer registered for uffd-wp "
         "(the process unmapped or remapped its memory); restart protection",
         start, end, pid_);
  throw SysError(err, fmt::format("PAGEMAP_SCAN {:#x}..{:#x} in pid {}", start, end, pid_));
}

// Each call reports written pages in regions_ of [start, end); with kPmScanWpMatching it also
// re-arms them (the kernel does both under the page-table lock, so a write is either in this
// report or faults again and lands in the next).
void UffdWpTracker::scan(uint64_t start, uint64_t end, uint64_t flags) { scan_into(start, end, flags, regions_); }

void UffdWpTracker::scan_all_parallel(uint64_t flags) {
  const uint64_t end = addr_ + len_;
  // Default: half the hardware threads, at most 4 (the guest's vCPUs are stopped, but ftd's
  // other sessions and QEMU's own threads still run); on this project's 2-core machines that is
  // one thread: measured there under load, 2 and 4 threads were not faster (see BENCHMARKS).
  const unsigned threads =
      scan_threads_ ? scan_threads_ : std::min(4u, std::max(1u, std::thread::hardware_concurrency() / 2));
  const unsigned n = static_cast<unsigned>(
      std::min<uint64_t>(threads, std::max<uint64_t>(1, len_ / std::max<uint64_t>(scan_slice_, kPmdSize))));
  if (n <= 1) {
    scan(addr_, end, flags);
    return;
  }
  // Slice bounds on 2 MiB boundaries (a PMD is never split between two walks).
  const uint64_t step = ((len_ / n) + kPmdSize - 1) & ~(kPmdSize - 1);
  slice_regions_.resize(n);
  std::vector<std::future<void>> rest;
  std::exception_ptr first_error;
  for (unsigned i = 1; i < n; i++) {
    const uint64_t s = addr_ + i * step, e = i + 1 == n ? end : std::min(end, addr_ + (i + 1) * step);
    rest.push_back(std::async(std::launch::async, [this, s, e, flags, i] {
      if (s < e) scan_into(s, e, flags, slice_regions_[i]);
      else slice_regions_[i].clear();
    }));
  }
  try {
    scan_into(addr_, std::min(end, addr_ + step), flags, slice_regions_[0]);
  } catch (...) {
    first_error = std::current_exception();
  }
  for (auto& f : rest) {
    try {
      f.get();
    } catch (...) {
      if (!first_error) first_error = std::current_exception();
    }
  }
  if (first_error) std::rethrow_exception(first_error);
  regions_.clear();
  for (const auto& r : slice_regions_) regions_.insert(regions_.end(), r.begin(), r.end());
}

void UffdWpTracker::scan_into(uint64_t start, uint64_t end, uint64_t flags, std::vector<uapi::PageRegion>& out) const {
  size_t used = 0;
  uint64_t cur = start;
  while (cur < end) {
    if (out.size() < used + kRegionBatch) out.resize(used + kRegionBatch);
    uapi::PmScanArg a{};
    a.size = sizeof a;
    a.flags = flags | uapi::kPmScanCheckWpAsync;
    a.start = cur;
    a.end = end;
    a.vec = reinterpret_cast<uint64_t>(out.data() + used);
    a.vec_len = kRegionBatch;
    a.category_mask = uapi::kPageIsWritten;
    a.return_mask = uapi::kPageIsWritten | uapi::kPageIsHuge;
    long n = ioctl(pagemap_.get(), uapi::kPagemapScan, &a);
    if (n < 0) scan_failed(errno, cur, end);
    used += static_cast<size_t>(n);
    if (a.walk_end <= cur)
      fail("PAGEMAP_SCAN {:#x}..{:#x} in pid {}: walk made no progress (partial hugetlb page?)",
           cur, end, pid_);
    cur = a.walk_end;
  }
  out.resize(used);
}

void UffdWpTracker::split_chunk(uint64_t chunk) {
  // Write-protecting part of a PMD-mapped THP makes the kernel split the PMD. The split drops
  // the mapping's written state for the whole chunk, so callers report the chunk whole.
  scan(chunk, chunk + kPageSize, uapi::kPmScanWpMatching);
  ++thp_splits_;
}

void UffdWpTracker::collect_and_reset(std::vector<uint64_t>& out) {
  const uint64_t end = addr_ + len_;
  const size_t base = out.size();
  bool need_sort = false;

  auto add_range = [&](uint64_t s, uint64_t e) {
    s = std::max(s, addr_);
    e = std::min(e, end);
    for (uint64_t a = s; a < e; a += kPageSize) out.push_back((a - addr_) / kPageSize);
  };
  auto chunks_inside = [&](uint64_t s, uint64_t e, auto&& fn) {
    for (uint64_t c = (s + kPmdSize - 1) & ~(kPmdSize - 1); c + kPmdSize <= e; c += kPmdSize)
      fn(c);
  };

  if (first_) {
    // The baseline is a full copy, so the first report is every page; the scans here only arm
    // tracking. Nothing is armed yet, so every mapped page reads as written and the get-only
    // scan finds all PMD-mapped chunks; splitting them first makes the arming scan protect at
    // 4 KiB. A chunk that becomes PMD-mapped in between is caught by the arming scan below.
    if (!hugetlb_page_) {
      scan(addr_, end, 0);
      std::vector<uint64_t> chunks;
      for (const auto& r : regions_)
        if (r.categories & uapi::kPageIsHuge)
          chunks_inside(r.start, r.end, [&](uint64_t c) { chunks.push_back(c); });
      for (uint64_t c : chunks) scan(c, c + kPageSize, uapi::kPmScanWpMatching);
      if (!chunks.empty())
        log::info("tracker", "pid {}: split {} PMD-mapped huge pages for 4 KiB tracking", pid_,
                  chunks.size());
    }
    scan(addr_, end, uapi::kPmScanWpMatching);
    check_alive("the first scan");
    huge_chunks_.clear();
    for (const auto& r : regions_)
      if (r.categories & uapi::kPageIsHuge) chunks_inside(r.start, r.end, [&](uint64_t c) {
          huge_chunks_.push_back(c);
        });
    out.reserve(base + page_count());
    for (uint64_t p = 0; p < page_count(); ++p) out.push_back(p);
    first_ = false;
    return;
  }

  if (!hugetlb_page_ && !huge_chunks_.empty()) {
    // Chunks the previous scan saw PMD-mapped were re-armed at 2 MiB. If written since, split
    // them now (reporting them whole) so this scan re-arms them at 4 KiB. An untouched one is
    // left armed: a later write makes it show up as written-huge again.
    std::vector<uint64_t> chunks;
    chunks.swap(huge_chunks_);
    for (uint64_t c : chunks) {
      scan(c, c + kPmdSize, 0);
      if (regions_.empty()) continue;
      split_chunk(c);
      add_range(c, c + kPmdSize);
      need_sort = true;
    }
  }

  scan_all_parallel(uapi::kPmScanWpMatching);
  for (const auto& r : regions_) {
    add_range(r.start, r.end);
    if ((r.categories & uapi::kPageIsHuge) && !hugetlb_page_)
      chunks_inside(r.start, r.end, [&](uint64_t c) { huge_chunks_.push_back(c); });
  }
  // A dead target's page tables are gone and the scan may find nothing: never let that pass
  // for "no writes".
  check_alive("a scan");
  if (need_sort) {
    std::sort(out.begin() + static_cast<ptrdiff_t>(base), out.end());
    out.erase(std::unique(out.begin() + static_cast<ptrdiff_t>(base), out.end()), out.end());
  }
  if (!huge_chunks_.empty())
    log::debug("tracker", "pid {}: {} huge chunks reported whole; splitting next collect", pid_,
               huge_chunks_.size());
}

}  // namespace ftvm::vmm
