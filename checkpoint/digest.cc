#include "checkpoint/digest.h"

#include <xxhash.h>

#include "checkpoint/tracker.h"
#include "common/error.h"

namespace ftvm::checkpoint {

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

void RamDigest::reset_from(std::span<const std::byte> ram) {
  if (ram.size() != hashes_.size() * kPageSize)
    fail("RamDigest: RAM size {} does not match {} pages", ram.size(), hashes_.size());
  for (size_t i = 0; i < hashes_.size(); i++) hashes_[i] = digest_page(ram.data() + i * kPageSize);
}

uint64_t RamDigest::value() const { return XXH3_64bits(hashes_.data(), hashes_.size() * sizeof(uint64_t)); }

}  // namespace ftvm::checkpoint
