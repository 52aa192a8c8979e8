// Fuzz target: Replica::apply (checkpoint/replica.h), the standby's verification of an epoch
// that the primary wrote into its staging region. Input: up to three records, each a 40-byte
// commit header [flags u8][epoch u8][page_count u16][devstate u16][pad...] followed by staged
// bytes (length in the header). Flag bit 0 fixes the staged digest up so that mutations reach
// the index checks. Invariants: a rejected epoch leaves RAM, the committed epoch and the device
// state unchanged; an accepted one advances the epoch by one (or starts it).
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "checkpoint/digest.h"
#include "checkpoint/replica.h"
#include "common/error.h"

using namespace ftvm::checkpoint;

namespace {
constexpr uint64_t kPages = 8;
constexpr uint64_t kPage = 4096;
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::vector<std::byte> ram(kPages * kPage, std::byte{0x5a});
  Replica r(ram, kPages * (8 + kPage) + 4096);
  size_t pos = 0;
  for (int rec = 0; rec < 3 && pos + 8 <= size; rec++) {
    const uint8_t flags = data[pos];
    Commit c;
    c.epoch = data[pos + 1];
    c.page_count = static_cast<uint64_t>(data[pos + 2] | (data[pos + 3] << 8)) % 16;
    c.devstate_bytes = static_cast<uint64_t>(data[pos + 4] | (data[pos + 5] << 8));
    const size_t staged = std::min<size_t>(static_cast<size_t>(data[pos + 6] | (data[pos + 7] << 8)), size - pos - 8);
    pos += 8;
    auto st = r.staging();
    std::memset(st.data(), 0, st.size());
    std::memcpy(st.data(), data + pos, std::min(staged, st.size()));
    pos += staged;
    // flags & 4: an authenticated session (keyed tag instead of XXH3).
    static const EpochKey key = [] {
      EpochKey k{};
      k[0] = 0x42;
      return k;
    }();
    const bool keyed = flags & 4;
    if ((flags & 1) && c.staged_size() <= st.size()) {
      if (keyed) c.staged_tag = staged_tag(key, c.epoch, {st.data(), c.staged_size()});
      else c.staged_digest = digest_bytes({st.data(), c.staged_size()});
    } else {
      c.staged_digest = 0x1234;
    }
    if (flags & 2) c.page_count = staged / (8 + kPage);  // sizes consistent with the staged bytes
    const auto before = ram;
    const uint64_t epoch_before = r.committed_epoch();
    const std::vector<std::byte> ds_before(r.device_state().begin(), r.device_state().end());
    try {
      r.apply(c, keyed ? &key : nullptr);
      if (r.committed_epoch() != c.epoch) std::abort();
      if (epoch_before && c.epoch != epoch_before + 1) std::abort();
    } catch (const ftvm::ProtocolError&) {
      if (ram != before || r.committed_epoch() != epoch_before) std::abort();
      if (!std::equal(ds_before.begin(), ds_before.end(), r.device_state().begin(), r.device_state().end()))
        std::abort();
    }
  }
  return 0;
}
