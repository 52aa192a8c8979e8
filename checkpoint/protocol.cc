// The generic encoder and decoder of the replication protocol (checkpoint/protocol.h,
// "Encoding"): Writer and Reader are the visitors every message's fields() list is walked
// with; check() holds each message's semantic checks beyond its layout.
#include "checkpoint/protocol.h"

#include <cstring>
#include <optional>
#include <type_traits>

#include "common/error.h"

namespace ftvm::checkpoint {
namespace {

template <class T>
struct AlwaysFalse : std::false_type {};

template <class T>
struct IsVector : std::false_type {};
template <class E>
struct IsVector<std::vector<E>> : std::true_type {};

template <class T>
struct IsByteArray : std::false_type {};
template <size_t N>
struct IsByteArray<std::array<std::byte, N>> : std::true_type {};

template <class T>
concept HasFields = requires(T& m) { T::fields(m, [](const char*, auto&, auto&&...) {}); };

template <class O, class... Opts>
inline constexpr bool kHas = (std::is_same_v<O, Opts> || ...);

// The wire::Max among `opts`, else `dflt`.
template <class... Opts>
constexpr size_t limit_of(size_t dflt, const Opts&... opts) {
  size_t n = dflt;
  (
      [&](const auto& o) {
        if constexpr (std::is_same_v<std::decay_t<decltype(o)>, wire::Max>) n = o.n;
      }(opts),
      ...);
  return n;
}

// Appends fields to `out`. Field limits are checked here too (ftvm::Error): the peer would
// refuse a message over them.
class Writer {
 public:
  Writer(const char* msg, size_t reserve = 64) : msg_(msg) { out.reserve(reserve); }

  template <class V, class... Opts>
  void operator()(const char* name, const V& v, const Opts&... opts) {
    if constexpr (kHas<wire::Rest, Opts...>) {
      out.insert(out.end(), std::begin(v), std::end(v));
    } else if constexpr (std::is_same_v<V, std::string>) {
      const size_t limit = limit_of(kMaxString, opts...);
      if (v.size() > limit)
        fail("protocol: {} field '{}' of {} bytes exceeds the {} byte limit", msg_, name, v.size(), limit);
      put(v.size(), 4);
      const auto* p = reinterpret_cast<const std::byte*>(v.data());
      out.insert(out.end(), p, p + v.size());
    } else if constexpr (IsVector<V>::value) {
      static_assert(kHas<wire::Max, Opts...>, "a vector field needs wire::Max{count limit}");
      const size_t limit = limit_of(0, opts...);
      if (v.size() > limit)
        fail("protocol: {} field '{}' has {} elements, more than the limit {}", msg_, name, v.size(), limit);
      put(v.size(), 4);
      for (const auto& e : v) {
        if constexpr (HasFields<typename V::value_type>)
          V::value_type::fields(e, *this);
        else
          (*this)(name, e);
      }
    } else if constexpr (IsByteArray<V>::value) {
      out.insert(out.end(), v.begin(), v.end());
    } else if constexpr (std::is_enum_v<V>) {
      put(static_cast<uint32_t>(v), 4);  // every enum is a u32 on the wire
    } else if constexpr (std::is_same_v<V, uint32_t>) {
      put(v, 4);
    } else if constexpr (std::is_same_v<V, uint64_t> || std::is_same_v<V, int64_t>) {
      put(static_cast<uint64_t>(v), 8);
    } else {
      static_assert(AlwaysFalse<V>::value, "no wire form for this field type (see protocol.h, Encoding)");
    }
  }

  std::vector<std::byte> out;

 private:
  void put(uint64_t v, int n) {
    for (int i = 0; i < n; i++) out.push_back(static_cast<std::byte>((v >> (8 * i)) & 0xff));
  }
  const char* msg_;
};

// Reads fields from a body, bounds-checked; every error names the message and the field path
// ("disks[1].source").
class Reader {
 public:
  Reader(std::span<const std::byte> b, const char* msg) : b_(b), msg_(msg) {}

  template <class V, class... Opts>
  void operator()(const char* name, V& v, const Opts&... opts) {
    leaf_ = name;
    read(v, opts...);
  }

  void done() const {
    if (pos_ != b_.size())
      throw ProtocolError(
          fmt::format("{}: {} unexpected trailing bytes after the last field", msg_, b_.size() - pos_));
  }

 private:
  template <class V, class... Opts>
  void read(V& v, const Opts&... opts) {
    if constexpr (kHas<wire::Rest, Opts...>) {
      auto r = b_.subspan(pos_);
      v.assign(r.begin(), r.end());
      pos_ = b_.size();
    } else if constexpr (std::is_same_v<V, std::string>) {
      const size_t limit = limit_of(kMaxString, opts...);
      const uint32_t n = u32();
      if (n > limit)
        throw ProtocolError(fmt::format("{}: field '{}': string length {} exceeds limit {}", msg_, path(), n, limit));
      need(n);
      v.assign(reinterpret_cast<const char*>(b_.data() + pos_), n);
      pos_ += n;
    } else if constexpr (IsVector<V>::value) {
      const size_t limit = limit_of(0, opts...);
      const uint32_t n = u32();
      if (n > limit)
        throw ProtocolError(fmt::format("{}: field '{}': {} elements exceed limit {}", msg_, path(), n, limit));
      // No reserve(n): every element needs bytes of the body, so the size is bounded by it.
      const char* outer = leaf_;
      v.clear();
      for (uint32_t i = 0; i < n; i++) {
        outer_ = outer;
        index_ = i;
        leaf_ = nullptr;
        auto& e = v.emplace_back();
        if constexpr (HasFields<typename V::value_type>)
          V::value_type::fields(e, *this);
        else
          read(e);
      }
      outer_ = nullptr;
      leaf_ = outer;
    } else if constexpr (IsByteArray<V>::value) {
      need(v.size());
      std::memcpy(v.data(), b_.data() + pos_, v.size());
      pos_ += v.size();
    } else if constexpr (std::is_enum_v<V>) {
      const uint32_t x = u32();
      const WireEnum e = wire_enum(V{});
      if (x < 1 || x > e.last)
        throw ProtocolError(fmt::format("{}: invalid {} {} in field '{}' (valid: 1..{})", msg_, e.noun, x, path(),
                                        e.last));
      v = static_cast<V>(x);
    } else if constexpr (std::is_same_v<V, uint32_t>) {
      v = u32();
      if constexpr (kHas<wire::Version, Opts...>) {
        if (v != kProtocolVersion)
          throw ProtocolError(fmt::format("protocol version {} not supported (this ftd speaks {}); run the same "
                                          "ftvm version on both hosts", v, kProtocolVersion));
      }
    } else if constexpr (std::is_same_v<V, uint64_t> || std::is_same_v<V, int64_t>) {
      v = static_cast<V>(get(8));
    } else {
      static_assert(AlwaysFalse<V>::value, "no wire form for this field type (see protocol.h, Encoding)");
    }
  }

  uint32_t u32() { return static_cast<uint32_t>(get(4)); }
  uint64_t get(int n) {
    need(static_cast<size_t>(n));
    uint64_t v = 0;
    for (int i = 0; i < n; i++) v |= static_cast<uint64_t>(b_[pos_ + i]) << (8 * i);
    pos_ += static_cast<size_t>(n);
    return v;
  }
  void need(size_t n) const {
    if (b_.size() - pos_ < n)
      throw ProtocolError(fmt::format("{}: field '{}': message truncated ({} bytes, needed {} more at offset {})",
                                      msg_, path(), b_.size(), n, pos_));
  }
  // "name", "outer[i]" or "outer[i].name" (only built for an error).
  std::string path() const {
    if (!outer_) return leaf_ ? leaf_ : "?";
    if (!leaf_) return fmt::format("{}[{}]", outer_, index_);
    return fmt::format("{}[{}].{}", outer_, index_, leaf_);
  }

  std::span<const std::byte> b_;
  size_t pos_ = 0;
  const char* msg_;
  const char* leaf_ = nullptr;   // the field being read
  const char* outer_ = nullptr;  // the vector field whose element index_ is being read
  uint32_t index_ = 0;
};

// ---- semantic checks, run by decode<T>() after the layout decoded ----------------------------
// Each throws ProtocolError naming the message and what is wrong. Messages without any have
// none beyond their layout (limits, enum ranges: see fields()).

template <class T>
void check(const T&) {}

void check(const OpenSession& m) {
  for (size_t i = 0; i < m.disks.size(); i++) {
    const DiskInfo& d = m.disks[i];
    if (d.source.empty() || d.size == 0 || d.size % 512 != 0)
      throw ProtocolError(fmt::format("OpenSession: disk {} ('{}', '{}') has size {} (must be a positive multiple "
                                      "of 512) or no source", i, d.id, d.source, d.size));
  }
  if (m.ram_used > m.ram_size)
    throw ProtocolError(fmt::format("OpenSession: {} bytes of RAM in use exceed the RAM size {}", m.ram_used, m.ram_size));
  if (m.reprotect_port > 65535) throw ProtocolError(fmt::format("OpenSession: reprotect port {} out of range", m.reprotect_port));
  if (m.arbiter.empty()) throw ProtocolError("OpenSession: empty arbiter kind");
  if (m.page_size != 4096) throw ProtocolError(fmt::format("OpenSession: page size {} unsupported (4096 only)", m.page_size));
  if (m.ram_size == 0 || m.ram_size % 4096 != 0)
    throw ProtocolError(fmt::format("OpenSession: RAM size {} is not a positive multiple of 4096", m.ram_size));
  if (m.vm_name.empty()) throw ProtocolError("OpenSession: empty VM name");
}

void check(const SessionReady& m) {
  if (m.heartbeat_timeout_ms == 0) throw ProtocolError("SessionReady: heartbeat timeout 0");
}

void check(const Commit& m) {
  if (m.epoch == 0) throw ProtocolError("Commit: epoch 0 is invalid (epochs start at 1)");
  if (m.flags & ~Commit::kFinal) throw ProtocolError(fmt::format("Commit: unknown flags {:#x}", m.flags));
  if (m.page_count > (uint64_t{1} << 40) || m.devstate_bytes > (uint64_t{1} << 32))
    throw ProtocolError(fmt::format("Commit: implausible sizes ({} pages, {} device-state bytes)", m.page_count,
                                    m.devstate_bytes));
}

void check(const DiskWrite& m) {
  if (m.op == DiskOp::Write) {
    if (m.length == 0 || m.length > kMaxDiskWriteData || m.data.size() != m.length)
      throw ProtocolError(fmt::format("DiskWrite: write of {} bytes carries {} data bytes (limit {})", m.length,
                                      m.data.size(), kMaxDiskWriteData));
  } else if (!m.data.empty() || m.length == 0) {
    throw ProtocolError(fmt::format("DiskWrite: zero/trim of {} bytes carries {} data bytes", m.length, m.data.size()));
  }
  if (m.epoch == 0) throw ProtocolError("DiskWrite: epoch 0 is invalid (epochs start at 1)");
  if (m.offset + m.length < m.offset) throw ProtocolError("DiskWrite: offset + length overflows");
}

void check(const Resolve& m) {
  if (m.session_id == 0) throw ProtocolError("Resolve: session id 0");
}

// The fields of a DiskWrite with its data borrowed: walked with DiskWrite::fields, so it has
// DiskWrite's layout by construction.
struct DiskWriteRef {
  uint64_t session_id;
  uint64_t epoch;
  uint32_t disk;
  DiskOp op;
  uint64_t offset;
  uint64_t length;
  std::span<const std::byte> data;
};

template <class... T>
AnyMessage decode_alternative(uint16_t type, std::span<const std::byte> body, std::variant<T...>*) {
  std::optional<AnyMessage> out;
  const bool known = ((static_cast<uint16_t>(T::kType) == type && (out.emplace(decode<T>(body)), true)) || ...);
  (void)known;
  if (!out)
    throw ProtocolError(fmt::format("control message of unknown type {} ({} bytes); the peer runs another "
                                    "protocol version", type, body.size()));
  return std::move(*out);
}

}  // namespace

const char* to_string(MsgType t) {
  switch (t) {
    case MsgType::Invalid: return "Invalid";
    case MsgType::OpenSession: return "OpenSession";
    case MsgType::SessionReady: return "SessionReady";
    case MsgType::StagingGrow: return "StagingGrow";
    case MsgType::StagingGranted: return "StagingGranted";
    case MsgType::EpochBegin: return "EpochBegin";
    case MsgType::Commit: return "Commit";
    case MsgType::Ack: return "Ack";
    case MsgType::Activate: return "Activate";
    case MsgType::ActivateDone: return "ActivateDone";
    case MsgType::PrimaryLost: return "PrimaryLost";
    case MsgType::Disable: return "Disable";
    case MsgType::Error: return "Error";
    case MsgType::Takeover: return "Takeover";
    case MsgType::HeartbeatLink: return "HeartbeatLink";
    case MsgType::Resolve: return "Resolve";
    case MsgType::Resolution: return "Resolution";
    case MsgType::Suspect: return "Suspect";
    case MsgType::DiskWrite: return "DiskWrite";
  }
  return "Unknown";
}

const char* to_string(FailoverPolicy p) {
  switch (p) {
    case FailoverPolicy::Invalid: return "invalid";
    case FailoverPolicy::Auto: return "auto";
    case FailoverPolicy::Manual: return "manual";
  }
  return "invalid";
}

const char* to_string(Verdict v) {
  switch (v) {
    case Verdict::Invalid: return "invalid";
    case Verdict::Dropped: return "dropped";
    case Verdict::Active: return "active";
    case Verdict::Unknown: return "unknown";
  }
  return "?";
}

// ---- the one encoder and the one decoder ------------------------------------------------------

template <Message T>
std::vector<std::byte> encode(const T& m) {
  if constexpr (std::is_same_v<T, DiskWrite>) {
    return encode_disk_write(m.session_id, m.epoch, m.disk, m.op, m.offset, m.length, m.data);
  } else {
    Writer w(to_string(T::kType));
    T::fields(m, w);
    return std::move(w.out);
  }
}

std::vector<std::byte> encode_disk_write(uint64_t session_id, uint64_t epoch, uint32_t disk, DiskOp op,
                                         uint64_t offset, uint64_t length, std::span<const std::byte> data) {
  if (op == DiskOp::Write ? data.size() != length : !data.empty())
    fail("protocol: DiskWrite {} of {} bytes carries {} data bytes", static_cast<uint32_t>(op), length, data.size());
  if (data.size() > kMaxDiskWriteData)
    fail("protocol: DiskWrite data of {} bytes exceeds the {} byte limit (split it)", data.size(), kMaxDiskWriteData);
  const DiskWriteRef ref{session_id, epoch, disk, op, offset, length, data};
  Writer w("DiskWrite", 40 + data.size());
  DiskWrite::fields(ref, w);
  return std::move(w.out);
}

template <Message T>
T decode(std::span<const std::byte> body) {
  Reader r(body, to_string(T::kType));
  T m;
  T::fields(m, r);
  r.done();
  check(m);
  return m;
}

AnyMessage decode_any(uint16_t type, std::span<const std::byte> body) {
  return decode_alternative(type, body, static_cast<AnyMessage*>(nullptr));
}

// The definitions every other file links against: one line per message of AnyMessage.
#define FTVM_PROTOCOL_MESSAGE(T)                             \
  template std::vector<std::byte> encode<T>(const T&); \
  template T decode<T>(std::span<const std::byte>);
FTVM_PROTOCOL_MESSAGE(OpenSession)
FTVM_PROTOCOL_MESSAGE(SessionReady)
FTVM_PROTOCOL_MESSAGE(StagingGrow)
FTVM_PROTOCOL_MESSAGE(StagingGranted)
FTVM_PROTOCOL_MESSAGE(EpochBegin)
FTVM_PROTOCOL_MESSAGE(Commit)
FTVM_PROTOCOL_MESSAGE(Ack)
FTVM_PROTOCOL_MESSAGE(Activate)
FTVM_PROTOCOL_MESSAGE(ActivateDone)
FTVM_PROTOCOL_MESSAGE(PrimaryLost)
FTVM_PROTOCOL_MESSAGE(Disable)
FTVM_PROTOCOL_MESSAGE(ErrorMsg)
FTVM_PROTOCOL_MESSAGE(Takeover)
FTVM_PROTOCOL_MESSAGE(HeartbeatLink)
FTVM_PROTOCOL_MESSAGE(DiskWrite)
FTVM_PROTOCOL_MESSAGE(Resolve)
FTVM_PROTOCOL_MESSAGE(Resolution)
FTVM_PROTOCOL_MESSAGE(Suspect)
#undef FTVM_PROTOCOL_MESSAGE

}  // namespace ftvm::checkpoint
