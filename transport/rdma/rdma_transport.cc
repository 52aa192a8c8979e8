// RDMA fabric, setup side: rdma_cm listening/connecting, the handshake in the CM private data,
// verbs resources (PD, completion channel, CQ, QP, send ring, receive buffers), region and
// source registration, teardown. The data path is in rdma_transport_datapath.cc.
#include "transport/rdma/rdma_transport.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <sodium.h>
#include <sys/socket.h>

#include <algorithm>
#include <cstring>

#include <fmt/format.h>

#include "common/error.h"
#include "transport/address.h"
#include "common/log.h"
#include "transport/rdma/rdma_internal.h"

namespace ftvm::transport::rdma {

namespace {
using Clock = std::chrono::steady_clock;

constexpr size_t kHelloWireSize = 28;
constexpr char kTranscriptLabel[] = "ftvm-rdma";
constexpr const char* kNoStackHint =
    "no RDMA stack here: install rdma-core, load a driver (e.g. `modprobe rdma_rxe` and "
    "`rdma link add rxe0 type rxe netdev eth0` for Soft-RoCE) or use the tcp transport";

int remaining_ms(Clock::time_point deadline) {
  auto left = std::chrono::ceil<std::chrono::milliseconds>(deadline - Clock::now()).count();
  return static_cast<int>(std::clamp<long long>(left, 0, 1 << 30));
}


rdma_event_channel* make_channel(const std::string& what) {
  rdma_event_channel* ch = rdma_create_event_channel();
  if (!ch) throw SysError(errno, "rdma_create_event_channel for " + what, kNoStackHint);
  int fl = fcntl(ch->fd, F_GETFL);
  if (fl < 0 || fcntl(ch->fd, F_SETFL, fl | O_NONBLOCK) < 0) {
    int err = errno;
    rdma_destroy_event_channel(ch);
    throw SysError(err, "set the rdma_cm event channel non-blocking for " + what);
  }
  return ch;
}

std::string dev_name(const ibv_context* ctx) {
  if (!ctx || !ctx->device) return {};
  const char* n = ibv_get_device_name(ctx->device);
  return n ? n : "";
}

// A CM event copied out of the library's buffer (the event is acked before returning).
struct CmEvent {
  rdma_cm_event_type type{};
  int status = 0;
  rdma_cm_id* id = nullptr;  // the id the event is about (the new id for CONNECT_REQUEST)
  std::vector<std::byte> private_data;
};

// Next event on `ch` before `deadline`; nullopt on timeout.
std::optional<CmEvent> next_event(rdma_event_channel* ch, Clock::time_point deadline, const std::string& what) {
  for (;;) {
    rdma_cm_event* ev = nullptr;
    if (rdma_get_cm_event(ch, &ev) == 0) {
      CmEvent out;
      out.type = ev->event;
      out.status = ev->status;
      out.id = ev->id;
      if (ev->param.conn.private_data && ev->param.conn.private_data_len > 0) {
        auto* p = static_cast<const std::byte*>(ev->param.conn.private_data);
        out.private_data.assign(p, p + ev->param.conn.private_data_len);
      }
      check_sys(rdma_ack_cm_event(ev) == 0 ? 0 : -1, "rdma_ack_cm_event for " + what);
      return out;
    }
    if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
      throw SysError(errno, "rdma_get_cm_event for " + what);
    pollfd p{ch->fd, POLLIN, 0};
    int r = ::poll(&p, 1, remaining_ms(deadline));
    if (r < 0 && errno == EINTR) continue;
    check_sys(r, "poll the rdma_cm event channel for " + what);
    if (r == 0) return std::nullopt;
  }
}

std::array<std::byte, kHelloWireSize> encode_rdma_hello(const RdmaHello& h) {
  std::array<std::byte, kHelloWireSize> out{};
  put_le(out.data(), kFrameMagic, 4);
  put_le(out.data() + 4, h.version, 2);
  put_le(out.data() + 8, h.capabilities, 4);
  put_le(out.data() + 12, h.recv_depth, 4);
  put_le(out.data() + 16, h.msg_size, 4);
  std::memcpy(out.data() + 20, h.key_id.data(), h.key_id.size());
  return out;
}

// This side's hello: with a key, kCapAuth and the key id.
RdmaHello my_hello(const Options& o) {
  RdmaHello h;
  if (o.key) {
    h.capabilities = kCapAuth;
    h.key_id = o.key->id;
  }
  return h;
}

std::string hex(std::span<const unsigned char> b) {
  std::string s;
  for (auto c : b) s += fmt::format("{:02x}", c);
  return s;
}

// Both sides must agree on authentication, with the same key id; the messages are TCP's
// (tcp_transport.cc), so an operator reads the same diagnosis on either fabric.
void check_auth_match(const Options& o, const RdmaHello& theirs, const std::string& peer) {
  const bool they_auth = theirs.capabilities & kCapAuth;
  if (o.key && !they_auth)
    throw ProtocolError(fmt::format(
        "peer {} did not authenticate (it has no key: started with --insecure?); this ftd requires the pre-shared "
        "key {}: give both ftd the same --key-file",
        peer, o.key->path));
  if (!o.key && they_auth)
    throw ProtocolError(fmt::format(
        "peer {} requires authentication (it has a key) but this ftd has none (--insecure): give both ftd the same "
        "--key-file",
        peer));
  if (o.key && theirs.key_id != o.key->id)
    throw ProtocolError(fmt::format(
        "authentication with {} failed: the peer uses key id {}, this ftd key id {} ({}): the hosts hold different "
        "key files (copy the same key to both; `ftctl status` shows the key id)",
        peer, hex(theirs.key_id), o.key->id_hex(), o.key->path));
}

void refuse_encrypt(const Options& o) {
  if (o.encrypt)
    throw Error("--encrypt: the RDMA transport does not encrypt (one-sided writes land in the peer's memory without "
                "its CPU; they are authenticated by the keyed epoch digest, not encrypted); use --transport tcp for "
                "encryption, or drop --encrypt");
}

// "ftvm-rdma" || initiator's hello || responder's hello, as sent (the transcript's prefix).
std::vector<std::byte> transcript_prefix(std::span<const std::byte> initiator, std::span<const std::byte> responder) {
  constexpr size_t kLabel = sizeof kTranscriptLabel - 1;
  if (initiator.size() < kHelloWireSize || responder.size() < kHelloWireSize)
    throw Error("transcript_prefix: a hello shorter than its wire size (decoded before, cannot happen)");
  std::vector<std::byte> t(kLabel + 2 * kHelloWireSize);
  std::memcpy(t.data(), kTranscriptLabel, kLabel);
  std::memcpy(t.data() + kLabel, initiator.data(), kHelloWireSize);
  std::memcpy(t.data() + kLabel + kHelloWireSize, responder.data(), kHelloWireSize);
  return t;
}

// Private data may be padded with zeros by the CM beyond what the peer sent.
RdmaHello decode_rdma_hello(std::span<const std::byte> in, const std::string& peer) {
  if (in.size() < 8)
    throw ProtocolError(fmt::format("handshake with {}: {} bytes of connection private data, expected at least {} "
                                    "(is the peer an ftd?)",
                                    peer, in.size(), kHelloWireSize));
  if (get_le(in.data(), 4) != kFrameMagic)
    throw ProtocolError(fmt::format("handshake with {}: bad magic in the connection private data (the peer is not an "
                                    "ftd)",
                                    peer));
  RdmaHello h;
  h.version = static_cast<uint16_t>(get_le(in.data() + 4, 2));
  if (h.version != kWireVersion)
    throw ProtocolError(fmt::format("handshake with {}: peer speaks wire version {}, this side version {} (run the "
                                    "same ftvm release on both hosts)",
                                    peer, h.version, kWireVersion));
  if (in.size() < kHelloWireSize)
    throw ProtocolError(fmt::format("handshake with {}: {} bytes of connection private data, expected at least {}",
                                    peer, in.size(), kHelloWireSize));
  h.capabilities = static_cast<uint32_t>(get_le(in.data() + 8, 4));
  h.recv_depth = static_cast<uint32_t>(get_le(in.data() + 12, 4));
  h.msg_size = static_cast<uint32_t>(get_le(in.data() + 16, 4));
  std::memcpy(h.key_id.data(), in.data() + 20, h.key_id.size());
  if (h.recv_depth < 2 || h.recv_depth > 1u << 16 || h.msg_size < kMsgSize)
    throw ProtocolError(fmt::format("handshake with {}: peer announced {} receive buffers of {} bytes (need >= 2 of "
                                    ">= {} bytes)",
                                    peer, h.recv_depth, h.msg_size, kMsgSize));
  return h;
}

void check_device(const std::string& want, const std::string& got, const std::string& what) {
  if (!want.empty() && want != got)
    throw Error(fmt::format("{} goes through RDMA device '{}', not the requested '{}' (use an IP address of a netdev "
                            "bound to {}, or leave the device unset)",
                            what, got.empty() ? "(none)" : got, want, want));
}

rdma_conn_param conn_param(const std::array<std::byte, kHelloWireSize>& hello) {
  rdma_conn_param p{};
  p.private_data = hello.data();
  p.private_data_len = static_cast<uint8_t>(hello.size());
  p.responder_resources = 1;
  p.initiator_depth = 1;
  p.retry_count = 7;
  p.rnr_retry_count = 7;  // backstop only: credits keep receive buffers posted
  return p;
}

std::string peer_of(rdma_cm_id* id) { return format_addr(rdma_get_peer_addr(id)); }

const char* event_name(rdma_cm_event_type t) { return rdma_event_str(t); }
}  // namespace

// ---- resources -------------------------------------------------------------------------------

RdmaConnection::Resources::~Resources() {
  if (id && id->qp) rdma_destroy_qp(id);
  if (ring_mr) ibv_dereg_mr(ring_mr);
  if (recv_mr) ibv_dereg_mr(recv_mr);
  if (cq) ibv_destroy_cq(cq);
  if (cc) ibv_destroy_comp_channel(cc);
  if (pd) ibv_dealloc_pd(pd);
  if (id) rdma_destroy_id(id);
  if (ch) rdma_destroy_event_channel(ch);
}

namespace {
// Creates PD, completion channel, CQ, QP, the send ring and the receive buffers for `r.id`
// (which has a device), and posts every receive buffer (before the connection exists, so the
// peer's first SEND always finds one).
void build(RdmaConnection::Resources& r, const std::string& peer) {
  ibv_context* ctx = r.id->verbs;
  std::string dev = dev_name(ctx);
  std::string on = fmt::format("on {} for the connection to {}", dev, peer);
  r.pd = ibv_alloc_pd(ctx);
  if (!r.pd) throw SysError(errno, "ibv_alloc_pd " + on);
  r.cc = ibv_create_comp_channel(ctx);
  if (!r.cc) throw SysError(errno, "ibv_create_comp_channel " + on);
  int fl = fcntl(r.cc->fd, F_GETFL);
  if (fl < 0 || fcntl(r.cc->fd, F_SETFL, fl | O_NONBLOCK) < 0)
    throw SysError(errno, "set the completion channel non-blocking " + on);
  r.cq = ibv_create_cq(ctx, static_cast<int>(kSendDepth + kRecvDepth + 16), nullptr, r.cc, 0);
  if (!r.cq) throw SysError(errno, "ibv_create_cq " + on, "the device may be out of resources");
  if (int rc = ibv_req_notify_cq(r.cq, 0); rc != 0) throw SysError(rc, "ibv_req_notify_cq " + on);

  ibv_qp_init_attr qa{};
  qa.send_cq = r.cq;
  qa.recv_cq = r.cq;
  qa.qp_type = IBV_QPT_RC;
  qa.sq_sig_all = 0;
  qa.cap.max_send_wr = kSendDepth;
  qa.cap.max_recv_wr = kRecvDepth;
  qa.cap.max_send_sge = 1;
  qa.cap.max_recv_sge = 1;
  if (rdma_create_qp(r.id, r.pd, &qa) != 0) throw SysError(errno, "rdma_create_qp (RC) " + on);

  const char* memlock_hint = "raise the locked-memory limit (ulimit -l / LimitMEMLOCK=) or run ftd as root";
  r.ring.assign(kRingSize, std::byte{0});
  r.ring_mr = ibv_reg_mr(r.pd, r.ring.data(), r.ring.size(), IBV_ACCESS_LOCAL_WRITE);
  if (!r.ring_mr) throw SysError(errno, fmt::format("ibv_reg_mr of the {}-byte send ring {}", kRingSize, on), memlock_hint);
  r.recv.assign(size_t{kRecvDepth} * kMsgSize, std::byte{0});
  r.recv_mr = ibv_reg_mr(r.pd, r.recv.data(), r.recv.size(), IBV_ACCESS_LOCAL_WRITE);
  if (!r.recv_mr)
    throw SysError(errno, fmt::format("ibv_reg_mr of the {}-byte receive buffers {}", r.recv.size(), on), memlock_hint);
  for (uint32_t i = 0; i < kRecvDepth; ++i) {
    ibv_sge sge{reinterpret_cast<uintptr_t>(r.recv.data() + size_t{i} * kMsgSize), static_cast<uint32_t>(kMsgSize),
                r.recv_mr->lkey};
    ibv_recv_wr wr{};
    wr.wr_id = kRecvTag | i;
    wr.sg_list = &sge;
    wr.num_sge = 1;
    ibv_recv_wr* bad = nullptr;
    if (int rc = ibv_post_recv(r.id->qp, &wr, &bad); rc != 0) throw SysError(rc, "ibv_post_recv " + on);
  }
}
}  // namespace

// ---- reachability ------------------------------------------------------------------------------

bool rdma_reachable(const std::string& host, std::string* dev) {
  try {
    AddrInfo res;
    resolve(host, 0, false, res, false);
    RdmaConnection::Resources r;  // owns channel and id
    r.ch = make_channel("probing " + host);
    if (rdma_create_id(r.ch, &r.id, nullptr, RDMA_PS_TCP) != 0) return false;
    for (addrinfo* a = res.ai; a; a = a->ai_next) {
      if (rdma_resolve_addr(r.id, nullptr, a->ai_addr, 1000) != 0) continue;
      auto ev = next_event(r.ch, Clock::now() + std::chrono::milliseconds(1500), "probing " + host);
      if (ev && ev->type == RDMA_CM_EVENT_ADDR_RESOLVED && r.id->verbs) {
        if (dev) *dev = dev_name(r.id->verbs);
        return true;
      }
      return false;
    }
  } catch (const std::exception& e) {
    log::debug("transport", "rdma_reachable({}): {}", host, e.what());
  }
  return false;
}

// ---- listener ----------------------------------------------------------------------------------

RdmaListener::RdmaListener(const std::string& host, uint16_t port, Options opts, std::string rdma_dev)
    : opts_(opts), dev_(std::move(rdma_dev)) {
  refuse_encrypt(opts_);
  bool any = host.empty() || host == "*";
  AddrInfo res;
  resolve(any ? "0.0.0.0" : host, port, true, res, false);
  ch_ = make_channel(fmt::format("listening on '{}' port {}", host, port));
  try {
    if (rdma_create_id(ch_, &id_, nullptr, RDMA_PS_TCP) != 0)
      throw SysError(errno, fmt::format("rdma_create_id for listening on '{}' port {}", host, port), kNoStackHint);
    int last_err = 0;
    std::string last_what = "no address";
    bool bound = false;
    for (addrinfo* a = res.ai; a && !bound; a = a->ai_next) {
      if (rdma_bind_addr(id_, a->ai_addr) != 0) {
        last_err = errno;
        last_what = "rdma_bind_addr " + format_addr(a->ai_addr);
        continue;
      }
      bound = true;
    }
    if (!bound)
      throw SysError(last_err, fmt::format("{} (listen on '{}' port {})", last_what, host, port),
                     last_err == EADDRINUSE ? "another process uses the port: stop it or pick another port"
                                            : "check the address belongs to an RDMA-capable netdev of this host");
    if (id_->verbs) check_device(dev_, dev_name(id_->verbs), fmt::format("listening address '{}'", host));
    if (rdma_listen(id_, 16) != 0) throw SysError(errno, fmt::format("rdma_listen on '{}' port {}", host, port));
    port_ = ntohs(rdma_get_src_port(id_));
    local_ = format_addr(rdma_get_local_addr(id_));
    log::debug("transport", "rdma listening on {} (device {})", local_, device_name().empty() ? "any" : device_name());
  } catch (...) {
    if (id_) rdma_destroy_id(id_);
    rdma_destroy_event_channel(ch_);
    throw;
  }
}

RdmaListener::~RdmaListener() {
  if (id_) rdma_destroy_id(id_);
  if (ch_) rdma_destroy_event_channel(ch_);
}

int RdmaListener::fd() const { return ch_->fd; }
std::string RdmaListener::device_name() const { return dev_name(id_->verbs); }

std::unique_ptr<Connection> RdmaListener::accept(std::chrono::milliseconds timeout) {
  auto e = accept_established(timeout);
  if (!e) return nullptr;
  return finish(std::move(e));
}

std::unique_ptr<Connection> RdmaListener::finish(std::unique_ptr<Established> e) {
  if (e->opts.key)
    e->conn->authenticate(false, std::move(e->transcript_prefix), Clock::now() + e->opts.connect_timeout);
  log::debug("transport", "rdma connection from {} established on {}, {}", e->conn->peer(), e->conn->device_name(),
             e->conn->security());
  return std::move(e->conn);
}

std::unique_ptr<RdmaListener::Established> RdmaListener::accept_established(std::chrono::milliseconds timeout) {
  auto deadline = Clock::now() + timeout;
  for (;;) {
    auto ev = next_event(ch_, deadline, "listener " + local_);
    if (!ev) return nullptr;
    if (ev->type != RDMA_CM_EVENT_CONNECT_REQUEST) {
      log::debug("transport", "rdma listener {}: ignoring CM event {}", local_, event_name(ev->type));
      continue;
    }
    auto r = std::make_unique<RdmaConnection::Resources>();
    r->id = ev->id;  // owned from here on (destroyed with r)
    std::string peer = peer_of(r->id);
    RdmaHello hello;
    const auto mine = encode_rdma_hello(my_hello(opts_));
    try {
      hello = decode_rdma_hello(ev->private_data, peer);
      check_device(dev_, dev_name(r->id->verbs), "connection from " + peer);
      check_auth_match(opts_, hello, peer);
    } catch (...) {
      // The reject carries our hello: the client names the version or key id mismatch too.
      rdma_reject(r->id, mine.data(), static_cast<uint8_t>(mine.size()));
      throw;
    }
    // The connection gets its own event channel, so its DISCONNECTED events reach it.
    r->ch = make_channel("connection from " + peer);
    if (rdma_migrate_id(r->id, r->ch) != 0) throw SysError(errno, "rdma_migrate_id for the connection from " + peer);
    build(*r, peer);
    auto param = conn_param(mine);
    if (rdma_accept(r->id, &param) != 0) throw SysError(errno, "rdma_accept of the connection from " + peer);
    auto hs_deadline = Clock::now() + opts_.connect_timeout;
    for (;;) {
      auto e = next_event(r->ch, hs_deadline, "connection from " + peer);
      if (!e)
        throw LinkDown(fmt::format("connection from {}: not established within {} ms", peer,
                                   opts_.connect_timeout.count()));
      if (e->type == RDMA_CM_EVENT_ESTABLISHED) break;
      throw LinkDown(fmt::format("connection from {}: {} (status {}) during the handshake", peer, event_name(e->type),
                                 e->status));
    }
    auto e = std::make_unique<Established>();
    e->conn = std::make_unique<RdmaConnection>(std::move(r), opts_, peer, hello);
    e->transcript_prefix = transcript_prefix(ev->private_data, mine);
    e->opts = opts_;
    return e;
  }
}

// ---- connect -----------------------------------------------------------------------------------

std::unique_ptr<Connection> connect_rdma(const std::string& host, uint16_t port, Options opts,
                                         const std::string& rdma_dev) {
  refuse_encrypt(opts);
  AddrInfo res;
  resolve(host, port, false, res, false);
  auto deadline = Clock::now() + opts.connect_timeout;
  std::string last = "no address";
  for (addrinfo* a = res.ai; a; a = a->ai_next) {
    std::string peer = format_addr(a->ai_addr);
    auto r = std::make_unique<RdmaConnection::Resources>();
    r->ch = make_channel("connecting to " + peer);
    if (rdma_create_id(r->ch, &r->id, nullptr, RDMA_PS_TCP) != 0)
      throw SysError(errno, "rdma_create_id for connecting to " + peer, kNoStackHint);
    int ms = std::max(remaining_ms(deadline), 1);
    if (rdma_resolve_addr(r->id, nullptr, a->ai_addr, ms) != 0) {
      last = fmt::format("rdma_resolve_addr {}: {}", peer, std::strerror(errno));
      continue;
    }
    auto expect = [&](rdma_cm_event_type want, const char* step) -> std::optional<CmEvent> {
      auto e = next_event(r->ch, deadline, "connecting to " + peer);
      if (!e) {
        last = fmt::format("{}: {} timed out after {} ms", peer, step, opts.connect_timeout.count());
        return std::nullopt;
      }
      if (e->type != want) {
        last = fmt::format("{}: {} failed with {} (status {})", peer, step, event_name(e->type), e->status);
        if (e->type == RDMA_CM_EVENT_REJECTED && e->private_data.size() >= 8 &&
            get_le(e->private_data.data(), 4) == kFrameMagic) {
          // An ftd rejected us with its hello: name the version or key mismatch if that is why.
          check_auth_match(opts, decode_rdma_hello(e->private_data, peer), peer);
        }
        return std::nullopt;
      }
      return e;
    };
    if (!expect(RDMA_CM_EVENT_ADDR_RESOLVED, "address resolution")) {
      if (!r->id->verbs && last.find("ADDR_ERROR") != std::string::npos)
        throw Error(fmt::format("connect to {} port {}: the address does not resolve through an RDMA device ({}); {}",
                                host, port, last, kNoStackHint));
      continue;
    }
    check_device(rdma_dev, dev_name(r->id->verbs), fmt::format("address {}", peer));
    if (rdma_resolve_route(r->id, std::max(remaining_ms(deadline), 1)) != 0) {
      last = fmt::format("rdma_resolve_route {}: {}", peer, std::strerror(errno));
      continue;
    }
    if (!expect(RDMA_CM_EVENT_ROUTE_RESOLVED, "route resolution")) continue;
    build(*r, peer);
    const auto mine = encode_rdma_hello(my_hello(opts));
    auto param = conn_param(mine);
    if (rdma_connect(r->id, &param) != 0) {
      last = fmt::format("rdma_connect {}: {}", peer, std::strerror(errno));
      continue;
    }
    auto est = expect(RDMA_CM_EVENT_ESTABLISHED, "connection");
    if (!est) continue;
    RdmaHello hello = decode_rdma_hello(est->private_data, peer);
    check_auth_match(opts, hello, peer);
    std::string dev = dev_name(r->id->verbs);
    auto c = std::make_unique<RdmaConnection>(std::move(r), opts, peer, hello);
    if (opts.key)
      c->authenticate(true, transcript_prefix(mine, est->private_data),
                      std::max(deadline, Clock::now() + std::chrono::milliseconds(1000)));
    log::debug("transport", "rdma connection to {} established on {}, {}", peer, dev, c->security());
    return c;
  }
  throw LinkDown(fmt::format("connect to {} port {} over RDMA: {} (is ftd running and listening there with the rdma "
                             "transport?)",
                             host, port, last));
}

// ---- connection: lifetime and registration ------------------------------------------------------

RdmaConnection::RdmaConnection(std::unique_ptr<Resources> res, Options opts, std::string peer, RdmaHello peer_hello)
    : res_(std::move(res)),
      opts_(opts),
      peer_(std::move(peer)),
      peer_hello_(peer_hello),
      last_send_(Clock::now()),
      last_progress_(Clock::now()),
      last_rx_(Clock::now()) {}

RdmaConnection::~RdmaConnection() {
  // Let what was posted reach the peer (bounded), then disconnect: the peer sees
  // DISCONNECTED (LinkDown there). Never throws.
  if (!failure_.failed() && res_) {
    try {
      // A signaled Goodbye drains everything posted before it (RC completes in order).
      auto deadline = Clock::now() + std::chrono::milliseconds(1000);
      uint64_t last = last_signaled_seq_;
      progress();
      if (credits() >= 1) last = post_message(kMsgGoodbye, 0, 0, 0, {}, 1, true);
      wait_completed(last, deadline);
    } catch (const std::exception& e) {
      log::debug("transport", "rdma connection to {}: while closing: {}", peer_, e.what());
    }
  }
  if (res_ && res_->id) rdma_disconnect(res_->id);
  regions_.clear();
  sources_.clear();
  sodium_memzero(epoch_key_.data(), epoch_key_.size());
}

void RdmaConnection::authenticate(bool initiator, std::vector<std::byte> prefix, Clock::time_point deadline) {
  guarded([&] {
    initiator_ = initiator;
    transcript_ = std::move(prefix);
    my_nonce_ = auth::random_nonce();
    auth_ = AuthState::AwaitNonce;
    post_message(kMsgAuthNonce, 0, 0, 0, std::as_bytes(std::span(my_nonce_)));
    post_batch();
    // handle_auth() takes the peer's nonce (-> AwaitProof, keys derived), then its proof (-> Done).
    while (auth_ == AuthState::AwaitNonce) {
      if (Clock::now() >= deadline)
        link_down(fmt::format("no handshake nonce from the peer within {} ms (is it an ftd with a key?)",
                              opts_.connect_timeout.count()));
      wait_until(deadline, false);
    }
    auto proof = auth::prove(initiator_ ? keys_->proof_initiator : keys_->proof_responder, transcript_);
    post_message(kMsgAuthProof, 0, 0, 0, proof);
    post_batch();
    // Every SEND from here on is tagged; the peer expects that after our proof.
    tx_ = auth::Direction(initiator_ ? keys_->frame_i2r : keys_->frame_r2i, false);
    while (auth_ != AuthState::Done) {
      if (Clock::now() >= deadline)
        link_down(fmt::format("no handshake proof from the peer within {} ms", opts_.connect_timeout.count()));
      wait_until(deadline, false);
    }
    epoch_key_ = keys_->epoch;
    key_id_ = opts_.key->id_hex();
    keys_.reset();
    transcript_.clear();
  });
}

std::string RdmaConnection::device_name() const { return dev_name(res_->id->verbs); }

std::chrono::milliseconds RdmaConnection::idle_for() const {
  return std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - last_rx_);
}

void RdmaConnection::check_usable() const { failure_.check(peer_); }

RdmaConnection::Mr::~Mr() {
  if (mr) ibv_dereg_mr(mr);
}

void RdmaConnection::register_region(uint32_t id, std::span<std::byte> mem) {
  if (id == 0) throw Error("register_region: region id 0 is reserved (use a nonzero id)");
  guarded([&] {
    auto m = std::make_unique<Mr>();
    m->base = mem.data();
    m->len = mem.size();
    if (!mem.empty()) {
      m->mr = ibv_reg_mr(res_->pd, mem.data(), mem.size(), IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE);
      if (!m->mr)
        throw SysError(errno, fmt::format("ibv_reg_mr of region {} ({} bytes) on {} for peer {}", id, mem.size(),
                                          device_name(), peer_),
                       "raise the locked-memory limit (ulimit -l / LimitMEMLOCK=) or run ftd as root");
    }
    // The old MR goes first: from here on the HCA never touches the old memory (a peer write
    // still aimed at it fails the link rather than landing), then the peer learns the new one.
    wait_completed(zc_seq_);  // the old region may be a zero-copy source in flight
    regions_.erase(id);
    auto& slot = regions_[id];
    slot = std::move(m);
    send_advert(id, slot.get());
  });
}

void RdmaConnection::unregister_region(uint32_t id) {
  guarded([&] {
    auto it = regions_.find(id);
    if (it == regions_.end()) return;
    wait_completed(zc_seq_);
    regions_.erase(it);
    send_advert(id, nullptr);
  });
}

void RdmaConnection::register_source(std::span<const std::byte> mem) {
  guarded([&] {
    auto key = reinterpret_cast<uintptr_t>(mem.data());
    auto it = sources_.find(key);
    if (it != sources_.end() && it->second->len == mem.size()) return;
    if (mem.empty()) return;
    auto m = std::make_unique<Mr>();
    m->base = const_cast<std::byte*>(mem.data());
    m->len = mem.size();
    m->mr = ibv_reg_mr(res_->pd, m->base, m->len, 0);
    if (!m->mr)
      throw SysError(errno, fmt::format("ibv_reg_mr of a {}-byte write source on {} for peer {}", mem.size(),
                                        device_name(), peer_),
                     "raise the locked-memory limit (ulimit -l / LimitMEMLOCK=) or run ftd as root");
    if (it != sources_.end()) {
      wait_completed(zc_seq_);
      sources_.erase(it);
    }
    sources_[key] = std::move(m);
  });
}

void RdmaConnection::unregister_source(std::span<const std::byte> mem) {
  auto it = sources_.find(reinterpret_cast<uintptr_t>(mem.data()));
  if (it == sources_.end()) return;
  if (!failure_.failed()) {
    try {
      guarded([&] { wait_completed(zc_seq_); });
    } catch (...) {
      sources_.erase(it);  // the QP is dead: the HCA no longer reads it either
      throw;
    }
  }
  sources_.erase(it);
}

const ibv_mr* RdmaConnection::source_mr(const void* p, size_t n) const {
  auto a = reinterpret_cast<uintptr_t>(p);
  auto covers = [&](const Mr& m) {
    auto b = reinterpret_cast<uintptr_t>(m.base);
    return m.mr && a >= b && n <= m.len && a - b <= m.len - n;
  };
  auto it = sources_.upper_bound(a);
  if (it != sources_.begin() && covers(*std::prev(it)->second)) return std::prev(it)->second->mr;
  for (auto& [id, m] : regions_)
    if (covers(*m)) return m->mr;
  return nullptr;
}

}  // namespace ftvm::transport::rdma
