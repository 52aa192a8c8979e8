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

// The address this host would send from to reach host:port (the routing table's choice, read
// with getsockname() on a connected UDP socket; no packet is sent), numeric and without the
// port, as a peer's address reads on the other side ("10.2.0.1", "fd00::1"). Throws
// ftvm::Error/SysError naming the destination when there is no route to it.
std::string source_host_for(const std::string& host, uint16_t port);

}  // namespace ftvm::transport
