// Fuzz target: the output-commit stream parser (tools/ftd/output_buffer.h RedirParser), fed by
// QEMU's filter-redirector with the guest's frames. First byte: bit 0 = vnet header support,
// the rest picks the chunk size. Every frame it yields satisfies the framing limits; a violation
// is a ProtocolError after which the parser stays failed.
#include <cstdint>
#include <cstdlib>
#include <span>
#include <vector>

#include "common/error.h"
#include "tools/ftd/output_buffer.h"

using namespace ftvm::ftd;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const bool vnet = data[0] & 1;
  const size_t chunk = (data[0] >> 1) + 1;
  RedirParser p("fuzz", vnet);
  std::span<const std::byte> all(reinterpret_cast<const std::byte*>(data) + 1, size - 1);
  std::vector<RedirFrame> out;
  bool failed = false;
  while (!all.empty()) {
    auto n = std::min(chunk, all.size());
    try {
      p.feed(all.first(n), out);
    } catch (const ftvm::ProtocolError&) {
      failed = true;
      break;
    }
    all = all.subspan(n);
  }
  for (const auto& f : out) {
    if (f.data.empty() || f.data.size() > kMaxFrame + f.vnet_hdr_len || f.vnet_hdr_len > kMaxVnetHdr ||
        f.vnet_hdr_len > f.data.size() || (!vnet && f.vnet_hdr_len))
      std::abort();
    auto enc = encode_redir_frame(f, vnet);
    RedirParser q("again", vnet);
    std::vector<RedirFrame> back;
    q.feed(enc, back);
    if (back.size() != 1 || back[0].data != f.data) std::abort();
  }
  if (failed) {
    try {
      p.feed({}, out);
      std::abort();  // a failed parser must stay failed
    } catch (const ftvm::ProtocolError&) {
    }
  }
  return 0;
}
