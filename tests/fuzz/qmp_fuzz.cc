// Fuzz target: the QMP client (vmm-glue/qmp.h) against a "QEMU" whose whole output (greeting,
// capabilities reply, command replies, events) is the input. connect() and execute() must return
// or throw ftvm::Error (QmpError included); never crash or hang.
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>

#include "common/error.h"
#include "common/fd.h"
#include "vmm-glue/qmp.h"

namespace {

struct Fixture {
  std::string path;
  ftvm::UniqueFd listener;
  Fixture() {
    char dir[] = "/tmp/ftvm-qmp-fuzz-XXXXXX";
    if (!::mkdtemp(dir)) std::abort();
    path = std::string(dir) + "/qmp.sock";
    listener.reset(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
    sockaddr_un a{};
    a.sun_family = AF_UNIX;
    std::strncpy(a.sun_path, path.c_str(), sizeof a.sun_path - 1);
    if (::bind(listener.get(), reinterpret_cast<sockaddr*>(&a), sizeof a) != 0 || ::listen(listener.get(), 4) != 0)
      std::abort();
  }
};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static Fixture* fx = new Fixture;
  std::thread qemu([&] {
    ftvm::UniqueFd c(::accept4(fx->listener.get(), nullptr, nullptr, SOCK_CLOEXEC));
    if (!c) return;
    size_t off = 0;
    while (off < size) {
      ssize_t n = ::send(c.get(), data + off, size - off, MSG_NOSIGNAL);
      if (n <= 0) break;
      off += static_cast<size_t>(n);
    }
    ::shutdown(c.get(), SHUT_WR);  // then EOF: the client never waits for a timeout
    char buf[4096];
    while (::read(c.get(), buf, sizeof buf) > 0) {
    }
  });
  try {
    auto q = ftvm::vmm::QmpClient::connect(fx->path, std::chrono::milliseconds(2000));
    (void)q.execute("query-status");
    (void)q.take_events();
    (void)q.execute("stop", nlohmann::json::object());
  } catch (const ftvm::Error&) {
  }
  qemu.join();
  return 0;
}
