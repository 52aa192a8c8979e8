// RDMA fabric, data path: posting WRITEs and SENDs, credits, completions, CM events,
// receiving and reassembling control messages, heartbeats. Setup is in rdma_transport.cc; the
// model is described at the top of rdma_transport.h.
#include <fcntl.h>
#include <poll.h>

#include <algorithm>
#include <climits>
#include <cstring>

#include <fmt/format.h>

#include "common/error.h"
#include "common/log.h"
#include "transport/rdma/rdma_internal.h"
#include "transport/rdma/rdma_transport.h"

namespace ftvm::transport::rdma {

namespace {
int to_poll_ms(std::chrono::steady_clock::duration d) {
  auto ms = std::chrono::ceil<std::chrono::milliseconds>(d).count();
  return static_cast<int>(std::clamp<long long>(ms, 0, 1 << 30));
}
}  // namespace

void RdmaConnection::link_down(const std::string& what) {
  throw LinkDown(fmt::format("rdma connection to {} on {}: {} (the peer or the fabric went away)", peer_,
                             device_name(), what));
}

// ---- progress engine ---------------------------------------------------------------------------

void RdmaConnection::handle_cm_events() {
  for (;;) {
    rdma_cm_event* ev = nullptr;
    if (rdma_get_cm_event(res_->ch, &ev) != 0) {
      if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) return;
      throw SysError(errno, "rdma_get_cm_event for the connection to " + peer_);
    }
    rdma_cm_event_type t = ev->event;
    int status = ev->status;
    rdma_ack_cm_event(ev);
    switch (t) {
      case RDMA_CM_EVENT_ESTABLISHED:
      case RDMA_CM_EVENT_TIMEWAIT_EXIT: continue;
      default: link_down(fmt::format("rdma_cm event {} (status {})", rdma_event_str(t), status));
    }
  }
}

bool RdmaConnection::progress() {
  bool did = false;
  handle_cm_events();
  ibv_wc wc[32];
  for (;;) {
    int n = ibv_poll_cq(res_->cq, 32, wc);
    if (n < 0) link_down("ibv_poll_cq failed");
    if (n == 0) break;
    did = true;
    for (int i = 0; i < n; ++i) {
      const ibv_wc& c = wc[i];
      if (c.status != IBV_WC_SUCCESS)
        link_down(fmt::format("{} work request completed with '{}' (vendor error {:#x})",
                              (c.wr_id & kRecvTag) ? "receive" : "send", ibv_wc_status_str(c.status), c.vendor_err));
      if (c.wr_id & kRecvTag) {
        handle_recv(static_cast<uint32_t>(c.wr_id & ~kRecvTag), c.byte_len);
        continue;
      }
      // RC completes in order: every WR up to this signaled one is done.
      completed_seq_ = std::max(completed_seq_, c.wr_id);
      while (!posted_.empty() && posted_.front().seq <= completed_seq_) {
        ring_tail_ = std::max(ring_tail_, posted_.front().ring_end);
        posted_.pop_front();
      }
      last_progress_ = Clock::now();
    }
  }
  return did;
}

void RdmaConnection::wait_until(Clock::time_point deadline, bool sending) {
  post_batch();
  if (sending && Clock::now() - std::max(last_progress_, last_rx_) > opts_.stall_timeout)
    link_down(fmt::format("no progress and nothing received for {} ms (the peer is not reading; treating the link "
                          "as down)",
                          opts_.stall_timeout.count()));
  if (int rc = ibv_req_notify_cq(res_->cq, 0); rc != 0)
    throw SysError(rc, "ibv_req_notify_cq for the connection to " + peer_);
  if (progress()) return;  // completions that arrived before the notification was armed
  auto now = Clock::now();
  auto wait = std::min<Clock::duration>(deadline > now ? deadline - now : Clock::duration::zero(),
                                        opts_.heartbeat_interval);
  pollfd p[2] = {{res_->cc->fd, POLLIN, 0}, {res_->ch->fd, POLLIN, 0}};
  int r = ::poll(p, 2, to_poll_ms(wait));
  if (r < 0 && errno != EINTR) throw SysError(errno, "poll the completion and CM channels of the connection to " + peer_);
  if (r > 0 && (p[0].revents & POLLIN)) {
    ibv_cq* cq = nullptr;
    void* ctx = nullptr;
    if (ibv_get_cq_event(res_->cc, &cq, &ctx) == 0) ibv_ack_cq_events(cq, 1);
    else if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
      throw SysError(errno, "ibv_get_cq_event for the connection to " + peer_);
  }
  progress();
}

void RdmaConnection::repost(uint32_t buf) {
  ibv_sge sge{reinterpret_cast<uintptr_t>(res_->recv.data() + size_t{buf} * kMsgSize), static_cast<uint32_t>(kMsgSize),
              res_->recv_mr->lkey};
  ibv_recv_wr wr{};
  wr.wr_id = kRecvTag | buf;
  wr.sg_list = &sge;
  wr.num_sge = 1;
  ibv_recv_wr* bad = nullptr;
  if (int rc = ibv_post_recv(res_->id->qp, &wr, &bad); rc != 0)
    link_down(fmt::format("ibv_post_recv: {}", std::strerror(rc)));
  ++rx_returned_;
}

void RdmaConnection::repost_deferred() {
  while (!deferred_.empty() && pending_bytes_ < kMaxPendingControlBytes) {
    repost(deferred_.back());
    deferred_.pop_back();
  }
}

void RdmaConnection::handle_recv(uint32_t buf, uint32_t len) {
  if (buf >= kRecvDepth) throw ProtocolError(fmt::format("receive completion for unknown buffer {}", buf));
  last_rx_ = Clock::now();
  bytes_received_ += len;
  const std::byte* p = res_->recv.data() + size_t{buf} * kMsgSize;
  auto bad = [&](const std::string& why) -> ProtocolError {
    return ProtocolError(fmt::format("peer {} sent a malformed message ({} bytes): {}", peer_, len, why));
  };
  if (len < kMsgHeader) throw bad(fmt::format("shorter than the {}-byte header", kMsgHeader));
  // After the handshake every SEND ends with its tag, checked before anything in it is trusted.
  const size_t tag = rx_.on() ? kFrameTagSize : 0;
  if (rx_.on()) {
    if (len < kMsgHeader + tag) throw bad(fmt::format("shorter than the {}-byte header and its tag", kMsgHeader));
    const uint64_t seq = rx_.seq();
    rx_.begin();
    rx_.update(p, len - tag);
    if (!rx_.finish_and_check(std::span<const std::byte, kFrameTagSize>(p + len - tag, kFrameTagSize)))
      throw ProtocolError(fmt::format("peer {}: message {} ({} bytes) failed its authentication tag under key {} "
                                      "(altered, replayed, reordered or injected on the fabric); closing the "
                                      "connection",
                                      peer_, seq, len, key_id_));
    len -= static_cast<uint32_t>(tag);
  }
  if (get_le(p, 4) != kFrameMagic) throw bad("bad magic");
  uint8_t kind = static_cast<uint8_t>(p[4]);
  uint8_t flags = static_cast<uint8_t>(p[5]);
  auto type = static_cast<uint16_t>(get_le(p + 6, 2));
  auto returned = static_cast<uint32_t>(get_le(p + 8, 4));
  auto total = static_cast<uint32_t>(get_le(p + 12, 4));
  auto length = static_cast<uint32_t>(get_le(p + 16, 4));
  auto reserved = static_cast<uint32_t>(get_le(p + 20, 4));
  uint64_t wbytes = get_le(p + 24, 8);
  if (length != len - kMsgHeader) throw bad(fmt::format("length field {} != {} payload bytes", length, len - kMsgHeader));
  if (reserved != 0) throw bad(fmt::format("reserved field {} (must be 0)", reserved));
  // Credits: the peer cannot return more buffers than we have used.
  uint32_t outstanding = static_cast<uint32_t>(sends_posted_) - peer_returned_;
  if (static_cast<uint32_t>(returned - peer_returned_) > outstanding)
    throw bad(fmt::format("returns {} credits, only {} outstanding", returned - peer_returned_, outstanding));
  if (returned != peer_returned_) last_progress_ = last_rx_;
  peer_returned_ = returned;
  if (wbytes < peer_write_bytes_) throw bad("write byte counter went backwards");
  peer_write_bytes_ = wbytes;
  std::span<const std::byte> payload(p + kMsgHeader, length);
  if (kind != kMsgControl && (flags != 0 || type != 0 || total != 0))
    throw bad(fmt::format("flags/type/total set on a message of kind {}", kind));
  // Nothing but the handshake before the peer's proof verified; no handshake afterwards.
  if (auth_ == AuthState::AwaitNonce || auth_ == AuthState::AwaitProof || kind == kMsgAuthNonce ||
      kind == kMsgAuthProof) {
    handle_auth(kind, payload);
    repost(buf);
    return;
  }

  switch (kind) {
    case kMsgControl: {
      if (flags & ~(kFirst | kLast)) throw bad(fmt::format("unknown flags {:#x}", flags));
      if (type == 0) throw bad("control message type 0 (Invalid)");
      if (flags & kFirst) {
        if (rx_assembling_) throw bad("a new control message starts inside another");
        if (total > kMaxControlBody)
          throw bad(fmt::format("control message of {} bytes exceeds the {}-byte limit", total, kMaxControlBody));
        rx_ctl_ = ControlMessage{type, {}};
        rx_ctl_.body.reserve(total);
        rx_total_ = total;
        rx_assembling_ = true;
      } else if (!rx_assembling_ || rx_ctl_.type != type || rx_total_ != total) {
        throw bad("control fragment without a matching first fragment");
      }
      if (payload.size() > rx_total_ - rx_ctl_.body.size())
        throw bad(fmt::format("control fragments exceed the announced {} bytes", rx_total_));
      rx_ctl_.body.insert(rx_ctl_.body.end(), payload.begin(), payload.end());
      if (flags & kLast) {
        if (rx_ctl_.body.size() != rx_total_)
          throw bad(fmt::format("control message ends after {} of {} bytes", rx_ctl_.body.size(), rx_total_));
        rx_assembling_ = false;
        pending_bytes_ += rx_ctl_.body.size();
        pending_.push_back(std::move(rx_ctl_));
        rx_ctl_ = ControlMessage{};
      }
      break;
    }
    case kMsgPure:
      if (!payload.empty()) throw bad("heartbeat with a payload");
      break;
    case kMsgAdvert: {
      if (payload.size() != kAdvertSize) throw bad(fmt::format("region advertisement of {} bytes", payload.size()));
      auto id = static_cast<uint32_t>(get_le(payload.data(), 4));
      PeerRegion r{get_le(payload.data() + 8, 8), static_cast<uint32_t>(get_le(payload.data() + 4, 4)),
                   get_le(payload.data() + 16, 8)};
      if (id == 0) throw bad("region advertisement for id 0");
      if (r.addr > UINT64_MAX - r.size) throw bad(fmt::format("region {} address + size overflows", id));
      peer_regions_[id] = r;
      break;
    }
    case kMsgWithdraw:
      if (payload.size() != 4) throw bad(fmt::format("region withdrawal of {} bytes", payload.size()));
      peer_regions_.erase(static_cast<uint32_t>(get_le(payload.data(), 4)));
      break;
    case kMsgGoodbye:
      if (!payload.empty()) throw bad("Goodbye with a payload");
      throw LinkDown(fmt::format("receive from {}: the peer closed the connection (Goodbye)", peer_));
    default: throw bad(fmt::format("unknown message kind {}", kind));
  }
  if (pending_bytes_ >= kMaxPendingControlBytes) deferred_.push_back(buf);
  else repost(buf);
}

void RdmaConnection::handle_auth(uint8_t kind, std::span<const std::byte> payload) {
  const uint8_t want = auth_ == AuthState::AwaitNonce ? kMsgAuthNonce : kMsgAuthProof;
  if (auth_ == AuthState::Off || auth_ == AuthState::Done)
    throw ProtocolError(fmt::format("peer {} sent a handshake message (kind {}) outside the handshake", peer_, kind));
  if (kind != want)
    throw ProtocolError(fmt::format("peer {} sent a message of kind {} before the authentication handshake "
                                    "completed (expected its {}); connection refused",
                                    peer_, kind, want == kMsgAuthNonce ? "nonce" : "proof"));
  if (want == kMsgAuthNonce) {
    if (payload.size() != auth::kNonceSize)
      throw ProtocolError(fmt::format("peer {}: handshake nonce of {} bytes (expected {})", peer_, payload.size(),
                                      auth::kNonceSize));
    std::span<const std::byte> mine = std::as_bytes(std::span(my_nonce_));
    const auto& first = initiator_ ? mine : payload;
    const auto& second = initiator_ ? payload : mine;
    transcript_.insert(transcript_.end(), first.begin(), first.end());
    transcript_.insert(transcript_.end(), second.begin(), second.end());
    keys_ = std::make_unique<auth::SessionKeys>(auth::derive(*opts_.key, transcript_));
    auth_ = AuthState::AwaitProof;
    return;
  }
  if (!auth::verify(initiator_ ? keys_->proof_responder : keys_->proof_initiator, transcript_, payload))
    throw ProtocolError(fmt::format(
        "authentication of peer {} failed: its proof does not match key {} (a peer without the key, or a replayed "
        "or altered handshake); connection refused",
        peer_, opts_.key->id_hex()));
  rx_ = auth::Direction(initiator_ ? keys_->frame_r2i : keys_->frame_i2r, false);
  auth_ = AuthState::Done;
}

// ---- send side --------------------------------------------------------------------------------

uint32_t RdmaConnection::credits() const {
  uint32_t outstanding = static_cast<uint32_t>(sends_posted_) - peer_returned_;
  return peer_hello_.recv_depth - outstanding;
}

void RdmaConnection::post_batch() {
  if (batch_n_ == 0) return;
  for (size_t i = 0; i < batch_n_; ++i) {
    batch_wr_[i].sg_list = batch_sge_[i].length ? &batch_sge_[i] : nullptr;
    batch_wr_[i].num_sge = batch_sge_[i].length ? 1 : 0;
    batch_wr_[i].next = i + 1 < batch_n_ ? &batch_wr_[i + 1] : nullptr;
  }
  ibv_send_wr* bad = nullptr;
  int rc = ibv_post_send(res_->id->qp, batch_wr_.data(), &bad);
  batch_n_ = 0;
  if (rc != 0) link_down(fmt::format("ibv_post_send: {} (the queue pair is in the error state)", std::strerror(rc)));
}

uint64_t RdmaConnection::post_wr(const ibv_send_wr& wr, const ibv_sge& sge, uint64_t ring_end, bool force_signal,
                                 size_t ring_bytes) {
  uint64_t seq = next_seq_++;
  bool signal = force_signal || seq - last_signaled_seq_ >= kSignalEvery ||
                unsignaled_ring_bytes_ + ring_bytes >= kRingSize / 4;
  ibv_send_wr& w = batch_wr_[batch_n_];
  w = wr;
  w.wr_id = seq;
  w.send_flags = signal ? IBV_SEND_SIGNALED : 0;
  batch_sge_[batch_n_] = sge;
  ++batch_n_;
  if (signal) {
    last_signaled_seq_ = seq;
    unsignaled_ring_bytes_ = 0;
  } else {
    unsignaled_ring_bytes_ += ring_bytes;
  }
  posted_.push_back(Posted{seq, ring_end});
  if (batch_n_ == batch_wr_.size()) post_batch();
  return seq;
}

// Invariant that makes every wait below finite: at most kSignalEvery - 1 WRs and less than a
// quarter of the ring follow the last signaled WR, so a full send queue or ring always has a
// signaled WR outstanding whose completion frees space.
uint64_t RdmaConnection::reserve(size_t ring_bytes, bool sending) {
  for (;;) {
    uint64_t pos = ring_head_ % kRingSize;
    uint64_t skip = (ring_bytes > 0 && pos + ring_bytes > kRingSize) ? kRingSize - pos : 0;
    bool sq_ok = next_seq_ - 1 - completed_seq_ < kSendDepth;
    bool ring_ok = ring_head_ + skip + ring_bytes - ring_tail_ <= kRingSize;
    if (sq_ok && ring_ok) {
      ring_head_ += skip;
      uint64_t off = ring_head_ % kRingSize;
      ring_head_ += ring_bytes;
      return off;
    }
    post_batch();
    if (!in_pure_ && !in_send_) maybe_pure_message(Clock::now() - last_send_ >= opts_.heartbeat_interval);
    wait_until(Clock::now() + opts_.heartbeat_interval, sending);
  }
}

void RdmaConnection::post_raw_send(std::span<const std::byte> bytes, uint32_t need, bool fill_header,
                                   bool force_signal) {
  // Tagged: every message built here (fill_header) once our handshake proof is out.
  const bool tagged = fill_header && tx_.on();
  const size_t wire = bytes.size() + (tagged ? kFrameTagSize : 0);
  if (wire > kMsgSize) throw Error(fmt::format("message of {} bytes exceeds {}", wire, kMsgSize));
  // Wait for credits, returning ours meanwhile (the rule in rdma_transport.h keeps this finite).
  while (credits() < need) {
    progress();
    if (credits() >= need) break;
    if (!in_pure_) maybe_pure_message(Clock::now() - last_send_ >= opts_.heartbeat_interval);
    if (credits() >= need) break;
    wait_until(Clock::now() + opts_.heartbeat_interval, true);
  }
  // From here until the WR is batched no other SEND may be posted: the header's cumulative
  // counters are filled in last, so the peer sees them in posting order.
  in_send_ = true;
  uint64_t off;
  try {
    off = reserve(wire, true);
  } catch (...) {
    in_send_ = false;
    throw;
  }
  in_send_ = false;
  std::byte* m = res_->ring.data() + off;
  std::memcpy(m, bytes.data(), bytes.size());
  if (fill_header) {
    put_le(m + 8, rx_returned_, 4);
    put_le(m + 24, write_bytes_posted_, 8);
    rx_returned_told_ = rx_returned_;
  }
  if (tagged) {
    // The tag sequence is the posting order, which RC keeps: the peer checks in the same order.
    tx_.begin();
    tx_.update(m, bytes.size());
    auto t = tx_.finish();
    std::memcpy(m + bytes.size(), t.data(), t.size());
    if (tamper_next_) {
      tamper_next_ = false;
      m[bytes.size() > kMsgHeader ? bytes.size() - 1 : 20] ^= std::byte{0x01};
    }
  }
  ibv_sge sge{reinterpret_cast<uintptr_t>(m), static_cast<uint32_t>(wire), res_->ring_mr->lkey};
  ibv_send_wr wr{};
  wr.opcode = IBV_WR_SEND;
  post_wr(wr, sge, ring_head_, force_signal, wire);
  ++sends_posted_;
  bytes_sent_ += wire;
  last_send_ = Clock::now();
}

uint64_t RdmaConnection::post_message(uint8_t kind, uint8_t flags, uint16_t type, uint32_t total,
                                      std::span<const std::byte> payload, uint32_t need, bool force_signal) {
  std::vector<std::byte> msg(kMsgHeader + payload.size());  // counters stamped by post_raw_send
  put_le(msg.data(), kFrameMagic, 4);
  msg[4] = std::byte{kind};
  msg[5] = std::byte{flags};
  put_le(msg.data() + 6, type, 2);
  put_le(msg.data() + 12, total, 4);
  put_le(msg.data() + 16, payload.size(), 4);
  if (!payload.empty()) std::memcpy(msg.data() + kMsgHeader, payload.data(), payload.size());
  post_raw_send(msg, need, true, force_signal);
  return next_seq_ - 1;
}

void RdmaConnection::maybe_pure_message(bool heartbeat_due) {
  uint32_t owed = rx_returned_ - rx_returned_told_;
  if (!heartbeat_due && owed < kRecvDepth / 2) return;
  uint32_t c = credits();
  if (!(c >= 2 || (c >= 1 && owed >= 1))) return;
  in_pure_ = true;
  try {
    post_message(kMsgPure, 0, 0, 0, {}, 1);
    post_batch();
  } catch (...) {
    in_pure_ = false;
    throw;
  }
  in_pure_ = false;
}

void RdmaConnection::wait_completed(uint64_t seq, Clock::time_point deadline) {
  post_batch();
  while (completed_seq_ < seq) {
    progress();
    if (completed_seq_ >= seq) break;
    if (Clock::now() >= deadline) link_down("work requests did not complete in time");
    if (!in_pure_) maybe_pure_message(Clock::now() - last_send_ >= opts_.heartbeat_interval);
    wait_until(std::min(deadline, Clock::now() + opts_.heartbeat_interval), true);
  }
}

void RdmaConnection::send_advert(uint32_t id, const Mr* m) {
  std::array<std::byte, kAdvertSize> a{};
  put_le(a.data(), id, 4);
  if (!m) {
    post_message(kMsgWithdraw, 0, 0, 0, std::span<const std::byte>(a.data(), 4));
  } else {
    // An empty region is advertised with rkey 0 and size 0: known, but nothing fits.
    put_le(a.data() + 4, m->mr ? m->mr->rkey : 0, 4);
    put_le(a.data() + 8, reinterpret_cast<uintptr_t>(m->base), 8);
    put_le(a.data() + 16, m->len, 8);
    post_message(kMsgAdvert, 0, 0, 0, a);
  }
  post_batch();
}

void RdmaConnection::write(uint32_t region, uint64_t offset, std::span<const std::byte> data) {
  guarded([&] {
    if (region == 0) throw Error("write: region id 0 is reserved (use the id the peer registered)");
    if (offset > UINT64_MAX - data.size())
      throw Error(fmt::format("write to region {}: offset {} + length {} overflows", region, offset, data.size()));
    auto fits = [&]() -> const PeerRegion* {
      auto it = peer_regions_.find(region);
      if (it == peer_regions_.end()) return nullptr;
      if (offset > it->second.size || data.size() > it->second.size - offset) return nullptr;
      return &it->second;
    };
    progress();  // applies advertisements that arrived
    const PeerRegion* pr = fits();
    if (!pr) {
      // The peer may have registered just now: its advertisement is on the way.
      auto deadline = Clock::now() + opts_.connect_timeout;
      while (!(pr = fits()) && Clock::now() < deadline) wait_until(deadline, false);
      if (!pr) {
        auto it = peer_regions_.find(region);
        if (it == peer_regions_.end())
          throw ProtocolError(fmt::format("write of {} bytes at offset {} into region {} of peer {}: the peer has not "
                                          "registered region {} (not registered there); write rejected before posting",
                                          data.size(), offset, region, peer_, region));
        throw ProtocolError(fmt::format("write of {} bytes at offset {} into region {} of peer {}: out of range of the "
                                        "advertised {} bytes; write rejected before posting",
                                        data.size(), offset, region, peer_, it->second.size));
      }
    }
    if (data.empty()) return;
    PeerRegion dst = *pr;
    const ibv_mr* src = source_mr(data.data(), data.size());
    size_t pos = 0;
    while (pos < data.size()) {
      size_t n = std::min(data.size() - pos, kMaxWriteChunk);
      bool last = pos + n == data.size();
      ibv_sge sge{};
      uint64_t ring_end;
      if (src) {
        reserve(0, true);
        ring_end = ring_head_;
        sge = ibv_sge{reinterpret_cast<uintptr_t>(data.data() + pos), static_cast<uint32_t>(n), src->lkey};
      } else {
        uint64_t off = reserve(n, true);
        ring_end = ring_head_;
        std::memcpy(res_->ring.data() + off, data.data() + pos, n);
        sge = ibv_sge{reinterpret_cast<uintptr_t>(res_->ring.data() + off), static_cast<uint32_t>(n),
                      res_->ring_mr->lkey};
      }
      ibv_send_wr wr{};
      wr.opcode = IBV_WR_RDMA_WRITE;
      wr.wr.rdma.remote_addr = dst.addr + offset + pos;
      wr.wr.rdma.rkey = dst.rkey;
      uint64_t seq = post_wr(wr, sge, ring_end, src && last, src ? 0 : n);
      if (src && last) zc_seq_ = seq;
      write_bytes_posted_ += n;
      bytes_sent_ += n;
      pos += n;
    }
    post_batch();
  });
}

void RdmaConnection::send_control(uint16_t type, std::span<const std::byte> body) {
  if (type == 0) throw Error("send_control: message type 0 is reserved (Invalid)");
  if (body.size() > kMaxControlBody)
    throw Error(fmt::format("send_control type {}: body of {} bytes exceeds the {}-byte limit", type, body.size(),
                            kMaxControlBody));
  guarded([&] {
    size_t pos = 0;
    do {
      size_t n = std::min(body.size() - pos, kMaxFragment);
      uint8_t flags = static_cast<uint8_t>((pos == 0 ? kFirst : 0) | (pos + n == body.size() ? kLast : 0));
      post_message(kMsgControl, flags, type, static_cast<uint32_t>(body.size()), body.subspan(pos, n));
      pos += n;
    } while (pos < body.size());
    post_batch();
    // Zero-copy sources of earlier writes become reusable when send_control() returns.
    wait_completed(zc_seq_);
  });
}

void RdmaConnection::flush() {
  guarded([&] {
    post_batch();
    wait_completed(zc_seq_);
  });
}

void RdmaConnection::send_raw_message_for_test(std::span<const std::byte> raw) {
  guarded([&] {
    post_raw_send(raw, 1, false, false);
    post_batch();
  });
}

std::optional<ControlMessage> RdmaConnection::poll(std::chrono::milliseconds timeout) {
  return guarded([&]() -> std::optional<ControlMessage> {
    auto deadline = Clock::now() + timeout;
    for (;;) {
      progress();
      if (!pending_.empty()) {
        ControlMessage m = std::move(pending_.front());
        pending_.pop_front();
        pending_bytes_ -= m.body.size();
        repost_deferred();
        maybe_pure_message(false);
        return m;
      }
      auto now = Clock::now();
      maybe_pure_message(now - last_send_ >= opts_.heartbeat_interval);
      post_batch();
      if (now >= deadline) return std::nullopt;
      // Wake for the next heartbeat, but never spin when one is overdue (no credit yet).
      auto hb = std::max<Clock::time_point>(last_send_ + opts_.heartbeat_interval, now + std::chrono::milliseconds(1));
      wait_until(std::min(deadline, hb), false);
      if (!pending_.empty()) continue;
      if (Clock::now() >= deadline) {
        progress();
        if (pending_.empty()) return std::nullopt;
      }
    }
  });
}

}  // namespace ftvm::transport::rdma
