#include "tools/ftd/control.h"

#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <chrono>
#include <cstring>

#include "common/error.h"
#include "common/log.h"

namespace ftvm::ftd {
namespace {

sockaddr_un make_addr(const std::string& path) {
  sockaddr_un a{};
  a.sun_family = AF_UNIX;
  if (path.size() >= sizeof a.sun_path)
    fail("control socket path '{}' is longer than {} bytes; choose a shorter --run-dir or --control", path,
         sizeof a.sun_path - 1);
  std::memcpy(a.sun_path, path.c_str(), path.size() + 1);
  return a;
}

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

}  // namespace

UniqueFd listen_control(const std::string& path) {
  auto addr = make_addr(path);
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

void serve_control_client(UniqueFd client, const std::function<nlohmann::json(const nlohmann::json&)>& handler) {
  ucred cred{};
  socklen_t len = sizeof cred;
  if (::getsockopt(client.get(), SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0 ||
      (cred.uid != 0 && cred.uid != ::getuid())) {
    send_all(client.get(), R"({"ok":false,"code":"refused","error":"ftd accepts control requests from root only"})"
                           "\n");
    return;
  }
  std::string buf;
  char tmp[65536];
  for (;;) {
    size_t nl;
    while ((nl = buf.find('\n')) != std::string::npos) {
      std::string line = buf.substr(0, nl);
      buf.erase(0, nl + 1);
      nlohmann::json resp;
      nlohmann::json req = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
      if (req.is_discarded() || !req.is_object())
        resp = {{"ok", false}, {"code", "bad_request"},
                {"error", "malformed request: expected one JSON object per line (use ftctl)"}};
      else
        resp = handler(req);
      if (!send_all(client.get(), resp.dump() + "\n")) return;
    }
    if (buf.size() > kMaxControlLine) {
      send_all(client.get(), R"({"ok":false,"code":"bad_request","error":"request line too long"})"
                             "\n");
      return;
    }
    ssize_t n = ::recv(client.get(), tmp, sizeof tmp, 0);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return;
    buf.append(tmp, static_cast<size_t>(n));
  }
}

nlohmann::json control_call(const std::string& path, const nlohmann::json& req, int timeout_ms) {
  auto addr = make_addr(path);
  UniqueFd fd(check_sys(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0), "socket"));
  if (::connect(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0)
    throw SysError(errno, "connect to ftd at " + path, "is ftd running? start it with `ftd` or pass --control");
  if (!send_all(fd.get(), req.dump() + "\n")) throw SysError(errno, "send request to ftd at " + path);
  std::string buf;
  char tmp[65536];
  auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  while (buf.find('\n') == std::string::npos) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) fail("ftd at {} did not answer within {} ms", path, timeout_ms);
    pollfd p{fd.get(), POLLIN, 0};
    int r = ::poll(&p, 1, static_cast<int>(left.count()));
    if (r < 0 && errno == EINTR) continue;
    check_sys(r, "poll ftd control socket");
    if (r == 0) continue;
    ssize_t n = ::recv(fd.get(), tmp, sizeof tmp, 0);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) fail("ftd at {} closed the connection without an answer", path);
    buf.append(tmp, static_cast<size_t>(n));
    if (buf.size() > kMaxControlLine) fail("ftd at {} sent an oversized answer", path);
  }
  auto resp = nlohmann::json::parse(buf.substr(0, buf.find('\n')), nullptr, false);
  if (resp.is_discarded() || !resp.is_object()) fail("ftd at {} answered with malformed JSON", path);
  return resp;
}

}  // namespace ftvm::ftd
