// Socket-address helpers shared by the fabrics' setup code (tcp/, rdma/): name resolution and
// printing. Not part of the data path.
#pragma once

#include <netdb.h>
#include <sys/socket.h>

#include <cstdint>
#include <string>

namespace ftvm::transport {

// "1.2.3.4:port" or "[v6]:port"; "(unknown address)" for null or other families.
std::string format_addr(const sockaddr* sa);

// Owns a getaddrinfo() result.
struct AddrInfo {
  addrinfo* ai = nullptr;
  AddrInfo() = default;
  AddrInfo(const AddrInfo&) = delete;
  AddrInfo& operator=(const AddrInfo&) = delete;
  ~AddrInfo() {
    if (ai) freeaddrinfo(ai);
  }
};

// Resolves host:port for a stream socket ("" or "*" = any address when `passive`). With
// `addrconfig`, active lookups only return families configured on this host. Throws
// ftvm::Error naming the host, the port and the resolver's reason.
void resolve(const std::string& host, uint16_t port, bool passive, AddrInfo& out, bool addrconfig);

}  // namespace ftvm::transport
