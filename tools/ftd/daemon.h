// Daemon: one ftd per host. Serves the control socket (ftctl), accepts replication sessions
// from primaries (standby role) and runs primary sessions for the VMs protected from here.
#pragma once

#include <atomic>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "tools/ftd/primary.h"
#include "tools/ftd/session.h"
#include "tools/ftd/standby.h"
#include "tools/ftd/standby_persist.h"
#include "transport/select.h"
#include "transport/tcp/tcp_transport.h"

namespace ftvm::ftd {

class Daemon {
 public:
  explicit Daemon(DaemonConfig cfg);
  ~Daemon();
  // Serves until SIGTERM/SIGINT; returns the process exit code.
  int run();

  // One control request (see tools/control/control.h for the wire format); never throws.
  nlohmann::json handle(const nlohmann::json& req);

 private:
  void listen_loop(transport::MultiListener& l);
  // Runs one accepted client's handshake (its own thread) and, if it succeeds, its session.
  void handshake_and_serve(transport::MultiListener::Pending p);
  bool peer_allowed(const std::string& host) const;
  void claim_standby(const std::string& name, StandbySession* self);
  // Answers a primary's Resolve (checkpoint/protocol.h): settles the named session's fate.
  checkpoint::Resolution resolve(const checkpoint::Resolve& r, const StandbySession& from);
  // The pid of an activated twin of `vm` left running by an earlier ftd (RUN/vms/VM/active), or -1.
  pid_t adopted_twin(const std::string& vm) const;
  // Start-up scan of RUN/vms: an activated twin is left running; a paused twin recorded as
  // waiting for `ftctl failover --force` (standby_persist.h) is adopted (waiting_); any other
  // paused twin is killed (never activated: safe to remove).
  void kill_stale_twins();
  // The adopted waiting twin of `vm` that still waits, or null. Caller holds mu_.
  std::shared_ptr<WaitingTwin> waiting_twin_locked(const std::string& vm) const;
  // reprotect=auto after a twin took over here: protects it again towards `peer`.
  void reprotect_twin(const std::string& vm, const std::string& qmp, const std::string& domain,
                      const std::string& peer, const std::string& failover);
  nlohmann::json cmd_enable(const nlohmann::json& req);
  nlohmann::json cmd_status(const nlohmann::json& req);
  nlohmann::json cmd_failover(const nlohmann::json& req);
  nlohmann::json cmd_disable(const nlohmann::json& req);
  nlohmann::json cmd_fault(const nlohmann::json& req);
  nlohmann::json cmd_hook(const nlohmann::json& req);
  // libvirt domains declared protected (hook `started`/`reconnect`, or found running at start):
  // protection starts on a background thread once the domain runs (the hook's caller, libvirtd,
  // is still starting it and must not wait for us).
  void protect_domain_async(const std::string& uuid, const std::string& name, EnableRequest r, std::string origin);
  void scan_libvirt();
  // Plain-QEMU VMs protected from here are recorded in STATE_DIR/protect/<name>.json (the enable
  // request) until `ftctl disable`, so that an ftd that restarts protects them again.
  void record_protection(const std::string& name, const nlohmann::json& req);
  void forget_protection(const std::string& name);
  void reattach_recorded();
  bool is_own_listener(const std::string& peer) const;
  std::vector<std::thread> workers_;  // joined at shutdown
  std::shared_ptr<PrimarySession> primary(const std::string& name);

  DaemonConfig cfg_;
  std::mutex mu_;
  std::map<std::string, std::shared_ptr<PrimarySession>> primaries_;
  std::vector<std::shared_ptr<StandbySession>> standbys_;
  std::vector<std::shared_ptr<WaitingTwin>> waiting_;  // adopted at start-up (kill_stale_twins)
  std::atomic<bool> stop_{false};
  std::unique_ptr<transport::MultiListener> listener_;
  std::vector<std::unique_ptr<transport::MultiListener>> listeners_also_;  // --listen-also
  std::string listen_address_;
  std::string security_;  // "authenticated (key ID, FILE)" / "INSECURE ..." for status and logs
  // Handshakes in progress (listen_loop): per client address, and their threads (joined when
  // done and at shutdown).
  std::mutex hs_mu_;
  std::map<std::string, unsigned> handshaking_;
  unsigned handshaking_total_ = 0;
  struct HandshakeThread {
    std::thread t;
    std::shared_ptr<std::atomic<bool>> done;
  };
};

}  // namespace ftvm::ftd
