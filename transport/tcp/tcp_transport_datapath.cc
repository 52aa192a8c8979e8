// TCP fabric, data path: queuing and sending frames, receiving and applying them.
// Setup (listen/connect/handshake/registration) is in tcp_transport.cc.
#include <poll.h>
#include <sys/socket.h>
#include <sys/uio.h>

#include <algorithm>
#include <climits>
#include <cstring>

#include <fmt/format.h>

#include "common/error.h"
#include "transport/tcp/tcp_transport.h"

namespace ftvm::transport::tcp {

namespace {
// write() pushes the queue out once it holds this many iovecs or bytes.
constexpr size_t kFlushIovecs = 512;
constexpr size_t kFlushBytes = 4u << 20;
// Largest Write frame this side sends (also bounded by the peer's Hello).
constexpr uint32_t kSendSplit = 1u << 20;

bool is_link_error(int err) {
  switch (err) {
    case ECONNRESET:
    case EPIPE:
    case ETIMEDOUT:
    case ECONNABORTED:
    case EHOSTUNREACH:
    case ENETUNREACH:
    case ENETDOWN:
    case EHOSTDOWN:
    case ENOTCONN: return true;
    default: return false;
  }
}

int to_poll_ms(std::chrono::steady_clock::duration d) {
  auto ms = std::chrono::ceil<std::chrono::milliseconds>(d).count();
  return static_cast<int>(std::clamp<long long>(ms, 0, 1 << 30));
}
}  // namespace

template <typename F>
auto TcpConnection::guarded(F&& f) -> decltype(f()) {
  return failure_.guard(peer_, std::forward<F>(f));
}

void TcpConnection::link_error(int err, const char* what) {
  if (is_link_error(err))
    throw LinkDown(fmt::format("{} {}: {} (the peer or the network went away)", what, peer_, std::strerror(err)));
  throw SysError(err, fmt::format("{} {}", what, peer_));
}

// ---- send side ------------------------------------------------------------------------------

void TcpConnection::queue_frame(const FrameHeader& h, std::span<const std::byte> payload) {
  auto& slot = tx_hdrs_.emplace_back();
  encode_header(h, slot);
  queue_data(slot.data(), slot.size());
  if (!tx_.on()) {
    queue_data(payload.data(), payload.size());
    return;
  }
  tx_.begin();
  tx_.update(slot.data(), slot.size());
  if (!payload.empty()) {
    // The tag must cover exactly the bytes the kernel sends. Pre-copy writes live guest RAM,
    // which may change between now and sendmsg(), so the payload is copied (or encrypted) into
    // a buffer of ours first, in the same pass that feeds the tag.
    std::vector<std::byte>* c;
    if (!tx_spare_.empty()) {
      tx_copy_.push_back(std::move(tx_spare_.back()));
      tx_spare_.pop_back();
      c = &tx_copy_.back();
    } else {
      c = &tx_copy_.emplace_back();
    }
    c->resize(payload.size());
    if (tx_.encrypt()) tx_.crypt(c->data(), payload.data(), payload.size());
    else std::memcpy(c->data(), payload.data(), payload.size());
    tx_.update(c->data(), c->size());
    queue_data(c->data(), c->size());
  }
  auto& tag = tx_tags_.emplace_back(tx_.finish());
  queue_data(tag.data(), tag.size());
}

void TcpConnection::queue_data(const void* p, size_t n) {
  if (n == 0) return;
  tx_iov_.push_back(iovec{const_cast<void*>(p), n});
  tx_queued_bytes_ += n;
}

bool TcpConnection::try_send() {
  while (tx_pos_ < tx_iov_.size()) {
    msghdr m{};
    m.msg_iov = &tx_iov_[tx_pos_];
    m.msg_iovlen = std::min<size_t>(tx_iov_.size() - tx_pos_, IOV_MAX);
    ssize_t n = ::sendmsg(fd_.get(), &m, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) return false;
      link_error(errno, "send to");
    }
    size_t left = static_cast<size_t>(n);
    bytes_sent_ += left;
    tx_queued_bytes_ -= left;
    tx_last_ = Clock::now();
    while (left > 0) {
      iovec& v = tx_iov_[tx_pos_];
      size_t k = std::min(left, v.iov_len);
      v.iov_base = static_cast<char*>(v.iov_base) + k;
      v.iov_len -= k;
      left -= k;
      if (v.iov_len == 0) ++tx_pos_;
    }
  }
  tx_iov_.clear();
  tx_pos_ = 0;
  tx_hdrs_.clear();
  tx_tags_.clear();
  // Keep a few payload buffers for the next frames (bounded: kFlushBytes of them at most).
  for (auto& b : tx_copy_)
    if (tx_spare_.size() < 8) tx_spare_.push_back(std::move(b));
  tx_copy_.clear();
  tx_queued_bytes_ = 0;
  return true;
}

void TcpConnection::check_stall() {
  auto last = std::max(tx_last_, last_rx_);
  if (Clock::now() - last > opts_.stall_timeout)
    throw LinkDown(fmt::format("send to {}: no progress and nothing received for {} ms (the peer is not reading; "
                               "treating the link as down)",
                               peer_, opts_.stall_timeout.count()));
}

void TcpConnection::flush_blocking() {
  for (;;) {
    parse(false);  // bytes left over by an earlier poll()
    if (try_send()) return;
    check_stall();
    short events = POLLOUT;
    bool can_read = pending_bytes_ < kMaxPendingControlBytes;
    if (can_read) events |= POLLIN;
    pollfd p{fd_.get(), events, 0};
    int r = ::poll(&p, 1, to_poll_ms(opts_.heartbeat_interval));
    if (r < 0) {
      if (errno == EINTR) continue;
      throw SysError(errno, "poll socket to " + peer_);
    }
    // Keep receiving while the peer is slow to read, so two peers sending at each other at
    // once cannot deadlock with both socket buffers full.
    if (can_read && (p.revents & (POLLIN | POLLHUP | POLLERR))) {
      read_some();
      parse(false);
    }
  }
}

void TcpConnection::maybe_heartbeat() {
  if (tx_pending() || Clock::now() - tx_last_ < opts_.heartbeat_interval) return;
  queue_frame(FrameHeader{.kind = FrameKind::Heartbeat});
}

void TcpConnection::write(uint32_t region, uint64_t offset, std::span<const std::byte> data) {
  guarded([&] {
    if (region == 0) throw Error("write: region id 0 is reserved (use the id the peer registered)");
    if (offset > UINT64_MAX - data.size())
      throw Error(fmt::format("write to region {}: offset {} + length {} overflows", region, offset, data.size()));
    uint32_t split = std::min(kSendSplit, peer_max_write_);
    size_t pos = 0;
    do {
      size_t n = std::min<size_t>(data.size() - pos, split);
      queue_frame(FrameHeader{.kind = FrameKind::Write,
                              .field = region,
                              .length = static_cast<uint32_t>(n),
                              .offset = offset + pos},
                  data.subspan(pos, n));
      pos += n;
    } while (pos < data.size());
    if (tx_iov_.size() - tx_pos_ >= kFlushIovecs || tx_queued_bytes_ >= kFlushBytes) flush_blocking();
  });
}

void TcpConnection::send_control(uint16_t type, std::span<const std::byte> body) {
  guarded([&] {
    if (type == 0) throw Error("send_control: message type 0 is reserved (Invalid)");
    if (body.size() > kMaxControlBody)
      throw Error(fmt::format("send_control type {}: body of {} bytes exceeds the {}-byte limit", type, body.size(),
                              kMaxControlBody));
    // `body` need only live during this call: flush_blocking() sends everything before returning.
    queue_frame(FrameHeader{.kind = FrameKind::Control, .field = type, .length = static_cast<uint32_t>(body.size())},
                body);
    flush_blocking();
  });
}

void TcpConnection::flush() {
  guarded([&] { flush_blocking(); });
}

// ---- receive side ---------------------------------------------------------------------------

void TcpConnection::read_some() {
  ssize_t n;
  if (rx_in_payload_ && rx_dst_ && rx_remaining_ > 0 && rx_begin_ == rx_end_) {
    // Payload straight into its destination; whatever follows lands in the buffer.
    rx_begin_ = rx_end_ = 0;
    iovec v[2] = {{rx_dst_, rx_remaining_}, {rx_buf_.data(), rx_buf_.size()}};
    do n = ::readv(fd_.get(), v, 2);
    while (n < 0 && errno == EINTR);
    if (n > 0) {
      size_t k = std::min(static_cast<size_t>(n), rx_remaining_);
      rx_consumed(rx_dst_, k);
      rx_dst_ += k;
      rx_remaining_ -= k;
      rx_end_ = static_cast<size_t>(n) - k;
      last_rx_ = Clock::now();
    }
  } else {
    if (rx_begin_ > 0) {
      std::memmove(rx_buf_.data(), rx_buf_.data() + rx_begin_, rx_end_ - rx_begin_);
      rx_end_ -= rx_begin_;
      rx_begin_ = 0;
    }
    if (rx_end_ == rx_buf_.size()) return;  // full of unparsed frames: parse() first
    do n = ::recv(fd_.get(), rx_buf_.data() + rx_end_, rx_buf_.size() - rx_end_, MSG_DONTWAIT);
    while (n < 0 && errno == EINTR);
    if (n > 0) rx_end_ += static_cast<size_t>(n);
  }
  if (n == 0) throw LinkDown(fmt::format("receive from {}: the peer closed the connection (EOF)", peer_));
  if (n < 0) {
    if (errno == EAGAIN || errno == EWOULDBLOCK) return;
    link_error(errno, "receive from");
  }
  bytes_received_ += static_cast<uint64_t>(n);
}

void TcpConnection::parse(bool stop_after_control) {
  for (;;) {
    if (!rx_in_payload_) {
      if (rx_end_ - rx_begin_ < kFrameHeaderSize) return;
      const std::byte* hp = rx_buf_.data() + rx_begin_;
      FrameHeader h = decode_header(std::span<const std::byte, kFrameHeaderSize>(hp, kFrameHeaderSize));
      if (rx_.on()) {
        rx_.begin();
        rx_.update(hp, kFrameHeaderSize);
      }
      rx_begin_ += kFrameHeaderSize;
      last_rx_ = Clock::now();
      rx_dst_ = nullptr;
      switch (h.kind) {
        case FrameKind::Write: {
          auto it = regions_.find(h.field);
          if (it == regions_.end())
            throw ProtocolError(fmt::format("peer {} wrote {} bytes at offset {} into region {}, which is not "
                                            "registered here; write rejected",
                                            peer_, h.length, h.offset, h.field));
          size_t size = it->second.size();
          if (h.offset > size || h.length > size - h.offset)
            throw ProtocolError(fmt::format("peer {} wrote {} bytes at offset {} into region {} of {} bytes: out of "
                                            "range; write rejected",
                                            peer_, h.length, h.offset, h.field, size));
          rx_dst_ = it->second.data() + h.offset;
          rx_region_ = h.field;
          break;
        }
        case FrameKind::Control:
          rx_ctl_.type = static_cast<uint16_t>(h.field);
          rx_ctl_.body.resize(h.length);  // <= kMaxControlBody, checked by decode_header
          rx_dst_ = rx_ctl_.body.data();
          break;
        case FrameKind::Heartbeat:
        case FrameKind::Goodbye: break;  // acted on once complete (after the tag)
        case FrameKind::Hello:
        case FrameKind::Auth:
        case FrameKind::Invalid:
          throw ProtocolError(fmt::format("peer {} sent a {} frame after the handshake", peer_, kind_name(h.kind)));
      }
      rx_in_payload_ = true;
      rx_kind_ = h.kind;
      rx_remaining_ = h.length;
      rx_length_ = h.length;
      rx_plain_ = h.length ? rx_dst_ : nullptr;
      rx_tag_fill_ = 0;
    }
    size_t n = std::min(rx_remaining_, rx_end_ - rx_begin_);
    if (n > 0) {
      const std::byte* src = rx_buf_.data() + rx_begin_;
      rx_consumed(src, n);
      if (rx_dst_) {
        std::memcpy(rx_dst_, src, n);
        rx_dst_ += n;
      }
      rx_begin_ += n;
      rx_remaining_ -= n;
    }
    if (rx_remaining_ > 0) return;
    if (rx_.on()) {
      size_t t = std::min(kFrameTagSize - rx_tag_fill_, rx_end_ - rx_begin_);
      std::memcpy(rx_tag_.data() + rx_tag_fill_, rx_buf_.data() + rx_begin_, t);
      rx_tag_fill_ += t;
      rx_begin_ += t;
      if (rx_tag_fill_ < kFrameTagSize) return;
    }
    bool stop = false;
    complete_frame(stop);
    if (stop && stop_after_control) return;
  }
}

void TcpConnection::complete_frame(bool& stop) {
  rx_in_payload_ = false;
  rx_dst_ = nullptr;
  if (rx_.on()) {
    const uint64_t seq = rx_.seq() - 1;
    if (!rx_.finish_and_check(rx_tag_))
      throw ProtocolError(fmt::format(
          "frame {} ({}, {} bytes) from {} failed authentication: its tag does not match (altered, replayed, "
          "reordered or injected on the way); connection dropped, nothing after the last verified control message "
          "is trusted",
          seq, kind_name(rx_kind_), rx_length_, peer_));
    if (rx_.encrypt() && rx_plain_) rx_.crypt(rx_plain_, rx_plain_, rx_length_);
  }
  rx_plain_ = nullptr;
  switch (rx_kind_) {
    case FrameKind::Control:
      pending_bytes_ += rx_ctl_.body.size();
      pending_.push_back(std::move(rx_ctl_));
      rx_ctl_ = ControlMessage{};
      stop = true;
      break;
    case FrameKind::Goodbye:
      throw LinkDown(fmt::format("receive from {}: the peer closed the connection (Goodbye)", peer_));
    default: break;
  }
}

std::optional<ControlMessage> TcpConnection::poll(std::chrono::milliseconds timeout) {
  return guarded([&]() -> std::optional<ControlMessage> {
    auto deadline = Clock::now() + timeout;
    if (pending_.empty()) parse(true);
    for (;;) {
      if (!pending_.empty()) {
        ControlMessage m = std::move(pending_.front());
        pending_.pop_front();
        pending_bytes_ -= m.body.size();
        return m;
      }
      maybe_heartbeat();
      if (tx_pending() && !try_send()) check_stall();
      auto now = Clock::now();
      auto wait = deadline > now ? deadline - now : Clock::duration::zero();
      if (!tx_pending()) wait = std::min(wait, std::max(tx_last_ + opts_.heartbeat_interval - now, Clock::duration::zero()));
      else wait = std::min<Clock::duration>(wait, opts_.heartbeat_interval);
      pollfd p{fd_.get(), static_cast<short>(POLLIN | (tx_pending() ? POLLOUT : 0)), 0};
      int r = ::poll(&p, 1, to_poll_ms(wait));
      if (r < 0 && errno != EINTR) throw SysError(errno, "poll socket to " + peer_);
      if (r > 0 && (p.revents & (POLLIN | POLLHUP | POLLERR))) {
        read_some();
        parse(true);
      }
      if (pending_.empty() && Clock::now() >= deadline) return std::nullopt;
    }
  });
}

}  // namespace ftvm::transport::tcp
