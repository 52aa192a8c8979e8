#include "transport/address.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <cerrno>
#include <cstring>
#include <unistd.h>

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

std::string source_host_for(const std::string& host, uint16_t port) {
  AddrInfo ai;
  resolve(host, port, false, ai, true);
  std::string last;
  for (addrinfo* a = ai.ai; a; a = a->ai_next) {
    const int fd = ::socket(a->ai_family, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (fd < 0) {
      last = fmt::format("socket: {}", std::strerror(errno));
      continue;
    }
    sockaddr_storage local{};
    socklen_t len = sizeof local;
    const bool ok = ::connect(fd, a->ai_addr, a->ai_addrlen) == 0 &&
                    ::getsockname(fd, reinterpret_cast<sockaddr*>(&local), &len) == 0;
    if (!ok) last = std::strerror(errno);
    ::close(fd);
    if (!ok) continue;
    char buf[INET6_ADDRSTRLEN] = {};
    if (local.ss_family == AF_INET)
      inet_ntop(AF_INET, &reinterpret_cast<const sockaddr_in*>(&local)->sin_addr, buf, sizeof buf);
    else
      inet_ntop(AF_INET6, &reinterpret_cast<const sockaddr_in6*>(&local)->sin6_addr, buf, sizeof buf);
    return buf;
  }
  throw Error(fmt::format("no route from this host to {} port {} ({}): check the address and the routing table", host,
                          port, last.empty() ? "no address" : last));
}

}  // namespace ftvm::transport
