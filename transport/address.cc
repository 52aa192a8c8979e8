#include "transport/address.h"

#include <arpa/inet.h>
#include <netinet/in.h>

#include "common/error.h"

namespace ftvm::transport {

std::string format_addr(const sockaddr* sa) {
  char buf[INET6_ADDRSTRLEN] = {};
  if (sa && sa->sa_family == AF_INET) {
    auto* in = reinterpret_cast<const sockaddr_in*>(sa);
    inet_ntop(AF_INET, &in->sin_addr, buf, sizeof buf);
    return fmt::format("{}:{}", buf, ntohs(in->sin_port));
  }
  if (sa && sa->sa_family == AF_INET6) {
    auto* in6 = reinterpret_cast<const sockaddr_in6*>(sa);
    inet_ntop(AF_INET6, &in6->sin6_addr, buf, sizeof buf);
    return fmt::format("[{}]:{}", buf, ntohs(in6->sin6_port));
  }
  return "(unknown address)";
}

void resolve(const std::string& host, uint16_t port, bool passive, AddrInfo& out, bool addrconfig) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_NUMERICSERV | (passive ? AI_PASSIVE : (addrconfig ? AI_ADDRCONFIG : 0));
  std::string service = std::to_string(port);
  const char* node = (host.empty() || host == "*") ? nullptr : host.c_str();
  int rc = getaddrinfo(node, service.c_str(), &hints, &out.ai);
  if (rc != 0)
    throw Error(fmt::format("resolve address '{}' port {}: {} (check the host name or use an IP address)", host, port,
                            gai_strerror(rc)));
}

}  // namespace ftvm::transport
