// Test helpers for the injector and uffd-wp tracker tests: child processes that are real
// targets (own mm, own threads), killed and reaped by PID when the test ends, pass or fail.
// Header-only because tests/CMakeLists.txt compiles only tests/unit/test_*.cc.
#pragma once

#include <fcntl.h>
#include <signal.h>
#include <sched.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

namespace ftvm::testing {

// Kills (SIGKILL) and reaps one child by PID on destruction.
class ChildGuard {
 public:
  ChildGuard() = default;
  explicit ChildGuard(pid_t pid) : pid_(pid) {}
  ChildGuard(const ChildGuard&) = delete;
  ChildGuard& operator=(const ChildGuard&) = delete;
  ~ChildGuard() { kill_and_reap(); }
  pid_t pid() const { return pid_; }
  void reset(pid_t pid) {
    kill_and_reap();
    pid_ = pid;
  }
  void kill_and_reap() {
    if (pid_ <= 0) return;
    ::kill(pid_, SIGKILL);
    while (::waitpid(pid_, nullptr, __WALL) < 0 && errno == EINTR) {
    }
    pid_ = -1;
  }

 private:
  pid_t pid_ = -1;
};

inline void write_all(int fd, const void* p, size_t n) {
  auto* c = static_cast<const char*>(p);
  while (n) {
    ssize_t r = ::write(fd, c, n);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) throw std::runtime_error(std::string("test pipe write: ") + std::strerror(errno));
    c += r;
    n -= static_cast<size_t>(r);
  }
}

inline void read_all(int fd, void* p, size_t n) {
  auto* c = static_cast<char*>(p);
  while (n) {
    ssize_t r = ::read(fd, c, n);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0)
      throw std::runtime_error(std::string("test pipe read: ") +
                               (r == 0 ? "EOF (child died?)" : std::strerror(errno)));
    c += r;
    n -= static_cast<size_t>(r);
  }
}

// In the child: no exceptions escape, no return to the test framework.
[[noreturn]] inline void child_die(const char* what) {
  char buf[256];
  int n = snprintf(buf, sizeof buf, "test child %d: %s: %s\n", getpid(), what, strerror(errno));
  if (n > 0) (void)!::write(2, buf, static_cast<size_t>(n));
  _exit(111);
}

// Forks; the child runs `fn(cmd_fd, ack_fd)` and _exits. The parent gets the other ends.
struct Child {
  ChildGuard guard;
  int cmd = -1;  // parent writes
  int ack = -1;  // parent reads
  ~Child() {
    guard.kill_and_reap();
    if (cmd >= 0) ::close(cmd);
    if (ack >= 0) ::close(ack);
  }
  pid_t pid() const { return guard.pid(); }
};

inline void spawn(Child& c, const std::function<void(int, int)>& fn) {
  int to_child[2], from_child[2];
  if (::pipe2(to_child, O_CLOEXEC) || ::pipe2(from_child, O_CLOEXEC))
    throw std::runtime_error(std::string("pipe2: ") + std::strerror(errno));
  pid_t pid = ::fork();
  if (pid < 0) throw std::runtime_error(std::string("fork: ") + std::strerror(errno));
  if (pid == 0) {
    ::close(to_child[1]);
    ::close(from_child[0]);
    fn(to_child[0], from_child[1]);
    _exit(0);
  }
  ::close(to_child[0]);
  ::close(from_child[1]);
  c.guard.reset(pid);
  c.cmd = to_child[1];
  c.ack = from_child[0];
}

inline uint64_t splitmix64(uint64_t& s) {
  uint64_t z = (s += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// A child that maps shared memory (memfd, or a file on a private huge=always tmpfs) and writes
// into it on command. The test maps the same memory to diff it.
class MemTarget {
 public:
  enum class Backing { Memfd, ThpTmpfs };
  struct Options {
    size_t size = 64 << 20;
    Backing backing = Backing::Memfd;
    bool prefault = false;  // child writes every page once before the tracker starts
    bool sparse = false;    // child never touches pages with (page / 16) % 4 == 3
  };

  explicit MemTarget(Options o) : o_(o) {
    spawn(child_, [o](int cmd, int ack) { child_main(o, cmd, ack); });
    uint64_t info[3];
    read_all(child_.ack, info, sizeof info);
    addr_ = info[0];
    thp_ok_ = info[2] != 0;
    std::string fdpath = "/proc/" + std::to_string(child_.pid()) + "/fd/" + std::to_string(info[1]);
    int fd = ::open(fdpath.c_str(), O_RDWR | O_CLOEXEC);
    if (fd < 0) throw std::runtime_error("open " + fdpath + ": " + std::strerror(errno));
    void* v = ::mmap(nullptr, o.size, PROT_READ, MAP_SHARED, fd, 0);
    ::close(fd);
    if (v == MAP_FAILED) throw std::runtime_error(std::string("mmap view: ") + std::strerror(errno));
    view_ = static_cast<const uint8_t*>(v);
  }
  ~MemTarget() {
    if (view_) ::munmap(const_cast<uint8_t*>(view_), o_.size);
  }

  pid_t pid() const { return child_.pid(); }
  uint64_t addr() const { return addr_; }
  size_t size() const { return o_.size; }
  size_t pages() const { return o_.size / 4096; }
  const uint8_t* view() const { return view_; }
  bool thp_backing_ok() const { return thp_ok_; }
  void kill() { child_.guard.kill_and_reap(); }

  // Child performs `n` random writes derived from `seed`, then acknowledges.
  void write_random(uint32_t n, uint64_t seed) { command(kOpWrite, n, seed, true); }
  // Child writes one byte (incremented) in each of `n` random pages.
  void touch_random(uint32_t n, uint64_t seed) { command(kOpTouch, n, seed, true); }
  // Child starts writing continuously until stop_running(), which returns after it stopped.
  void start_running(uint64_t seed) { command(kOpRun, 0, seed, false); }
  uint64_t stop_running() {
    char c = 's';
    write_all(child_.cmd, &c, 1);
    uint64_t writes;
    read_all(child_.ack, &writes, sizeof writes);
    return writes;
  }

 private:
  static constexpr uint32_t kOpWrite = 1, kOpTouch = 2, kOpRun = 3;
  struct Cmd {
    uint32_t op, n;
    uint64_t seed;
  };

  void command(uint32_t op, uint32_t n, uint64_t seed, bool wait) {
    Cmd c{op, n, seed};
    write_all(child_.cmd, &c, sizeof c);
    if (wait) {
      uint64_t done;
      read_all(child_.ack, &done, sizeof done);
    }
  }

  static uint64_t pick_page(const Options& o, uint64_t& s) {
    size_t pages = o.size / 4096;
    for (;;) {
      uint64_t p = splitmix64(s) % pages;
      if (!o.sparse || (p / 16) % 4 != 3) return p;
    }
  }

  // One random write: a single byte, a short span, a whole page, or a run of pages; sometimes
  // the same page again. Content is random.
  static void one_write(const Options& o, uint8_t* mem, uint64_t& s, uint64_t& last_page) {
    uint64_t r = splitmix64(s);
    uint64_t page = (r % 8 == 0) ? last_page : pick_page(o, s);
    last_page = page;
    size_t pages = o.size / 4096;
    uint8_t* p = mem + page * 4096;
    switch ((r >> 8) % 10) {
      case 0: case 1: case 2: case 3:  // single byte
        p[splitmix64(s) % 4096] = static_cast<uint8_t>(splitmix64(s));
        break;
      case 4: case 5: case 6: {  // a few bytes to a page
        size_t off = splitmix64(s) % 4096, len = 1 + splitmix64(s) % (4096 - off);
        for (size_t i = 0; i < len; ++i) p[off + i] = static_cast<uint8_t>(splitmix64(s));
        break;
      }
      case 7: case 8: {  // whole page
        for (size_t i = 0; i < 4096; i += 8) {
          uint64_t v = splitmix64(s);
          std::memcpy(p + i, &v, 8);
        }
        break;
      }
      default: {  // a run of up to 64 pages, skipping never-touched ones when sparse
        size_t run = 1 + splitmix64(s) % 64;
        for (size_t q = page; q < page + run && q < pages; ++q) {
          if (o.sparse && (q / 16) % 4 == 3) continue;
          uint64_t v = splitmix64(s);
          std::memcpy(mem + q * 4096 + (v % 4088), &v, 8);
        }
        break;
      }
    }
  }

  static void child_main(Options o, int cmd, int ack) {
    int fd = -1;
    uint64_t thp_ok = 0;
    if (o.backing == Backing::Memfd) {
      fd = static_cast<int>(::syscall(SYS_memfd_create, "tracker-test", 0));
      if (fd < 0) child_die("memfd_create");
    } else {
      // A huge=always tmpfs in a private mount namespace: vanishes with this process.
      if (::unshare(CLONE_NEWNS)) child_die("unshare(CLONE_NEWNS)");
      if (::mount(nullptr, "/", nullptr, MS_REC | MS_PRIVATE, nullptr)) child_die("mount private");
      char dir[] = "/tmp/ftvm-thp-XXXXXX";
      if (!::mkdtemp(dir)) child_die("mkdtemp");
      bool mounted = ::mount("tmpfs", dir, "tmpfs", 0, "huge=always") == 0;
      std::string file = std::string(dir) + "/ram";
      fd = ::open(file.c_str(), O_RDWR | O_CREAT | O_EXCL, 0600);
      if (fd < 0) child_die("open tmpfs file");
      ::unlink(file.c_str());
      if (mounted) ::umount2(dir, MNT_DETACH);
      ::rmdir(dir);
      thp_ok = mounted;
    }
    if (::ftruncate(fd, static_cast<off_t>(o.size))) child_die("ftruncate");
    // 2 MiB aligned so huge pages can be PMD-mapped.
    size_t align = 2 << 20;
    void* raw = ::mmap(nullptr, o.size + align, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (raw == MAP_FAILED) child_die("mmap reserve");
    uint64_t a = (reinterpret_cast<uint64_t>(raw) + align - 1) & ~(align - 1);
    void* m = ::mmap(reinterpret_cast<void*>(a), o.size, PROT_READ | PROT_WRITE,
                     MAP_SHARED | MAP_FIXED, fd, 0);
    if (m == MAP_FAILED) child_die("mmap shared");
    auto* mem = static_cast<uint8_t*>(m);
    if (o.prefault)
      for (size_t p = 0; p < o.size / 4096; ++p)
        if (!o.sparse || (p / 16) % 4 != 3) mem[p * 4096] = 1;
    if (o.backing == Backing::ThpTmpfs) {
      std::ifstream f("/proc/self/smaps_rollup");
      std::string line;
      uint64_t kb = 0;
      while (std::getline(f, line))
        if (line.rfind("FilePmdMapped:", 0) == 0 || line.rfind("ShmemPmdMapped:", 0) == 0)
          kb += std::strtoull(line.c_str() + line.find(':') + 1, nullptr, 10);
      thp_ok = thp_ok && kb > 0;
    }
    uint64_t info[3] = {a, static_cast<uint64_t>(fd), thp_ok};
    write_all(ack, info, sizeof info);
    uint64_t last = 0;
    for (;;) {
      Cmd c;
      ssize_t r = ::read(cmd, &c, sizeof c);
      if (r == 0) _exit(0);
      if (r != sizeof c) child_die("read command");
      uint64_t s = c.seed, done = 0;
      if (c.op == kOpWrite) {
        for (uint32_t i = 0; i < c.n; ++i) one_write(o, mem, s, last);
        done = c.n;
      } else if (c.op == kOpTouch) {
        for (uint32_t i = 0; i < c.n; ++i) mem[pick_page(o, s) * 4096 + 17]++;
        done = c.n;
      } else if (c.op == kOpRun) {
        int fl = ::fcntl(cmd, F_GETFL);
        ::fcntl(cmd, F_SETFL, fl | O_NONBLOCK);
        char stop;
        while (::read(cmd, &stop, 1) != 1) {
          for (int i = 0; i < 64; ++i) one_write(o, mem, s, last);
          done += 64;
        }
        ::fcntl(cmd, F_SETFL, fl);
      }
      write_all(ack, &done, sizeof done);
    }
  }

  Options o_;
  Child child_;
  uint64_t addr_ = 0;
  bool thp_ok_ = false;
  const uint8_t* view_ = nullptr;
};

}  // namespace ftvm::testing
