// Wire frame of the TCP fabric. (The RDMA fabric reuses FrameKind and the control-message
// encoding, not this framing: RDMA WRITEs carry no header.)
//
// Every frame is a fixed 32-byte little-endian header followed by `length` payload bytes:
//
//   offset size field
//        0    4 magic     'F' 'T' 'V' 'M' (reads as 0x4D565446 little-endian)
//        4    2 version   wire version, currently kWireVersion (3)
//        6    1 kind      FrameKind; 0 is Invalid and never sent
//        7    1 flags     must be 0 (no flags defined in version 1)
//        8    4 field     Write: region id (nonzero); Control: message type (1..65535);
//                         every other kind: 0
//       12    4 length    payload bytes; bounded per kind (max_payload())
//       16    8 offset    Write: byte offset in the region; every other kind: 0
//       24    4 reserved  must be 0
//       28    4 checksum  XXH32(seed 0) over bytes 0..27
//
// Payloads: Write = raw bytes for the region; Control = the message body (opaque to the
// transport); Hello = HelloBody (64 bytes, below); Auth = the 32-byte handshake proof
// (transport/auth.h); Heartbeat and Goodbye = empty.
//
// Authenticated connections (both Hellos announce kCapAuth; transport/auth.h): after the two
// Hello and the two Auth frames, EVERY frame in each direction is followed by a 16-byte tag
// (Poly1305 over header || payload under a per-frame key from the direction's sequence
// number). `length` does not count the tag. Unauthenticated connections (both sides run
// --insecure) carry no Auth frames and no tags. A side with a key refuses a peer without one
// and vice versa.
//
// Version history: 1 = 16-byte Hello, no authentication; 2 = 64-byte Hello with nonce and
// key id, Auth frames, per-frame tags, minimum max_write_payload; 3 = the RDMA fabric (which
// shares this version number in its CM private data) authenticates: key id in its hello,
// AuthNonce/AuthProof messages, a tag on every SEND (transport/auth.h); TCP framing as in 2.
//
// Versioning rule: magic and version stay at offsets 0 and 4 forever. Any change that an
// older receiver would misread (header layout, kind numbering, payload encodings, meaning of
// a field) bumps kWireVersion, and a receiver rejects every frame whose version differs from
// its own with a ProtocolError naming both versions, so both hosts must run the same wire
// version. Changes that an older peer may ignore are negotiated instead through capability
// bits in the Hello body, exchanged at connect time, and never change the version.
//
// Integrity: the header carries its own checksum, so a corrupted or misaligned header is
// caught before its length or offset is trusted. Against accidents, payloads need no checksum:
// TCP checksums every segment, and the replication layer puts a digest of the epoch's content
// in its commit record, which catches payload corruption end to end (including bugs on either
// host) and is what decides whether a checkpoint is applied. Against an attacker on the
// network, the per-frame tags of an authenticated connection (above) are what counts.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "transport/transport.h"

namespace ftvm::transport {

inline constexpr uint32_t kFrameMagic = 0x4D565446;  // bytes "FTVM"
inline constexpr uint16_t kWireVersion = 3;
inline constexpr size_t kFrameHeaderSize = 32;
// Largest Write payload a receiver accepts; senders split larger writes.
inline constexpr uint32_t kMaxWritePayload = 16u << 20;
// Smallest max_write_payload a Hello may announce: a peer that announced 1 byte would make the
// sender split every page into thousands of frames (a cheap denial of service).
inline constexpr uint32_t kMinWritePayload = 4096;
inline constexpr size_t kHelloBodySize = 64;
inline constexpr size_t kAuthBodySize = 32;
inline constexpr size_t kFrameTagSize = 16;
// Hello capability bits.
inline constexpr uint32_t kCapAuth = 1u << 0;     // this side has a key and requires the handshake proofs
inline constexpr uint32_t kCapEncrypt = 1u << 1;  // this side asks for encrypted payloads (needs kCapAuth)

// Frame kinds. Zero is reserved as Invalid in this and every other enum on the wire.
enum class FrameKind : uint8_t {
  Invalid = 0,
  Hello = 1,      // first frame in each direction; payload HelloBody
  Write = 2,      // one-sided write into the receiver's region `field` at `offset`
  Control = 3,    // control message of type `field`; payload = body
  Heartbeat = 4,  // proof of life, empty
  Goodbye = 5,    // the sender closes the connection on purpose, empty
  Auth = 6,       // handshake proof (authenticated connections), kAuthBodySize bytes
};

const char* kind_name(FrameKind k);

struct FrameHeader {
  uint16_t version = kWireVersion;
  FrameKind kind = FrameKind::Invalid;
  uint8_t flags = 0;
  uint32_t field = 0;
  uint32_t length = 0;
  uint64_t offset = 0;
};

// Largest payload accepted for `kind` (0 for Invalid and unknown kinds).
uint32_t max_payload(FrameKind kind);

// Writes the 32-byte header, with its checksum, into `out`. Does not validate `h`: tests use
// it to produce malformed frames on purpose.
void encode_header(const FrameHeader& h, std::span<std::byte, kFrameHeaderSize> out);
std::array<std::byte, kFrameHeaderSize> encode_header(const FrameHeader& h);

// Parses and validates a header: magic, version (equal to kWireVersion), checksum, kind,
// flags == 0, reserved == 0, length <= max_payload(kind), per-kind rules on `field` and
// `offset` (Write: region != 0 and offset + length does not overflow; Control: 1 <= type <=
// 65535; Hello: length == kHelloBodySize; others: field, offset, length all 0). Throws
// ProtocolError saying which field is wrong, its value, and what was expected. Checks magic
// and version before the checksum so that a non-ftvm peer or a peer of another version gets
// the precise message.
FrameHeader decode_header(std::span<const std::byte, kFrameHeaderSize> in);

// Hello payload: what each side announces at connect time. Layout (64 bytes LE): version u16,
// reserved u16 (0), capabilities u32, max_write_payload u32, reserved u32 (0), nonce[32],
// key_id[8], reserved[8] (0).
struct HelloBody {
  uint16_t version = kWireVersion;  // must equal the header's version
  uint32_t capabilities = 0;        // kCap* bits (unknown bits are ignored)
  uint32_t max_write_payload = kMaxWritePayload;  // largest Write payload this side accepts
  std::array<unsigned char, 32> nonce{};          // fresh random bytes (authenticated connections)
  std::array<unsigned char, 8> key_id{};          // id of this side's key (auth::Key::id), zero without one
};
std::array<std::byte, kHelloBodySize> encode_hello(const HelloBody& h);
// Throws ProtocolError on a wrong size, a version differing from kWireVersion (naming both),
// nonzero reserved bytes, or max_write_payload below kMinWritePayload.
HelloBody decode_hello(std::span<const std::byte> in);

struct Frame {
  FrameHeader header;
  std::vector<std::byte> payload;  // header.length bytes
};

// Streaming decoder over an untrusted byte stream. Feed it chunks of any size, in order; it
// yields complete frames. Memory use is bounded by one header plus the payload of the frame
// being assembled, which grows only as its bytes arrive and never beyond max_payload(kind).
// After it throws, the stream is unusable (the decoder stays failed and rethrows).
//
// Used by the handshake, the fuzz target and tests; the TCP datapath parses headers with
// decode_header() itself so that Write payloads land directly in region memory.
class FrameDecoder {
 public:
  // Consumes bytes from the front of `in` (advancing it) up to the end of at most one frame.
  // Returns the frame if one completed, nullopt if `in` was used up first. Call repeatedly
  // until `in` is empty. Throws ProtocolError on a malformed header.
  std::optional<Frame> feed(std::span<const std::byte>& in);

  // Bytes of a partial frame held (0 at a frame boundary).
  size_t buffered() const { return have_header_ ? kFrameHeaderSize + frame_.payload.size() : hdr_fill_; }

 private:
  std::array<std::byte, kFrameHeaderSize> hdr_{};
  size_t hdr_fill_ = 0;
  bool have_header_ = false;
  bool failed_ = false;
  std::string error_;
  Frame frame_;
};

// Little-endian helpers shared by the codecs.
inline void put_le(std::byte* p, uint64_t v, size_t n) {
  for (size_t i = 0; i < n; ++i) p[i] = static_cast<std::byte>(v >> (8 * i));
}
inline uint64_t get_le(const std::byte* p, size_t n) {
  uint64_t v = 0;
  for (size_t i = 0; i < n; ++i) v |= static_cast<uint64_t>(p[i]) << (8 * i);
  return v;
}

}  // namespace ftvm::transport
