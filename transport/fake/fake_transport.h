// In-process fake transport for engine unit tests: make_pair() returns two connected
// Connections over in-memory queues (header-only; no sockets, no threads of its own).
//
// It honours the transport.h contract (ordering of writes before control messages, region
// bounds checks with ProtocolError, heartbeats and idle_for, LinkDown once the peer object is
// destroyed or close_peer_link() was called) and passes the conformance suite. Differences
// from real fabrics, on purpose: write() copies `data` at once (callers may reuse it
// immediately), and there is no framing to corrupt. Each direction holds at most
// kFakeQueueBytes of queued payload; a sender over that waits, applying its own inbound
// traffic meanwhile, like the TCP backend. The two ends may be used from two threads (one
// thread per end).
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include <fmt/format.h>

#include "common/error.h"
#include "transport/sticky_failure.h"
#include "transport/transport.h"

namespace ftvm::transport::fake {

inline constexpr size_t kFakeQueueBytes = 32u << 20;

namespace detail {
struct Item {
  enum Kind { Write, Control, Heartbeat } kind;
  uint32_t id = 0;  // region or control type
  uint64_t offset = 0;
  std::vector<std::byte> data;
};
// One direction. `closed` is set when either end goes away.
struct Channel {
  std::mutex mu;
  std::condition_variable cv;
  std::deque<Item> q;
  size_t bytes = 0;
  bool closed = false;
  uint64_t bytes_total = 0;
};
}  // namespace detail

class FakeConnection final : public Connection {
 public:
  using Clock = std::chrono::steady_clock;
  FakeConnection(std::shared_ptr<detail::Channel> in, std::shared_ptr<detail::Channel> out, Options o,
                 std::string name)
      : in_(std::move(in)), out_(std::move(out)), opts_(o), name_(std::move(name)) {}
  ~FakeConnection() override { close_link(); }

  // Simulates the link dying: the peer's next calls throw LinkDown (after it consumed what
  // was already queued to it).
  void close_link() {
    for (auto* ch : {in_.get(), out_.get()}) {
      std::lock_guard<std::mutex> g(ch->mu);
      ch->closed = true;
      ch->cv.notify_all();
    }
  }

  void register_region(uint32_t id, std::span<std::byte> mem) override {
    if (id == 0) throw Error("register_region: region id 0 is reserved (use a nonzero id)");
    regions_[id] = mem;
  }
  void unregister_region(uint32_t id) override { regions_.erase(id); }

  // Connection::register_source(): nothing to register (write() copies at once); the fake
  // only remembers the spans, so that a test can check a session releases what it registered.
  void register_source(std::span<const std::byte> mem) override {
    check_usable();
    if (!mem.empty()) sources_[mem.data()] = mem.size();
  }
  void unregister_source(std::span<const std::byte> mem) override { sources_.erase(mem.data()); }
  // Spans registered with register_source() and not unregistered since.
  size_t registered_sources() const { return sources_.size(); }

  void write(uint32_t region, uint64_t offset, std::span<const std::byte> data) override {
    check_usable();
    if (region == 0) throw Error("write: region id 0 is reserved (use the id the peer registered)");
    push(detail::Item{detail::Item::Write, region, offset, {data.begin(), data.end()}});
  }
  void send_control(uint16_t type, std::span<const std::byte> body) override {
    check_usable();
    if (type == 0) throw Error("send_control: message type 0 is reserved (Invalid)");
    if (body.size() > kMaxControlBody)
      throw Error(fmt::format("send_control type {}: body of {} bytes exceeds the {}-byte limit", type, body.size(),
                              kMaxControlBody));
    push(detail::Item{detail::Item::Control, type, 0, {body.begin(), body.end()}});
  }
  void flush() override { check_usable(); }

  std::optional<ControlMessage> poll(std::chrono::milliseconds timeout) override {
    check_usable();
    auto deadline = Clock::now() + timeout;
    for (;;) {
      drain(true);
      if (!pending_.empty()) {
        ControlMessage m = std::move(pending_.front());
        pending_.pop_front();
        return m;
      }
      if (Clock::now() - tx_last_ >= opts_.heartbeat_interval) push(detail::Item{detail::Item::Heartbeat, 0, 0, {}});
      auto now = Clock::now();
      if (now >= deadline) return std::nullopt;
      auto wake = std::min(deadline, tx_last_ + opts_.heartbeat_interval);
      std::unique_lock<std::mutex> l(in_->mu);
      in_->cv.wait_until(l, wake, [&] { return !in_->q.empty() || in_->closed; });
    }
  }

  std::chrono::milliseconds idle_for() const override {
    return std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - last_rx_);
  }
  std::string peer() const override { return name_; }
  const char* backend() const override { return "fake"; }
  uint64_t bytes_sent() const override { return sent_; }
  uint64_t bytes_received() const override { return received_; }

 private:
  void check_usable() const { failure_.check(name_); }
  [[noreturn]] void fail_link(const std::string& msg) {
    failure_.set(msg);
    throw LinkDown(msg);
  }

  void push(detail::Item it) {
    size_t n = it.data.size() + 32;  // count a nominal header, like the TCP framing
    for (;;) {
      {
        std::unique_lock<std::mutex> l(out_->mu);
        if (out_->closed) {
          l.unlock();
          fail_link("send to " + name_ + ": the peer closed the connection");
        }
        if (out_->bytes + n <= kFakeQueueBytes || out_->q.empty()) {
          out_->bytes += n;
          out_->q.push_back(std::move(it));
          out_->cv.notify_all();
          break;
        }
      }
      drain(false);  // keep receiving while the peer is slow (no deadlock when both send)
      std::unique_lock<std::mutex> l(out_->mu);
      out_->cv.wait_for(l, std::chrono::milliseconds(1));
    }
    sent_ += n;
    tx_last_ = Clock::now();
  }

  // Applies queued inbound items; with `stop_after_control` returns after one control message.
  void drain(bool stop_after_control) {
    for (;;) {
      detail::Item it;
      {
        std::lock_guard<std::mutex> g(in_->mu);
        if (in_->q.empty()) {
          if (in_->closed && pending_.empty()) {
            fail_link("receive from " + name_ + ": the peer closed the connection");
          }
          return;
        }
        it = std::move(in_->q.front());
        in_->q.pop_front();
        in_->bytes -= it.data.size() + 32;
        in_->cv.notify_all();
      }
      received_ += it.data.size() + 32;
      last_rx_ = Clock::now();
      if (it.kind == detail::Item::Write) {
        auto r = regions_.find(it.id);
        if (r == regions_.end()) {
          failure_.set(fmt::format("peer {} wrote {} bytes at offset {} into region {}, which is not registered here; "
                                "write rejected",
                                name_, it.data.size(), it.offset, it.id));
          throw ProtocolError(failure_.what());
        }
        if (it.offset > r->second.size() || it.data.size() > r->second.size() - it.offset) {
          failure_.set(fmt::format("peer {} wrote {} bytes at offset {} into region {} of {} bytes: out of range; write "
                                "rejected",
                                name_, it.data.size(), it.offset, it.id, r->second.size()));
          throw ProtocolError(failure_.what());
        }
        if (!it.data.empty()) std::memcpy(r->second.data() + it.offset, it.data.data(), it.data.size());
      } else if (it.kind == detail::Item::Control) {
        pending_.push_back(ControlMessage{static_cast<uint16_t>(it.id), std::move(it.data)});
        if (stop_after_control) return;
      }
    }
  }

  std::shared_ptr<detail::Channel> in_, out_;
  Options opts_;
  std::string name_;
  StickyFailure failure_;
  std::unordered_map<uint32_t, std::span<std::byte>> regions_;
  std::unordered_map<const std::byte*, size_t> sources_;  // register_source(): start -> size
  std::deque<ControlMessage> pending_;
  Clock::time_point last_rx_ = Clock::now();
  Clock::time_point tx_last_ = Clock::now();
  uint64_t sent_ = 0, received_ = 0;
};

// Two connected fake Connections: first = "a", second = "b".
inline std::pair<std::unique_ptr<FakeConnection>, std::unique_ptr<FakeConnection>> make_pair(Options o = {}) {
  auto ab = std::make_shared<detail::Channel>();
  auto ba = std::make_shared<detail::Channel>();
  return {std::make_unique<FakeConnection>(ba, ab, o, "fake-peer-b"),
          std::make_unique<FakeConnection>(ab, ba, o, "fake-peer-a")};
}

}  // namespace ftvm::transport::fake
