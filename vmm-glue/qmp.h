// QmpClient: a synchronous client for QEMU's QMP monitor on a unix socket.
//
// Contract: connect() reads the greeting, checks it is QMP (a peer that is not QEMU is
// rejected with a clear ftvm::Error naming the socket) and negotiates capabilities. execute()
// sends one command and returns its "return" value; a QMP error reply throws QmpError with
// QEMU's class and description; a malformed reply, EOF, or no reply within the timeout throws
// ftvm::Error (the connection is then closed: later calls throw until a new connect()).
// Asynchronous events received while waiting are queued and returned by take_events() /
// wait_event(). Not thread-safe: one thread per client.
//
// Framing: each message is one top-level JSON object; objects may arrive split across reads or
// several per read, one per line (QEMU's -qmp) or spread over lines (-qmp-pretty).
// Matching: every command is sent with a fresh numeric "id"; one command is in flight at a time.
// A reply carrying another id is a protocol error; a reply without "id" is QEMU's answer to a
// request it could not parse and is taken as the reply to the command in flight.
// Sending blocks (commands are small and QEMU's monitor reads them promptly); the timeout bounds
// the wait for the reply.
#pragma once

#include <chrono>
#include <deque>
#include <optional>
#include <string>
#include <sys/types.h>

#include <nlohmann/json.hpp>

#include "common/error.h"
#include "common/fd.h"
#include "vmm-glue/monitor.h"

namespace ftvm::vmm {

class QmpClient : public Monitor {
 public:
  // Connects to `socket_path`, waiting up to `timeout` for it to appear/accept.
  static QmpClient connect(const std::string& socket_path,
                           std::chrono::milliseconds timeout = std::chrono::milliseconds(5000));

  QmpClient(QmpClient&&) noexcept = default;
  QmpClient& operator=(QmpClient&&) noexcept = default;

  // Runs `cmd` with `args` (object or null) and returns the "return" member.
  nlohmann::json execute(const std::string& cmd, const nlohmann::json& args = nullptr) override;
  // Same, passing `fd` to QEMU with SCM_RIGHTS alongside the command (for getfd / add-fd).
  nlohmann::json execute_with_fd(const std::string& cmd, const nlohmann::json& args, int fd) override;

  // Events received so far, plus those already readable on the socket (read without waiting),
  // oldest first; clears the queue. At most 4096 are kept (the oldest are dropped with a
  // warning) when the owner never takes them. EOF while reading closes the client (connected()
  // becomes false) but the events read before it are returned.
  std::deque<nlohmann::json> take_events() override;
  // Returns the first event named `name` (already queued or arriving within `timeout`) and
  // removes it from the queue; other events stay queued. std::nullopt on timeout (the connection
  // stays usable). A command reply arriving here is a protocol error.
  std::optional<nlohmann::json> wait_event(const std::string& name,
                                           std::chrono::milliseconds timeout);

  // The QEMU process on the other end of the socket (SO_PEERCRED).
  pid_t peer_pid() const { return peer_pid_; }
  const std::string& path() const { return path_; }
  // Bound on the wait for each command's reply (default 10 s).
  void set_timeout(std::chrono::milliseconds t) { timeout_ = t; }
  bool connected() const override { return fd_.valid(); }
  std::string describe() const override { return "QMP socket " + path_; }

 private:
  QmpClient() = default;
  nlohmann::json read_message();  // one JSON object; throws on EOF/timeout/malformed
  // Same with an absolute deadline; returns std::nullopt on timeout when !timeout_is_error.
  std::optional<nlohmann::json> read_message(std::chrono::steady_clock::time_point deadline,
                                             bool timeout_is_error);
  void queue_event(nlohmann::json ev);
  nlohmann::json await_return(const std::string& cmd);
  void send_line(const std::string& cmd, const std::string& line, int fd);

  UniqueFd fd_;
  std::string path_;
  std::string rbuf_;
  std::deque<nlohmann::json> events_;
  pid_t peer_pid_ = -1;
  long long next_id_ = 0;
  std::chrono::milliseconds timeout_{10000};
};

}  // namespace ftvm::vmm
