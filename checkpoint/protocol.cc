#include "checkpoint/protocol.h"

#include <algorithm>
#include <cstring>

#include "common/error.h"

namespace ftvm::checkpoint {
namespace {

constexpr size_t kMaxString = 64 * 1024;
constexpr size_t kMaxArgs = 4096;

class Writer {
 public:
  void u16(uint16_t v) { put(v, 2); }
  void u32(uint32_t v) { put(v, 4); }
  void u64(uint64_t v) { put(v, 8); }
  void str(const std::string& s, size_t limit = kMaxString) {
    if (s.size() > limit) fail("protocol: string of {} bytes exceeds the {} byte limit", s.size(), limit);
    u32(static_cast<uint32_t>(s.size()));
    for (char c : s) out.push_back(static_cast<std::byte>(c));
  }
  std::vector<std::byte> out;

 private:
  void put(uint64_t v, int n) {
    for (int i = 0; i < n; i++) out.push_back(static_cast<std::byte>((v >> (8 * i)) & 0xff));
  }
};

class Reader {
 public:
  Reader(std::span<const std::byte> b, const char* what) : b_(b), what_(what) {}
  uint16_t u16() { return static_cast<uint16_t>(get(2)); }
  uint32_t u32() { return static_cast<uint32_t>(get(4)); }
  uint64_t u64() { return get(8); }
  std::string str(size_t limit = kMaxString) {
    uint32_t n = u32();
    if (n > limit) throw ProtocolError(fmt::format("{}: string length {} exceeds limit {}", what_, n, limit));
    need(n);
    std::string s(reinterpret_cast<const char*>(b_.data() + pos_), n);
    pos_ += n;
    return s;
  }
  template <size_t N>
  std::array<std::byte, N> fixed() {
    need(N);
    std::array<std::byte, N> a;
    std::memcpy(a.data(), b_.data() + pos_, N);
    pos_ += N;
    return a;
  }
  // The bytes not read yet (consumed).
  std::span<const std::byte> rest() {
    auto r = b_.subspan(pos_);
    pos_ = b_.size();
    return r;
  }
  void done() const {
    if (pos_ != b_.size())
      throw ProtocolError(fmt::format("{}: {} unexpected trailing bytes", what_, b_.size() - pos_));
  }

 private:
  void need(size_t n) const {
    if (b_.size() - pos_ < n)
      throw ProtocolError(fmt::format("{}: message truncated ({} bytes, needed {} more at offset {})", what_,
                                      b_.size(), n, pos_));
  }
  uint64_t get(int n) {
    need(static_cast<size_t>(n));
    uint64_t v = 0;
    for (int i = 0; i < n; i++) v |= static_cast<uint64_t>(b_[pos_ + i]) << (8 * i);
    pos_ += static_cast<size_t>(n);
    return v;
  }
  std::span<const std::byte> b_;
  size_t pos_ = 0;
  const char* what_;
};

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

std::vector<std::byte> encode(const OpenSession& m) {
  Writer w;
  w.u32(m.version);
  w.u64(m.session_id);
  w.u64(m.ram_size);
  w.u32(m.page_size);
  w.str(m.vm_name);
  if (m.qemu_argv.size() > kMaxArgs) fail("protocol: {} QEMU arguments exceed the limit {}", m.qemu_argv.size(), kMaxArgs);
  w.u32(static_cast<uint32_t>(m.qemu_argv.size()));
  for (const auto& a : m.qemu_argv) w.str(a);
  if (m.disks.size() > kMaxDisks) fail("protocol: {} disks exceed the limit {}", m.disks.size(), kMaxDisks);
  w.u32(static_cast<uint32_t>(m.disks.size()));
  for (const auto& d : m.disks) {
    w.str(d.id);
    w.str(d.source);
    w.u64(d.size);
  }
  w.str(m.libvirt_xml, kMaxDomainXml);
  w.str(m.arbiter);
  w.u32(m.reprotect_port);
  w.str(m.second_path_host);
  w.u64(m.ram_used);
  w.u32(static_cast<uint32_t>(m.failover));
  w.str(m.origin);
  w.str(m.history, kMaxHistory);
  return std::move(w.out);
}
template <> OpenSession decode<OpenSession>(std::span<const std::byte> b) {
  Reader r(b, "OpenSession");
  OpenSession m;
  m.version = r.u32();
  if (m.version != kProtocolVersion)
    throw ProtocolError(fmt::format("protocol version {} not supported (this ftd speaks {}); run the same ftvm "
                                    "version on both hosts", m.version, kProtocolVersion));
  m.session_id = r.u64();
  m.ram_size = r.u64();
  m.page_size = r.u32();
  m.vm_name = r.str();
  uint32_t n = r.u32();
  if (n > kMaxArgs) throw ProtocolError(fmt::format("OpenSession: {} arguments exceed limit {}", n, kMaxArgs));
  for (uint32_t i = 0; i < n; i++) m.qemu_argv.push_back(r.str());
  uint32_t nd = r.u32();
  if (nd > kMaxDisks) throw ProtocolError(fmt::format("OpenSession: {} disks exceed limit {}", nd, kMaxDisks));
  for (uint32_t i = 0; i < nd; i++) {
    DiskInfo d;
    d.id = r.str();
    d.source = r.str();
    d.size = r.u64();
    if (d.source.empty() || d.size == 0 || d.size % 512 != 0)
      throw ProtocolError(fmt::format("OpenSession: disk {} ('{}', '{}') has size {} (must be a positive multiple "
                                      "of 512) or no source", i, d.id, d.source, d.size));
    m.disks.push_back(std::move(d));
  }
  m.libvirt_xml = r.str(kMaxDomainXml);
  m.arbiter = r.str(64);
  m.reprotect_port = r.u32();
  m.second_path_host = r.str(64);
  m.ram_used = r.u64();
  m.failover = static_cast<FailoverPolicy>(r.u32());
  m.origin = r.str(256);
  m.history = r.str(kMaxHistory);
  r.done();
  if (m.ram_used > m.ram_size)
    throw ProtocolError(fmt::format("OpenSession: {} bytes of RAM in use exceed the RAM size {}", m.ram_used, m.ram_size));
  if (m.failover != FailoverPolicy::Auto && m.failover != FailoverPolicy::Manual)
    throw ProtocolError(fmt::format("OpenSession: failover policy {} unknown (1 auto, 2 manual)",
                                    static_cast<uint32_t>(m.failover)));
  if (m.reprotect_port > 65535) throw ProtocolError(fmt::format("OpenSession: reprotect port {} out of range", m.reprotect_port));
  if (m.arbiter.empty()) throw ProtocolError("OpenSession: empty arbiter kind");
  if (m.page_size != 4096) throw ProtocolError(fmt::format("OpenSession: page size {} unsupported (4096 only)", m.page_size));
  if (m.ram_size == 0 || m.ram_size % 4096 != 0)
    throw ProtocolError(fmt::format("OpenSession: RAM size {} is not a positive multiple of 4096", m.ram_size));
  if (m.vm_name.empty()) throw ProtocolError("OpenSession: empty VM name");
  return m;
}

std::vector<std::byte> encode(const SessionReady& m) {
  Writer w;
  w.u64(m.session_id);
  w.u64(m.staging_capacity);
  w.u64(static_cast<uint64_t>(m.twin_pid));
  w.u32(m.heartbeat_timeout_ms);
  return std::move(w.out);
}
template <> SessionReady decode<SessionReady>(std::span<const std::byte> b) {
  Reader r(b, "SessionReady");
  SessionReady m;
  m.session_id = r.u64();
  m.staging_capacity = r.u64();
  m.twin_pid = static_cast<int64_t>(r.u64());
  m.heartbeat_timeout_ms = r.u32();
  r.done();
  if (m.heartbeat_timeout_ms == 0) throw ProtocolError("SessionReady: heartbeat timeout 0");
  return m;
}

std::vector<std::byte> encode(const StagingGrow& m) {
  Writer w;
  w.u64(m.session_id);
  w.u64(m.bytes);
  return std::move(w.out);
}
template <> StagingGrow decode<StagingGrow>(std::span<const std::byte> b) {
  Reader r(b, "StagingGrow");
  StagingGrow m;
  m.session_id = r.u64();
  m.bytes = r.u64();
  r.done();
  return m;
}

std::vector<std::byte> encode(const StagingGranted& m) {
  Writer w;
  w.u64(m.session_id);
  w.u64(m.capacity);
  return std::move(w.out);
}
template <> StagingGranted decode<StagingGranted>(std::span<const std::byte> b) {
  Reader r(b, "StagingGranted");
  StagingGranted m;
  m.session_id = r.u64();
  m.capacity = r.u64();
  r.done();
  return m;
}

std::vector<std::byte> encode(const EpochBegin& m) {
  Writer w;
  w.u64(m.session_id);
  w.u64(m.epoch);
  w.u64(m.bytes);
  return std::move(w.out);
}
template <> EpochBegin decode<EpochBegin>(std::span<const std::byte> b) {
  Reader r(b, "EpochBegin");
  EpochBegin m;
  m.session_id = r.u64();
  m.epoch = r.u64();
  m.bytes = r.u64();
  r.done();
  return m;
}

std::vector<std::byte> encode(const Commit& m) {
  Writer w;
  w.u64(m.session_id);
  w.u64(m.epoch);
  w.u64(m.page_count);
  w.u64(m.devstate_bytes);
  w.u64(m.staged_digest);
  w.u64(m.ram_digest);
  w.u32(m.flags);
  w.u64(m.disk_ops);
  w.u64(m.disk_digest);
  w.out.insert(w.out.end(), m.staged_tag.begin(), m.staged_tag.end());
  return std::move(w.out);
}
template <> Commit decode<Commit>(std::span<const std::byte> b) {
  Reader r(b, "Commit");
  Commit m;
  m.session_id = r.u64();
  m.epoch = r.u64();
  m.page_count = r.u64();
  m.devstate_bytes = r.u64();
  m.staged_digest = r.u64();
  m.ram_digest = r.u64();
  m.flags = r.u32();
  m.disk_ops = r.u64();
  m.disk_digest = r.u64();
  m.staged_tag = r.fixed<16>();
  r.done();
  if (m.epoch == 0) throw ProtocolError("Commit: epoch 0 is invalid (epochs start at 1)");
  if (m.flags & ~Commit::kFinal) throw ProtocolError(fmt::format("Commit: unknown flags {:#x}", m.flags));
  if (m.page_count > (uint64_t{1} << 40) || m.devstate_bytes > (uint64_t{1} << 32))
    throw ProtocolError(fmt::format("Commit: implausible sizes ({} pages, {} device-state bytes)", m.page_count,
                                    m.devstate_bytes));
  return m;
}

std::vector<std::byte> encode(const Ack& m) {
  Writer w;
  w.u64(m.session_id);
  w.u64(m.epoch);
  w.u32(static_cast<uint32_t>(m.status));
  w.str(m.reason);
  return std::move(w.out);
}
template <> Ack decode<Ack>(std::span<const std::byte> b) {
  Reader r(b, "Ack");
  Ack m;
  m.session_id = r.u64();
  m.epoch = r.u64();
  uint32_t s = r.u32();
  if (s != 1 && s != 2) throw ProtocolError(fmt::format("Ack: invalid status {}", s));
  m.status = static_cast<AckStatus>(s);
  m.reason = r.str();
  r.done();
  return m;
}

std::vector<std::byte> encode(const Activate& m) {
  Writer w;
  w.u64(m.session_id);
  return std::move(w.out);
}
template <> Activate decode<Activate>(std::span<const std::byte> b) {
  Reader r(b, "Activate");
  Activate m;
  m.session_id = r.u64();
  r.done();
  return m;
}

std::vector<std::byte> encode(const ActivateDone& m) {
  Writer w;
  w.u64(m.session_id);
  w.u32(m.ok);
  w.str(m.text);
  return std::move(w.out);
}
template <> ActivateDone decode<ActivateDone>(std::span<const std::byte> b) {
  Reader r(b, "ActivateDone");
  ActivateDone m;
  m.session_id = r.u64();
  m.ok = r.u32();
  m.text = r.str();
  r.done();
  return m;
}

std::vector<std::byte> encode(const PrimaryLost& m) {
  Writer w;
  w.u64(m.session_id);
  w.str(m.reason);
  return std::move(w.out);
}
template <> PrimaryLost decode<PrimaryLost>(std::span<const std::byte> b) {
  Reader r(b, "PrimaryLost");
  PrimaryLost m;
  m.session_id = r.u64();
  m.reason = r.str();
  r.done();
  return m;
}

std::vector<std::byte> encode(const Disable& m) {
  Writer w;
  w.u64(m.session_id);
  return std::move(w.out);
}
template <> Disable decode<Disable>(std::span<const std::byte> b) {
  Reader r(b, "Disable");
  Disable m;
  m.session_id = r.u64();
  r.done();
  return m;
}

std::vector<std::byte> encode(const ErrorMsg& m) {
  Writer w;
  w.str(m.text);
  return std::move(w.out);
}
template <> ErrorMsg decode<ErrorMsg>(std::span<const std::byte> b) {
  Reader r(b, "Error");
  ErrorMsg m;
  m.text = r.str();
  r.done();
  return m;
}

std::vector<std::byte> encode(const Takeover& m) {
  Writer w;
  w.u64(m.session_id);
  w.str(m.reason);
  return std::move(w.out);
}
template <> Takeover decode<Takeover>(std::span<const std::byte> b) {
  Reader r(b, "Takeover");
  Takeover m;
  m.session_id = r.u64();
  m.reason = r.str();
  r.done();
  return m;
}

std::vector<std::byte> encode(const HeartbeatLink& m) {
  Writer w;
  w.u64(m.session_id);
  return std::move(w.out);
}
template <> HeartbeatLink decode<HeartbeatLink>(std::span<const std::byte> b) {
  Reader r(b, "HeartbeatLink");
  HeartbeatLink m;
  m.session_id = r.u64();
  r.done();
  return m;
}

std::vector<std::byte> encode_disk_write(uint64_t session_id, uint64_t epoch, uint32_t disk, DiskOp op,
                                         uint64_t offset, uint64_t length, std::span<const std::byte> data) {
  if (op == DiskOp::Write ? data.size() != length : !data.empty())
    fail("protocol: DiskWrite {} of {} bytes carries {} data bytes", static_cast<uint32_t>(op), length, data.size());
  if (data.size() > kMaxDiskWriteData)
    fail("protocol: DiskWrite data of {} bytes exceeds the {} byte limit (split it)", data.size(), kMaxDiskWriteData);
  Writer w;
  w.out.reserve(44 + data.size());
  w.u64(session_id);
  w.u64(epoch);
  w.u32(disk);
  w.u32(static_cast<uint32_t>(op));
  w.u64(offset);
  w.u64(length);
  w.out.insert(w.out.end(), data.begin(), data.end());
  return std::move(w.out);
}
std::vector<std::byte> encode(const DiskWrite& m) {
  return encode_disk_write(m.session_id, m.epoch, m.disk, m.op, m.offset, m.length, m.data);
}
template <> DiskWrite decode<DiskWrite>(std::span<const std::byte> b) {
  Reader r(b, "DiskWrite");
  DiskWrite m;
  m.session_id = r.u64();
  m.epoch = r.u64();
  m.disk = r.u32();
  const uint32_t op = r.u32();
  m.offset = r.u64();
  m.length = r.u64();
  const auto data = r.rest();
  if (op < 1 || op > 3) throw ProtocolError(fmt::format("DiskWrite: invalid operation {}", op));
  m.op = static_cast<DiskOp>(op);
  if (m.op == DiskOp::Write) {
    if (m.length == 0 || m.length > kMaxDiskWriteData || data.size() != m.length)
      throw ProtocolError(fmt::format("DiskWrite: write of {} bytes carries {} data bytes (limit {})", m.length,
                                      data.size(), kMaxDiskWriteData));
    m.data.assign(data.begin(), data.end());
  } else if (!data.empty() || m.length == 0) {
    throw ProtocolError(fmt::format("DiskWrite: zero/trim of {} bytes carries {} data bytes", m.length, data.size()));
  }
  if (m.epoch == 0) throw ProtocolError("DiskWrite: epoch 0 is invalid (epochs start at 1)");
  if (m.offset + m.length < m.offset) throw ProtocolError("DiskWrite: offset + length overflows");
  return m;
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

std::vector<std::byte> encode(const Suspect& m) {
  Writer w;
  w.u64(m.session_id);
  w.u32(m.silent_ms);
  return std::move(w.out);
}
template <> Suspect decode<Suspect>(std::span<const std::byte> b) {
  Reader r(b, "Suspect");
  Suspect m;
  m.session_id = r.u64();
  m.silent_ms = r.u32();
  r.done();
  return m;
}

std::vector<std::byte> encode(const Resolve& m) {
  Writer w;
  w.u64(m.session_id);
  w.str(m.vm_name);
  return std::move(w.out);
}
template <> Resolve decode<Resolve>(std::span<const std::byte> b) {
  Reader r(b, "Resolve");
  Resolve m;
  m.session_id = r.u64();
  m.vm_name = r.str();
  r.done();
  if (m.session_id == 0) throw ProtocolError("Resolve: session id 0");
  return m;
}

std::vector<std::byte> encode(const Resolution& m) {
  Writer w;
  w.u64(m.session_id);
  w.u32(static_cast<uint32_t>(m.verdict));
  w.str(m.text);
  return std::move(w.out);
}
template <> Resolution decode<Resolution>(std::span<const std::byte> b) {
  Reader r(b, "Resolution");
  Resolution m;
  m.session_id = r.u64();
  const uint32_t v = r.u32();
  m.text = r.str();
  r.done();
  if (v < 1 || v > 3) throw ProtocolError(fmt::format("Resolution: invalid verdict {}", v));
  m.verdict = static_cast<Verdict>(v);
  return m;
}

}  // namespace ftvm::checkpoint
