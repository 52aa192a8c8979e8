// NBD server (vmm-glue/nbd_server.h): a real QEMU NBD client (qemu-io) against the server over a
// file, and hand-made protocol exchanges on a raw socket for every rejection path.
#include <catch2/catch.hpp>

#include <endian.h>
#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/error.h"
#include "common/fd.h"
#include "vmm-glue/nbd_server.h"

using namespace ftvm;
using namespace ftvm::vmm::nbd;

namespace {

constexpr uint64_t kSize = 4u << 20;  // export size used throughout
constexpr unsigned char kFill = 0x11;  // initial content of every byte of the image

// Wire constants the tests speak (proto.md).
constexpr uint64_t kNbdMagic = 0x4e42444d41474943ull;
constexpr uint64_t kOptMagic = 0x49484156454f5054ull;
constexpr uint64_t kOptReplyMagic = 0x0003e889045565a9ull;
constexpr uint32_t kOptExportName = 1, kOptAbort = 2, kOptList = 3, kOptInfo = 6, kOptGo = 7,
                   kOptStructuredReply = 8;
constexpr uint32_t kRepAck = 1, kRepServer = 2, kRepInfo = 3;
constexpr uint32_t kRepErrUnsup = 0x80000001u, kRepErrUnknown = 0x80000006u;
constexpr uint32_t kReqMagic = 0x25609513u, kSimpleReplyMagic = 0x67446698u;
constexpr uint16_t kCmdRead = 0, kCmdWrite = 1, kCmdDisc = 2, kCmdFlush = 3, kCmdTrim = 4, kCmdWriteZeroes = 6,
                   kCmdBlockStatus = 7;
constexpr uint16_t kFlagFua = 1, kFlagNoHole = 2;

struct TempDir {
  std::string path;
  TempDir() {
    char tmpl[] = "/tmp/ftvm-test-nbd-XXXXXX";
    if (!::mkdtemp(tmpl)) throw SysError(errno, "mkdtemp");
    path = tmpl;
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
};

// A disk image of kSize bytes, every byte kFill.
std::string make_image(const std::string& dir) {
  std::string p = dir + "/disk.img";
  UniqueFd fd(check_sys(::open(p.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600), "create " + p));
  std::vector<unsigned char> buf(kSize, kFill);
  REQUIRE(::pwrite(fd.get(), buf.data(), buf.size(), 0) == static_cast<ssize_t>(buf.size()));
  return p;
}

std::vector<unsigned char> file_bytes(const std::string& path, uint64_t off, size_t len) {
  UniqueFd fd(check_sys(::open(path.c_str(), O_RDONLY | O_CLOEXEC), "open " + path));
  std::vector<unsigned char> v(len);
  REQUIRE(::pread(fd.get(), v.data(), len, static_cast<off_t>(off)) == static_cast<ssize_t>(len));
  return v;
}

bool all_equal(const std::vector<unsigned char>& v, unsigned char b) {
  for (unsigned char c : v)
    if (c != b) return false;
  return true;
}

// Forwards to a FileBackend over the image and counts the calls (to prove rejected requests never
// reach the backend).
class CountingBackend : public Backend {
 public:
  explicit CountingBackend(const std::string& path)
      : file_(UniqueFd(check_sys(::open(path.c_str(), O_RDWR | O_CLOEXEC), "open " + path)), path) {}
  uint64_t size() const override { return file_.size(); }
  int read(uint64_t o, std::span<std::byte> out) override {
    ++calls;
    return file_.read(o, out);
  }
  int write(uint64_t o, std::span<const std::byte> d, bool fua) override {
    ++calls;
    ++writes;
    if (fua) ++fua_writes;
    return file_.write(o, d, fua);
  }
  int write_zeroes(uint64_t o, uint64_t l, bool nh) override {
    ++calls;
    return file_.write_zeroes(o, l, nh);
  }
  int trim(uint64_t o, uint64_t l) override {
    ++calls;
    return file_.trim(o, l);
  }
  int flush() override {
    ++calls;
    ++flushes;
    return file_.flush();
  }
  std::atomic<int> calls{0}, writes{0}, fua_writes{0}, flushes{0};

 private:
  FileBackend file_;
};

// The server under test over a fresh image.
struct Fixture {
  TempDir dir;
  std::string image = make_image(dir.path);
  std::string sock = dir.path + "/nbd.sock";
  CountingBackend backend{image};
  Server server;
  explicit Fixture(Options o = {}) : server(sock, backend, std::move(o)) { server.start(); }
};

std::string be(uint64_t v, int bytes) {
  std::string s;
  for (int i = bytes - 1; i >= 0; --i) s.push_back(static_cast<char>((v >> (8 * i)) & 0xff));
  return s;
}
uint64_t from_be(const std::string& s, size_t off, int bytes) {
  uint64_t v = 0;
  for (int i = 0; i < bytes; ++i) v = (v << 8) | static_cast<unsigned char>(s[off + i]);
  return v;
}

// A hand-driven NBD client. Every receive has a 10 s timeout so a server bug fails the test
// instead of hanging it (the timeout is never what a test asserts on).
class RawClient {
 public:
  explicit RawClient(const std::string& path) {
    fd_ = UniqueFd(check_sys(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0), "socket"));
    timeval tv{10, 0};
    check_sys(::setsockopt(fd_.get(), SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv), "SO_RCVTIMEO");
    sockaddr_un a{};
    a.sun_family = AF_UNIX;
    std::strncpy(a.sun_path, path.c_str(), sizeof a.sun_path - 1);
    check_sys(::connect(fd_.get(), reinterpret_cast<sockaddr*>(&a), sizeof a), "connect " + path);
  }

  void send(const std::string& s) {
    size_t off = 0;
    while (off < s.size()) {
      ssize_t n = ::send(fd_.get(), s.data() + off, s.size() - off, MSG_NOSIGNAL);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) throw std::runtime_error("send failed: " + std::string(std::strerror(errno)));
      off += static_cast<size_t>(n);
    }
  }
  std::string recv(size_t n) {
    std::string s(n, '\0');
    size_t off = 0;
    while (off < n) {
      ssize_t r = ::recv(fd_.get(), s.data() + off, n - off, 0);
      if (r < 0 && errno == EINTR) continue;
      if (r == 0) throw std::runtime_error("server closed the connection");
      if (r < 0) throw std::runtime_error("recv failed: " + std::string(std::strerror(errno)));
      off += static_cast<size_t>(r);
    }
    return s;
  }
  // True when the server closed the connection (EOF or reset) without sending anything more.
  bool closed_by_server() {
    char c;
    ssize_t r;
    do {
      r = ::recv(fd_.get(), &c, 1, 0);
    } while (r < 0 && errno == EINTR);
    return r == 0 || (r < 0 && errno == ECONNRESET);
  }

  // Reads the greeting and sends the client flags.
  void start(bool no_zeroes = true) {
    std::string g = recv(18);
    REQUIRE(from_be(g, 0, 8) == kNbdMagic);
    REQUIRE(from_be(g, 8, 8) == kOptMagic);
    REQUIRE((from_be(g, 16, 2) & 3) == 3);  // FIXED_NEWSTYLE | NO_ZEROES offered
    send(be(no_zeroes ? 3 : 1, 4));
  }
  void option(uint32_t opt, const std::string& data) { send(be(kOptMagic, 8) + be(opt, 4) + be(data.size(), 4) + data); }
  struct OptReply {
    uint32_t opt, type;
    std::string data;
  };
  OptReply opt_reply() {
    std::string h = recv(20);
    REQUIRE(from_be(h, 0, 8) == kOptReplyMagic);
    OptReply r{static_cast<uint32_t>(from_be(h, 8, 4)), static_cast<uint32_t>(from_be(h, 12, 4)), {}};
    r.data = recv(from_be(h, 16, 4));
    return r;
  }
  struct Go {
    uint32_t final_type = 0;
    uint64_t size = 0;
    uint16_t flags = 0;
    bool block_info = false;
    uint32_t min = 0, pref = 0, max = 0;
  };
  // GO (or INFO) for `name` asking for NBD_INFO_BLOCK_SIZE; collects the replies up to the final one.
  Go go(const std::string& name, uint32_t opt = kOptGo) {
    option(opt, be(name.size(), 4) + name + be(1, 2) + be(3, 2));
    Go g;
    for (;;) {
      OptReply r = opt_reply();
      REQUIRE(r.opt == opt);
      if (r.type != kRepInfo) {
        g.final_type = r.type;
        return g;
      }
      uint64_t info = from_be(r.data, 0, 2);
      if (info == 0) {
        REQUIRE(r.data.size() == 12);
        g.size = from_be(r.data, 2, 8);
        g.flags = static_cast<uint16_t>(from_be(r.data, 10, 2));
      } else if (info == 3) {
        REQUIRE(r.data.size() == 14);
        g.block_info = true;
        g.min = static_cast<uint32_t>(from_be(r.data, 2, 4));
        g.pref = static_cast<uint32_t>(from_be(r.data, 6, 4));
        g.max = static_cast<uint32_t>(from_be(r.data, 10, 4));
      }
    }
  }
  // Handshake straight to transmission.
  void connect_export() {
    start();
    Go g = go("ftvm");
    REQUIRE(g.final_type == kRepAck);
    REQUIRE(g.size == kSize);
  }

  void request(uint16_t type, uint64_t offset, uint32_t len, uint64_t handle, uint16_t flags = 0,
               const std::string& payload = {}) {
    send(be(kReqMagic, 4) + be(flags, 2) + be(type, 2) + be(handle, 8) + be(offset, 8) + be(len, 4) + payload);
  }
  // Reads a simple reply; returns its error after checking the handle.
  uint32_t reply(uint64_t handle) {
    std::string r = recv(16);
    REQUIRE(from_be(r, 0, 4) == kSimpleReplyMagic);
    REQUIRE(from_be(r, 8, 8) == handle);
    return static_cast<uint32_t>(from_be(r, 4, 4));
  }
  std::string read(uint64_t offset, uint32_t len, uint64_t handle = 77) {
    request(kCmdRead, offset, len, handle);
    REQUIRE(reply(handle) == 0);
    return recv(len);
  }
  int fd() const { return fd_.get(); }

 private:
  UniqueFd fd_;
};

std::string find_on_path(const std::string& prog) {
  const char* p = std::getenv("PATH");
  std::string path = p ? p : "/usr/local/bin:/usr/bin:/bin";
  size_t start = 0;
  while (start <= path.size()) {
    size_t end = path.find(':', start);
    if (end == std::string::npos) end = path.size();
    std::string cand = path.substr(start, end - start) + "/" + prog;
    if (end > start && ::access(cand.c_str(), X_OK) == 0) return cand;
    start = end + 1;
  }
  return {};
}

struct ProcResult {
  int status = -1;
  std::string output;
};

// Runs qemu-io on the export with the given -c commands; stdout+stderr collected.
ProcResult qemu_io(const std::string& sock, const std::vector<std::string>& cmds) {
  std::string qio = find_on_path("qemu-io");
  if (qio.empty()) FAIL("qemu-io is not on PATH: install qemu-utils (apt-get install qemu-utils)");
  std::string cmd = qio + " -t writeback -f raw 'nbd+unix:///ftvm?socket=" + sock + "'";
  for (const auto& c : cmds) cmd += " -c '" + c + "'";
  cmd += " 2>&1 </dev/null";
  FILE* f = ::popen(cmd.c_str(), "r");
  REQUIRE(f != nullptr);
  ProcResult r;
  char buf[4096];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, f)) > 0) r.output.append(buf, n);
  int st = ::pclose(f);
  r.status = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
  INFO("command: " << cmd);
  INFO("output:\n" << r.output);
  return r;
}

}  // namespace

TEST_CASE("nbd: qemu-io writes, zeroes, discards, flushes and reads through the server", "[nbd]") {
  Fixture fx;
  ProcResult r = qemu_io(fx.sock, {"write -P 0xab 0 64k", "write -f -P 0xcd 128k 4k", "write -P 0xee 70000 3",
                                   "write -z 1M 256k", "write -z -u 1536k 64k", "discard 2M 64k", "flush",
                                   "read -P 0xab 0 64k", "read -P 0xcd 128k 4k", "read -P 0 1M 256k",
                                   "read -P 0x11 3M 4k"});
  INFO("qemu-io output:\n" << r.output);
  CHECK(r.status == 0);
  CHECK(r.output.find("wrote 65536/65536 bytes at offset 0") != std::string::npos);
  CHECK(r.output.find("read 4096/4096 bytes at offset 3145728") != std::string::npos);
  CHECK(r.output.find("Pattern verification failed") == std::string::npos);
  CHECK(r.output.find("error") == std::string::npos);

  // The bytes on disk, read directly.
  CHECK(all_equal(file_bytes(fx.image, 0, 64 << 10), 0xab));
  CHECK(all_equal(file_bytes(fx.image, 64 << 10, 64 << 10), kFill) == false);  // holds the 0xee bytes
  CHECK(all_equal(file_bytes(fx.image, 128 << 10, 4096), 0xcd));
  CHECK(file_bytes(fx.image, 69999, 5) == std::vector<unsigned char>{kFill, 0xee, 0xee, 0xee, kFill});
  CHECK(all_equal(file_bytes(fx.image, 1 << 20, 256 << 10), 0));
  CHECK(all_equal(file_bytes(fx.image, 1536 << 10, 64 << 10), 0));
  CHECK(all_equal(file_bytes(fx.image, 2 << 20, 64 << 10), 0));
  CHECK(all_equal(file_bytes(fx.image, (2 << 20) + (64 << 10), 64 << 10), kFill));
  CHECK(all_equal(file_bytes(fx.image, 3 << 20, 1 << 20), kFill));
  CHECK(fx.backend.fua_writes == 1);  // write -f
  CHECK(fx.backend.flushes >= 1);     // flush

  Stats s = fx.server.stats();
  CHECK(s.connections == 1);
  CHECK(s.writes == 3);
  CHECK(s.write_bytes == (64u << 10) + 4096 + 3);
  CHECK(s.errors == 0);

  SECTION("a write beyond the end fails cleanly and the server keeps serving") {
    auto before = file_bytes(fx.image, kSize - (64 << 10), 64 << 10);
    ProcResult bad = qemu_io(fx.sock, {"write -P 0x77 4032k 128k"});
    INFO("qemu-io output:\n" << bad.output);
    CHECK(bad.output.find("wrote") == std::string::npos);
    CHECK(bad.output.find("write failed") != std::string::npos);
    CHECK(file_bytes(fx.image, kSize - (64 << 10), 64 << 10) == before);
    struct stat st{};
    REQUIRE(::stat(fx.image.c_str(), &st) == 0);
    CHECK(static_cast<uint64_t>(st.st_size) == kSize);

    ProcResult again = qemu_io(fx.sock, {"read -P 0xab 0 64k"});
    INFO("qemu-io output:\n" << again.output);
    CHECK(again.status == 0);
    CHECK(again.output.find("read 65536/65536 bytes at offset 0") != std::string::npos);
    CHECK(fx.server.stats().connections == 3);
  }
}

TEST_CASE("nbd: negotiation answers GO, INFO, LIST and refuses what it does not support", "[nbd]") {
  Fixture fx;
  RawClient c(fx.sock);
  c.start();

  // An unknown option and STRUCTURED_REPLY: ERR_UNSUP, negotiation continues.
  c.option(0x1234, "xyz");
  auto r = c.opt_reply();
  CHECK(r.opt == 0x1234);
  CHECK(r.type == kRepErrUnsup);
  c.option(kOptStructuredReply, "");
  r = c.opt_reply();
  CHECK(r.type == kRepErrUnsup);

  // LIST names the export.
  c.option(kOptList, "");
  r = c.opt_reply();
  REQUIRE(r.type == kRepServer);
  CHECK(r.data == be(4, 4) + "ftvm");
  CHECK(c.opt_reply().type == kRepAck);

  // A wrong export name: ERR_UNKNOWN (with a message), negotiation continues.
  auto bad = c.go("nosuch");
  CHECK(bad.final_type == kRepErrUnknown);

  // INFO, then GO: size, flags, block sizes.
  auto info = c.go("ftvm", kOptInfo);
  CHECK(info.final_type == kRepAck);
  CHECK(info.size == kSize);
  auto g = c.go("ftvm");
  REQUIRE(g.final_type == kRepAck);
  CHECK(g.size == kSize);
  CHECK(g.flags == (1 | 4 | 8 | 32 | 64));  // HAS_FLAGS|SEND_FLUSH|SEND_FUA|SEND_TRIM|SEND_WRITE_ZEROES
  CHECK(g.block_info);
  CHECK(g.min == 1);
  CHECK(g.pref == 4096);
  CHECK(g.max == 32u << 20);

  // Transmission works.
  CHECK(c.read(0, 16) == std::string(16, static_cast<char>(kFill)));
  CHECK(fx.server.stats().errors == 1);  // the unknown export name
}

TEST_CASE("nbd: EXPORT_NAME and ABORT", "[nbd]") {
  Fixture fx;
  SECTION("EXPORT_NAME with the right name enters transmission (zero padding unless NO_ZEROES)") {
    bool no_zeroes = GENERATE(true, false);
    RawClient c(fx.sock);
    c.start(no_zeroes);
    c.option(kOptExportName, "ftvm");
    std::string m = c.recv(10 + (no_zeroes ? 0 : 124));
    CHECK(from_be(m, 0, 8) == kSize);
    CHECK(from_be(m, 8, 2) == (1 | 4 | 8 | 32 | 64));
    if (!no_zeroes) CHECK(m.substr(10) == std::string(124, '\0'));
    CHECK(c.read(4096, 8) == std::string(8, static_cast<char>(kFill)));
  }
  SECTION("EXPORT_NAME with a wrong name closes the connection") {
    RawClient c(fx.sock);
    c.start();
    c.option(kOptExportName, "other");
    CHECK(c.closed_by_server());
    CHECK(fx.server.stats().errors == 1);
    RawClient c2(fx.sock);
    c2.connect_export();
  }
  SECTION("ABORT is acknowledged and the connection closed") {
    RawClient c(fx.sock);
    c.start();
    c.option(kOptAbort, "");
    CHECK(c.opt_reply().type == kRepAck);
    CHECK(c.closed_by_server());
  }
  CHECK(fx.backend.calls <= 1);
}

TEST_CASE("nbd: valid commands reach the file", "[nbd]") {
  Fixture fx;
  RawClient c(fx.sock);
  c.connect_export();
  c.request(kCmdWrite, 8192, 4, 1, kFlagFua, "WXYZ");
  CHECK(c.reply(1) == 0);
  CHECK(c.read(8190, 8) == std::string("\x11\x11WXYZ\x11\x11"));
  c.request(kCmdWriteZeroes, 8192, 2, 2, kFlagNoHole);
  CHECK(c.reply(2) == 0);
  c.request(kCmdTrim, 65536, 4096, 3);
  CHECK(c.reply(3) == 0);
  c.request(kCmdFlush, 0, 0, 4);
  CHECK(c.reply(4) == 0);
  CHECK(file_bytes(fx.image, 8190, 8) == std::vector<unsigned char>{kFill, kFill, 0, 0, 'Y', 'Z', kFill, kFill});
  CHECK(all_equal(file_bytes(fx.image, 65536, 4096), 0));
  CHECK(fx.backend.fua_writes == 1);
  CHECK(fx.backend.flushes == 1);
  c.request(kCmdDisc, 0, 0, 5);
  CHECK(c.closed_by_server());
  Stats s = fx.server.stats();
  CHECK(s.requests == 6);
  CHECK(s.writes == 1);
  CHECK(s.write_bytes == 4);
  CHECK(s.errors == 0);
}

TEST_CASE("nbd: bad requests get an error reply, never reach the backend, and the connection stays usable",
          "[nbd]") {
  Fixture fx;
  RawClient c(fx.sock);
  c.connect_export();
  const auto before = file_bytes(fx.image, 0, kSize);
  const int calls = fx.backend.calls;

  c.request(kCmdRead, kSize - 512, 4096, 10);  // out of range
  CHECK(c.reply(10) == EINVAL);
  c.request(kCmdRead, ~0ull - 10, 4096, 11);  // offset + length overflows
  CHECK(c.reply(11) == EINVAL);
  c.request(kCmdRead, 0, 0, 12);  // zero length
  CHECK(c.reply(12) == EINVAL);
  c.request(kCmdRead, 0, (32u << 20) + 1, 13);  // longer than max_payload
  CHECK(c.reply(13) == EINVAL);
  c.request(kCmdWrite, kSize - 512, 4096, 14, 0, std::string(4096, 'Q'));  // out of range: payload skipped
  CHECK(c.reply(14) == ENOSPC);
  c.request(kCmdWrite, ~0ull - 10, 16, 15, 0, std::string(16, 'Q'));
  CHECK(c.reply(15) == ENOSPC);
  c.request(kCmdWrite, 0, 0, 16);
  CHECK(c.reply(16) == EINVAL);
  c.request(kCmdTrim, kSize, 1, 17);
  CHECK(c.reply(17) == EINVAL);
  c.request(kCmdWriteZeroes, kSize - 1, 2, 18);
  CHECK(c.reply(18) == EINVAL);
  c.request(kCmdWriteZeroes, 0, 4096, 19, 1u << 4);  // FAST_ZERO: not advertised
  CHECK(c.reply(19) == EINVAL);
  c.request(42, 0, 4096, 20);  // unknown command type
  CHECK(c.reply(20) == EINVAL);
  c.request(kCmdBlockStatus, 0, 4096, 21);
  CHECK(c.reply(21) == EINVAL);

  CHECK(fx.backend.calls == calls);
  CHECK(file_bytes(fx.image, 0, kSize) == before);
  CHECK(fx.server.stats().errors == 12);
  CHECK_FALSE(fx.server.stats().last_error.empty());

  // Still in sync: a valid read and write work.
  CHECK(c.read(kSize - 4, 4) == std::string(4, static_cast<char>(kFill)));
  c.request(kCmdWrite, kSize - 2, 2, 22, 0, "ok");
  CHECK(c.reply(22) == 0);
  CHECK(file_bytes(fx.image, kSize - 2, 2) == std::vector<unsigned char>{'o', 'k'});
}

TEST_CASE("nbd: protocol violations close the connection; the next client is served", "[nbd]") {
  Options o;
  o.max_payload = 64 << 10;
  Fixture fx(o);
  const auto before = file_bytes(fx.image, 0, kSize);
  {
    RawClient c(fx.sock);
    c.connect_export();
    SECTION("an oversized WRITE") {
      c.request(kCmdWrite, 0, (64u << 10) + 1, 1);
      CHECK(c.closed_by_server());
    }
    SECTION("a bad request magic") {
      c.send(be(0xdeadbeef, 4) + std::string(24, '\0'));
      CHECK(c.closed_by_server());
    }
    SECTION("a short request then hang-up") {
      c.send(be(kReqMagic, 4) + "abc");
      ::shutdown(c.fd(), SHUT_WR);
      CHECK(c.closed_by_server());
    }
  }
  CHECK(fx.backend.calls == 0);
  CHECK(file_bytes(fx.image, 0, kSize) == before);
  RawClient next(fx.sock);
  next.connect_export();
  CHECK(next.read(0, 4) == std::string(4, static_cast<char>(kFill)));
  CHECK(fx.server.stats().connections == 2);
}

TEST_CASE("nbd: one client at a time", "[nbd]") {
  Fixture fx;
  RawClient first(fx.sock);
  first.connect_export();
  RawClient second(fx.sock);
  CHECK(second.closed_by_server());  // no greeting: closed at once
  CHECK(first.read(0, 8) == std::string(8, static_cast<char>(kFill)));
  CHECK(fx.server.stats().connections == 1);
  CHECK(fx.server.stats().connected);
}

TEST_CASE("nbd: peer credentials are checked", "[nbd]") {
  Options o;
  SECTION("a pid that is not allowed is closed and the backend untouched") {
    o.allowed_pid = ::getpid() == 1 ? 2 : 1;
    Fixture fx(o);
    RawClient c(fx.sock);
    CHECK(c.closed_by_server());
    CHECK(fx.backend.calls == 0);
    CHECK(fx.server.stats().connections == 0);
  }
  SECTION("a uid that is not allowed is closed") {
    o.allowed_uid = ::getuid() + 1;
    Fixture fx(o);
    RawClient c(fx.sock);
    CHECK(c.closed_by_server());
    CHECK(fx.server.stats().connections == 0);
  }
  SECTION("the allowed pid and uid are served") {
    o.allowed_pid = ::getpid();
    o.allowed_uid = ::getuid();
    Fixture fx(o);
    RawClient c(fx.sock);
    c.connect_export();
    CHECK(c.read(0, 1) == std::string(1, static_cast<char>(kFill)));
  }
}

TEST_CASE("nbd: drop_client() ends the connection and a new client can connect", "[nbd]") {
  Fixture fx;
  CHECK_FALSE(fx.server.drop_client());
  RawClient c(fx.sock);
  c.connect_export();
  CHECK(fx.server.drop_client());
  CHECK(c.closed_by_server());
  RawClient c2(fx.sock);
  c2.connect_export();
  CHECK(c2.read(0, 2) == std::string(2, static_cast<char>(kFill)));
  CHECK(fx.server.stats().connections == 2);
}

TEST_CASE("nbd: socket setup", "[nbd]") {
  TempDir dir;
  std::string image = make_image(dir.path);
  CountingBackend backend(image);
  SECTION("a stale socket file is replaced; the socket is 0600 and removed by the destructor") {
    std::string sock = dir.path + "/s.sock";
    {
      UniqueFd s(::socket(AF_UNIX, SOCK_STREAM, 0));
      sockaddr_un a{};
      a.sun_family = AF_UNIX;
      std::strncpy(a.sun_path, sock.c_str(), sizeof a.sun_path - 1);
      REQUIRE(::bind(s.get(), reinterpret_cast<sockaddr*>(&a), sizeof a) == 0);
    }
    {
      Server server(sock, backend, {});
      struct stat st{};
      REQUIRE(::stat(sock.c_str(), &st) == 0);
      CHECK((st.st_mode & 0777) == 0600);
      server.start();
      RawClient c(sock);
      c.connect_export();
    }
    CHECK(::access(sock.c_str(), F_OK) != 0);
  }
  SECTION("a server replaced at the same path keeps its socket when the old one is destroyed") {
    std::string sock = dir.path + "/r.sock";
    auto old_server = std::make_unique<Server>(sock, backend, Options{});
    Server fresh(sock, backend, {});
    fresh.start();
    old_server.reset();
    REQUIRE(::access(sock.c_str(), F_OK) == 0);
    RawClient c(sock);
    c.connect_export();
  }
  SECTION("errors name the path") {
    std::string missing = dir.path + "/no/such/dir/s.sock";
    CHECK_THROWS_WITH(Server(missing, backend, {}), Catch::Contains(missing));
    CHECK_THROWS_WITH(Server(image, backend, {}), Catch::Contains("is not a socket"));
    Options o;
    o.max_payload = 512;
    CHECK_THROWS_AS(Server(dir.path + "/x.sock", backend, o), Error);
  }
}
