// libvirt glue: a connection, a domain, and LibvirtMonitor (the Monitor of monitor.h over
// libvirt's QEMU monitor pass-through), for protecting domains libvirt manages.
//
// Errors: every libvirt call is checked; failures throw ftvm::Error carrying libvirt's own
// message (virGetLastErrorMessage), what was attempted on which domain/URI, and what to do.
// libvirt's default error printer (which writes "libvirt: ... error : ..." to stderr) is
// silenced: the exceptions carry the messages.
//
// Events: the first Connection::open() registers libvirt's default event loop
// (virEventRegisterDefaultImpl) and runs it on a detached background thread, once per process.
// This must precede every connection that wants events, so open all connections through here.
//
// The libvirt types stay out of this header (forward declarations only).
#pragma once

#include <deque>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/error.h"
#include "vmm-glue/monitor.h"

struct _virConnect;
struct _virDomain;

namespace ftvm::vmm {

namespace lv {

// A domain that does not exist (lookup by name or UUID found nothing).
class NoSuchDomain : public Error {
 public:
  NoSuchDomain(const std::string& name, const std::string& uri);
  const std::string& domain() const { return name_; }

 private:
  std::string name_;
};

class Connection {
 public:
  // Opens `uri` read-write ("" = libvirt's default: LIBVIRT_DEFAULT_URI, then the configured
  // uri_default, then probing). Throws ftvm::Error with libvirt's message and a hint.
  static Connection open(const std::string& uri);

  Connection(Connection&& o) noexcept;
  Connection& operator=(Connection&& o) noexcept;
  Connection(const Connection&) = delete;
  Connection& operator=(const Connection&) = delete;
  ~Connection();

  // The URI libvirt actually connected to (virConnectGetURI; e.g. "qemu:///system" for "").
  const std::string& uri() const { return uri_; }
  // False once libvirt noticed the connection is gone (virConnectIsAlive).
  bool alive() const;
  _virConnect* get() const { return conn_; }

 private:
  Connection(_virConnect* c, std::string uri) : conn_(c), uri_(std::move(uri)) {}
  _virConnect* conn_ = nullptr;
  std::string uri_;
};

struct DomainState {
  std::string state;   // "running", "paused", "shutoff", "shutdown", "crashed", "blocked",
                       // "pmsuspended", "nostate"
  std::string reason;  // e.g. "booted", "user", "migration", "destroyed"; "reason N" if unknown
  std::string str() const { return state + " (" + reason + ")"; }
};

class Domain {
 public:
  // By UUID when `name_or_uuid` parses as one (then by name, for a domain named like a UUID),
  // else by name. A missing domain throws NoSuchDomain.
  static Domain lookup(Connection& conn, const std::string& name_or_uuid);

  Domain(Domain&& o) noexcept;
  Domain& operator=(Domain&& o) noexcept;
  Domain(const Domain&) = delete;
  Domain& operator=(const Domain&) = delete;
  ~Domain();

  std::string name() const;
  std::string uuid() const;  // 8-4-4-4-12 string form
  // virDomainGetXMLDesc: the live XML (inactive=false) or the persistent definition
  // (VIR_DOMAIN_XML_INACTIVE); secure adds VIR_DOMAIN_XML_SECURE (passwords; read-write
  // connection needed); migratable adds VIR_DOMAIN_XML_MIGRATABLE (what migration sends to
  // another host: no host-specific defaults libvirt added, no aliases of implicit devices).
  std::string xml(bool inactive = false, bool secure = false, bool migratable = false) const;
  bool active() const;
  bool persistent() const;
  DomainState state() const;
  // The QEMU process of an active domain on this host, from libvirt's pid file:
  // qemu:///system -> /run/libvirt/qemu/NAME.pid; qemu:///session ->
  // $XDG_RUNTIME_DIR/libvirt/qemu/run/NAME.pid. Throws for other/remote URIs, an inactive
  // domain, or a missing/unreadable pid file (run ftd as root for qemu:///system).
  int qemu_pid() const;

  // The metadata element in namespace `ns_uri` (VIR_DOMAIN_METADATA_ELEMENT), as libvirt returns
  // it: the element with its namespace stripped. std::nullopt when there is none. `config` reads
  // the persistent definition instead of the current one.
  std::optional<std::string> metadata(const std::string& ns_uri, bool config = false) const;
  // Sets the element `xml` (no xmlns of its own: libvirt puts it into `ns_uri` with prefix
  // `key`). `live` applies it to the running domain (only when active), `config` to the
  // persistent definition. Throws when neither applies (inactive domain, config=false).
  void set_metadata(const std::string& xml, const std::string& key, const std::string& ns_uri,
                    bool live, bool config);
  // Removes the element in `ns_uri` (no error when there is none). Same `live`/`config` rules.
  void remove_metadata(const std::string& ns_uri, bool live, bool config);

  void resume();
  void destroy();   // hard power-off (virDomainDestroy); a transient domain disappears
  void undefine();  // removes the persistent definition (an active domain becomes transient)

  _virDomain* get() const { return dom_; }
  const std::string& conn_uri() const { return uri_; }

 private:
  friend Domain create_paused(Connection&, const std::string&);
  friend Domain define(Connection&, const std::string&);
  Domain(_virDomain* d, std::string uri) : dom_(d), uri_(std::move(uri)) {}
  std::string what() const;  // "libvirt domain NAME (URI)"
  unsigned affect_flags(bool live, bool config, const char* op) const;
  _virDomain* dom_ = nullptr;
  std::string uri_;
};

// Starts a transient domain from `xml`, paused (virDomainCreateXML, VIR_DOMAIN_START_PAUSED).
Domain create_paused(Connection& conn, const std::string& xml);
// Defines (or redefines) a persistent domain from `xml` (virDomainDefineXML); does not start it.
Domain define(Connection& conn, const std::string& xml);
// Names of the active domains.
std::vector<std::string> list_active(Connection& conn);

}  // namespace lv

// Parses the string virDomainQemuMonitorCommand returns for `cmd`: a QMP reply object.
// {"return": X, ...} -> X; {"error": {"class": C, "desc": D}} -> throws QmpError(cmd, C, D);
// anything else (not JSON, not an object, neither member) -> throws ftvm::ProtocolError.
nlohmann::json parse_qmp_reply(const std::string& cmd, const std::string& reply);

// The Monitor contract (monitor.h) over libvirt: commands go through
// virDomainQemuMonitorCommand[WithFiles], events arrive through
// virConnectDomainQemuMonitorEventRegister on the event loop thread and are queued.
// Needs the QEMU driver (qemu:///system, qemu:///session, remote qemu URIs): construction on
// another driver throws. Note that libvirt marks a domain "tainted: custom-monitor" in its log
// on the first pass-through command.
class LibvirtMonitor : public Monitor {
 public:
  // Keeps its own references to the connection and domain (it may outlive both handles).
  // Registers for all QEMU monitor events of the domain; throws ftvm::Error when that fails.
  LibvirtMonitor(lv::Connection& conn, lv::Domain& dom);
  ~LibvirtMonitor() override;
  LibvirtMonitor(LibvirtMonitor&& o) noexcept;
  LibvirtMonitor& operator=(LibvirtMonitor&&) = delete;
  LibvirtMonitor(const LibvirtMonitor&) = delete;
  LibvirtMonitor& operator=(const LibvirtMonitor&) = delete;

  nlohmann::json execute(const std::string& cmd, const nlohmann::json& args = nullptr) override;
  // Passes `fd` with virDomainQemuMonitorCommandWithFiles (libvirt >= 8.2); the caller keeps it.
  nlohmann::json execute_with_fd(const std::string& cmd, const nlohmann::json& args, int fd) override;
  // Events queued since the last call, oldest first: {"event", "data" ({} when QEMU sent none),
  // "timestamp": {"seconds", "microseconds"}}. At most 4096 are kept (oldest dropped, warned).
  std::deque<nlohmann::json> take_events() override;
  // False after a libvirt failure that means the domain or connection is gone, after a
  // malformed reply, or once libvirt reports the connection dead.
  bool connected() const override;
  std::string describe() const override;  // "libvirt domain NAME (URI)"
  uint64_t generation() const override { return generation_; }

  struct EventQueue;  // shared with the event loop thread

 private:
  nlohmann::json run(const std::string& cmd, const nlohmann::json& args, const int* fd);
  _virConnect* conn_ = nullptr;
  _virDomain* dom_ = nullptr;
  std::string name_;
  std::string uri_;
  int callback_id_ = -1;
  bool broken_ = false;
  std::shared_ptr<EventQueue> events_;
  std::string uuid_;
  uint64_t generation_ = 0;
  // libvirtd went away (restart, upgrade) while QEMU runs on: reopen the connection and the
  // domain (by UUID) and register for events again, for up to kReconnectWindow; true when the
  // domain is back. The idle hook keeps running meanwhile.
  bool reconnect();
  void register_events();
  static constexpr std::chrono::seconds kReconnectWindow{60};
};

}  // namespace ftvm::vmm
