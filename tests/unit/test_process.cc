#include <catch2/catch.hpp>

#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include "common/error.h"
#include "common/fd.h"
#include "vmm-glue/process.h"
#include "vmm-glue/qmp.h"

using namespace ftvm;
using namespace ftvm::vmm;
using namespace std::chrono_literals;

namespace {

struct ProcTempDir {
  std::string path;
  ProcTempDir() {
    char tmpl[] = "/tmp/ftvm-test-proc-XXXXXX";
    if (!::mkdtemp(tmpl)) throw SysError(errno, "mkdtemp");
    path = tmpl;
  }
  ~ProcTempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
};

// A child process, SIGKILLed and reaped by PID when the test ends, pass or fail.
class Child {
 public:
  explicit Child(std::vector<std::string> argv, const std::string& log = "/dev/null") {
    pid_ = ::fork();
    if (pid_ < 0) throw SysError(errno, "fork");
    if (pid_ == 0) {
      ::prctl(PR_SET_PDEATHSIG, SIGKILL);
      int lf = ::open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
      if (lf >= 0) {
        ::dup2(lf, 1);
        ::dup2(lf, 2);
      }
      std::vector<char*> a;
      for (auto& s : argv) a.push_back(s.data());
      a.push_back(nullptr);
      ::execvp(a[0], a.data());
      ::_exit(127);
    }
  }
  ~Child() { reap(); }
  void reap() {
    if (pid_ <= 0) return;
    ::kill(pid_, SIGKILL);
    int st;
    while (::waitpid(pid_, &st, 0) < 0 && errno == EINTR) {
    }
    pid_ = -1;
  }
  pid_t pid() const { return pid_; }

 private:
  pid_t pid_ = -1;
};

bool have_qemu() { return std::system("command -v qemu-system-x86_64 >/dev/null 2>&1") == 0; }

// QEMU with RAM in a memory-backend-memfd (share on/off), no guest code: starts in ms.
struct MemfdQemu {
  ProcTempDir dir;
  std::string sock = dir.path + "/qmp.sock";
  Child child;
  explicit MemfdQemu(bool share, const std::string& size = "64M")
      : child({"qemu-system-x86_64", "-machine", "none,memory-backend=mem0", "-m", size,
               "-object",
               "memory-backend-memfd,id=mem0,size=" + size + ",share=" + (share ? "on" : "off"),
               "-nodefaults", "-display", "none", "-qmp", "unix:" + sock + ",server=on,wait=off"},
              dir.path + "/qemu.log") {}
};

uint64_t memdev_size(QmpClient& c, const std::string& id) {
  for (auto& m : c.execute("query-memdev"))
    if (m.value("id", "") == id) return m["size"].get<uint64_t>();
  FAIL("no memdev " << id);
  return 0;
}

}  // namespace

TEST_CASE("read_cmdline returns argv", "[process]") {
  // "; true" keeps the shell from exec'ing sleep, so the argv stays the shell's.
  Child c({"sh", "-c", "sleep 30; true", "a b", ""});
  // The child execs asynchronously (mid-execve its cmdline reads empty); wait for the shell's.
  std::vector<std::string> argv;
  for (int i = 0; i < 400; ++i) {
    try {
      argv = read_cmdline(c.pid());
    } catch (const Error&) {
    }
    if (!argv.empty() && argv[0] == "sh") break;
    ::usleep(5000);
  }
  CHECK(argv == std::vector<std::string>{"sh", "-c", "sleep 30; true", "a b", ""});
  CHECK(read_cmdline(::getpid()).size() >= 1);
  CHECK_THROWS_WITH(read_cmdline(0x3fffffff), Catch::Contains("not running"));
}

TEST_CASE("ProcessWatch sees a process exit", "[process]") {
  Child c({"sleep", "30"});
  ProcessWatch w(c.pid());
  CHECK(w.pid() == c.pid());
  CHECK(w.fd() >= 0);
  CHECK(w.alive());
  CHECK_FALSE(w.wait_exit(50ms));
  CHECK(w.send_signal(SIGKILL));
  CHECK(w.wait_exit(5000ms));
  CHECK_FALSE(w.alive());  // exited (a zombie until reaped) counts as not alive
  c.reap();
  CHECK_FALSE(w.send_signal(SIGKILL));  // gone: no error, no other process signalled
  CHECK_THROWS_WITH(ProcessWatch(0x3fffffff), Catch::Contains("not running"));
}

TEST_CASE("MappedRam over a memfd this process holds", "[process]") {
  UniqueFd m(::memfd_create("ftvm-test", MFD_CLOEXEC));
  REQUIRE(m);
  REQUIRE(::ftruncate(m.get(), 1 << 20) == 0);
  MappedRam w(m.get(), 1 << 20, MappedRam::Access::ReadWrite, "test memfd");
  MappedRam r(m.get(), 1 << 20, MappedRam::Access::ReadOnly, "test memfd");
  CHECK(w.writable());
  CHECK_FALSE(r.writable());
  std::memcpy(w.data() + 4096, "hello", 5);
  CHECK(std::memcmp(r.data() + 4096, "hello", 5) == 0);
  MappedRam moved = std::move(w);
  CHECK(moved.size() == (1u << 20));
  CHECK(w.data() == nullptr);
  CHECK_THROWS_WITH(MappedRam(m.get(), 2 << 20, MappedRam::Access::ReadOnly, "test memfd"),
                    Catch::Contains("less than"));
}

TEST_CASE("MappedRam::data_ranges lists the pages that hold data, not the holes (issue 17)", "[process]") {
  UniqueFd m(::memfd_create("ftvm-test", MFD_CLOEXEC));
  REQUIRE(m);
  REQUIRE(::ftruncate(m.get(), 1 << 20) == 0);  // 256 pages, all holes
  MappedRam w(m.get(), 1 << 20, MappedRam::Access::ReadWrite, "test memfd");
  CHECK(w.data_ranges().empty());
  for (int pg : {0, 5, 6, 7, 255}) w.data()[pg * 4096 + 17] = 1;
  using R = std::vector<std::pair<uint64_t, uint64_t>>;
  CHECK(w.data_ranges() == R{{0, 1}, {5, 8}, {255, 256}});
  // Reading a hole through the mapping allocates it (what the full sync used to do for every page).
  volatile uint8_t x = w.data()[100 * 4096];
  (void)x;
  CHECK(w.data_ranges() == R{{0, 1}, {5, 8}, {100, 101}, {255, 256}});
}

TEST_CASE("find_guest_ram and MappedRam on a real QEMU with memfd RAM", "[process][qemu]") {
  if (!have_qemu()) {
    WARN("qemu-system-x86_64 not found: skipping");
    return;
  }
  MemfdQemu q(true);
  auto c = QmpClient::connect(q.sock, 10000ms);
  REQUIRE(c.peer_pid() == q.child.pid());
  uint64_t size = memdev_size(c, "mem0");
  CHECK(size == (64u << 20));

  auto argv = read_cmdline(c.peer_pid());
  CHECK(argv[0] == "qemu-system-x86_64");

  GuestRam ram = find_guest_ram(c.peer_pid(), size);
  INFO("backing " << ram.backing << " fd " << ram.target_fd);
  CHECK(ram.size == size);
  CHECK(ram.addr != 0);
  CHECK(ram.target_fd > 2);
  CHECK(ram.backing.rfind("/memfd:", 0) == 0);

  // The twin-side writable mapping and the primary-side read-only mapping see the same pages,
  // and so does QEMU (checked by reading through its descriptor).
  MappedRam w(c.peer_pid(), ram, MappedRam::Access::ReadWrite);
  MappedRam r(c.peer_pid(), ram, MappedRam::Access::ReadOnly);
  REQUIRE(w.size() == size);
  const char msg[] = "ftvm was here";
  std::memcpy(w.data() + size - 4096, msg, sizeof msg);
  CHECK(std::memcmp(r.data() + size - 4096, msg, sizeof msg) == 0);
  std::string path = "/proc/" + std::to_string(c.peer_pid()) + "/fd/" + std::to_string(ram.target_fd);
  UniqueFd f(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  REQUIRE(f);
  char buf[sizeof msg] = {};
  REQUIRE(::pread(f.get(), buf, sizeof buf, static_cast<off_t>(size - 4096)) == sizeof buf);
  CHECK(std::memcmp(buf, msg, sizeof msg) == 0);

  // Wrong size: a clear error naming the QEMU options.
  CHECK_THROWS_WITH(find_guest_ram(c.peer_pid(), size / 2),
                    Catch::Contains("memory-backend-memfd,id=mem0"));

  // A stale GuestRam (descriptor now something else) is refused rather than mapped.
  GuestRam stale = ram;
  stale.inode += 1;
  CHECK_THROWS_WITH(MappedRam(c.peer_pid(), stale, MappedRam::Access::ReadOnly),
                    Catch::Contains("no longer the guest RAM"));

  ProcessWatch watch(c.peer_pid());
  CHECK(watch.alive());
  c.execute("quit");
  CHECK(watch.wait_exit(5000ms));
  // The mapping outlives QEMU: the memfd stays alive while we hold it.
  CHECK(std::memcmp(r.data() + size - 4096, msg, sizeof msg) == 0);
}

TEST_CASE("find_guest_ram refuses private memfd RAM with the option to use", "[process][qemu]") {
  if (!have_qemu()) {
    WARN("qemu-system-x86_64 not found: skipping");
    return;
  }
  MemfdQemu q(false);
  auto c = QmpClient::connect(q.sock, 10000ms);
  uint64_t size = memdev_size(c, "mem0");
  CHECK_THROWS_WITH(find_guest_ram(c.peer_pid(), size),
                    Catch::Contains("without share=on") && Catch::Contains("share=on -machine"));
}
