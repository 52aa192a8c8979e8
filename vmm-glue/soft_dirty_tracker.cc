#include "vmm-glue/soft_dirty_tracker.h"

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <fstream>
#include <thread>

#include "common/error.h"
#include "common/log.h"
#include "vmm-glue/process.h"

namespace ftvm::vmm {
namespace {

constexpr uint64_t kSoftDirtyBit = uint64_t{1} << 55;

void write_clear_refs(int fd, const std::string& what) {
  for (;;) {
    ssize_t n = ::pwrite(fd, "4", 1, 0);
    if (n == 1) return;
    if (n < 0 && errno == EINTR) continue;
    throw SysError(n < 0 ? errno : EIO, "write 4 to " + what, "is the process still running? run ftd as root");
  }
}

void read_exact(int fd, void* buf, size_t len, off_t off, const std::string& what) {
  auto* p = static_cast<char*>(buf);
  size_t got = 0;
  while (got < len) {
    ssize_t n = ::pread(fd, p + got, len - got, off + static_cast<off_t>(got));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) throw SysError(n < 0 ? errno : EIO, "read " + what, "the process may have exited");
    got += static_cast<size_t>(n);
  }
}

// True when every thread of `pid` is in the stopped state.
bool all_threads_stopped(pid_t pid) {
  std::string dir = fmt::format("/proc/{}/task", pid);
  DIR* d = ::opendir(dir.c_str());
  if (!d) throw SysError(errno, "open " + dir, "the process exited");
  bool all = true;
  while (dirent* e = ::readdir(d)) {
    if (e->d_name[0] == '.') continue;
    std::ifstream f(dir + "/" + e->d_name + "/stat");
    std::string s((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    auto rp = s.rfind(')');
    if (rp == std::string::npos || rp + 2 >= s.size()) continue;  // thread exited meanwhile
    char st = s[rp + 2];
    if (st != 'T' && st != 't' && st != 'Z' && st != 'X') {
      all = false;
      break;
    }
  }
  ::closedir(d);
  return all;
}

// Stops the target for the lifetime of the object; resumes it on destruction, also on error.
class Freeze {
 public:
  Freeze(int pidfd, pid_t pid) : pidfd_(pidfd) {
    if (::syscall(SYS_pidfd_send_signal, pidfd_, SIGSTOP, nullptr, 0) != 0)
      throw SysError(errno, fmt::format("SIGSTOP process {}", pid), "the process exited");
    auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(2);
    while (!all_threads_stopped(pid)) {
      if (std::chrono::steady_clock::now() > deadline)
        fail("process {} did not stop within 2 s for the soft-dirty scan (is it traced or in D state?)", pid);
      std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
  }
  ~Freeze() { ::syscall(SYS_pidfd_send_signal, pidfd_, SIGCONT, nullptr, 0); }
  Freeze(const Freeze&) = delete;
  Freeze& operator=(const Freeze&) = delete;

 private:
  int pidfd_;
};

}  // namespace

bool SoftDirtyTracker::supported(std::string* why) {
  auto no = [&](const std::string& w) {
    if (why) *why = w;
    return false;
  };
  void* p = ::mmap(nullptr, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) return no(std::string("mmap probe page: ") + std::strerror(errno));
  bool ok = false;
  std::string reason;
  {
    UniqueFd cr(::open("/proc/self/clear_refs", O_WRONLY | O_CLOEXEC));
    UniqueFd pm(::open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC));
    if (!cr || !pm) {
      reason = std::string("cannot open /proc/self/clear_refs or pagemap: ") + std::strerror(errno);
    } else {
      static_cast<volatile char*>(p)[0] = 1;
      uint64_t e = 0;
      off_t off = static_cast<off_t>(reinterpret_cast<uintptr_t>(p) / 4096 * 8);
      if (::pwrite(cr.get(), "4", 1, 0) != 1) {
        reason = std::string("clear_refs 4: ") + std::strerror(errno);
      } else if (::pread(pm.get(), &e, 8, off) != 8) {
        reason = std::string("read pagemap: ") + std::strerror(errno);
      } else if (e & kSoftDirtyBit) {
        reason = "soft-dirty bit still set after clear_refs: the kernel lacks CONFIG_MEM_SOFT_DIRTY";
      } else {
        static_cast<volatile char*>(p)[0] = 2;
        if (::pread(pm.get(), &e, 8, off) != 8)
          reason = std::string("read pagemap: ") + std::strerror(errno);
        else if (!(e & kSoftDirtyBit))
          reason = "a write did not set the soft-dirty bit: the kernel lacks CONFIG_MEM_SOFT_DIRTY";
        else
          ok = true;
      }
    }
  }
  ::munmap(p, 4096);
  return ok ? true : no(reason);
}

SoftDirtyTracker::SoftDirtyTracker(pid_t pid, uint64_t addr, uint64_t len) : pid_(pid), addr_(addr), len_(len) {
  if (addr % checkpoint::kPageSize || len % checkpoint::kPageSize || len == 0)
    fail("soft-dirty tracker: range {:#x}+{:#x} of pid {} is not page-aligned", addr, len, pid);
  std::string why;
  if (!supported(&why)) fail("soft-dirty tracking unavailable: {}", why);
  bool covered = false;
  uint64_t at = addr;
  for (const auto& m : read_maps(pid)) {
    if (m.end <= at || m.start > at) continue;
    at = m.end;
    if (at >= addr + len) {
      covered = true;
      break;
    }
  }
  if (!covered) fail("soft-dirty tracker: range {:#x}+{:#x} is not fully mapped in process {}", addr, len, pid);
  const std::string pm = fmt::format("/proc/{}/pagemap", pid), cr = fmt::format("/proc/{}/clear_refs", pid);
  pagemap_.reset(::open(pm.c_str(), O_RDONLY | O_CLOEXEC));
  if (!pagemap_) throw SysError(errno, "open " + pm, "run ftd as root");
  clear_refs_.reset(::open(cr.c_str(), O_WRONLY | O_CLOEXEC));
  if (!clear_refs_) throw SysError(errno, "open " + cr, "run ftd as root");
  pidfd_.reset(static_cast<int>(::syscall(SYS_pidfd_open, pid, 0)));
  if (!pidfd_) throw SysError(errno, fmt::format("pidfd_open {}", pid), "is the process running?");
  entries_.resize(page_count());
  log::info("tracker", "soft-dirty tracking pid {} range {:#x}+{:#x} ({} pages)", pid, addr, len, page_count());
}

void SoftDirtyTracker::collect_and_reset(std::vector<uint64_t>& out) {
  const std::string what = fmt::format("/proc/{}/pagemap", pid_);
  try {
    Freeze f(pidfd_.get(), pid_);
    if (!first_)
      read_exact(pagemap_.get(), entries_.data(), entries_.size() * 8, static_cast<off_t>(addr_ / 4096 * 8), what);
    write_clear_refs(clear_refs_.get(), fmt::format("/proc/{}/clear_refs", pid_));
  } catch (const Error& e) {
    if (::syscall(SYS_pidfd_send_signal, pidfd_.get(), 0, nullptr, 0) != 0)
      fail("soft-dirty tracker: process {} is gone (exited or was killed): {}", pid_, e.what());
    throw;
  }
  if (first_) {
    first_ = false;
    for (uint64_t i = 0; i < page_count(); i++) out.push_back(i);
    return;
  }
  for (uint64_t i = 0; i < entries_.size(); i++)
    if (entries_[i] & kSoftDirtyBit) out.push_back(i);
}

}  // namespace ftvm::vmm
