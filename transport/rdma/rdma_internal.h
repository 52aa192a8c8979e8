// RDMA fabric internals shared by rdma_transport.cc (setup) and rdma_transport_datapath.cc.
#pragma once

#include <infiniband/verbs.h>
#include <rdma/rdma_cma.h>

#include <cstddef>
#include <cstdint>
#include <vector>

#include "common/error.h"
#include "transport/rdma/rdma_transport.h"

namespace ftvm::transport::rdma {

// Receive work requests carry this bit plus the buffer index; send work requests carry their
// sequence number (< 2^63).
inline constexpr uint64_t kRecvTag = 1ull << 63;

// Every verbs object of one connection, released in dependency order by the destructor
// (which tolerates a partially built set). Owns the connection's CM id and event channel.
struct RdmaConnection::Resources {
  rdma_event_channel* ch = nullptr;
  rdma_cm_id* id = nullptr;  // id->qp is the RC QP once built
  ibv_pd* pd = nullptr;
  ibv_comp_channel* cc = nullptr;
  ibv_cq* cq = nullptr;         // send and receive completions
  std::vector<std::byte> ring;  // kRingSize, registered as ring_mr
  ibv_mr* ring_mr = nullptr;
  std::vector<std::byte> recv;  // kRecvDepth buffers of kMsgSize, registered as recv_mr
  ibv_mr* recv_mr = nullptr;

  Resources() = default;
  Resources(const Resources&) = delete;
  Resources& operator=(const Resources&) = delete;
  ~Resources();
};

// A registered memory range (local region or zero-copy source); deregistered on destruction.
struct RdmaConnection::Mr {
  std::byte* base = nullptr;
  size_t len = 0;
  ibv_mr* mr = nullptr;  // null for an empty region
  Mr() = default;
  Mr(const Mr&) = delete;
  Mr& operator=(const Mr&) = delete;
  ~Mr();
};

// Header of every SEND (little-endian, 32 bytes):
//   0 u32 magic        kFrameMagic
//   4 u8  kind         MsgKind
//   5 u8  flags        Control: kFirst | kLast; others 0
//   6 u16 type         Control: message type (nonzero); others 0
//   8 u32 returned     cumulative count of receive buffers the sender reposted (credits)
//  12 u32 total        Control: whole body size (<= kMaxControlBody); others 0
//  16 u32 length       payload bytes after the header (= completion byte_len - 32)
//  20 u32 reserved     0
//  24 u64 write_bytes  cumulative RDMA WRITE bytes the sender posted before this SEND
// On an authenticated connection every SEND after the handshake messages carries a 16-byte tag
// after the payload (transport/auth.h; `length` does not count it): byte_len = 32 + length + 16.
inline constexpr size_t kMsgHeader = 32;
inline constexpr size_t kMaxFragment = kMsgSize - kMsgHeader - kFrameTagSize;
enum MsgKind : uint8_t {
  kMsgInvalid = 0,
  kMsgControl = 1,   // a fragment of a control message
  kMsgPure = 2,      // heartbeat / credit return, no payload
  kMsgAdvert = 3,    // payload: u32 id, u32 rkey, u64 addr, u64 size (24 bytes)
  kMsgWithdraw = 4,  // payload: u32 id
  kMsgGoodbye = 5,   // the sender closes on purpose, no payload
  kMsgAuthNonce = 6, // authenticated handshake: payload the sender's 32-byte nonce (untagged)
  kMsgAuthProof = 7, // authenticated handshake: payload the sender's 32-byte proof (untagged)
};
inline constexpr uint8_t kFirst = 1, kLast = 2;
inline constexpr size_t kAdvertSize = 24;

// Runs `f` under the connection's sticky-failure rule (transport/sticky_failure.h).
template <typename F>
auto RdmaConnection::guarded(F&& f) -> decltype(f()) {
  return failure_.guard(peer_, std::forward<F>(f));
}

}  // namespace ftvm::transport::rdma
