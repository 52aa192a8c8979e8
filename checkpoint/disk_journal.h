// The standby's epoch-buffered disk writes (Remus disk buffer).
//
// The primary forwards every guest disk write to the standby, tagged with the epoch it belongs
// to; the standby keeps a twin disk image per guest disk and a DiskJournal in front of them.
//  * Initial copy: before the first Commit, ops of epochs <= first_epoch (the epoch the first
//    checkpoint will cover; 1 for ftd's primary) go straight into the image. Ops of a later
//    epoch are buffered even then, because ops of epoch N+1 may arrive before Commit(N).
//  * After that every op is buffered and reaches the image only when its epoch's Commit is
//    accepted; on failover the buffered (uncommitted) ops are dropped, so the images always
//    equal the disks of committed_epoch() (given that checkpoint's RAM is the replica's).
//  * Each Commit carries the epoch's op count and a DiskOpDigest of its ops in wire order (ops
//    applied directly during the initial copy count too). A mismatch is a lost, extra, corrupted
//    or reordered op: the commit is refused with ProtocolError and nothing is written.
//  * Epoch ordering (what the primary guarantees, not what the journal assumes): all ops of
//    epoch N arrive before Commit(N); ops of N+1 may arrive before Commit(N) (one epoch in
//    flight), so in practice at most two epochs are buffered. The journal keeps any number of
//    epochs, applies an epoch's ops in arrival order, and applies epochs in epoch order.
//  * Memory is bounded: at most `memory_limit` payload bytes are buffered in RAM; further
//    payloads are appended to a spill file of their epoch (O_TMPFILE in spill_dir, or a file
//    created and unlinked at once), released (closed, so its blocks are freed) as soon as that
//    epoch is applied or dropped. Disk usage is thus bounded by the uncommitted epochs even
//    though the journal is never empty in steady state. The per-op index (kOpOverhead bytes
//    per op) stays in RAM regardless; it counts against memory_limit (payloads spill earlier)
//    and is capped; spilled bytes are capped by spill_limit.
// Not thread-safe: one standby session thread owns a journal.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "checkpoint/protocol.h"
#include "common/fd.h"

struct XXH3_state_s;  // <xxhash.h>

namespace ftvm::checkpoint {

// The operations, as they travel in DiskWrite messages (checkpoint/protocol.h).
using DiskOpKind = DiskOp;

// A twin's disk image. Callers keep offsets inside [0, size()). Trim is applied as zeroing
// (the primary's raw source reads zeros after a discard), so it is not a separate method.
class DiskImage {
 public:
  virtual ~DiskImage();
  virtual uint64_t size() const = 0;
  // Writes all of `data` at `offset`, or throws.
  virtual void write(uint64_t offset, std::span<const std::byte> data) = 0;
  // Makes [offset, offset+length) read as zeros, or throws.
  virtual void zero(uint64_t offset, uint64_t length) = 0;
  // Makes every completed write/zero durable (fdatasync for files).
  virtual void sync() = 0;
};

// A raw image file (or block device) opened O_RDWR. write() is a full pwrite (EINTR and short
// writes retried); zero() punches a hole (FALLOC_FL_PUNCH_HOLE|FALLOC_FL_KEEP_SIZE) and falls
// back to writing zeros where the file system does not support it. Every system call is
// checked; failures throw SysError naming the path. Ranges past size() throw Error.
class RawImage : public DiskImage {
 public:
  // Creates (or truncates) a sparse file of `size` bytes at `path`.
  static std::unique_ptr<RawImage> create(const std::string& path, uint64_t size);
  // Opens an existing image; its size is the file's (or block device's) current size.
  static std::unique_ptr<RawImage> open(const std::string& path);

  uint64_t size() const override { return size_; }
  void write(uint64_t offset, std::span<const std::byte> data) override;
  void zero(uint64_t offset, uint64_t length) override;
  void sync() override;
  const std::string& path() const { return path_; }

 private:
  RawImage(UniqueFd fd, std::string path, uint64_t size);
  void check_range(uint64_t offset, uint64_t length, const char* op) const;
  void write_zeros(uint64_t offset, uint64_t length);

  UniqueFd fd_;
  std::string path_;
  uint64_t size_;
  bool punch_hole_ = true;  // cleared on the first EOPNOTSUPP: from then on zeros are written
};

// Running, order-sensitive digest of one epoch's disk ops. The primary and the standby feed the
// same ops in wire order and compare value() and count(). Each op is hashed as a fixed
// little-endian header (disk u32, kind u8, offset u64, length u64) followed by its data (empty
// for Zero/Trim), into one XXH3-64 stream, so a changed, missing, extra or swapped op changes
// the value. The value of an empty epoch is DiskOpDigest().value().
class DiskOpDigest {
 public:
  DiskOpDigest();
  DiskOpDigest(const DiskOpDigest& o);
  DiskOpDigest& operator=(const DiskOpDigest& o);
  ~DiskOpDigest();

  // Records one op (data is hashed as given; validation is the caller's business).
  void add(uint32_t disk, DiskOpKind kind, uint64_t offset, uint64_t length, std::span<const std::byte> data);
  // The digest of every op added so far (does not end the stream).
  uint64_t value() const;
  uint64_t count() const { return count_; }

 private:
  struct StateDeleter {
    void operator()(XXH3_state_s* s) const noexcept;
  };
  std::unique_ptr<XXH3_state_s, StateDeleter> state_;
  uint64_t count_ = 0;
};

class DiskJournal {
 public:
  // images[i] is disk i (not owned; must outlive the journal). memory_limit: payload bytes kept
  // in RAM before further payloads spill to a file in spill_dir (checked to be a directory
  // here). first_epoch: the epoch the first Commit is expected for; until a Commit is accepted,
  // ops of epochs <= first_epoch are written to the images at once (initial copy). Throws Error
  // on a null image or a missing spill_dir.
  // spill_limit: payload bytes that may be spilled at once (all uncommitted epochs); an op that
  // would exceed it throws Error (the session ends; the primary resynchronizes) instead of
  // filling the spill directory's file system.
  DiskJournal(std::vector<DiskImage*> images, uint64_t memory_limit, std::string spill_dir,
              uint64_t first_epoch = 1, uint64_t spill_limit = UINT64_MAX);
  ~DiskJournal();
  DiskJournal(const DiskJournal&) = delete;
  DiskJournal& operator=(const DiskJournal&) = delete;

  // Records one op of `epoch`: applied at once during the initial copy (see the constructor),
  // otherwise buffered; either way it is added to that epoch's digest. Throws ProtocolError,
  // recording nothing, on epoch 0 or an epoch <= committed_epoch(), an epoch beyond the window
  // (> committed_epoch() + 2, or > first_epoch + 1 before the first commit: the primary has at
  // most one epoch in flight, so a later one is a hostile or broken peer), a disk index out of range,
  // an Invalid/unknown kind, a range past the image end, data.size() != length for Write, or
  // data for Zero/Trim. Throws SysError if writing the image or the spill file fails. Throws
  // Error, recording nothing, when the op would take the spilled bytes beyond spill_limit or
  // the in-RAM index of buffered ops (kOpOverhead bytes each) beyond max(memory_limit,
  // kMinIndexBudget).
  static constexpr uint64_t kOpOverhead = 96;  // RAM per buffered op besides its payload
  static constexpr uint64_t kMinIndexBudget = uint64_t{1} << 20;
  void add(uint64_t epoch, uint32_t disk, DiskOpKind kind, uint64_t offset, uint64_t length,
           std::span<const std::byte> data);

  // Throws ProtocolError unless commit(epoch, op_count, digest) would be accepted: epoch >
  // committed_epoch(); no earlier uncommitted epoch holds ops (each epoch with ops needs its own
  // Commit, nothing unverified is ever applied); on the first commit, no directly applied
  // epoch is later than `epoch`; and the ops recorded for `epoch` are exactly `op_count` ops
  // with digest `digest`. Changes nothing. Lets the standby check the disks before it applies
  // the RAM checkpoint, and apply the disks (commit) only after the RAM was accepted.
  void verify(uint64_t epoch, uint64_t op_count, uint64_t digest) const;

  // Epoch `epoch` commits: verify(), then every buffered op of `epoch` is applied in arrival
  // order, its buffers and spill file are released, committed_epoch() becomes `epoch`. With
  // `sync_images` every image is sync()ed afterwards (off by default: the standby's images only
  // matter while its host is up; turn it on to survive a standby host crash as well). On
  // ProtocolError nothing was written. On SysError from an image the epoch stays buffered and
  // uncommitted; calling commit again re-applies it from the start, which is idempotent.
  void commit(uint64_t epoch, uint64_t op_count, uint64_t digest, bool sync_images = false);

  // Failover: forgets every op of epochs > committed_epoch() (their spill files included), so
  // the images stay at the committed state. Returns {ops, payload bytes} dropped. Ops applied
  // directly during the initial copy cannot be dropped and are not counted.
  std::pair<uint64_t, uint64_t> drop_uncommitted();

  // The last committed epoch; 0 before the first Commit.
  uint64_t committed_epoch() const { return committed_; }

  struct Stats {
    uint64_t buffered_ops = 0;         // ops waiting for their Commit
    uint64_t buffered_bytes = 0;       // their payload bytes, in RAM or spilled
    uint64_t memory_bytes = 0;         // payload bytes in RAM now (memory_bytes + index_bytes
                                       // <= memory_limit whenever payloads could spill)
    uint64_t index_bytes = 0;          // kOpOverhead per buffered op (counted against memory_limit)
    uint64_t spilled_bytes = 0;        // payload bytes in spill files now
    uint64_t applied_ops = 0;          // ops written to the images (initial copy included)
    uint64_t applied_bytes = 0;        // Write payload bytes written to the images
    uint64_t dropped_ops = 0;          // ops forgotten by drop_uncommitted()
    uint64_t dropped_bytes = 0;
    uint64_t peak_buffered_bytes = 0;  // maxima since construction
    uint64_t peak_memory_bytes = 0;
  };
  Stats stats() const;

 private:
  struct Op {
    uint32_t disk;
    DiskOpKind kind;
    uint64_t offset;
    uint64_t length;
    bool spilled = false;         // payload at spill_offset in the epoch's spill file
    uint64_t spill_offset = 0;
    std::vector<std::byte> data;  // payload when in RAM
  };
  struct Epoch {
    std::vector<Op> ops;  // buffered ops in arrival order
    DiskOpDigest digest;  // every op of the epoch, direct ones included
    bool direct = false;  // some ops were applied at once (initial copy)
    UniqueFd spill;       // created on the first spilled payload
    uint64_t spill_end = 0;
    uint64_t memory_bytes = 0;
    uint64_t buffered_bytes = 0;
  };

  void apply_op(const Epoch& e, const Op& op, std::vector<std::byte>& buf);
  void spill(Epoch& e, Op& op, std::span<const std::byte> data);
  void release(std::map<uint64_t, Epoch>::iterator it);

  std::vector<DiskImage*> images_;
  uint64_t memory_limit_;
  std::string spill_dir_;
  uint64_t first_epoch_;
  uint64_t spill_limit_;
  uint64_t committed_ = 0;
  std::map<uint64_t, Epoch> epochs_;  // uncommitted epochs that saw ops, by epoch
  Stats stats_;
};

}  // namespace ftvm::checkpoint
