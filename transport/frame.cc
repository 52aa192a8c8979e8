#include "transport/frame.h"

#include <xxhash.h>

#include <algorithm>
#include <cstring>
#include <limits>

#include <fmt/format.h>

#include "common/error.h"

namespace ftvm::transport {

const char* kind_name(FrameKind k) {
  switch (k) {
    case FrameKind::Invalid: return "Invalid";
    case FrameKind::Hello: return "Hello";
    case FrameKind::Write: return "Write";
    case FrameKind::Control: return "Control";
    case FrameKind::Heartbeat: return "Heartbeat";
    case FrameKind::Goodbye: return "Goodbye";
    case FrameKind::Auth: return "Auth";
  }
  return "unknown";
}

uint32_t max_payload(FrameKind kind) {
  switch (kind) {
    case FrameKind::Hello: return kHelloBodySize;
    case FrameKind::Auth: return kAuthBodySize;
    case FrameKind::Write: return kMaxWritePayload;
    case FrameKind::Control: return static_cast<uint32_t>(kMaxControlBody);
    case FrameKind::Heartbeat:
    case FrameKind::Goodbye:
    case FrameKind::Invalid: return 0;
  }
  return 0;
}

namespace {
uint32_t header_checksum(const std::byte* p) { return XXH32(p, 28, 0); }

[[noreturn]] void bad(const std::string& msg) {
  throw ProtocolError("malformed ftvm frame from peer: " + msg +
                      " (the peer is not a compatible ftd, or the stream is corrupted; the frame was "
                      "rejected and the connection must be re-established)");
}
}  // namespace

void encode_header(const FrameHeader& h, std::span<std::byte, kFrameHeaderSize> out) {
  std::byte* p = out.data();
  put_le(p + 0, kFrameMagic, 4);
  put_le(p + 4, h.version, 2);
  p[6] = static_cast<std::byte>(h.kind);
  p[7] = static_cast<std::byte>(h.flags);
  put_le(p + 8, h.field, 4);
  put_le(p + 12, h.length, 4);
  put_le(p + 16, h.offset, 8);
  put_le(p + 24, 0, 4);
  put_le(p + 28, header_checksum(p), 4);
}

std::array<std::byte, kFrameHeaderSize> encode_header(const FrameHeader& h) {
  std::array<std::byte, kFrameHeaderSize> a{};
  encode_header(h, a);
  return a;
}

FrameHeader decode_header(std::span<const std::byte, kFrameHeaderSize> in) {
  const std::byte* p = in.data();
  uint32_t magic = static_cast<uint32_t>(get_le(p, 4));
  if (magic != kFrameMagic) bad(fmt::format("bad magic {:#010x}, expected {:#010x} ('FTVM')", magic, kFrameMagic));
  FrameHeader h;
  h.version = static_cast<uint16_t>(get_le(p + 4, 2));
  if (h.version != kWireVersion)
    throw ProtocolError(fmt::format(
        "ftvm wire version mismatch: peer speaks version {}, this build speaks version {} "
        "(run the same ftvm release on both hosts)",
        h.version, kWireVersion));
  uint32_t sum = static_cast<uint32_t>(get_le(p + 28, 4));
  uint32_t want = header_checksum(p);
  if (sum != want) bad(fmt::format("header checksum {:#010x} does not match computed {:#010x}", sum, want));
  uint8_t kind = static_cast<uint8_t>(p[6]);
  h.kind = static_cast<FrameKind>(kind);
  h.flags = static_cast<uint8_t>(p[7]);
  h.field = static_cast<uint32_t>(get_le(p + 8, 4));
  h.length = static_cast<uint32_t>(get_le(p + 12, 4));
  h.offset = get_le(p + 16, 8);
  uint32_t reserved = static_cast<uint32_t>(get_le(p + 24, 4));
  if (kind == 0 || kind > static_cast<uint8_t>(FrameKind::Auth))
    bad(fmt::format("bad kind {} (valid kinds are 1..6)", kind));
  if (h.flags != 0) bad(fmt::format("{} frame has flags {:#04x}, expected 0", kind_name(h.kind), h.flags));
  if (reserved != 0) bad(fmt::format("{} frame has reserved field {:#x}, expected 0", kind_name(h.kind), reserved));
  if (h.length > max_payload(h.kind))
    bad(fmt::format("{} frame length {} exceeds the limit of {} bytes", kind_name(h.kind), h.length,
                    max_payload(h.kind)));
  switch (h.kind) {
    case FrameKind::Write:
      if (h.field == 0) bad("Write frame to region 0 (region ids are nonzero)");
      if (h.offset > std::numeric_limits<uint64_t>::max() - h.length)
        bad(fmt::format("Write frame offset {} + length {} overflows", h.offset, h.length));
      break;
    case FrameKind::Control:
      if (h.field == 0 || h.field > 0xFFFF)
        bad(fmt::format("Control frame has message type {}, expected 1..65535", h.field));
      if (h.offset != 0) bad(fmt::format("Control frame has offset {}, expected 0", h.offset));
      break;
    case FrameKind::Hello:
      if (h.length != kHelloBodySize)
        bad(fmt::format("Hello frame length {}, expected {}", h.length, kHelloBodySize));
      if (h.field != 0 || h.offset != 0)
        bad(fmt::format("{} frame has field {} offset {}, expected 0 and 0", kind_name(h.kind), h.field, h.offset));
      break;
    case FrameKind::Auth:
      if (h.length != kAuthBodySize) bad(fmt::format("Auth frame length {}, expected {}", h.length, kAuthBodySize));
      [[fallthrough]];
    default:
      if (h.field != 0 || h.offset != 0)
        bad(fmt::format("{} frame has field {} offset {}, expected 0 and 0", kind_name(h.kind), h.field, h.offset));
      break;
  }
  return h;
}

// HelloBody layout: see frame.h.
std::array<std::byte, kHelloBodySize> encode_hello(const HelloBody& h) {
  std::array<std::byte, kHelloBodySize> a{};
  put_le(a.data() + 0, h.version, 2);
  put_le(a.data() + 4, h.capabilities, 4);
  put_le(a.data() + 8, h.max_write_payload, 4);
  std::memcpy(a.data() + 16, h.nonce.data(), h.nonce.size());
  std::memcpy(a.data() + 48, h.key_id.data(), h.key_id.size());
  return a;
}

HelloBody decode_hello(std::span<const std::byte> in) {
  if (in.size() != kHelloBodySize) bad(fmt::format("Hello body of {} bytes, expected {}", in.size(), kHelloBodySize));
  HelloBody h;
  h.version = static_cast<uint16_t>(get_le(in.data(), 2));
  if (h.version != kWireVersion)
    throw ProtocolError(fmt::format(
        "ftvm wire version mismatch in Hello: peer speaks version {}, this build speaks version {} "
        "(run the same ftvm release on both hosts)",
        h.version, kWireVersion));
  if (get_le(in.data() + 2, 2) != 0 || get_le(in.data() + 12, 4) != 0 || get_le(in.data() + 56, 8) != 0)
    bad("Hello body has nonzero reserved bytes");
  h.capabilities = static_cast<uint32_t>(get_le(in.data() + 4, 4));
  h.max_write_payload = static_cast<uint32_t>(get_le(in.data() + 8, 4));
  if (h.max_write_payload < kMinWritePayload)
    bad(fmt::format("Hello announces max_write_payload {}, below the minimum of {} bytes", h.max_write_payload,
                    kMinWritePayload));
  std::memcpy(h.nonce.data(), in.data() + 16, h.nonce.size());
  std::memcpy(h.key_id.data(), in.data() + 48, h.key_id.size());
  return h;
}

std::optional<Frame> FrameDecoder::feed(std::span<const std::byte>& in) {
  if (failed_) throw ProtocolError(error_);
  try {
    if (!have_header_) {
      size_t n = std::min(in.size(), kFrameHeaderSize - hdr_fill_);
      std::memcpy(hdr_.data() + hdr_fill_, in.data(), n);
      hdr_fill_ += n;
      in = in.subspan(n);
      if (hdr_fill_ < kFrameHeaderSize) return std::nullopt;
      frame_.header = decode_header(hdr_);
      frame_.payload.clear();
      have_header_ = true;
    }
    // Grow the payload only by the bytes actually present (bounded by header.length, itself
    // bounded by max_payload()).
    size_t want = frame_.header.length - frame_.payload.size();
    size_t n = std::min(in.size(), want);
    frame_.payload.insert(frame_.payload.end(), in.begin(), in.begin() + static_cast<std::ptrdiff_t>(n));
    in = in.subspan(n);
    if (frame_.payload.size() < frame_.header.length) return std::nullopt;
    have_header_ = false;
    hdr_fill_ = 0;
    Frame out = std::move(frame_);
    frame_ = Frame{};
    return out;
  } catch (const ProtocolError& e) {
    failed_ = true;
    error_ = e.what();
    throw;
  }
}

}  // namespace ftvm::transport
