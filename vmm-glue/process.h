// What ftd needs to know about a running QEMU process, read from /proc, and access to its guest
// RAM. Needs the privileges to read /proc/PID/{maps,fd} of the QEMU process (root, or the same
// user with ptrace access).
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "common/fd.h"

namespace ftvm::vmm {

// argv of process `pid` from /proc/PID/cmdline. Throws ftvm::Error when the process does not
// exist or has no command line (zombie, kernel thread).
std::vector<std::string> read_cmdline(pid_t pid);

// One line of /proc/PID/maps.
struct MapLine {
  uint64_t start = 0, end = 0, offset = 0, inode = 0;
  unsigned dev_major = 0, dev_minor = 0;
  std::string perms, path;  // path: "" for anonymous mappings, "[vdso]", "/memfd:... (deleted)"
};

// The memory mappings of `pid` (or of a thread id). Throws ftvm::Error when the process is
// gone or the file cannot be parsed.
std::vector<MapLine> read_maps(pid_t pid);

// The guest's main RAM inside a QEMU process: a MAP_SHARED mapping, at offset 0, of a memfd of
// exactly `size` bytes (QEMU 7.2 names it "/memfd:memory-backend-memfd (deleted)").
struct GuestRam {
  uint64_t addr = 0;    // start of the mapping in QEMU's address space
  uint64_t size = 0;    // bytes
  int target_fd = -1;   // QEMU's descriptor for the memfd (/proc/PID/fd/target_fd)
  std::string backing;  // the mapping's path as /proc/PID/maps shows it
  uint64_t inode = 0;   // identity of the memfd, checked again when it is opened
  uint64_t dev = 0;
};

// Finds the guest RAM of QEMU process `pid`. `size` is the size of the main RAM backend; get it
// from QMP `query-memdev` (the "size" of the backend whose id is the machine's memory-backend),
// not from the command line (which may say "256M", "1G", or nothing for libvirt's JSON bytes).
// Throws ftvm::Error when no such mapping exists, naming what was found instead (anonymous RAM,
// private or file mapping) and the QEMU options to use:
//   -object memory-backend-memfd,id=mem0,size=...,share=on -machine memory-backend=mem0
// or when several distinct memfds of that size are mapped (ambiguous).
GuestRam find_guest_ram(pid_t pid, uint64_t size);

// RAII mapping of a QEMU process's guest RAM memfd into this process (MAP_SHARED, so writes are
// the guest's memory and reads see the guest's writes). Used read-only on the primary's guest and
// writable on the standby's twin. Move-only; unmaps and closes on destruction.
class MappedRam {
 public:
  enum class Access { ReadOnly, ReadWrite };

  // Opens /proc/PID/fd/<ram.target_fd> and checks it is still the memfd `ram` describes (same
  // inode, at least ram.size bytes) before mapping ram.size bytes of it.
  MappedRam(pid_t pid, const GuestRam& ram, Access access);
  // Maps `size` bytes of an fd this process already holds (a memfd it created or received);
  // `what` names it in errors. The fd is duplicated; the caller keeps its own.
  MappedRam(int fd, uint64_t size, Access access, const std::string& what);

  MappedRam(MappedRam&& o) noexcept;
  MappedRam& operator=(MappedRam&& o) noexcept;
  MappedRam(const MappedRam&) = delete;
  MappedRam& operator=(const MappedRam&) = delete;
  ~MappedRam();

  uint8_t* data() const { return data_; }
  uint64_t size() const { return size_; }
  bool writable() const { return access_ == Access::ReadWrite; }
  // The open memfd (e.g. to hand to QEMU with add-fd, or to pread/pwrite/sendfile).
  int fd() const { return fd_.get(); }
  // The 4 KiB pages of the mapping that hold data, as sorted, disjoint [first, end) page
  // ranges, from lseek(SEEK_DATA/SEEK_HOLE) on the memfd: nothing is read or faulted in, holes
  // (never-touched guest RAM) are left out. A page may turn from hole to data right after (the
  // guest runs): callers track writes from before the call. A filesystem without SEEK_DATA
  // reports the whole mapping as data. Throws SysError on other lseek failures.
  std::vector<std::pair<uint64_t, uint64_t>> data_ranges() const;

 private:
  void map(const std::string& what);
  void unmap() noexcept;

  UniqueFd fd_;
  uint8_t* data_ = nullptr;
  uint64_t size_ = 0;
  Access access_ = Access::ReadOnly;
};

// Watches a process through a pidfd (race-free against pid reuse once constructed). fd() becomes
// readable (POLLIN) when the process exits, so it can sit in ftd's poll loop. Does not reap: the
// parent (if it is us) still has to waitpid().
class ProcessWatch {
 public:
  // Throws SysError when the process does not exist (ESRCH) or pidfd_open is unavailable.
  explicit ProcessWatch(pid_t pid);

  pid_t pid() const { return pid_; }
  int fd() const { return fd_.get(); }
  bool alive() const;
  // True when the process exited within `timeout` (0 = just check).
  bool wait_exit(std::chrono::milliseconds timeout) const;
  // pidfd_send_signal: signals exactly this process, never a reused pid. False if it already
  // exited; throws SysError on other failures.
  bool send_signal(int sig) const;

 private:
  pid_t pid_;
  UniqueFd fd_;
};

}  // namespace ftvm::vmm
