// ftvm-peer-tool: a replication peer for the security tests (issue 12), built on the real TCP
// transport. It plays another primary that holds the host pair's key (or another key, or none)
// and connects from a chosen source address, then sends one request and prints the standby's
// answer as one line: "REPLY <type> <text>", "CLOSED <reason>" or "REFUSED <reason>".
//
//   ftvm-peer-tool --connect HOST:PORT [--key FILE | --insecure] [--source ADDR] REQUEST
//   REQUEST: open VM             OpenSession for VM (a minimal plain-QEMU argv)
//            heartbeat-link SID  HeartbeatLink for session SID (hex)
//            disable SID         Disable for session SID (hex) as the first message
// Exit status 0 whenever the exchange ran (whatever the answer), 2 on usage errors.
#include <cstdio>
#include <string>

#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include "checkpoint/protocol.h"
#include "common/error.h"
#include "transport/auth.h"
#include "transport/tcp/tcp_transport.h"

namespace cp = ftvm::checkpoint;
using namespace ftvm::transport;

int main(int argc, char** argv) {
  CLI::App app{"ftvm-peer-tool: a replication peer for security tests"};
  std::string target, key_file, source;
  bool insecure = false;
  std::vector<std::string> request;
  app.add_option("--connect", target, "HOST:PORT of the standby ftd")->required();
  app.add_option("--key", key_file, "Key file");
  app.add_flag("--insecure", insecure, "No key");
  app.add_option("--source", source, "Local address to connect from");
  app.add_option("REQUEST", request, "open VM | heartbeat-link SID | disable SID")->required();
  CLI11_PARSE(app, argc, argv);
  if (request.size() != 2 || (key_file.empty() != insecure)) {
    std::fprintf(stderr, "usage: see the comment at the top of tests/security/peer_tool.cc\n");
    return 2;
  }
  Options o;
  o.connect_timeout = std::chrono::milliseconds(5000);
  o.source_address = source;
  std::unique_ptr<Connection> c;
  try {
    if (!key_file.empty()) o.key = auth::load_key(key_file);
    auto hp = tcp::parse_host_port(target);
    c = tcp::connect_tcp(hp.host, hp.port, o);
  } catch (const std::exception& e) {
    fmt::print("REFUSED {}\n", e.what());
    return 0;
  }
  try {
    std::vector<std::byte> body;
    uint16_t type = 0;
    if (request[0] == "open") {
      cp::OpenSession m;
      m.session_id = 0x5eed5eed5eed5eedull;
      m.ram_size = 64ull << 20;
      m.vm_name = request[1];
      m.qemu_argv = {"qemu-system-x86_64", "-name", request[1], "-m", "64"};
      body = cp::encode(m);
      type = static_cast<uint16_t>(cp::MsgType::OpenSession);
    } else if (request[0] == "heartbeat-link" || request[0] == "disable") {
      uint64_t sid = std::stoull(request[1], nullptr, 16);
      if (request[0] == "disable") {
        body = cp::encode(cp::Disable{sid});
        type = static_cast<uint16_t>(cp::MsgType::Disable);
      } else {
        body = cp::encode(cp::HeartbeatLink{sid});
        type = static_cast<uint16_t>(cp::MsgType::HeartbeatLink);
      }
    } else {
      std::fprintf(stderr, "unknown request '%s'\n", request[0].c_str());
      return 2;
    }
    c->send_control(type, body);
    auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    while (std::chrono::steady_clock::now() < deadline) {
      auto m = c->poll(std::chrono::milliseconds(100));
      if (!m) continue;
      std::string text;
      if (m->type == static_cast<uint16_t>(cp::MsgType::Error)) text = cp::decode<cp::ErrorMsg>(m->body).text;
      fmt::print("REPLY {} {}\n", cp::to_string(static_cast<cp::MsgType>(m->type)), text);
      return 0;
    }
    fmt::print("REPLY none (no answer within 10 s)\n");
  } catch (const std::exception& e) {
    fmt::print("CLOSED {}\n", e.what());
  }
  return 0;
}
