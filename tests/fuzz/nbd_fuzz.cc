// Fuzz target: the NBD server (vmm-glue/nbd_server.h) that QEMU's mirror job writes to; the
// input is the client's byte stream (handshake options, then transmission requests). The server
// runs on its own thread over a unix socket against a 1 MiB in-memory export; it must answer or
// close, never crash, and never write outside the export.
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "common/error.h"
#include "common/fd.h"
#include "vmm-glue/nbd_server.h"

namespace nbd = ftvm::vmm::nbd;

namespace {

class MemBackend : public nbd::Backend {
 public:
  std::vector<std::byte> mem = std::vector<std::byte>(1 << 20);
  uint64_t size() const override { return mem.size(); }
  int read(uint64_t off, std::span<std::byte> out) override {
    check(off, out.size());
    std::memcpy(out.data(), mem.data() + off, out.size());
    return 0;
  }
  int write(uint64_t off, std::span<const std::byte> d, bool) override {
    check(off, d.size());
    std::memcpy(mem.data() + off, d.data(), d.size());
    return 0;
  }
  int write_zeroes(uint64_t off, uint64_t len, bool) override {
    check(off, len);
    std::memset(mem.data() + off, 0, len);
    return 0;
  }
  int trim(uint64_t off, uint64_t len) override { return write_zeroes(off, len, false); }
  int flush() override { return 0; }

 private:
  void check(uint64_t off, uint64_t len) const {
    if (off > mem.size() || len > mem.size() - off) std::abort();  // the server must check ranges
  }
};

struct Fixture {
  std::string path;
  MemBackend backend;
  std::unique_ptr<nbd::Server> server;
  Fixture() {
    char dir[] = "/tmp/ftvm-nbd-fuzz-XXXXXX";
    if (!::mkdtemp(dir)) std::abort();
    path = std::string(dir) + "/nbd.sock";
    nbd::Options o;
    o.max_payload = 64 << 10;
    server = std::make_unique<nbd::Server>(path, backend, o);
    server->start();
  }
};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static Fixture* fx = new Fixture;  // one server for the whole run
  ftvm::UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  sockaddr_un a{};
  a.sun_family = AF_UNIX;
  std::strncpy(a.sun_path, fx->path.c_str(), sizeof a.sun_path - 1);
  // The server serves one client at a time: retry while it finishes the previous one.
  for (int i = 0; ::connect(fd.get(), reinterpret_cast<sockaddr*>(&a), sizeof a) != 0; i++) {
    if (i > 1000) std::abort();
    ::usleep(1000);
  }
  size_t off = 0;
  bool wr_open = true;
  char buf[65536];
  for (int idle = 0; idle < 200;) {  // at most ~2 s without progress
    pollfd p{fd.get(), static_cast<short>(POLLIN | (wr_open ? POLLOUT : 0)), 0};
    if (::poll(&p, 1, 10) <= 0) {
      idle++;
      continue;
    }
    if (p.revents & (POLLIN | POLLHUP | POLLERR)) {
      ssize_t n = ::read(fd.get(), buf, sizeof buf);
      if (n <= 0) break;  // the server closed the connection
      idle = 0;
    }
    if (wr_open && (p.revents & POLLOUT)) {
      if (off < size) {
        ssize_t n = ::send(fd.get(), data + off, size - off, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n > 0) off += static_cast<size_t>(n);
        else wr_open = false;
      } else {
        ::shutdown(fd.get(), SHUT_WR);
        wr_open = false;
      }
    }
  }
  return 0;
}
