// Project-wide error convention: failures are reported by throwing ftvm::Error (or a subclass).
//
// Every message names what failed, on what, and what the user can do about it, e.g.
//   "open /proc/123/pagemap: Permission denied (run ftd as root)".
// System-call failures use SysError, which appends strerror(errno). Code that must not throw
// (signal handlers, destructors, the guard process) reports through return values instead.
#pragma once

#include <cerrno>
#include <stdexcept>
#include <string>

#include <fmt/format.h>

namespace ftvm {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& what) : std::runtime_error(what) {}
};

// A failed system call. `what` says which call on which object; `hint` (optional) what to do.
class SysError : public Error {
 public:
  SysError(int err, const std::string& what, const std::string& hint = {});
  int code() const noexcept { return err_; }

 private:
  int err_;
};

// The peer broke the wire protocol (malformed frame, bad version, digest mismatch).
class ProtocolError : public Error {
 public:
  using Error::Error;
};

// The link to the peer is gone (EOF, reset, timeout). Sessions turn this into "link down".
class LinkDown : public Error {
 public:
  using Error::Error;
};

// Throws SysError(errno, what) when `ret` is negative; returns `ret` otherwise.
template <typename T>
T check_sys(T ret, const std::string& what, const std::string& hint = {}) {
  if (ret < 0) throw SysError(errno, what, hint);
  return ret;
}

template <typename... Args>
[[noreturn]] void fail(fmt::format_string<Args...> f, Args&&... args) {
  throw Error(fmt::format(f, std::forward<Args>(args)...));
}

}  // namespace ftvm
