#include "checkpoint/arbiter.h"

#include <algorithm>
#include <chrono>
#include <fmt/format.h>

namespace ftvm::checkpoint {

const char* to_string(ArbiterAnswer a) {
  switch (a) {
    case ArbiterAnswer::Invalid: return "invalid";
    case ArbiterAnswer::Yes: return "yes";
    case ArbiterAnswer::Wait: return "wait";
    case ArbiterAnswer::Fence: return "fence";
  }
  return "?";
}

namespace {

class NoArbiter final : public Arbiter {
 public:
  explicit NoArbiter(std::chrono::milliseconds alone_after) : alone_after_(alone_after) {}
  std::string kind() const override { return "none"; }
  ArbiterAnswer may_activate(const ArbiterSubject& s, std::chrono::milliseconds) override {
    if (s.forced || s.heartbeat_timeout.count() <= 0) return ArbiterAnswer::Yes;
    // Any primary runs alone no earlier than 2 T after it last heard this standby; this side
    // last heard the primary at most a heartbeat period and a frame's delay before that. A
    // silence of 1.5 T leaves half a timeout for both.
    return s.silent_for < s.heartbeat_timeout * 3 / 2 ? ArbiterAnswer::Yes : ArbiterAnswer::Fence;
  }
  ArbiterAnswer may_run_alone(const ArbiterSubject& s, std::chrono::milliseconds) override {
    const auto need = std::max(alone_after_, 2 * s.peer_timeout);
    return s.silent_for >= need ? ArbiterAnswer::Yes : ArbiterAnswer::Wait;
  }
  ArbiterStatus status() const override {
    return {"none",
            fmt::format("nothing: split-brain unprotected (a partition between two live hosts runs two copies; "
                        "the primary runs alone after {} ms without the standby)",
                        alone_after_.count()),
            false, 0};
  }

 private:
  const std::chrono::milliseconds alone_after_;
};

}  // namespace

std::unique_ptr<Arbiter> make_no_arbiter(std::chrono::milliseconds alone_after) {
  return std::make_unique<NoArbiter>(alone_after);
}

}  // namespace ftvm::checkpoint
