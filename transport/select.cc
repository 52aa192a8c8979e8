#include "transport/select.h"

#include <poll.h>

#include "common/error.h"
#include "common/log.h"
#include "transport/tcp/tcp_transport.h"
#ifdef FTVM_HAVE_RDMA
#include "transport/rdma/rdma_transport.h"
#endif

namespace ftvm::transport {

Kind parse_kind(const std::string& s) {
  if (s == "auto") return Kind::Auto;
  if (s == "tcp") return Kind::Tcp;
  if (s == "rdma") return Kind::Rdma;
  fail("unknown transport '{}' (use rdma, tcp or auto)", s);
}

const char* to_string(Kind k) {
  switch (k) {
    case Kind::Auto: return "auto";
    case Kind::Tcp: return "tcp";
    case Kind::Rdma: return "rdma";
  }
  return "?";
}

bool rdma_built() {
#ifdef FTVM_HAVE_RDMA
  return true;
#else
  return false;
#endif
}

std::unique_ptr<Connection> connect(const std::string& host, uint16_t port, Kind kind, Options opts,
                                    const std::string& rdma_dev, std::string* chosen) {
  auto say = [&](const std::string& s) {
    if (chosen) *chosen = s;
  };
  // RDMA authenticates like TCP (transport/auth.h) but cannot encrypt one-sided writes.
  if (opts.encrypt && kind == Kind::Rdma)
    fail("--transport rdma: the RDMA transport does not encrypt and this ftd asks for encryption (--encrypt); use "
         "--transport tcp (or auto), or drop --encrypt (RDMA sessions are authenticated, not encrypted)");
  if (opts.encrypt && kind == Kind::Auto) {
    say("tcp (auto: --encrypt, which the RDMA transport does not do)");
    return tcp::connect_tcp(host, port, opts);
  }
#ifdef FTVM_HAVE_RDMA
  std::string dev;
  if (kind != Kind::Tcp && rdma::rdma_reachable(host, &dev)) {
    say(fmt::format("rdma via {} ({})", dev, kind == Kind::Auto ? "auto: the peer is reachable over RDMA" : "requested"));
    return rdma::connect_rdma(host, port, opts, rdma_dev);
  }
  if (kind == Kind::Rdma)
    fail("--transport rdma: {} is not reachable through an RDMA device (no RDMA route; check `rdma link` and the "
         "address), use --transport tcp or auto", host);
#else
  (void)rdma_dev;
  if (kind == Kind::Rdma)
    fail("--transport rdma: this ftd was built without the RDMA transport (install rdma-core's librdmacm-dev and "
         "libibverbs-dev and rebuild)");
#endif
  say(kind == Kind::Auto ? "tcp (auto: no RDMA route to the peer)" : "tcp (requested)");
  return tcp::connect_tcp(host, port, opts);
}

struct MultiListener::Impl {
  std::unique_ptr<tcp::Listener> tcp;
#ifdef FTVM_HAVE_RDMA
  std::unique_ptr<rdma::RdmaListener> rdma;
#endif
  bool next_rdma = false;
};

MultiListener::MultiListener(const std::string& host, uint16_t port, Options opts) : impl_(std::make_unique<Impl>()) {
  impl_->tcp = std::make_unique<tcp::Listener>(host, port, opts);
  describe_ = "tcp " + impl_->tcp->local_address();
#ifdef FTVM_HAVE_RDMA
  std::string dev;
  const std::string probe = host.empty() || host == "*" || host == "::" || host == "0.0.0.0" ? "" : host;
  if (!probe.empty() && opts.encrypt && rdma::rdma_reachable(probe, &dev)) {
    log::warn("transport", "not listening for RDMA on {} ({}): this ftd asks for encryption (--encrypt), which the "
              "RDMA transport does not do; primaries must connect over TCP (give them --encrypt too, or "
              "--transport tcp)", host, dev);
  } else if (!probe.empty() && rdma::rdma_reachable(probe, &dev)) {
    try {
      impl_->rdma = std::make_unique<rdma::RdmaListener>(host, impl_->tcp->bound_port(), opts);
      describe_ += fmt::format(", rdma {} ({})", impl_->rdma->local_address(), dev);
    } catch (const std::exception& e) {
      log::warn("transport", "not listening for RDMA on {}: {}", host, e.what());
    }
  }
#endif
}

MultiListener::~MultiListener() = default;

std::unique_ptr<Connection> MultiListener::accept(std::chrono::milliseconds timeout) {
#ifdef FTVM_HAVE_RDMA
  if (impl_->rdma) {
    pollfd p[2] = {{impl_->tcp->fd(), POLLIN, 0}, {impl_->rdma->fd(), POLLIN, 0}};
    int r = ::poll(p, 2, static_cast<int>(timeout.count()));
    if (r < 0 && errno != EINTR) throw SysError(errno, "poll replication listeners");
    if (r <= 0) return nullptr;
    if (p[1].revents) return impl_->rdma->accept(std::chrono::milliseconds(0));
    return impl_->tcp->accept(std::chrono::milliseconds(0));
  }
#endif
  return impl_->tcp->accept(timeout);
}

std::optional<MultiListener::Pending> MultiListener::accept_pending(std::chrono::milliseconds timeout) {
  auto wrap_tcp = [this](std::chrono::milliseconds t) -> std::optional<Pending> {
    auto a = impl_->tcp->accept_socket(t);
    if (!a) return std::nullopt;
    Pending p{a->peer, a->peer_host, {}};
    auto shared = std::make_shared<tcp::Listener::Accepted>(std::move(*a));
    tcp::Listener* l = impl_->tcp.get();
    p.handshake = [l, shared] { return l->handshake_accepted(std::move(*shared)); };
    return p;
  };
#ifdef FTVM_HAVE_RDMA
  if (impl_->rdma) {
    pollfd p[2] = {{impl_->tcp->fd(), POLLIN, 0}, {impl_->rdma->fd(), POLLIN, 0}};
    int r = ::poll(p, 2, static_cast<int>(timeout.count()));
    if (r < 0 && errno != EINTR) throw SysError(errno, "poll replication listeners");
    if (r <= 0) return std::nullopt;
    if (p[1].revents) {
      // The CM exchange here (key ids checked); the authentication, which waits for the
      // client's first SENDs, on the caller's handshake thread: an idle client delays no one.
      auto e = impl_->rdma->accept_established(std::chrono::milliseconds(0));
      if (!e) return std::nullopt;
      Pending pd{e->conn->peer(), tcp::peer_host(e->conn->peer()), {}};
      auto holder = std::make_shared<std::unique_ptr<rdma::RdmaListener::Established>>(std::move(e));
      pd.handshake = [holder] { return rdma::RdmaListener::finish(std::move(*holder)); };
      return pd;
    }
    return wrap_tcp(std::chrono::milliseconds(0));
  }
#endif
  return wrap_tcp(timeout);
}

}  // namespace ftvm::transport
