// QmpClient: a synchronous client for QEMU's QMP monitor on a unix socket.
//
// Contract: connect() reads the greeting, checks it is QMP (a peer that is not QEMU is
// rejected with a clear ftvm::Error naming the socket) and negotiates capabilities. execute()
// sends one command and returns its "return" value; a QMP error reply throws QmpError with
// QEMU's class and description; a malformed reply, EOF, or no reply within the timeout throws
// ftvm::Error (the connection is then unusable). Asynchronous events received while waiting are
// queued and returned by take_events(). Not thread-safe: one thread per client.
#pragma once

#include <chrono>
#include <deque>
#include <string>
#include <sys/types.h>

#include <nlohmann/json.hpp>

#include "common/error.h"
#include "common/fd.h"

namespace ftvm::vmm {

class QmpError : public Error {
 public:
  QmpError(const std::string& cmd, const std::string& cls, const std::string& desc);
  const std::string& error_class() const { return cls_; }

 private:
  std::string cls_;
};

class QmpClient {
 public:
  // Connects to `socket_path`, waiting up to `timeout` for it to appear/accept.
  static QmpClient connect(const std::string& socket_path,
                           std::chrono::milliseconds timeout = std::chrono::milliseconds(5000));

  QmpClient(QmpClient&&) noexcept = default;
  QmpClient& operator=(QmpClient&&) noexcept = default;

  // Runs `cmd` with `args` (object or null) and returns the "return" member.
  nlohmann::json execute(const std::string& cmd, const nlohmann::json& args = nullptr);
  // Same, passing `fd` to QEMU with SCM_RIGHTS alongside the command (for getfd / add-fd).
  nlohmann::json execute_with_fd(const std::string& cmd, const nlohmann::json& args, int fd);

  // Events received so far (oldest first); clears the queue.
  std::deque<nlohmann::json> take_events();

  // The QEMU process on the other end of the socket (SO_PEERCRED).
  pid_t peer_pid() const { return peer_pid_; }
  const std::string& path() const { return path_; }
  void set_timeout(std::chrono::milliseconds t) { timeout_ = t; }

 private:
  QmpClient() = default;
  nlohmann::json read_message();  // one JSON object; throws on EOF/timeout/malformed
  nlohmann::json await_return(const std::string& cmd);
  void send_line(const std::string& line, int fd);

  UniqueFd fd_;
  std::string path_;
  std::string rbuf_;
  std::deque<nlohmann::json> events_;
  pid_t peer_pid_ = -1;
  std::chrono::milliseconds timeout_{10000};
};

}  // namespace ftvm::vmm
