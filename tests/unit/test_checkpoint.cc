// Staging, commit and replica invariants (checkpoint/), and the session protocol codec.
#include <catch2/catch.hpp>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#include <set>

#include <cstring>
#include <random>

#include "checkpoint/digest.h"
#include "checkpoint/protocol.h"
#include "checkpoint/replica.h"
#include "checkpoint/staging.h"
#include "checkpoint/stats.h"
#include "checkpoint/tracker.h"
#include "common/error.h"

using namespace ftvm;
using namespace ftvm::checkpoint;

namespace {
constexpr size_t kPages = 256;

std::vector<std::byte> random_ram(std::mt19937_64& rng, size_t pages) {
  std::vector<std::byte> v(pages * kPageSize);
  for (auto& b : v) b = static_cast<std::byte>(rng());
  return v;
}

// Stages `pages` of `src` plus a device-state blob, copies the bytes into the replica's staging
// area as the transport would, and returns the commit record.
Commit stage_into(Replica& r, const std::vector<std::byte>& src, std::vector<uint64_t> pages, uint64_t epoch,
                  const std::string& devstate) {
  EpochStager s;
  s.stage_pages(pages, src);
  auto area = s.device_state_area(devstate.size());
  std::memcpy(area.data(), devstate.data(), devstate.size());
  if (r.staging().size() < s.bytes().size()) r.grow_staging(s.bytes().size());
  std::memcpy(r.staging().data(), s.bytes().data(), s.bytes().size());
  Commit c;
  c.session_id = 7;
  c.epoch = epoch;
  c.page_count = s.page_count();
  c.devstate_bytes = s.device_state_bytes();
  c.staged_digest = s.digest();
  return c;
}
}  // namespace

TEST_CASE("replica applies verified epochs and its RAM then equals the primary's", "[checkpoint]") {
  std::mt19937_64 rng(1);
  auto primary = random_ram(rng, kPages);
  std::vector<std::byte> twin(primary);  // after sync
  Replica r(twin, 4096);
  RamDigest pd(kPages);
  pd.reset_from(primary);
  for (uint64_t epoch = 1; epoch <= 50; epoch++) {
    std::vector<uint64_t> dirty;
    for (uint64_t p = 0; p < kPages; p++)
      if (rng() % 5 == 0) {
        dirty.push_back(p);
        for (size_t i = 0; i < kPageSize; i += 64) primary[p * kPageSize + i] = static_cast<std::byte>(rng());
      }
    auto c = stage_into(r, primary, dirty, epoch, "devstate-" + std::to_string(epoch));
    r.apply(c);
    for (auto p : dirty) pd.update(p, primary.data() + p * kPageSize);
    REQUIRE(r.committed_epoch() == epoch);
    REQUIRE(twin == primary);
    REQUIRE(digest_ram(twin) == pd.value());
    std::string ds(reinterpret_cast<const char*>(r.device_state().data()), r.device_state().size());
    REQUIRE(ds == "devstate-" + std::to_string(epoch));
  }
}

TEST_CASE("a torn or corrupted epoch is never applied", "[checkpoint]") {
  std::mt19937_64 rng(2);
  auto primary = random_ram(rng, kPages);
  std::vector<std::byte> twin(primary);
  Replica r(twin, 1 << 20);
  primary[5 * kPageSize] = std::byte{0x42};
  r.apply(stage_into(r, primary, {5}, 1, "ds1"));
  const auto before = twin;
  const std::string ds_before(reinterpret_cast<const char*>(r.device_state().data()), r.device_state().size());

  primary[9 * kPageSize] ^= std::byte{0xff};
  auto c = stage_into(r, primary, {9, 10}, 2, "ds2");

  SECTION("one flipped byte in the staged pages") {
    r.staging()[8 * 2 + 100] ^= std::byte{1};
    REQUIRE_THROWS_AS(r.apply(c), ProtocolError);
  }
  SECTION("only part of the epoch arrived (rest of staging still holds epoch 1)") {
    std::memset(r.staging().data() + 8 * 2 + kPageSize, 0, kPageSize);
    REQUIRE_THROWS_WITH(r.apply(c), Catch::Contains("digest mismatch"));
  }
  SECTION("commit record that claims more bytes than staged") {
    c.page_count = 1000;
    REQUIRE_THROWS_AS(r.apply(c), ProtocolError);
  }
  SECTION("page index out of range, with a matching digest") {
    uint64_t bad = kPages + 3;
    std::memcpy(r.staging().data() + 8, &bad, 8);
    c.staged_digest = digest_bytes(std::span<const std::byte>(r.staging().data(), c.staged_size()));
    REQUIRE_THROWS_WITH(r.apply(c), Catch::Contains("out of range"));
  }
  SECTION("epoch out of order") {
    c.epoch = 3;
    REQUIRE_THROWS_WITH(r.apply(c), Catch::Contains("out of order"));
  }
  REQUIRE(twin == before);
  REQUIRE(r.committed_epoch() == 1);
  REQUIRE(std::string(reinterpret_cast<const char*>(r.device_state().data()), r.device_state().size()) == ds_before);
}

TEST_CASE("staging growth is bounded by the guest size", "[checkpoint]") {
  std::vector<std::byte> twin(kPages * kPageSize);
  Replica r(twin, 4096);
  REQUIRE(r.grow_staging(1 << 20) >= (1u << 20));
  REQUIRE_THROWS_AS(r.grow_staging(r.max_staging() + 1), ProtocolError);
}

TEST_CASE("protocol messages round-trip and malformed bodies are rejected", "[checkpoint][protocol]") {
  OpenSession o;
  o.session_id = 99;
  o.ram_size = 256 << 20;
  o.vm_name = "vm1";
  o.qemu_argv = {"qemu-system-x86_64", "-m", "256"};
  auto b = encode(o);
  auto o2 = decode<OpenSession>(b);
  REQUIRE(o2.vm_name == "vm1");
  REQUIRE(o2.qemu_argv == o.qemu_argv);
  REQUIRE(o2.ram_size == o.ram_size);

  SECTION("every truncation is rejected") {
    for (size_t n = 0; n < b.size(); n++)
      REQUIRE_THROWS_AS(decode<OpenSession>(std::span<const std::byte>(b.data(), n)), ProtocolError);
  }
  SECTION("trailing garbage is rejected") {
    b.push_back(std::byte{0});
    REQUIRE_THROWS_AS(decode<OpenSession>(b), ProtocolError);
  }
  SECTION("wrong protocol version names both versions") {
    b[0] = std::byte{9};
    REQUIRE_THROWS_WITH(decode<OpenSession>(b), Catch::Contains("version 9") &&
                                                     Catch::Contains(fmt::format("speaks {}", kProtocolVersion)));
  }
  SECTION("the arbiter kind travels in OpenSession") {
    o.arbiter = "fence-command";
    o.reprotect_port = 7410;
    REQUIRE(decode<OpenSession>(encode(o)).arbiter == "fence-command");
    REQUIRE(decode<OpenSession>(encode(o)).reprotect_port == 7410);
    o.second_path_host = "10.1.0.1";
    REQUIRE(decode<OpenSession>(encode(o)).second_path_host == "10.1.0.1");
    o.second_path_host = std::string(65, 'a');  // an address, not a payload
    REQUIRE_THROWS(decode<OpenSession>(encode(o)));
    o.second_path_host.clear();
    o.arbiter = "";
    auto e = encode(o);
    REQUIRE_THROWS_WITH(decode<OpenSession>(e), Catch::Contains("arbiter"));
  }
  SECTION("the failover policy, origin and history travel in OpenSession (version 4)") {
    REQUIRE(decode<OpenSession>(encode(o)).failover == FailoverPolicy::Auto);
    o.failover = FailoverPolicy::Manual;
    o.origin = "host-a@127.0.0.1:7410";
    o.history = R"([{"event":"protected"}])";
    auto d = decode<OpenSession>(encode(o));
    REQUIRE(d.failover == FailoverPolicy::Manual);
    REQUIRE(d.origin == o.origin);
    REQUIRE(d.history == o.history);
    o.failover = FailoverPolicy::Invalid;
    REQUIRE_THROWS_WITH(decode<OpenSession>(encode(o)), Catch::Contains("failover policy"));
    o.failover = static_cast<FailoverPolicy>(7);
    REQUIRE_THROWS_AS(decode<OpenSession>(encode(o)), ProtocolError);
  }
  SECTION("split-brain messages: SessionReady's timeout, Resolve, Resolution, Suspect") {
    auto r = decode<SessionReady>(encode(SessionReady{7, 4096, 1234, 400}));
    REQUIRE(r.heartbeat_timeout_ms == 400);
    REQUIRE_THROWS_AS(decode<SessionReady>(encode(SessionReady{7, 4096, 1234, 0})), ProtocolError);
    auto q = decode<Resolve>(encode(Resolve{42, "vm1"}));
    REQUIRE(q.session_id == 42);
    REQUIRE(q.vm_name == "vm1");
    REQUIRE_THROWS_AS(decode<Resolve>(encode(Resolve{0, "vm1"})), ProtocolError);
    auto a = decode<Resolution>(encode(Resolution{42, Verdict::Active, "runs here"}));
    REQUIRE(a.verdict == Verdict::Active);
    REQUIRE(a.text == "runs here");
    auto bad = encode(Resolution{42, Verdict::Active, ""});
    bad[8] = std::byte{9};  // verdict 9
    REQUIRE_THROWS_WITH(decode<Resolution>(bad), Catch::Contains("verdict"));
    REQUIRE(decode<Suspect>(encode(Suspect{42, 250})).silent_ms == 250);
    auto sb = encode(Suspect{42, 250});
    for (size_t n = 0; n < sb.size(); n++)
      REQUIRE_THROWS_AS(decode<Suspect>(std::span<const std::byte>(sb.data(), n)), ProtocolError);
  }
  SECTION("huge string length does not allocate") {
    std::vector<std::byte> evil(b.begin(), b.begin() + 24);
    for (int i = 0; i < 4; i++) evil.push_back(std::byte{0xff});
    REQUIRE_THROWS_AS(decode<OpenSession>(evil), ProtocolError);
  }
  SECTION("commit and ack") {
    Commit c;
    c.epoch = 5;
    c.page_count = 3;
    c.flags = Commit::kFinal;
    c.disk_ops = 7;
    c.disk_digest = 0x1234abcd;
    auto c2 = decode<Commit>(encode(c));
    REQUIRE(c2.epoch == 5);
    REQUIRE(c2.flags == Commit::kFinal);
    REQUIRE(c2.disk_ops == 7);
    REQUIRE(c2.disk_digest == 0x1234abcd);
    c.epoch = 0;
    REQUIRE_THROWS_AS(decode<Commit>(encode(c)), ProtocolError);
    Ack a{1, 5, AckStatus::Rejected, "digest"};
    auto a2 = decode<Ack>(encode(a));
    REQUIRE(a2.status == AckStatus::Rejected);
    auto ab = encode(a);
    ab[16] = std::byte{0};  // status Invalid
    REQUIRE_THROWS_AS(decode<Ack>(ab), ProtocolError);
  }
}

TEST_CASE("percentiles use nearest rank", "[checkpoint]") {
  Window w(100);
  for (int i = 1; i <= 100; i++) w.add(i);
  REQUIRE(w.percentile(50) == 50);
  REQUIRE(w.percentile(99) == 99);
  REQUIRE(w.percentile(100) == 100);
  REQUIRE(w.last() == 100);
}

TEST_CASE("disk messages round-trip and malformed ones are rejected", "[checkpoint][protocol]") {
  OpenSession o;
  o.session_id = 1;
  o.ram_size = 4096;
  o.vm_name = "vm1";
  o.qemu_argv = {"qemu"};
  o.disks = {{"virtio0", "/img/a.qcow2", 64 << 20}, {"virtio1", "/img/b.raw", 1 << 30}};
  auto o2 = decode<OpenSession>(encode(o));
  REQUIRE(o2.disks.size() == 2);
  CHECK(o2.disks[1].source == "/img/b.raw");
  CHECK(o2.disks[1].size == (1u << 30));
  o.disks[0].size = 1000;  // not a multiple of 512
  CHECK_THROWS_WITH(decode<OpenSession>(encode(o)), Catch::Contains("multiple of 512"));

  std::vector<std::byte> data(8192, std::byte{0x5a});
  auto w = encode_disk_write(1, 3, 1, DiskOp::Write, 4096, data.size(), data);
  auto d = decode<DiskWrite>(w);
  CHECK(d.epoch == 3);
  CHECK(d.disk == 1);
  CHECK(d.op == DiskOp::Write);
  CHECK(d.offset == 4096);
  CHECK(d.data == data);
  auto z = decode<DiskWrite>(encode_disk_write(1, 3, 0, DiskOp::Zero, 0, uint64_t{1} << 40, {}));
  CHECK(z.length == uint64_t{1} << 40);
  CHECK(z.data.empty());

  SECTION("truncated write data") {
    w.pop_back();
    CHECK_THROWS_AS(decode<DiskWrite>(w), ProtocolError);
  }
  SECTION("invalid operation") {
    w[20] = std::byte{0};
    CHECK_THROWS_WITH(decode<DiskWrite>(w), Catch::Contains("invalid operation 0"));
  }
  SECTION("zero carrying data") {
    auto bad = encode_disk_write(1, 3, 0, DiskOp::Zero, 0, 4096, {});
    bad.push_back(std::byte{1});
    CHECK_THROWS_AS(decode<DiskWrite>(bad), ProtocolError);
  }
  SECTION("epoch 0 and overflow") {
    CHECK_THROWS_AS(decode<DiskWrite>(encode_disk_write(1, 0, 0, DiskOp::Trim, 0, 512, {})), ProtocolError);
    CHECK_THROWS_AS(decode<DiskWrite>(encode_disk_write(1, 2, 0, DiskOp::Trim, ~uint64_t{0} - 10, 512, {})),
                    ProtocolError);
  }
  SECTION("sender refuses oversized or inconsistent writes") {
    std::vector<std::byte> big(kMaxDiskWriteData + 1);
    CHECK_THROWS(encode_disk_write(1, 1, 0, DiskOp::Write, 0, big.size(), big));
    CHECK_THROWS(encode_disk_write(1, 1, 0, DiskOp::Write, 0, 10, data));
  }
}

// ---- keyed epoch digest (issue 12: authenticated sessions; Commit.staged_tag) ----------------

namespace {
EpochKey test_epoch_key(unsigned char seed) {
  EpochKey k;
  for (size_t i = 0; i < k.size(); ++i) k[i] = static_cast<unsigned char>(seed * 37 + i);
  return k;
}
}  // namespace

TEST_CASE("keyed epoch digest: depends on every byte, the epoch number and the key", "[checkpoint][security]") {
  std::mt19937_64 rng(11);
  auto bytes = random_ram(rng, 4);
  const auto k = test_epoch_key(1);
  const auto t = staged_tag(k, 5, bytes);
  CHECK(staged_tag(k, 5, bytes) == t);  // deterministic: a retransmission carries the same tag
  CHECK(staged_tag_ok(k, 5, bytes, t));
  CHECK_FALSE(staged_tag_ok(k, 6, bytes, t));                 // another epoch (replayed Commit)
  CHECK_FALSE(staged_tag_ok(test_epoch_key(2), 5, bytes, t));  // another connection's key
  for (size_t at : {size_t{0}, bytes.size() / 2, bytes.size() - 1}) {
    auto altered = bytes;
    altered[at] ^= std::byte{0x01};
    CHECK_FALSE(staged_tag_ok(k, 5, altered, t));
  }
  CHECK_FALSE(staged_tag_ok(k, 5, std::span<const std::byte>(bytes).first(bytes.size() - 1), t));  // truncated
  CHECK(staged_tag(k, 5, {}) != StagedTag{});  // even an empty epoch has a nonzero tag
}

TEST_CASE("keyed epoch digest: a replica of an authenticated session applies only what the key tagged",
          "[checkpoint][security]") {
  std::mt19937_64 rng(12);
  auto primary = random_ram(rng, kPages);
  std::vector<std::byte> twin(primary);
  Replica r(twin, 1 << 20);
  const auto key = test_epoch_key(3);
  auto keyed = [&](Commit c) {
    c.staged_tag = staged_tag(key, c.epoch, std::span<const std::byte>(r.staging().data(), c.staged_size()));
    c.staged_digest = 0;
    return c;
  };
  primary[3 * kPageSize] = std::byte{0x17};
  r.apply(keyed(stage_into(r, primary, {3}, 1, "ds1")), &key);
  REQUIRE(r.committed_epoch() == 1);
  REQUIRE(twin == primary);
  const auto before = twin;

  primary[9 * kPageSize + 7] ^= std::byte{0xff};
  auto c = keyed(stage_into(r, primary, {9, 10}, 2, "ds2"));
  SECTION("a write into the staging area after the primary tagged it (a one-sided write by an attacker)") {
    r.staging()[8 * 2 + 123] ^= std::byte{0x80};
    // An attacker who can write the staging area can also fix up the unkeyed digest; not the tag.
    c.staged_digest = digest_bytes(std::span<const std::byte>(r.staging().data(), c.staged_size()));
    REQUIRE_THROWS_WITH(r.apply(c, &key), Catch::Contains("keyed digest mismatch"));
  }
  SECTION("an altered page index") {
    uint64_t other = 11;
    std::memcpy(r.staging().data() + 8, &other, 8);
    REQUIRE_THROWS_WITH(r.apply(c, &key), Catch::Contains("keyed digest mismatch"));
  }
  SECTION("a Commit with only the unkeyed digest (a peer that does not use the session key)") {
    Commit u = c;
    u.staged_tag = {};
    u.staged_digest = digest_bytes(std::span<const std::byte>(r.staging().data(), c.staged_size()));
    REQUIRE_THROWS_WITH(r.apply(u, &key), Catch::Contains("keyed digest mismatch"));
  }
  SECTION("the tag of another connection's key") {
    const auto other = test_epoch_key(4);
    REQUIRE_THROWS_WITH(r.apply(c, &other), Catch::Contains("keyed digest mismatch"));
  }
  SECTION("the tag of another epoch (a Commit replayed under a new number)") {
    Commit replay = c;
    replay.staged_tag = staged_tag(key, 1, std::span<const std::byte>(r.staging().data(), c.staged_size()));
    REQUIRE_THROWS_WITH(r.apply(replay, &key), Catch::Contains("keyed digest mismatch"));
  }
  // Nothing committed changed: RAM, epoch and device state are epoch 1's.
  REQUIRE(twin == before);
  REQUIRE(r.committed_epoch() == 1);
  REQUIRE(std::string(reinterpret_cast<const char*>(r.device_state().data()), r.device_state().size()) == "ds1");
  // The untouched epoch still applies afterwards (what a retransmission achieves).
  auto again = keyed(stage_into(r, primary, {9, 10}, 2, "ds2"));
  r.apply(again, &key);
  REQUIRE(r.committed_epoch() == 2);
  REQUIRE(twin == primary);
}

TEST_CASE("Commit carries the keyed tag on the wire", "[checkpoint][security]") {
  Commit c;
  c.session_id = 1;
  c.epoch = 9;
  for (size_t i = 0; i < c.staged_tag.size(); ++i) c.staged_tag[i] = static_cast<std::byte>(i + 1);
  auto d = decode<Commit>(encode(c));
  CHECK(d.staged_tag == c.staged_tag);
  auto body = encode(c);
  body.pop_back();
  CHECK_THROWS_AS(decode<Commit>(body), ProtocolError);  // a Commit without the tag (version 4) is refused
}

TEST_CASE("epoch 1: the carried pages merge into an ascending list the standby accepts (issue 17)", "[checkpoint]") {
  using namespace ftvm::checkpoint;
  std::mt19937_64 rng(17);
  for (int round = 0; round < 200; round++) {
    // The last sync pass's list, collected while the guest ran (any order, repeats), and the
    // pause's scan (any order).
    std::vector<uint64_t> carry, dirty;
    for (int i = 0; i < 300; i++) carry.push_back(rng() % 5000);
    for (int i = 0; i < 300; i++) dirty.push_back(rng() % 5000);
    std::set<uint64_t> want(carry.begin(), carry.end());
    want.insert(dirty.begin(), dirty.end());
    merge_page_lists(dirty, carry);
    REQUIRE(carry.empty());
    REQUIRE(std::vector<uint64_t>(want.begin(), want.end()) == dirty);  // strictly ascending, nothing lost
  }
}

TEST_CASE("a sparse RAM digest equals the full one without touching holes (issue 17)", "[checkpoint]") {
  using namespace ftvm::checkpoint;
  constexpr uint64_t kPages = 256;
  int fd = ::memfd_create("ftvm-test-sparse", MFD_CLOEXEC);
  REQUIRE(fd >= 0);
  REQUIRE(::ftruncate(fd, kPages * kPageSize) == 0);
  auto* p = static_cast<std::byte*>(::mmap(nullptr, kPages * kPageSize, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0));
  REQUIRE(p != MAP_FAILED);
  for (uint64_t pg : {3, 10, 11, 12, 200}) std::memset(p + pg * kPageSize, int(pg), kPageSize);
  const std::vector<std::pair<uint64_t, uint64_t>> data = {{3, 4}, {10, 13}, {200, 201}};
  struct stat before{}, after{};
  REQUIRE(::fstat(fd, &before) == 0);
  const uint64_t sparse = digest_ram_sparse({p, kPages * kPageSize}, data);
  REQUIRE(::fstat(fd, &after) == 0);
  REQUIRE(after.st_blocks == before.st_blocks);  // no hole was allocated by the digest
  REQUIRE(sparse == digest_ram({p, kPages * kPageSize}));  // reads every page: same value
  REQUIRE_THROWS(digest_ram_sparse({p, kPages * kPageSize}, {{10, 13}, {3, 4}}));  // out of order
  ::munmap(p, kPages * kPageSize);
  ::close(fd);
}
