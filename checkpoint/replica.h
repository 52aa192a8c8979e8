// Replica: the standby's side of the checkpoint engine for one VM.
//
// It owns a staging area (registered with the transport as kRegionStaging) into which the
// primary writes epoch N, and it is the only code that changes the twin's RAM after the
// initial sync. Invariants:
//  * apply() changes RAM only after the whole staged epoch has been verified (digest of the
//    staged bytes equals the commit record's: the keyed tag (Commit.staged_tag) when the session
//    is authenticated, the XXH3 digest otherwise; every page index is inside RAM, indices strictly
//    ascending, sizes fit the staging area); a failed check throws ProtocolError and leaves
//    RAM, the committed epoch and its device state exactly as they were.
//  * device_state() is always the device state of committed_epoch(), never of a later epoch.
//  * Epochs are applied in order: N must be committed_epoch()+1 (or any N >= 1 as the first).
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <vector>

#include "checkpoint/digest.h"
#include "checkpoint/protocol.h"

namespace ftvm::checkpoint {

class Replica {
 public:
  // `ram` is the twin's RAM (page-aligned size); `staging_capacity` the initial staging size;
  // staging never grows beyond max_staging() (RAM + index table + 64 MiB of device state).
  Replica(std::span<std::byte> ram, uint64_t staging_capacity);

  std::span<std::byte> ram() { return ram_; }
  std::span<std::byte> staging() { return {staging_.data(), staging_.size()}; }
  uint64_t max_staging() const;

  // Grows the staging area to at least `bytes` (the old contents are dropped: only call between
  // epochs) and returns the new capacity. Throws ProtocolError if `bytes` > max_staging().
  uint64_t grow_staging(uint64_t bytes);

  // Verifies the staged epoch described by `c` and applies it. See the invariants above.
  // `epoch_key`: the connection's key for the keyed epoch digest (Connection::epoch_key());
  // non-null = authenticated session: c.staged_tag must verify under it (c.staged_digest is
  // ignored); null = unauthenticated: c.staged_digest must equal the XXH3 digest.
  void apply(const Commit& c, const EpochKey* epoch_key = nullptr);

  bool has_checkpoint() const { return last_.has_value(); }
  uint64_t committed_epoch() const { return last_ ? last_->epoch : 0; }
  const std::optional<Commit>& last_commit() const { return last_; }
  std::span<const std::byte> device_state() const { return {devstate_.data(), devstate_.size()}; }

 private:
  std::span<std::byte> ram_;
  std::vector<std::byte> staging_;
  std::vector<std::byte> devstate_;
  std::optional<Commit> last_;
};

}  // namespace ftvm::checkpoint
