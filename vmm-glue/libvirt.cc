#include "vmm-glue/libvirt.h"

#include <sys/stat.h>

#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <fstream>
#include <future>
#include <mutex>
#include <iterator>
#include <thread>

#include <fmt/format.h>
#include <libvirt/libvirt-qemu.h>
#include <libvirt/libvirt.h>
#include <libvirt/virterror.h>

#include "common/log.h"
#include "vmm-glue/libvirt_xml.h"

namespace ftvm::vmm {

namespace {

constexpr size_t kMaxEvents = 4096;

std::string last_message() {
  const char* m = virGetLastErrorMessage();
  return m ? m : "unknown libvirt error";
}
int last_code() {
  virErrorPtr e = virGetLastError();
  return e ? e->code : VIR_ERR_OK;
}

void ignore_error(void*, virErrorPtr) {}

// libvirt's default event loop on a detached thread, registered once, before any connection.
void init_libvirt() {
  static std::once_flag once;
  std::call_once(once, [] {
    if (virInitialize() < 0)
      fail("libvirt: initialisation failed: {} (check the libvirt installation)", last_message());
    virSetErrorFunc(nullptr, ignore_error);  // errors travel as exceptions, not stderr lines
    if (virEventRegisterDefaultImpl() < 0)
      fail("libvirt: cannot register the default event loop: {}", last_message());
    std::thread([] {
      for (;;) {
        if (virEventRunDefaultImpl() < 0) {
          log::warn("libvirt", "event loop iteration failed: {}", last_message());
          std::this_thread::sleep_for(std::chrono::milliseconds(100));
        }
      }
    }).detach();
  });
}

std::string excerpt(const std::string& s) {
  return s.size() <= 200 ? s : s.substr(0, 200) + "...";
}

const char* state_name(int st) {
  switch (st) {
    case VIR_DOMAIN_NOSTATE: return "nostate";
    case VIR_DOMAIN_RUNNING: return "running";
    case VIR_DOMAIN_BLOCKED: return "blocked";
    case VIR_DOMAIN_PAUSED: return "paused";
    case VIR_DOMAIN_SHUTDOWN: return "shutdown";
    case VIR_DOMAIN_SHUTOFF: return "shutoff";
    case VIR_DOMAIN_CRASHED: return "crashed";
    case VIR_DOMAIN_PMSUSPENDED: return "pmsuspended";
    default: return "unknown";
  }
}

std::string reason_name(int st, int r) {
  static const char* running[] = {"unknown",   "booted",   "migrated",         "restored",
                                  "from snapshot", "unpaused", "migration canceled",
                                  "save canceled", "wakeup", "crashed", "postcopy",
                                  "postcopy failed"};
  static const char* paused[] = {"unknown",  "user",          "migration",   "save",
                                 "dump",     "ioerror",       "watchdog",    "from snapshot",
                                 "shutting down", "snapshot", "crashed",     "starting up",
                                 "postcopy", "postcopy failed"};
  static const char* shutoff[] = {"unknown", "shutdown", "destroyed",     "crashed", "migrated",
                                  "saved",   "failed",   "from snapshot", "daemon"};
  static const char* shutdown[] = {"unknown", "user"};
  static const char* crashed[] = {"unknown", "panicked"};
  auto pick = [&](const char* const* names, size_t n) -> std::string {
    if (r >= 0 && static_cast<size_t>(r) < n) return names[r];
    return fmt::format("reason {}", r);
  };
#define FTVM_PICK(a) pick(a, sizeof(a) / sizeof(a[0]))
  switch (st) {
    case VIR_DOMAIN_RUNNING: return FTVM_PICK(running);
    case VIR_DOMAIN_PAUSED: return FTVM_PICK(paused);
    case VIR_DOMAIN_SHUTOFF: return FTVM_PICK(shutoff);
    case VIR_DOMAIN_SHUTDOWN: return FTVM_PICK(shutdown);
    case VIR_DOMAIN_CRASHED: return FTVM_PICK(crashed);
    default: return r == 0 ? "unknown" : fmt::format("reason {}", r);
  }
#undef FTVM_PICK
}

std::string uri_hint(const std::string& uri) {
  return fmt::format("check it with `virsh -c {} list --all`", uri);
}

}  // namespace

namespace lv {

NoSuchDomain::NoSuchDomain(const std::string& name, const std::string& uri)
    : Error(fmt::format("libvirt domain '{}' not found on {} ({}; a transient domain disappears "
                        "when it stops)",
                        name, uri, uri_hint(uri))),
      name_(name) {}

// ---- Connection ---------------------------------------------------------------------------------

Connection Connection::open(const std::string& uri) {
  init_libvirt();
  virConnectPtr c = virConnectOpen(uri.empty() ? nullptr : uri.c_str());
  if (!c)
    fail("libvirt: cannot connect to {}: {} (is libvirtd running? start it with `virtlogd -d; "
         "libvirtd -d`; qemu:///system needs root or the libvirt group)",
         uri.empty() ? "the default URI" : "'" + uri + "'", last_message());
  char* u = virConnectGetURI(c);
  if (!u) {
    std::string msg = last_message();
    virConnectClose(c);
    fail("libvirt: connected to {} but cannot read its URI: {}", uri.empty() ? "the default URI" : uri,
         msg);
  }
  std::string actual = u;
  free(u);
  // Notice a dead libvirtd within ~20 s (remote driver only; local drivers say unsupported).
  if (virConnectSetKeepAlive(c, 5, 3) < 0) virResetLastError();
  return Connection(c, actual);
}

Connection::Connection(Connection&& o) noexcept : conn_(o.conn_), uri_(std::move(o.uri_)) {
  o.conn_ = nullptr;
}
Connection& Connection::operator=(Connection&& o) noexcept {
  if (this != &o) {
    if (conn_) virConnectClose(conn_);
    conn_ = o.conn_;
    uri_ = std::move(o.uri_);
    o.conn_ = nullptr;
  }
  return *this;
}
Connection::~Connection() {
  if (conn_) virConnectClose(conn_);
}

bool Connection::alive() const { return conn_ && virConnectIsAlive(conn_) == 1; }

// ---- Domain -------------------------------------------------------------------------------------

Domain Domain::lookup(Connection& conn, const std::string& name_or_uuid) {
  if (name_or_uuid.empty()) fail("libvirt: empty domain name (name the domain or its UUID)");
  virDomainPtr d = nullptr;
  if (looks_like_uuid(name_or_uuid)) {
    d = virDomainLookupByUUIDString(conn.get(), name_or_uuid.c_str());
    if (!d && last_code() != VIR_ERR_NO_DOMAIN)
      fail("libvirt: looking up domain UUID {} on {} failed: {}", name_or_uuid, conn.uri(),
           last_message());
  }
  if (!d) {
    d = virDomainLookupByName(conn.get(), name_or_uuid.c_str());
    if (!d) {
      if (last_code() == VIR_ERR_NO_DOMAIN) throw NoSuchDomain(name_or_uuid, conn.uri());
      fail("libvirt: looking up domain '{}' on {} failed: {}", name_or_uuid, conn.uri(),
           last_message());
    }
  }
  return Domain(d, conn.uri());
}

Domain::Domain(Domain&& o) noexcept : dom_(o.dom_), uri_(std::move(o.uri_)) { o.dom_ = nullptr; }
Domain& Domain::operator=(Domain&& o) noexcept {
  if (this != &o) {
    if (dom_) virDomainFree(dom_);
    dom_ = o.dom_;
    uri_ = std::move(o.uri_);
    o.dom_ = nullptr;
  }
  return *this;
}
Domain::~Domain() {
  if (dom_) virDomainFree(dom_);
}

std::string Domain::name() const {
  const char* n = virDomainGetName(dom_);
  if (!n) fail("libvirt: cannot read a domain's name on {}: {}", uri_, last_message());
  return n;
}

std::string Domain::what() const {
  const char* n = dom_ ? virDomainGetName(dom_) : nullptr;
  return fmt::format("libvirt domain {} ({})", n ? n : "?", uri_);
}

std::string Domain::uuid() const {
  char buf[VIR_UUID_STRING_BUFLEN];
  if (virDomainGetUUIDString(dom_, buf) < 0)
    fail("{}: cannot read the UUID: {}", what(), last_message());
  return buf;
}

std::string Domain::xml(bool inactive, bool secure, bool migratable) const {
  unsigned flags = (inactive ? VIR_DOMAIN_XML_INACTIVE : 0) | (secure ? VIR_DOMAIN_XML_SECURE : 0) |
                   (migratable ? VIR_DOMAIN_XML_MIGRATABLE : 0);
  char* x = virDomainGetXMLDesc(dom_, flags);
  if (!x)
    fail("{}: cannot read the {} XML: {}{}", what(), inactive ? "persistent (inactive)" : "live",
         last_message(), secure ? " (the secure XML needs a read-write connection)" : "");
  std::string s = x;
  free(x);
  return s;
}

bool Domain::active() const {
  int r = virDomainIsActive(dom_);
  if (r < 0) fail("{}: cannot tell whether it is running: {}", what(), last_message());
  return r == 1;
}

bool Domain::persistent() const {
  int r = virDomainIsPersistent(dom_);
  if (r < 0) fail("{}: cannot tell whether it is persistent: {}", what(), last_message());
  return r == 1;
}

DomainState Domain::state() const {
  int st = 0, reason = 0;
  if (virDomainGetState(dom_, &st, &reason, 0) < 0)
    fail("{}: cannot read its state: {}", what(), last_message());
  return DomainState{state_name(st), reason_name(st, reason)};
}

int Domain::qemu_pid() const {
  // "qemu:///system", "qemu+unix:///session", "qemu+ssh://host/system?...".
  size_t sep = uri_.find("://");
  std::string scheme = sep == std::string::npos ? "" : uri_.substr(0, sep);
  if (scheme != "qemu" && scheme.rfind("qemu+", 0) != 0)
    fail("{}: not a QEMU connection, so there is no QEMU process (connect to qemu:///system or "
         "qemu:///session)",
         what());
  std::string rest = uri_.substr(sep + 3);
  size_t slash = rest.find('/');
  std::string host = rest.substr(0, slash);
  std::string path = slash == std::string::npos ? "" : rest.substr(slash);
  path = path.substr(0, path.find('?'));
  if (!host.empty())
    fail("{}: the QEMU process runs on {}, not here (run ftd on that host with qemu:///system)",
         what(), host);
  std::string file;
  if (path == "/system") {
    file = "/run/libvirt/qemu/" + name() + ".pid";
  } else if (path == "/session") {
    const char* xdg = std::getenv("XDG_RUNTIME_DIR");
    const char* home = std::getenv("HOME");
    if (xdg && *xdg)
      file = std::string(xdg) + "/libvirt/qemu/run/" + name() + ".pid";
    else if (home && *home)
      file = std::string(home) + "/.cache/libvirt/qemu/run/" + name() + ".pid";
    else
      fail("{}: neither XDG_RUNTIME_DIR nor HOME is set, cannot find the session's run directory",
           what());
  } else {
    fail("{}: unknown QEMU driver path '{}' (expected /system or /session)", what(), path);
  }
  if (!active())
    fail("{}: the domain is not running (state {}), so it has no QEMU process; start it first",
         what(), state().str());
  std::ifstream in(file);
  if (!in) {
    int err = errno;
    throw SysError(err, fmt::format("{}: reading QEMU's pid file {}", what(), file),
                   err == EACCES ? "run ftd as root"
                                 : "is this host's libvirtd running the domain?");
  }
  std::string content((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  while (!content.empty() && (content.back() == '\n' || content.back() == ' '))
    content.pop_back();
  if (content.empty() || content.size() > 9 ||
      content.find_first_not_of("0123456789") != std::string::npos || std::stol(content) <= 0)
    fail("{}: QEMU's pid file {} holds '{}', not a process id", what(), file, excerpt(content));
  int pid = static_cast<int>(std::stol(content));
  struct stat stt {};
  if (::stat(fmt::format("/proc/{}", pid).c_str(), &stt) < 0)
    fail("{}: QEMU's pid file {} names process {}, which does not exist (stale pid file: is the "
         "domain running on this host?)",
         what(), file, pid);
  return pid;
}

std::optional<std::string> Domain::metadata(const std::string& ns_uri, bool config) const {
  char* m = virDomainGetMetadata(dom_, VIR_DOMAIN_METADATA_ELEMENT, ns_uri.c_str(),
                                 config ? VIR_DOMAIN_AFFECT_CONFIG : VIR_DOMAIN_AFFECT_CURRENT);
  if (!m) {
    if (last_code() == VIR_ERR_NO_DOMAIN_METADATA) {
      virResetLastError();
      return std::nullopt;
    }
    fail("{}: cannot read the metadata in namespace {}: {}", what(), ns_uri, last_message());
  }
  std::string s = m;
  free(m);
  return s;
}

unsigned Domain::affect_flags(bool live, bool config, const char* op) const {
  unsigned f = 0;
  if (live && active()) f |= VIR_DOMAIN_AFFECT_LIVE;
  if (config) f |= VIR_DOMAIN_AFFECT_CONFIG;
  if (!f)
    fail("{}: cannot {}: the domain is not running and the persistent definition was not asked "
         "for (pass config=true)",
         what(), op);
  return f;
}

void Domain::set_metadata(const std::string& xml, const std::string& key,
                          const std::string& ns_uri, bool live, bool config) {
  unsigned f = affect_flags(live, config, "set metadata");
  if (virDomainSetMetadata(dom_, VIR_DOMAIN_METADATA_ELEMENT, xml.c_str(), key.c_str(),
                           ns_uri.c_str(), f) < 0) {
    std::string msg = last_message();
    std::string hint;
    if (msg.find("failed to create a new XML namespace") != std::string::npos)
      hint = fmt::format(" (the element must not declare xmlns:{} itself: libvirt adds it)", key);
    else if ((f & VIR_DOMAIN_AFFECT_CONFIG) && !persistent())
      hint = " (a transient domain has no persistent definition: pass config=false)";
    fail("{}: cannot set the metadata {} in namespace {}: {}{}", what(), excerpt(xml), ns_uri, msg,
         hint);
  }
}

void Domain::remove_metadata(const std::string& ns_uri, bool live, bool config) {
  unsigned f = affect_flags(live, config, "remove metadata");
  if (virDomainSetMetadata(dom_, VIR_DOMAIN_METADATA_ELEMENT, nullptr, nullptr, ns_uri.c_str(),
                           f) < 0) {
    std::string msg = last_message();
    fail("{}: cannot remove the metadata in namespace {}: {}{}", what(), ns_uri, msg,
         (f & VIR_DOMAIN_AFFECT_CONFIG) && !persistent()
             ? " (a transient domain has no persistent definition: pass config=false)"
             : "");
  }
}

void Domain::resume() {
  if (virDomainResume(dom_) < 0) fail("{}: cannot resume: {}", what(), last_message());
}

void Domain::destroy() {
  if (virDomainDestroy(dom_) < 0) fail("{}: cannot destroy (power off): {}", what(), last_message());
}

void Domain::undefine() {
  if (virDomainUndefineFlags(dom_, 0) < 0)
    fail("{}: cannot undefine: {} (with NVRAM, snapshots or a managed save image, remove them "
         "with `virsh undefine --nvram --snapshots-metadata --managed-save`)",
         what(), last_message());
}

Domain create_paused(Connection& conn, const std::string& xml) {
  virDomainPtr d = virDomainCreateXML(conn.get(), xml.c_str(), VIR_DOMAIN_START_PAUSED);
  if (!d)
    fail("libvirt ({}): cannot start a paused transient domain from the XML: {} (check the XML "
         "with `virt-xml-validate FILE domain`)",
         conn.uri(), last_message());
  return Domain(d, conn.uri());
}

Domain define(Connection& conn, const std::string& xml) {
  virDomainPtr d = virDomainDefineXML(conn.get(), xml.c_str());
  if (!d)
    fail("libvirt ({}): cannot define a domain from the XML: {} (check the XML with "
         "`virt-xml-validate FILE domain`)",
         conn.uri(), last_message());
  return Domain(d, conn.uri());
}

std::vector<std::string> list_active(Connection& conn) {
  virDomainPtr* doms = nullptr;
  int n = virConnectListAllDomains(conn.get(), &doms, VIR_CONNECT_LIST_DOMAINS_ACTIVE);
  if (n < 0) fail("libvirt ({}): cannot list the active domains: {}", conn.uri(), last_message());
  std::vector<std::string> names;
  for (int i = 0; i < n; ++i) {
    if (const char* nm = virDomainGetName(doms[i])) names.emplace_back(nm);
    virDomainFree(doms[i]);
  }
  free(doms);
  return names;
}

}  // namespace lv

// ---- QMP reply ----------------------------------------------------------------------------------

nlohmann::json parse_qmp_reply(const std::string& cmd, const std::string& reply) {
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(reply);
  } catch (const nlohmann::json::exception& e) {
    throw ProtocolError(fmt::format("QMP command '{}': malformed reply '{}' ({})", cmd,
                                    excerpt(reply), e.what()));
  }
  if (!j.is_object())
    throw ProtocolError(
        fmt::format("QMP command '{}': reply '{}' is not a JSON object", cmd, excerpt(reply)));
  if (auto r = j.find("return"); r != j.end()) return *r;
  if (auto e = j.find("error"); e != j.end()) {
    std::string cls = "GenericError", desc;
    if (e->is_object()) {
      if (auto c = e->find("class"); c != e->end() && c->is_string()) cls = c->get<std::string>();
      if (auto d = e->find("desc"); d != e->end() && d->is_string()) desc = d->get<std::string>();
      else desc = e->dump();
    } else {
      desc = e->dump();
    }
    throw QmpError(cmd, cls, desc);
  }
  throw ProtocolError(fmt::format("QMP command '{}': reply '{}' has neither \"return\" nor \"error\"",
                                  cmd, excerpt(reply)));
}

// ---- LibvirtMonitor -----------------------------------------------------------------------------

struct LibvirtMonitor::EventQueue {
  std::mutex mu;
  std::deque<nlohmann::json> q;
  std::string what;
  unsigned long long dropped = 0;
};

namespace {

void on_qemu_event(virConnectPtr, virDomainPtr, const char* event, long long seconds,
                   unsigned int micros, const char* details, void* opaque) noexcept {
  try {
    auto& queue = **static_cast<std::shared_ptr<LibvirtMonitor::EventQueue>*>(opaque);
    nlohmann::json data = nlohmann::json::object();
    if (details && *details) {
      try {
        data = nlohmann::json::parse(details);
      } catch (const nlohmann::json::exception& e) {
        log::warn("libvirt", "{}: QEMU event {} has malformed details '{}' ({}); queued without "
                  "data", queue.what, event ? event : "?", excerpt(details), e.what());
        data = nlohmann::json::object();
      }
    }
    nlohmann::json ev = {{"event", event ? event : ""},
                         {"data", std::move(data)},
                         {"timestamp", {{"seconds", seconds}, {"microseconds", micros}}}};
    std::lock_guard<std::mutex> lk(queue.mu);
    if (queue.q.size() >= kMaxEvents) {
      queue.q.pop_front();
      if (queue.dropped++ % 1000 == 0)
        log::warn("libvirt", "{}: more than {} QEMU events not taken; dropping the oldest ({} so "
                  "far)", queue.what, kMaxEvents, queue.dropped);
    }
    queue.q.push_back(std::move(ev));
  } catch (...) {
    // Never let an exception cross libvirt's C event loop.
  }
}

void free_queue(void* opaque) { delete static_cast<std::shared_ptr<LibvirtMonitor::EventQueue>*>(opaque); }

}  // namespace

LibvirtMonitor::LibvirtMonitor(lv::Connection& conn, lv::Domain& dom)
    : name_(dom.name()), uri_(conn.uri()), events_(std::make_shared<EventQueue>()) {
  if (virConnectRef(conn.get()) < 0)
    fail("{}: cannot take a reference on the connection: {}", describe(), last_message());
  conn_ = conn.get();
  if (virDomainRef(dom.get()) < 0) {
    std::string msg = last_message();
    virConnectClose(conn_);
    fail("{}: cannot take a reference on the domain: {}", describe(), msg);
  }
  dom_ = dom.get();
  uuid_ = dom.uuid();
  events_->what = describe();
  try {
    register_events();
  } catch (...) {
    virDomainFree(dom_);
    virConnectClose(conn_);
    throw;
  }
}

void LibvirtMonitor::register_events() {
  auto* holder = new std::shared_ptr<EventQueue>(events_);
  callback_id_ = virConnectDomainQemuMonitorEventRegister(conn_, dom_, nullptr, on_qemu_event,
                                                          holder, free_queue, 0);
  if (callback_id_ < 0) {
    std::string msg = last_message();
    delete holder;  // libvirt does not call free_queue when registration fails
    fail("{}: cannot register for QEMU monitor events: {} (libvirt's QEMU monitor pass-through "
         "needs the QEMU driver: qemu:///system or qemu:///session)",
         describe(), msg);
  }
}

bool LibvirtMonitor::reconnect() {
  log::warn("libvirt", "{}: the libvirt connection is gone (libvirtd restarting?); reconnecting for up to {} s",
            describe(), kReconnectWindow.count());
  const auto deadline = std::chrono::steady_clock::now() + kReconnectWindow;
  std::string last = "not tried";
  while (std::chrono::steady_clock::now() < deadline) {
    for (int i = 0; i < 10; i++) {  // ~200 ms between attempts, the idle hook running
      idle();
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    // Opening blocks while libvirtd starts up (it accepts before it answers): on a worker
    // thread, the idle hook running here.
    struct Opened {
      virConnectPtr c = nullptr;
      virDomainPtr d = nullptr;
      std::string err;
      bool not_running = false;
    };
    const std::string uri = uri_, uuid = uuid_;
    auto fut = std::async(std::launch::async, [uri, uuid] {
      Opened o;
      o.c = virConnectOpen(uri.c_str());
      if (!o.c) {
        o.err = last_message();
        virResetLastError();
        return o;
      }
      o.d = virDomainLookupByUUIDString(o.c, uuid.c_str());
      if (!o.d || virDomainIsActive(o.d) != 1) {
        o.not_running = o.d != nullptr;
        o.err = o.d ? "the domain is not running" : last_message();
        virResetLastError();
        if (o.d) virDomainFree(o.d);
        virConnectClose(o.c);
        o.c = nullptr;
        o.d = nullptr;
      }
      return o;
    });
    while (fut.wait_for(idle_period_) != std::future_status::ready) idle();
    Opened o = fut.get();
    if (!o.c) {
      last = o.err;
      if (o.not_running) break;  // QEMU is gone: nothing to reconnect to
      continue;
    }
    virConnectPtr c = o.c;
    virDomainPtr d = o.d;
    if (callback_id_ >= 0) virConnectDomainQemuMonitorEventDeregister(conn_, callback_id_);  // best effort
    callback_id_ = -1;
    virDomainFree(dom_);
    virConnectClose(conn_);
    conn_ = c;
    dom_ = d;
    try {
      register_events();
    } catch (const std::exception& e) {
      last = e.what();
      continue;
    }
    log::info("libvirt", "{}: reconnected to libvirt", describe());
    generation_++;
    return true;
  }
  log::error("libvirt", "{}: could not reconnect to libvirt: {}", describe(), last);
  return false;
}

LibvirtMonitor::LibvirtMonitor(LibvirtMonitor&& o) noexcept
    : conn_(o.conn_),
      dom_(o.dom_),
      name_(std::move(o.name_)),
      uri_(std::move(o.uri_)),
      callback_id_(o.callback_id_),
      broken_(o.broken_),
      events_(std::move(o.events_)) {
  o.conn_ = nullptr;
  o.dom_ = nullptr;
  o.callback_id_ = -1;
}

LibvirtMonitor::~LibvirtMonitor() {
  if (callback_id_ >= 0 && virConnectDomainQemuMonitorEventDeregister(conn_, callback_id_) < 0)
    log::debug("libvirt", "{}: deregistering the QEMU event callback: {}", describe(),
               last_message());
  if (dom_) virDomainFree(dom_);
  if (conn_) virConnectClose(conn_);
}

std::string LibvirtMonitor::describe() const {
  return fmt::format("libvirt domain {} ({})", name_, uri_);
}

bool LibvirtMonitor::connected() const {
  return !broken_ && conn_ && virConnectIsAlive(conn_) == 1;
}

namespace {

struct MonitorCall {
  int rc = -1;
  char* reply = nullptr;  // malloc'ed by libvirt
  std::string msg;        // libvirt's error, when rc < 0
  bool gone = false;      // the connection died, or the domain stopped or vanished
};

MonitorCall monitor_call(virConnectPtr conn, virDomainPtr dom, const std::string& line, int fd) {
  MonitorCall r;
  if (fd >= 0) {
    int fds[1] = {fd};
    r.rc = virDomainQemuMonitorCommandWithFiles(dom, line.c_str(), 1, fds, nullptr, nullptr, &r.reply, 0);
  } else {
    r.rc = virDomainQemuMonitorCommand(dom, line.c_str(), &r.reply, 0);
  }
  if (r.rc < 0 || !r.reply) {
    r.msg = r.rc < 0 ? last_message() : "no reply";
    r.gone = virConnectIsAlive(conn) != 1 || virDomainIsActive(dom) != 1;
    virResetLastError();
  }
  return r;
}

}  // namespace

nlohmann::json LibvirtMonitor::run(const std::string& cmd, const nlohmann::json& args,
                                   const int* fd) {
  if (!conn_ || !dom_) fail("{}: monitor used after being moved from", describe());
  if (broken_)
    fail("QMP command '{}' on {}: the monitor was lost earlier; open the connection and the "
         "domain again",
         cmd, describe());
  nlohmann::json req = {{"execute", cmd}};
  if (!args.is_null()) req["arguments"] = args;
  std::string line = req.dump();
  const int in_fd = fd ? *fd : -1;
  // The call blocks in libvirt (its job lock, QEMU): with an idle hook it runs on a worker
  // thread while the hook keeps running here. libvirt's error state is per thread: the call
  // and everything about its failure are taken on the thread that made it.
  auto invoke = [&] {
    virConnectPtr conn = conn_;
    virDomainPtr dom = dom_;
    auto call = [conn, dom, line, in_fd] { return monitor_call(conn, dom, line, in_fd); };
    if (!idle_) return call();
    auto fut = std::async(std::launch::async, call);
    while (fut.wait_for(idle_period_) != std::future_status::ready) idle();
    return fut.get();
  };
  MonitorCall res = invoke();
  if ((res.rc < 0 || !res.reply) && virConnectIsAlive(conn_) != 1) {
    // libvirtd went away, not (necessarily) QEMU. QMP commands ftd sends are safe to repeat
    // (stop, cont, queries, saving device state into the same file).
    free(res.reply);
    res = reconnect() ? invoke() : MonitorCall{-1, nullptr, "libvirt connection lost and not re-established", true};
  }
  char* reply = res.reply;
  if (res.rc < 0 || !reply) {
    if (res.gone) broken_ = true;
    free(reply);
    fail("QMP command '{}' on {} failed in libvirt: {} ({})", cmd, describe(), res.msg,
         res.gone ? "the domain or the libvirt connection is gone; open them again once the domain "
                    "runs"
                  : "the monitor is still usable; see libvirtd's log for details");
  }
  std::string r = reply;
  free(reply);
  try {
    return parse_qmp_reply(cmd, r);
  } catch (const ProtocolError& e) {
    broken_ = true;
    throw ProtocolError(fmt::format("{}: {}", describe(), e.what()));
  }
}

nlohmann::json LibvirtMonitor::execute(const std::string& cmd, const nlohmann::json& args) {
  return run(cmd, args, nullptr);
}

nlohmann::json LibvirtMonitor::execute_with_fd(const std::string& cmd, const nlohmann::json& args,
                                               int fd) {
  if (fd < 0) fail("QMP command '{}' on {}: invalid file descriptor {}", cmd, describe(), fd);
  return run(cmd, args, &fd);
}

std::deque<nlohmann::json> LibvirtMonitor::take_events() {
  std::deque<nlohmann::json> out;
  if (!events_) return out;
  std::lock_guard<std::mutex> lk(events_->mu);
  out.swap(events_->q);
  return out;
}

}  // namespace ftvm::vmm
