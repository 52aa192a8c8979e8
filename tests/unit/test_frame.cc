// Wire frame of the TCP fabric: encoding, validation of every header field, streaming decode.
#include <catch2/catch.hpp>
#include <fmt/format.h>
#include <xxhash.h>

#include <cstring>
#include <string>
#include <vector>

#include "common/error.h"
#include "transport/frame.h"

using namespace ftvm::transport;
using ftvm::ProtocolError;

namespace {

std::vector<std::byte> frame_bytes(const FrameHeader& h, std::span<const std::byte> payload = {}) {
  auto hdr = encode_header(h);
  std::vector<std::byte> out(hdr.size() + payload.size());
  std::memcpy(out.data(), hdr.data(), hdr.size());
  if (!payload.empty()) std::memcpy(out.data() + hdr.size(), payload.data(), payload.size());
  return out;
}

std::vector<std::byte> pattern(size_t n, unsigned seed = 1) {
  std::vector<std::byte> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = static_cast<std::byte>((i * 131 + seed * 7) & 0xFF);
  return v;
}

// Re-seals the checksum after a test edited bytes 0..27 on purpose, so that the field under
// test, not the checksum, is what the decoder rejects.
void reseal(std::vector<std::byte>& b) { put_le(b.data() + 28, XXH32(b.data(), 28, 0), 4); }

std::string decode_error(const std::vector<std::byte>& b) {
  try {
    decode_header(std::span<const std::byte, kFrameHeaderSize>(b.data(), kFrameHeaderSize));
  } catch (const ProtocolError& e) {
    return e.what();
  }
  return "";
}

}  // namespace

TEST_CASE("frame header layout is fixed little-endian", "[transport][frame]") {
  FrameHeader h{.kind = FrameKind::Write, .field = 7, .length = 4096, .offset = 0x0102030405060708ull};
  auto b = encode_header(h);
  REQUIRE(b.size() == 32);
  CHECK(std::memcmp(b.data(), "FTVM", 4) == 0);
  CHECK(get_le(b.data() + 4, 2) == kWireVersion);
  CHECK(static_cast<int>(b[6]) == 2);
  CHECK(static_cast<int>(b[7]) == 0);
  CHECK(get_le(b.data() + 8, 4) == 7);
  CHECK(get_le(b.data() + 12, 4) == 4096);
  CHECK(get_le(b.data() + 16, 8) == 0x0102030405060708ull);
  CHECK(get_le(b.data() + 24, 4) == 0);
  CHECK(get_le(b.data() + 28, 4) == XXH32(b.data(), 28, 0));
}

TEST_CASE("frame encode/decode round trip for every kind", "[transport][frame]") {
  std::vector<FrameHeader> hs = {
      {.kind = FrameKind::Hello, .length = kHelloBodySize},
      {.kind = FrameKind::Write, .field = 1, .length = 0, .offset = 0},
      {.kind = FrameKind::Write, .field = 0xFFFFFFFF, .length = kMaxWritePayload, .offset = 1ull << 40},
      {.kind = FrameKind::Control, .field = 1, .length = 0},
      {.kind = FrameKind::Control, .field = 0xFFFF, .length = static_cast<uint32_t>(kMaxControlBody)},
      {.kind = FrameKind::Heartbeat},
      {.kind = FrameKind::Goodbye},
  };
  for (const auto& h : hs) {
    auto b = encode_header(h);
    FrameHeader d = decode_header(b);
    CHECK(d.version == kWireVersion);
    CHECK(d.kind == h.kind);
    CHECK(d.flags == 0);
    CHECK(d.field == h.field);
    CHECK(d.length == h.length);
    CHECK(d.offset == h.offset);
  }
}

TEST_CASE("hello body round trip and validation", "[transport][frame]") {
  HelloBody h{.capabilities = 0x5, .max_write_payload = 12345};
  auto b = encode_hello(h);
  HelloBody d = decode_hello(b);
  CHECK(d.version == kWireVersion);
  CHECK(d.capabilities == 0x5);
  CHECK(d.max_write_payload == 12345);
  auto bad = b;
  put_le(bad.data(), 9, 2);
  try {
    decode_hello(bad);
    FAIL("accepted another version");
  } catch (const ProtocolError& e) {
    CHECK_THAT(e.what(), Catch::Contains("version 9") && Catch::Contains(fmt::format("version {}", kWireVersion)));
  }
  bad = b;
  bad[14] = std::byte{1};
  CHECK_THROWS_AS(decode_hello(bad), ProtocolError);
  CHECK_THROWS_AS(decode_hello(std::span<const std::byte>(b.data(), 15)), ProtocolError);
  bad = b;
  put_le(bad.data() + 8, 0, 4);
  CHECK_THROWS_AS(decode_hello(bad), ProtocolError);
}

// Issue 12: a peer announcing a tiny write limit would make the sender split every page into
// thousands of frames. Below kMinWritePayload the Hello is refused, naming the value.
TEST_CASE("hello with max_write_payload below the minimum is refused", "[transport][frame][security]") {
  for (uint32_t v : {1u, 512u, kMinWritePayload - 1}) {
    auto b = encode_hello(HelloBody{.max_write_payload = v});
    try {
      decode_hello(b);
      FAIL("accepted max_write_payload " << v);
    } catch (const ProtocolError& e) {
      CHECK_THAT(e.what(), Catch::Contains(std::to_string(v)) && Catch::Contains("minimum"));
    }
  }
  CHECK(decode_hello(encode_hello(HelloBody{.max_write_payload = kMinWritePayload})).max_write_payload ==
        kMinWritePayload);
}

TEST_CASE("every malformed header field is rejected with a precise message", "[transport][frame]") {
  auto good = frame_bytes({.kind = FrameKind::Write, .field = 3, .length = 16, .offset = 64});
  REQUIRE(decode_error(good).empty());

  SECTION("bad magic") {
    auto b = good;
    b[0] = std::byte{'X'};
    CHECK_THAT(decode_error(b), Catch::Contains("bad magic"));
  }
  SECTION("other version: both versions named, even with a valid checksum") {
    auto b = good;
    put_le(b.data() + 4, 1, 2);  // a peer of the release before authentication
    reseal(b);
    std::string e = decode_error(b);
    CHECK_THAT(e, Catch::Contains("version 1") && Catch::Contains(fmt::format("version {}", kWireVersion)));
  }
  SECTION("checksum mismatch (any flipped bit in bytes 0..31 outside magic/version)") {
    for (size_t byte = 6; byte < 32; ++byte) {
      auto b = good;
      b[byte] ^= std::byte{0x10};
      CHECK_FALSE(decode_error(b).empty());
    }
    auto b = good;
    b[20] ^= std::byte{1};
    CHECK_THAT(decode_error(b), Catch::Contains("checksum"));
  }
  SECTION("kind 0 (Invalid) and unknown kinds") {
    for (int k : {0, 7, 200, 255}) {
      auto b = good;
      b[6] = static_cast<std::byte>(k);
      reseal(b);
      CHECK_THAT(decode_error(b), Catch::Contains("bad kind"));
    }
  }
  SECTION("nonzero flags") {
    auto b = good;
    b[7] = std::byte{1};
    reseal(b);
    CHECK_THAT(decode_error(b), Catch::Contains("flags"));
  }
  SECTION("nonzero reserved") {
    auto b = good;
    put_le(b.data() + 24, 1, 4);
    reseal(b);
    CHECK_THAT(decode_error(b), Catch::Contains("reserved"));
  }
  SECTION("write length over the limit") {
    auto b = frame_bytes({.kind = FrameKind::Write, .field = 3, .length = kMaxWritePayload + 1});
    CHECK_THAT(decode_error(b), Catch::Contains("exceeds"));
  }
  SECTION("control body over the limit") {
    auto b = frame_bytes({.kind = FrameKind::Control, .field = 1, .length = static_cast<uint32_t>(kMaxControlBody + 1)});
    CHECK_THAT(decode_error(b), Catch::Contains("exceeds"));
  }
  SECTION("write to region 0") {
    auto b = frame_bytes({.kind = FrameKind::Write, .field = 0, .length = 1});
    CHECK_THAT(decode_error(b), Catch::Contains("region 0"));
  }
  SECTION("write whose offset + length overflows") {
    auto b = frame_bytes({.kind = FrameKind::Write, .field = 1, .length = 16, .offset = UINT64_MAX - 4});
    CHECK_THAT(decode_error(b), Catch::Contains("overflows"));
  }
  SECTION("control type 0 or > 65535, control with offset") {
    CHECK_THAT(decode_error(frame_bytes({.kind = FrameKind::Control, .field = 0})), Catch::Contains("type 0"));
    CHECK_THAT(decode_error(frame_bytes({.kind = FrameKind::Control, .field = 0x10000})), Catch::Contains("type"));
    CHECK_THAT(decode_error(frame_bytes({.kind = FrameKind::Control, .field = 1, .offset = 8})),
               Catch::Contains("offset"));
  }
  SECTION("heartbeat/goodbye with payload or fields; hello of the wrong size") {
    CHECK_FALSE(decode_error(frame_bytes({.kind = FrameKind::Heartbeat, .length = 1})).empty());
    CHECK_FALSE(decode_error(frame_bytes({.kind = FrameKind::Goodbye, .field = 1})).empty());
    CHECK_FALSE(decode_error(frame_bytes({.kind = FrameKind::Heartbeat, .offset = 1})).empty());
    CHECK_FALSE(decode_error(frame_bytes({.kind = FrameKind::Hello, .length = 8})).empty());
  }
}

TEST_CASE("FrameDecoder yields frames from arbitrary chunking", "[transport][frame]") {
  auto p1 = pattern(4096, 1);
  auto p2 = pattern(100, 2);
  std::vector<std::byte> stream;
  auto add = [&](const FrameHeader& h, std::span<const std::byte> p) {
    auto f = frame_bytes(h, p);
    stream.insert(stream.end(), f.begin(), f.end());
  };
  add({.kind = FrameKind::Write, .field = 1, .length = 4096, .offset = 8192}, p1);
  add({.kind = FrameKind::Heartbeat}, {});
  add({.kind = FrameKind::Control, .field = 42, .length = 100}, p2);
  add({.kind = FrameKind::Write, .field = 2, .length = 0}, {});

  for (size_t chunk : {size_t{1}, size_t{3}, size_t{31}, size_t{32}, size_t{33}, size_t{4096}, stream.size()}) {
    FrameDecoder dec;
    std::vector<Frame> got;
    for (size_t pos = 0; pos < stream.size(); pos += chunk) {
      std::span<const std::byte> in(stream.data() + pos, std::min(chunk, stream.size() - pos));
      while (!in.empty())
        if (auto f = dec.feed(in)) got.push_back(std::move(*f));
      CHECK(dec.buffered() <= kFrameHeaderSize + 4096);
    }
    REQUIRE(got.size() == 4);
    CHECK(dec.buffered() == 0);
    CHECK(got[0].header.kind == FrameKind::Write);
    CHECK(got[0].header.offset == 8192);
    CHECK(got[0].payload == p1);
    CHECK(got[1].header.kind == FrameKind::Heartbeat);
    CHECK(got[1].payload.empty());
    CHECK(got[2].header.field == 42);
    CHECK(got[2].payload == p2);
    CHECK(got[3].header.field == 2);
    CHECK(got[3].payload.empty());
  }
}

TEST_CASE("FrameDecoder handles the maximum write length and grows only with input", "[transport][frame]") {
  auto payload = pattern(kMaxWritePayload, 3);
  auto bytes = frame_bytes({.kind = FrameKind::Write, .field = 9, .length = kMaxWritePayload}, payload);
  FrameDecoder dec;
  std::span<const std::byte> in(bytes.data(), kFrameHeaderSize + 10);
  CHECK_FALSE(dec.feed(in).has_value());
  CHECK(dec.buffered() == kFrameHeaderSize + 10);  // no up-front allocation of 16 MiB
  in = std::span<const std::byte>(bytes.data() + kFrameHeaderSize + 10, bytes.size() - kFrameHeaderSize - 10);
  auto f = dec.feed(in);
  REQUIRE(f.has_value());
  CHECK(in.empty());
  CHECK(f->payload.size() == kMaxWritePayload);
  CHECK(f->payload == payload);
}

TEST_CASE("FrameDecoder stays failed after a malformed header", "[transport][frame]") {
  std::vector<std::byte> garbage(64, std::byte{0xAB});
  FrameDecoder dec;
  std::span<const std::byte> in(garbage);
  CHECK_THROWS_AS(dec.feed(in), ProtocolError);
  auto good = frame_bytes({.kind = FrameKind::Heartbeat});
  std::span<const std::byte> in2(good);
  CHECK_THROWS_AS(dec.feed(in2), ProtocolError);
}
