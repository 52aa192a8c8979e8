#include "checkpoint/replica.h"

#include <cstring>

#include "checkpoint/digest.h"
#include "checkpoint/tracker.h"
#include "common/error.h"

namespace ftvm::checkpoint {

Replica::Replica(std::span<std::byte> ram, uint64_t staging_capacity) : ram_(ram) {
  if (ram.empty() || ram.size() % kPageSize != 0)
    fail("replica: RAM size {} is not a positive multiple of {}", ram.size(), kPageSize);
  grow_staging(staging_capacity);
}

uint64_t Replica::max_staging() const {
  return ram_.size() / kPageSize * (8 + kPageSize) + (uint64_t{64} << 20);
}

uint64_t Replica::grow_staging(uint64_t bytes) {
  if (bytes > max_staging())
    throw ProtocolError(fmt::format("staging request of {} bytes exceeds the maximum {} for a {} byte guest", bytes,
                                    max_staging(), ram_.size()));
  if (bytes > staging_.size()) {
    staging_.clear();
    staging_.shrink_to_fit();
    staging_.resize(bytes);
  }
  return staging_.size();
}

void Replica::apply(const Commit& c, const EpochKey* epoch_key) {
  if (last_ && c.epoch != last_->epoch + 1)
    throw ProtocolError(fmt::format("epoch {} committed out of order (last applied epoch is {})", c.epoch,
                                    last_->epoch));
  const uint64_t ram_pages = ram_.size() / kPageSize;
  if (c.page_count > ram_pages)
    throw ProtocolError(fmt::format("epoch {}: {} pages exceed the guest's {} pages", c.epoch, c.page_count, ram_pages));
  const uint64_t size = c.staged_size();
  if (size > staging_.size())
    throw ProtocolError(fmt::format("epoch {}: staged size {} exceeds the staging area of {} bytes", c.epoch, size,
                                    staging_.size()));
  const std::span<const std::byte> staged(staging_.data(), size);
  if (epoch_key) {
    if (!staged_tag_ok(*epoch_key, c.epoch, staged, c.staged_tag))
      throw ProtocolError(fmt::format("epoch {}: keyed digest mismatch (the Poly1305 tag of the {} staged bytes under "
                                      "this session's key differs from the commit record's); the epoch was torn, "
                                      "corrupted or altered in transit (a write into the staging area by someone "
                                      "without the session key?)",
                                      c.epoch, size));
  } else {
    const uint64_t d = digest_bytes(staged);
    if (d != c.staged_digest)
      throw ProtocolError(fmt::format("epoch {}: digest mismatch (staged {:016x}, commit record {:016x}); the epoch "
                                      "was torn or corrupted in transit",
                                      c.epoch, d, c.staged_digest));
  }
  const std::byte* idx = staging_.data();
  uint64_t prev = 0;
  for (uint64_t i = 0; i < c.page_count; i++) {
    uint64_t p;
    std::memcpy(&p, idx + i * 8, 8);
    if (p >= ram_pages || (i > 0 && p <= prev))
      throw ProtocolError(fmt::format("epoch {}: page index {} at position {} is out of range or not ascending",
                                      c.epoch, p, i));
    prev = p;
  }
  // Verified: from here on nothing can fail.
  const std::byte* data = staging_.data() + c.page_count * 8;
  for (uint64_t i = 0; i < c.page_count; i++) {
    uint64_t p;
    std::memcpy(&p, idx + i * 8, 8);
    std::memcpy(ram_.data() + p * kPageSize, data + i * kPageSize, kPageSize);
  }
  const std::byte* ds = data + c.page_count * kPageSize;
  devstate_.assign(ds, ds + c.devstate_bytes);
  last_ = c;
}

}  // namespace ftvm::checkpoint
