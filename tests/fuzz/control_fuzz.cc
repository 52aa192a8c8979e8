// Fuzz target: ftd's control-socket request reader (tools/control/control.h serve_control_client):
// the input is what a local client writes; every line must get exactly one JSON answer and the
// server must neither crash nor hang. A socketpair stands in for the accepted connection.
#include <sys/socket.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <string>
#include <thread>

#include <nlohmann/json.hpp>

#include "common/error.h"
#include "common/fd.h"
#include "tools/control/control.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  int sv[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) std::abort();
  ftvm::UniqueFd server(sv[0]);
  ftvm::UniqueFd client(sv[1]);
  std::string answers;
  std::thread io([&] {
    size_t off = 0;
    while (off < size) {
      ssize_t n = ::send(client.get(), data + off, size - off, MSG_NOSIGNAL);
      if (n <= 0) break;
      off += static_cast<size_t>(n);
    }
    ::shutdown(client.get(), SHUT_WR);
    char buf[65536];
    for (;;) {
      ssize_t n = ::read(client.get(), buf, sizeof buf);
      if (n <= 0) break;
      answers.append(buf, static_cast<size_t>(n));
    }
  });
  try {
    ftvm::control::serve_control_client(std::move(server), [](const nlohmann::json& req) {
      // What the daemon's handler sees: an object (the reader checks that).
      if (!req.is_object()) std::abort();
      return nlohmann::json{{"ok", true}};
    });
  } catch (const ftvm::Error&) {
  }
  io.join();
  // Every answer is one JSON object per line.
  size_t start = 0;
  while (start < answers.size()) {
    size_t nl = answers.find('\n', start);
    if (nl == std::string::npos) std::abort();
    auto j = nlohmann::json::parse(answers.substr(start, nl - start), nullptr, false);
    if (j.is_discarded() || !j.is_object() || !j.contains("ok")) std::abort();
    start = nl + 1;
  }
  return 0;
}
