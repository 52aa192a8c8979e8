// The standby's epoch-buffered disk writes (checkpoint/disk_journal.h): initial copy, buffering,
// verified commits, failover, spilling, zero/trim, and a randomized model test.
#include <catch2/catch.hpp>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <limits>
#include <map>
#include <random>

#include "checkpoint/disk_journal.h"
#include "common/error.h"

using namespace ftvm;
using namespace ftvm::checkpoint;

namespace {

using Bytes = std::vector<std::byte>;

// A fresh directory under /tmp, removed with everything in it at scope exit.
struct TempDir {
  std::string path;
  std::string spill;  // journals spill here; images live in `path`
  TempDir() {
    std::string t = "/tmp/ftvm-disk-journal-XXXXXX";
    REQUIRE(::mkdtemp(t.data()) != nullptr);
    path = t;
    spill = path + "/spill";
    REQUIRE(::mkdir(spill.c_str(), 0700) == 0);
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
  std::string file(const std::string& name) const { return path + "/" + name; }
};

Bytes read_all(const std::string& path) {
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  REQUIRE(fd.valid());
  struct stat st {};
  REQUIRE(::fstat(fd.get(), &st) == 0);
  Bytes b(static_cast<size_t>(st.st_size));
  size_t done = 0;
  while (done < b.size()) {
    const ssize_t r = ::pread(fd.get(), b.data() + done, b.size() - done, static_cast<off_t>(done));
    REQUIRE(r > 0);
    done += static_cast<size_t>(r);
  }
  return b;
}

// Offset of the first byte where the file at `path` differs from `want` (a size mismatch counts
// at the shorter end); -1 when they are equal. Keeps failure messages short (no byte dumps).
int64_t first_diff(const std::string& path, const Bytes& want) {
  const Bytes got = read_all(path);
  const size_t n = std::min(got.size(), want.size());
  for (size_t i = 0; i < n; i++)
    if (got[i] != want[i]) return static_cast<int64_t>(i);
  return got.size() == want.size() ? -1 : static_cast<int64_t>(n);
}

Bytes random_bytes(std::mt19937_64& rng, size_t n) {
  Bytes b(n);
  for (auto& x : b) x = static_cast<std::byte>(rng());
  return b;
}

// Passes everything to `inner` and counts the calls: "nothing written" is checked on both the
// bytes and the calls.
class CountingImage : public DiskImage {
 public:
  explicit CountingImage(DiskImage& inner) : inner_(inner) {}
  uint64_t size() const override { return inner_.size(); }
  void write(uint64_t off, std::span<const std::byte> d) override { calls++, inner_.write(off, d); }
  void zero(uint64_t off, uint64_t len) override { calls++, inner_.zero(off, len); }
  void sync() override { syncs++, inner_.sync(); }
  uint64_t calls = 0, syncs = 0;

 private:
  DiskImage& inner_;
};

struct Op {
  uint32_t disk;
  DiskOpKind kind;
  uint64_t offset, length;
  Bytes data;
};

Op write_op(uint32_t disk, uint64_t off, Bytes data) {
  const uint64_t len = data.size();
  return Op{disk, DiskOpKind::Write, off, len, std::move(data)};
}

// The primary's side of one epoch: the digest it would put into the Commit.
struct Sent {
  uint64_t count, digest;
};
Sent digest_of(const std::vector<Op>& ops) {
  DiskOpDigest d;
  for (const Op& o : ops) d.add(o.disk, o.kind, o.offset, o.length, o.data);
  return {d.count(), d.value()};
}

void feed(DiskJournal& j, uint64_t epoch, const std::vector<Op>& ops) {
  for (const Op& o : ops) j.add(epoch, o.disk, o.kind, o.offset, o.length, o.data);
}

// Applies `o` to an in-memory reference disk.
void apply_ref(Bytes& disk, const Op& o) {
  if (o.length == 0) return;  // (a zero-length op's data() may be null)
  if (o.kind == DiskOpKind::Write)
    std::memcpy(disk.data() + o.offset, o.data.data(), o.length);
  else
    std::memset(disk.data() + o.offset, 0, o.length);
}

// Paths of this process's open files that live in `dir` (spill files show up as
// "DIR/#NNN (deleted)" or "DIR/ftvm-disk-spill-XXXXXX (deleted)"), with their sizes.
std::vector<uint64_t> open_files_in(const std::string& dir) {
  std::vector<uint64_t> sizes;
  for (const auto& ent : std::filesystem::directory_iterator("/proc/self/fd")) {
    std::error_code ec;
    const auto target = std::filesystem::read_symlink(ent.path(), ec).string();
    if (ec || target.rfind(dir + "/", 0) != 0) continue;
    struct stat st {};
    if (::stat(ent.path().c_str(), &st) == 0) sizes.push_back(static_cast<uint64_t>(st.st_size));
  }
  return sizes;
}

constexpr uint64_t kNoLimit = uint64_t{1} << 40;

}  // namespace

TEST_CASE("DiskOpDigest is order-sensitive and covers every field", "[disk-journal]") {
  const Bytes a{std::byte{1}, std::byte{2}}, b{std::byte{3}};
  DiskOpDigest empty;
  CHECK(empty.count() == 0);
  CHECK(empty.value() == DiskOpDigest().value());

  DiskOpDigest ab, ba;
  ab.add(0, DiskOpKind::Write, 0, 2, a);
  ab.add(0, DiskOpKind::Write, 8, 1, b);
  ba.add(0, DiskOpKind::Write, 8, 1, b);
  ba.add(0, DiskOpKind::Write, 0, 2, a);
  CHECK(ab.count() == 2);
  CHECK(ab.value() != ba.value());
  CHECK(ab.value() == ab.value());  // value() does not end the stream

  DiskOpDigest copy(ab);
  CHECK(copy.value() == ab.value());
  copy.add(0, DiskOpKind::Zero, 0, 1, {});
  CHECK(copy.value() != ab.value());  // independent state
  CHECK(copy.count() == 3);

  const uint64_t base = [] {
    DiskOpDigest d;
    d.add(1, DiskOpKind::Zero, 4096, 512, {});
    return d.value();
  }();
  auto one = [](uint32_t disk, DiskOpKind k, uint64_t off, uint64_t len) {
    DiskOpDigest d;
    d.add(disk, k, off, len, {});
    return d.value();
  };
  CHECK(one(0, DiskOpKind::Zero, 4096, 512) != base);
  CHECK(one(1, DiskOpKind::Trim, 4096, 512) != base);
  CHECK(one(1, DiskOpKind::Zero, 4097, 512) != base);
  CHECK(one(1, DiskOpKind::Zero, 4096, 513) != base);
}

TEST_CASE("RawImage creates sparse images, checks ranges and reopens them", "[disk-journal]") {
  TempDir dir;
  const auto path = dir.file("disk.raw");
  {
    auto img = RawImage::create(path, 1 << 20);
    CHECK(img->size() == (1u << 20));
    std::mt19937_64 rng(3);
    img->write(100, random_bytes(rng, 50));
    CHECK_THROWS_AS(img->write((1 << 20) - 10, random_bytes(rng, 11)), Error);
    CHECK_THROWS_AS(img->zero(std::numeric_limits<uint64_t>::max() - 4, 10), Error);
    img->sync();
  }
  auto img = RawImage::open(path);
  CHECK(img->size() == (1u << 20));
  CHECK(read_all(path).size() == (1u << 20));
  CHECK_THROWS_AS(RawImage::open(dir.file("missing.raw")), SysError);
  CHECK_THROWS_AS(RawImage::open(dir.path), Error);  // a directory is no image
}

TEST_CASE("the journal checks its images and spill directory at construction", "[disk-journal]") {
  TempDir dir;
  auto raw = RawImage::create(dir.file("d0"), 4096);
  CHECK_THROWS_AS(DiskJournal({raw.get()}, 0, dir.file("missing")), SysError);
  CHECK_THROWS_AS(DiskJournal({raw.get()}, 0, dir.file("d0")), Error);  // not a directory
  CHECK_THROWS_AS(DiskJournal({raw.get(), nullptr}, 0, dir.spill), Error);
  DiskJournal j({raw.get()}, 0, dir.spill);
  CHECK(j.committed_epoch() == 0);
}

TEST_CASE("before the first commit ops of the first epoch go straight to the image", "[disk-journal]") {
  TempDir dir;
  auto raw = RawImage::create(dir.file("d0"), 256 << 10);
  CountingImage img(*raw);
  DiskJournal j({&img}, kNoLimit, dir.spill);
  std::mt19937_64 rng(1);
  Bytes expect(256 << 10);

  const std::vector<Op> e1{write_op(0, 0, random_bytes(rng, 8192)), write_op(0, 70000, random_bytes(rng, 1000))};
  feed(j, 1, e1);
  for (const Op& o : e1) apply_ref(expect, o);
  CHECK(first_diff(dir.file("d0"), expect) == -1);  // applied at once
  CHECK(j.stats().buffered_ops == 0);
  CHECK(j.stats().applied_ops == 2);

  // Epoch 2 starts before Commit(1) arrives: its ops must wait, or a failover right after
  // Commit(1) would leave epoch-2 writes under epoch-1 RAM.
  const std::vector<Op> e2{write_op(0, 4096, random_bytes(rng, 4096))};
  feed(j, 2, e2);
  CHECK(first_diff(dir.file("d0"), expect) == -1);
  CHECK(j.stats().buffered_ops == 1);

  const Sent s1 = digest_of(e1);
  j.commit(1, s1.count, s1.digest);  // direct ops count towards epoch 1
  CHECK(j.committed_epoch() == 1);
  CHECK(first_diff(dir.file("d0"), expect) == -1);

  const Sent s2 = digest_of(e2);
  j.commit(2, s2.count, s2.digest, true);
  for (const Op& o : e2) apply_ref(expect, o);
  CHECK(first_diff(dir.file("d0"), expect) == -1);
  CHECK(img.syncs == 1);
}

TEST_CASE("after the first commit the image changes only when an epoch commits", "[disk-journal]") {
  TempDir dir;
  auto d0 = RawImage::create(dir.file("d0"), 128 << 10);
  auto d1 = RawImage::create(dir.file("d1"), 64 << 10);
  DiskJournal j({d0.get(), d1.get()}, kNoLimit, dir.spill);
  j.commit(1, 0, DiskOpDigest().value());  // an epoch without disk ops
  std::mt19937_64 rng(2);
  Bytes e0(128 << 10), e1(64 << 10);

  for (uint64_t epoch = 2; epoch <= 5; epoch++) {
    std::vector<Op> ops;
    for (int i = 0; i < 10; i++) {
      const uint32_t disk = rng() % 2;
      const uint64_t size = disk == 0 ? e0.size() : e1.size();
      const uint64_t len = 1 + rng() % 5000, off = rng() % (size - len);
      ops.push_back(write_op(disk, off, random_bytes(rng, len)));
    }
    feed(j, epoch, ops);
    CHECK(first_diff(dir.file("d0"), e0) == -1);  // buffered: nothing visible yet
    CHECK(first_diff(dir.file("d1"), e1) == -1);
    CHECK(j.stats().buffered_ops == 10);
    const Sent s = digest_of(ops);
    j.commit(epoch, s.count, s.digest);
    for (const Op& o : ops) apply_ref(o.disk == 0 ? e0 : e1, o);
    CHECK(first_diff(dir.file("d0"), e0) == -1);
    CHECK(first_diff(dir.file("d1"), e1) == -1);
    CHECK(j.stats().buffered_ops == 0);
    CHECK(j.stats().buffered_bytes == 0);
    CHECK(j.committed_epoch() == epoch);
  }
}

TEST_CASE("a commit whose count or digest does not match writes nothing", "[disk-journal]") {
  TempDir dir;
  auto raw = RawImage::create(dir.file("d0"), 64 << 10);
  CountingImage img(*raw);
  DiskJournal j({&img}, kNoLimit, dir.spill);
  j.commit(1, 0, DiskOpDigest().value());
  std::mt19937_64 rng(4);
  const std::vector<Op> sent{write_op(0, 0, random_bytes(rng, 3000)), write_op(0, 2000, random_bytes(rng, 3000)),
                             Op{0, DiskOpKind::Zero, 10000, 5000, {}}, write_op(0, 40000, random_bytes(rng, 100))};
  const Sent s = digest_of(sent);
  std::vector<Op> got = sent;

  SECTION("a missing op") { got.erase(got.begin() + 1); }
  SECTION("an extra op") { got.push_back(write_op(0, 50000, random_bytes(rng, 10))); }
  SECTION("a duplicated op") { got.push_back(got.back()); }
  SECTION("a reordered pair") { std::swap(got[0], got[1]); }
  SECTION("a corrupted data byte") { got[1].data[1234] ^= std::byte{0x40}; }
  SECTION("a changed offset") { got[3].offset += 1; }
  SECTION("a zero turned into a trim") { got[2].kind = DiskOpKind::Trim; }

  feed(j, 2, got);
  const Bytes before = read_all(dir.file("d0"));
  CHECK_THROWS_AS(j.commit(2, s.count, s.digest), ProtocolError);
  CHECK(img.calls == 0);
  CHECK(first_diff(dir.file("d0"), before) == -1);
  CHECK(j.committed_epoch() == 1);
  CHECK(j.stats().buffered_ops == got.size());  // still there: the journal is unchanged
}

TEST_CASE("a commit with the right digest but the wrong count, or vice versa, is refused", "[disk-journal]") {
  TempDir dir;
  auto raw = RawImage::create(dir.file("d0"), 64 << 10);
  CountingImage img(*raw);
  DiskJournal j({&img}, kNoLimit, dir.spill);
  j.commit(1, 0, DiskOpDigest().value());
  std::mt19937_64 rng(5);
  const std::vector<Op> ops{write_op(0, 0, random_bytes(rng, 100))};
  feed(j, 2, ops);
  const Sent s = digest_of(ops);
  CHECK_THROWS_AS(j.verify(2, s.count + 1, s.digest), ProtocolError);
  CHECK_THROWS_AS(j.commit(2, s.count, s.digest ^ 1), ProtocolError);
  CHECK_THROWS_AS(j.commit(3, 0, DiskOpDigest().value()), ProtocolError);  // epoch 2 skipped
  CHECK(img.calls == 0);
  j.verify(2, s.count, s.digest);
  CHECK(img.calls == 0);  // verify alone writes nothing
  j.commit(2, s.count, s.digest);
  CHECK(img.calls == 1);
  CHECK_THROWS_AS(j.commit(2, s.count, s.digest), ProtocolError);  // committed twice
  CHECK_THROWS_AS(j.commit(1, 0, DiskOpDigest().value()), ProtocolError);
}

TEST_CASE("the first commit may not precede an epoch the initial copy already wrote", "[disk-journal]") {
  TempDir dir;
  auto raw = RawImage::create(dir.file("d0"), 64 << 10);
  DiskJournal j({raw.get()}, kNoLimit, dir.spill, /*first_epoch=*/3);
  std::mt19937_64 rng(6);
  const std::vector<Op> ops{write_op(0, 0, random_bytes(rng, 100))};
  feed(j, 3, ops);  // direct: epoch 3 is the initial copy
  CHECK_THROWS_AS(j.commit(2, 0, DiskOpDigest().value()), ProtocolError);
  const Sent s = digest_of(ops);
  j.commit(3, s.count, s.digest);
  CHECK(j.committed_epoch() == 3);
}

TEST_CASE("drop_uncommitted leaves the image at the committed state", "[disk-journal]") {
  TempDir dir;
  auto raw = RawImage::create(dir.file("d0"), 256 << 10);
  DiskJournal j({raw.get()}, 8192, dir.spill);  // some payloads spill
  std::mt19937_64 rng(7);
  Bytes expect(256 << 10);
  const std::vector<Op> e1{write_op(0, 0, random_bytes(rng, 100000))};
  feed(j, 1, e1);
  for (const Op& o : e1) apply_ref(expect, o);
  const std::vector<Op> e2{write_op(0, 50000, random_bytes(rng, 6000)), Op{0, DiskOpKind::Trim, 0, 4096, {}}};
  feed(j, 2, e2);
  Sent s = digest_of(e1);
  j.commit(1, s.count, s.digest);
  s = digest_of(e2);
  j.commit(2, s.count, s.digest);
  for (const Op& o : e2) apply_ref(expect, o);

  const std::vector<Op> e3{write_op(0, 0, random_bytes(rng, 5000)), write_op(0, 9000, random_bytes(rng, 7000))};
  const std::vector<Op> e4{Op{0, DiskOpKind::Zero, 0, 200000, {}}, write_op(0, 1, random_bytes(rng, 3))};
  feed(j, 3, e3);
  feed(j, 4, e4);
  CHECK(j.stats().spilled_bytes > 0);
  CHECK(!open_files_in(dir.spill).empty());
  const auto [ops, bytes] = j.drop_uncommitted();
  CHECK(ops == 4);
  CHECK(bytes == 5000 + 7000 + 3);
  CHECK(first_diff(dir.file("d0"), expect) == -1);
  const auto st = j.stats();
  CHECK(st.buffered_ops == 0);
  CHECK(st.buffered_bytes == 0);
  CHECK(st.memory_bytes == 0);
  CHECK(st.spilled_bytes == 0);
  CHECK(st.dropped_ops == 4);
  CHECK(open_files_in(dir.spill).empty());  // spill files released
  CHECK(j.committed_epoch() == 2);
  CHECK(j.drop_uncommitted() == std::pair<uint64_t, uint64_t>{0, 0});
}

TEST_CASE("payloads beyond the memory limit spill to a file and give identical images", "[disk-journal]") {
  TempDir dir;
  constexpr uint64_t kSize = 8 << 20;
  auto small = RawImage::create(dir.file("small"), kSize);
  auto big = RawImage::create(dir.file("big"), kSize);
  DiskJournal js({small.get()}, 4096, dir.spill);
  DiskJournal jb({big.get()}, kNoLimit, dir.spill);
  for (DiskJournal* j : {&js, &jb}) j->commit(1, 0, DiskOpDigest().value());
  std::mt19937_64 rng(8);
  Bytes expect(kSize);

  for (uint64_t epoch = 2; epoch <= 4; epoch++) {
    std::vector<Op> ops;
    uint64_t bytes = 0;
    while (bytes < (3u << 20)) {  // ~3 MiB per epoch, writes of 1 B .. 256 KiB, some zeros
      const uint64_t len = 1 + rng() % (256 << 10), off = rng() % (kSize - len);
      if (rng() % 8 == 0) {
        ops.push_back(Op{0, DiskOpKind::Zero, off, len, {}});
      } else {
        ops.push_back(write_op(0, off, random_bytes(rng, len)));
        bytes += len;
      }
    }
    feed(js, epoch, ops);
    feed(jb, epoch, ops);
    const auto st = js.stats();
    CHECK(st.buffered_bytes == bytes);
    CHECK(st.memory_bytes <= 4096);
    CHECK(st.spilled_bytes + st.memory_bytes == bytes);
    CHECK(jb.stats().spilled_bytes == 0);
    const auto files = open_files_in(dir.spill);
    REQUIRE(files.size() == 1);  // one spill file for this epoch, holding exactly the spilled bytes
    CHECK(files[0] == st.spilled_bytes);

    const Sent s = digest_of(ops);
    js.commit(epoch, s.count, s.digest);
    jb.commit(epoch, s.count, s.digest);
    for (const Op& o : ops) apply_ref(expect, o);
    CHECK(open_files_in(dir.spill).empty());  // released as soon as the epoch is applied
    CHECK(js.stats().spilled_bytes == 0);
    CHECK(js.stats().memory_bytes == 0);
  }
  CHECK(js.stats().peak_memory_bytes <= 4096);
  CHECK(js.stats().peak_buffered_bytes >= (3u << 20));
  CHECK(first_diff(dir.file("small"), expect) == -1);
  CHECK(first_diff(dir.file("big"), expect) == -1);
}

TEST_CASE("zero and trim ops read back as zeros and keep the image size", "[disk-journal]") {
  TempDir dir;
  constexpr uint64_t kSize = 1 << 20;
  auto raw = RawImage::create(dir.file("d0"), kSize);
  DiskJournal j({raw.get()}, kNoLimit, dir.spill);
  std::mt19937_64 rng(9);
  const std::vector<Op> e1{write_op(0, 0, random_bytes(rng, kSize)), Op{0, DiskOpKind::Zero, 1000, 5000, {}},
                           Op{0, DiskOpKind::Trim, 65536, 131072, {}}};
  feed(j, 1, e1);  // direct
  Bytes expect(kSize);
  for (const Op& o : e1) apply_ref(expect, o);
  CHECK(first_diff(dir.file("d0"), expect) == -1);
  Sent s = digest_of(e1);
  j.commit(1, s.count, s.digest);

  const std::vector<Op> e2{Op{0, DiskOpKind::Trim, 300001, 77777, {}}, Op{0, DiskOpKind::Zero, kSize - 3, 3, {}},
                           Op{0, DiskOpKind::Zero, 512, 0, {}}, write_op(0, 300100, random_bytes(rng, 10))};
  feed(j, 2, e2);  // buffered
  CHECK(first_diff(dir.file("d0"), expect) == -1);
  s = digest_of(e2);
  j.commit(2, s.count, s.digest);
  for (const Op& o : e2) apply_ref(expect, o);
  const Bytes got = read_all(dir.file("d0"));
  CHECK(got.size() == kSize);
  CHECK(first_diff(dir.file("d0"), expect) == -1);
  CHECK(got[300001] == std::byte{0});
  CHECK(got[300100] == expect[300100]);
}

TEST_CASE("malformed ops are rejected and leave no trace", "[disk-journal]") {
  TempDir dir;
  auto d0 = RawImage::create(dir.file("d0"), 64 << 10);
  auto d1 = RawImage::create(dir.file("d1"), 4096);
  CountingImage img(*d0);
  DiskJournal j({&img, d1.get()}, kNoLimit, dir.spill);
  const Bytes ten(10, std::byte{7});
  const uint64_t max = std::numeric_limits<uint64_t>::max();

  auto rejected = [&](uint64_t epoch, uint32_t disk, DiskOpKind k, uint64_t off, uint64_t len,
                      std::span<const std::byte> data) {
    CHECK_THROWS_AS(j.add(epoch, disk, k, off, len, data), ProtocolError);
  };
  rejected(1, 2, DiskOpKind::Write, 0, 10, ten);                          // disk out of range
  rejected(1, 1, DiskOpKind::Write, 4090, 10, ten);                       // past the end of disk 1
  rejected(1, 0, DiskOpKind::Zero, (64 << 10) + 1, 0, {});                // offset past the end
  rejected(1, 0, DiskOpKind::Zero, max - 4, 10, {});                      // offset + length overflows
  rejected(1, 0, DiskOpKind::Invalid, 0, 10, ten);                        // kind 0
  rejected(1, 0, static_cast<DiskOpKind>(7), 0, 10, ten);                 // unknown kind
  rejected(1, 0, DiskOpKind::Write, 0, 11, ten);                          // data shorter than length
  rejected(1, 0, DiskOpKind::Write, 0, 9, ten);                           // data longer than length
  rejected(1, 0, DiskOpKind::Trim, 0, 10, ten);                           // data on a trim
  rejected(0, 0, DiskOpKind::Write, 0, 10, ten);                          // epoch 0
  CHECK(img.calls == 0);
  j.add(1, 1, DiskOpKind::Write, 4086, 10, ten);  // the last bytes of disk 1 are fine
  j.add(1, 0, DiskOpKind::Zero, 64 << 10, 0, {});  // an empty range at the very end too
  DiskOpDigest d;
  d.add(1, DiskOpKind::Write, 4086, 10, ten);
  d.add(0, DiskOpKind::Zero, 64 << 10, 0, {});
  j.commit(1, d.count(), d.value());  // the rejected ops were not counted
  CHECK(j.committed_epoch() == 1);
  rejected(1, 0, DiskOpKind::Write, 0, 10, ten);  // epoch already committed
}

// Random writes/zeros/trims over two disks and several epochs, delivered as the primary does
// (ops of epoch N+1 start before Commit(N)), with a random memory limit and a random failover
// point; after every commit and after the failover the images must equal the primary's disks
// at the committed epoch.
TEST_CASE("randomized model: images always equal the primary's disks at the committed epoch", "[disk-journal]") {
  for (uint64_t seed = 1; seed <= 12; seed++) {
    CAPTURE(seed);
    std::mt19937_64 rng(seed);
    TempDir dir;
    const std::vector<uint64_t> sizes{512 << 10, (256 << 10) + 123};
    std::vector<std::unique_ptr<RawImage>> raws;
    std::vector<DiskImage*> imgs;
    for (size_t i = 0; i < sizes.size(); i++) {
      raws.push_back(RawImage::create(dir.file("d" + std::to_string(i)), sizes[i]));
      imgs.push_back(raws.back().get());
    }
    const uint64_t limits[] = {0, 4096, 64 << 10, kNoLimit};
    DiskJournal j(imgs, limits[rng() % 4], dir.spill);
    const uint64_t epochs = 3 + rng() % 10;
    const uint64_t failover_after = 1 + rng() % epochs;  // last epoch whose Commit arrives
    CAPTURE(epochs, failover_after);

    std::vector<Bytes> primary;  // the guest's view of its disks
    for (uint64_t s : sizes) primary.emplace_back(s);
    std::map<uint64_t, std::vector<Bytes>> at_end_of;  // primary's disks when epoch N was cut
    std::map<uint64_t, Sent> sent;
    auto check_images = [&](const std::vector<Bytes>& want) {
      for (size_t i = 0; i < sizes.size(); i++) CHECK(first_diff(dir.file("d" + std::to_string(i)), want[i]) == -1);
    };

    for (uint64_t epoch = 1; epoch <= epochs + 1; epoch++) {
      std::vector<Op> ops;
      const int n = static_cast<int>(rng() % 25);
      for (int k = 0; k < n; k++) {
        const uint32_t disk = rng() % sizes.size();
        const uint64_t len = rng() % 6 == 0 ? 0 : 1 + rng() % (24 << 10);
        const uint64_t off = rng() % (sizes[disk] - len + 1);
        const unsigned r = rng() % 10;
        const DiskOpKind kind = r < 6 ? DiskOpKind::Write : r < 8 ? DiskOpKind::Zero : DiskOpKind::Trim;
        ops.push_back(Op{disk, kind, off, len, kind == DiskOpKind::Write ? random_bytes(rng, len) : Bytes{}});
      }
      // Commit(epoch-1) arrives before op number `commit_at` of this epoch (or after all of them).
      const size_t commit_at = rng() % (ops.size() + 1);
      for (size_t k = 0; k <= ops.size(); k++) {
        if (k == commit_at && epoch > 1 && epoch - 1 <= failover_after) {
          j.commit(epoch - 1, sent[epoch - 1].count, sent[epoch - 1].digest);
          check_images(at_end_of[epoch - 1]);  // epoch-1 applied, this epoch's ops not visible
        }
        if (k == ops.size()) break;
        j.add(epoch, ops[k].disk, ops[k].kind, ops[k].offset, ops[k].length, ops[k].data);
        apply_ref(primary[ops[k].disk], ops[k]);
      }
      at_end_of[epoch] = primary;
      sent[epoch] = digest_of(ops);
      if (epoch > failover_after) break;  // the primary dies during epoch failover_after+1
    }
    CHECK(j.committed_epoch() == failover_after);
    j.drop_uncommitted();
    check_images(at_end_of[failover_after]);
    CHECK(j.stats().buffered_ops == 0);
    CHECK(j.stats().spilled_bytes == 0);
    CHECK(open_files_in(dir.spill).empty());
  }
}

TEST_CASE("ops of epochs beyond the in-flight window are refused", "[disk-journal]") {
  TempDir dir;
  auto raw = RawImage::create(dir.file("d0"), 64 << 10);
  DiskJournal j({raw.get()}, kNoLimit, dir.spill);
  const Bytes data(512, std::byte{1});
  // Before the first commit: epoch 1 (initial copy) and 2 (may start before Commit(1)).
  j.add(1, 0, DiskOpKind::Write, 0, data.size(), data);
  j.add(2, 0, DiskOpKind::Write, 0, data.size(), data);
  CHECK_THROWS_AS(j.add(3, 0, DiskOpKind::Write, 0, data.size(), data), ProtocolError);
  CHECK_THROWS_AS(j.add(UINT64_MAX, 0, DiskOpKind::Zero, 0, 512, {}), ProtocolError);
  CHECK(j.stats().buffered_ops == 1);
  DiskOpDigest d1;
  d1.add(0, DiskOpKind::Write, 0, data.size(), data);
  j.commit(1, 1, d1.value());
  j.add(3, 0, DiskOpKind::Zero, 0, 512, {});  // committed 1: epochs 2 and 3 may be open
  CHECK_THROWS_WITH(j.add(4, 0, DiskOpKind::Zero, 0, 512, {}), Catch::Contains("at most epoch 3"));
  CHECK(j.stats().buffered_ops == 2);
}

TEST_CASE("the per-op index counts against the memory budget and is capped", "[disk-journal]") {
  TempDir dir;
  auto raw = RawImage::create(dir.file("d0"), 1 << 20);
  constexpr uint64_t kLimit = 64 << 10;
  DiskJournal j({raw.get()}, kLimit, dir.spill);
  j.commit(1, 0, DiskOpDigest().value());
  // 600 payload-free ops hold ~56 KiB of index: a 32 KiB payload no longer fits in RAM.
  for (int i = 0; i < 600; i++) j.add(2, 0, DiskOpKind::Zero, 0, 4096, {});
  const Bytes data(32 << 10, std::byte{7});
  j.add(2, 0, DiskOpKind::Write, 0, data.size(), data);
  auto st = j.stats();
  CHECK(st.index_bytes == 601 * DiskJournal::kOpOverhead);
  CHECK(st.memory_bytes + st.index_bytes <= kLimit);
  CHECK(st.spilled_bytes == data.size());
  // The index itself is capped (max(limit, 1 MiB)): a flood of tiny ops ends with an Error.
  uint64_t added = 0;
  CHECK_THROWS_WITH(
      [&] {
        for (;; added++) j.add(2, 0, DiskOpKind::Zero, 0, 512, {});
      }(),
      Catch::Contains("index budget"));
  CHECK(j.stats().index_bytes <= DiskJournal::kMinIndexBudget);
  CHECK(added > 0);
}

TEST_CASE("spilled bytes are capped: the op is refused and nothing recorded", "[disk-journal]") {
  TempDir dir;
  auto raw = RawImage::create(dir.file("d0"), 1 << 20);
  DiskJournal j({raw.get()}, 0, dir.spill, 1, /*spill_limit=*/16 << 10);
  j.commit(1, 0, DiskOpDigest().value());
  const Bytes data(8 << 10, std::byte{3});
  j.add(2, 0, DiskOpKind::Write, 0, data.size(), data);
  j.add(2, 0, DiskOpKind::Write, 8192, data.size(), data);
  CHECK_THROWS_WITH(j.add(2, 0, DiskOpKind::Write, 16384, data.size(), data), Catch::Contains("spill limit"));
  CHECK(j.stats().spilled_bytes == 16 << 10);
  CHECK(j.stats().buffered_ops == 2);
}
