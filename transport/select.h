// Choosing the fabric: `--transport rdma|tcp|auto` on the primary, and the standby's listeners.
//
// Auto picks RDMA when the peer address resolves through an RDMA device (rdma_cm route
// resolution succeeds), TCP otherwise. RDMA connections use the same host:port as TCP: rdma_cm
// has its own port space, so a standby listens on both at once.
#pragma once

#include <chrono>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "transport/transport.h"

namespace ftvm::transport {

enum class Kind { Auto, Tcp, Rdma };

// Parses "auto", "tcp" or "rdma"; throws ftvm::Error naming the accepted values.
Kind parse_kind(const std::string& s);
const char* to_string(Kind k);
// True when this build has the RDMA backend (rdma-core was found at build time).
bool rdma_built();

// Connects to host:port over the chosen fabric. `chosen` (if given) receives a sentence for
// the log saying which fabric and why. Throws like connect_tcp/connect_rdma; an explicit
// "rdma" without an RDMA route throws ftvm::Error saying so. Both fabrics authenticate with
// opts.key (transport/auth.h); only TCP encrypts: with opts.encrypt "auto" means TCP and
// "rdma" is refused.
std::unique_ptr<Connection> connect(const std::string& host, uint16_t port, Kind kind, Options opts,
                                    const std::string& rdma_dev = {}, std::string* chosen = nullptr);

// Listens on host:port over TCP and, where an RDMA device serves that address and encryption
// is not asked for (the RDMA transport authenticates but does not encrypt), over RDMA too.
class MultiListener {
 public:
  MultiListener(const std::string& host, uint16_t port, Options opts);
  ~MultiListener();
  // Waits up to `timeout` for a client on any fabric (nullptr on timeout). Throws like the
  // backends' accept(); the listener stays usable.
  std::unique_ptr<Connection> accept(std::chrono::milliseconds timeout);

  // A client accepted but not handshaken yet: its address, known before any byte is read
  // from it (allow-lists, per-address limits), and the handshake to run, on any thread,
  // bounded by Options::connect_timeout; it throws like accept(). (RDMA clients are
  // handshaken inside rdma_cm's accept already; their `handshake` just hands them over.)
  struct Pending {
    std::string peer, peer_host;
    std::function<std::unique_ptr<Connection>()> handshake;
  };
  std::optional<Pending> accept_pending(std::chrono::milliseconds timeout);
  // "tcp 127.0.0.1:7410, rdma 10.0.0.1:7410 (rxe0)" for logs and status.
  std::string describe() const { return describe_; }

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  std::string describe_;
};

}  // namespace ftvm::transport
