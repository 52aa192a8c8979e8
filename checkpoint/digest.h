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
#include <utility>
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

// The same value, reading only the pages inside `data` (sorted, disjoint [first page, end page)
// ranges: where the RAM's memfd has data, vmm::MappedRam::data_ranges()); every other page is a
// hole and hashes as zeros without being touched (reading a memfd hole through a mapping
// allocates it: a sparse 16 GiB twin would become 16 GiB resident).
uint64_t digest_ram_sparse(std::span<const std::byte> ram, const std::vector<std::pair<uint64_t, uint64_t>>& data);

// digest_page() of a page of zeros (a hole).
uint64_t zero_page_hash();

class RamDigest {
 public:
  // Every page starts as a page of zeros (a hole): update() the ones that hold data.
  explicit RamDigest(uint64_t page_count) : hashes_(page_count, zero_page_hash()) {}
  // Records the content of page `index` (4 KiB at `page`).
  void update(uint64_t index, const std::byte* page) { hashes_.at(index) = digest_page(page); }
  // Recomputes every page from `ram` (size page_count * kPageSize).
  void reset_from(std::span<const std::byte> ram);
  uint64_t value() const;

 private:
  std::vector<uint64_t> hashes_;
};

}  // namespace ftvm::checkpoint
