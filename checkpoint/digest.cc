#include "checkpoint/digest.h"

#include <fcntl.h>
#include <sodium.h>
#include <unistd.h>
#include <xxhash.h>

#include <memory>
#include <vector>

#include "checkpoint/tracker.h"
#include "common/error.h"
#include "common/fd.h"

namespace ftvm::checkpoint {

static_assert(crypto_onetimeauth_BYTES == kStagedTagSize && crypto_onetimeauth_KEYBYTES == 32);

StagedTag staged_tag(const EpochKey& epoch_key, uint64_t epoch, std::span<const std::byte> staged) {
  unsigned char nonce[crypto_stream_chacha20_ietf_NONCEBYTES] = {};
  for (int i = 0; i < 8; ++i) nonce[i] = static_cast<unsigned char>(epoch >> (8 * i));
  unsigned char otk[crypto_onetimeauth_KEYBYTES];
  crypto_stream_chacha20_ietf(otk, sizeof otk, nonce, epoch_key.data());
  StagedTag t;
  crypto_onetimeauth(reinterpret_cast<unsigned char*>(t.data()), reinterpret_cast<const unsigned char*>(staged.data()),
                     staged.size(), otk);
  sodium_memzero(otk, sizeof otk);
  return t;
}

bool staged_tag_ok(const EpochKey& epoch_key, uint64_t epoch, std::span<const std::byte> staged, const StagedTag& tag) {
  auto t = staged_tag(epoch_key, epoch, staged);
  return crypto_verify_16(reinterpret_cast<const unsigned char*>(t.data()),
                          reinterpret_cast<const unsigned char*>(tag.data())) == 0;
}

uint64_t digest_file(const std::string& path) {
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd) throw SysError(errno, "open " + path + " to digest it");
  std::unique_ptr<XXH3_state_t, decltype(&XXH3_freeState)> st(XXH3_createState(), &XXH3_freeState);
  if (!st || XXH3_64bits_reset(st.get()) != XXH_OK) fail("XXH3 state allocation failed while digesting {}", path);
  std::vector<char> buf(1 << 20);
  for (;;) {
    ssize_t n = ::read(fd.get(), buf.data(), buf.size());
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) throw SysError(errno, "read " + path + " to digest it");
    if (n == 0) break;
    XXH3_64bits_update(st.get(), buf.data(), static_cast<size_t>(n));
  }
  return XXH3_64bits_digest(st.get());
}

uint64_t digest_bytes(std::span<const std::byte> data, uint64_t seed) {
  return XXH3_64bits_withSeed(data.data(), data.size(), seed);
}

uint64_t digest_page(const std::byte* page) { return XXH3_64bits(page, kPageSize); }

uint64_t digest_ram(std::span<const std::byte> ram) {
  if (ram.size() % kPageSize != 0) fail("digest_ram: RAM size {} is not a multiple of {}", ram.size(), kPageSize);
  RamDigest d(ram.size() / kPageSize);
  d.reset_from(ram);
  return d.value();
}

uint64_t zero_page_hash() {
  static const uint64_t h = [] {
    alignas(64) static const std::byte zeros[kPageSize] = {};
    return digest_page(zeros);
  }();
  return h;
}

uint64_t digest_ram_sparse(std::span<const std::byte> ram, const std::vector<std::pair<uint64_t, uint64_t>>& data) {
  if (ram.size() % kPageSize != 0) fail("digest_ram_sparse: RAM size {} is not a multiple of {}", ram.size(), kPageSize);
  const uint64_t pages = ram.size() / kPageSize;
  RamDigest d(pages);
  uint64_t prev_end = 0;
  for (const auto& [first, end] : data) {
    if (first < prev_end || end < first || end > pages)
      fail("digest_ram_sparse: data range [{}, {}) is out of order or beyond {} pages", first, end, pages);
    for (uint64_t i = first; i < end; i++) d.update(i, ram.data() + i * kPageSize);
    prev_end = end;
  }
  return d.value();
}

void RamDigest::reset_from(std::span<const std::byte> ram) {
  if (ram.size() != hashes_.size() * kPageSize)
    fail("RamDigest: RAM size {} does not match {} pages", ram.size(), hashes_.size());
  for (size_t i = 0; i < hashes_.size(); i++) hashes_[i] = digest_page(ram.data() + i * kPageSize);
}

uint64_t RamDigest::value() const { return XXH3_64bits(hashes_.data(), hashes_.size() * sizeof(uint64_t)); }

}  // namespace ftvm::checkpoint
