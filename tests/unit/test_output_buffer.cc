// Output commit (tools/ftd/output_buffer.h): filter-redirector stream parser under hostile input,
// and the holding/release rules over real sockets standing in for QEMU's chardevs.
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <chrono>
#include <thread>

#include "common/error.h"
#include "tools/ftd/output_buffer.h"

using namespace ftvm;
using namespace ftvm::ftd;

namespace {

std::vector<std::byte> wire(uint32_t len, uint32_t vlen, uint8_t fill, bool vnet = true, size_t body = SIZE_MAX) {
  RedirFrame f;
  f.vnet_hdr_len = vlen;
  f.data.assign(body == SIZE_MAX ? len : body, std::byte{fill});
  auto w = encode_redir_frame(f, vnet);
  // overwrite the length field with `len` (hostile: may disagree with the body)
  w[0] = std::byte(len >> 24); w[1] = std::byte(len >> 16); w[2] = std::byte(len >> 8); w[3] = std::byte(len);
  return w;
}

std::vector<std::byte> cat(std::initializer_list<std::vector<std::byte>> parts) {
  std::vector<std::byte> v;
  for (auto& p : parts) v.insert(v.end(), p.begin(), p.end());
  return v;
}

void write_all(int fd, const std::vector<std::byte>& v) {
  size_t off = 0;
  while (off < v.size()) {
    ssize_t n = ::write(fd, v.data() + off, v.size() - off);
    REQUIRE(n > 0);
    off += static_cast<size_t>(n);
  }
}

// Reads whatever arrives on `fd` within `ms`.
std::vector<std::byte> drain(int fd, int ms) {
  std::vector<std::byte> out;
  auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(ms);
  while (std::chrono::steady_clock::now() < until) {
    pollfd p{fd, POLLIN, 0};
    if (::poll(&p, 1, 10) <= 0) continue;
    std::byte b[65536];
    ssize_t n = ::read(fd, b, sizeof(b));
    if (n <= 0) break;
    out.insert(out.end(), b, b + n);
  }
  return out;
}

size_t count_frames(const std::vector<std::byte>& bytes) {
  RedirParser p("test", true);
  std::vector<RedirFrame> fr;
  p.feed(bytes, fr);
  CHECK(p.partial_bytes() == 0);
  return fr.size();
}

struct Rig {
  int qemu_out, qemu_in;  // QEMU's ends: writes diverted frames / reads released frames
  OutputBuffer ob{"t", OutputOptions{4096, true}};
  Rig() {
    int a[2], b[2];
    REQUIRE(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, a) == 0);
    REQUIRE(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, b) == 0);
    qemu_out = a[0];
    qemu_in = b[0];
    ob.add_channel("n0", UniqueFd(a[1]), UniqueFd(b[1]));
    ob.start();
  }
  ~Rig() {
    ::close(qemu_out);
    ::close(qemu_in);
  }
};

}  // namespace

TEST_CASE("redirector parser: frames split anywhere, several per read", "[output]") {
  auto stream = cat({wire(60, 12, 1), wire(1500, 12, 2), wire(13, 12, 3), wire(65546, 10, 4)});
  for (size_t chunk : {size_t{1}, size_t{3}, size_t{7}, size_t{4096}, stream.size()}) {
    RedirParser p("t", true);
    std::vector<RedirFrame> out;
    for (size_t off = 0; off < stream.size(); off += chunk)
      p.feed(std::span(stream).subspan(off, std::min(chunk, stream.size() - off)), out);
    REQUIRE(out.size() == 4);
    CHECK(out[0].data.size() == 60);
    CHECK(out[1].data.size() == 1500);
    CHECK(out[3].data.size() == 65546);
    CHECK(out[3].vnet_hdr_len == 10);
    CHECK(out[2].data[0] == std::byte{3});
    CHECK(p.partial_bytes() == 0);
    // re-encoding gives the same bytes back (what goes to QEMU's indev)
    std::vector<std::byte> re;
    for (auto& f : out) {
      auto w = encode_redir_frame(f, true);
      re.insert(re.end(), w.begin(), w.end());
    }
    CHECK(re == stream);
  }
}

TEST_CASE("redirector parser: hostile headers are protocol errors", "[output]") {
  struct Case {
    const char* what;
    std::vector<std::byte> bytes;
  };
  std::vector<Case> cases = {
      {"length 0", wire(0, 0, 0, true, 0)},
      {"oversized", wire(kMaxFrame + 13, 12, 0, true, 8)},
      {"huge length", wire(0xffffffffu, 0, 0, true, 8)},
      {"vnet header too long", wire(200, 100, 0, true, 8)},
      {"vnet header longer than frame", wire(8, 12, 0, true, 8)},
  };
  for (auto& c : cases) {
    INFO(c.what);
    RedirParser p("netdev n0 divert stream", true);
    std::vector<RedirFrame> out;
    auto stream = cat({wire(60, 12, 1), c.bytes});
    CHECK_THROWS_AS(p.feed(stream, out), ProtocolError);
    CHECK(out.size() == 1);  // the good frame before it was delivered
    // the stream has lost its framing: everything after is refused
    CHECK_THROWS_WITH(p.feed(wire(60, 12, 1), out), Catch::Matchers::Contains("lost its framing"));
  }
  RedirParser p("t", false);  // without vnet headers: 4-byte prefix only
  std::vector<RedirFrame> out;
  CHECK_THROWS_WITH(p.feed(wire(0, 0, 0, false, 0), out), Catch::Matchers::Contains("bad frame header"));
}

TEST_CASE("redirector parser: a truncated frame stays partial, never delivered", "[output]") {
  RedirParser p("t", true);
  std::vector<RedirFrame> out;
  auto w = wire(1500, 12, 7);
  w.resize(w.size() - 1);
  p.feed(w, out);
  CHECK(out.empty());
  CHECK(p.partial_bytes() == w.size());
}

TEST_CASE("output buffer: frames leave only after their epoch is released", "[output]") {
  Rig r;
  r.ob.seal(1);  // holding from epoch 1's cut: frames now belong to epoch 2
  write_all(r.qemu_out, cat({wire(100, 12, 1), wire(100, 12, 2)}));
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  CHECK(drain(r.qemu_in, 50).empty());
  r.ob.seal(2);
  write_all(r.qemu_out, wire(100, 12, 3));  // epoch 3
  r.ob.release(1);
  CHECK(drain(r.qemu_in, 50).empty());  // nothing of epoch 1
  r.ob.release(2);
  auto got = drain(r.qemu_in, 100);
  CHECK(count_frames(got) == 2);
  CHECK(got == cat({wire(100, 12, 1), wire(100, 12, 2)}));  // in order, unchanged
  auto st = r.ob.status();
  CHECK(st["mode"] == "holding");
  CHECK(st["frames_released"] == 2);
  CHECK(st["held_frames"] == 1);
  CHECK(st["held_bytes"] == 100);
  r.ob.seal(3);
  r.ob.release(3);
  CHECK(count_frames(drain(r.qemu_in, 100)) == 1);
  CHECK(r.ob.flush(std::chrono::milliseconds(500)));
}

TEST_CASE("output buffer: pass-through releases what is held and forwards at once", "[output]") {
  Rig r;
  // before the first cut: pass-through (not protected yet)
  write_all(r.qemu_out, wire(60, 12, 1));
  CHECK(count_frames(drain(r.qemu_in, 100)) == 1);
  r.ob.seal(5);
  write_all(r.qemu_out, cat({wire(60, 12, 2), wire(60, 12, 3)}));
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  r.ob.pass_through("degraded: test");
  CHECK(count_frames(drain(r.qemu_in, 100)) == 2);
  write_all(r.qemu_out, wire(60, 12, 4));
  CHECK(count_frames(drain(r.qemu_in, 100)) == 1);
  auto st = r.ob.status();
  CHECK(st["mode"] == "pass-through");
  CHECK(st["mode_reason"] == "degraded: test");
  r.ob.seal(6);  // protected again: holding
  write_all(r.qemu_out, wire(60, 12, 5));
  CHECK(drain(r.qemu_in, 50).empty());
}

TEST_CASE("output buffer: the cap asks for an early cut, never drops", "[output]") {
  Rig r;  // cap 4096 bytes
  r.ob.seal(1);
  for (int i = 0; i < 10; i++) write_all(r.qemu_out, wire(1000, 12, static_cast<uint8_t>(i)));
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  CHECK(r.ob.cut_requested());
  r.ob.seal(2);
  r.ob.release(2);
  CHECK(!r.ob.cut_requested());
  CHECK(count_frames(drain(r.qemu_in, 200)) == 10);
  CHECK(r.ob.status()["held_bytes_peak"] == 10000);
}

TEST_CASE("output buffer: a bad frame or a vanished socket releases nothing early", "[output]") {
  SECTION("bad frame") {
    Rig r;
    r.ob.seal(1);
    write_all(r.qemu_out, cat({wire(100, 12, 1), wire(0, 0, 0, true, 0), wire(100, 12, 2)}));
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    CHECK(drain(r.qemu_in, 50).empty());
    auto st = r.ob.status();
    CHECK_THAT(st["netdevs"][0]["error"].get<std::string>(), Catch::Matchers::Contains("bad frame header"));
    CHECK(st["netdevs"][0]["divert_open"] == false);
    CHECK(st["held_frames"] == 1);  // the good frame before it
    r.ob.seal(2);
    r.ob.release(2);
    CHECK(count_frames(drain(r.qemu_in, 100)) == 1);
  }
  SECTION("vanished socket mid-frame") {
    Rig r;
    r.ob.seal(1);
    auto w = cat({wire(100, 12, 1), wire(100, 12, 2)});
    w.resize(w.size() - 10);
    write_all(r.qemu_out, w);
    ::shutdown(r.qemu_out, SHUT_WR);
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    CHECK(drain(r.qemu_in, 50).empty());
    auto st = r.ob.status();
    CHECK_THAT(st["netdevs"][0]["error"].get<std::string>(), Catch::Matchers::Contains("truncated frame"));
    r.ob.seal(2);
    r.ob.release(2);
    CHECK(count_frames(drain(r.qemu_in, 100)) == 1);  // the complete frame only
  }
  SECTION("return socket gone") {
    Rig r;
    r.ob.seal(1);
    write_all(r.qemu_out, wire(100, 12, 1));
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    ::shutdown(r.qemu_in, SHUT_RDWR);
    r.ob.seal(2);
    r.ob.release(2);  // logs, never throws
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    CHECK_THAT(r.ob.status()["netdevs"][0]["error"].get<std::string>(), Catch::Matchers::Contains("return socket"));
  }
}

TEST_CASE("guest netdev ids from the QEMU command line", "[output]") {
  std::vector<std::string> argv = {"qemu", "-netdev", "tap,id=n0,ifname=t0", "-device", "virtio-net-pci,netdev=n0",
                                   "--netdev", R"({"type":"user","id":"u1"})", "-nic", "user", "-nic", "none",
                                   "-nic", "tap,ifname=x"};
  CHECK(guest_netdevs(argv) == std::vector<std::string>{"n0", "u1", "__org.qemu.nic0", "__org.qemu.nic2"});
  CHECK(guest_netdevs({"qemu", "-m", "1G"}).empty());
}
