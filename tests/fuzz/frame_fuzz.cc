// Fuzz target for the TCP fabric's frame decoder: arbitrary bytes, fed in chunks whose sizes
// come from the input itself, must either decode into frames that satisfy the header
// contract or throw ProtocolError; never crash, read out of bounds or hold more memory than
// one header plus one payload within its limit.
//
// Built with -fsanitize=fuzzer under clang. Otherwise FTVM_FUZZ_REPLAY_MAIN adds a replay
// driver: random inputs and mutated valid frame streams from a fixed seed (deterministic),
// plus any files named on the command line (a libFuzzer corpus).
#include <algorithm>
#include <cstddef>
#include <filesystem>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <random>
#include <vector>

#include <xxhash.h>

#include "common/error.h"
#include "transport/frame.h"

using namespace ftvm::transport;

// Checksum fix-up: walks the input as a sequence of frames and rewrites each header's XXH32 so
// that mutated headers get past the checksum check and reach the field checks behind it.
static void fix_checksums(std::vector<uint8_t>& v) {
  size_t pos = 1;
  while (pos + kFrameHeaderSize <= v.size()) {
    uint32_t sum = XXH32(v.data() + pos, 28, 0);
    std::memcpy(v.data() + pos + 28, &sum, 4);  // little-endian hosts (x86_64)
    uint32_t len;
    std::memcpy(&len, v.data() + pos + 12, 4);
    pos += kFrameHeaderSize + std::min<size_t>(len, v.size());
  }
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* raw, size_t size) {
  if (size == 0) return 0;
  // Odd first byte: fix the header checksums up (most mutations then pass the checksum).
  std::vector<uint8_t> copy(raw, raw + size);
  if (copy[0] & 1) fix_checksums(copy);
  const uint8_t* data = copy.data();
  // First byte picks the chunk size (1..256) so that split headers and payloads are covered.
  size_t chunk = static_cast<size_t>(data[0]) + 1;
  std::span<const std::byte> all(reinterpret_cast<const std::byte*>(data) + 1, size - 1);
  FrameDecoder dec;
  try {
    while (!all.empty()) {
      size_t n = std::min(chunk, all.size());
      std::span<const std::byte> in = all.first(n);
      all = all.subspan(n);
      while (!in.empty()) {
        auto f = dec.feed(in);
        if (dec.buffered() > kFrameHeaderSize + kMaxWritePayload) std::abort();
        if (!f) continue;
        const FrameHeader& h = f->header;
        if (h.version != kWireVersion || h.flags != 0 || h.kind == FrameKind::Invalid) std::abort();
        if (f->payload.size() != h.length || h.length > max_payload(h.kind)) std::abort();
        if (h.kind == FrameKind::Write && (h.field == 0 || h.offset + h.length < h.offset)) std::abort();
        if (h.kind == FrameKind::Hello) (void)decode_hello(f->payload);
        // Re-encoding a decoded header reproduces its bytes.
        auto again = encode_header(h);
        if (decode_header(again).length != h.length) std::abort();
      }
    }
  } catch (const ftvm::ProtocolError&) {
    // Rejected input: the expected outcome for most of it.
  }
  return 0;
}

#ifdef FTVM_FUZZ_REPLAY_MAIN
namespace {
std::vector<uint8_t> valid_stream(std::mt19937_64& rng) {
  std::vector<uint8_t> out;
  out.push_back(static_cast<uint8_t>(rng()));  // chunk selector
  int frames = 1 + static_cast<int>(rng() % 6);
  for (int i = 0; i < frames; ++i) {
    FrameHeader h;
    std::vector<uint8_t> payload;
    switch (rng() % 5) {
      case 0: {
        h.kind = FrameKind::Hello;
        h.length = kHelloBodySize;
        auto b = encode_hello(HelloBody{});
        for (auto x : b) payload.push_back(static_cast<uint8_t>(x));
        break;
      }
      case 1:
        h.kind = FrameKind::Write;
        h.field = 1 + static_cast<uint32_t>(rng() % 4);
        h.offset = rng() % (1u << 30);
        h.length = static_cast<uint32_t>(rng() % 9000);
        break;
      case 2:
        h.kind = FrameKind::Control;
        h.field = 1 + static_cast<uint32_t>(rng() % 0xFFFF);
        h.length = static_cast<uint32_t>(rng() % 3000);
        break;
      case 3: h.kind = FrameKind::Heartbeat; break;
      default: h.kind = FrameKind::Goodbye; break;
    }
    if (payload.empty()) payload.resize(h.length, static_cast<uint8_t>(rng()));
    auto hdr = encode_header(h);
    for (auto x : hdr) out.push_back(static_cast<uint8_t>(x));
    out.insert(out.end(), payload.begin(), payload.end());
  }
  return out;
}

void mutate(std::vector<uint8_t>& v, std::mt19937_64& rng) {
  int edits = static_cast<int>(rng() % 4);
  for (int i = 0; i < edits && !v.empty(); ++i) {
    size_t at = rng() % v.size();
    switch (rng() % 4) {
      case 0: v[at] ^= static_cast<uint8_t>(1u << (rng() % 8)); break;
      case 1: v[at] = static_cast<uint8_t>(rng()); break;
      case 2: v.resize(at); break;  // truncate
      default: v.insert(v.begin() + static_cast<std::ptrdiff_t>(at), static_cast<uint8_t>(rng())); break;
    }
  }
}
}  // namespace

// Usage: frame_fuzz_replay [ITERATIONS] [CORPUS_FILE_OR_DIR...]
int main(int argc, char** argv) {
  long iterations = argc > 1 ? std::strtol(argv[1], nullptr, 10) : 20000;
  for (int i = 2; i < argc; ++i) {  // corpus files, or directories of them
    std::vector<std::filesystem::path> files;
    if (std::filesystem::is_directory(argv[i])) {
      for (const auto& e : std::filesystem::directory_iterator(argv[i]))
        if (e.is_regular_file()) files.push_back(e.path());
      std::sort(files.begin(), files.end());
    } else {
      files.push_back(argv[i]);
    }
    for (const auto& p : files) {
      std::ifstream f(p, std::ios::binary);
      std::vector<uint8_t> v((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
      LLVMFuzzerTestOneInput(v.data(), v.size());
    }
  }
  std::mt19937_64 rng(0x46545646);  // fixed seed: failures reproduce
  for (long i = 0; i < iterations; ++i) {
    std::vector<uint8_t> v;
    if (i % 4 == 0) {
      v.resize(rng() % 512);
      for (auto& x : v) x = static_cast<uint8_t>(rng());
    } else {
      v = valid_stream(rng);
      if (i % 4 != 1) mutate(v, rng);
    }
    LLVMFuzzerTestOneInput(v.data(), v.size());
  }
  return 0;
}
#endif
