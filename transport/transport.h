// Transport: how checkpoints move between the primary's and the standby's ftd.
//
// Model (RDMA-shaped; TCP emulates it):
//  * Each side may register local memory regions, identified by a small nonzero id, that the
//    peer is allowed to write into with one-sided writes. The receiver decides the region's
//    size; a write outside it is a protocol error on the receiving side and the write is
//    dropped whole (the region is never written out of bounds).
//  * Control messages: small typed messages (type != 0, body <= kMaxControlBody bytes),
//    reliable and delivered in order with respect to each other AND to one-sided writes
//    issued before them on the same connection: when the receiver sees a control message,
//    every write the sender issued before it is complete in the receiver's memory. The
//    replication protocol relies on this to publish "epoch N is staged" with a commit record.
//  * Heartbeats: the transport sends one whenever the sender has been idle for the heartbeat
//    interval, and counts any inbound frame as proof of life. `idle_for()` tells the session
//    how long the peer has been silent; the session decides what silence means.
//  * Failure: any broken link (EOF, reset, error completion, QP error) surfaces as
//    ftvm::LinkDown from the next call; malformed input from the peer as ftvm::ProtocolError.
//    After either, the connection is unusable and must be destroyed.
//
// Setup (listening, connecting, handshakes) is separate from the data path: see
// `Listener`/`connect_*` in each backend's folder (transport/tcp/ now, transport/rdma/ later).
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

namespace ftvm::transport {

inline constexpr size_t kMaxControlBody = 1 << 20;

struct ControlMessage {
  uint16_t type = 0;  // 0 is reserved as Invalid
  std::vector<std::byte> body;
};

class Connection {
 public:
  virtual ~Connection() = default;

  // Makes `mem` writable by the peer as region `id` (nonzero). Replaces an earlier region of
  // the same id. The memory must stay valid until it is replaced or the connection closes.
  // Registration cost is paid here, once per region, never per write.
  virtual void register_region(uint32_t id, std::span<std::byte> mem) = 0;
  virtual void unregister_region(uint32_t id) = 0;

  // One-sided write of `data` into the peer's region `region` at `offset`. May return before
  // the data left this host; it is ordered before any later send_control(). `data` must stay
  // valid until the next flush() or send_control() returns.
  virtual void write(uint32_t region, uint64_t offset, std::span<const std::byte> data) = 0;

  // Sends a control message after all earlier writes.
  virtual void send_control(uint16_t type, std::span<const std::byte> body) = 0;

  // Waits up to `timeout` for the next control message, applying inbound writes to local
  // regions and absorbing heartbeats meanwhile; sends a heartbeat if this side has been idle
  // for the heartbeat interval. Returns nullopt on timeout.
  virtual std::optional<ControlMessage> poll(std::chrono::milliseconds timeout) = 0;

  // Time since the last inbound frame of any kind.
  virtual std::chrono::milliseconds idle_for() const = 0;

  // Human-readable peer address and backend name ("tcp", "rdma") for status and logs.
  virtual std::string peer() const = 0;
  virtual const char* backend() const = 0;

  // Bytes sent/received over the connection's lifetime (payload + framing).
  virtual uint64_t bytes_sent() const = 0;
  virtual uint64_t bytes_received() const = 0;
};

struct Options {
  std::chrono::milliseconds heartbeat_interval{50};
  std::chrono::milliseconds connect_timeout{3000};
};

}  // namespace ftvm::transport
