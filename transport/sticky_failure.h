// StickyFailure: the rule of transport.h that after a Connection method threw LinkDown or
// ProtocolError, every later call throws LinkDown restating that first failure. One per
// connection, in every fabric (tcp/, rdma/, fake/).
#pragma once

#include <string>

#include "common/error.h"

namespace ftvm::transport {

class StickyFailure {
 public:
  bool failed() const { return !what_.empty(); }
  const std::string& what() const { return what_; }
  // Records `why` as the failure unless one is recorded already.
  void set(const std::string& why) {
    if (what_.empty()) what_ = why;
  }
  // Throws LinkDown restating the recorded failure of the connection to `peer`, if any.
  void check(const std::string& peer) const {
    if (failed()) throw LinkDown("connection to " + peer + " already failed: " + what_);
  }
  // check(), then runs `f`; a LinkDown or ProtocolError escaping `f` is recorded and rethrown.
  template <typename F>
  auto guard(const std::string& peer, F&& f) -> decltype(f()) {
    check(peer);
    try {
      return f();
    } catch (const LinkDown& e) {
      set(e.what());
      throw;
    } catch (const ProtocolError& e) {
      set(e.what());
      throw;
    }
  }

 private:
  std::string what_;
};

}  // namespace ftvm::transport
