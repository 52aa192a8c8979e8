// ftvm-arbiter-probe: samples a CorosyncArbiter (the one `ftd --arbiter corosync` uses) and
// prints one line per sample until SIGTERM/SIGINT or --duration-ms:
//   <unix_ms> activate=<yes|wait|fence> run_alone=<yes|wait|fence> healthy=<0|1> peer=<id> holds=<status text>
// Run it inside a corosync node's network namespace (tests/cluster/corosync-lab.sh exec NODE ...).
#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <thread>

#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include "tools/ftd/arbiter/corosync.h"

namespace {
volatile sig_atomic_t g_stop = 0;
void on_signal(int) { g_stop = 1; }
}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"ftvm-arbiter-probe: print the corosync arbiter's answers every interval"};
  std::string peer_host;
  unsigned peer_nodeid = 0, settle_ms = 1000, interval_ms = 50, duration_ms = 0;
  app.add_option("--peer-host", peer_host, "The other side's replication address (resolved in corosync's nodelist)")
      ->required();
  app.add_option("--peer-nodeid", peer_nodeid, "The other side's corosync node id (0 = from the nodelist)");
  app.add_option("--settle-ms", settle_ms, "Safety margin (ftd --corosync-settle-ms)")->capture_default_str();
  app.add_option("--interval-ms", interval_ms, "Sampling period")->capture_default_str()->check(CLI::Range(1u, 60000u));
  app.add_option("--duration-ms", duration_ms, "Stop after this long (0 = at SIGTERM)")->capture_default_str();
  CLI11_PARSE(app, argc, argv);
  struct sigaction sa{};
  sa.sa_handler = on_signal;
  if (sigaction(SIGTERM, &sa, nullptr) != 0 || sigaction(SIGINT, &sa, nullptr) != 0) {
    std::perror("ftvm-arbiter-probe: sigaction");
    return 1;
  }
  try {
    ftvm::ftd::CorosyncArbiter arb(peer_nodeid, std::chrono::milliseconds(settle_ms));
    const ftvm::checkpoint::ArbiterSubject subj{"probe", peer_host, std::chrono::milliseconds(0),
                                                std::chrono::milliseconds(0)};
    const auto t0 = std::chrono::steady_clock::now();
    auto next = t0;
    while (!g_stop) {
      const auto a = arb.may_activate(subj, std::chrono::milliseconds(20));
      const auto r = arb.may_run_alone(subj, std::chrono::milliseconds(20));
      const auto st = arb.status();
      const long long now_ms = std::chrono::duration_cast<std::chrono::milliseconds>(
                                   std::chrono::system_clock::now().time_since_epoch()).count();
      fmt::print("{} activate={} run_alone={} healthy={} peer={} holds={}\n", now_ms, ftvm::checkpoint::to_string(a),
                 ftvm::checkpoint::to_string(r), st.healthy ? 1 : 0, arb.peer_of(peer_host), st.holds);
      std::fflush(stdout);
      if (duration_ms && std::chrono::steady_clock::now() - t0 >= std::chrono::milliseconds(duration_ms)) break;
      next += std::chrono::milliseconds(interval_ms);
      std::this_thread::sleep_until(next);
    }
  } catch (const std::exception& e) {
    fmt::print(stderr, "ftvm-arbiter-probe: {}\n", e.what());
    return 1;
  }
  return 0;
}
