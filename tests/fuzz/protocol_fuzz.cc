// Fuzz target: every message decoder of the replication protocol (checkpoint/protocol.h).
// The first byte picks the message type; the rest is the body. A decoder must either throw
// ProtocolError or return a message that encodes and decodes again to the same bytes (no other
// exception, no crash, no unbounded allocation).
#include <cstdint>
#include <cstdlib>
#include <span>
#include <vector>

#include "checkpoint/protocol.h"
#include "common/error.h"

using namespace ftvm::checkpoint;

namespace {

template <typename T>
void roundtrip(std::span<const std::byte> body) {
  T m;
  try {
    m = decode<T>(body);
  } catch (const ftvm::ProtocolError&) {
    return;  // rejected: expected for most inputs
  }
  const auto again = encode(m);  // a decoded message must be encodable (same limits both ways)
  const T m2 = decode<T>(again);
  if (encode(m2) != again) std::abort();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  std::span<const std::byte> body(reinterpret_cast<const std::byte*>(data) + 1, size - 1);
  switch (data[0] % 15) {
    case 0: roundtrip<OpenSession>(body); break;
    case 1: roundtrip<SessionReady>(body); break;
    case 2: roundtrip<StagingGrow>(body); break;
    case 3: roundtrip<StagingGranted>(body); break;
    case 4: roundtrip<EpochBegin>(body); break;
    case 5: roundtrip<Commit>(body); break;
    case 6: roundtrip<Ack>(body); break;
    case 7: roundtrip<Activate>(body); break;
    case 8: roundtrip<ActivateDone>(body); break;
    case 9: roundtrip<PrimaryLost>(body); break;
    case 10: roundtrip<Disable>(body); break;
    case 11: roundtrip<ErrorMsg>(body); break;
    case 12: roundtrip<Takeover>(body); break;
    case 13: roundtrip<HeartbeatLink>(body); break;
    default: roundtrip<DiskWrite>(body); break;
  }
  (void)to_string(static_cast<MsgType>(data[0]));
  return 0;
}
