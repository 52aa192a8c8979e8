#include "vmm-glue/qmp.h"

#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <thread>

#include "common/log.h"

namespace ftvm::vmm {

namespace {
// The text of member `key` of `obj` whatever its JSON type (a string as is, anything else as
// JSON, "?" when absent or `obj` is not an object): QEMU's replies are not trusted to be well typed.
std::string member_text(const nlohmann::json& obj, const char* key) {
  if (!obj.is_object()) return "?";
  auto it = obj.find(key);
  if (it == obj.end()) return "?";
  return it->is_string() ? it->get<std::string>() : it->dump();
}
}  // namespace

namespace {

using Clock = std::chrono::steady_clock;

// Largest single QMP message accepted (query-qmp-schema is ~200 KB on QEMU 7.2).
constexpr size_t kMaxMessage = 16u << 20;
// Events kept when the owner never calls take_events(); older ones are dropped with a warning.
constexpr size_t kMaxQueuedEvents = 4096;

int remaining_ms(Clock::time_point deadline) {
  auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
  if (left.count() <= 0) return 0;
  // Round up so a sub-millisecond remainder still waits instead of spinning.
  return static_cast<int>(std::min<long long>(left.count() + 1, 1 << 30));
}

// A printable excerpt of what the peer sent, for error messages.
std::string excerpt(const std::string& s) {
  std::string out;
  for (char c : s.substr(0, 80)) {
    if (c == '\n') out += "\\n";
    else if (c == '\r') out += "\\r";
    else if (static_cast<unsigned char>(c) < 0x20 || static_cast<unsigned char>(c) > 0x7e) out += '?';
    else out += c;
  }
  if (s.size() > 80) out += "...";
  return out;
}

// Length of the first top-level JSON value in `buf` starting at `start` (which must be '{'), or
// 0 if it is not complete yet. Works on QEMU's one-object-per-line output and on -qmp-pretty's
// multi-line objects alike. A mismatched closing bracket ends the value early so that the JSON
// parser reports it as malformed instead of the reader waiting for a close that never comes.
size_t json_object_end(const std::string& buf, size_t start) {
  std::string closers;
  bool in_str = false, esc = false;
  for (size_t i = start; i < buf.size(); ++i) {
    char c = buf[i];
    if (in_str) {
      if (esc) esc = false;
      else if (c == '\\') esc = true;
      else if (c == '"') in_str = false;
      continue;
    }
    if (c == '"') in_str = true;
    else if (c == '{') closers.push_back('}');
    else if (c == '[') closers.push_back(']');
    else if (c == '}' || c == ']') {
      if (closers.empty() || closers.back() != c) return i + 1 - start;
      closers.pop_back();
      if (closers.empty()) return i + 1 - start;
    }
  }
  return 0;
}

}  // namespace

QmpError::QmpError(const std::string& cmd, const std::string& cls, const std::string& desc)
    : Error(fmt::format("QMP command '{}' failed: {}: {}", cmd, cls, desc)), cls_(cls) {}

QmpClient QmpClient::connect(const std::string& socket_path, std::chrono::milliseconds timeout) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (socket_path.empty() || socket_path.size() >= sizeof(addr.sun_path))
    fail("QMP socket path '{}' is empty or longer than {} bytes; use a shorter run directory",
         socket_path, sizeof(addr.sun_path) - 1);
  std::memcpy(addr.sun_path, socket_path.c_str(), socket_path.size() + 1);

  QmpClient c;
  c.path_ = socket_path;
  auto deadline = Clock::now() + timeout;
  for (;;) {
    UniqueFd fd(check_sys(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0),
                          "socket(AF_UNIX) for QMP " + socket_path));
    int r;
    do {
      r = ::connect(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
    } while (r < 0 && errno == EINTR);
    if (r == 0) {
      c.fd_ = std::move(fd);
      break;
    }
    int err = errno;
    // The socket not existing yet / not listening yet is normal while QEMU starts.
    bool retry = err == ENOENT || err == ECONNREFUSED || err == EAGAIN;
    if (!retry || Clock::now() >= deadline)
      throw SysError(err, "connect to QMP socket " + socket_path,
                     retry ? fmt::format("nothing accepted within {} ms: is QEMU running with "
                                         "-qmp unix:{},server=on,wait=off?",
                                         timeout.count(), socket_path)
                           : "check the path and its permissions");
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }

  ucred cred{};
  socklen_t len = sizeof(cred);
  check_sys(::getsockopt(c.fd_.get(), SOL_SOCKET, SO_PEERCRED, &cred, &len),
            "getsockopt(SO_PEERCRED) on QMP socket " + socket_path);
  c.peer_pid_ = cred.pid;

  // The greeting and capabilities negotiation share the connect timeout.
  auto saved = c.timeout_;
  c.timeout_ = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
  if (c.timeout_.count() < 100) c.timeout_ = std::chrono::milliseconds(100);
  nlohmann::json greeting;
  try {
    // QEMU may deliver an event (e.g. RESUME while it is still starting) ahead of the greeting:
    // keep those (bounded) and read on.
    greeting = c.read_message();
    for (int skipped = 0; greeting.is_object() && greeting.contains("event") && skipped < 64; ++skipped) {
      c.events_.push_back(std::move(greeting));
      greeting = c.read_message();
    }
  } catch (const Error& e) {
    throw Error(fmt::format("{} is not a QMP monitor (no valid greeting): {}", socket_path,
                            e.what()));
  }
  if (!greeting.contains("QMP") || !greeting["QMP"].is_object() ||
      !greeting["QMP"].contains("version"))
    fail("{} is not a QMP monitor: its greeting is '{}' (expected {{\"QMP\": {{\"version\": "
         "...}}}}); check the socket path",
         socket_path, excerpt(greeting.dump()));
  c.execute("qmp_capabilities");
  c.timeout_ = saved;
  log::debug("qmp", "connected to {} (QEMU pid {}, version {})", socket_path, c.peer_pid_,
             member_text(greeting["QMP"]["version"], "qemu"));
  return c;
}

nlohmann::json QmpClient::execute(const std::string& cmd, const nlohmann::json& args) {
  return execute_with_fd(cmd, args, -1);
}

nlohmann::json QmpClient::execute_with_fd(const std::string& cmd, const nlohmann::json& args,
                                          int fd) {
  if (!fd_) fail("QMP command '{}' on {}: the connection is closed or unusable after an earlier "
                 "error; reconnect", cmd, path_);
  nlohmann::json msg = {{"execute", cmd}, {"id", ++next_id_}};
  if (!args.is_null()) msg["arguments"] = args;
  send_line(cmd, msg.dump() + "\n", fd);
  return await_return(cmd);
}

std::deque<nlohmann::json> QmpClient::take_events() {
  // Events QEMU already sent but nobody read yet (e.g. SHUTDOWN right before QEMU exits):
  // read what is there without waiting. EOF or garbage closes the connection as usual.
  try {
    while (fd_.valid()) {
      auto msg = read_message(Clock::now(), /*timeout_is_error=*/false);
      if (!msg) break;
      if (msg->contains("event")) queue_event(std::move(*msg));
      else log::warn("qmp", "{}: unsolicited message outside a command dropped: {}", path_, excerpt(msg->dump()));
    }
  } catch (const Error&) {
  }
  return std::exchange(events_, {});
}

std::optional<nlohmann::json> QmpClient::wait_event(const std::string& name,
                                                    std::chrono::milliseconds timeout) {
  for (auto it = events_.begin(); it != events_.end(); ++it) {
    if (it->value("event", "") == name) {
      nlohmann::json e = std::move(*it);
      events_.erase(it);
      return e;
    }
  }
  if (!fd_) fail("waiting for QMP event {} on {}: the connection is unusable; reconnect", name,
                 path_);
  auto deadline = Clock::now() + timeout;
  for (;;) {
    auto msg = read_message(deadline, /*timeout_is_error=*/false);
    if (!msg) return std::nullopt;
    if (msg->contains("event")) {
      if ((*msg)["event"] == name) return msg;
      queue_event(std::move(*msg));
      continue;
    }
    fd_.reset();
    fail("QMP peer {} sent a reply while no command was pending: '{}'; reconnect", path_,
         excerpt(msg->dump()));
  }
}

void QmpClient::queue_event(nlohmann::json ev) {
  if (events_.size() >= kMaxQueuedEvents) {
    log::warn("qmp", "{}: more than {} unread QMP events, dropping the oldest ({})", path_,
              kMaxQueuedEvents, member_text(events_.front(), "event"));
    events_.pop_front();
  }
  events_.push_back(std::move(ev));
}

nlohmann::json QmpClient::await_return(const std::string& cmd) {
  auto deadline = Clock::now() + timeout_;
  for (;;) {
    nlohmann::json msg;
    try {
      // In slices of the idle period while an idle hook is set (the hook runs between them).
      std::optional<nlohmann::json> m;
      while (!m) {
        const auto slice = idle_ ? std::min(deadline, Clock::now() + idle_period_) : deadline;
        m = read_message(slice, /*timeout_is_error=*/slice >= deadline);
        if (!m) idle();
      }
      msg = std::move(*m);
    } catch (const Error& e) {
      throw Error(fmt::format("QMP command '{}': {}", cmd, e.what()));
    }
    if (msg.contains("event")) {
      queue_event(std::move(msg));
      continue;
    }
    // A reply without "id" answers a request QEMU could not parse far enough to read its id;
    // with one command in flight at a time it is the reply to ours.
    if (msg.contains("id") && msg["id"] != next_id_) {
      fd_.reset();
      fail("QMP command '{}' on {}: reply carries id {} but the command was sent with id {} "
           "(the monitor is shared or out of sync); reconnect",
           cmd, path_, msg["id"].dump(), next_id_);
    }
    if (msg.contains("return")) return msg["return"];
    if (msg.contains("error")) {
      const auto& e = msg["error"];
      // The peer's JSON types are not trusted: a non-string class/desc is shown as JSON.
      std::string cls = e.is_object() && e.contains("class") ? member_text(e, "class") : "GenericError";
      std::string desc = e.is_object() && e.contains("desc") ? member_text(e, "desc") : e.dump();
      throw QmpError(cmd, cls, desc);
    }
    fd_.reset();
    fail("QMP command '{}' on {}: unexpected message '{}' (neither return, error nor event); "
         "reconnect",
         cmd, path_, excerpt(msg.dump()));
  }
}

nlohmann::json QmpClient::read_message() {
  return *read_message(Clock::now() + timeout_, true);
}

std::optional<nlohmann::json> QmpClient::read_message(Clock::time_point deadline,
                                                      bool timeout_is_error) {
  for (;;) {
    size_t start = rbuf_.find_first_not_of(" \t\r\n");
    if (start == std::string::npos) {
      rbuf_.clear();
    } else {
      if (rbuf_[start] != '{') {
        fd_.reset();
        fail("{} sent data that is not a QMP JSON object: '{}'; check that the socket belongs "
             "to QEMU's QMP monitor",
             path_, excerpt(rbuf_.substr(start)));
      }
      size_t len = json_object_end(rbuf_, start);
      if (len) {
        std::string text = rbuf_.substr(start, len);
        rbuf_.erase(0, start + len);
        try {
          auto j = nlohmann::json::parse(text);
          if (!j.is_object()) throw std::runtime_error("not an object");
          return j;
        } catch (const std::exception& e) {
          fd_.reset();
          fail("{} sent malformed JSON '{}': {}; the connection is closed", path_, excerpt(text),
               e.what());
        }
      }
      if (rbuf_.size() > kMaxMessage) {
        fd_.reset();
        fail("{} sent more than {} bytes without completing a JSON object: '{}'", path_,
             kMaxMessage, excerpt(rbuf_));
      }
    }

    pollfd p{fd_.get(), POLLIN, 0};
    int r = ::poll(&p, 1, remaining_ms(deadline));
    if (r < 0 && errno == EINTR) continue;
    check_sys(r, "poll on QMP socket " + path_);
    if (r == 0) {
      if (!timeout_is_error) return std::nullopt;
      fd_.reset();
      fail("no answer from {} within the timeout{}; QEMU may be hung (check it with ps / its "
           "log); the connection is closed",
           path_, rbuf_.empty() ? "" : fmt::format(" (partial message '{}')", excerpt(rbuf_)));
    }
    char buf[65536];
    ssize_t n = ::recv(fd_.get(), buf, sizeof buf, 0);
    if (n < 0 && (errno == EINTR || errno == EAGAIN)) continue;
    if (n < 0) {
      int err = errno;
      fd_.reset();
      throw SysError(err, "recv on QMP socket " + path_, "QEMU probably exited");
    }
    if (n == 0) {
      fd_.reset();
      fail("{} closed the connection{} (QEMU exited or dropped the monitor)", path_,
           rbuf_.find_first_not_of(" \t\r\n") == std::string::npos
               ? ""
               : fmt::format(" in the middle of a message '{}'", excerpt(rbuf_)));
    }
    rbuf_.append(buf, static_cast<size_t>(n));
  }
}

void QmpClient::send_line(const std::string& cmd, const std::string& line, int fd) {
  size_t off = 0;
  bool fd_sent = fd < 0;
  while (off < line.size()) {
    iovec iov{const_cast<char*>(line.data() + off), line.size() - off};
    msghdr mh{};
    mh.msg_iov = &iov;
    mh.msg_iovlen = 1;
    alignas(cmsghdr) char cbuf[CMSG_SPACE(sizeof(int))];
    if (!fd_sent) {
      // The descriptor travels with the first bytes of the command; QEMU attaches it to the
      // monitor when it reads them, before it runs the command.
      std::memset(cbuf, 0, sizeof cbuf);
      mh.msg_control = cbuf;
      mh.msg_controllen = sizeof cbuf;
      cmsghdr* cm = CMSG_FIRSTHDR(&mh);
      cm->cmsg_level = SOL_SOCKET;
      cm->cmsg_type = SCM_RIGHTS;
      cm->cmsg_len = CMSG_LEN(sizeof(int));
      std::memcpy(CMSG_DATA(cm), &fd, sizeof(int));
    }
    ssize_t n = ::sendmsg(fd_.get(), &mh, MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      int err = errno;
      fd_.reset();
      throw SysError(err, fmt::format("send QMP command '{}' to {}", cmd, path_),
                     err == EPIPE || err == ECONNRESET ? "QEMU exited or closed the monitor"
                                                       : "reconnect");
    }
    fd_sent = true;
    off += static_cast<size_t>(n);
  }
}

}  // namespace ftvm::vmm
