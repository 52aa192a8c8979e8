// Digests used by the commit protocol and the exactness checks (XXH3-64 from libxxhash; the
// keyed epoch digest of authenticated sessions from libsodium).
//
// RamDigest keeps one 64-bit hash per 4 KiB page of guest RAM and defines the digest of the
// whole RAM as XXH3 over that array. The primary updates it from the page copies it takes
// during each pause, so the digest of checkpoint N costs O(dirty pages), not O(RAM); the
// standby (or a test) recomputes the same value from memory with digest_ram(). The two agree
// iff every page agrees (up to hash collisions).
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

namespace ftvm::checkpoint {

uint64_t digest_bytes(std::span<const std::byte> data, uint64_t seed = 0);

// Keyed epoch digest of an authenticated session (Commit.staged_tag; the construction and why
// it is Poly1305 are in transport/auth.h): Poly1305 over `staged` under the one-time key
// ChaCha20(epoch_key, nonce = epoch). `epoch_key` is the connection's
// (transport::Connection::epoch_key()). Contract: the caller tags one content per epoch number
// per key (Poly1305's one-time rule); a retransmission must tag the same bytes.
inline constexpr size_t kStagedTagSize = 16;
using StagedTag = std::array<std::byte, kStagedTagSize>;
using EpochKey = std::array<unsigned char, 32>;
StagedTag staged_tag(const EpochKey& epoch_key, uint64_t epoch, std::span<const std::byte> staged);
// Constant-time comparison of staged_tag(epoch_key, epoch, staged) with `tag`.
bool staged_tag_ok(const EpochKey& epoch_key, uint64_t epoch, std::span<const std::byte> staged, const StagedTag& tag);
uint64_t digest_page(const std::byte* page);

// XXH3-64 over the whole content of the file at `path` (disk replicas: the standby reports it
// at activation under --verify-activation; `ftctl digest` computes it for any file). Throws
// ftvm::SysError naming the path.
uint64_t digest_file(const std::string& path);

// Full-RAM digest computed from memory: XXH3 over the per-page hashes of `ram`.
uint64_t digest_ram(std::span<const std::byte> ram);

class RamDigest {
 public:
  explicit RamDigest(uint64_t page_count) : hashes_(page_count, 0) {}
  // Records the content of page `index` (4 KiB at `page`).
  void update(uint64_t index, const std::byte* page) { hashes_.at(index) = digest_page(page); }
  // Recomputes every page from `ram` (size page_count * kPageSize).
  void reset_from(std::span<const std::byte> ram);
  uint64_t value() const;

 private:
  std::vector<uint64_t> hashes_;
};

}  // namespace ftvm::checkpoint
