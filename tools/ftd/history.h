// History: what happened to one protected VM, across hosts and ftd restarts (issue 11): when it
// was protected and by which pair, when it failed over (from which host to which, why), when it
// was disabled. `ftctl status` shows it (`status --json`: "history").
//
// Contract:
//  * An event is a JSON object with at least "wall_ms" (unix ms), "event" (protected | failover |
//    primary-lost | disabled) and "host" (the ftd that recorded it, node_name()). Events are kept
//    oldest first, at most kMaxEvents (the oldest are dropped).
//  * Persisted as STATE_DIR/history/<vm>.json (one JSON array, replaced atomically on every
//    append): an ftd that restarts, or that protects the VM again later, continues it.
//  * It follows the VM: the primary sends it in OpenSession, and the standby whose twin takes
//    over continues the received history (adopt()) and writes it under its own state dir.
//  * Thread-safe. Failing to persist is logged, never thrown: history never stops a failover.
#pragma once

#include <mutex>
#include <string>

#include <nlohmann/json.hpp>

namespace ftvm::ftd {

class History {
 public:
  static constexpr size_t kMaxEvents = 50;

  // Loads STATE_DIR/history/<vm>.json if it exists (an unreadable file is logged and ignored).
  History(std::string state_dir, std::string vm);

  // Appends `event` (adds "wall_ms" and "host" when missing) and persists the history.
  void append(nlohmann::json event);
  // Replaces the history with `events_json` (a JSON array text, from OpenSession) when it parses
  // and is an array; anything else is logged and leaves the history as it is. Persists it.
  void adopt(const std::string& events_json);
  nlohmann::json events() const;
  std::string dump() const;  // the JSON array text, for OpenSession (bounded: kMaxEvents)

  // This ftd's name in history records: "hostname@listen-address" ("hostname" without a
  // listener). Set once at start-up (Daemon's constructor).
  static void set_node_name(const std::string& listen);
  static std::string node_name();

 private:
  void save_locked() const;
  const std::string state_dir_, vm_;
  mutable std::mutex mu_;
  nlohmann::json events_ = nlohmann::json::array();
};

}  // namespace ftvm::ftd
