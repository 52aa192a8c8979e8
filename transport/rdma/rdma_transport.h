// RDMA fabric: the Connection interface over one reliable-connected (RC) queue pair set up
// with librdmacm (rdma_cm) on IP:port. Works on any verbs device rdma_cm can route to,
// including Soft-RoCE (rxe) and InfiniBand/RoCE HCAs.
//
// Setup (rdma_transport.cc): RdmaListener, connect_rdma(), rdma_reachable(), the handshake
// (carried in the CM private data and, with a key, the first SENDs: transport/auth.h),
// resource creation, region registration.
//
// Authentication (Options::key): the same pre-shared key and scheme as TCP (transport/auth.h,
// "RDMA"): key ids compared in the CM exchange (a mismatch is refused on both sides with
// TCP's message), nonces and proofs in the first two SENDs each way, then a Poly1305 tag on
// every SEND with per-direction sequence numbers. One-sided WRITEs carry no tag: the
// replication protocol's keyed epoch digest (epoch_key(), Commit.staged_tag) authenticates
// what they wrote. No encryption: Options::encrypt is refused (Error).
// Data path (rdma_transport_datapath.cc): RdmaConnection's write/send_control/flush/poll.
//
// Device: rdma_cm picks the device from the IP address (the device whose netdev carries the
// route). `rdma_dev` (e.g. "rxe0") is a check, not a route override: when nonempty, a
// connection whose address resolves to another device is refused with an Error naming both
// (use an address on that device's netdev). device_name() says which device a connection uses.
//
// Wire model (all on one RC QP, so everything below is ordered as posted):
//  * One-sided writes are RDMA WRITEs straight into the peer's registered memory. The peer's
//    regions are known from advertisements (id, addr, rkey, size) the peer SENDs when its
//    register_region()/unregister_region() runs. The receiver cannot check a one-sided write,
//    so the SENDER bounds-checks every write against the advertised size and throws
//    ProtocolError before posting anything when the region is unknown or too small.
//  * Advertisement ordering: the receiver's register_region() SENDs the advertisement before
//    it returns; the writer applies advertisements in arrival order whenever it processes
//    receives (every call does, before checking a write). A write to an unknown or too-small
//    region first waits (receiving) up to Options::connect_timeout for an advertisement that
//    makes it fit, so "register here, then write there" works without a round trip; the
//    replication protocol additionally orders StagingGrow -> register_region (advertisement)
//    -> StagingGranted, so the new advertisement is applied before the primary writes.
//  * Control messages, heartbeats, advertisements and Goodbye are SENDs of a 32-byte header
//    (rdma_internal.h) plus payload into pre-posted receive buffers of kMsgSize bytes;
//    control bodies larger than one buffer are split into fragments. RC executes a SEND after
//    every WRITE posted before it, so when the receiver sees a control message the earlier
//    writes are in its memory: the ordering guarantee of transport.h.
//  * Flow control: credits. Each side posts kRecvDepth receive buffers and starts with the
//    peer's count as credits; every SEND uses one; every header returns the receiver's
//    cumulative count of reposted buffers. Control/advertisement SENDs need 2 credits, a
//    credit-return/heartbeat SEND needs 1 and is only sent with >= 1 credit owed back (or
//    >= 2 credits): the last credit is kept for returning credits, which rules out the
//    both-sides-exhausted deadlock. A receiver is never overrun (no RNR); rnr_retry = 7 is
//    only a backstop.
//  * Source memory for writes (the memory-registration-once rule: nothing is registered per
//    write): a write whose source lies inside memory registered on this connection (a local
//    region, or a buffer passed to register_source()) is posted zero-copy from it; any other
//    source is copied into a send ring registered once at connect time (kRingSize). No
//    implicit registration cache: Connection::write() gives no lifetime for the caller's
//    buffer beyond the next flush(), and a cached MR over memory that was freed and mapped
//    again at the same address would silently send the old pages. Large long-lived buffers
//    (the primary's epoch staging buffer) should be passed to register_source() once.
//  * Work requests are signaled selectively (every kSignalEvery-th, or when the ring bytes
//    since the last signaled one pass a quarter of the ring, or the last of a zero-copy
//    write); the send queue (kSendDepth) is kept full while there is data.
//  * Waiting: every blocking wait is poll() on the completion-channel fd and the CM
//    event-channel fd, bounded by the caller's timeout, the heartbeat interval and
//    Options::stall_timeout. A completion with an error status, a CM DISCONNECTED,
//    DEVICE_REMOVAL or similar event, or a stall becomes LinkDown (from that call on).
#pragma once

#include <infiniband/verbs.h>
#include <rdma/rdma_cma.h>

#include <array>
#include <chrono>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "transport/auth.h"
#include "transport/frame.h"
#include "transport/sticky_failure.h"
#include "transport/transport.h"

namespace ftvm::transport::rdma {

inline constexpr size_t kMsgSize = 64u << 10;       // one receive buffer / largest SEND
inline constexpr uint32_t kRecvDepth = 64;          // receive buffers posted per side
inline constexpr uint32_t kSendDepth = 128;         // send queue depth
inline constexpr uint32_t kSignalEvery = 16;        // at most this many unsignaled WRs in a row
inline constexpr size_t kRingSize = 8u << 20;       // registered send ring (copies)
inline constexpr size_t kMaxWriteChunk = 1u << 20;  // largest RDMA WRITE work request
// Largest inbound control-message bytes held while the caller is not polling; beyond that
// receive buffers are not reposted (the peer runs out of credits and waits).
inline constexpr size_t kMaxPendingControlBytes = 64u << 20;

// True when `host` resolves through an RDMA device (rdma_resolve_addr succeeds within a
// second); then `*dev` (if given) is that device's name, e.g. "rxe0". False (never throws)
// when there is no RDMA stack, no device, or no route via one.
bool rdma_reachable(const std::string& host, std::string* dev = nullptr);

class RdmaConnection;

// A listening rdma_cm id that yields handshaken Connections.
class RdmaListener {
 public:
  // Binds `host`:`port` ("" or "*" = every address; port 0 = ephemeral: see bound_port()) and
  // listens. `rdma_dev` nonempty: only connections arriving on that device are accepted.
  // Throws Error when there is no RDMA stack (names the fix: load a driver such as rdma_rxe
  // and add a link) or the address does not resolve, SysError when binding fails.
  RdmaListener(const std::string& host, uint16_t port, Options opts = {}, std::string rdma_dev = {});
  ~RdmaListener();
  RdmaListener(const RdmaListener&) = delete;
  RdmaListener& operator=(const RdmaListener&) = delete;

  uint16_t bound_port() const { return port_; }
  std::string local_address() const { return local_; }
  // The CM event-channel fd (POLLIN = a client or another CM event), for callers that
  // multiplex readiness themselves.
  int fd() const;
  // Device the listener is bound to ("" when bound to every address).
  std::string device_name() const;

  // Waits up to `timeout` for a client and completes the handshake with it (bounded by
  // Options::connect_timeout). Returns nullptr on timeout. Throws ProtocolError when the
  // client is not a compatible ftvm peer, LinkDown when it goes away during the handshake,
  // Error when it arrived on a device other than `rdma_dev`; the listener stays usable.
  std::unique_ptr<Connection> accept(std::chrono::milliseconds timeout);

  // accept() in two steps, so that a caller can run the authentication (Options::key), which
  // waits for the client's first SENDs, on another thread: accept_established() waits for a
  // client and completes the CM exchange (key ids checked: a mismatch is refused there) and
  // returns nullptr on timeout; finish() runs the authenticated handshake (bounded by
  // Options::connect_timeout from its call) and returns the connection. Throws like accept().
  struct Established {
    std::unique_ptr<RdmaConnection> conn;
    std::vector<std::byte> transcript_prefix;  // for RdmaConnection::authenticate
    Options opts;
  };
  std::unique_ptr<Established> accept_established(std::chrono::milliseconds timeout);
  static std::unique_ptr<Connection> finish(std::unique_ptr<Established> e);

 private:
  rdma_event_channel* ch_ = nullptr;
  rdma_cm_id* id_ = nullptr;
  uint16_t port_ = 0;
  std::string local_;
  Options opts_;
  std::string dev_;
};

// Connects to `host`:`port` within opts.connect_timeout (address and route resolution,
// connection, handshake). Throws LinkDown when nobody listens there or it times out (names
// host, port, and the CM event), Error when there is no RDMA stack, the address does not
// resolve via an RDMA device, or it resolves via a device other than `rdma_dev`;
// ProtocolError when the peer is not a compatible ftvm peer (both wire versions named).
std::unique_ptr<Connection> connect_rdma(const std::string& host, uint16_t port, Options opts = {},
                                         const std::string& rdma_dev = {});

// The peer's handshake, carried in the CM private data (both directions).
// Layout (28 bytes LE): magic u32, version u16, reserved u16 (0), capabilities u32, recv_depth
// u32, msg_size u32, key_id[8] (zero without a key). Fits the 56 bytes of CM connect data.
struct RdmaHello {
  uint16_t version = kWireVersion;
  uint32_t capabilities = 0;  // kCapAuth (frame.h): this side has a key and requires the proofs
  uint32_t recv_depth = kRecvDepth;
  uint32_t msg_size = kMsgSize;
  std::array<unsigned char, 8> key_id{};  // auth::Key::id of this side's key
};

// The Connection over an established RC QP. Built by RdmaListener/connect_rdma; public so
// tests can reach the extensions, not meant to be constructed elsewhere.
class RdmaConnection final : public Connection {
 public:
  struct Resources;  // verbs objects; defined in rdma_transport.cc
  RdmaConnection(std::unique_ptr<Resources> res, Options opts, std::string peer, RdmaHello peer_hello);
  // Sends Goodbye when a credit is free, disconnects, releases every verbs object.
  ~RdmaConnection() override;

  void register_region(uint32_t id, std::span<std::byte> mem) override;
  void unregister_region(uint32_t id) override;
  void write(uint32_t region, uint64_t offset, std::span<const std::byte> data) override;
  void send_control(uint16_t type, std::span<const std::byte> body) override;
  void flush() override;
  std::optional<ControlMessage> poll(std::chrono::milliseconds timeout) override;
  std::chrono::milliseconds idle_for() const override;
  std::string peer() const override { return peer_; }
  const char* backend() const override { return "rdma"; }
  uint64_t bytes_sent() const override { return bytes_sent_; }
  uint64_t bytes_received() const override { return bytes_received_ + peer_write_bytes_; }

  // Connection::register_source(): ibv_reg_mr of `mem` (read access only), once, here; writes
  // from inside it are then posted zero-copy. Connection::unregister_source(): waits for the
  // zero-copy writes in flight, then deregisters.
  void register_source(std::span<const std::byte> mem) override;
  void unregister_source(std::span<const std::byte> mem) override;

  // --- RDMA extensions ---
  // The verbs device this connection uses, e.g. "rxe0".
  std::string device_name() const;
  // Test hook: SENDs `raw` (header included, <= kMsgSize) as if it were a message, to
  // exercise the peer's validation of malformed control input. Not for production use. Never
  // tagged: on an authenticated connection the peer rejects it for its missing tag.
  void send_raw_message_for_test(std::span<const std::byte> raw);
  // Test hook: the next tagged SEND has one payload (or header) byte flipped after tagging, as
  // an attacker on the fabric would; the peer must reject it. Not for production use.
  void tamper_next_send_for_test() { tamper_next_ = true; }

  std::string key_id() const override { return key_id_; }
  const std::array<unsigned char, 32>* epoch_key() const override { return key_id_.empty() ? nullptr : &epoch_key_; }

  // Authenticated handshake after ESTABLISHED (transport/auth.h "RDMA"); called by the
  // listener and connect_rdma() when Options::key is set, before the connection is returned.
  // `prefix` = "ftvm-rdma" || initiator's RdmaHello bytes || responder's. Throws ProtocolError
  // when the peer's proof does not verify or it sends anything else first, LinkDown when it
  // goes away or stays silent until `deadline`.
  void authenticate(bool initiator, std::vector<std::byte> prefix, std::chrono::steady_clock::time_point deadline);

 private:
  using Clock = std::chrono::steady_clock;
  struct Mr;
  struct PeerRegion {
    uint64_t addr = 0;
    uint32_t rkey = 0;
    uint64_t size = 0;
  };
  struct Posted {
    uint64_t seq;
    uint64_t ring_end;  // ring head after this WR's allocation
  };

  template <typename F>
  auto guarded(F&& f) -> decltype(f());
  void check_usable() const;

  // --- progress engine (datapath) ---
  // Handles every completion and CM event already there; never blocks.
  bool progress();  // true when something was handled
  // Waits (one poll() on both fds) until something may have happened or `deadline`; then
  // progress(). Throws LinkDown when a blocked send stalled for Options::stall_timeout.
  void wait_until(Clock::time_point deadline, bool sending);
  void handle_cm_events();
  void handle_recv(uint32_t buf, uint32_t len);
  void repost(uint32_t buf);
  void repost_deferred();
  // Sends a credit-return/heartbeat message when one is due and allowed.
  void maybe_pure_message(bool heartbeat_due);

  // --- send side (datapath) ---
  uint32_t credits() const;
  // Posts one SEND of `kind` with `payload` (<= kMsgSize - header) copied into the ring; waits
  // for credits (`need`) and queue space, receiving meanwhile.
  // Returns the SEND's sequence number.
  uint64_t post_message(uint8_t kind, uint8_t flags, uint16_t type, uint32_t total,
                        std::span<const std::byte> payload, uint32_t need = 2, bool force_signal = false);
  // Posts `bytes` as one SEND once `need` credits are there. `fill_header`: stamp the
  // cumulative counters (returned, write_bytes) into the header at posting time.
  void post_raw_send(std::span<const std::byte> bytes, uint32_t need, bool fill_header, bool force_signal);
  // Waits until one more WR fits the send queue and `ring_bytes` fit the ring.
  uint64_t reserve(size_t ring_bytes, bool sending);
  // Assigns the next sequence number to `wr` and batches it; returns the sequence number.
  uint64_t post_wr(const ibv_send_wr& wr, const ibv_sge& sge, uint64_t ring_end, bool force_signal, size_t ring_bytes);
  // Posts the WRs batched by post_wr() with one ibv_post_send (done before any wait and
  // before a call returns).
  void post_batch();
  // Waits until every WR up to `seq` completed (`seq` is signaled or followed by a signaled
  // WR); LinkDown after Options::stall_timeout without progress, or at `deadline`.
  void wait_completed(uint64_t seq, Clock::time_point deadline = Clock::time_point::max());
  // The zero-copy MR that covers [p, p+n), or nullptr.
  const ibv_mr* source_mr(const void* p, size_t n) const;
  // Advertises local region `id` (m != nullptr) or its withdrawal (m == nullptr).
  void send_advert(uint32_t id, const Mr* m);

  [[noreturn]] void link_down(const std::string& what);

  // Handshake step (rdma_transport.h "Authentication"): Off = unauthenticated connection.
  enum class AuthState : uint8_t { Off, AwaitNonce, AwaitProof, Done };
  void handle_auth(uint8_t kind, std::span<const std::byte> payload);

  std::unique_ptr<Resources> res_;
  Options opts_;
  AuthState auth_ = AuthState::Off;
  bool initiator_ = false;
  std::vector<std::byte> transcript_;             // grows to the full transcript
  std::array<unsigned char, 32> my_nonce_{};
  std::unique_ptr<auth::SessionKeys> keys_;       // once both nonces are known
  auth::Direction tx_, rx_;                       // SEND tags per direction, after the handshake
  std::string key_id_;                            // "" = unauthenticated
  std::array<unsigned char, 32> epoch_key_{};     // keyed epoch digest (authenticated only)
  bool tamper_next_ = false;
  std::string peer_;
  RdmaHello peer_hello_;
  StickyFailure failure_;

  std::unordered_map<uint32_t, std::unique_ptr<Mr>> regions_;  // local regions (peer writes)
  std::map<uintptr_t, std::unique_ptr<Mr>> sources_;            // zero-copy sources by address
  std::unordered_map<uint32_t, PeerRegion> peer_regions_;       // advertised by the peer

  // Send state. WR sequence numbers start at 1; every WR up to completed_seq_ is done.
  uint64_t next_seq_ = 1;
  uint64_t completed_seq_ = 0;
  uint64_t last_signaled_seq_ = 0;
  size_t unsignaled_ring_bytes_ = 0;
  uint64_t zc_seq_ = 0;  // last zero-copy WR (signaled); its source is busy until it completes
  uint64_t ring_head_ = 0, ring_tail_ = 0;  // monotonic; used = head - tail <= kRingSize
  std::deque<Posted> posted_;
  uint64_t sends_posted_ = 0;      // SENDs posted (each used one credit)
  uint32_t peer_returned_ = 0;     // the peer's cumulative reposted count (mod 2^32)
  uint64_t write_bytes_posted_ = 0;
  bool in_pure_ = false;  // sending a pure message (never recurse into another)
  bool in_send_ = false;  // between a SEND's credit check and its posting: no other SEND
  std::array<ibv_send_wr, kSignalEvery> batch_wr_{};
  std::array<ibv_sge, kSignalEvery> batch_sge_{};
  size_t batch_n_ = 0;
  Clock::time_point last_send_;    // last SEND posted (heartbeat clock)
  Clock::time_point last_progress_;

  // Receive state.
  uint32_t rx_returned_ = 0;       // buffers reposted (cumulative, mod 2^32)
  uint32_t rx_returned_told_ = 0;  // value of rx_returned_ in our last SEND
  std::vector<uint32_t> deferred_; // consumed buffers not reposted (pending full)
  ControlMessage rx_ctl_;
  uint32_t rx_total_ = 0;
  bool rx_assembling_ = false;
  std::deque<ControlMessage> pending_;
  size_t pending_bytes_ = 0;
  Clock::time_point last_rx_;
  uint64_t peer_write_bytes_ = 0;

  uint64_t bytes_sent_ = 0;
  uint64_t bytes_received_ = 0;
};

}  // namespace ftvm::transport::rdma
