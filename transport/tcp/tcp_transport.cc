// TCP fabric, setup side: address parsing, listening, connecting, socket options, Hello
// exchange, region registration. The data path is in tcp_transport_datapath.cc.
#include "transport/tcp/tcp_transport.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>

#include <fmt/format.h>

#include "common/error.h"
#include "transport/address.h"
#include "common/log.h"

namespace ftvm::transport::tcp {

namespace {
using Clock = std::chrono::steady_clock;

int remaining_ms(Clock::time_point deadline) {
  auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
  return static_cast<int>(std::clamp<long long>(left, 0, 1 << 30));
}


void set_opt(int fd, int level, int name, int value, const char* what, const std::string& peer) {
  check_sys(setsockopt(fd, level, name, &value, sizeof value), fmt::format("setsockopt {} on socket to {}", what, peer));
}

void configure_socket(int fd, const Options& opts, const std::string& peer) {
  set_opt(fd, IPPROTO_TCP, TCP_NODELAY, 1, "TCP_NODELAY", peer);
  set_opt(fd, SOL_SOCKET, SO_KEEPALIVE, 1, "SO_KEEPALIVE", peer);
  set_opt(fd, IPPROTO_TCP, TCP_KEEPIDLE, 5, "TCP_KEEPIDLE", peer);
  set_opt(fd, IPPROTO_TCP, TCP_KEEPINTVL, 1, "TCP_KEEPINTVL", peer);
  set_opt(fd, IPPROTO_TCP, TCP_KEEPCNT, 5, "TCP_KEEPCNT", peer);
  auto ut = std::clamp<long long>(opts.stall_timeout.count(), 0, 1 << 30);
  set_opt(fd, IPPROTO_TCP, TCP_USER_TIMEOUT, static_cast<int>(ut), "TCP_USER_TIMEOUT", peer);
}

// Sends all of `buf` on the non-blocking `fd` before `deadline`.
void send_all(int fd, std::span<const std::byte> buf, Clock::time_point deadline, const std::string& peer) {
  while (!buf.empty()) {
    ssize_t n = ::send(fd, buf.data(), buf.size(), MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n >= 0) {
      buf = buf.subspan(static_cast<size_t>(n));
      continue;
    }
    if (errno == EINTR) continue;
    if (errno != EAGAIN && errno != EWOULDBLOCK)
      throw LinkDown(fmt::format("send Hello to {}: {} (the peer dropped the connection)", peer, std::strerror(errno)));
    pollfd p{fd, POLLOUT, 0};
    int r = ::poll(&p, 1, remaining_ms(deadline));
    if (r < 0 && errno == EINTR) continue;
    check_sys(r, "poll socket to " + peer);
    if (r == 0) throw LinkDown(fmt::format("send Hello to {}: timed out (the peer does not read)", peer));
  }
}

// Both sides send Hello first, then read the peer's. Returns the peer's Hello; bytes the
// peer sent after it land in `early`.
HelloBody exchange_hello(int fd, const Options& opts, const std::string& peer, std::vector<std::byte>& early) {
  auto deadline = Clock::now() + opts.connect_timeout;
  FrameHeader h;
  h.kind = FrameKind::Hello;
  h.length = kHelloBodySize;
  std::array<std::byte, kFrameHeaderSize + kHelloBodySize> out{};
  encode_header(h, std::span<std::byte, kFrameHeaderSize>(out.data(), kFrameHeaderSize));
  auto body = encode_hello(HelloBody{});
  std::memcpy(out.data() + kFrameHeaderSize, body.data(), body.size());
  send_all(fd, out, deadline, peer);

  FrameDecoder dec;
  std::array<std::byte, 4096> buf;
  for (;;) {
    ssize_t n = ::recv(fd, buf.data(), buf.size(), MSG_DONTWAIT);
    if (n == 0) throw LinkDown(fmt::format("Hello from {}: the peer closed the connection during the handshake", peer));
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno != EAGAIN && errno != EWOULDBLOCK)
        throw LinkDown(fmt::format("Hello from {}: {} during the handshake", peer, std::strerror(errno)));
      pollfd p{fd, POLLIN, 0};
      int r = ::poll(&p, 1, remaining_ms(deadline));
      if (r < 0 && errno == EINTR) continue;
      check_sys(r, "poll socket to " + peer);
      if (r == 0)
        throw LinkDown(fmt::format("no Hello from {} within {} ms (is the peer an ftd of the same release?)", peer,
                                   opts.connect_timeout.count()));
      continue;
    }
    std::span<const std::byte> in(buf.data(), static_cast<size_t>(n));
    auto f = dec.feed(in);
    if (!f) continue;
    if (f->header.kind != FrameKind::Hello)
      throw ProtocolError(fmt::format("handshake with {}: expected a Hello frame first, got {}", peer,
                                      kind_name(f->header.kind)));
    HelloBody hb = decode_hello(f->payload);
    early.assign(in.begin(), in.end());
    return hb;
  }
}

std::unique_ptr<Connection> finish(UniqueFd fd, const Options& opts, const std::string& peer) {
  configure_socket(fd.get(), opts, peer);
  std::vector<std::byte> early;
  HelloBody hb = exchange_hello(fd.get(), opts, peer, early);
  log::debug("transport", "tcp connection to {} established (peer accepts writes up to {} bytes)", peer,
             hb.max_write_payload);
  return std::make_unique<TcpConnection>(std::move(fd), opts, peer, hb, std::move(early));
}
}  // namespace

HostPort parse_host_port(std::string_view text) {
  auto fail_parse = [&]() -> HostPort {
    throw Error(fmt::format("bad address '{}': expected HOST:PORT, IPV4:PORT or [IPV6]:PORT with PORT in 0..65535",
                            text));
  };
  HostPort hp;
  std::string_view port;
  if (!text.empty() && text.front() == '[') {
    auto close = text.find(']');
    if (close == std::string_view::npos || close + 1 >= text.size() || text[close + 1] != ':') return fail_parse();
    hp.host = std::string(text.substr(1, close - 1));
    port = text.substr(close + 2);
  } else {
    auto colon = text.rfind(':');
    if (colon == std::string_view::npos || text.find(':') != colon) return fail_parse();
    hp.host = std::string(text.substr(0, colon));
    port = text.substr(colon + 1);
  }
  if (hp.host.empty() || port.empty() || port.size() > 5) return fail_parse();
  unsigned v = 0;
  for (char c : port) {
    if (c < '0' || c > '9') return fail_parse();
    v = v * 10 + static_cast<unsigned>(c - '0');
  }
  if (v > 65535) return fail_parse();
  hp.port = static_cast<uint16_t>(v);
  return hp;
}

Listener::Listener(const std::string& host, uint16_t port, Options opts) : opts_(opts) {
  bool any = host.empty() || host == "*";
  AddrInfo res;
  resolve(any ? "::" : host, port, true, res, true);
  if (any) {
    // Fall back to IPv4 when this host has no IPv6.
    int probe = ::socket(AF_INET6, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (probe < 0) {
      freeaddrinfo(res.ai);
      res.ai = nullptr;
      resolve("0.0.0.0", port, true, res, true);
    } else {
      ::close(probe);
    }
  }
  int last_err = 0;
  std::string last_what;
  for (addrinfo* a = res.ai; a; a = a->ai_next) {
    UniqueFd fd(::socket(a->ai_family, a->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, a->ai_protocol));
    if (!fd) {
      last_err = errno;
      last_what = "socket";
      continue;
    }
    int one = 1;
    check_sys(setsockopt(fd.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof one), "setsockopt SO_REUSEADDR on listener");
    if (a->ai_family == AF_INET6 && any) {
      int zero = 0;
      check_sys(setsockopt(fd.get(), IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof zero),
                "setsockopt IPV6_V6ONLY=0 on listener");
    }
    if (::bind(fd.get(), a->ai_addr, a->ai_addrlen) < 0) {
      last_err = errno;
      last_what = "bind " + format_addr(a->ai_addr);
      continue;
    }
    check_sys(::listen(fd.get(), 16), "listen on " + format_addr(a->ai_addr));
    sockaddr_storage ss{};
    socklen_t len = sizeof ss;
    check_sys(getsockname(fd.get(), reinterpret_cast<sockaddr*>(&ss), &len), "getsockname of listener");
    local_ = format_addr(reinterpret_cast<sockaddr*>(&ss));
    port_ = ntohs(ss.ss_family == AF_INET ? reinterpret_cast<sockaddr_in*>(&ss)->sin_port
                                          : reinterpret_cast<sockaddr_in6*>(&ss)->sin6_port);
    fd_ = std::move(fd);
    log::debug("transport", "tcp listening on {}", local_);
    return;
  }
  throw SysError(last_err, fmt::format("{} (listen on '{}' port {})", last_what, host, port),
                 last_err == EADDRINUSE ? "another process uses the port: stop it or pick another port"
                                        : "check the address belongs to this host");
}

std::unique_ptr<Connection> Listener::accept(std::chrono::milliseconds timeout) {
  auto deadline = Clock::now() + timeout;
  for (;;) {
    sockaddr_storage ss{};
    socklen_t len = sizeof ss;
    int c = ::accept4(fd_.get(), reinterpret_cast<sockaddr*>(&ss), &len, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (c >= 0) {
      UniqueFd fd(c);
      return finish(std::move(fd), opts_, format_addr(reinterpret_cast<sockaddr*>(&ss)));
    }
    if (errno == EINTR || errno == ECONNABORTED) continue;
    if (errno != EAGAIN && errno != EWOULDBLOCK)
      throw SysError(errno, "accept on " + local_, errno == EMFILE ? "raise the open-file limit of ftd" : "");
    pollfd p{fd_.get(), POLLIN, 0};
    int r = ::poll(&p, 1, remaining_ms(deadline));
    if (r < 0 && errno == EINTR) continue;
    check_sys(r, "poll listener " + local_);
    if (r == 0) return nullptr;
  }
}

std::unique_ptr<Connection> connect_tcp(const std::string& host, uint16_t port, Options opts) {
  AddrInfo res;
  resolve(host, port, false, res, true);
  auto deadline = Clock::now() + opts.connect_timeout;
  std::string last = "no address";
  for (addrinfo* a = res.ai; a; a = a->ai_next) {
    std::string peer = format_addr(a->ai_addr);
    UniqueFd fd(::socket(a->ai_family, a->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, a->ai_protocol));
    if (!fd) {
      last = fmt::format("socket for {}: {}", peer, std::strerror(errno));
      continue;
    }
    int rc;
    do rc = ::connect(fd.get(), a->ai_addr, a->ai_addrlen);
    while (rc < 0 && errno == EINTR);
    if (rc < 0 && errno != EINPROGRESS) {
      last = fmt::format("{}: {}", peer, std::strerror(errno));
      continue;
    }
    if (rc < 0) {
      pollfd p{fd.get(), POLLOUT, 0};
      int r;
      do r = ::poll(&p, 1, remaining_ms(deadline));
      while (r < 0 && errno == EINTR);
      check_sys(r, "poll connecting socket to " + peer);
      if (r == 0) {
        last = fmt::format("{}: timed out after {} ms", peer, opts.connect_timeout.count());
        continue;
      }
      int err = 0;
      socklen_t len = sizeof err;
      check_sys(getsockopt(fd.get(), SOL_SOCKET, SO_ERROR, &err, &len), "getsockopt SO_ERROR on socket to " + peer);
      if (err != 0) {
        last = fmt::format("{}: {}", peer, std::strerror(err));
        continue;
      }
    }
    // The Hello exchange gets what is left of the connect timeout, but at least a second.
    Options hs = opts;
    hs.connect_timeout = std::max(std::chrono::milliseconds(remaining_ms(deadline)), std::chrono::milliseconds(1000));
    auto conn = finish(std::move(fd), hs, peer);
    return conn;
  }
  throw LinkDown(fmt::format("connect to {} port {}: {} (is ftd running and listening there? check firewalls)",
                             host, port, last));
}

// ---------------------------------------------------------------------------------------------

TcpConnection::TcpConnection(UniqueFd fd, Options opts, std::string peer, HelloBody peer_hello,
                             std::vector<std::byte> early)
    : fd_(std::move(fd)),
      opts_(opts),
      peer_(std::move(peer)),
      peer_max_write_(std::min(peer_hello.max_write_payload, kMaxWritePayload)),
      tx_last_(Clock::now()),
      rx_buf_(std::max<size_t>(256u << 10, early.size())),
      last_rx_(Clock::now()) {
  if (!early.empty()) std::memcpy(rx_buf_.data(), early.data(), early.size());
  rx_end_ = early.size();
}

TcpConnection::~TcpConnection() {
  if (failure_.failed() || !fd_ || tx_pending()) return;
  auto h = encode_header(FrameHeader{.kind = FrameKind::Goodbye});
  // Best effort: if the socket buffer is full the peer will see EOF instead, which also
  // reads as LinkDown there.
  (void)::send(fd_.get(), h.data(), h.size(), MSG_NOSIGNAL | MSG_DONTWAIT);
}

void TcpConnection::check_usable() const { failure_.check(peer_); }

void TcpConnection::register_region(uint32_t id, std::span<std::byte> mem) {
  if (id == 0) throw Error("register_region: region id 0 is reserved (use a nonzero id)");
  if (rx_in_payload_ && rx_kind_ == FrameKind::Write && rx_region_ == id) rx_dst_ = nullptr;
  regions_[id] = mem;
}

void TcpConnection::unregister_region(uint32_t id) {
  if (rx_in_payload_ && rx_kind_ == FrameKind::Write && rx_region_ == id) rx_dst_ = nullptr;
  regions_.erase(id);
}

std::chrono::milliseconds TcpConnection::idle_for() const {
  return std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - last_rx_);
}

}  // namespace ftvm::transport::tcp
