// Injector tests against real child processes: a single-threaded echo server blocked in read()
// (so attaching interrupts a syscall that must restart), and a multi-threaded one.
#include <dirent.h>
#include <pthread.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <catch2/catch.hpp>
#include <chrono>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "common/error.h"
#include "tests/unit/tracker_target.h"
#include "vmm-glue/injector.h"

using ftvm::testing::Child;
using ftvm::vmm::Injector;

namespace {

// Shared with children (MAP_SHARED anonymous, created before fork).
struct Shared {
  std::atomic<uint64_t> spin[4];
  std::atomic<uint64_t> sigusr1;
};

Shared* make_shared() {
  void* p = mmap(nullptr, sizeof(Shared), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  REQUIRE(p != MAP_FAILED);
  return new (p) Shared{};
}

Shared* g_child_shared = nullptr;  // in the child only

void on_sigusr1(int) { g_child_shared->sigusr1.fetch_add(1); }

void* spinner(void* arg) {
  auto* c = static_cast<std::atomic<uint64_t>*>(arg);
  for (;;) c->fetch_add(1, std::memory_order_relaxed);
  return nullptr;
}

// Child: optional spinning threads, then echoes each byte + 1 from cmd to ack.
void echo_child(Shared* sh, int threads, int cmd, int ack) {
  g_child_shared = sh;
  struct sigaction sa {};
  sa.sa_handler = on_sigusr1;
  sa.sa_flags = SA_RESTART;
  sigaction(SIGUSR1, &sa, nullptr);
  for (int i = 0; i < threads; ++i) {
    pthread_t t;
    if (pthread_create(&t, nullptr, spinner, &sh->spin[i])) ftvm::testing::child_die("pthread");
  }
  for (;;) {
    unsigned char c;
    ssize_t r = read(cmd, &c, 1);
    if (r == 0) _exit(0);
    if (r < 0) {
      if (errno == EINTR) continue;
      ftvm::testing::child_die("read");
    }
    c++;
    if (write(ack, &c, 1) != 1) ftvm::testing::child_die("write");
  }
}

void expect_echo(Child& c, unsigned char v) {
  ftvm::testing::write_all(c.cmd, &v, 1);
  unsigned char r = 0;
  ftvm::testing::read_all(c.ack, &r, 1);
  CHECK(r == static_cast<unsigned char>(v + 1));
}

std::vector<pid_t> tids_of(pid_t pid) {
  std::vector<pid_t> out;
  std::string d = "/proc/" + std::to_string(pid) + "/task";
  DIR* dir = opendir(d.c_str());
  REQUIRE(dir);
  while (dirent* e = readdir(dir))
    if (e->d_name[0] != '.') out.push_back(std::stoi(e->d_name));
  closedir(dir);
  return out;
}

int count_uffds(pid_t pid) {
  std::string d = "/proc/" + std::to_string(pid) + "/fd";
  DIR* dir = opendir(d.c_str());
  REQUIRE(dir);
  int n = 0;
  while (dirent* e = readdir(dir)) {
    char l[256] = {};
    if (readlink((d + "/" + e->d_name).c_str(), l, sizeof l - 1) > 0 && strstr(l, "userfaultfd"))
      n++;
  }
  closedir(dir);
  return n;
}

void wait_threads(pid_t pid, size_t n) {
  for (int i = 0; i < 500 && tids_of(pid).size() < n; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  REQUIRE(tids_of(pid).size() == n);
}

}  // namespace

TEST_CASE("injector runs syscalls in a process blocked in read() and restores it", "[injector]") {
  Shared* sh = make_shared();
  Child c;
  ftvm::testing::spawn(c, [sh](int cmd, int ack) { echo_child(sh, 0, cmd, ack); });
  expect_echo(c, 1);
  std::this_thread::sleep_for(std::chrono::milliseconds(20));  // let it block in read()
  for (int round = 0; round < 20; ++round) {
    {
      Injector inj(c.pid());
      CHECK(inj.syscall(SYS_getpid) == c.pid());
      CHECK(inj.syscall(SYS_gettid) == c.pid());
      CHECK(inj.syscall(100000) == -ENOSYS);
      CHECK(inj.syscall(SYS_close, static_cast<uint64_t>(-1)) == -EBADF);
      const char msg[] = "hello";
      inj.write_mem(inj.scratch_addr(), std::as_bytes(std::span(msg, 5)));
      char back[5] = {};
      inj.read_mem(inj.scratch_addr(), std::as_writable_bytes(std::span(back, 5)));
      CHECK(std::memcmp(back, msg, 5) == 0);
      CHECK(inj.syscall(SYS_fcntl, 1000, F_GETFD) == -EBADF);
    }
    expect_echo(c, static_cast<unsigned char>(round * 3));
  }
  munmap(sh, sizeof *sh);
}

TEST_CASE("injector write_mem feeds syscall arguments", "[injector]") {
  Shared* sh = make_shared();
  Child c;
  ftvm::testing::spawn(c, [sh](int cmd, int ack) {
    if (dup2(ack, 100) != 100) ftvm::testing::child_die("dup2");
    echo_child(sh, 0, cmd, ack);
  });
  expect_echo(c, 7);
  {
    Injector inj(c.pid());
    const char msg[] = "ping!";
    inj.write_mem(inj.scratch_addr(), std::as_bytes(std::span(msg, 5)));
    CHECK(inj.syscall(SYS_write, 100, inj.scratch_addr(), 5) == 5);
  }
  char got[5] = {};
  ftvm::testing::read_all(c.ack, got, 5);
  CHECK(std::string(got, 5) == "ping!");
  expect_echo(c, 9);
  munmap(sh, sizeof *sh);
}

TEST_CASE("injector works on multi-threaded targets; other threads keep running", "[injector]") {
  Shared* sh = make_shared();
  Child c;
  ftvm::testing::spawn(c, [sh](int cmd, int ack) { echo_child(sh, 3, cmd, ack); });
  wait_threads(c.pid(), 4);
  expect_echo(c, 1);
  for (pid_t tid : tids_of(c.pid())) {
    Injector inj(tid);
    CHECK(inj.syscall(SYS_getpid) == c.pid());
    CHECK(inj.syscall(SYS_gettid) == tid);
    uint64_t before[3], after[3];
    for (int i = 0; i < 3; ++i) before[i] = sh->spin[i].load();
    std::this_thread::sleep_for(std::chrono::milliseconds(30));
    for (int i = 0; i < 3; ++i) after[i] = sh->spin[i].load();
    int advanced = 0;
    for (int i = 0; i < 3; ++i) advanced += after[i] > before[i];
    // The stopped thread may be a spinner; the others must have moved.
    CHECK(advanced >= (tid == c.pid() ? 3 : 2));
  }
  expect_echo(c, 50);
  munmap(sh, sizeof *sh);
}

TEST_CASE("injector re-delivers a signal that arrived while attached", "[injector]") {
  Shared* sh = make_shared();
  Child c;
  ftvm::testing::spawn(c, [sh](int cmd, int ack) { echo_child(sh, 0, cmd, ack); });
  expect_echo(c, 1);
  {
    Injector inj(c.pid());
    REQUIRE(kill(c.pid(), SIGUSR1) == 0);
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
    CHECK(sh->sigusr1.load() == 0);  // stopped: not delivered yet
    CHECK(inj.syscall(SYS_getpid) == c.pid());
    CHECK(inj.syscall(SYS_getppid) == getpid());
  }
  for (int i = 0; i < 500 && sh->sigusr1.load() == 0; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  CHECK(sh->sigusr1.load() == 1);
  expect_echo(c, 2);
  munmap(sh, sizeof *sh);
}

TEST_CASE("injector on a nonexistent pid throws a clear Error", "[injector]") {
  pid_t dead = fork();
  REQUIRE(dead >= 0);
  if (dead == 0) _exit(0);
  REQUIRE(waitpid(dead, nullptr, 0) == dead);
  try {
    Injector inj(dead);
    FAIL("attached to a reaped pid");
  } catch (const ftvm::Error& e) {
    std::string msg = e.what();
    CHECK(msg.find(std::to_string(dead)) != std::string::npos);
    CHECK(msg.find("PTRACE_SEIZE") != std::string::npos);
  }
  CHECK_THROWS_AS(ftvm::vmm::inject_userfaultfd(dead), ftvm::Error);
}

TEST_CASE("injector reports a target killed while attached", "[injector]") {
  Shared* sh = make_shared();
  Child c;
  ftvm::testing::spawn(c, [sh](int cmd, int ack) { echo_child(sh, 0, cmd, ack); });
  expect_echo(c, 1);
  Injector inj(c.pid());
  REQUIRE(kill(c.pid(), SIGKILL) == 0);
  try {
    inj.syscall(SYS_getpid);
    FAIL("syscall into a killed process succeeded");
  } catch (const ftvm::Error& e) {
    CHECK(std::string(e.what()).find(std::to_string(c.pid())) != std::string::npos);
  }
  munmap(sh, sizeof *sh);
}

TEST_CASE("inject_userfaultfd pulls a uffd and leaves the target's fd table clean",
          "[injector]") {
  Shared* sh = make_shared();
  Child c;
  ftvm::testing::spawn(c, [sh](int cmd, int ack) { echo_child(sh, 2, cmd, ack); });
  wait_threads(c.pid(), 3);
  expect_echo(c, 1);
  int before = count_uffds(c.pid());
  int fd = ftvm::vmm::inject_userfaultfd(c.pid());
  REQUIRE(fd >= 0);
  char l[256] = {};
  REQUIRE(readlink(("/proc/self/fd/" + std::to_string(fd)).c_str(), l, sizeof l - 1) > 0);
  CHECK(std::string(l).find("userfaultfd") != std::string::npos);
  CHECK(count_uffds(c.pid()) == before);
  close(fd);
  expect_echo(c, 3);
  munmap(sh, sizeof *sh);
}
