#include "vmm-glue/process.h"

#include <dirent.h>
#include <fcntl.h>
#include <poll.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <utility>

#include <fmt/format.h>

#include "common/error.h"

namespace ftvm::vmm {

namespace {

const char* kMemfdHint =
    "start QEMU with -object memory-backend-memfd,id=mem0,size=<RAM size>,share=on -machine "
    "memory-backend=mem0 (libvirt: <memoryBacking><source type='memfd'/><access "
    "mode='shared'/></memoryBacking>)";

std::string read_proc_file(pid_t pid, const char* name) {
  std::string path = fmt::format("/proc/{}/{}", pid, name);
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd) {
    int err = errno;
    throw SysError(err, "open " + path,
                   err == ENOENT ? fmt::format("process {} is not running", pid)
                                 : "run ftd as root or as the QEMU user");
  }
  std::string out;
  char buf[65536];
  for (;;) {
    ssize_t n = ::read(fd.get(), buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    check_sys(n, "read " + path);
    if (n == 0) break;
    out.append(buf, static_cast<size_t>(n));
  }
  return out;
}

}  // namespace

std::vector<MapLine> read_maps(pid_t pid) {
  std::vector<MapLine> out;
  std::istringstream in(read_proc_file(pid, "maps"));
  std::string line;
  while (std::getline(in, line)) {
    MapLine m;
    char perms[8] = {};
    int path_at = -1;
    unsigned long long start, end, offset, inode;
    if (std::sscanf(line.c_str(), "%llx-%llx %7s %llx %x:%x %llu %n", &start, &end, perms,
                    &offset, &m.dev_major, &m.dev_minor, &inode, &path_at) < 7)
      fail("/proc/{}/maps: cannot parse line '{}' (unexpected kernel format)", pid, line);
    m.start = start;
    m.end = end;
    m.offset = offset;
    m.inode = inode;
    m.perms = perms;
    if (path_at >= 0 && static_cast<size_t>(path_at) <= line.size()) m.path = line.substr(path_at);
    out.push_back(std::move(m));
  }
  return out;
}

std::vector<std::string> read_cmdline(pid_t pid) {
  std::string raw = read_proc_file(pid, "cmdline");
  if (raw.empty())
    fail("/proc/{}/cmdline is empty: process {} is a zombie or a kernel thread, not a running "
         "QEMU",
         pid, pid);
  std::vector<std::string> argv;
  size_t pos = 0;
  while (pos < raw.size()) {
    size_t nul = raw.find('\0', pos);
    if (nul == std::string::npos) nul = raw.size();
    argv.push_back(raw.substr(pos, nul - pos));
    pos = nul + 1;
  }
  return argv;
}

GuestRam find_guest_ram(pid_t pid, uint64_t size) {
  if (size == 0) fail("find_guest_ram: RAM size 0 for process {} (caller bug)", pid);
  auto maps = read_maps(pid);
  std::vector<const MapLine*> found;
  std::string seen;  // what mappings of `size` bytes exist instead, for the error message
  for (const auto& m : maps) {
    if (m.end - m.start != size) continue;
    bool shared = m.perms.size() >= 4 && m.perms[3] == 's';
    bool memfd = m.path.rfind("/memfd:", 0) == 0;
    if (shared && memfd && m.offset == 0 && m.inode != 0) {
      bool dup = false;
      for (auto* f : found) dup |= f->inode == m.inode && f->dev_major == m.dev_major &&
                                   f->dev_minor == m.dev_minor;
      if (!dup) found.push_back(&m);
      continue;
    }
    seen += fmt::format("{}{} mapping{}{}", seen.empty() ? "" : "; ",
                        shared ? "a shared" : "a private",
                        m.path.empty() ? " of anonymous memory" : " of " + m.path,
                        memfd && !shared ? " (memory-backend-memfd without share=on)" : "");
  }
  if (found.empty())
    fail("QEMU process {} has no shared memfd mapping of {} bytes for guest RAM ({}); {}", pid,
         size, seen.empty() ? "no mapping of that size at all: check the size from query-memdev"
                            : "found " + seen,
         kMemfdHint);
  if (found.size() > 1)
    fail("QEMU process {} maps {} different memfds of {} bytes ({:#x} and {:#x}); cannot tell "
         "which is the guest RAM: give the guest a single memory-backend-memfd",
         pid, found.size(), size, found[0]->start, found[1]->start);

  const MapLine& m = *found[0];
  GuestRam ram;
  ram.addr = m.start;
  ram.size = size;
  ram.backing = m.path;
  ram.inode = m.inode;
  ram.dev = makedev(m.dev_major, m.dev_minor);

  std::string fd_dir = fmt::format("/proc/{}/fd", pid);
  DIR* d = ::opendir(fd_dir.c_str());
  if (!d)
    throw SysError(errno, "opendir " + fd_dir, "run ftd as root or as the QEMU user");
  struct Closer {
    DIR* d;
    ~Closer() { ::closedir(d); }
  } closer{d};
  for (;;) {
    errno = 0;
    dirent* e = ::readdir(d);
    if (!e) {
      if (errno) throw SysError(errno, "readdir " + fd_dir);
      break;
    }
    if (e->d_name[0] == '.') continue;
    struct stat st {};
    std::string p = fd_dir + "/" + e->d_name;
    if (::stat(p.c_str(), &st) < 0) continue;  // closed meanwhile, or not stat-able: not ours
    if (st.st_ino == ram.inode && st.st_dev == ram.dev) {
      ram.target_fd = std::atoi(e->d_name);
      return ram;
    }
  }
  fail("QEMU process {} maps guest RAM from {} (inode {}) but holds no descriptor for it in {}; "
       "ftd cannot open the RAM without it (QEMU 7.2 keeps memory-backend-memfd's fd open; is "
       "this QEMU?)",
       pid, ram.backing, ram.inode, fd_dir);
}

MappedRam::MappedRam(pid_t pid, const GuestRam& ram, Access access) : size_(ram.size), access_(access) {
  std::string path = fmt::format("/proc/{}/fd/{}", pid, ram.target_fd);
  int flags = (access == Access::ReadWrite ? O_RDWR : O_RDONLY) | O_CLOEXEC;
  fd_.reset(::open(path.c_str(), flags));
  if (!fd_) {
    int err = errno;
    throw SysError(err, "open " + path + " (guest RAM of QEMU process " + std::to_string(pid) + ")",
                   err == ENOENT ? "QEMU exited or closed the descriptor: find the RAM again"
                                 : "run ftd as root or as the QEMU user");
  }
  struct stat st {};
  check_sys(::fstat(fd_.get(), &st), "fstat " + path);
  if (st.st_ino != ram.inode || st.st_dev != ram.dev)
    fail("{} is no longer the guest RAM memfd (inode {} instead of {}): QEMU reused the "
         "descriptor; find the RAM again",
         path, static_cast<uint64_t>(st.st_ino), ram.inode);
  if (static_cast<uint64_t>(st.st_size) < ram.size)
    fail("{} holds {} bytes, less than the {} bytes of guest RAM; find the RAM again", path,
         static_cast<int64_t>(st.st_size), ram.size);
  map(path);
}

MappedRam::MappedRam(int fd, uint64_t size, Access access, const std::string& what)
    : size_(size), access_(access) {
  fd_.reset(check_sys(::fcntl(fd, F_DUPFD_CLOEXEC, 0), "dup descriptor of " + what));
  struct stat st {};
  check_sys(::fstat(fd_.get(), &st), "fstat " + what);
  if (static_cast<uint64_t>(st.st_size) < size)
    fail("{} holds {} bytes, less than the {} bytes requested; size it first (ftruncate)", what,
         static_cast<int64_t>(st.st_size), size);
  map(what);
}

void MappedRam::map(const std::string& what) {
  if (size_ == 0) fail("mapping {}: size 0 (caller bug)", what);
  int prot = PROT_READ | (access_ == Access::ReadWrite ? PROT_WRITE : 0);
  void* p = ::mmap(nullptr, size_, prot, MAP_SHARED, fd_.get(), 0);
  if (p == MAP_FAILED)
    throw SysError(errno, fmt::format("mmap {} bytes of {}", size_, what),
                   access_ == Access::ReadWrite ? "is the descriptor open read-write?" : "");
  data_ = static_cast<uint8_t*>(p);
}

std::vector<std::pair<uint64_t, uint64_t>> MappedRam::data_ranges() const {
  constexpr uint64_t kPage = 4096;
  const uint64_t pages = size_ / kPage;
  std::vector<std::pair<uint64_t, uint64_t>> out;
  off_t pos = 0;
  while (static_cast<uint64_t>(pos) < size_) {
    const off_t data = ::lseek(fd_.get(), pos, SEEK_DATA);
    if (data < 0) {
      if (errno == ENXIO) break;  // no data from pos on
      if (errno == EINVAL && out.empty() && pos == 0) return {{0, pages}};  // no SEEK_DATA here
      throw SysError(errno, fmt::format("lseek(SEEK_DATA) at {} on guest RAM memfd", pos));
    }
    if (static_cast<uint64_t>(data) >= size_) break;
    off_t hole = ::lseek(fd_.get(), data, SEEK_HOLE);
    if (hole < 0) throw SysError(errno, fmt::format("lseek(SEEK_HOLE) at {} on guest RAM memfd", data));
    const uint64_t first = static_cast<uint64_t>(data) / kPage;
    const uint64_t end = std::min<uint64_t>(pages, (static_cast<uint64_t>(hole) + kPage - 1) / kPage);
    if (end > first) {
      if (!out.empty() && out.back().second >= first)
        out.back().second = std::max(out.back().second, end);
      else
        out.emplace_back(first, end);
    }
    pos = hole;
  }
  return out;
}

void MappedRam::unmap() noexcept {
  if (data_) ::munmap(data_, size_);  // cannot fail for a range we mapped
  data_ = nullptr;
}

MappedRam::MappedRam(MappedRam&& o) noexcept
    : fd_(std::move(o.fd_)),
      data_(std::exchange(o.data_, nullptr)),
      size_(std::exchange(o.size_, 0)),
      access_(o.access_) {}

MappedRam& MappedRam::operator=(MappedRam&& o) noexcept {
  if (this != &o) {
    unmap();
    fd_ = std::move(o.fd_);
    data_ = std::exchange(o.data_, nullptr);
    size_ = std::exchange(o.size_, 0);
    access_ = o.access_;
  }
  return *this;
}

MappedRam::~MappedRam() { unmap(); }

ProcessWatch::ProcessWatch(pid_t pid) : pid_(pid) {
  long r = ::syscall(SYS_pidfd_open, pid, 0);
  if (r < 0) {
    int err = errno;
    throw SysError(err, fmt::format("pidfd_open on process {}", pid),
                   err == ESRCH    ? "the process is not running"
                   : err == ENOSYS ? "needs Linux >= 5.3"
                                   : "");
  }
  fd_.reset(static_cast<int>(r));
}

bool ProcessWatch::alive() const { return !wait_exit(std::chrono::milliseconds(0)); }

bool ProcessWatch::wait_exit(std::chrono::milliseconds timeout) const {
  auto deadline = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    pollfd p{fd_.get(), POLLIN, 0};
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        deadline - std::chrono::steady_clock::now());
    int r = ::poll(&p, 1, left.count() > 0 ? static_cast<int>(left.count()) : 0);
    if (r < 0 && errno == EINTR) continue;
    check_sys(r, fmt::format("poll on pidfd of process {}", pid_));
    return r > 0;
  }
}

bool ProcessWatch::send_signal(int sig) const {
  if (::syscall(SYS_pidfd_send_signal, fd_.get(), sig, nullptr, 0) == 0) return true;
  if (errno == ESRCH) return false;
  throw SysError(errno, fmt::format("pidfd_send_signal({}) to process {}", sig, pid_));
}

}  // namespace ftvm::vmm
