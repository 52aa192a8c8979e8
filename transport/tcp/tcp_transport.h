// TCP fabric: the Connection interface over one TCP stream of frames (transport/frame.h).
//
// Setup (tcp_transport.cc): Listener, connect_tcp(), the Hello exchange, socket options.
// Data path (tcp_transport_datapath.cc): TcpConnection's write/send_control/flush/poll.
//
// Emulating the RDMA model on a byte stream:
//  * write() queues a Write frame header plus an iovec pointing at the caller's data (no
//    copy); queued frames go out with sendmsg() scatter-gather, in order, when the queue is
//    large, on flush()/send_control(), and opportunistically in poll(). Writes larger than
//    the peer's announced limit are split into several Write frames.
//  * The receiver validates each Write header against its registered regions BEFORE taking
//    any payload byte, then reads the payload straight into region memory (readv() with the
//    region as the first iovec and the receive buffer as the second), so large writes are not
//    copied in user space; small ones that arrived together with headers are copied once.
//  * The stream keeps writes and control messages in order, which gives the ordering
//    guarantee of transport.h for free.
//  * The socket is non-blocking; blocking calls wait with ppoll() and drain inbound data
//    while they wait (see "Who may block" in transport.h). Inbound control messages received
//    while a send is blocked are queued, up to kMaxPendingControlBytes; beyond that this
//    side stops reading until poll() consumes them.
//  * TCP_NODELAY, SO_KEEPALIVE (5 s idle, 1 s interval, 5 probes) and TCP_USER_TIMEOUT =
//    stall_timeout, so a vanished host surfaces as LinkDown even without traffic from us.
//  * Authentication (Options::key; transport/auth.h): the handshake adds two Auth frames after
//    the Hellos; every later frame carries a 16-byte tag after its payload, computed as the
//    frame is queued (header, then payload as sent) and checked as it arrives (the tag is
//    updated with each payload chunk wherever it lands, so zero-copy receive stays). A Write's
//    bytes reach the region before its tag is checked: a bad tag fails the connection before
//    any later control message is delivered, and region contents are only trusted up to the
//    last control message (transport.h). The sender copies each payload into a buffer of its
//    own while computing the tag (pre-copy writes live guest RAM that may change before the
//    kernel reads it: the tag must cover exactly the bytes sent); with encryption that copy is
//    the encryption. The receiver decrypts in place after the tag checks.
#pragma once

#include <sys/uio.h>

#include <chrono>
#include <cstdint>
#include <deque>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "common/fd.h"
#include "transport/auth.h"
#include "transport/frame.h"
#include "transport/sticky_failure.h"
#include "transport/transport.h"

namespace ftvm::transport::tcp {

struct HostPort {
  std::string host;
  uint16_t port = 0;
};

// Splits "host:port", "1.2.3.4:port" or "[v6addr]:port" (port 0..65535). Throws ftvm::Error
// naming the text and the expected form when it does not parse.
HostPort parse_host_port(std::string_view text);

// A listening TCP socket that yields handshaken Connections.
class Listener {
 public:
  // Binds `host`:`port` and listens. `host` is an IPv4 or IPv6 literal or a name (the first
  // resolved address that binds wins); "" or "*" means every address (IPv6 dual-stack, or
  // IPv4 where IPv6 is unavailable). Port 0 picks an ephemeral port: see bound_port(). Throws
  // SysError (e.g. EADDRINUSE, with a hint) or ftvm::Error when the name does not resolve.
  Listener(const std::string& host, uint16_t port, Options opts = {});

  // The port actually bound (useful with port 0) and "addr:port" as bound.
  uint16_t bound_port() const { return port_; }
  std::string local_address() const { return local_; }
  // The listening fd, for callers that multiplex readiness themselves (POLLIN = a client).
  int fd() const { return fd_.get(); }

  // Waits up to `timeout` for a client, then exchanges Hello frames with it (bounded by
  // Options::connect_timeout). Returns nullptr on timeout. Throws ProtocolError when the
  // client is not a compatible ftvm peer (bad frames, another wire version: both named) or
  // fails authentication, and LinkDown when it disconnects or stays silent during the
  // handshake; the Listener itself stays usable after either.
  std::unique_ptr<Connection> accept(std::chrono::milliseconds timeout);

  // The two halves of accept(), for callers that run handshakes on their own threads (ftd: a
  // silent client must not hold up other clients). accept_socket() waits up to `timeout` for a
  // client and returns its socket (non-blocking) and address without reading from it, or
  // nullopt on timeout. handshake_accepted() then runs the handshake (bounded by
  // Options::connect_timeout) and throws like accept().
  struct Accepted {
    UniqueFd fd;
    std::string peer;       // "addr:port"
    std::string peer_host;  // the address alone (IPv4-mapped IPv6 shown as IPv4)
  };
  std::optional<Accepted> accept_socket(std::chrono::milliseconds timeout);
  std::unique_ptr<Connection> handshake_accepted(Accepted a) const;
  const Options& options() const { return opts_; }

 private:
  UniqueFd fd_;
  uint16_t port_ = 0;
  std::string local_;
  Options opts_;
};

// Connects to `host`:`port` (every resolved address in turn, IPv4 or IPv6) within
// opts.connect_timeout, then exchanges Hello frames. Throws LinkDown when no address accepts
// the connection in time (refused, unreachable, timed out: the message names host, port and
// the last error), ftvm::Error when the name does not resolve, ProtocolError when the peer
// is not a compatible ftvm peer (another wire version: both versions named).
std::unique_ptr<Connection> connect_tcp(const std::string& host, uint16_t port, Options opts = {});

// The address part of a "addr:port" / "[v6]:port" peer string, with "::ffff:a.b.c.d" shown as
// "a.b.c.d" (a dual-stack listener reports IPv4 clients that way).
std::string peer_host(const std::string& peer);

// Largest inbound control-message bytes queued while this side is blocked sending.
inline constexpr size_t kMaxPendingControlBytes = 64u << 20;

// The Connection over a connected, handshaken TCP socket. Built by Listener/connect_tcp;
// public so that tests can reach it, not meant to be constructed elsewhere.
class TcpConnection final : public Connection {
 public:
  // Takes `fd` (connected, non-blocking, handshake done). `early` holds bytes the peer sent
  // after the handshake that it already read; `peer_hello` is what the peer announced; `tx`
  // and `rx` protect the two directions (off for an unauthenticated connection); `key_id` is
  // the hex id of the key both proved ("" when unauthenticated).
  TcpConnection(UniqueFd fd, Options opts, std::string peer, HelloBody peer_hello, std::vector<std::byte> early,
                auth::Direction tx = {}, auth::Direction rx = {}, std::string key_id = {},
                std::array<unsigned char, 32> epoch_key = {});
  // Sends Goodbye when that cannot block or cut a frame in half, then closes the socket.
  ~TcpConnection() override;

  void register_region(uint32_t id, std::span<std::byte> mem) override;
  void unregister_region(uint32_t id) override;
  // Connection::register_source(): nothing to register, every write() is copied into the
  // socket (or the encryption buffer) anyway; only the failed-connection rule applies.
  void register_source(std::span<const std::byte>) override { check_usable(); }
  void unregister_source(std::span<const std::byte>) override {}
  void write(uint32_t region, uint64_t offset, std::span<const std::byte> data) override;
  void send_control(uint16_t type, std::span<const std::byte> body) override;
  void flush() override;
  std::optional<ControlMessage> poll(std::chrono::milliseconds timeout) override;
  std::chrono::milliseconds idle_for() const override;
  std::string peer() const override { return peer_; }
  const char* backend() const override { return "tcp"; }
  uint64_t bytes_sent() const override { return bytes_sent_; }
  uint64_t bytes_received() const override { return bytes_received_; }
  std::string key_id() const override { return key_id_; }
  const std::array<unsigned char, 32>* epoch_key() const override { return key_id_.empty() ? nullptr : &epoch_key_; }
  std::string security() const override {
    return key_id_.empty() ? "insecure" : tx_.encrypt() ? "authenticated+encrypted" : "authenticated";
  }

 private:
  using Clock = std::chrono::steady_clock;

  // Runs `f`; on LinkDown/ProtocolError remembers the failure so later calls rethrow it.
  template <typename F>
  auto guarded(F&& f) -> decltype(f());
  void check_usable() const;

  // --- send side (datapath) ---
  // Queues one frame: header, payload (encrypted into a buffer of ours when encrypting) and,
  // on an authenticated connection, its tag. `payload` must stay valid until sent (try_send
  // returned true), as write() requires of its callers.
  void queue_frame(const FrameHeader& h, std::span<const std::byte> payload = {});
  void queue_data(const void* p, size_t n);
  bool tx_pending() const { return tx_pos_ < tx_iov_.size(); }
  // Sends what the socket takes without blocking; true when the queue is empty.
  bool try_send();
  // Sends everything, waiting for the socket and draining inbound meanwhile.
  void flush_blocking();
  // Queues a Heartbeat when nothing was sent for the heartbeat interval and nothing is queued.
  void maybe_heartbeat();
  void check_stall();

  // --- receive side (datapath) ---
  // One non-blocking read into the receive buffer, or straight into the current payload's
  // destination. Throws LinkDown on EOF or a reset.
  void read_some();
  // Decodes and applies buffered frames; with `stop_after_control` returns right after a
  // control message completed.
  void parse(bool stop_after_control);

  [[noreturn]] void link_error(int err, const char* what);

  UniqueFd fd_;
  Options opts_;
  std::string peer_;
  uint32_t peer_max_write_;
  StickyFailure failure_;  // set once a LinkDown/ProtocolError escaped

  std::unordered_map<uint32_t, std::span<std::byte>> regions_;

  // Send queue: iovecs over header storage (tx_hdrs_, stable addresses) and caller data.
  std::vector<iovec> tx_iov_;
  size_t tx_pos_ = 0;  // first iovec not fully sent
  size_t tx_queued_bytes_ = 0;
  std::deque<std::array<std::byte, kFrameHeaderSize>> tx_hdrs_;
  std::deque<std::array<std::byte, kFrameTagSize>> tx_tags_;
  // Authenticated connections: payloads copied (or encrypted) at queue time, and spare buffers.
  std::deque<std::vector<std::byte>> tx_copy_;
  std::vector<std::vector<std::byte>> tx_spare_;
  Clock::time_point tx_last_;  // last time the kernel took bytes from us
  auth::Direction tx_, rx_;     // frame tags (and encryption) per direction; off when unauthenticated
  std::string key_id_;
  std::array<unsigned char, 32> epoch_key_{};  // keyed epoch digest (authenticated only)

  // Receive state. Invariant: rx_begin_ <= rx_end_ <= rx_buf_.size(); while rx_in_payload_,
  // rx_remaining_ payload bytes of frame kind rx_kind_ are still due and go to rx_dst_
  // (nullptr = discard: the target region was replaced meanwhile).
  std::vector<std::byte> rx_buf_;
  size_t rx_begin_ = 0, rx_end_ = 0;
  bool rx_in_payload_ = false;
  FrameKind rx_kind_ = FrameKind::Invalid;
  uint32_t rx_region_ = 0;
  std::byte* rx_dst_ = nullptr;
  size_t rx_remaining_ = 0;
  // Authenticated connections: after the payload, kFrameTagSize tag bytes are due (rx_tag_fill_
  // gathered so far); rx_plain_ is where the frame's payload starts (decrypted in place after
  // the tag checks; nullptr when it was discarded or is empty).
  std::array<std::byte, kFrameTagSize> rx_tag_{};
  size_t rx_tag_fill_ = 0;
  std::byte* rx_plain_ = nullptr;
  uint32_t rx_length_ = 0;
  // Called with each payload chunk as it is consumed (tag state).
  void rx_consumed(const std::byte* p, size_t n) {
    if (rx_.on()) rx_.update(p, n);
  }
  // The frame (header, payload, tag) is complete: check its tag, decrypt, deliver.
  void complete_frame(bool& stop);
  ControlMessage rx_ctl_;
  std::deque<ControlMessage> pending_;
  size_t pending_bytes_ = 0;
  Clock::time_point last_rx_;

  uint64_t bytes_sent_ = 0;
  uint64_t bytes_received_ = 0;
};

}  // namespace ftvm::transport::tcp
