// NBD server: see nbd_server.h for the protocol subset and the contracts.
//
// Threading: one server thread runs the accept loop and serves the (single) client on it, so
// the Backend sees requests strictly one at a time, in wire order. The client socket is
// non-blocking and every wait for it is a poll() that also watches the stop eventfd (stop() ends
// any wait) and the listening socket (a second client is closed at once even while the first one
// is in the middle of a request). Server::mu_ guards the client fd number so drop_client() never
// shuts down a descriptor that was closed and reused.
#include "vmm-glue/nbd_server.h"

#include <endian.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstring>
#include <memory>
#include <utility>

#include "common/error.h"
#include "common/log.h"

namespace ftvm::vmm::nbd {

namespace {

constexpr std::string_view kLog = "nbd";

// Handshake (proto.md "Fixed newstyle negotiation").
constexpr uint64_t kNbdMagic = 0x4e42444d41474943ull;  // "NBDMAGIC"
constexpr uint64_t kOptMagic = 0x49484156454f5054ull;  // "IHAVEOPT"
constexpr uint64_t kOptReplyMagic = 0x0003e889045565a9ull;
constexpr uint16_t kFlagFixedNewstyle = 1u << 0;
constexpr uint16_t kFlagNoZeroes = 1u << 1;
constexpr uint32_t kClientFixedNewstyle = 1u << 0;
constexpr uint32_t kClientNoZeroes = 1u << 1;

constexpr uint32_t kOptExportName = 1;
constexpr uint32_t kOptAbort = 2;
constexpr uint32_t kOptList = 3;
constexpr uint32_t kOptInfo = 6;
constexpr uint32_t kOptGo = 7;

constexpr uint32_t kRepAck = 1;
constexpr uint32_t kRepServer = 2;
constexpr uint32_t kRepInfo = 3;
constexpr uint32_t kRepErrBit = 1u << 31;
constexpr uint32_t kRepErrUnsup = kRepErrBit | 1;
constexpr uint32_t kRepErrInvalid = kRepErrBit | 3;
constexpr uint32_t kRepErrUnknown = kRepErrBit | 6;

constexpr uint16_t kInfoExport = 0;
constexpr uint16_t kInfoName = 1;
constexpr uint16_t kInfoBlockSize = 3;

// Transmission flags.
constexpr uint16_t kHasFlags = 1u << 0;
constexpr uint16_t kSendFlush = 1u << 2;
constexpr uint16_t kSendFua = 1u << 3;
constexpr uint16_t kSendTrim = 1u << 5;
constexpr uint16_t kSendWriteZeroes = 1u << 6;
constexpr uint16_t kTransmissionFlags = kHasFlags | kSendFlush | kSendFua | kSendTrim | kSendWriteZeroes;

// Transmission phase.
constexpr uint32_t kRequestMagic = 0x25609513u;
constexpr uint32_t kSimpleReplyMagic = 0x67446698u;
constexpr uint16_t kCmdRead = 0;
constexpr uint16_t kCmdWrite = 1;
constexpr uint16_t kCmdDisc = 2;
constexpr uint16_t kCmdFlush = 3;
constexpr uint16_t kCmdTrim = 4;
constexpr uint16_t kCmdCache = 5;
constexpr uint16_t kCmdWriteZeroes = 6;
constexpr uint16_t kCmdBlockStatus = 7;
constexpr uint16_t kCmdFlagFua = 1u << 0;
constexpr uint16_t kCmdFlagNoHole = 1u << 1;

constexpr uint32_t kMinBlock = 1;
constexpr uint32_t kPreferredBlock = 4096;
// Longest option payload accepted (GO carries a name of at most 4096 bytes plus info requests).
constexpr uint32_t kMaxOptionLength = 64 * 1024;
constexpr size_t kMaxExportName = 4096;

// Raised inside the server thread when stop() was called; ends the connection quietly.
struct Stopping {};

void put16(std::string& s, uint16_t v) {
  v = htobe16(v);
  s.append(reinterpret_cast<const char*>(&v), sizeof v);
}
void put32(std::string& s, uint32_t v) {
  v = htobe32(v);
  s.append(reinterpret_cast<const char*>(&v), sizeof v);
}
void put64(std::string& s, uint64_t v) {
  v = htobe64(v);
  s.append(reinterpret_cast<const char*>(&v), sizeof v);
}
uint16_t get16(const unsigned char* p) {
  uint16_t v;
  std::memcpy(&v, p, sizeof v);
  return be16toh(v);
}
uint32_t get32(const unsigned char* p) {
  uint32_t v;
  std::memcpy(&v, p, sizeof v);
  return be32toh(v);
}
uint64_t get64(const unsigned char* p) {
  uint64_t v;
  std::memcpy(&v, p, sizeof v);
  return be64toh(v);
}

const char* cmd_name(uint16_t type) {
  switch (type) {
    case kCmdRead: return "READ";
    case kCmdWrite: return "WRITE";
    case kCmdDisc: return "DISC";
    case kCmdFlush: return "FLUSH";
    case kCmdTrim: return "TRIM";
    case kCmdCache: return "CACHE";
    case kCmdWriteZeroes: return "WRITE_ZEROES";
    case kCmdBlockStatus: return "BLOCK_STATUS";
    default: return "unknown";
  }
}

const char* opt_name(uint32_t opt) {
  switch (opt) {
    case 1: return "EXPORT_NAME";
    case 2: return "ABORT";
    case 3: return "LIST";
    case 4: return "PEEK_EXPORT";
    case 5: return "STARTTLS";
    case 6: return "INFO";
    case 7: return "GO";
    case 8: return "STRUCTURED_REPLY";
    case 9: return "LIST_META_CONTEXT";
    case 10: return "SET_META_CONTEXT";
    case 11: return "EXTENDED_HEADERS";
    default: return "unknown";
  }
}

const char* err_name(int err) {
  switch (err) {
    case 0: return "ok";
    case EPERM: return "EPERM";
    case EIO: return "EIO";
    case ENOMEM: return "ENOMEM";
    case EINVAL: return "EINVAL";
    case ENOSPC: return "ENOSPC";
    case EOVERFLOW: return "EOVERFLOW";
    case ENOTSUP: return "ENOTSUP";
    case ESHUTDOWN: return "ESHUTDOWN";
    default: return "?";
  }
}

bool is_nbd_error(int err) {
  return err == EPERM || err == EIO || err == ENOMEM || err == EINVAL || err == ENOSPC ||
         err == EOVERFLOW || err == ENOTSUP || err == ESHUTDOWN;
}

// errno of a failed file operation -> the NBD error the client gets.
int to_nbd_error(int e) {
  switch (e) {
    case EPERM:
    case EACCES:
    case EROFS: return EPERM;
    case ENOSPC:
    case EDQUOT:
    case EFBIG: return ENOSPC;
    case ENOMEM: return ENOMEM;
    case EINVAL: return EINVAL;
    case EOVERFLOW: return EOVERFLOW;
    case EOPNOTSUPP: return ENOTSUP;
    default: return EIO;
  }
}

// True when offset+length stays within size (no overflow).
bool in_range(uint64_t offset, uint64_t length, uint64_t size) {
  return offset <= size && length <= size - offset;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// FileBackend

FileBackend::FileBackend(UniqueFd fd, std::string name) : fd_(std::move(fd)), name_(std::move(name)) {
  struct stat st{};
  check_sys(::fstat(fd_.get(), &st), fmt::format("fstat {}", name_));
  if (S_ISREG(st.st_mode)) {
    size_ = static_cast<uint64_t>(st.st_size);
  } else if (S_ISBLK(st.st_mode)) {
    check_sys(::ioctl(fd_.get(), BLKGETSIZE64, &size_), fmt::format("ioctl BLKGETSIZE64 on {}", name_));
  } else {
    fail("NBD backend {} is neither a regular file nor a block device: pass a disk image or a block device",
         name_);
  }
}

int FileBackend::read(uint64_t offset, std::span<std::byte> out) {
  size_t done = 0;
  while (done < out.size()) {
    ssize_t n = ::pread(fd_.get(), out.data() + done, out.size() - done, static_cast<off_t>(offset + done));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      int e = errno;
      log::warn(kLog, "pread {} at offset {}: {}", name_, offset + done, std::strerror(e));
      return to_nbd_error(e);
    }
    if (n == 0) {
      log::warn(kLog, "pread {} at offset {}: unexpected end of file (did the image shrink?)", name_, offset + done);
      return EIO;
    }
    done += static_cast<size_t>(n);
  }
  return 0;
}

int FileBackend::write(uint64_t offset, std::span<const std::byte> data, bool fua) {
  size_t done = 0;
  while (done < data.size()) {
    ssize_t n = ::pwrite(fd_.get(), data.data() + done, data.size() - done, static_cast<off_t>(offset + done));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      int e = n < 0 ? errno : EIO;
      log::warn(kLog, "pwrite {} at offset {}: {}", name_, offset + done, std::strerror(e));
      return to_nbd_error(e);
    }
    done += static_cast<size_t>(n);
  }
  return fua ? flush() : 0;
}

int FileBackend::write_zero_bytes(uint64_t offset, uint64_t length) {
  static const std::byte kZeros[1 << 20] = {};
  while (length > 0) {
    size_t chunk = length < sizeof kZeros ? static_cast<size_t>(length) : sizeof kZeros;
    if (int err = write(offset, std::span<const std::byte>(kZeros, chunk), false); err != 0) return err;
    offset += chunk;
    length -= chunk;
  }
  return 0;
}

int FileBackend::fallocate_or_zero(int mode, bool& supported, uint64_t offset, uint64_t length) {
  if (supported) {
    int r;
    do {
      r = ::fallocate(fd_.get(), mode, static_cast<off_t>(offset), static_cast<off_t>(length));
    } while (r < 0 && errno == EINTR);
    if (r == 0) return 0;
    int e = errno;
    if (e != EOPNOTSUPP && e != ENOSYS) {
      log::warn(kLog, "fallocate(mode {:#x}) {} offset {} length {}: {}", mode, name_, offset, length,
                std::strerror(e));
      return to_nbd_error(e);
    }
    supported = false;
    log::info(kLog, "fallocate(mode {:#x}) is not supported on {}; writing zeros instead from now on", mode, name_);
  }
  return write_zero_bytes(offset, length);
}

int FileBackend::write_zeroes(uint64_t offset, uint64_t length, bool no_hole) {
  if (no_hole) return fallocate_or_zero(FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, zero_range_supported_, offset, length);
  return fallocate_or_zero(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, punch_supported_, offset, length);
}

int FileBackend::trim(uint64_t offset, uint64_t length) {
  return fallocate_or_zero(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, punch_supported_, offset, length);
}

int FileBackend::flush() {
  int r;
  do {
    r = ::fdatasync(fd_.get());
  } while (r < 0 && errno == EINTR);
  if (r == 0) return 0;
  int e = errno;
  log::warn(kLog, "fdatasync {}: {}", name_, std::strerror(e));
  return to_nbd_error(e);
}

// ---------------------------------------------------------------------------------------------
// Connection: one client, on the server thread. Every method may throw LinkDown (the client
// went away), ProtocolError (it broke the protocol: the connection is closed), SysError, or
// Stopping; Server::serve catches them all.

class Connection {
 public:
  Connection(Server& server, int fd, std::string peer) : s_(server), fd_(fd), peer_(std::move(peer)) {}

  void run() {
    if (handshake()) transmission();
  }

 private:
  // --- I/O ----------------------------------------------------------------------------------
  // Waits until the client socket is ready for `events`, serving the stop eventfd and the
  // listener (extra clients are refused) meanwhile.
  void wait(short events) {
    for (;;) {
      pollfd p[3] = {{fd_, events, 0}, {s_.wake_fd_.get(), POLLIN, 0}, {s_.listen_fd_.get(), POLLIN, 0}};
      int r = ::poll(p, 3, -1);
      if (r < 0 && errno == EINTR) continue;
      check_sys(r, fmt::format("poll on the NBD client of {}", s_.path_));
      if (p[1].revents != 0) throw Stopping{};
      // The client first: when it hung up (or drop_client() shut it down) and a new client is
      // already waiting, this connection must end before the listener is looked at, or the new
      // client would be refused as a second one.
      if (p[0].revents != 0) return;
      if (p[2].revents != 0) s_.accept_one();  // refused: a client is connected
    }
  }

  // Reads exactly n bytes. Returns false on EOF before the first byte when eof_ok; EOF anywhere
  // else throws LinkDown naming `what`.
  bool read_exact(void* buf, size_t n, const char* what, bool eof_ok = false) {
    auto* p = static_cast<unsigned char*>(buf);
    size_t done = 0;
    while (done < n) {
      ssize_t r = ::recv(fd_, p + done, n - done, 0);
      if (r > 0) {
        done += static_cast<size_t>(r);
        continue;
      }
      if (r == 0) {
        if (done == 0 && eof_ok) return false;
        throw LinkDown(fmt::format("{}: client {} closed the connection after {} of {} bytes of {}", s_.path_,
                                   peer_, done, n, what));
      }
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) {
        wait(POLLIN);
        continue;
      }
      if (errno == ECONNRESET)
        throw LinkDown(fmt::format("{}: client {} reset the connection while sending {}", s_.path_, peer_, what));
      throw SysError(errno, fmt::format("recv {} from the NBD client of {}", what, s_.path_));
    }
    return true;
  }

  void write_all(const void* buf, size_t n) {
    auto* p = static_cast<const unsigned char*>(buf);
    size_t done = 0;
    while (done < n) {
      ssize_t r = ::send(fd_, p + done, n - done, MSG_NOSIGNAL);
      if (r > 0) {
        done += static_cast<size_t>(r);
        continue;
      }
      if (r < 0 && errno == EINTR) continue;
      if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
        wait(POLLOUT);
        continue;
      }
      if (r < 0 && (errno == EPIPE || errno == ECONNRESET))
        throw LinkDown(fmt::format("{}: client {} went away before reading the reply", s_.path_, peer_));
      throw SysError(r < 0 ? errno : EIO, fmt::format("send to the NBD client of {}", s_.path_));
    }
  }
  void write_all(const std::string& s) { write_all(s.data(), s.size()); }

  std::byte* buffer(size_t n) {
    if (n > buf_size_) {
      buf_ = std::make_unique_for_overwrite<std::byte[]>(n);
      buf_size_ = n;
    }
    return buf_.get();
  }

  // --- Handshake ------------------------------------------------------------------------------
  void opt_reply(uint32_t opt, uint32_t type, std::string_view data = {}) {
    std::string m;
    put64(m, kOptReplyMagic);
    put32(m, opt);
    put32(m, type);
    put32(m, static_cast<uint32_t>(data.size()));
    m.append(data);
    write_all(m);
  }

  // An option refused with an error reply; negotiation goes on.
  void opt_error(uint32_t opt, uint32_t type, const std::string& msg, bool count) {
    if (count) {
      log::warn(kLog, "{}: client {}: option {} ({}): {}", s_.path_, peer_, opt, opt_name(opt), msg);
      s_.note_error(msg);
    } else {
      log::info(kLog, "{}: client {}: option {} ({}): {}", s_.path_, peer_, opt, opt_name(opt), msg);
    }
    opt_reply(opt, type, msg);
  }

  bool name_matches(const std::string& name) const { return name.empty() || name == s_.opts_.export_name; }

  uint64_t export_size() {
    try {
      return s_.backend_.size();
    } catch (const std::exception& e) {
      throw Error(fmt::format("{}: reading the export size failed: {}", s_.path_, e.what()));
    }
  }

  // Returns true when the client enters transmission, false when it aborted.
  bool handshake() {
    std::string greet;
    put64(greet, kNbdMagic);
    put64(greet, kOptMagic);
    put16(greet, kFlagFixedNewstyle | kFlagNoZeroes);
    write_all(greet);

    unsigned char cf[4];
    read_exact(cf, sizeof cf, "the client flags");
    uint32_t cflags = get32(cf);
    if (cflags & ~(kClientFixedNewstyle | kClientNoZeroes))
      throw ProtocolError(fmt::format("{}: client {} sent unknown client flags {:#x}; closing the connection",
                                      s_.path_, peer_, cflags));
    if (!(cflags & kClientFixedNewstyle))
      throw ProtocolError(fmt::format("{}: client {} does not speak fixed newstyle negotiation (flags {:#x}); "
                                      "this server requires it (QEMU >= 2.6 does); closing the connection",
                                      s_.path_, peer_, cflags));
    no_zeroes_ = (cflags & kClientNoZeroes) != 0;

    for (;;) {
      unsigned char h[16];
      read_exact(h, sizeof h, "an option header");
      uint64_t magic = get64(h);
      uint32_t opt = get32(h + 8);
      uint32_t len = get32(h + 12);
      if (magic != kOptMagic)
        throw ProtocolError(fmt::format("{}: client {} sent bad option magic {:#018x} (expected {:#018x}); "
                                        "closing the connection", s_.path_, peer_, magic, kOptMagic));
      if (len > kMaxOptionLength)
        throw ProtocolError(fmt::format("{}: client {} sent option {} ({}) with {} bytes of data (limit {}); "
                                        "closing the connection", s_.path_, peer_, opt, opt_name(opt), len,
                                        kMaxOptionLength));
      std::string data(len, '\0');
      read_exact(data.data(), len, "option data");

      switch (opt) {
        case kOptExportName: {
          if (!name_matches(data))
            throw ProtocolError(fmt::format("{}: client {} asked for export '{}' with EXPORT_NAME but this server "
                                            "exports '{}'; closing (EXPORT_NAME cannot answer an error)",
                                            s_.path_, peer_, data, s_.opts_.export_name));
          size_ = export_size();
          std::string m;
          put64(m, size_);
          put16(m, kTransmissionFlags);
          if (!no_zeroes_) m.append(124, '\0');
          write_all(m);
          log::info(kLog, "{}: client {} entered transmission (EXPORT_NAME '{}', {} bytes)", s_.path_, peer_,
                    s_.opts_.export_name, size_);
          return true;
        }
        case kOptAbort:
          log::info(kLog, "{}: client {} aborted the negotiation", s_.path_, peer_);
          try {
            opt_reply(opt, kRepAck);
          } catch (const LinkDown&) {  // it may have closed already: fine
          }
          return false;
        case kOptList: {
          if (len != 0) {
            opt_error(opt, kRepErrInvalid, fmt::format("LIST carries no data but {} bytes came", len), true);
            break;
          }
          std::string d;
          put32(d, static_cast<uint32_t>(s_.opts_.export_name.size()));
          d += s_.opts_.export_name;
          opt_reply(opt, kRepServer, d);
          opt_reply(opt, kRepAck);
          break;
        }
        case kOptInfo:
        case kOptGo:
          if (info_or_go(opt, data)) return true;
          break;
        default:
          opt_error(opt, kRepErrUnsup, "not supported by this server", false);
          break;
      }
    }
  }

  // NBD_OPT_INFO / NBD_OPT_GO. Returns true when GO succeeded (enter transmission).
  bool info_or_go(uint32_t opt, const std::string& data) {
    const auto* d = reinterpret_cast<const unsigned char*>(data.data());
    if (data.size() < 6) {
      opt_error(opt, kRepErrInvalid, fmt::format("{} data is {} bytes, shorter than the minimum 6", opt_name(opt),
                                                 data.size()), true);
      return false;
    }
    uint32_t name_len = get32(d);
    if (name_len > kMaxExportName || 4ull + name_len + 2 > data.size()) {
      opt_error(opt, kRepErrInvalid, fmt::format("{} export name length {} does not fit its {} bytes of data",
                                                 opt_name(opt), name_len, data.size()), true);
      return false;
    }
    std::string name(data, 4, name_len);
    uint16_t nreq = get16(d + 4 + name_len);
    if (data.size() != 4ull + name_len + 2 + 2ull * nreq) {
      opt_error(opt, kRepErrInvalid, fmt::format("{} announces {} information requests but carries {} bytes",
                                                 opt_name(opt), nreq, data.size()), true);
      return false;
    }
    if (!name_matches(name)) {
      opt_error(opt, kRepErrUnknown, fmt::format("unknown export '{}'; this server exports '{}'", name,
                                                 s_.opts_.export_name), true);
      return false;
    }
    bool want_block = false, want_name = false;
    for (uint16_t i = 0; i < nreq; ++i) {
      uint16_t t = get16(d + 6 + name_len + 2 * i);
      if (t == kInfoBlockSize) want_block = true;
      if (t == kInfoName) want_name = true;
    }
    size_ = export_size();
    std::string info;
    put16(info, kInfoExport);
    put64(info, size_);
    put16(info, kTransmissionFlags);
    opt_reply(opt, kRepInfo, info);
    if (want_block) {
      info.clear();
      put16(info, kInfoBlockSize);
      put32(info, kMinBlock);
      put32(info, kPreferredBlock);
      put32(info, s_.opts_.max_payload);
      opt_reply(opt, kRepInfo, info);
    }
    if (want_name) {
      info.clear();
      put16(info, kInfoName);
      info += s_.opts_.export_name;
      opt_reply(opt, kRepInfo, info);
    }
    opt_reply(opt, kRepAck);
    if (opt != kOptGo) return false;
    log::info(kLog, "{}: client {} entered transmission (GO '{}', {} bytes)", s_.path_, peer_,
              s_.opts_.export_name, size_);
    return true;
  }

  // --- Transmission ---------------------------------------------------------------------------
  void reply(uint64_t handle, int err, const std::byte* payload = nullptr, size_t len = 0) {
    std::string m;
    put32(m, kSimpleReplyMagic);
    put32(m, static_cast<uint32_t>(err));
    m.append(reinterpret_cast<const char*>(&handle), sizeof handle);  // echoed as received
    if (payload != nullptr && len <= 64 * 1024) {
      m.append(reinterpret_cast<const char*>(payload), len);
      write_all(m);
      return;
    }
    write_all(m);
    if (payload != nullptr) write_all(payload, len);
  }

  // A request refused before it reaches the backend.
  void reject(uint64_t handle, uint16_t type, uint64_t offset, uint32_t len, int err, const std::string& why) {
    std::string msg = fmt::format("{} offset {} length {}: {}; replied {}", cmd_name(type), offset, len, why,
                                  err_name(err));
    log::warn(kLog, "{}: client {}: {}", s_.path_, peer_, msg);
    s_.note_error(msg);
    reply(handle, err);
  }

  // Runs one backend call; an exception or a value outside the NBD error set becomes EIO.
  template <typename F>
  int call_backend(const char* what, uint64_t offset, uint64_t len, F&& f) {
    int err;
    try {
      err = f();
    } catch (const std::exception& e) {
      log::error(kLog, "{}: backend {} offset {} length {} threw: {}; replying EIO", s_.path_, what, offset, len,
                 e.what());
      err = EIO;
    } catch (...) {
      log::error(kLog, "{}: backend {} offset {} length {} threw a non-standard exception; replying EIO", s_.path_,
                 what, offset, len);
      err = EIO;
    }
    if (err != 0 && !is_nbd_error(err)) {
      log::warn(kLog, "{}: backend {} returned {}, not an NBD error value; replying EIO", s_.path_, what, err);
      err = EIO;
    }
    if (err != 0) {
      std::string msg = fmt::format("{} offset {} length {} failed in the backend: {}", what, offset, len,
                                    err_name(err));
      log::warn(kLog, "{}: {}", s_.path_, msg);
      s_.note_error(msg);
    }
    return err;
  }

  void transmission() {
    const uint32_t max = s_.opts_.max_payload;
    for (;;) {
      unsigned char h[28];
      if (!read_exact(h, sizeof h, "a request header", /*eof_ok=*/true))
        throw LinkDown(fmt::format("{}: client {} closed the connection", s_.path_, peer_));
      uint32_t magic = get32(h);
      uint16_t flags = get16(h + 4);
      uint16_t type = get16(h + 6);
      uint64_t handle;
      std::memcpy(&handle, h + 8, sizeof handle);
      uint64_t offset = get64(h + 16);
      uint32_t len = get32(h + 24);
      {
        std::lock_guard lk(s_.mu_);
        s_.stats_.requests++;
      }
      if (magic != kRequestMagic)
        throw ProtocolError(fmt::format("{}: client {} sent bad request magic {:#010x} (expected {:#010x}); "
                                        "closing the connection", s_.path_, peer_, magic, kRequestMagic));

      switch (type) {
        case kCmdWrite: {
          if (len > max)
            throw ProtocolError(fmt::format("{}: client {}: WRITE offset {} length {} exceeds the maximum payload {}; "
                                            "its data cannot be skipped safely, closing the connection",
                                            s_.path_, peer_, offset, len, max));
          std::byte* buf = buffer(len);
          read_exact(buf, len, "WRITE data");
          if (flags & ~kCmdFlagFua) {
            reject(handle, type, offset, len, EINVAL, fmt::format("unsupported command flags {:#x}", flags));
          } else if (len == 0) {
            reject(handle, type, offset, len, EINVAL, "zero length");
          } else if (!in_range(offset, len, size_)) {
            reject(handle, type, offset, len, ENOSPC, fmt::format("beyond the end of the export ({} bytes)", size_));
          } else {
            bool fua = (flags & kCmdFlagFua) != 0;
            int err = call_backend("WRITE", offset, len, [&] {
              return s_.backend_.write(offset, std::span<const std::byte>(buf, len), fua);
            });
            if (err == 0) {
              std::lock_guard lk(s_.mu_);
              s_.stats_.writes++;
              s_.stats_.write_bytes += len;
            }
            reply(handle, err);
          }
          break;
        }
        case kCmdRead: {
          if (flags & ~kCmdFlagFua) {
            reject(handle, type, offset, len, EINVAL, fmt::format("unsupported command flags {:#x}", flags));
          } else if (len == 0) {
            reject(handle, type, offset, len, EINVAL, "zero length");
          } else if (len > max) {
            reject(handle, type, offset, len, EINVAL, fmt::format("longer than the maximum payload {}", max));
          } else if (!in_range(offset, len, size_)) {
            reject(handle, type, offset, len, EINVAL, fmt::format("beyond the end of the export ({} bytes)", size_));
          } else {
            std::byte* buf = buffer(len);
            int err = call_backend("READ", offset, len, [&] {
              return s_.backend_.read(offset, std::span<std::byte>(buf, len));
            });
            // Simple replies: an error carries no payload.
            if (err == 0) reply(handle, 0, buf, len);
            else reply(handle, err);
          }
          break;
        }
        case kCmdTrim:
        case kCmdWriteZeroes: {
          const uint16_t allowed = type == kCmdTrim ? kCmdFlagFua : (kCmdFlagFua | kCmdFlagNoHole);
          if (flags & ~allowed) {
            reject(handle, type, offset, len, EINVAL, fmt::format("unsupported command flags {:#x}", flags));
          } else if (len == 0) {
            reject(handle, type, offset, len, EINVAL, "zero length");
          } else if (!in_range(offset, len, size_)) {
            reject(handle, type, offset, len, EINVAL, fmt::format("beyond the end of the export ({} bytes)", size_));
          } else {
            int err = call_backend(cmd_name(type), offset, len, [&] {
              return type == kCmdTrim ? s_.backend_.trim(offset, len)
                                      : s_.backend_.write_zeroes(offset, len, (flags & kCmdFlagNoHole) != 0);
            });
            // The backend calls take no FUA: a FUA request is made durable by a flush.
            if (err == 0 && (flags & kCmdFlagFua))
              err = call_backend("FLUSH (for FUA)", offset, len, [&] { return s_.backend_.flush(); });
            reply(handle, err);
          }
          break;
        }
        case kCmdFlush: {
          // offset and length should be 0; they carry no meaning, so other values are ignored.
          if (flags & ~kCmdFlagFua) {
            reject(handle, type, offset, len, EINVAL, fmt::format("unsupported command flags {:#x}", flags));
          } else {
            reply(handle, call_backend("FLUSH", offset, len, [&] { return s_.backend_.flush(); }));
          }
          break;
        }
        case kCmdDisc:
          log::info(kLog, "{}: client {} disconnected (NBD_CMD_DISC)", s_.path_, peer_);
          return;
        case kCmdCache:
          // Not advertised (no NBD_FLAG_SEND_CACHE): a client must not send it.
          reject(handle, type, offset, len, EINVAL, "CACHE is not supported (not advertised)");
          break;
        case kCmdBlockStatus:
          reject(handle, type, offset, len, EINVAL, "BLOCK_STATUS is not supported (no meta context negotiated)");
          break;
        default:
          reject(handle, type, offset, len, EINVAL, fmt::format("unknown command type {}", type));
          break;
      }
    }
  }

  Server& s_;
  int fd_;
  std::string peer_;  // "pid N uid M", for messages
  bool no_zeroes_ = false;
  uint64_t size_ = 0;
  std::unique_ptr<std::byte[]> buf_;
  size_t buf_size_ = 0;
};

// ---------------------------------------------------------------------------------------------
// Server

Server::Server(std::string socket_path, Backend& backend, Options opts)
    : path_(std::move(socket_path)), backend_(backend), opts_(std::move(opts)) {
  if (opts_.max_payload < kPreferredBlock)
    fail("NBD server {}: max_payload {} is below the preferred block size {}; use at least {}", path_,
         opts_.max_payload, kPreferredBlock, kPreferredBlock);
  if (opts_.export_name.size() > kMaxExportName)
    fail("NBD server {}: export name is {} bytes; the protocol limit is {}", path_, opts_.export_name.size(),
         kMaxExportName);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path_.empty() || path_.size() >= sizeof addr.sun_path)
    fail("NBD socket path '{}' is {} bytes; a unix socket path must be 1..{} bytes: choose a shorter path", path_,
         path_.size(), sizeof addr.sun_path - 1);
  std::memcpy(addr.sun_path, path_.c_str(), path_.size() + 1);

  struct stat st{};
  if (::lstat(path_.c_str(), &st) == 0) {
    if (!S_ISSOCK(st.st_mode))
      fail("NBD socket path {} exists and is not a socket; refusing to replace it: remove it or choose another path",
           path_);
    check_sys(::unlink(path_.c_str()), fmt::format("unlink the stale NBD socket {}", path_));
  } else if (errno != ENOENT) {
    throw SysError(errno, fmt::format("lstat NBD socket path {}", path_), "check the directory exists and is accessible");
  }

  listen_fd_ = UniqueFd(check_sys(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0),
                                  fmt::format("socket(AF_UNIX) for NBD socket {}", path_)));
  check_sys(::bind(listen_fd_.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr),
            fmt::format("bind NBD socket {}", path_), "check the directory exists and is writable");
  try {
    check_sys(::chmod(path_.c_str(), 0600), fmt::format("chmod 0600 NBD socket {}", path_));
    check_sys(::lstat(path_.c_str(), &st), fmt::format("lstat NBD socket {}", path_));
    sock_dev_ = st.st_dev;
    sock_ino_ = st.st_ino;
    if (opts_.socket_owner != static_cast<uid_t>(-1))
      check_sys(::chown(path_.c_str(), opts_.socket_owner, static_cast<gid_t>(-1)),
                fmt::format("chown NBD socket {} to uid {}", path_, opts_.socket_owner), "ftd must run as root");
    check_sys(::listen(listen_fd_.get(), 8), fmt::format("listen on NBD socket {}", path_));
    wake_fd_ = UniqueFd(check_sys(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK),
                                  fmt::format("eventfd for NBD server {}", path_)));
  } catch (...) {
    ::unlink(path_.c_str());
    throw;
  }
  log::info(kLog, "{}: listening (export '{}', max payload {})", path_, opts_.export_name, opts_.max_payload);
}

Server::~Server() {
  stop();
  listen_fd_.reset();
  struct stat st{};
  if (::lstat(path_.c_str(), &st) < 0 || st.st_dev != sock_dev_ || st.st_ino != sock_ino_) return;
  if (::unlink(path_.c_str()) < 0 && errno != ENOENT)
    log::warn(kLog, "{}: unlink at shutdown failed: {}", path_, std::strerror(errno));
}

void Server::start() {
  if (thread_.joinable() || stopping_) fail("NBD server {}: start() called twice or after stop()", path_);
  thread_ = std::thread([this] { run(); });
}

void Server::stop() {
  stopping_ = true;
  uint64_t one = 1;
  ssize_t r;
  do {
    r = ::write(wake_fd_.get(), &one, sizeof one);
  } while (r < 0 && errno == EINTR);
  if (r < 0 && errno != EAGAIN)  // EAGAIN: the counter is already nonzero, the thread wakes anyway
    log::error(kLog, "{}: waking the server thread failed: {}", path_, std::strerror(errno));
  if (thread_.joinable() && thread_.get_id() != std::this_thread::get_id()) thread_.join();
}

bool Server::drop_client() {
  std::lock_guard lk(mu_);
  if (client_fd_ < 0) return false;
  log::info(kLog, "{}: dropping the client connection (requested)", path_);
  if (::shutdown(client_fd_, SHUT_RDWR) < 0)
    log::warn(kLog, "{}: shutdown of the client connection failed: {}", path_, std::strerror(errno));
  return true;
}

Stats Server::stats() const {
  std::lock_guard lk(mu_);
  return stats_;
}

void Server::note_error(const std::string& msg) {
  std::lock_guard lk(mu_);
  stats_.errors++;
  stats_.last_error = msg;
}

void Server::run() noexcept {
  try {
    while (!stopping_) {
      pollfd p[2] = {{listen_fd_.get(), POLLIN, 0}, {wake_fd_.get(), POLLIN, 0}};
      int r = ::poll(p, 2, -1);
      if (r < 0 && errno == EINTR) continue;
      check_sys(r, fmt::format("poll on NBD socket {}", path_));
      if (p[1].revents != 0) break;
      if (p[0].revents != 0) {
        UniqueFd c = accept_one();
        if (c) serve(std::move(c));
      }
    }
  } catch (const std::exception& e) {
    log::error(kLog, "{}: the NBD server thread stopped: {}", path_, e.what());
    note_error(e.what());
  } catch (...) {
    log::error(kLog, "{}: the NBD server thread stopped on a non-standard exception", path_);
  }
}

UniqueFd Server::accept_one() {
  int fd = ::accept4(listen_fd_.get(), nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
  if (fd < 0) {
    int e = errno;
    if (e == EAGAIN || e == EWOULDBLOCK || e == EINTR || e == ECONNABORTED) return {};
    log::error(kLog, "{}: accept failed: {}; retrying shortly", path_, std::strerror(e));
    pollfd p{wake_fd_.get(), POLLIN, 0};  // back off (e.g. EMFILE) without spinning
    (void)::poll(&p, 1, 200);
    return {};
  }
  UniqueFd c(fd);
  ucred cred{};
  socklen_t cl = sizeof cred;
  if (::getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &cl) < 0) {
    log::warn(kLog, "{}: refused a connection: getsockopt SO_PEERCRED failed: {}", path_, std::strerror(errno));
    return {};
  }
  {
    std::lock_guard lk(mu_);
    if (client_fd_ >= 0) {
      log::warn(kLog, "{}: refused a second connection from pid {} uid {}: one client at a time and one is connected",
                path_, cred.pid, cred.uid);
      return {};
    }
  }
  if ((opts_.allowed_pid != 0 && cred.pid != opts_.allowed_pid) ||
      (opts_.allowed_uid != static_cast<uid_t>(-1) && cred.uid != opts_.allowed_uid)) {
    log::warn(kLog, "{}: refused a connection from pid {} uid {}: only {} may connect", path_, cred.pid, cred.uid,
              fmt::format("pid {} uid {}", opts_.allowed_pid == 0 ? std::string("any") : std::to_string(opts_.allowed_pid),
                          opts_.allowed_uid == static_cast<uid_t>(-1) ? std::string("any")
                                                                      : std::to_string(opts_.allowed_uid)));
    return {};
  }
  peer_ = fmt::format("pid {} uid {}", cred.pid, cred.uid);
  return c;
}

void Server::serve(UniqueFd client) {
  {
    std::lock_guard lk(mu_);
    client_fd_ = client.get();
    stats_.connections++;
    stats_.connected = true;
  }
  log::info(kLog, "{}: client {} connected", path_, peer_);
  try {
    Connection conn(*this, client.get(), peer_);
    conn.run();
  } catch (const Stopping&) {
    log::info(kLog, "{}: server stopping; closing the connection of client {}", path_, peer_);
  } catch (const LinkDown& e) {
    log::info(kLog, "{}", e.what());
  } catch (const ProtocolError& e) {
    log::warn(kLog, "{}", e.what());
    note_error(e.what());
  } catch (const std::exception& e) {
    log::error(kLog, "{}: closing the connection of client {}: {}", path_, peer_, e.what());
    note_error(e.what());
  } catch (...) {
    log::error(kLog, "{}: closing the connection of client {} after a non-standard exception", path_, peer_);
    note_error("non-standard exception");
  }
  std::lock_guard lk(mu_);
  client_fd_ = -1;
  stats_.connected = false;
  client.reset();
}

}  // namespace ftvm::vmm::nbd
