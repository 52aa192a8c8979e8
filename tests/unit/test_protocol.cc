// The replication protocol's encoding (checkpoint/protocol.h, "Encoding"): every message's
// field list is complete, every message round-trips, the bytes equal the vectors captured from
// the hand-written encoders that preceded the generic one (protocol version 5), malformed
// bodies are rejected with errors naming the message and the field, and typed dispatch/send.
#include <catch2/catch.hpp>

#include <algorithm>
#include <string_view>
#include <utility>

#include "checkpoint/protocol.h"
#include "common/error.h"
#include "transport/fake/fake_transport.h"

using namespace ftvm;
using namespace ftvm::checkpoint;

namespace {

// Every message with every field set to a distinct, non-default value (so a field left out of
// a field list, or two fields swapped, changes the bytes).
inline std::vector<std::byte> bytes_of(std::string_view s) {
  std::vector<std::byte> v;
  for (char c : s) v.push_back(static_cast<std::byte>(c));
  return v;
}
inline OpenSession sample_open_session() {
  OpenSession m;
  m.version = kProtocolVersion;
  m.session_id = 0x0102030405060708;
  m.ram_size = 256 << 20;
  m.page_size = 4096;
  m.vm_name = "vm1";
  m.qemu_argv = {"qemu-system-x86_64", "-m", "256"};
  m.disks = {{"virtio0", "/img/a.qcow2", 64 << 20}, {"virtio1", "/img/b.raw", uint64_t{1} << 30}};
  m.libvirt_xml = "<domain/>";
  m.arbiter = "fence-command";
  m.reprotect_port = 7410;
  m.second_path_host = "10.1.0.1";
  m.ram_used = 128 << 20;
  m.failover = FailoverPolicy::Manual;
  m.origin = "host-a@127.0.0.1:7410";
  m.history = R"([{"event":"protected"}])";
  return m;
}
inline SessionReady sample_session_ready() { return {0x1111, 1 << 20, 4321, 400}; }
inline StagingGrow sample_staging_grow() { return {0x2222, 3 << 20}; }
inline StagingGranted sample_staging_granted() { return {0x3333, 4 << 20}; }
inline EpochBegin sample_epoch_begin() { return {0x4444, 17, 5 << 20}; }
inline Commit sample_commit() {
  Commit m;
  m.session_id = 0x5555;
  m.epoch = 18;
  m.page_count = 3;
  m.devstate_bytes = 12345;
  m.staged_digest = 0x0123456789abcdef;
  m.ram_digest = 0xfedcba9876543210;
  m.flags = Commit::kFinal;
  m.disk_ops = 7;
  m.disk_digest = 0x1234abcd;
  for (size_t i = 0; i < m.staged_tag.size(); ++i) m.staged_tag[i] = static_cast<std::byte>(0xa0 + i);
  return m;
}
inline Ack sample_ack() { return {0x6666, 19, AckStatus::Rejected, "digest mismatch"}; }
inline Activate sample_activate() { return {0x7777}; }
inline ActivateDone sample_activate_done() { return {0x8888, 1, "resumed"}; }
inline PrimaryLost sample_primary_lost() { return {0x9999, "qemu exited"}; }
inline Disable sample_disable() { return {0xaaaa}; }
inline ErrorMsg sample_error() { return {"twin failed to start"}; }
inline Takeover sample_takeover() { return {0xbbbb, "primary silent"}; }
inline HeartbeatLink sample_heartbeat_link() { return {0xcccc}; }
inline DiskWrite sample_disk_write() { return {0xdddd, 20, 1, DiskOp::Write, 4096, 8, bytes_of("ABCDEFGH")}; }
inline DiskWrite sample_disk_zero() { return {0xdddd, 21, 0, DiskOp::Zero, 8192, uint64_t{1} << 40, {}}; }
inline Resolve sample_resolve() { return {0xeeee, "vm1"}; }
inline Resolution sample_resolution() { return {0xffff, Verdict::Active, "runs here"}; }
inline Suspect sample_suspect() { return {0x1234, 250}; }

// Golden vectors: the bodies the encoders of protocol version 5 produced for the samples above,
// captured from the hand-written per-message encoders before the generic one replaced them
// (a wire format change must bump kProtocolVersion and replace these on purpose).
struct Golden {
  const char* name;
  AnyMessage (*make)();
  const char* hex;
};
const Golden kGolden[] = {
    {"sample_open_session", [] { return AnyMessage{sample_open_session()}; },
         "05000000080706050403020100000010000000000010000003000000766d31030000001200000071656d752d73797374"
         "656d2d7838365f3634020000002d6d03000000323536020000000700000076697274696f300c0000002f696d672f612e"
         "71636f773200000004000000000700000076697274696f310a0000002f696d672f622e72617700000040000000000900"
         "00003c646f6d61696e2f3e0d00000066656e63652d636f6d6d616e64f21c00000800000031302e312e302e3100000008"
         "000000000200000015000000686f73742d61403132372e302e302e313a37343130170000005b7b226576656e74223a22"
         "70726f746563746564227d5d"},
    {"sample_session_ready", [] { return AnyMessage{sample_session_ready()}; },
         "11110000000000000000100000000000e11000000000000090010000"},
    {"sample_staging_grow", [] { return AnyMessage{sample_staging_grow()}; },
         "22220000000000000000300000000000"},
    {"sample_staging_granted", [] { return AnyMessage{sample_staging_granted()}; },
         "33330000000000000000400000000000"},
    {"sample_epoch_begin", [] { return AnyMessage{sample_epoch_begin()}; },
         "444400000000000011000000000000000000500000000000"},
    {"sample_commit", [] { return AnyMessage{sample_commit()}; },
         "5555000000000000120000000000000003000000000000003930000000000000efcdab89674523011032547698badcfe"
         "010000000700000000000000cdab341200000000a0a1a2a3a4a5a6a7a8a9aaabacadaeaf"},
    {"sample_ack", [] { return AnyMessage{sample_ack()}; },
         "66660000000000001300000000000000020000000f000000646967657374206d69736d61746368"},
    {"sample_activate", [] { return AnyMessage{sample_activate()}; },
         "7777000000000000"},
    {"sample_activate_done", [] { return AnyMessage{sample_activate_done()}; },
         "88880000000000000100000007000000726573756d6564"},
    {"sample_primary_lost", [] { return AnyMessage{sample_primary_lost()}; },
         "99990000000000000b00000071656d7520657869746564"},
    {"sample_disable", [] { return AnyMessage{sample_disable()}; },
         "aaaa000000000000"},
    {"sample_error", [] { return AnyMessage{sample_error()}; },
         "140000007477696e206661696c656420746f207374617274"},
    {"sample_takeover", [] { return AnyMessage{sample_takeover()}; },
         "bbbb0000000000000e0000007072696d6172792073696c656e74"},
    {"sample_heartbeat_link", [] { return AnyMessage{sample_heartbeat_link()}; },
         "cccc000000000000"},
    {"sample_disk_write", [] { return AnyMessage{sample_disk_write()}; },
         "dddd00000000000014000000000000000100000001000000001000000000000008000000000000004142434445464748"},
    {"sample_disk_zero", [] { return AnyMessage{sample_disk_zero()}; },
         "dddd0000000000001500000000000000000000000200000000200000000000000000000000010000"},
    {"sample_resolve", [] { return AnyMessage{sample_resolve()}; },
         "eeee00000000000003000000766d31"},
    {"sample_resolution", [] { return AnyMessage{sample_resolution()}; },
         "ffff000000000000020000000900000072756e732068657265"},
    {"sample_suspect", [] { return AnyMessage{sample_suspect()}; },
         "3412000000000000fa000000"},
};

std::vector<std::byte> unhex(std::string_view h) {
  std::vector<std::byte> out;
  for (size_t i = 0; i + 1 < h.size(); i += 2)
    out.push_back(static_cast<std::byte>(std::stoul(std::string(h.substr(i, 2)), nullptr, 16)));
  return out;
}
std::vector<std::byte> encode_any(const AnyMessage& m) {
  return std::visit([](const auto& x) { return encode(x); }, m);
}
MsgType type_any(const AnyMessage& m) {
  return std::visit([](const auto& x) { return std::decay_t<decltype(x)>::kType; }, m);
}

// The number of members of aggregate T (the brace-initialisation probe: T{a, b, ...} compiles
// for up to as many initialisers as T has members).
struct AnyInit {
  template <class U>
  operator U() const;  // unevaluated only
};
template <class T, class... A>
constexpr size_t arity() {
  if constexpr (requires { T{A{}..., AnyInit{}}; })
    return arity<T, A..., AnyInit>();
  else
    return sizeof...(A);
}
template <class T>
size_t listed_fields() {
  T m{};
  size_t n = 0;
  T::fields(m, [&](const char*, auto&, auto&&...) { ++n; });
  return n;
}

}  // namespace

TEST_CASE("protocol: every member of every message is in its field list", "[checkpoint][protocol]") {
  auto check = []<class... T>(std::variant<T...>*) {
    const std::vector<std::pair<MsgType, std::pair<size_t, size_t>>> counts = {
        {T::kType, {listed_fields<T>(), arity<T>()}}...};
    for (const auto& [type, c] : counts) {
      INFO(to_string(type) << ": listed fields vs. members");
      CHECK(c.first == c.second);
    }
  };
  check(static_cast<AnyMessage*>(nullptr));
  CHECK(listed_fields<DiskInfo>() == arity<DiskInfo>());
  // The probe itself counts what it should.
  CHECK(arity<Commit>() == 10);
  CHECK(arity<OpenSession>() == 15);
}

TEST_CASE("protocol: encodings equal the version-5 golden vectors and decode back", "[checkpoint][protocol]") {
  size_t seen_types = 0;
  std::vector<bool> seen(std::variant_size_v<AnyMessage>, false);
  for (const auto& g : kGolden) {
    INFO(g.name);
    const AnyMessage m = g.make();
    const auto want = unhex(g.hex);
    CHECK(encode_any(m) == want);
    const AnyMessage back = decode_any(static_cast<uint16_t>(type_any(m)), want);
    CHECK(back == m);
    if (!seen[m.index()]) seen_types++;
    seen[m.index()] = true;
  }
  CHECK(seen_types == std::variant_size_v<AnyMessage>);  // a vector for every message
  // encode_disk_write() (no DiskWrite copied) is the same bytes as encode(DiskWrite).
  const DiskWrite w = sample_disk_write();
  CHECK(encode_disk_write(w.session_id, w.epoch, w.disk, w.op, w.offset, w.length, w.data) == encode(w));
}

TEST_CASE("protocol: every message round-trips", "[checkpoint][protocol]") {
  for (const auto& g : kGolden) {
    INFO(g.name);
    std::visit(
        [](const auto& m) {
          using T = std::decay_t<decltype(m)>;
          const T back = decode<T>(encode(m));
          CHECK(back == m);
          CHECK(type_of<T>() == T::kType);
        },
        g.make());
  }
}

TEST_CASE("protocol: malformed bodies are rejected whole, naming the message and the field",
          "[checkpoint][protocol]") {
  for (const auto& g : kGolden) {
    INFO(g.name);
    const AnyMessage m = g.make();
    const auto body = encode_any(m);
    const std::string name = to_string(type_any(m));
    const auto type = static_cast<uint16_t>(type_any(m));
    // Every truncation (DiskWrite's data is the rest of the body: a cut there is a length
    // mismatch, checked below; here cut into its 40-byte header only).
    const size_t cuts = std::holds_alternative<DiskWrite>(m) ? 40 : body.size();
    for (size_t n = 0; n < cuts; n++) {
      INFO("truncated to " << n);
      try {
        (void)decode_any(type, std::span<const std::byte>(body.data(), n));
        FAIL("accepted");
      } catch (const ProtocolError& e) {
        const std::string what = e.what();
        CHECK_THAT(what, Catch::StartsWith(name + ": field '"));
      }
    }
    if (const auto* w = std::get_if<DiskWrite>(&m); w && !w->data.empty()) {
      CHECK_THROWS_WITH(decode<DiskWrite>(std::span<const std::byte>(body.data(), body.size() - 1)),
                        Catch::StartsWith("DiskWrite: write of 8 bytes carries 7 data bytes"));
    }
    auto longer = body;
    longer.push_back(std::byte{0});
    CHECK_THROWS_AS(decode_any(type, longer), ProtocolError);
  }
  SECTION("truncation names the field, nested ones with their index") {
    auto b = encode(sample_open_session());
    // Cut inside the second disk's source string.
    const auto full = b;
    const std::string src = "/img/b.raw";
    auto it = std::search(full.begin(), full.end(), reinterpret_cast<const std::byte*>(src.data()),
                          reinterpret_cast<const std::byte*>(src.data()) + src.size());
    REQUIRE(it != full.end());
    b.resize(static_cast<size_t>(it - full.begin()) + 3);
    CHECK_THROWS_WITH(decode<OpenSession>(b), Catch::StartsWith("OpenSession: field 'disks[1].source': message truncated"));
    auto a = encode(sample_ack());
    a.resize(10);
    CHECK_THROWS_WITH(decode<Ack>(a), Catch::Contains("Ack: field 'epoch': message truncated"));
  }
  SECTION("enums outside 1..last name the value, the field and the range") {
    auto a = encode(sample_ack());
    a[16] = std::byte{3};
    CHECK_THROWS_WITH(decode<Ack>(a), Catch::Contains("Ack: invalid status 3 in field 'status' (valid: 1..2)"));
    auto o = sample_open_session();
    o.failover = FailoverPolicy::Invalid;
    CHECK_THROWS_WITH(decode<OpenSession>(encode(o)), Catch::Contains("invalid failover policy 0 in field 'failover'"));
  }
  SECTION("string and count limits, checked before anything is allocated") {
    auto o = sample_open_session();
    o.origin = std::string(257, 'o');
    CHECK_THROWS_WITH(encode(o), Catch::Contains("OpenSession field 'origin' of 257 bytes exceeds the 256 byte limit"));
    o.origin.clear();
    o.qemu_argv.assign(kMaxArgs + 1, "x");
    CHECK_THROWS_WITH(encode(o), Catch::Contains("'qemu_argv' has 4097 elements"));
    // A count of 2^32-1 disks is refused at the count.
    OpenSession small;
    small.session_id = 1;
    small.ram_size = 4096;
    small.vm_name = "v";
    std::vector<std::byte> evil = encode(small);
    const size_t disks_at = 4 + 8 + 8 + 4 + (4 + 1) + 4;  // version .. vm_name, argv count 0
    for (size_t i = 0; i < 4; i++) evil[disks_at + i] = std::byte{0xff};
    CHECK_THROWS_WITH(decode<OpenSession>(evil), Catch::Contains("field 'disks': 4294967295 elements exceed limit 64"));
  }
  SECTION("unknown and Invalid types") {
    CHECK_THROWS_WITH(decode_any(0, {}), Catch::Contains("unknown type 0"));
    CHECK_THROWS_WITH(decode_any(99, {}), Catch::Contains("unknown type 99"));
  }
}

TEST_CASE("protocol: typed dispatch calls the handler of the message's type", "[checkpoint][protocol]") {
  for (const auto& g : kGolden) {
    INFO(g.name);
    const AnyMessage m = g.make();
    transport::ControlMessage cm{static_cast<uint16_t>(type_any(m)), encode_any(m)};
    const std::string got = dispatch(cm, overloaded{
                                             [&](const Ack& a) {
                                               CHECK(AnyMessage{a} == m);
                                               return std::string("ack");
                                             },
                                             [&](const Commit& c) {
                                               CHECK(AnyMessage{c} == m);
                                               return std::string("commit");
                                             },
                                             [&](const auto& other) {
                                               CHECK(AnyMessage{other} == m);
                                               return std::string(to_string(other.kType));
                                             },
                                         });
    const std::string want = std::holds_alternative<Ack>(m)      ? "ack"
                             : std::holds_alternative<Commit>(m) ? "commit"
                                                                 : to_string(type_any(m));
    CHECK(got == want);
  }
  transport::ControlMessage bad{static_cast<uint16_t>(MsgType::Ack), {std::byte{1}}};
  CHECK_THROWS_AS(dispatch(bad, [](const auto&) {}), ProtocolError);
}

TEST_CASE("protocol: typed send over a connection arrives as its type", "[checkpoint][protocol]") {
  auto [a, b] = transport::fake::make_pair();
  send(*a, sample_commit());
  send(*a, sample_resolution());
  auto m1 = b->poll(std::chrono::seconds(5));
  REQUIRE(m1);
  CHECK(m1->type == static_cast<uint16_t>(MsgType::Commit));
  CHECK(decode<Commit>(m1->body) == sample_commit());
  auto m2 = b->poll(std::chrono::seconds(5));
  REQUIRE(m2);
  CHECK(std::get<Resolution>(decode_any(m2->type, m2->body)) == sample_resolution());
}
