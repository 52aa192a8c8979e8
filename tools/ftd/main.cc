// ftd: the ftvm daemon, one per host. See docs/ARCHITECTURE.md and `ftd --help`.
#include <signal.h>
#include <sys/resource.h>

#include <algorithm>
#include <cstdio>
#include <cstring>

#include <CLI/CLI.hpp>

#include "common/error.h"
#include "common/log.h"
#include "tools/ftd/arbiter/fence_command.h"
#ifdef FTVM_HAVE_COROSYNC
#include "tools/ftd/arbiter/corosync.h"
#endif
#ifdef FTVM_HAVE_SANLOCK
#include "tools/ftd/arbiter/sanlock.h"
#endif
#include "tools/ftd/daemon.h"
#include "transport/address.h"
#include "transport/auth.h"
#include "transport/tcp/tcp_transport.h"

int main(int argc, char** argv) {
#ifdef FTVM_HAVE_SANLOCK
  // The per-VM lease keeper of --arbiter sanlock (tools/ftd/arbiter/sanlock.h): ftd execs itself.
  if (argc > 1 && std::strcmp(argv[1], "__sanlock-keeper") == 0) return ftvm::ftd::sanlock_keeper_main(argc, argv);
#endif
  ftvm::ftd::DaemonConfig cfg;
  CLI::App app{"ftd - ftvm daemon: protects QEMU guests by continuous checkpointing to a standby host.\n"
               "Run one on the primary and one on the standby host; drive them with ftctl."};
  app.set_version_flag("--version", FTVM_VERSION);
  std::string log_file, level = "info";
  unsigned hb_ms = 400, hb_interval_ms = 50, ack_ms = 3000, reconnect_ms = 1000;
  bool no_verify = false;
  app.add_option("--run-dir", cfg.run_dir, "Directory for the control socket, twins and their logs")
      ->capture_default_str();
  app.add_option("--control", cfg.control_socket, "Control socket path (default: RUN_DIR/ftd.sock)");
  app.add_option("--listen", cfg.listen,
                 "Standby: address for replication connections from primaries, HOST:PORT (e.g. 10.0.0.2:7410); "
                 "not given or '' = this ftd is not a standby");
  app.add_option("--listen-also", cfg.listen_also,
                 "Standby: a further replication address HOST:PORT on another network (repeatable), for primaries "
                 "whose second heartbeat path comes that way (`ftctl enable --peer-alt`); needs --listen");
  std::string generate_key;
  app.add_option("--generate-key", generate_key,
                 "Write a new random replication key (32 bytes, mode 0600) to FILE and exit; copy it to the peer host "
                 "and pass it to both ftd with --key-file");
  app.add_option("--key-file", cfg.key_file,
                 "Pre-shared replication key of this host pair (mode 0600); every replication connection (TCP or "
                 "RDMA) proves it, every frame/message is authenticated and each epoch carries a keyed digest")
      ->check(CLI::ExistingFile);
  app.add_flag("--insecure", cfg.insecure,
               "Run without a key: replication connections are NOT authenticated (trusted, isolated networks "
               "only; logged loudly and shown by `ftctl status`)");
  app.add_flag("--encrypt", cfg.encrypt,
               "Also encrypt replication payloads (ChaCha20; needs --key-file; the peer follows when either side asks; "
               "TCP only: connections then avoid RDMA, which authenticates but does not encrypt)");
  std::vector<std::string> allow_peers;
  app.add_option("--allow-peer", allow_peers,
                 "Standby: only this address (or name, resolved at start) may connect for replication (repeatable; "
                 "default: any address that holds the key); others are closed before the handshake and logged");
  app.add_option("--heartbeat-timeout-ms", hb_ms, "Standby: primary silence before the twin takes over")
      ->capture_default_str()
      ->check(CLI::Range(50u, 60000u));
  app.add_option("--heartbeat-interval-ms", hb_interval_ms, "Heartbeat period on idle links")
      ->capture_default_str()
      ->check(CLI::Range(5u, 10000u));
  app.add_option("--ack-timeout-ms", ack_ms, "Primary: no ack for this long makes the VM degraded")
      ->capture_default_str()
      ->check(CLI::Range(100u, 600000u));
  app.add_option("--reconnect-ms", reconnect_ms, "Primary: retry period towards a lost standby")
      ->capture_default_str()
      ->check(CLI::Range(10u, 600000u));
  std::vector<std::string> tap_map;
  unsigned output_cap_mib = 16;
  app.add_option("--twin-tap-map", tap_map,
                 "Standby: PRIMARY_IFNAME=STANDBY_IFNAME: the twin uses this tap instead of the primary's "
                 "(-netdev tap,ifname=); it is kept admin-down until the twin is activated (repeatable)");
  app.add_option("--output-cap-mib", output_cap_mib,
                 "Primary: guest output held per VM before the epoch is cut early (MiB)")
      ->capture_default_str()
      ->check(CLI::Range(1u, 4096u));
  unsigned disk_buffer_mib = 64, disk_queue_mib = 64;
  app.add_option("--disk-dir", cfg.disk_dir,
                 "Standby: where the twins' disk replicas are created (DIR/<vm>/<n>.img, raw, sparse)")
      ->capture_default_str();
  app.add_option("--disk-buffer-mib", disk_buffer_mib,
                 "Standby: disk writes of uncommitted epochs kept in RAM per VM before spilling to a file (MiB)")
      ->capture_default_str()
      ->check(CLI::Range(1u, 65536u));
  app.add_option("--disk-queue-mib", disk_queue_mib,
                 "Primary: disk writes queued for the standby per VM before the guest's writes wait (MiB)")
      ->capture_default_str()
      ->check(CLI::Range(1u, 65536u));
  app.add_option("--libvirt-uri", cfg.libvirt_uri,
                 "libvirt connection for libvirt domains (primary: protected domains, the hook, the start-up scan; "
                 "standby: twins become libvirt domains); '' = plain QEMU only")
      ->capture_default_str();
  app.add_option("--twin-name-suffix", cfg.twin_name_suffix,
                 "Standby: a libvirt twin is named <domain><suffix> with a new UUID (needed when primary and standby "
                 "share one libvirtd); default: the primary's name and UUID")
      ->capture_default_str();
  app.add_option("--state-dir", cfg.state_dir,
                 "Persistent state: failed-over/<uuid> marks libvirt domains that failed over away from this host; "
                 "protect/ and history/ per VM; manual-wait/<vm>.{json,devstate}: a failover=manual twin waiting for "
                 "`ftctl failover --force`, adopted by the next ftd")
      ->capture_default_str();
  std::string arbiter = "none", fence_command;
  unsigned fence_timeout_ms = 30000, alone_after_ms = 1000;
  app.add_option("--arbiter", arbiter,
                 "Split-brain arbitration, the same on both hosts: none (a partition between two live hosts runs two "
                 "copies: 'split-brain unprotected'), fence-command (STONITH through --fence-command), corosync (the "
                 "quorum of the local corosync 3 cluster: run ftd on cluster nodes, ideally two nodes plus "
                 "corosync-qnetd on a third host), sanlock (one sanlock lease per VM on storage both hosts see, the "
                 "quorum disk: the side that runs the VM holds its lease; see --sanlock-lease)")
      ->capture_default_str()
      ->check(CLI::IsMember({"none", "fence-command", "corosync", "sanlock"}));
  std::string sanlock_lease, sanlock_lockspace = "ftvm";
  unsigned sanlock_host_id = 0, sanlock_io_timeout = 10;
  app.add_option("--sanlock-lease", sanlock_lease,
                 "With --arbiter sanlock: the lease area both hosts see (a shared LUN/LV, or a file on NFS), "
                 "initialised once with scripts/ftvm-sanlock-init PATH SLOTS; the sanlock daemon must run on this "
                 "host (SANLOCK_RUN_DIR as for ftd)");
  app.add_option("--sanlock-host-id", sanlock_host_id,
                 "With --arbiter sanlock: this host's id in the lockspace (1..2000, different on the two hosts)")
      ->check(CLI::Range(1u, 2000u));
  app.add_option("--sanlock-io-timeout", sanlock_io_timeout,
                 "With --arbiter sanlock: sanlock I/O timeout in seconds, the same on both hosts. A host that lost "
                 "the storage kills its guests at 8x this; the other host takes over a dead host's VMs after 8x this "
                 "+ 60 s (sanlock's fixed watchdog time)")
      ->capture_default_str()
      ->check(CLI::Range(1u, 60u));
  app.add_option("--sanlock-lockspace", sanlock_lockspace,
                 "With --arbiter sanlock: the lockspace name written by ftvm-sanlock-init")
      ->capture_default_str();
  unsigned corosync_peer_nodeid = 0, corosync_settle_ms = 1000;
  app.add_option("--corosync-peer-nodeid", corosync_peer_nodeid,
                 "With --arbiter corosync: the corosync node id of the other host (every VM of this ftd); 0 = find "
                 "it in corosync's nodelist, the node whose name or ringN_addr equals the peer's replication address")
      ->capture_default_str();
  app.add_option("--corosync-settle-ms", corosync_settle_ms,
                 "With --arbiter corosync: a quorum state (quorate without the peer, or not quorate) must hold this "
                 "long before it answers Yes or Fence (safety margin: corosync may tell the winner before the loser)")
      ->capture_default_str()
      ->check(CLI::Range(0u, 600000u));
  app.add_option("--fence-command", fence_command,
                 "With --arbiter fence-command: shell command that fences the other host; run with FTVM_FENCE_ACTION "
                 "(fence-primary|fence-standby), FTVM_PEER, FTVM_VM; exit 0 only once that host cannot run the VM");
  app.add_option("--fence-timeout-ms", fence_timeout_ms, "A fence command running longer is killed and retried")
      ->capture_default_str()
      ->check(CLI::Range(100u, 600000u));
  app.add_option("--alone-after-ms", alone_after_ms,
                 "Primary without an arbiter: how long the guest stays paused (output held) when the standby cannot "
                 "be reached before it runs on alone (at least twice the standby's heartbeat timeout)")
      ->capture_default_str()
      ->check(CLI::Range(0u, 3600000u));
  std::vector<std::string> qemu_binaries;
  app.add_option("--qemu-binary", qemu_binaries,
                 "Standby: a QEMU binary twins may run (absolute path; repeatable; default "
                 "/usr/bin/qemu-system-x86_64). The primary's binary name only picks one of these by basename; "
                 "anything else is refused")
      ->check(CLI::ExistingFile);
  app.add_option("--allow-path", cfg.allow_paths,
                 "Standby: a directory whose files twins may read (kernels, initrds, firmware, ROMs, read-only images "
                 "and CD-ROMs named by the primary; repeatable). Twins may create files only in their run directory "
                 "and write disks only in their replica directory")
      ->check(CLI::ExistingDirectory);
  unsigned disk_spill_max_mib = 4096;
  app.add_option("--disk-spill-max-mib", disk_spill_max_mib,
                 "Standby: disk writes of uncommitted epochs spilled to files under --disk-dir per VM before the "
                 "session is ended (the primary resynchronizes) (MiB)")
      ->capture_default_str()
      ->check(CLI::Range(1u, 1048576u));
  bool no_output_commit = false;
  app.add_flag("--no-output-commit", no_output_commit,
               "Primary: let the guest's network output leave at once instead of after its epoch is committed "
               "(clients may then see replies a failed-over guest never produced; benchmarks only)");
  app.add_option("--tracker", cfg.tracker, "Dirty-page tracker: auto (uffd-wp where the kernel has PAGEMAP_SCAN, else soft-dirty), uffd-wp, soft-dirty")
      ->capture_default_str()
      ->check(CLI::IsMember({"auto", "uffd-wp", "soft-dirty"}));
  app.add_option("--stats-dir", cfg.stats_dir, "Write per-epoch measurements as JSON lines here (benchmarks)");
  bool verify = false;
  app.add_flag("--verify-activation", verify,
               "Before the twin resumes, check that its full-RAM digest equals the primary's digest of the committed "
               "checkpoint (costs ~0.3 ms per MiB of guest RAM on the activation path; tests use it)");
  app.add_flag("--verify-every-commit", cfg.verify_every_commit,
               "Standby, tests: after applying each epoch, check that the twin's whole RAM equals the primary's "
               "RAM at that checkpoint (digest; costs a full RAM read per epoch)");
  app.add_flag("--no-verify-activation", no_verify, "Do not verify (the default)");
  app.add_flag("--enable-fault-injection", cfg.fault_injection, "Accept `ftctl fault` (for tests only)");
  uint64_t reserve_mib = 256;
  app.add_option("--memory-reserve-mib", reserve_mib,
                 "Standby: memory (MiB) to keep free for this host; a VM whose RAM in use does not fit in "
                 "MemAvailable minus this is refused (ftctl enable exits 5) instead of being OOM-killed later")
      ->capture_default_str();
  int oom_adj = -900;
  app.add_option("--oom-score-adj", oom_adj,
                 "OOM killer preference for ftd and its guard (-1000..1000): the kernel should kill almost anything "
                 "else first, since ftd's death fences the primary guest (twins it starts get 0 again)")
      ->capture_default_str()
      ->check(CLI::Range(-1000, 1000));
  int nice_value = -10;
  app.add_option("--nice", nice_value,
                 "Scheduling niceness of ftd (heartbeats and checkpoints must not starve behind guests)")
      ->capture_default_str()
      ->check(CLI::Range(-20, 19));
  app.add_option("--log", log_file, "Append the log to this file instead of stderr");
  app.add_option("--log-level", level, "debug, info, warn or error")
      ->capture_default_str()
      ->check(CLI::IsMember({"debug", "info", "warn", "error"}));
  CLI11_PARSE(app, argc, argv);
  if (!generate_key.empty()) {
    try {
      ftvm::transport::auth::generate_key(generate_key);
      fmt::print("ftd: wrote a new replication key to {} (mode 0600, key id {}); copy it to the peer host over a "
                 "secure channel and start both ftd with --key-file {}\n",
                 generate_key, ftvm::transport::auth::load_key(generate_key)->id_hex(), generate_key);
      return 0;
    } catch (const std::exception& e) {
      fmt::print(stderr, "ftd: --generate-key: {}\n", e.what());
      return 1;
    }
  }
  if (cfg.insecure && !cfg.key_file.empty()) {
    fmt::print(stderr, "ftd: --insecure and --key-file contradict each other: pick one\n");
    return 2;
  }
  if (!cfg.insecure && cfg.key_file.empty()) {
    fmt::print(stderr,
               "ftd: no replication key: pass --key-file FILE (create one with `ftd --generate-key FILE`, copy it to "
               "the peer host, mode 0600), or --insecure on a trusted, isolated network only\n");
    return 2;
  }
  if (cfg.encrypt && cfg.key_file.empty()) {
    fmt::print(stderr, "ftd: --encrypt needs --key-file\n");
    return 2;
  }
  try {
    if (!cfg.key_file.empty()) cfg.key = ftvm::transport::auth::load_key(cfg.key_file);
    for (const auto& a : allow_peers) {
      ftvm::transport::AddrInfo res;
      ftvm::transport::resolve(a, 0, false, res, false);
      for (addrinfo* i = res.ai; i; i = i->ai_next) {
        auto h = ftvm::transport::tcp::peer_host(ftvm::transport::format_addr(i->ai_addr));
        if (std::find(cfg.allow_peers.begin(), cfg.allow_peers.end(), h) == cfg.allow_peers.end())
          cfg.allow_peers.push_back(h);
      }
    }
  } catch (const std::exception& e) {
    fmt::print(stderr, "ftd: {}\n", e.what());
    return 2;
  }
  if (hb_interval_ms * 2 > hb_ms) {
    fmt::print(stderr, "ftd: --heartbeat-interval-ms ({}) must be at most half of --heartbeat-timeout-ms ({})\n",
               hb_interval_ms, hb_ms);
    return 2;
  }
  cfg.alone_after = std::chrono::milliseconds(alone_after_ms);
  if (arbiter == "fence-command") {
    if (fence_command.empty()) {
      fmt::print(stderr, "ftd: --arbiter fence-command needs --fence-command CMD (the command that fences the other host)\n");
      return 2;
    }
    cfg.arbiter = std::make_shared<ftvm::ftd::FenceCommandArbiter>(
        fence_command, std::chrono::milliseconds(fence_timeout_ms), std::chrono::milliseconds(500));
  } else if (arbiter == "corosync") {
#ifdef FTVM_HAVE_COROSYNC
    // Created below, once the log goes to its file and signals are blocked (its thread logs).
#else
    fmt::print(stderr, "ftd: --arbiter corosync: this ftd was built without the corosync arbiter (install "
                       "libquorum-dev libvotequorum-dev libcmap-dev and rebuild)\n");
    return 2;
#endif
  } else if (arbiter == "sanlock") {
#ifdef FTVM_HAVE_SANLOCK
    if (sanlock_lease.empty() || sanlock_host_id == 0) {
      fmt::print(stderr, "ftd: --arbiter sanlock needs --sanlock-lease PATH (the shared lease area) and "
                         "--sanlock-host-id N (1..2000, different on the two hosts)\n");
      return 2;
    }
    // Created below, once the log goes to its file (joining the lockspace logs and blocks).
#else
    fmt::print(stderr, "ftd: --arbiter sanlock: this ftd was built without the sanlock arbiter (install "
                       "libsanlock-dev and rebuild)\n");
    return 2;
#endif
  }
  if (arbiter != "sanlock" && (!sanlock_lease.empty() || sanlock_host_id != 0)) {
    fmt::print(stderr, "ftd: --sanlock-lease and --sanlock-host-id are only used with --arbiter sanlock\n");
    return 2;
  }
  if (arbiter != "fence-command" && !fence_command.empty()) {
    fmt::print(stderr, "ftd: --fence-command is only used with --arbiter fence-command\n");
    return 2;
  }
  cfg.memory_reserve_bytes = reserve_mib << 20;
  cfg.heartbeat_timeout = std::chrono::milliseconds(hb_ms);
  cfg.heartbeat_interval = std::chrono::milliseconds(hb_interval_ms);
  cfg.ack_timeout = std::chrono::milliseconds(ack_ms);
  cfg.reconnect_interval = std::chrono::milliseconds(reconnect_ms);
  cfg.verify_activation = verify && !no_verify;
  cfg.output_commit = !no_output_commit;
  cfg.output_cap_bytes = uint64_t{output_cap_mib} << 20;
  cfg.disk_buffer_bytes = uint64_t{disk_buffer_mib} << 20;
  cfg.disk_queue_bytes = uint64_t{disk_queue_mib} << 20;
  cfg.disk_spill_max_bytes = uint64_t{disk_spill_max_mib} << 20;
  if (!qemu_binaries.empty()) cfg.qemu_binaries = qemu_binaries;
  for (const auto& b : cfg.qemu_binaries)
    if (b.empty() || b[0] != '/') {
      fmt::print(stderr, "ftd: --qemu-binary '{}': give an absolute path\n", b);
      return 2;
    }
  for (const auto& d : cfg.allow_paths)
    if (d.empty() || d[0] != '/' || d == "/") {
      fmt::print(stderr, "ftd: --allow-path '{}': give an absolute directory other than /\n", d);
      return 2;
    }
  for (const auto& m : tap_map) {
    auto eq = m.find('=');
    if (eq == std::string::npos || eq == 0 || eq + 1 == m.size() || m.size() - eq - 1 >= 16 || eq >= 16) {
      fmt::print(stderr, "ftd: --twin-tap-map '{}': expected PRIMARY_IFNAME=STANDBY_IFNAME (names of 1..15 chars)\n", m);
      return 2;
    }
    cfg.twin_tap_map[m.substr(0, eq)] = m.substr(eq + 1);
  }

  // Signals: SIGTERM/SIGINT are read from a signalfd by the main loop, so block them in every
  // thread (threads inherit this mask); a peer that vanishes must not kill us with SIGPIPE.
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGINT);
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
  signal(SIGPIPE, SIG_IGN);

  try {
    using ftvm::log::Level;
    ftvm::log::set_level(level == "debug" ? Level::Debug : level == "warn" ? Level::Warn
                         : level == "error" ? Level::Error : Level::Info);
    if (!log_file.empty()) ftvm::log::set_file(log_file);
    // Before any thread exists, so every thread inherits it. Best effort: a standby that is
    // starved of CPU takes a live primary for dead.
    {
      // Inherited by the guard (forked later); twins set theirs back to 0 before exec.
      std::FILE* f = std::fopen("/proc/self/oom_score_adj", "w");
      if (!f || std::fprintf(f, "%d\n", oom_adj) < 0 || std::fclose(f) != 0)
        ftvm::log::warn("ftd", "setting /proc/self/oom_score_adj to {} failed: {}; the OOM killer may pick ftd (and "
                        "so fence the guests it protects) before other processes", oom_adj, std::strerror(errno));
    }
    if (setpriority(PRIO_PROCESS, 0, nice_value) != 0)
      ftvm::log::warn("ftd", "setpriority({}) failed: {}; ftd runs at the default priority", nice_value,
                      std::strerror(errno));
#ifdef FTVM_HAVE_COROSYNC
    if (arbiter == "corosync")
      cfg.arbiter = std::make_shared<ftvm::ftd::CorosyncArbiter>(corosync_peer_nodeid,
                                                                 std::chrono::milliseconds(corosync_settle_ms));
#endif
#ifdef FTVM_HAVE_SANLOCK
    if (arbiter == "sanlock") {
      ftvm::ftd::SanlockOptions so;
      so.lease_path = sanlock_lease;
      so.lockspace = sanlock_lockspace;
      so.host_id = sanlock_host_id;
      so.io_timeout_s = sanlock_io_timeout;
      cfg.arbiter = std::make_shared<ftvm::ftd::SanlockArbiter>(so);
    }
#endif
    ftvm::ftd::Daemon d(cfg);
    return d.run();
  } catch (const std::exception& e) {
    fmt::print(stderr, "ftd: {}\n", e.what());
    ftvm::log::error("ftd", "fatal: {}", e.what());
    return 1;
  }
}
