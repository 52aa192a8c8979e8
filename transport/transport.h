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

#include <array>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

namespace ftvm::transport {

namespace auth {
struct Key;
}

inline constexpr size_t kMaxControlBody = 1 << 20;

struct ControlMessage {
  uint16_t type = 0;  // 0 is reserved as Invalid
  std::vector<std::byte> body;
};

// A connection to one peer. Not thread-safe: one thread uses a connection at a time (the
// session's thread); different connections are independent.
//
// Who may block: write() may block when its send queue is full, send_control() and flush()
// block until everything queued is handed to the fabric, poll() blocks up to its timeout.
// While a call blocks on sending it keeps receiving (applying inbound writes, absorbing
// heartbeats, queueing inbound control messages for later poll() calls), so two peers that
// send at each other at the same time never deadlock. A blocked send that makes no progress
// and sees nothing from the peer for Options::stall_timeout throws LinkDown.
//
// Consequently any call may apply inbound writes to registered regions. Writes the peer
// issued AFTER a control message may already be visible when poll() returns that message
// (as with RDMA); a sender must not reuse a region range until the receiver has acknowledged
// the data that was there. If the link fails in the middle of an inbound write, the bytes of
// that write's range are unspecified: trust region contents only up to the last control
// message received.
class Connection {
 public:
  virtual ~Connection() = default;

  // Makes `mem` writable by the peer as region `id` (nonzero, else ftvm::Error). Replaces an
  // earlier region of the same id (an inbound write to the old memory that is in progress is
  // discarded, never redirected). The memory must stay valid until it is replaced,
  // unregistered or the connection is destroyed. Registration cost is paid here, once per
  // region, never per write. Regions are local: the peer learns ids and sizes through the
  // session's own control messages.
  virtual void register_region(uint32_t id, std::span<std::byte> mem) = 0;

  // Stops accepting peer writes into region `id`; later writes to it are ProtocolErrors.
  // Unknown ids are ignored. After it returns the transport never touches the memory again.
  virtual void unregister_region(uint32_t id) = 0;

  // Declares `mem` as the source of many later write()s (the primary's guest RAM for the
  // sync, its epoch staging buffer). A fabric that must register memory before it can send
  // from it without a copy (RDMA: ibv_reg_mr, once, here; never per write) does so now; the
  // others have nothing to do (TCP and fake copy every write into the socket or queue anyway).
  // Purely an optimisation: write() from memory never registered is correct on every backend
  // (RDMA then copies it through its send ring). Idempotent for the same span; a span with the
  // same start and another size replaces the earlier one. `mem` must stay valid and mapped
  // until unregister_source(mem) or the connection's destruction. Throws ftvm::Error (SysError)
  // when the fabric refuses the registration (RDMA: the locked-memory limit; kernels before 6.2
  // refuse read-only mappings such as ftd's view of guest RAM): the connection stays usable
  // and writes from `mem` are copied. On a failed connection: LinkDown (see below).
  virtual void register_source(std::span<const std::byte> mem) { (void)mem; }

  // Ends register_source(mem): waits until no write in flight reads `mem`, then releases it;
  // after it returns the transport never reads `mem` again. Spans never registered are
  // ignored. On a connection that has failed it only releases; if the link fails while it
  // waits it releases and throws LinkDown. Default: nothing to do.
  virtual void unregister_source(std::span<const std::byte> mem) { (void)mem; }

  // One-sided write of `data` into the peer's region `region` (nonzero) at `offset`. Queues
  // the write and may return before the data left this host; it is ordered before any later
  // send_control(). `data` must stay valid and unchanged until the next flush() or
  // send_control() returns. Large writes may be split on the wire; the receiver sees them
  // complete no later than the next control message. A write outside the peer's region is
  // detected by the peer (ProtocolError there, the link then drops) and never applied.
  virtual void write(uint32_t region, uint64_t offset, std::span<const std::byte> data) = 0;

  // Sends control message `type` (nonzero) with `body` (<= kMaxControlBody bytes, else
  // ftvm::Error) after all earlier writes, and returns once all of it has been handed to the
  // fabric (not necessarily received). `body` need only be valid during the call.
  virtual void send_control(uint16_t type, std::span<const std::byte> body) = 0;

  // Hands every queued write to the fabric and returns; afterwards the buffers passed to
  // write() may be reused. Blocks (receiving meanwhile) while the peer is slow.
  virtual void flush() = 0;

  // Waits up to `timeout` for the next control message, applying inbound writes to local
  // regions and absorbing heartbeats meanwhile, and pushing out queued writes; sends a
  // heartbeat if this side has sent nothing for the heartbeat interval. Returns nullopt on
  // timeout (timeout 0 = only what is already there). Control messages are returned in the
  // order sent. Throws LinkDown when the link is gone (EOF, reset, peer said Goodbye) and
  // ProtocolError on malformed input; either way the connection is then unusable.
  virtual std::optional<ControlMessage> poll(std::chrono::milliseconds timeout) = 0;

  // Time since the last inbound frame of any kind (data, control or heartbeat). Stays small
  // while the peer is alive and polling; grows while the peer is silent.
  virtual std::chrono::milliseconds idle_for() const = 0;

  // Human-readable peer address (e.g. "127.0.0.1:7000", "[::1]:7000") for status and logs.
  virtual std::string peer() const = 0;
  // Backend name: "tcp", "rdma", "fake".
  virtual const char* backend() const = 0;

  // Bytes sent/received over the connection's lifetime (payload + framing).
  virtual uint64_t bytes_sent() const = 0;
  virtual uint64_t bytes_received() const = 0;

  // The id (hex) of the pre-shared key both sides proved knowledge of during the handshake,
  // "" for an unauthenticated connection (both sides --insecure). Sessions bind to it.
  virtual std::string key_id() const { return {}; }
  // "insecure", "authenticated" or "authenticated+encrypted", for logs and status.
  virtual std::string security() const { return key_id().empty() ? "insecure" : "authenticated"; }
  // The key for the keyed epoch digest (transport/auth.h, checkpoint/digest.h staged_tag()),
  // derived from this connection's handshake and the same on both sides; nullptr on an
  // unauthenticated connection. Valid as long as the connection.
  virtual const std::array<unsigned char, 32>* epoch_key() const { return nullptr; }
};

// After a Connection method throws LinkDown or ProtocolError, every later call (except the
// const accessors and the destructor) throws LinkDown restating the first failure.

struct Options {
  // This side sends a heartbeat after sending nothing for this long (while in poll() or a
  // blocked send).
  std::chrono::milliseconds heartbeat_interval{50};
  // Bound on connecting and on the Hello exchange, both directions.
  std::chrono::milliseconds connect_timeout{3000};
  // A blocked send that makes no progress while nothing arrives from the peer for this long
  // throws LinkDown (the peer is alive at the TCP level but not reading).
  std::chrono::milliseconds stall_timeout{10000};
  // Pre-shared key (transport/auth.h). With a key, the handshake proves both sides hold it and
  // every later frame is tagged; a peer without the same key is refused. Without one
  // (ftd --insecure) the connection is unauthenticated and a peer that has a key refuses it.
  // TCP and RDMA authenticate the same way (transport/auth.h).
  std::shared_ptr<const auth::Key> key;
  // Ask for encrypted payloads (needs `key`; TCP only: the RDMA fabric refuses it, and
  // transport::connect/MultiListener keep such connections on TCP). Either side asking turns it
  // on.
  bool encrypt = false;
  // Connecting side: bind the socket to this local address first ("" = the kernel picks).
  std::string source_address;
};

}  // namespace ftvm::transport
