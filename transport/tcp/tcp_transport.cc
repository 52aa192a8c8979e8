// TCP fabric, setup side: address parsing, listening, connecting, socket options, Hello
// exchange, region registration. The data path is in tcp_transport_datapath.cc.
#include "transport/tcp/tcp_transport.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sodium.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>

#include <fmt/format.h>

#include "common/error.h"
#include "common/log.h"
#include "transport/address.h"
#include "transport/auth.h"

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
      throw LinkDown(fmt::format("send handshake to {}: {} (the peer dropped the connection)", peer, std::strerror(errno)));
    pollfd p{fd, POLLOUT, 0};
    int r = ::poll(&p, 1, remaining_ms(deadline));
    if (r < 0 && errno == EINTR) continue;
    check_sys(r, "poll socket to " + peer);
    if (r == 0) throw LinkDown(fmt::format("send handshake to {}: timed out (the peer does not read)", peer));
  }
}

// Reads whole frames from the handshaking socket before a deadline; bytes after the last
// frame returned stay in `rest` (the connection's early data).
class HandshakeReader {
 public:
  HandshakeReader(int fd, Clock::time_point deadline, const Options& opts, const std::string& peer)
      : fd_(fd), deadline_(deadline), opts_(opts), peer_(peer) {}

  Frame next(const char* what) {
    for (;;) {
      if (!rest_.empty()) {
        std::span<const std::byte> in(rest_);
        auto f = dec_.feed(in);
        rest_.erase(rest_.begin(), rest_.begin() + static_cast<std::ptrdiff_t>(rest_.size() - in.size()));
        if (f) return std::move(*f);
      }
      std::array<std::byte, 4096> buf;
      ssize_t n = ::recv(fd_, buf.data(), buf.size(), MSG_DONTWAIT);
      if (n == 0)
        throw LinkDown(fmt::format("{} from {}: the peer closed the connection during the handshake{}", what, peer_,
                                   opts_.key ? " (a peer that rejects our key or has none closes it this way: check "
                                               "its log)"
                                             : ""));
      if (n < 0) {
        if (errno == EINTR) continue;
        if (errno != EAGAIN && errno != EWOULDBLOCK)
          throw LinkDown(fmt::format("{} from {}: {} during the handshake", what, peer_, std::strerror(errno)));
        pollfd p{fd_, POLLIN, 0};
        int r = ::poll(&p, 1, remaining_ms(deadline_));
        if (r < 0 && errno == EINTR) continue;
        check_sys(r, "poll socket to " + peer_);
        if (r == 0)
          throw LinkDown(fmt::format("no {} from {} within {} ms (is the peer an ftd of the same release?)", what,
                                     peer_, opts_.connect_timeout.count()));
        continue;
      }
      rest_.insert(rest_.end(), buf.begin(), buf.begin() + n);
    }
  }
  std::vector<std::byte>& rest() { return rest_; }

 private:
  int fd_;
  Clock::time_point deadline_;
  const Options& opts_;
  const std::string& peer_;
  FrameDecoder dec_;
  std::vector<std::byte> rest_;
};

std::vector<std::byte> frame_bytes(const FrameHeader& h, std::span<const std::byte> payload) {
  std::vector<std::byte> out(kFrameHeaderSize + payload.size());
  encode_header(h, std::span<std::byte, kFrameHeaderSize>(out.data(), kFrameHeaderSize));
  if (!payload.empty()) std::memcpy(out.data() + kFrameHeaderSize, payload.data(), payload.size());
  return out;
}

std::string hex(std::span<const unsigned char> b) {
  std::string s;
  for (auto c : b) s += fmt::format("{:02x}", c);
  return s;
}

// The handshake (frame.h, auth.h). Both sides send their Hello at once and read the peer's;
// with keys, both then send their Auth proof and check the peer's. `initiator` = the connecting
// side. Returns the connection; throws ProtocolError (incompatible or unauthenticated peer,
// naming the peer and the fix) or LinkDown (peer gone or silent).
std::unique_ptr<Connection> handshake(UniqueFd fd, const Options& opts, const std::string& peer, bool initiator) {
  auto deadline = Clock::now() + opts.connect_timeout;
  configure_socket(fd.get(), opts, peer);
  HelloBody mine;
  if (opts.key) {
    mine.capabilities = kCapAuth | (opts.encrypt ? kCapEncrypt : 0);
    mine.nonce = auth::random_nonce();
    mine.key_id = opts.key->id;
  } else if (opts.encrypt) {
    throw Error("encryption (--encrypt) needs a key (--key-file)");
  }
  auto my_hello = encode_hello(mine);
  auto my_bytes = frame_bytes(FrameHeader{.kind = FrameKind::Hello, .length = kHelloBodySize}, my_hello);
  send_all(fd.get(), my_bytes, deadline, peer);

  HandshakeReader rd(fd.get(), deadline, opts, peer);
  Frame f = rd.next("Hello");
  if (f.header.kind != FrameKind::Hello)
    throw ProtocolError(fmt::format("handshake with {}: expected a Hello frame first, got {}", peer,
                                    kind_name(f.header.kind)));
  HelloBody theirs = decode_hello(f.payload);
  const bool they_auth = theirs.capabilities & kCapAuth;
  if (opts.key && !they_auth)
    throw ProtocolError(fmt::format(
        "peer {} did not authenticate (it has no key: started with --insecure?); this ftd requires the pre-shared "
        "key {}: give both ftd the same --key-file",
        peer, opts.key->path));
  if (!opts.key && they_auth)
    throw ProtocolError(fmt::format(
        "peer {} requires authentication (it has a key) but this ftd has none (--insecure): give both ftd the same "
        "--key-file",
        peer));
  if (!opts.key) {
    log::debug("transport", "tcp connection to {} established UNAUTHENTICATED (peer accepts writes up to {} bytes)",
               peer, theirs.max_write_payload);
    return std::make_unique<TcpConnection>(std::move(fd), opts, peer, theirs, std::move(rd.rest()));
  }
  if (theirs.key_id != opts.key->id)
    throw ProtocolError(fmt::format(
        "authentication with {} failed: the peer uses key id {}, this ftd key id {} ({}): the hosts hold different "
        "key files (copy the same key to both; `ftctl status` shows the key id)",
        peer, hex(theirs.key_id), opts.key->id_hex(), opts.key->path));
  auto their_bytes = frame_bytes(f.header, f.payload);
  std::vector<std::byte> transcript;
  const auto& first = initiator ? my_bytes : their_bytes;
  const auto& second = initiator ? their_bytes : my_bytes;
  transcript.insert(transcript.end(), first.begin(), first.end());
  transcript.insert(transcript.end(), second.begin(), second.end());
  auth::SessionKeys keys = auth::derive(*opts.key, transcript);
  auto proof = auth::prove(initiator ? keys.proof_initiator : keys.proof_responder, transcript);
  send_all(fd.get(), frame_bytes(FrameHeader{.kind = FrameKind::Auth, .length = kAuthBodySize}, proof), deadline,
           peer);
  Frame a = rd.next("Auth proof");
  if (a.header.kind != FrameKind::Auth)
    throw ProtocolError(fmt::format("handshake with {}: expected an Auth frame after the Hellos, got {}", peer,
                                    kind_name(a.header.kind)));
  if (!auth::verify(initiator ? keys.proof_responder : keys.proof_initiator, transcript, a.payload))
    throw ProtocolError(fmt::format(
        "authentication of peer {} failed: its proof does not match key {} (a peer without the key, or a replayed "
        "or altered handshake); connection refused",
        peer, opts.key->id_hex()));
  const bool encrypt = (mine.capabilities | theirs.capabilities) & kCapEncrypt;
  auth::Direction tx(initiator ? keys.frame_i2r : keys.frame_r2i, encrypt);
  auth::Direction rx(initiator ? keys.frame_r2i : keys.frame_i2r, encrypt);
  log::debug("transport", "tcp connection to {} established, authenticated{} (key {}; peer accepts writes up to {} "
             "bytes)", peer, encrypt ? " and encrypted" : "", opts.key->id_hex(), theirs.max_write_payload);
  return std::make_unique<TcpConnection>(std::move(fd), opts, peer, theirs, std::move(rd.rest()), std::move(tx),
                                         std::move(rx), opts.key->id_hex(), keys.epoch);
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

std::optional<Listener::Accepted> Listener::accept_socket(std::chrono::milliseconds timeout) {
  auto deadline = Clock::now() + timeout;
  for (;;) {
    sockaddr_storage ss{};
    socklen_t len = sizeof ss;
    int c = ::accept4(fd_.get(), reinterpret_cast<sockaddr*>(&ss), &len, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (c >= 0) {
      Accepted a;
      a.fd = UniqueFd(c);
      a.peer = format_addr(reinterpret_cast<sockaddr*>(&ss));
      a.peer_host = peer_host(a.peer);
      return a;
    }
    if (errno == EINTR || errno == ECONNABORTED) continue;
    if (errno != EAGAIN && errno != EWOULDBLOCK)
      throw SysError(errno, "accept on " + local_, errno == EMFILE ? "raise the open-file limit of ftd" : "");
    pollfd p{fd_.get(), POLLIN, 0};
    int r = ::poll(&p, 1, remaining_ms(deadline));
    if (r < 0 && errno == EINTR) continue;
    check_sys(r, "poll listener " + local_);
    if (r == 0) return std::nullopt;
  }
}

std::unique_ptr<Connection> Listener::handshake_accepted(Accepted a) const {
  return handshake(std::move(a.fd), opts_, a.peer, false);
}

std::unique_ptr<Connection> Listener::accept(std::chrono::milliseconds timeout) {
  auto a = accept_socket(timeout);
  if (!a) return nullptr;
  return handshake_accepted(std::move(*a));
}

std::string peer_host(const std::string& peer) {
  std::string h = peer;
  if (!h.empty() && h.front() == '[') {
    auto close = h.find(']');
    h = close == std::string::npos ? h.substr(1) : h.substr(1, close - 1);
  } else if (auto colon = h.rfind(':'); colon != std::string::npos) {
    h = h.substr(0, colon);
  }
  if (h.rfind("::ffff:", 0) == 0 && h.find('.') != std::string::npos) h = h.substr(7);
  return h;
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
    if (!opts.source_address.empty()) {
      AddrInfo src;
      resolve(opts.source_address, 0, true, src, false);
      addrinfo* m = src.ai;
      while (m && m->ai_family != a->ai_family) m = m->ai_next;
      if (!m) {
        last = fmt::format("{}: source address {} has no address of the same family", peer, opts.source_address);
        continue;
      }
      check_sys(::bind(fd.get(), m->ai_addr, m->ai_addrlen),
                fmt::format("bind to source address {} (connecting to {})", opts.source_address, peer));
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
    return handshake(std::move(fd), hs, peer, true);
  }
  throw LinkDown(fmt::format("connect to {} port {}: {} (is ftd running and listening there? check firewalls)",
                             host, port, last));
}

// ---------------------------------------------------------------------------------------------

TcpConnection::TcpConnection(UniqueFd fd, Options opts, std::string peer, HelloBody peer_hello,
                             std::vector<std::byte> early, auth::Direction tx, auth::Direction rx, std::string key_id,
                             std::array<unsigned char, 32> epoch_key)
    : fd_(std::move(fd)),
      opts_(opts),
      peer_(std::move(peer)),
      peer_max_write_(std::min(peer_hello.max_write_payload, kMaxWritePayload)),
      tx_last_(Clock::now()),
      tx_(std::move(tx)),
      rx_(std::move(rx)),
      key_id_(std::move(key_id)),
      epoch_key_(epoch_key),
      rx_buf_(std::max<size_t>(256u << 10, early.size())),
      last_rx_(Clock::now()) {
  if (!early.empty()) std::memcpy(rx_buf_.data(), early.data(), early.size());
  rx_end_ = early.size();
}

TcpConnection::~TcpConnection() {
  sodium_memzero(epoch_key_.data(), epoch_key_.size());
  if (failure_.failed() || !fd_ || tx_pending()) return;
  std::array<std::byte, kFrameHeaderSize + kFrameTagSize> b{};
  encode_header(FrameHeader{.kind = FrameKind::Goodbye}, std::span<std::byte, kFrameHeaderSize>(b.data(), kFrameHeaderSize));
  size_t n = kFrameHeaderSize;
  if (tx_.on()) {
    tx_.begin();
    tx_.update(b.data(), kFrameHeaderSize);
    auto t = tx_.finish();
    std::memcpy(b.data() + kFrameHeaderSize, t.data(), t.size());
    n += kFrameTagSize;
  }
  // Best effort: if the socket buffer is full the peer will see EOF instead, which also
  // reads as LinkDown there.
  (void)::send(fd_.get(), b.data(), n, MSG_NOSIGNAL | MSG_DONTWAIT);
}

void TcpConnection::check_usable() const { failure_.check(peer_); }

void TcpConnection::register_region(uint32_t id, std::span<std::byte> mem) {
  if (id == 0) throw Error("register_region: region id 0 is reserved (use a nonzero id)");
  if (rx_in_payload_ && rx_kind_ == FrameKind::Write && rx_region_ == id) rx_dst_ = rx_plain_ = nullptr;
  regions_[id] = mem;
}

void TcpConnection::unregister_region(uint32_t id) {
  if (rx_in_payload_ && rx_kind_ == FrameKind::Write && rx_region_ == id) rx_dst_ = rx_plain_ = nullptr;
  regions_.erase(id);
}

std::chrono::milliseconds TcpConnection::idle_for() const {
  return std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - last_rx_);
}

}  // namespace ftvm::transport::tcp
