#include "tools/control/control.h"

#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <stdexcept>
#include <thread>

#include <fmt/format.h>

#include "common/error.h"

namespace ftvm::control {

namespace {

using Clock = std::chrono::steady_clock;

// The address of `path`, or nullopt (with the reason in `why`) when it does not fit.
std::optional<sockaddr_un> make_addr(const std::string& path, std::string& why) {
  sockaddr_un a{};
  a.sun_family = AF_UNIX;
  if (path.size() >= sizeof a.sun_path) {
    why = fmt::format("control socket path '{}' is longer than {} bytes; choose a shorter --run-dir or --control",
                      path, sizeof a.sun_path - 1);
    return std::nullopt;
  }
  std::memcpy(a.sun_path, path.c_str(), path.size() + 1);
  return a;
}

sockaddr_un make_addr_or_throw(const std::string& path) {
  std::string why;
  auto a = make_addr(path, why);
  if (!a) throw Error(why);
  return *a;
}

// Blocking send of all of `s` (server side); false when the peer is gone.
bool send_all(int fd, const std::string& s) {
  size_t off = 0;
  while (off < s.size()) {
    ssize_t n = ::send(fd, s.data() + off, s.size() - off, MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    off += static_cast<size_t>(n);
  }
  return true;
}

std::string need_string(const nlohmann::json& j, const char* key, const char* where) {
  auto it = j.find(key);
  if (it == j.end() || !it->is_string() || it->get<std::string>().empty())
    throw std::invalid_argument(fmt::format("missing or empty string argument '{}'{}", key, where));
  return it->get<std::string>();
}

std::string opt_string(const nlohmann::json& j, const char* key, const std::string& dflt) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return dflt;
  if (!it->is_string()) throw std::invalid_argument(fmt::format("protection member '{}' must be a string", key));
  return it->get<std::string>();
}

}  // namespace

// ---- responses ---------------------------------------------------------------------------------

std::string_view code_name(Code c) {
  switch (c) {
    case Code::BadRequest: return "bad_request";
    case Code::NotFound: return "not_found";
    case Code::Refused: return "refused";
    case Code::Failed: return "failed";
    case Code::Wait: return "wait";
  }
  return "failed";
}

std::optional<Code> parse_code(std::string_view name) {
  for (Code c : {Code::BadRequest, Code::NotFound, Code::Refused, Code::Failed, Code::Wait})
    if (code_name(c) == name) return c;
  return std::nullopt;
}

nlohmann::json error_response(Code c, const std::string& msg) {
  return {{"ok", false}, {"code", code_name(c)}, {"error", msg}};
}

bool response_ok(const nlohmann::json& resp) {
  if (!resp.is_object()) return false;
  auto it = resp.find("ok");
  return it != resp.end() && it->is_boolean() && it->get<bool>();
}

int exit_code(const nlohmann::json& resp) {
  std::optional<Code> c;
  if (resp.is_object())
    if (auto it = resp.find("code"); it != resp.end() && it->is_string()) c = parse_code(it->get<std::string>());
  switch (c.value_or(Code::Failed)) {
    case Code::BadRequest: return kExitUsage;
    case Code::NotFound: return kExitNotFound;
    case Code::Refused: return kExitRefused;
    case Code::Wait: return kExitWait;
    case Code::Failed: return kExitFailed;
  }
  return kExitFailed;
}

// ---- framing -----------------------------------------------------------------------------------

std::string frame(const nlohmann::json& msg) {
  return msg.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) + "\n";
}

std::string frame(const nlohmann::ordered_json& msg) {
  return msg.dump(-1, ' ', false, nlohmann::ordered_json::error_handler_t::replace) + "\n";
}

std::optional<std::string> LineReader::next() {
  size_t nl = buf_.find('\n');
  if (nl == std::string::npos) return std::nullopt;
  std::string line = buf_.substr(0, nl);
  buf_.erase(0, nl + 1);
  return line;
}

// ---- client ------------------------------------------------------------------------------------

CallResult call_line(const std::string& path, const std::string& line, int timeout_ms, size_t max_reply) {
  CallResult res;
  const auto deadline = Clock::now() + std::chrono::milliseconds(timeout_ms);
  auto left_ms = [&] {
    return static_cast<int>(std::max<long long>(
        0, std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count()));
  };
  auto addr = make_addr(path, res.error);
  if (!addr) return res;
  UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
  if (!fd) {
    res.sys_errno = errno;
    res.error = fmt::format("socket: {}", std::strerror(errno));
    return res;
  }
  for (;;) {
    if (::connect(fd.get(), reinterpret_cast<sockaddr*>(&*addr), sizeof *addr) == 0) break;
    int e = errno;
    if (e == EINTR) continue;
    if (e == EAGAIN) {  // unix socket backlog full: ftd busy; retry until the deadline
      if (left_ms() <= 0) {
        res.sys_errno = EAGAIN;
        res.error = fmt::format("ftd at {} is not accepting connections (backlog full for {} ms)", path, timeout_ms);
        return res;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
      continue;
    }
    if (e == EINPROGRESS) {
      pollfd p{fd.get(), POLLOUT, 0};
      int r;
      while ((r = ::poll(&p, 1, left_ms())) < 0 && errno == EINTR) {
      }
      if (r <= 0) {
        res.sys_errno = r < 0 ? errno : ETIMEDOUT;
        res.error = fmt::format("connect to ftd at {} timed out after {} ms", path, timeout_ms);
        return res;
      }
      int soerr = 0;
      socklen_t len = sizeof soerr;
      if (::getsockopt(fd.get(), SOL_SOCKET, SO_ERROR, &soerr, &len) != 0) soerr = errno;
      if (soerr == 0) break;
      e = soerr;
    }
    res.sys_errno = e;
    res.error = fmt::format("connect: {}", std::strerror(e));
    return res;
  }
  res.connected = true;

  size_t off = 0;
  while (off < line.size()) {
    ssize_t n = ::send(fd.get(), line.data() + off, line.size() - off, MSG_NOSIGNAL);
    if (n > 0) {
      off += static_cast<size_t>(n);
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && errno == EAGAIN) {
      pollfd p{fd.get(), POLLOUT, 0};
      int r = ::poll(&p, 1, left_ms());
      if (r < 0 && errno == EINTR) continue;
      if (r <= 0) {
        res.sys_errno = r < 0 ? errno : ETIMEDOUT;
        res.error = fmt::format("ftd at {} did not take the request within {} ms", path, timeout_ms);
        return res;
      }
      continue;
    }
    res.sys_errno = n < 0 ? errno : EPIPE;
    res.error = fmt::format("send to ftd at {}: {}", path, n < 0 ? std::strerror(errno) : "connection closed");
    return res;
  }
  res.sent = true;

  LineReader reader(max_reply);
  char tmp[65536];
  for (;;) {
    if (auto l = reader.next()) {
      res.reply = std::move(*l);
      return res;
    }
    if (reader.overflow()) {
      res.error = fmt::format("ftd at {} sent an oversized answer", path);
      return res;
    }
    int left = left_ms();
    if (left <= 0) {
      res.error = fmt::format("ftd at {} did not answer within {} ms", path, timeout_ms);
      return res;
    }
    pollfd p{fd.get(), POLLIN, 0};
    int r = ::poll(&p, 1, left);
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) {
      res.error = fmt::format("poll: {}", std::strerror(errno));
      return res;
    }
    if (r == 0) continue;
    ssize_t n = ::recv(fd.get(), tmp, sizeof tmp, 0);
    if (n < 0 && (errno == EINTR || errno == EAGAIN)) continue;
    if (n <= 0) {
      res.error = fmt::format("ftd at {} closed the connection without an answer{}", path,
                              n < 0 ? fmt::format(" ({})", std::strerror(errno)) : "");
      return res;
    }
    reader.feed(tmp, static_cast<size_t>(n));
  }
}

nlohmann::json call(const std::string& path, const nlohmann::json& req, int timeout_ms) {
  (void)make_addr_or_throw(path);
  CallResult r = call_line(path, frame(req), timeout_ms);
  if (!r.sent) {
    if (!r.connected)
      throw SysError(r.sys_errno ? r.sys_errno : ECONNREFUSED, "connect to ftd at " + path,
                     "is ftd running? start it with `ftd` or pass --control");
    throw SysError(r.sys_errno ? r.sys_errno : EPIPE, "send request to ftd at " + path);
  }
  if (r.reply.empty() && !r.error.empty()) throw Error(r.error);
  auto resp = nlohmann::json::parse(r.reply, nullptr, /*allow_exceptions=*/false);
  if (resp.is_discarded() || !resp.is_object()) fail("ftd at {} answered with malformed JSON", path);
  return resp;
}

// ---- server ------------------------------------------------------------------------------------

UniqueFd listen_control(const std::string& path) {
  auto addr = make_addr_or_throw(path);
  UniqueFd probe(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (probe && ::connect(probe.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0)
    fail("another ftd already serves {}; stop it or use another --run-dir", path);
  ::unlink(path.c_str());
  UniqueFd fd(check_sys(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0), "socket for the control socket"));
  mode_t old = ::umask(0177);
  int r = ::bind(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr);
  ::umask(old);
  check_sys(r, "bind control socket " + path, "does the directory exist and is it writable?");
  check_sys(::chmod(path.c_str(), 0600), "chmod 0600 " + path);
  check_sys(::listen(fd.get(), 16), "listen on " + path);
  return fd;
}

void serve_control_client(UniqueFd client, const Handler& handler) {
  ucred cred{};
  socklen_t len = sizeof cred;
  if (::getsockopt(client.get(), SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0 ||
      (cred.uid != 0 && cred.uid != ::getuid())) {
    send_all(client.get(), frame(error_response(Code::Refused, "ftd accepts control requests from root only")));
    return;
  }
  LineReader reader(kMaxLine);
  char tmp[65536];
  for (;;) {
    while (auto line = reader.next()) {
      nlohmann::json resp;
      nlohmann::json req = nlohmann::json::parse(*line, nullptr, /*allow_exceptions=*/false);
      if (req.is_discarded() || !req.is_object())
        resp = error_response(Code::BadRequest, "malformed request: expected one JSON object per line (use ftctl)");
      else
        resp = handler(req);
      if (!send_all(client.get(), frame(resp))) return;
    }
    if (reader.overflow()) {
      send_all(client.get(), frame(error_response(Code::BadRequest, "request line too long")));
      return;
    }
    ssize_t n = ::recv(client.get(), tmp, sizeof tmp, 0);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return;
    reader.feed(tmp, static_cast<size_t>(n));
  }
}

// ---- the hook's request ------------------------------------------------------------------------

nlohmann::ordered_json encode_hook_request(const HookRequest& r) {
  nlohmann::ordered_json j;
  j["cmd"] = "hook";
  j["phase"] = r.phase;
  j["domain"] = r.domain;
  j["uuid"] = r.uuid;
  if (r.protection) {
    const auto& p = *r.protection;
    nlohmann::ordered_json o;
    o["peer"] = p.peer;
    o["transport"] = p.transport;
    o["epoch_ms"] = p.epoch_ms;
    o["failover"] = p.failover;
    if (!p.arbiter.empty()) o["arbiter"] = p.arbiter;  // the VM's own arbiter choice
    if (!p.peer_alt.empty()) o["peer_alt"] = p.peer_alt;
    if (p.reprotect != "auto") o["reprotect"] = p.reprotect;  // absent = auto (what an older ftd assumes)
    j["protection"] = std::move(o);
  }
  return j;
}

HookRequest decode_hook_request(const nlohmann::json& req) {
  HookRequest r;
  r.phase = need_string(req, "phase", "");
  r.domain = need_string(req, "domain", "");
  r.uuid = opt_string(req, "uuid", "");
  auto it = req.find("protection");
  if (it == req.end() || it->is_null()) return r;
  if (!it->is_object()) throw std::invalid_argument("hook " + r.phase + ": 'protection' must be an object");
  const auto& p = *it;
  vmm::Protection v;
  v.peer = need_string(p, "peer", " in 'protection'");
  v.transport = opt_string(p, "transport", v.transport);
  if (auto e = p.find("epoch_ms"); e != p.end() && !e->is_null()) {
    if (!e->is_number_unsigned() || e->get<uint64_t>() > 10000)
      throw std::invalid_argument(
          fmt::format("protection member 'epoch_ms' must be an integer in 1..10000, not {}", e->dump()));
    v.epoch_ms = e->get<unsigned>();
  }
  v.failover = opt_string(p, "failover", v.failover);
  v.arbiter = opt_string(p, "arbiter", v.arbiter);
  v.peer_alt = opt_string(p, "peer_alt", v.peer_alt);
  v.reprotect = opt_string(p, "reprotect", v.reprotect);
  if (auto why = vmm::protection_problem(v)) throw std::invalid_argument("hook " + r.phase + " protection: " + *why);
  r.protection = v;
  return r;
}

}  // namespace ftvm::control
