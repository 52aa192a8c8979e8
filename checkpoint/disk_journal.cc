#include "checkpoint/disk_journal.h"

#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <new>

#include "common/error.h"

namespace ftvm::checkpoint {

namespace {

constexpr uint64_t kChunk = uint64_t{1} << 20;  // zero-fill and spill read-back granularity

const char* kind_name(DiskOpKind k) {
  switch (k) {
    case DiskOpKind::Write: return "write";
    case DiskOpKind::Zero: return "zero";
    case DiskOpKind::Trim: return "trim";
    default: return "invalid";
  }
}

// pwrite all of [p, p+n) at `off`, retrying EINTR and short writes.
void pwrite_full(int fd, const std::byte* p, uint64_t n, uint64_t off, const std::string& what) {
  while (n > 0) {
    const ssize_t w = ::pwrite(fd, p, std::min<uint64_t>(n, kChunk * 64), static_cast<off_t>(off));
    if (w < 0) {
      if (errno == EINTR) continue;
      throw SysError(errno, what, errno == ENOSPC ? "free space on that file system" : "");
    }
    if (w == 0) throw Error(fmt::format("{}: pwrite wrote nothing at offset {} ({} bytes left)", what, off, n));
    p += w;
    n -= static_cast<uint64_t>(w);
    off += static_cast<uint64_t>(w);
  }
}

// pread all of [p, p+n) at `off`; EOF before n bytes is an error (the file was truncated).
void pread_full(int fd, std::byte* p, uint64_t n, uint64_t off, const std::string& what) {
  while (n > 0) {
    const ssize_t r = ::pread(fd, p, n, static_cast<off_t>(off));
    if (r < 0) {
      if (errno == EINTR) continue;
      throw SysError(errno, what);
    }
    if (r == 0) throw Error(fmt::format("{}: unexpected end of file at offset {} ({} bytes missing)", what, off, n));
    p += r;
    n -= static_cast<uint64_t>(r);
    off += static_cast<uint64_t>(r);
  }
}

void put_le(std::byte* p, uint64_t v, int bytes) {
  for (int i = 0; i < bytes; i++) p[i] = static_cast<std::byte>(v >> (8 * i));
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// RawImage

DiskImage::~DiskImage() = default;

RawImage::RawImage(UniqueFd fd, std::string path, uint64_t size)
    : fd_(std::move(fd)), path_(std::move(path)), size_(size) {}

std::unique_ptr<RawImage> RawImage::create(const std::string& path, uint64_t size) {
  UniqueFd fd(check_sys(::open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600),
                        fmt::format("create disk image {}", path), "check that its directory exists and is writable"));
  check_sys(::ftruncate(fd.get(), static_cast<off_t>(size)), fmt::format("ftruncate disk image {} to {} bytes", path, size),
            "check the file system's free space and maximum file size");
  return std::unique_ptr<RawImage>(new RawImage(std::move(fd), path, size));
}

std::unique_ptr<RawImage> RawImage::open(const std::string& path) {
  UniqueFd fd(check_sys(::open(path.c_str(), O_RDWR | O_CLOEXEC), fmt::format("open disk image {}", path),
                        "check the path and that ftd may write it"));
  struct stat st {};
  check_sys(::fstat(fd.get(), &st), fmt::format("fstat disk image {}", path));
  uint64_t size = static_cast<uint64_t>(st.st_size);
  if (S_ISBLK(st.st_mode)) {
    check_sys(::ioctl(fd.get(), BLKGETSIZE64, &size), fmt::format("BLKGETSIZE64 on disk image {}", path));
  } else if (!S_ISREG(st.st_mode)) {
    fail("disk image {} is neither a regular file nor a block device (give a raw image file)", path);
  }
  return std::unique_ptr<RawImage>(new RawImage(std::move(fd), path, size));
}

void RawImage::check_range(uint64_t offset, uint64_t length, const char* op) const {
  if (offset > size_ || length > size_ - offset)
    fail("disk image {}: {} of {} bytes at offset {} is past the image end ({} bytes)", path_, op, length, offset,
         size_);
}

void RawImage::write(uint64_t offset, std::span<const std::byte> data) {
  check_range(offset, data.size(), "write");
  pwrite_full(fd_.get(), data.data(), data.size(), offset, fmt::format("pwrite disk image {}", path_));
}

void RawImage::write_zeros(uint64_t offset, uint64_t length) {
  static const std::vector<std::byte> zeros(kChunk);
  while (length > 0) {
    const uint64_t n = std::min(length, kChunk);
    pwrite_full(fd_.get(), zeros.data(), n, offset, fmt::format("pwrite zeros to disk image {}", path_));
    offset += n;
    length -= n;
  }
}

void RawImage::zero(uint64_t offset, uint64_t length) {
  check_range(offset, length, "zero");
  if (length == 0) return;
  if (punch_hole_) {
    int r;
    do {
      r = ::fallocate(fd_.get(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(offset),
                      static_cast<off_t>(length));
    } while (r < 0 && errno == EINTR);
    if (r == 0) return;
    if (errno != EOPNOTSUPP && errno != ENOSYS)
      throw SysError(errno, fmt::format("fallocate(PUNCH_HOLE) {} bytes at {} in disk image {}", length, offset, path_));
    punch_hole_ = false;  // not supported here: write zeros from now on
  }
  write_zeros(offset, length);
}

void RawImage::sync() {
  check_sys(::fdatasync(fd_.get()), fmt::format("fdatasync disk image {}", path_), "check the underlying storage");
}

// ---------------------------------------------------------------------------------------------
// DiskOpDigest

void DiskOpDigest::StateDeleter::operator()(XXH3_state_s* s) const noexcept { XXH3_freeState(s); }

DiskOpDigest::DiskOpDigest() : state_(XXH3_createState()) {
  if (!state_) throw std::bad_alloc();
  if (XXH3_64bits_reset(state_.get()) != XXH_OK) fail("DiskOpDigest: XXH3_64bits_reset failed");
}

DiskOpDigest::DiskOpDigest(const DiskOpDigest& o) : state_(XXH3_createState()), count_(o.count_) {
  if (!state_) throw std::bad_alloc();
  XXH3_copyState(state_.get(), o.state_.get());
}

DiskOpDigest& DiskOpDigest::operator=(const DiskOpDigest& o) {
  if (this != &o) {
    XXH3_copyState(state_.get(), o.state_.get());
    count_ = o.count_;
  }
  return *this;
}

DiskOpDigest::~DiskOpDigest() = default;

void DiskOpDigest::add(uint32_t disk, DiskOpKind kind, uint64_t offset, uint64_t length,
                       std::span<const std::byte> data) {
  std::array<std::byte, 4 + 1 + 8 + 8> h{};
  put_le(h.data(), disk, 4);
  h[4] = static_cast<std::byte>(kind);
  put_le(h.data() + 5, offset, 8);
  put_le(h.data() + 13, length, 8);
  // XXH3_64bits_update fails only on a null state, which the constructors rule out.
  XXH3_64bits_update(state_.get(), h.data(), h.size());
  if (!data.empty()) XXH3_64bits_update(state_.get(), data.data(), data.size());
  count_++;
}

uint64_t DiskOpDigest::value() const { return XXH3_64bits_digest(state_.get()); }

// ---------------------------------------------------------------------------------------------
// DiskJournal

DiskJournal::DiskJournal(std::vector<DiskImage*> images, uint64_t memory_limit, std::string spill_dir,
                         uint64_t first_epoch, uint64_t spill_limit)
    : images_(std::move(images)), memory_limit_(memory_limit), spill_dir_(std::move(spill_dir)),
      first_epoch_(first_epoch), spill_limit_(spill_limit) {
  for (size_t i = 0; i < images_.size(); i++)
    if (!images_[i]) fail("disk journal: image of disk {} is null", i);
  struct stat st {};
  check_sys(::stat(spill_dir_.c_str(), &st), fmt::format("stat disk spill directory {}", spill_dir_),
            "create it or point the spill directory elsewhere");
  if (!S_ISDIR(st.st_mode)) fail("disk spill directory {} is not a directory", spill_dir_);
}

DiskJournal::~DiskJournal() = default;

void DiskJournal::add(uint64_t epoch, uint32_t disk, DiskOpKind kind, uint64_t offset, uint64_t length,
                      std::span<const std::byte> data) {
  if (epoch == 0 || epoch <= committed_)
    throw ProtocolError(fmt::format("disk {} op for epoch {} arrived but epoch {} is already committed (epochs start at "
                                    "1 and a committed epoch takes no more ops)",
                                    kind_name(kind), epoch, committed_));
  const uint64_t window = (committed_ ? committed_ : (first_epoch_ ? first_epoch_ - 1 : 0)) + 2;
  if (epoch > window)
    throw ProtocolError(fmt::format("disk {} op for epoch {} arrived but the last committed epoch is {}: at most "
                                    "epoch {} may be open (one checkpoint in flight); the peer is broken or hostile",
                                    kind_name(kind), epoch, committed_, window));
  if (disk >= images_.size())
    throw ProtocolError(fmt::format("epoch {}: disk op for disk {} but the twin has {} disks", epoch, disk,
                                    images_.size()));
  if (kind != DiskOpKind::Write && kind != DiskOpKind::Zero && kind != DiskOpKind::Trim)
    throw ProtocolError(fmt::format("epoch {}: disk op of unknown kind {} on disk {}", epoch,
                                    static_cast<unsigned>(kind), disk));
  const uint64_t size = images_[disk]->size();
  if (offset > size || length > size - offset)
    throw ProtocolError(fmt::format("epoch {}: {} of {} bytes at offset {} on disk {} is past the image end ({} bytes)",
                                    epoch, kind_name(kind), length, offset, disk, size));
  if (kind == DiskOpKind::Write ? data.size() != length : !data.empty())
    throw ProtocolError(fmt::format("epoch {}: {} of length {} on disk {} carries {} bytes of data", epoch,
                                    kind_name(kind), length, disk, data.size()));

  const bool direct = committed_ == 0 && epoch <= first_epoch_;
  bool to_ram = false;
  if (!direct) {
    // Limits first, so that a refused op leaves no trace.
    const uint64_t index_budget = std::max(memory_limit_, kMinIndexBudget);
    if (stats_.index_bytes + kOpOverhead > index_budget)
      fail("disk journal: {} buffered disk ops of uncommitted epochs exceed the index budget of {} bytes "
           "(--disk-buffer-mib); the primary sends far more, far smaller writes per epoch than expected: the session "
           "ends and the primary resynchronizes",
           stats_.buffered_ops, index_budget);
    to_ram = data.empty() || stats_.memory_bytes + stats_.index_bytes + kOpOverhead + data.size() <= memory_limit_;
    if (!to_ram && stats_.spilled_bytes + data.size() > spill_limit_)
      fail("disk journal: spilling {} more bytes of epoch {} would exceed the spill limit of {} bytes in {} "
           "(--disk-spill-max-mib): the standby is not committing fast enough for the primary's disk writes; the "
           "session ends and the primary resynchronizes (raise --disk-buffer-mib or --disk-spill-max-mib)",
           data.size(), epoch, spill_limit_, spill_dir_);
  }
  Epoch& e = epochs_[epoch];
  if (direct) {  // initial copy: straight to the image
    if (kind == DiskOpKind::Write)
      images_[disk]->write(offset, data);
    else
      images_[disk]->zero(offset, length);
    e.direct = true;
    e.digest.add(disk, kind, offset, length, data);
    stats_.applied_ops++;
    stats_.applied_bytes += data.size();
    return;
  }

  Op op;
  op.disk = disk;
  op.kind = kind;
  op.offset = offset;
  op.length = length;
  if (!data.empty()) {
    if (to_ram) {
      op.data.assign(data.begin(), data.end());
      e.memory_bytes += data.size();
      stats_.memory_bytes += data.size();
      stats_.peak_memory_bytes = std::max(stats_.peak_memory_bytes, stats_.memory_bytes);
    } else {
      spill(e, op, data);
    }
  }
  e.ops.push_back(std::move(op));
  stats_.index_bytes += kOpOverhead;
  e.digest.add(disk, kind, offset, length, data);
  e.buffered_bytes += data.size();
  stats_.buffered_ops++;
  stats_.buffered_bytes += data.size();
  stats_.peak_buffered_bytes = std::max(stats_.peak_buffered_bytes, stats_.buffered_bytes);
}

void DiskJournal::spill(Epoch& e, Op& op, std::span<const std::byte> data) {
  if (!e.spill) {
    int fd = ::open(spill_dir_.c_str(), O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
    if (fd < 0 && (errno == EOPNOTSUPP || errno == EISDIR || errno == EINVAL)) {
      // No O_TMPFILE on this file system: create a named file and unlink it at once.
      std::string tmpl = spill_dir_ + "/ftvm-disk-spill-XXXXXX";
      fd = check_sys(::mkostemp(tmpl.data(), O_CLOEXEC), fmt::format("create disk spill file {}", tmpl),
                     "check that the spill directory is writable");
      UniqueFd guard(fd);
      check_sys(::unlink(tmpl.c_str()), fmt::format("unlink disk spill file {}", tmpl));
      fd = guard.release();
    }
    e.spill.reset(check_sys(fd, fmt::format("open an O_TMPFILE disk spill file in {}", spill_dir_),
                            "check that the spill directory exists and is writable"));
  }
  pwrite_full(e.spill.get(), data.data(), data.size(), e.spill_end,
              fmt::format("append {} bytes to the disk spill file in {}", data.size(), spill_dir_));
  op.spilled = true;
  op.spill_offset = e.spill_end;
  e.spill_end += data.size();
  stats_.spilled_bytes += data.size();
}

void DiskJournal::verify(uint64_t epoch, uint64_t op_count, uint64_t digest) const {
  if (epoch == 0 || epoch <= committed_)
    throw ProtocolError(fmt::format("disk commit of epoch {} but epoch {} is already committed", epoch, committed_));
  for (const auto& [n, e] : epochs_) {
    if (n < epoch && (e.direct || !e.ops.empty()))
      throw ProtocolError(fmt::format("disk commit of epoch {} but epoch {} carried {} disk ops and was never "
                                      "committed; its writes cannot be verified (resynchronise the disks)",
                                      epoch, n, e.digest.count()));
    if (n > epoch && committed_ == 0 && e.direct)
      throw ProtocolError(fmt::format("first disk commit is for epoch {} but the initial copy already wrote ops of "
                                      "epoch {} to the images (resynchronise the disks)",
                                      epoch, n));
  }
  static const uint64_t kEmpty = DiskOpDigest().value();
  const auto it = epochs_.find(epoch);
  const uint64_t have_count = it == epochs_.end() ? 0 : it->second.digest.count();
  const uint64_t have_digest = it == epochs_.end() ? kEmpty : it->second.digest.value();
  if (have_count != op_count || have_digest != digest)
    throw ProtocolError(fmt::format("epoch {}: disk ops do not match the commit record (received {} ops, digest "
                                    "{:016x}; the primary sent {} ops, digest {:016x}): a disk op was lost, "
                                    "duplicated, reordered or corrupted",
                                    epoch, have_count, have_digest, op_count, digest));
}

void DiskJournal::apply_op(const Epoch& e, const Op& op, std::vector<std::byte>& buf) {
  DiskImage& img = *images_[op.disk];
  if (op.kind != DiskOpKind::Write) {
    img.zero(op.offset, op.length);
  } else if (!op.spilled) {
    img.write(op.offset, op.data);
  } else {
    for (uint64_t done = 0; done < op.length;) {
      const uint64_t n = std::min(op.length - done, kChunk);
      buf.resize(n);
      pread_full(e.spill.get(), buf.data(), n, op.spill_offset + done,
                 fmt::format("read back the disk spill file in {}", spill_dir_));
      img.write(op.offset + done, buf);
      done += n;
    }
  }
}

void DiskJournal::commit(uint64_t epoch, uint64_t op_count, uint64_t digest, bool sync_images) {
  verify(epoch, op_count, digest);
  // Verified: only I/O errors can fail from here on. Earlier epochs hold no ops (verify).
  const auto it = epochs_.find(epoch);
  if (it != epochs_.end()) {
    std::vector<std::byte> buf;
    for (const Op& op : it->second.ops) apply_op(it->second, op, buf);
    stats_.applied_ops += it->second.ops.size();
    stats_.applied_bytes += it->second.buffered_bytes;
  }
  if (sync_images)
    for (DiskImage* img : images_) img->sync();
  while (!epochs_.empty() && epochs_.begin()->first <= epoch) release(epochs_.begin());
  committed_ = epoch;
}

void DiskJournal::release(std::map<uint64_t, Epoch>::iterator it) {
  const Epoch& e = it->second;
  stats_.buffered_ops -= e.ops.size();
  stats_.index_bytes -= e.ops.size() * kOpOverhead;
  stats_.buffered_bytes -= e.buffered_bytes;
  stats_.memory_bytes -= e.memory_bytes;
  stats_.spilled_bytes -= e.spill_end;
  epochs_.erase(it);  // closes the unlinked spill file: the file system frees its blocks
}

std::pair<uint64_t, uint64_t> DiskJournal::drop_uncommitted() {
  uint64_t ops = 0, bytes = 0;
  while (!epochs_.empty() && epochs_.rbegin()->first > committed_) {
    const auto it = std::prev(epochs_.end());
    ops += it->second.ops.size();
    bytes += it->second.buffered_bytes;
    release(it);
  }
  stats_.dropped_ops += ops;
  stats_.dropped_bytes += bytes;
  return {ops, bytes};
}

DiskJournal::Stats DiskJournal::stats() const { return stats_; }

}  // namespace ftvm::checkpoint
