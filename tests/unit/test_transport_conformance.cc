// Transport conformance suite: the same cases run against every backend through the abstract
// Connection. A backend plugs in with a Rig (how to make connected pairs; optionally a peer
// driven by raw bytes and a peer in a killable process). TCP runs over 127.0.0.1 with
// ephemeral ports; RDMA (built with FTVM_HAVE_RDMA) runs the same cases over rdma_cm on an
// address of an RDMA device, as separate hidden test cases tagged [rdma] (see CONFORMANCE_CASE).
//
// Catch2 assertions are not thread-safe: worker threads return values (or exceptions)
// through std::future, and only the main thread asserts. Time bounds are liveness bounds only.
#include <catch2/catch.hpp>

#include <netinet/in.h>
#include <signal.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <arpa/inet.h>
#include <ifaddrs.h>
#include <spawn.h>

#include <fmt/format.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <chrono>
#include <cstring>
#include <functional>
#include <future>
#include <string>
#include <thread>
#include <vector>

#include "common/error.h"
#include "common/fd.h"
#include "checkpoint/digest.h"
#include "checkpoint/replica.h"
#include "checkpoint/staging.h"
#include "checkpoint/tracker.h"
#include "transport/auth.h"
#include "transport/fake/fake_transport.h"
#include "transport/frame.h"
#include "transport/select.h"
#include "transport/tcp/tcp_transport.h"
#ifdef FTVM_HAVE_RDMA
#include "transport/rdma/rdma_transport.h"
#endif
#include "transport/transport.h"

using namespace std::chrono_literals;
using ftvm::LinkDown;
using ftvm::ProtocolError;
using ftvm::UniqueFd;
using namespace ftvm::transport;

namespace {

using Clock = std::chrono::steady_clock;

struct Pair {
  std::unique_ptr<Connection> a;  // the connecting side
  std::unique_ptr<Connection> b;  // the accepting side
};

// A connection whose peer is a byte stream the test writes by hand (Hello already sent).
struct RawPeer {
  std::unique_ptr<Connection> conn;
  UniqueFd raw;
};

// A connection whose peer lives in a child process.
struct Killable {
  std::unique_ptr<Connection> conn;
  pid_t pid = -1;
};

class Rig {
 public:
  virtual ~Rig() = default;
  // A new connected pair; may be called again after earlier pairs died (reconnect).
  virtual Pair pair() = 0;
  virtual std::optional<RawPeer> raw() { return std::nullopt; }
  virtual std::optional<Killable> killable() { return std::nullopt; }
};

// ---- TCP ----------------------------------------------------------------------------------

void send_raw(int fd, std::span<const std::byte> b) {
  while (!b.empty()) {
    ssize_t n = ::send(fd, b.data(), b.size(), MSG_NOSIGNAL);
    if (n < 0) throw ftvm::SysError(errno, "send on raw test socket");
    b = b.subspan(static_cast<size_t>(n));
  }
}

std::vector<std::byte> hello_bytes(uint16_t version = kWireVersion) {
  FrameHeader h{.version = version, .kind = FrameKind::Hello, .length = kHelloBodySize};
  auto hdr = encode_header(h);
  HelloBody hb;
  hb.version = version;
  auto body = encode_hello(hb);
  std::vector<std::byte> out(hdr.size() + body.size());
  std::memcpy(out.data(), hdr.data(), hdr.size());
  std::memcpy(out.data() + hdr.size(), body.data(), body.size());
  return out;
}

UniqueFd raw_connect(uint16_t port) {
  UniqueFd fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  ftvm::check_sys(fd.get(), "socket");
  sockaddr_in sa{};
  sa.sin_family = AF_INET;
  sa.sin_port = htons(port);
  sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ftvm::check_sys(::connect(fd.get(), reinterpret_cast<sockaddr*>(&sa), sizeof sa), "connect raw test socket");
  return fd;
}

// A key file for the authenticated TCP rigs, created once per test process (mode 0600).
std::shared_ptr<const auth::Key> test_key() {
  static std::shared_ptr<const auth::Key> k = [] {
    char dir[] = "/tmp/ftvm-test-key.XXXXXX";
    if (!::mkdtemp(dir)) throw ftvm::SysError(errno, "mkdtemp for the test key");
    std::string path = std::string(dir) + "/peer.key";
    auth::generate_key(path);
    auto key = auth::load_key(path);
    ::unlink(path.c_str());
    ::rmdir(dir);
    return key;
  }();
  return k;
}

class TcpRig : public Rig {
 public:
  explicit TcpRig(Options o) : opts_(o), listener_("127.0.0.1", 0, o) {}
  Pair pair() override {
    auto acc = std::async(std::launch::async, [&] { return listener_.accept(5s); });
    Pair p;
    p.a = tcp::connect_tcp("127.0.0.1", listener_.bound_port(), opts_);
    p.b = acc.get();
    return p;
  }
  std::optional<RawPeer> raw() override {
    if (opts_.key) return std::nullopt;  // a raw peer cannot authenticate
    RawPeer r;
    r.raw = raw_connect(listener_.bound_port());
    send_raw(r.raw.get(), hello_bytes());
    r.conn = listener_.accept(5s);
    return r;
  }
  std::optional<Killable> killable() override {
    if (opts_.key) return std::nullopt;
    UniqueFd fd = raw_connect(listener_.bound_port());
    send_raw(fd.get(), hello_bytes());
    pid_t pid = fork();
    if (pid == 0) {
      for (;;) pause();  // holds the socket until SIGKILL
    }
    ftvm::check_sys(pid, "fork");
    fd.reset();  // only the child holds the socket now
    Killable k;
    k.conn = listener_.accept(5s);
    k.pid = pid;
    return k;
  }
  tcp::Listener& listener() { return listener_; }

 private:
  Options opts_;
  tcp::Listener listener_;
};

// ---- fake (in-process) ------------------------------------------------------------------

class FakeRig : public Rig {
 public:
  explicit FakeRig(Options o) : opts_(o) {}
  Pair pair() override {
    auto [a, b] = fake::make_pair(opts_);
    return Pair{std::move(a), std::move(b)};
  }

 private:
  Options opts_;
};

// ---- RDMA (rdma_cm over the first address that resolves through an RDMA device) ------------

#ifdef FTVM_HAVE_RDMA
// Where the RDMA cases run: $FTVM_RDMA_ADDR, else the lab's $LAB_IP, else the first local IPv4
// address that resolves through an RDMA device.
struct RdmaTarget {
  std::string addr;
  std::string dev;
};

std::optional<RdmaTarget> rdma_target() {
  std::vector<std::string> candidates;
  for (const char* var : {"FTVM_RDMA_ADDR", "LAB_IP"})
    if (const char* v = std::getenv(var); v && *v) candidates.emplace_back(v);
  ifaddrs* ifa = nullptr;
  if (getifaddrs(&ifa) == 0) {
    for (ifaddrs* i = ifa; i; i = i->ifa_next) {
      if (!i->ifa_addr || i->ifa_addr->sa_family != AF_INET) continue;
      char buf[INET_ADDRSTRLEN] = {};
      inet_ntop(AF_INET, &reinterpret_cast<sockaddr_in*>(i->ifa_addr)->sin_addr, buf, sizeof buf);
      candidates.emplace_back(buf);
    }
    freeifaddrs(ifa);
  }
  for (auto& c : candidates) {
    std::string dev;
    if (rdma::rdma_reachable(c, &dev)) return RdmaTarget{c, dev};
  }
  return std::nullopt;
}

constexpr const char* kPeerHelperEnv = "FTVM_RDMA_PEER_HELPER";

class RdmaRig : public Rig {
 public:
  RdmaRig(Options o, RdmaTarget t) : opts_(o), target_(std::move(t)), listener_(target_.addr, 0, o) {}
  Pair pair() override {
    auto acc = std::async(std::launch::async, [&] { return listener_.accept(10s); });
    Pair p;
    p.a = rdma::connect_rdma(target_.addr, listener_.bound_port(), opts_);
    p.b = acc.get();
    if (!p.b) throw std::runtime_error("rdma listener accepted nothing within 10 s");
    return p;
  }
  // The peer is this test binary run again (posix_spawn: no fork of a process holding verbs
  // resources) as the hidden helper case below, which connects and then waits to be killed.
  std::optional<Killable> killable() override {
    if (opts_.key) return std::nullopt;  // the helper process has no copy of this process's key
    std::string self = "/proc/self/exe";
    std::string name = "rdma: killable peer helper";
    std::string env = fmt::format("{}={}:{}", kPeerHelperEnv, target_.addr, listener_.bound_port());
    std::vector<char*> envp;
    for (char** e = environ; *e; ++e) envp.push_back(*e);
    envp.push_back(env.data());
    envp.push_back(nullptr);
    char* argv[] = {self.data(), name.data(), nullptr};
    pid_t pid = -1;
    int rc = posix_spawn(&pid, self.c_str(), nullptr, nullptr, argv, envp.data());
    if (rc != 0) throw ftvm::SysError(rc, "posix_spawn of the rdma peer helper");
    Killable k;
    k.pid = pid;
    k.conn = listener_.accept(20s);
    if (!k.conn) {
      ::kill(pid, SIGKILL);
      ::waitpid(pid, nullptr, 0);
      throw std::runtime_error("the rdma peer helper did not connect within 20 s");
    }
    return k;
  }
  const RdmaTarget& target() const { return target_; }

 private:
  Options opts_;
  RdmaTarget target_;
  rdma::RdmaListener listener_;
};
#endif

struct Backend {
  std::string name;
  std::function<std::unique_ptr<Rig>(Options)> make_rig;
  std::string fabric;  // what Connection::backend() says ("" = name)
};

// tcp+auth and tcp+encrypt: the same suite over authenticated (and encrypted) connections
// (issue 12): tags and encryption must not change any transport semantics.
std::vector<Backend> backends() {
  return {
      {"tcp", [](Options o) { return std::make_unique<TcpRig>(o); }, "tcp"},
      {"tcp+auth",
       [](Options o) {
         o.key = test_key();
         return std::make_unique<TcpRig>(o);
       },
       "tcp"},
      {"tcp+encrypt",
       [](Options o) {
         o.key = test_key();
         o.encrypt = true;
         return std::make_unique<TcpRig>(o);
       },
       "tcp"},
      {"fake", [](Options o) { return std::make_unique<FakeRig>(o); }, "fake"},
  };
}

Options test_options() {
  Options o;
  o.heartbeat_interval = 20ms;
  o.connect_timeout = 5000ms;
  o.stall_timeout = 20000ms;
  return o;
}

std::span<const std::byte> as_bytes(const std::string& s) {
  return {reinterpret_cast<const std::byte*>(s.data()), s.size()};
}

// Polls until a control message arrives or `limit` passes (then fails the test).
ControlMessage poll_until(Connection& c, std::chrono::milliseconds limit = 10s) {
  auto deadline = Clock::now() + limit;
  while (Clock::now() < deadline)
    if (auto m = c.poll(50ms)) return std::move(*m);
  throw std::runtime_error("no control message within the liveness bound");
}

// Polls until the connection throws (returns the exception) or `limit` passes.
std::exception_ptr poll_until_error(Connection& c, std::chrono::milliseconds limit = 10s) {
  auto deadline = Clock::now() + limit;
  try {
    while (Clock::now() < deadline) (void)c.poll(50ms);
  } catch (...) {
    return std::current_exception();
  }
  return nullptr;
}

std::byte page_byte(size_t page, size_t i, unsigned round = 0) {
  return static_cast<std::byte>((page * 31 + i * 7 + round * 13 + 1) & 0xFF);
}

#ifdef FTVM_HAVE_RDMA
// Runs one conformance case against rdma (rdma+auth: authenticated with the test key, so
// every SEND is tagged; issue 12) and prints the verbs device it used.
void run_rdma(const char* name, void (*fn)(const Backend&), bool with_key) {
  auto t = rdma_target();
  if (!t) FAIL("no address resolves through an RDMA device here (run in the RDMA lab: ctest -L rdma)");
  std::printf("[rdma%s] %s: device %s, address %s\n", with_key ? "+auth" : "", name, t->dev.c_str(), t->addr.c_str());
  std::fflush(stdout);
  Backend be{with_key ? "rdma+auth" : "rdma",
             [t, with_key](Options o) {
               if (with_key) o.key = test_key();
               return std::make_unique<RdmaRig>(o, *t);
             },
             "rdma"};
  fn(be);
}
#define FTVM_RDMA_CASE(NAME, FN)                                                          \
  TEST_CASE("rdma conformance: " NAME, "[.][rdma]") { run_rdma(NAME, FN, false); }        \
  TEST_CASE("rdma+auth conformance: " NAME, "[.][rdma][rdma-auth]") { run_rdma(NAME, FN, true); }
#else
#define FTVM_RDMA_CASE(NAME, FN)
#endif

}  // namespace

// Every conformance case is a function of the backend. CONFORMANCE_CASE registers it once for
// the backends every build has (tcp, fake: tags [transport][tcp]) and, in RDMA builds, once more
// as "rdma conformance: ..." with hidden tags [.][transport][rdma]: those need an RDMA device,
// so they run only when asked for (`ftvm_unit_tests "[rdma]"`, which the RDMA lab does).
#define CONFORMANCE_CASE(NAME, FN)                          \
  static void FN(const Backend& be);                        \
  TEST_CASE("conformance: " NAME, "[transport][tcp]") {     \
    for (auto& be : backends()) {                           \
      DYNAMIC_SECTION(be.name) { FN(be); }                  \
    }                                                       \
  }                                                         \
  FTVM_RDMA_CASE(NAME, FN)                                  \
  static void FN(const Backend& be)

CONFORMANCE_CASE("connect, identify, exchange control messages", conf_control_exchange) {
  auto rig = be.make_rig(test_options());
  auto pr = rig->pair();
  auto& a = pr.a;
  auto& b = pr.b;
  CHECK(std::string(a->backend()) == be.fabric);
  CHECK(std::string(b->backend()) == be.fabric);
  CHECK_FALSE(a->peer().empty());
  CHECK_FALSE(b->peer().empty());
  a->send_control(1, as_bytes("ping"));
  auto m = poll_until(*b);
  CHECK(m.type == 1);
  CHECK(std::string(reinterpret_cast<const char*>(m.body.data()), m.body.size()) == "ping");
  b->send_control(2, {});
  auto r = poll_until(*a);
  CHECK(r.type == 2);
  CHECK(r.body.empty());
  CHECK(a->bytes_sent() > 0);
  CHECK(b->bytes_received() > 0);
  CHECK_FALSE(a->poll(0ms).has_value());
  // Local misuse is an ftvm::Error that leaves the connection usable.
  std::vector<std::byte> huge(kMaxControlBody + 1);
  CHECK_THROWS_AS(a->send_control(3, huge), ftvm::Error);
  CHECK_THROWS_AS(a->send_control(0, {}), ftvm::Error);
  a->send_control(4, {});
  CHECK(poll_until(*b).type == 4);
}

CONFORMANCE_CASE("writes are visible when the following control message arrives", conf_writes_before_control) {
  auto rig = be.make_rig(test_options());
  auto pr = rig->pair();
  auto& a = pr.a;
  auto& b = pr.b;
  constexpr size_t kPage = 4096, kPages = 2048, kWrites = 1000;
  std::vector<std::byte> region(kPage * kPages, std::byte{0});
  b->register_region(5, region);
  std::vector<std::byte> src(kPage * kWrites);
  std::vector<size_t> where(kWrites);
  for (size_t i = 0; i < kWrites; ++i) {
    where[i] = (i * 7919) % kPages;  // scattered, distinct
    for (size_t k = 0; k < kPage; ++k) src[i * kPage + k] = page_byte(where[i], k);
  }
  for (unsigned round = 0; round < 3; ++round) {
    if (round > 0)
      for (size_t i = 0; i < kWrites; ++i)
        for (size_t k = 0; k < kPage; ++k) src[i * kPage + k] = page_byte(where[i], k, round);
    auto sender = std::async(std::launch::async, [&] {
      for (size_t i = 0; i < kWrites; ++i)
        a->write(5, where[i] * kPage, std::span<const std::byte>(src.data() + i * kPage, kPage));
      a->send_control(9, as_bytes("commit"));
    });
    auto m = poll_until(*b);
    sender.get();
    REQUIRE(m.type == 9);
    size_t bad = 0;
    for (size_t i = 0; i < kWrites; ++i)
      if (std::memcmp(region.data() + where[i] * kPage, src.data() + i * kPage, kPage) != 0) ++bad;
    CHECK(bad == 0);
  }
  // Pages never written stay zero.
  std::vector<bool> written(kPages);
  for (size_t w : where) written[w] = true;
  size_t dirty_unwritten = 0;
  for (size_t p = 0; p < kPages; ++p)
    if (!written[p] && region[p * kPage] != std::byte{0}) ++dirty_unwritten;
  CHECK(dirty_unwritten == 0);
}

CONFORMANCE_CASE("one large write spans several frames and lands whole", conf_large_write) {
  auto rig = be.make_rig(test_options());
  auto pr = rig->pair();
  auto& a = pr.a;
  auto& b = pr.b;
  std::vector<std::byte> region(40u << 20, std::byte{0});
  b->register_region(1, region);
  std::vector<std::byte> src(region.size() - 4096 - 3);
  for (size_t i = 0; i < src.size(); ++i) src[i] = static_cast<std::byte>((i * 2654435761u) >> 13);
  auto sender = std::async(std::launch::async, [&] {
    a->write(1, 4096 + 3, src);
    a->send_control(1, {});
  });
  poll_until(*b, 30s);
  sender.get();
  CHECK(std::memcmp(region.data() + 4096 + 3, src.data(), src.size()) == 0);
  CHECK(region[4096 + 2] == std::byte{0});
}

// register_source() through the Connection interface (no backend type named): writes from a
// registered source arrive, the source may be rewritten once send_control() returned, and
// after unregister_source() writes from the same memory still arrive (copied).
CONFORMANCE_CASE("write sources: registered or not, writes from them arrive", conf_write_sources) {
  auto rig = be.make_rig(test_options());
  auto pr = rig->pair();
  Connection& a = *pr.a;
  auto& b = pr.b;
  std::vector<std::byte> region(4u << 20, std::byte{0});
  b->register_region(1, region);
  b->send_control(1, {});
  CHECK(poll_until(a).type == 1);  // the region is known to `a` (rdma: its advertisement arrived)
  std::vector<std::byte> src(region.size());
  for (size_t i = 0; i < src.size(); ++i) src[i] = static_cast<std::byte>((i * 2654435761u) >> 11);
  a.register_source(src);
  a.register_source(src);  // idempotent
  a.register_source({});   // empty: nothing to register
  auto round = [&](uint16_t type, std::span<const std::byte> part, uint64_t offset) {
    auto sender = std::async(std::launch::async, [&] {
      a.write(1, offset, part);
      a.send_control(type, {});
    });
    CHECK(poll_until(*b, 30s).type == type);
    sender.get();
    CHECK(std::memcmp(region.data() + offset, part.data(), part.size()) == 0);
  };
  round(2, src, 0);
  for (auto& v : src) v = ~v;  // reusable once send_control() returned
  round(3, std::span<const std::byte>(src).subspan(8192, 65536), 8192);
  a.unregister_source(src);
  a.unregister_source(src);  // no longer registered: ignored
  for (auto& v : src) v ^= std::byte{0x33};
  round(4, src, 0);  // unregistered memory is copied: the same bytes arrive
}

CONFORMANCE_CASE("large control bodies arrive intact and in order", conf_large_control) {
  auto rig = be.make_rig(test_options());
  auto pr = rig->pair();
  auto& a = pr.a;
  auto& b = pr.b;
  std::vector<size_t> sizes = {0, 1, 4095, 65536, 300000, kMaxControlBody, kMaxControlBody - 1, 17};
  auto sender = std::async(std::launch::async, [&] {
    for (size_t i = 0; i < sizes.size(); ++i) {
      std::vector<std::byte> body(sizes[i]);
      for (size_t k = 0; k < body.size(); ++k) body[k] = static_cast<std::byte>(k * 3 + i);
      a->send_control(static_cast<uint16_t>(100 + i), body);
    }
  });
  for (size_t i = 0; i < sizes.size(); ++i) {
    auto m = poll_until(*b);
    REQUIRE(m.type == 100 + i);
    REQUIRE(m.body.size() == sizes[i]);
    bool ok = true;
    for (size_t k = 0; k < m.body.size(); ++k) ok &= m.body[k] == static_cast<std::byte>(k * 3 + i);
    CHECK(ok);
  }
  sender.get();
}

CONFORMANCE_CASE("slow receiver, nothing lost, no deadlock", conf_slow_receiver) {
  auto rig = be.make_rig(test_options());
  auto pr = rig->pair();
  auto& a = pr.a;
  auto& b = pr.b;
  constexpr size_t kChunk = 1u << 20, kSlots = 4, kRounds = 48;  // 48 MiB in total
  std::vector<std::byte> region(kChunk * kSlots);
  b->register_region(2, region);
  auto sender = std::async(std::launch::async, [&] {
    std::vector<std::byte> buf(kChunk);
    for (unsigned r = 0; r < kRounds; ++r) {
      std::memset(buf.data(), static_cast<int>(r + 1), buf.size());
      a->write(2, (r % kSlots) * kChunk, buf);
      uint32_t seq = r;
      a->send_control(7, std::span<const std::byte>(reinterpret_cast<const std::byte*>(&seq), sizeof seq));
    }
  });
  for (unsigned r = 0; r < kRounds; ++r) {
    std::this_thread::sleep_for(5ms);  // the slow receiver
    auto m = poll_until(*b, 30s);
    REQUIRE(m.type == 7);
    uint32_t seq;
    REQUIRE(m.body.size() == sizeof seq);
    std::memcpy(&seq, m.body.data(), sizeof seq);
    REQUIRE(seq == r);
    // The slot of round r holds round r's data or a later round's (writes after the
    // control message may already be visible), never older.
    auto v = static_cast<unsigned>(region[(r % kSlots) * kChunk + kChunk / 2]);
    CHECK(v >= r + 1);
  }
  sender.get();
  for (size_t s = 0; s < kSlots; ++s) {
    unsigned want = kRounds - kSlots + static_cast<unsigned>(s) + 1;
    CHECK(static_cast<unsigned>(region[s * kChunk]) == want);
    CHECK(static_cast<unsigned>(region[s * kChunk + kChunk - 1]) == want);
  }
  CHECK(b->bytes_received() >= kChunk * kRounds);
}

CONFORMANCE_CASE("both sides sending bulk at once do not deadlock", conf_bulk_both_ways) {
  auto rig = be.make_rig(test_options());
  auto pr = rig->pair();
  auto& a = pr.a;
  auto& b = pr.b;
  constexpr size_t kSize = 8u << 20;
  std::vector<std::byte> ra(kSize), rb(kSize);
  a->register_region(1, ra);
  b->register_region(1, rb);
  auto blast = [](Connection& c, std::byte fill) {
    std::vector<std::byte> src(kSize, fill);
    for (int i = 0; i < 4; ++i) c.write(1, 0, src);  // 32 MiB each way
    c.send_control(1, {});
    auto m = poll_until(c, 60s);
    return m.type;
  };
  auto fa = std::async(std::launch::async, blast, std::ref(*a), std::byte{0xA});
  auto fb = std::async(std::launch::async, blast, std::ref(*b), std::byte{0xB});
  CHECK(fa.get() == 1);
  CHECK(fb.get() == 1);
  CHECK(rb[kSize - 1] == std::byte{0xA});
  CHECK(ra[kSize - 1] == std::byte{0xB});
}

CONFORMANCE_CASE("peer death surfaces as LinkDown, not a hang", conf_peer_death) {
  auto rig = be.make_rig(test_options());
  SECTION("peer closes the connection") {
    auto pr = rig->pair();
    auto& a = pr.a;
    auto& b = pr.b;
    b.reset();
    auto e = poll_until_error(*a);
    REQUIRE(e);
    CHECK_THROWS_AS(std::rethrow_exception(e), LinkDown);
    // The connection stays failed.
    CHECK_THROWS_AS(a->poll(0ms), LinkDown);
    CHECK_THROWS_AS(a->send_control(1, {}), LinkDown);
  }
  SECTION("sending to a peer that went away") {
    auto pr = rig->pair();
    auto& a = pr.a;
    auto& b = pr.b;
    b.reset();
    std::vector<std::byte> buf(1u << 20);
    auto deadline = Clock::now() + 10s;
    bool down = false;
    try {
      while (Clock::now() < deadline) {
        a->write(1, 0, buf);
        a->send_control(1, {});
      }
    } catch (const LinkDown&) {
      down = true;
    }
    CHECK(down);
  }
  SECTION("peer process killed") {
    auto k = rig->killable();
    if (!k) {
      WARN(be.name << ": no killable peer, skipped");
    } else {
      ::kill(k->pid, SIGKILL);
      int st = 0;
      ::waitpid(k->pid, &st, 0);
      auto e = poll_until_error(*k->conn);
      REQUIRE(e);
      CHECK_THROWS_AS(std::rethrow_exception(e), LinkDown);
    }
  }
}

CONFORMANCE_CASE("malformed input is a ProtocolError and leaves the region unchanged", conf_malformed_input) {
  auto rig = be.make_rig(test_options());
  auto r = rig->raw();
  if (!r) {
    WARN(be.name << ": no raw peer, skipped");
    return;
  }
  std::vector<std::byte> region(65536, std::byte{0x5A});
  r->conn->register_region(1, region);
  std::vector<std::byte> bytes;
  std::string expect;
  SECTION("garbage") {
    bytes.assign(100, std::byte{0xEE});
    expect = "bad magic";
  }
  SECTION("bad magic on an otherwise valid write") {
    auto h = encode_header({.kind = FrameKind::Write, .field = 1, .length = 16});
    h[0] = std::byte{'X'};
    bytes.assign(h.begin(), h.end());
    bytes.resize(bytes.size() + 16, std::byte{1});
    expect = "bad magic";
  }
  SECTION("another wire version") {
    auto h = encode_header({.version = 7, .kind = FrameKind::Write, .field = 1, .length = 16});
    bytes.assign(h.begin(), h.end());
    bytes.resize(bytes.size() + 16, std::byte{1});
    expect = "version 7";
  }
  SECTION("write past the end of the region") {
    auto h = encode_header({.kind = FrameKind::Write, .field = 1, .length = 8192, .offset = 65536 - 4096});
    bytes.assign(h.begin(), h.end());
    bytes.resize(bytes.size() + 8192, std::byte{1});
    expect = "out of range";
  }
  SECTION("write to an unknown region") {
    auto h = encode_header({.kind = FrameKind::Write, .field = 99, .length = 16});
    bytes.assign(h.begin(), h.end());
    bytes.resize(bytes.size() + 16, std::byte{1});
    expect = "region 99";
  }
  SECTION("write to an unregistered region") {
    r->conn->unregister_region(1);
    auto h = encode_header({.kind = FrameKind::Write, .field = 1, .length = 16});
    bytes.assign(h.begin(), h.end());
    bytes.resize(bytes.size() + 16, std::byte{1});
    expect = "not registered";
  }
  SECTION("corrupted header checksum") {
    auto h = encode_header({.kind = FrameKind::Write, .field = 1, .length = 16});
    h[16] ^= std::byte{1};  // offset 0 -> 1
    bytes.assign(h.begin(), h.end());
    bytes.resize(bytes.size() + 16, std::byte{1});
    expect = "checksum";
  }
  send_raw(r->raw.get(), bytes);
  auto e = poll_until_error(*r->conn);
  REQUIRE(e);
  try {
    std::rethrow_exception(e);
  } catch (const ProtocolError& pe) {
    CHECK_THAT(pe.what(), Catch::Contains(expect));
  } catch (const std::exception& other) {
    FAIL("expected ProtocolError, got: " << other.what());
  }
  size_t changed = 0;
  for (auto v : region) changed += v != std::byte{0x5A};
  CHECK(changed == 0);
  CHECK_THROWS_AS(r->conn->poll(0ms), LinkDown);
}

CONFORMANCE_CASE("heartbeats keep idle_for small while the peer is idle but alive", conf_heartbeats) {
  auto rig = be.make_rig(test_options());  // heartbeat every 20 ms
  auto pr = rig->pair();
  auto& a = pr.a;
  auto& b = pr.b;
  std::atomic<bool> stop{false};
  auto idle_peer = std::async(std::launch::async, [&] {
    while (!stop) (void)b->poll(30ms);  // sends nothing of its own but heartbeats
  });
  auto until = Clock::now() + 800ms;
  std::chrono::milliseconds worst{0};
  while (Clock::now() < until) {
    (void)a->poll(10ms);
    worst = std::max(worst, a->idle_for());
  }
  stop = true;
  idle_peer.get();
  CHECK(worst < 500ms);  // generous: 25x the interval
}

CONFORMANCE_CASE("idle_for grows while the peer is silent", conf_idle_grows) {
  auto rig = be.make_rig(test_options());
  auto r = rig->raw();
  if (!r) {
    WARN(be.name << ": no raw peer, skipped");
    return;
  }
  auto start = Clock::now();
  CHECK_FALSE(r->conn->poll(300ms).has_value());
  CHECK(Clock::now() - start >= 290ms);
  CHECK(r->conn->idle_for() >= 250ms);
  // A heartbeat from the silent peer resets it.
  auto hb = encode_header({.kind = FrameKind::Heartbeat});
  send_raw(r->raw.get(), hb);
  auto deadline = Clock::now() + 5s;
  while (r->conn->idle_for() >= 250ms && Clock::now() < deadline) (void)r->conn->poll(10ms);
  CHECK(r->conn->idle_for() < 250ms);
}

CONFORMANCE_CASE("a new connection works after the old one died", conf_reconnect) {
  auto rig = be.make_rig(test_options());
  {
    auto pr = rig->pair();
    auto& a = pr.a;
    auto& b = pr.b;
    b.reset();
    CHECK(poll_until_error(*a));
  }
  auto pr = rig->pair();
  auto& a = pr.a;
  auto& b = pr.b;
  std::vector<std::byte> region(4096);
  b->register_region(3, region);
  std::vector<std::byte> src(4096, std::byte{0x77});
  a->write(3, 0, src);
  a->send_control(5, {});
  CHECK(poll_until(*b).type == 5);
  CHECK(region[4095] == std::byte{0x77});
}

// ---- TCP-specific setup behaviour ---------------------------------------------------------

TEST_CASE("tcp: Hello with another wire version is rejected naming both versions", "[transport][tcp]") {
  Options o = test_options();
  SECTION("accepting side") {
    tcp::Listener l("127.0.0.1", 0, o);
    auto raw = raw_connect(l.bound_port());
    send_raw(raw.get(), hello_bytes(static_cast<uint16_t>(kWireVersion + 1)));
    try {
      l.accept(5s);
      FAIL("accepted a peer of another version");
    } catch (const ProtocolError& e) {
      CHECK_THAT(e.what(), Catch::Contains(fmt::format("version {}", kWireVersion + 1)) &&
                               Catch::Contains(fmt::format("version {}", kWireVersion)));
    }
    // The listener survives a bad client.
    auto acc = std::async(std::launch::async, [&] { return l.accept(5s); });
    auto c = tcp::connect_tcp("127.0.0.1", l.bound_port(), o);
    CHECK(acc.get() != nullptr);
  }
  SECTION("connecting side") {
    tcp::Listener l("127.0.0.1", 0, o);
    auto server = std::async(std::launch::async, [&] {
      UniqueFd s(::accept4(l.fd(), nullptr, nullptr, SOCK_CLOEXEC));
      for (int i = 0; i < 500 && !s; ++i) {
        std::this_thread::sleep_for(10ms);
        s.reset(::accept4(l.fd(), nullptr, nullptr, SOCK_CLOEXEC));
      }
      if (s) send_raw(s.get(), hello_bytes(1));
      std::this_thread::sleep_for(300ms);
      return s.valid();
    });
    try {
      tcp::connect_tcp("127.0.0.1", l.bound_port(), o);
      FAIL("connected to a peer of another version");
    } catch (const ProtocolError& e) {
      CHECK_THAT(e.what(), Catch::Contains("version 1") && Catch::Contains(fmt::format("version {}", kWireVersion)));
    }
    CHECK(server.get());
  }
}

TEST_CASE("tcp: a peer that never says Hello times out as LinkDown", "[transport][tcp]") {
  Options o = test_options();
  o.connect_timeout = 300ms;
  tcp::Listener l("127.0.0.1", 0, o);
  auto raw = raw_connect(l.bound_port());
  CHECK_THROWS_AS(l.accept(5s), LinkDown);
  CHECK(l.accept(10ms) == nullptr);
}

TEST_CASE("tcp: connect to a closed port is LinkDown; addresses parse", "[transport][tcp]") {
  uint16_t port;
  {
    tcp::Listener l("127.0.0.1", 0, test_options());
    port = l.bound_port();
    CHECK(port != 0);
    CHECK(l.local_address() == "127.0.0.1:" + std::to_string(port));
  }
  CHECK_THROWS_AS(tcp::connect_tcp("127.0.0.1", port, test_options()), LinkDown);
  auto hp = tcp::parse_host_port("[::1]:7000");
  CHECK(hp.host == "::1");
  CHECK(hp.port == 7000);
  hp = tcp::parse_host_port("standby.example:0");
  CHECK(hp.host == "standby.example");
  CHECK(hp.port == 0);
  CHECK_THROWS_AS(tcp::parse_host_port("nohost"), ftvm::Error);
  CHECK_THROWS_AS(tcp::parse_host_port("h:70000"), ftvm::Error);
  CHECK_THROWS_AS(tcp::parse_host_port("::1:80"), ftvm::Error);
}

TEST_CASE("tcp: IPv6 loopback and hostname listeners", "[transport][tcp]") {
  Options o = test_options();
  std::unique_ptr<tcp::Listener> l6;
  try {
    l6 = std::make_unique<tcp::Listener>("::1", 0, o);
  } catch (const ftvm::Error& e) {
    WARN("no IPv6 loopback here: " << e.what());
  }
  if (l6) {
    auto acc = std::async(std::launch::async, [&] { return l6->accept(5s); });
    auto c = tcp::connect_tcp("::1", l6->bound_port(), o);
    auto s = acc.get();
    REQUIRE(s);
    CHECK_THAT(c->peer(), Catch::StartsWith("[::1]:"));
  }
  tcp::Listener lh("localhost", 0, o);
  auto acc = std::async(std::launch::async, [&] { return lh.accept(5s); });
  auto c = tcp::connect_tcp("localhost", lh.bound_port(), o);
  CHECK(acc.get() != nullptr);
}

// ---- RDMA-specific behaviour (hidden: needs an RDMA device; run with "[rdma]") ---------------

#ifdef FTVM_HAVE_RDMA
namespace {
RdmaTarget require_rdma(const char* test) {
  auto t = rdma_target();
  if (!t) FAIL("no address resolves through an RDMA device here (run in the RDMA lab: ctest -L rdma)");
  std::printf("[rdma] %s: device %s, address %s\n", test, t->dev.c_str(), t->addr.c_str());
  std::fflush(stdout);
  return *t;
}

rdma::RdmaConnection& as_rdma(Connection& c) {
  auto* r = dynamic_cast<rdma::RdmaConnection*>(&c);
  REQUIRE(r);
  return *r;
}
}  // namespace

// The peer of RdmaRig::killable(): connects back to the test and waits to be SIGKILLed.
TEST_CASE("rdma: killable peer helper", "[.][rdma-peer-helper]") {
  const char* where = std::getenv(kPeerHelperEnv);
  if (!where) return;
  auto hp = tcp::parse_host_port(where);
  auto c = rdma::connect_rdma(hp.host, hp.port, test_options());
  auto until = Clock::now() + 60s;  // bounded even if nobody kills us
  try {
    while (Clock::now() < until) (void)c->poll(100ms);
  } catch (const ftvm::Error&) {
  }
}

TEST_CASE("rdma: device, reachability, refused connections", "[.][rdma]") {
  auto t = require_rdma("device, reachability, refused connections");
  CHECK_FALSE(t.dev.empty());
  Options o = test_options();
  rdma::RdmaListener l(t.addr, 0, o);
  CHECK(l.bound_port() != 0);
  auto acc = std::async(std::launch::async, [&] { return l.accept(10s); });
  auto a = rdma::connect_rdma(t.addr, l.bound_port(), o, t.dev);  // by name: the right one
  auto b = acc.get();
  REQUIRE(b);
  CHECK(as_rdma(*a).device_name() == t.dev);
  CHECK(as_rdma(*b).device_name() == t.dev);
  CHECK(std::string(a->backend()) == "rdma");
  CHECK_THAT(a->peer(), Catch::Contains(t.addr));
  // By name: a device the address does not go through is refused, naming both.
  try {
    rdma::connect_rdma(t.addr, l.bound_port(), o, "no_such_dev0");
    FAIL("connected through the wrong device");
  } catch (const ftvm::Error& e) {
    CHECK_THAT(e.what(), Catch::Contains("no_such_dev0") && Catch::Contains(t.dev));
  }
  // Nobody listening: LinkDown, not a hang.
  uint16_t closed;
  {
    rdma::RdmaListener gone(t.addr, 0, o);
    closed = gone.bound_port();
  }
  auto start = Clock::now();
  CHECK_THROWS_AS(rdma::connect_rdma(t.addr, closed, o), LinkDown);
  CHECK(Clock::now() - start < 6s);
  CHECK(l.accept(10ms) == nullptr);
}

TEST_CASE("rdma: writes are bounds-checked on the sender against the advertised region",
          "[.][rdma]") {
  auto t = require_rdma("writes are bounds-checked on the sender");
  Options o = test_options();
  o.connect_timeout = 1000ms;  // also bounds the wait for an advertisement
  RdmaRig rig(o, t);
  auto pr = rig.pair();
  std::vector<std::byte> region(65536, std::byte{0x5A});
  pr.b->register_region(1, region);
  std::vector<std::byte> src(8192, std::byte{1});
  std::string expect;
  SECTION("past the end") {
    CHECK_THROWS_WITH(pr.a->write(1, 65536 - 4096, src), Catch::Contains("out of range"));
  }
  SECTION("unknown region") {
    CHECK_THROWS_WITH(pr.a->write(99, 0, src), Catch::Contains("region 99"));
  }
  SECTION("unregistered region") {
    pr.b->unregister_region(1);
    pr.b->send_control(1, {});  // the withdrawal is ordered before this
    CHECK(poll_until(*pr.a).type == 1);
    CHECK_THROWS_WITH(pr.a->write(1, 0, src), Catch::Contains("not registered"));
  }
  CHECK_THROWS_AS(pr.a->poll(0ms), LinkDown);
  size_t changed = 0;
  for (auto v : region) changed += v != std::byte{0x5A};
  CHECK(changed == 0);
}

TEST_CASE("rdma: re-registration, zero-copy sources, advertisement ordering", "[.][rdma]") {
  auto t = require_rdma("re-registration, zero-copy sources");
  RdmaRig rig(test_options(), t);
  auto pr = rig.pair();
  auto& a = as_rdma(*pr.a);
  std::vector<std::byte> small(4096), big(4u << 20);
  pr.b->register_region(2, small);
  pr.b->send_control(1, {});  // "granted"
  CHECK(poll_until(a).type == 1);
  // Staging grows: register the bigger memory under the same id, then grant.
  pr.b->register_region(2, big);
  pr.b->send_control(2, {});
  CHECK(poll_until(a).type == 2);
  std::vector<std::byte> src(big.size());
  for (size_t i = 0; i < src.size(); ++i) src[i] = static_cast<std::byte>((i * 2654435761u) >> 11);
  a.register_source(src);  // zero-copy from here on
  a.write(2, 0, src);
  a.send_control(3, {});
  CHECK(poll_until(*pr.b).type == 3);
  CHECK(std::memcmp(big.data(), src.data(), big.size()) == 0);
  // The source may be reused after flush(): a second round with new content.
  for (auto& v : src) v = ~v;
  a.write(2, 0, std::span<const std::byte>(src).subspan(0, 65536));  // a slice of the source
  a.flush();
  a.send_control(4, {});
  CHECK(poll_until(*pr.b).type == 4);
  CHECK(std::memcmp(big.data(), src.data(), 65536) == 0);
  a.unregister_source(src);
  CHECK(pr.b->bytes_received() >= big.size() + 65536);
}

TEST_CASE("rdma: malformed control messages are ProtocolErrors", "[.][rdma]") {
  auto t = require_rdma("malformed control messages");
  RdmaRig rig(test_options(), t);
  auto pr = rig.pair();
  std::vector<std::byte> region(65536, std::byte{0x5A});
  pr.b->register_region(1, region);
  // A well-formed header to start from: magic, kind, flags, type, returned=0, total, length.
  auto msg = [](uint8_t kind, uint8_t flags, uint16_t type, uint32_t total, size_t payload) {
    std::vector<std::byte> m(32 + payload, std::byte{0});
    put_le(m.data(), kFrameMagic, 4);
    m[4] = std::byte{kind};
    m[5] = std::byte{flags};
    put_le(m.data() + 6, type, 2);
    put_le(m.data() + 12, total, 4);
    put_le(m.data() + 16, payload, 4);
    return m;
  };
  std::vector<std::byte> bytes;
  std::string expect;
  SECTION("garbage") {
    bytes.assign(100, std::byte{0xEE});
    expect = "bad magic";
  }
  SECTION("shorter than a header") {
    bytes.assign(7, std::byte{0});
    expect = "shorter than";
  }
  SECTION("unknown kind") {
    bytes = msg(77, 0, 0, 0, 0);
    expect = "unknown message kind 77";
  }
  SECTION("control type 0") {
    bytes = msg(1, 3, 0, 4, 4);
    expect = "type 0";
  }
  SECTION("control body over the limit") {
    bytes = msg(1, 1, 5, static_cast<uint32_t>(kMaxControlBody + 1), 16);
    expect = "exceeds";
  }
  SECTION("continuation without a first fragment") {
    bytes = msg(1, 2, 5, 16, 16);
    expect = "without a matching first";
  }
  SECTION("length field lies") {
    bytes = msg(1, 3, 5, 16, 16);
    put_le(bytes.data() + 16, 999, 4);
    expect = "length field";
  }
  SECTION("short region advertisement") {
    bytes = msg(3, 0, 0, 0, 8);
    expect = "advertisement";
  }
  as_rdma(*pr.a).send_raw_message_for_test(bytes);
  auto e = poll_until_error(*pr.b);
  REQUIRE(e);
  try {
    std::rethrow_exception(e);
  } catch (const ProtocolError& pe) {
    CHECK_THAT(pe.what(), Catch::Contains(expect));
  } catch (const std::exception& other) {
    FAIL("expected ProtocolError, got: " << other.what());
  }
  size_t changed = 0;
  for (auto v : region) changed += v != std::byte{0x5A};
  CHECK(changed == 0);
  CHECK_THROWS_AS(pr.b->poll(0ms), LinkDown);
}
#endif

// ---- authentication (issue 12) ------------------------------------------------------------

namespace {
std::shared_ptr<const auth::Key> other_key() {
  static std::shared_ptr<const auth::Key> k = [] {
    char dir[] = "/tmp/ftvm-test-key.XXXXXX";
    if (!::mkdtemp(dir)) throw ftvm::SysError(errno, "mkdtemp for the test key");
    std::string path = std::string(dir) + "/other.key";
    auth::generate_key(path);
    auto key = auth::load_key(path);
    ::unlink(path.c_str());
    ::rmdir(dir);
    return key;
  }();
  return k;
}

// Connects with `client` options to a listener with `server` options; returns what each side
// threw ("" = it connected).
std::pair<std::string, std::string> try_handshake(Options server, Options client) {
  tcp::Listener l("127.0.0.1", 0, server);
  auto acc = std::async(std::launch::async, [&]() -> std::string {
    try {
      auto c = l.accept(5s);
      if (!c) return "nothing accepted";
      return "";
    } catch (const std::exception& e) {
      return e.what();
    }
  });
  std::string cerr;
  try {
    auto c = tcp::connect_tcp("127.0.0.1", l.bound_port(), client);
  } catch (const std::exception& e) {
    cerr = e.what();
  }
  return {acc.get(), cerr};
}

// A TCP relay between a client and a listener that flips one byte of the client->server
// stream at `flip_at` (counted from the first byte the client sends).
class FlipProxy {
 public:
  FlipProxy(uint16_t target, size_t flip_at) : l_("127.0.0.1", 0, test_options()), target_(target), flip_at_(flip_at) {
    th_ = std::thread([this] { run(); });
  }
  ~FlipProxy() {
    stop_ = true;
    th_.join();
  }
  uint16_t port() const { return l_.bound_port(); }

 private:
  void run() {
    UniqueFd c;
    while (!stop_ && !c) {
      c.reset(::accept4(l_.fd(), nullptr, nullptr, SOCK_CLOEXEC));
      if (!c) std::this_thread::sleep_for(5ms);
    }
    if (!c) return;
    UniqueFd s = raw_connect(target_);
    size_t seen = 0;
    std::vector<std::byte> buf(65536);
    while (!stop_) {
      pollfd p[2] = {{c.get(), POLLIN, 0}, {s.get(), POLLIN, 0}};
      if (::poll(p, 2, 20) <= 0) continue;
      for (int i = 0; i < 2; ++i) {
        if (!(p[i].revents & (POLLIN | POLLHUP | POLLERR))) continue;
        ssize_t n = ::recv(p[i].fd, buf.data(), buf.size(), 0);
        if (n <= 0) return;
        if (i == 0 && flip_at_ >= seen && flip_at_ < seen + static_cast<size_t>(n)) buf[flip_at_ - seen] ^= std::byte{1};
        if (i == 0) seen += static_cast<size_t>(n);
        if (::send(p[1 - i].fd, buf.data(), static_cast<size_t>(n), MSG_NOSIGNAL) != n) return;
      }
    }
  }
  tcp::Listener l_;
  uint16_t target_;
  size_t flip_at_;
  std::atomic<bool> stop_{false};
  std::thread th_;
};
}  // namespace

TEST_CASE("auth: peers without the key or with another key are refused on both sides", "[transport][tcp][security]") {
  Options with = test_options();
  with.key = test_key();
  Options other = test_options();
  other.key = other_key();
  Options none = test_options();
  SECTION("client without a key") {
    auto [s, c] = try_handshake(with, none);
    CHECK_THAT(s, Catch::Contains("did not authenticate") && Catch::Contains("127.0.0.1"));
    CHECK_THAT(c, Catch::Contains("requires authentication"));
  }
  SECTION("server without a key") {
    auto [s, c] = try_handshake(none, with);
    CHECK_THAT(s, Catch::Contains("requires authentication"));
    CHECK_THAT(c, Catch::Contains("did not authenticate"));
  }
  SECTION("another key") {
    auto [s, c] = try_handshake(with, other);
    CHECK_THAT(s, Catch::Contains("different key files") && Catch::Contains(test_key()->id_hex()));
    CHECK_THAT(c, Catch::Contains("different key files"));
  }
  SECTION("same key") {
    auto [s, c] = try_handshake(with, with);
    CHECK(s == "");
    CHECK(c == "");
  }
}

TEST_CASE("auth: a peer claiming our key id without the key fails the proof", "[transport][tcp][security]") {
  // A forged key with the real key's id: the Hello passes, the Auth proof cannot.
  auto forged = std::make_shared<auth::Key>();
  forged->id = test_key()->id;
  forged->path = "(forged)";
  Options with = test_options();
  with.key = test_key();
  Options rogue = test_options();
  rogue.key = forged;
  auto [s, c] = try_handshake(with, rogue);
  CHECK_THAT(s, Catch::Contains("authentication of peer") && Catch::Contains("proof does not match"));
  CHECK_THAT(c, Catch::Contains("proof does not match"));
}

TEST_CASE("auth: one flipped byte in any frame after the handshake is detected, never delivered",
          "[transport][tcp][security]") {
  Options o = test_options();
  o.key = test_key();
  const size_t handshake = 2 * kFrameHeaderSize + kHelloBodySize + kAuthBodySize;  // client's Hello + Auth
  // Frames after the handshake: Write(16 bytes)+tag, then Control("commit")+tag.
  const size_t write_frame = kFrameHeaderSize + 16 + kFrameTagSize;
  for (size_t at : {handshake + 3,                                   // Write header
                    handshake + kFrameHeaderSize + 5,                // Write payload
                    handshake + kFrameHeaderSize + 16 + 2,           // Write tag
                    handshake + write_frame + kFrameHeaderSize + 1,  // Control body
                    handshake + write_frame + kFrameHeaderSize + 6 + 15}) {  // Control tag
    DYNAMIC_SECTION("flip at byte " << at) {
      tcp::Listener l("127.0.0.1", 0, o);
      FlipProxy proxy(l.bound_port(), at);
      auto acc = std::async(std::launch::async, [&] { return l.accept(5s); });
      auto a = tcp::connect_tcp("127.0.0.1", proxy.port(), o);
      auto b = acc.get();
      REQUIRE(b);
      std::vector<std::byte> region(64);
      b->register_region(1, region);
      std::vector<std::byte> data(16, std::byte{0x5a});
      a->write(1, 0, data);
      a->send_control(7, as_bytes("commit"));
      std::string err;
      std::optional<ControlMessage> got;
      try {
        auto deadline = Clock::now() + 5s;
        while (!got && Clock::now() < deadline) got = b->poll(50ms);
      } catch (const ProtocolError& e) {
        err = e.what();
      }
      CHECK_FALSE(got.has_value());
      // A flipped header byte fails the header checksum first; any other byte fails the tag.
      CHECK_THAT(err, Catch::Contains("failed authentication") || Catch::Contains("checksum") ||
                          Catch::Contains("malformed"));
    }
  }
}

TEST_CASE("auth: key files are checked (size, mode) and generated 0600", "[transport][security]") {
  char dir[] = "/tmp/ftvm-test-key.XXXXXX";
  REQUIRE(::mkdtemp(dir));
  std::string path = std::string(dir) + "/k";
  auth::generate_key(path);
  struct stat sb {};
  REQUIRE(::stat(path.c_str(), &sb) == 0);
  CHECK((sb.st_mode & 0777) == 0600);
  CHECK(sb.st_size == 32);
  CHECK_THROWS_AS(auth::generate_key(path), ftvm::SysError);  // never overwrites
  CHECK(auth::load_key(path)->id_hex().size() == 16);
  ::chmod(path.c_str(), 0644);
  CHECK_THROWS_WITH(auth::load_key(path), Catch::Contains("chmod 600"));
  ::chmod(path.c_str(), 0600);
  ::truncate(path.c_str(), 16);
  CHECK_THROWS_WITH(auth::load_key(path), Catch::Contains("expected exactly 32"));
  ::unlink(path.c_str());
  ::rmdir(dir);
}

TEST_CASE("auth: with --encrypt, RDMA (authenticated, never encrypted) is refused and auto means TCP",
          "[transport][security]") {
  Options o = test_options();
  o.key = test_key();
  o.encrypt = true;
  try {
    connect("127.0.0.1", 1, Kind::Rdma, o);
    FAIL("connected over RDMA with --encrypt");
  } catch (const ftvm::Error& e) {
    CHECK_THAT(e.what(), Catch::Contains("does not encrypt") && Catch::Contains("--transport tcp"));
  }
  tcp::Listener l("127.0.0.1", 0, o);
  auto acc = std::async(std::launch::async, [&] { return l.accept(5s); });
  std::string chosen;
  auto c = connect("127.0.0.1", l.bound_port(), Kind::Auto, o, {}, &chosen);
  CHECK(std::string(c->backend()) == "tcp");
  CHECK_THAT(chosen, Catch::Contains("--encrypt"));
  CHECK(c->key_id() == test_key()->id_hex());
  CHECK(c->security() == "authenticated+encrypted");
  CHECK(acc.get() != nullptr);
}

// ---- keyed epoch digest over real connections (issue 12) --------------------------------------

namespace {
namespace cp = ftvm::checkpoint;

// The primary's side of one epoch through `a` into `b`'s staging region (registered as region 2
// over `replica`'s staging area): stage `pages` of `ram`, write them, and build the Commit the
// way tools/ftd/primary.cc does (keyed tag when a->epoch_key(), else XXH3). `tamper`: after
// the honest write, one more one-sided write alters one staged byte (an attacker, or any
// writer without the session key).
cp::Commit send_staged_epoch(Connection& a, Connection& b, cp::Replica& replica, std::span<const std::byte> ram,
                             std::vector<uint64_t> pages, uint64_t epoch, bool tamper) {
  cp::EpochStager st;
  st.stage_pages(pages, ram);
  auto bytes = st.bytes();
  cp::Commit c;
  c.session_id = 1;
  c.epoch = epoch;
  c.page_count = st.page_count();
  c.devstate_bytes = 0;
  if (const auto* k = a.epoch_key()) c.staged_tag = cp::staged_tag(*k, epoch, bytes);
  else c.staged_digest = st.digest();
  b.register_region(2, replica.staging());
  a.write(2, 0, bytes);
  std::vector<std::byte> evil;
  if (tamper) {
    evil.assign(1, static_cast<std::byte>(~static_cast<unsigned>(bytes[8 * pages.size() + 5])));
    a.write(2, 8 * pages.size() + 5, evil);
  }
  a.send_control(6, cp::encode(c));
  auto m = poll_until(b);
  REQUIRE(m.type == 6);
  return cp::decode<cp::Commit>(m.body);
}

// Runs the keyed-digest checks over one connected pair.
void check_keyed_digest(Connection& a, Connection& b, bool authenticated) {
  if (!authenticated) {
    CHECK(a.epoch_key() == nullptr);
    CHECK(b.epoch_key() == nullptr);
  } else {
    REQUIRE(a.epoch_key());
    REQUIRE(b.epoch_key());
    CHECK(*a.epoch_key() == *b.epoch_key());  // derived from the same handshake
  }
  std::vector<std::byte> primary(16 * cp::kPageSize);
  for (size_t i = 0; i < primary.size(); ++i) primary[i] = static_cast<std::byte>(i * 7 + 3);
  std::vector<std::byte> twin(primary);
  cp::Replica replica(twin, 1 << 20);
  primary[2 * cp::kPageSize] = std::byte{0x99};
  auto c1 = send_staged_epoch(a, b, replica, primary, {2}, 1, false);
  replica.apply(c1, b.epoch_key());
  CHECK(twin == primary);
  primary[4 * cp::kPageSize + 1] = std::byte{0x98};
  auto c2 = send_staged_epoch(a, b, replica, primary, {4}, 2, true);
  const auto before = twin;
  if (authenticated) {
    // The tampering write even fixes the unkeyed digest up: only the key decides.
    c2.staged_digest = cp::digest_bytes(std::span<const std::byte>(replica.staging().data(), c2.staged_size()));
    CHECK_THROWS_WITH(replica.apply(c2, b.epoch_key()), Catch::Contains("keyed digest mismatch"));
  } else {
    CHECK_THROWS_WITH(replica.apply(c2, b.epoch_key()), Catch::Contains("digest mismatch"));
  }
  CHECK(twin == before);
  CHECK(replica.committed_epoch() == 1);
}
}  // namespace

TEST_CASE("keyed epoch digest: tcp+auth sessions tag epochs with a per-connection key, insecure ones do not",
          "[transport][tcp][security]") {
  for (bool with_key : {false, true}) {
    DYNAMIC_SECTION((with_key ? "tcp+auth" : "tcp")) {
      Options o = test_options();
      if (with_key) o.key = test_key();
      tcp::Listener l("127.0.0.1", 0, o);
      auto acc = std::async(std::launch::async, [&] { return l.accept(5s); });
      auto a = tcp::connect_tcp("127.0.0.1", l.bound_port(), o);
      auto b = acc.get();
      REQUIRE(b);
      check_keyed_digest(*a, *b, with_key);
      if (with_key) {
        // A second connection with the same key has another epoch key (fresh nonces).
        auto acc2 = std::async(std::launch::async, [&] { return l.accept(5s); });
        auto a2 = tcp::connect_tcp("127.0.0.1", l.bound_port(), o);
        auto b2 = acc2.get();
        REQUIRE(b2);
        CHECK(*a2->epoch_key() != *a->epoch_key());
      }
    }
  }
}

#ifdef FTVM_HAVE_RDMA
// ---- RDMA authentication (issue 12; hidden: needs an RDMA device) -------------------------------

namespace {
// Connects a client with `client` options to a listener with `server` options over RDMA;
// returns what each side threw ("" = connected).
std::pair<std::string, std::string> try_rdma_handshake(const RdmaTarget& t, Options server, Options client) {
  rdma::RdmaListener l(t.addr, 0, server);
  auto acc = std::async(std::launch::async, [&]() -> std::string {
    try {
      auto c = l.accept(10s);
      if (!c) return "accepted nothing";
      (void)c->poll(200ms);
      return "";
    } catch (const std::exception& e) {
      return e.what();
    }
  });
  std::string cerr;
  try {
    auto c = rdma::connect_rdma(t.addr, l.bound_port(), client);
    (void)c->poll(200ms);
  } catch (const std::exception& e) {
    cerr = e.what();
  }
  return {acc.get(), cerr};
}
}  // namespace

TEST_CASE("rdma auth: the right key connects, exchanges, and derives the same epoch key", "[.][rdma][rdma-auth]") {
  auto t = require_rdma("auth: right key");
  Options o = test_options();
  o.key = test_key();
  RdmaRig rig(o, t);
  auto pr = rig.pair();
  CHECK(pr.a->key_id() == test_key()->id_hex());
  CHECK(pr.b->key_id() == test_key()->id_hex());
  CHECK(pr.a->security() == "authenticated");
  std::vector<std::byte> region(4096);
  pr.b->register_region(1, region);
  std::vector<std::byte> data(1000, std::byte{0x3c});
  pr.a->write(1, 100, data);
  pr.a->send_control(9, as_bytes("hello"));
  auto m = poll_until(*pr.b);
  CHECK(m.type == 9);
  CHECK(std::memcmp(region.data() + 100, data.data(), data.size()) == 0);
  pr.b->send_control(10, as_bytes("back"));
  CHECK(poll_until(*pr.a).type == 10);
  // A control message larger than one SEND (fragments, each tagged).
  std::vector<std::byte> big(300000);
  for (size_t i = 0; i < big.size(); ++i) big[i] = static_cast<std::byte>(i * 13);
  pr.a->send_control(11, big);
  auto mb = poll_until(*pr.b);
  CHECK(mb.body == big);
  check_keyed_digest(*pr.a, *pr.b, true);
}

TEST_CASE("rdma auth: a wrong key or a missing key is refused on both sides, naming the key ids", "[.][rdma][rdma-auth]") {
  auto t = require_rdma("auth: wrong key");
  Options with = test_options();
  with.key = test_key();
  Options other = test_options();
  other.key = other_key();
  Options none = test_options();
  SECTION("another key") {
    auto [s, c] = try_rdma_handshake(t, with, other);
    CHECK_THAT(s, Catch::Contains("different key files") && Catch::Contains(test_key()->id_hex()) &&
                      Catch::Contains(other_key()->id_hex()));
    CHECK_THAT(c, Catch::Contains("different key files") && Catch::Contains(test_key()->id_hex()));
  }
  SECTION("client without a key") {
    auto [s, c] = try_rdma_handshake(t, with, none);
    CHECK_THAT(s, Catch::Contains("did not authenticate"));
    CHECK_THAT(c, Catch::Contains("requires authentication"));
  }
  SECTION("server without a key") {
    auto [s, c] = try_rdma_handshake(t, none, with);
    CHECK_THAT(s, Catch::Contains("requires authentication"));
    CHECK_THAT(c, Catch::Contains("did not authenticate"));
  }
  SECTION("a forged key with the right key id fails the proof") {
    auto forged = std::make_shared<auth::Key>();
    forged->id = test_key()->id;
    forged->path = "(forged)";
    Options rogue = test_options();
    rogue.key = forged;
    auto [s, c] = try_rdma_handshake(t, with, rogue);
    CHECK_THAT(s + c, Catch::Contains("proof does not match"));
    CHECK(s != "");
    CHECK(c != "");
  }
}

TEST_CASE("rdma auth: the listener establishes clients without waiting for their authentication",
          "[.][rdma][rdma-auth]") {
  // MultiListener hands finish() to a handshake thread: a client whose handshake is pending
  // (here: A, whose finish() has not run, so it waits for our nonce) delays no other client.
  auto t = require_rdma("auth: accept without waiting for the handshake");
  Options o = test_options();
  o.key = test_key();
  rdma::RdmaListener l(t.addr, 0, o);
  auto a = std::async(std::launch::async, [&] { return rdma::connect_rdma(t.addr, l.bound_port(), o); });
  auto ea = l.accept_established(10s);
  REQUIRE(ea);
  auto b = std::async(std::launch::async, [&] { return rdma::connect_rdma(t.addr, l.bound_port(), o); });
  auto eb = l.accept_established(10s);
  REQUIRE(eb);
  auto sb = rdma::RdmaListener::finish(std::move(eb));
  auto cb = b.get();
  CHECK(a.wait_for(0s) == std::future_status::timeout);  // A is still waiting for its handshake
  cb->send_control(3, as_bytes("b first"));
  CHECK(poll_until(*sb).type == 3);
  auto sa = rdma::RdmaListener::finish(std::move(ea));
  auto ca = a.get();
  CHECK(ca->key_id() == test_key()->id_hex());
  ca->send_control(4, as_bytes("a"));
  CHECK(poll_until(*sa).type == 4);
}

TEST_CASE("rdma auth: a tampered or untagged control message fails its tag", "[.][rdma][rdma-auth]") {
  auto t = require_rdma("auth: tampered control message");
  Options o = test_options();
  o.key = test_key();
  RdmaRig rig(o, t);
  auto pr = rig.pair();
  pr.a->send_control(5, as_bytes("fine"));
  CHECK(poll_until(*pr.b).type == 5);
  SECTION("a byte flipped after tagging") {
    as_rdma(*pr.a).tamper_next_send_for_test();
    pr.a->send_control(6, as_bytes("commit"));
  }
  SECTION("a message injected without a tag") {
    std::vector<std::byte> m(32 + 64, std::byte{0});
    put_le(m.data(), kFrameMagic, 4);
    m[4] = std::byte{1};
    m[5] = std::byte{3};
    put_le(m.data() + 6, 6, 2);
    put_le(m.data() + 12, 64, 4);
    put_le(m.data() + 16, 64, 4);
    as_rdma(*pr.a).send_raw_message_for_test(m);
  }
  auto e = poll_until_error(*pr.b);
  REQUIRE(e);
  try {
    std::rethrow_exception(e);
  } catch (const ProtocolError& pe) {
    CHECK_THAT(pe.what(), Catch::Contains("failed its authentication tag"));
  } catch (const std::exception& other) {
    FAIL("expected ProtocolError, got: " << other.what());
  }
  CHECK_THROWS_AS(pr.b->poll(0ms), LinkDown);
}
#endif
