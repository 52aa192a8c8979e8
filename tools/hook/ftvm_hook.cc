// ftvm-hook: the libvirt QEMU hook (installed as /etc/libvirt/hooks/qemu.d/ftvm).
//
// libvirt runs it as `ftvm DOMAIN PHASE SUBPHASE EXTRA` with the domain XML on stdin, for every
// domain and every phase, synchronously and with its own locks held. So this program:
//   - never calls back into libvirt (that deadlocks libvirtd),
//   - returns within milliseconds (one non-blocking connect to ftd, at most timeout_ms waiting),
//   - never fails a domain start because ftd is down or its input is odd: it logs why and exits 0.
// The one intended refusal: phase `prepare begin` of a domain whose STATE_DIR/failed-over/UUID
// marker exists (ftd writes it when the domain failed over to the standby while this host was its
// primary; starting it here would run two copies), or whose STATE_DIR/protected/UUID marker exists
// (ftd keeps it while the domain is protected; left behind when ftd or the host died, after which
// the standby resumed the twin), or whose marker cannot be checked (lstat fails other than with
// ENOENT: fail closed). Then it prints the reason on stderr and exits 1, and libvirt refuses the
// start with that message.
//
// For a domain whose XML carries
//   <metadata><ftvm:protection xmlns:ftvm="https://ftvm.dev/xmlns/protection/1"
//                              peer="HOST[:PORT]" transport="auto|tcp|rdma" epoch-ms="25"
//                              failover="auto"/></metadata>
// it sends ftd one JSON line on its control socket and logs ftd's one-line answer:
//   started, reconnect: {"cmd":"hook","phase":P,"domain":NAME,"uuid":UUID,
//                        "protection":{"peer":..,"transport":..,"epoch_ms":N,"failover":"auto"}}
//   stopped, release:   {"cmd":"hook","phase":P,"domain":NAME,"uuid":UUID}
// ftd protects (or forgets) the domain asynchronously; the hook does not wait for that.
//
// Configuration: /etc/ftvm/hook.conf (env FTVM_HOOK_CONF overrides the path; libvirt clears the
// environment, so that is for tests), `key=value` lines, `#` comments:
//   control=/run/ftvm/ftd.sock  state_dir=/var/lib/ftvm  log=/var/log/ftvm-hook.log
//   timeout_ms=300  debug=0
// A missing file means the defaults; bad lines are logged and ignored. `log=-` logs to stderr.
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <cerrno>
#include <charconv>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include <fmt/format.h>
#include <libxml/parser.h>
#include <libxml/tree.h>
#include <libxml/xmlerror.h>
#include <nlohmann/json.hpp>

#include "common/fd.h"

namespace {

constexpr const char* kNamespace = "https://ftvm.dev/xmlns/protection/1";
constexpr const char* kDefaultConf = "/etc/ftvm/hook.conf";
constexpr size_t kMaxXml = 32u << 20;         // a domain XML is a few KiB; refuse absurd input
constexpr int kStdinTimeoutMs = 5000;         // libvirt writes the XML at once; never hang libvirtd
constexpr size_t kMaxReply = 64u << 10;

using Clock = std::chrono::steady_clock;

// ---------------------------------------------------------------------------------------------
// Configuration

struct Config {
  std::string control = "/run/ftvm/ftd.sock";
  std::string state_dir = "/var/lib/ftvm";
  std::string log = "/var/log/ftvm-hook.log";
  int timeout_ms = 300;
  bool debug = false;
};

std::string_view trim(std::string_view s) {
  const char* ws = " \t\r\n";
  size_t b = s.find_first_not_of(ws);
  if (b == std::string_view::npos) return {};
  size_t e = s.find_last_not_of(ws);
  return s.substr(b, e - b + 1);
}

template <typename T>
std::optional<T> parse_int(std::string_view s) {
  T v{};
  auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  if (ec != std::errc() || p != s.data() + s.size() || s.empty()) return std::nullopt;
  return v;
}

// Printable rendering of untrusted text for one log line (no newlines or control characters).
std::string clean(std::string_view s, size_t max = 512) {
  std::string out;
  for (char c : s) {
    if (out.size() >= max) {
      out += "...";
      break;
    }
    auto u = static_cast<unsigned char>(c);
    if (u < 0x20 || u == 0x7f)
      out += fmt::format("\\x{:02x}", u);
    else
      out += c;
  }
  return out;
}

// Reads the configuration; problems go to `warnings` (logged once the log file is known).
Config read_config(const std::string& path, std::vector<std::string>& warnings) {
  Config cfg;
  FILE* f = std::fopen(path.c_str(), "re");
  if (!f) {
    if (errno != ENOENT)
      warnings.push_back(fmt::format("cannot read configuration {} ({}); using defaults", path, std::strerror(errno)));
    return cfg;
  }
  char* line = nullptr;
  size_t cap = 0;
  ssize_t n;
  int lineno = 0;
  while ((n = ::getline(&line, &cap, f)) >= 0) {
    ++lineno;
    std::string_view l = trim(std::string_view(line, static_cast<size_t>(n)));
    if (l.empty() || l.front() == '#') continue;
    size_t eq = l.find('=');
    if (eq == std::string_view::npos) {
      warnings.push_back(fmt::format("{}:{}: expected key=value, got '{}'; line ignored", path, lineno, clean(l)));
      continue;
    }
    std::string_view key = trim(l.substr(0, eq)), val = trim(l.substr(eq + 1));
    if (val.size() >= 2 && val.front() == '"' && val.back() == '"') val = val.substr(1, val.size() - 2);
    auto bad = [&](std::string_view why) {
      warnings.push_back(fmt::format("{}:{}: {} '{}' {}; line ignored", path, lineno, key, clean(val), why));
    };
    if (key == "control") {
      if (val.empty() || val.size() >= sizeof(sockaddr_un{}.sun_path))
        bad(fmt::format("must be a socket path of 1..{} bytes", sizeof(sockaddr_un{}.sun_path) - 1));
      else
        cfg.control = val;
    } else if (key == "state_dir") {
      if (val.empty())
        bad("must not be empty");
      else
        cfg.state_dir = val;
    } else if (key == "log") {
      if (val.empty())
        bad("must be a file path or '-' for stderr");
      else
        cfg.log = val;
    } else if (key == "timeout_ms") {
      auto v = parse_int<int>(val);
      if (!v || *v < 1 || *v > 10000)
        bad("must be an integer in 1..10000");
      else
        cfg.timeout_ms = *v;
    } else if (key == "debug") {
      if (val == "1" || val == "true" || val == "yes")
        cfg.debug = true;
      else if (val == "0" || val == "false" || val == "no")
        cfg.debug = false;
      else
        bad("must be 0 or 1");
    } else {
      warnings.push_back(fmt::format("{}:{}: unknown key '{}' (known: control, state_dir, log, timeout_ms, debug); "
                                     "line ignored",
                                     path, lineno, clean(key)));
    }
  }
  std::free(line);
  std::fclose(f);
  return cfg;
}

// ---------------------------------------------------------------------------------------------
// Logging: one line per decision, appended with a single write() so concurrent hooks (libvirt
// runs one per domain operation) do not interleave.

class Logger {
 public:
  void open(const Config& cfg) {
    debug_ = cfg.debug;
    if (cfg.log == "-") return;
    fd_.reset(::open(cfg.log.c_str(), O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC | O_NOCTTY, 0640));
    if (!fd_)
      emit(fmt::format("cannot open log file {} ({}); logging to stderr", cfg.log, std::strerror(errno)));
  }
  void set_context(std::string domain, std::string phase) {
    domain_ = clean(domain, 200);
    phase_ = clean(phase, 64);
  }
  void info(const std::string& msg) { emit(msg); }
  void debug(const std::string& msg) {
    if (debug_) emit("debug: " + msg);
  }
  bool debug_enabled() const { return debug_; }

 private:
  void emit(const std::string& msg) {
    timespec ts{};
    ::clock_gettime(CLOCK_REALTIME, &ts);
    tm t{};
    ::localtime_r(&ts.tv_sec, &t);
    char date[32], zone[8];
    std::strftime(date, sizeof date, "%Y-%m-%dT%H:%M:%S", &t);
    std::strftime(zone, sizeof zone, "%z", &t);
    std::string line = fmt::format("{}.{:03d}{} ftvm-hook[{}] {} {}: {}\n", date, ts.tv_nsec / 1000000, zone,
                                   ::getpid(), domain_.empty() ? "-" : domain_, phase_.empty() ? "-" : phase_,
                                   msg);
    int fd = fd_ ? fd_.get() : STDERR_FILENO;
    ssize_t r = ::write(fd, line.data(), line.size());
    if (r < 0 && fd != STDERR_FILENO) (void)!::write(STDERR_FILENO, line.data(), line.size());
  }

  ftvm::UniqueFd fd_;
  std::string domain_, phase_;
  bool debug_ = false;
};

Logger g_log;

// ---------------------------------------------------------------------------------------------
// stdin

// Reads the domain XML from stdin, bounded in size and time. Returns nullopt (with `why`) when it
// cannot.
std::optional<std::string> read_stdin(std::string& why) {
  std::string buf;
  if (::isatty(STDIN_FILENO) == 1) return buf;  // run by hand without input: treat as empty
  auto deadline = Clock::now() + std::chrono::milliseconds(kStdinTimeoutMs);
  char tmp[65536];
  for (;;) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
    if (left <= 0) {
      why = fmt::format("stdin still open after {} ms ({} bytes read)", kStdinTimeoutMs, buf.size());
      return std::nullopt;
    }
    pollfd p{STDIN_FILENO, POLLIN, 0};
    int r = ::poll(&p, 1, static_cast<int>(left));
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) {
      why = fmt::format("poll stdin: {}", std::strerror(errno));
      return std::nullopt;
    }
    if (r == 0) continue;
    if (p.revents & POLLNVAL) return buf;  // no stdin at all
    ssize_t n = ::read(STDIN_FILENO, tmp, sizeof tmp);
    if (n < 0 && (errno == EINTR || errno == EAGAIN)) continue;
    if (n < 0) {
      if (errno == EBADF) return buf;
      why = fmt::format("read stdin: {}", std::strerror(errno));
      return std::nullopt;
    }
    if (n == 0) return buf;
    buf.append(tmp, static_cast<size_t>(n));
    if (buf.size() > kMaxXml) {
      why = fmt::format("domain XML larger than {} MiB", kMaxXml >> 20);
      return std::nullopt;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Domain XML

struct Protection {
  std::string peer;
  std::string transport = "auto";
  int epoch_ms = 25;
  std::string failover = "auto";
  std::string arbiter;  // "" = the host's
  std::string peer_alt;  // the standby's second address; "" = none
};

struct DomainInfo {
  std::string name, uuid;
  bool has_element = false;
  std::optional<Protection> protection;  // set when the element is present and valid
  std::string invalid;                   // why the element is invalid
};

struct XmlDoc {
  xmlDocPtr doc = nullptr;
  XmlDoc() = default;
  XmlDoc(const XmlDoc&) = delete;
  XmlDoc& operator=(const XmlDoc&) = delete;
  ~XmlDoc() {
    if (doc) xmlFreeDoc(doc);
  }
};

std::string node_text(xmlNodePtr n) {
  xmlChar* c = xmlNodeGetContent(n);
  if (!c) return {};
  std::string s(trim(reinterpret_cast<const char*>(c)));
  xmlFree(c);
  return s;
}

std::optional<std::string> attr(xmlNodePtr n, const char* name) {
  xmlChar* c = xmlGetNoNsProp(n, reinterpret_cast<const xmlChar*>(name));
  if (!c) return std::nullopt;
  std::string s(reinterpret_cast<const char*>(c));
  xmlFree(c);
  return s;
}

bool is_elem(xmlNodePtr n, const char* name) {
  return n->type == XML_ELEMENT_NODE && xmlStrcmp(n->name, reinterpret_cast<const xmlChar*>(name)) == 0;
}

// Parses the domain XML. Returns nullopt with `why` when it is not a well-formed <domain>.
std::optional<DomainInfo> parse_domain(const std::string& xml, std::string& why) {
  if (trim(xml).empty()) {
    why = "empty domain XML on stdin";
    return std::nullopt;
  }
  if (xml.size() > static_cast<size_t>(INT32_MAX)) {
    why = "domain XML too large";
    return std::nullopt;
  }
  xmlResetLastError();
  XmlDoc d;
  // No network, no entity substitution, no DTD loading: the input is data, not instructions.
  d.doc = xmlReadMemory(xml.data(), static_cast<int>(xml.size()), "domain.xml", nullptr,
                        XML_PARSE_NONET | XML_PARSE_NOERROR | XML_PARSE_NOWARNING | XML_PARSE_NOCDATA);
  if (!d.doc) {
    xmlErrorPtr e = xmlGetLastError();
    std::string msg = e && e->message ? std::string(trim(e->message)) : "unknown error";
    why = fmt::format("malformed domain XML on stdin (libxml2: {}{})", clean(msg, 300),
                      e && e->line > 0 ? fmt::format(" at line {}", e->line) : "");
    return std::nullopt;
  }
  xmlNodePtr root = xmlDocGetRootElement(d.doc);
  if (!root || !is_elem(root, "domain") || root->ns != nullptr) {
    why = fmt::format("domain XML on stdin has root element <{}>, not <domain>",
                      root ? clean(reinterpret_cast<const char*>(root->name), 64) : "");
    return std::nullopt;
  }
  DomainInfo info;
  for (xmlNodePtr c = root->children; c; c = c->next) {
    if (c->ns) continue;
    if (is_elem(c, "name") && info.name.empty()) info.name = node_text(c);
    else if (is_elem(c, "uuid") && info.uuid.empty()) info.uuid = node_text(c);
    else if (is_elem(c, "metadata") && !info.has_element) {
      for (xmlNodePtr m = c->children; m; m = m->next) {
        if (!is_elem(m, "protection") || !m->ns || !m->ns->href ||
            xmlStrcmp(m->ns->href, reinterpret_cast<const xmlChar*>(kNamespace)) != 0)
          continue;
        info.has_element = true;
        Protection p;
        std::vector<std::string> problems;
        auto peer = attr(m, "peer");
        if (!peer || trim(*peer).empty())
          problems.push_back("attribute peer (HOST[:PORT] of the standby's ftd) is missing or empty");
        else
          p.peer = std::string(trim(*peer));
        if (auto t = attr(m, "transport")) {
          std::string v(trim(*t));
          if (v != "auto" && v != "tcp" && v != "rdma")
            problems.push_back(fmt::format("transport='{}' is not auto, tcp or rdma", clean(*t, 64)));
          else
            p.transport = v;
        }
        if (auto e = attr(m, "epoch-ms")) {
          auto v = parse_int<int>(trim(*e));
          if (!v || *v < 1 || *v > 10000)
            problems.push_back(fmt::format("epoch-ms='{}' is not an integer in 1..10000", clean(*e, 64)));
          else
            p.epoch_ms = *v;
        }
        if (auto f = attr(m, "failover")) {
          std::string v(trim(*f));
          if (v != "auto")
            problems.push_back(fmt::format("failover='{}' is not 'auto' (the only policy)", clean(*f, 64)));
        }
        if (auto a = attr(m, "arbiter")) {
          std::string v(trim(*a));
          if (v.size() > 32 || !std::all_of(v.begin(), v.end(), [](char c) { return (c >= 'a' && c <= 'z') || c == '-'; }))
            problems.push_back(fmt::format("arbiter='{}' is not an arbiter kind", clean(*a, 64)));
          else
            p.arbiter = v;
        }
        if (auto a = attr(m, "peer-alt")) {
          std::string v(trim(*a));
          if (v.size() > 255 || !std::all_of(v.begin(), v.end(), [](char c) {
                return std::isalnum(static_cast<unsigned char>(c)) || c == '.' || c == ':' || c == '-' || c == '[' ||
                       c == ']' || c == '_';
              }))
            problems.push_back(fmt::format("peer-alt='{}' is not HOST[:PORT]", clean(*a, 64)));
          else
            p.peer_alt = v;
        }
        if (problems.empty()) {
          info.protection = p;
        } else {
          for (size_t i = 0; i < problems.size(); ++i) info.invalid += (i ? "; " : "") + problems[i];
        }
        break;  // the first element counts
      }
    }
  }
  return info;
}

// A libvirt UUID in canonical form (libvirt always writes it so), lower-cased. nullopt when the
// text is anything else: it becomes a file name, so nothing else is accepted.
std::optional<std::string> canonical_uuid(std::string_view u) {
  if (u.size() != 36) return std::nullopt;
  std::string out;
  for (size_t i = 0; i < u.size(); ++i) {
    char c = u[i];
    if (i == 8 || i == 13 || i == 18 || i == 23) {
      if (c != '-') return std::nullopt;
      out += c;
    } else if ((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f')) {
      out += c;
    } else if (c >= 'A' && c <= 'F') {
      out += static_cast<char>(c - 'A' + 'a');
    } else {
      return std::nullopt;
    }
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Talking to ftd: non-blocking connect, send one line, wait for one line, all within timeout_ms.

struct CallResult {
  bool sent = false;      // the request reached ftd's socket
  std::string reply;      // ftd's answer (without the newline) when it answered
  std::string error;      // why not, when it did not
};

CallResult call_ftd(const Config& cfg, const std::string& line) {
  CallResult res;
  auto deadline = Clock::now() + std::chrono::milliseconds(cfg.timeout_ms);
  auto left_ms = [&] {
    return static_cast<int>(std::max<long long>(
        0, std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count()));
  };
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (cfg.control.size() >= sizeof addr.sun_path) {
    res.error = fmt::format("control socket path {} is too long", cfg.control);
    return res;
  }
  std::memcpy(addr.sun_path, cfg.control.c_str(), cfg.control.size() + 1);
  ftvm::UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
  if (!fd) {
    res.error = fmt::format("socket: {}", std::strerror(errno));
    return res;
  }
  for (;;) {
    if (::connect(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0) break;
    int e = errno;
    if (e == EINTR) continue;
    if (e == EAGAIN) {  // unix socket backlog full: ftd busy; retry until the deadline
      if (left_ms() <= 0) {
        res.error = fmt::format("ftd at {} is not accepting connections (backlog full for {} ms)", cfg.control,
                                cfg.timeout_ms);
        return res;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
      continue;
    }
    if (e == EINPROGRESS) {
      pollfd p{fd.get(), POLLOUT, 0};
      int r;
      while ((r = ::poll(&p, 1, left_ms())) < 0 && errno == EINTR) {
      }
      if (r <= 0) {
        res.error = fmt::format("connect to ftd at {} timed out after {} ms", cfg.control, cfg.timeout_ms);
        return res;
      }
      int soerr = 0;
      socklen_t len = sizeof soerr;
      if (::getsockopt(fd.get(), SOL_SOCKET, SO_ERROR, &soerr, &len) != 0) soerr = errno;
      if (soerr == 0) break;
      e = soerr;
    }
    res.error = fmt::format("connect: {}", std::strerror(e));
    return res;
  }

  size_t off = 0;
  while (off < line.size()) {
    ssize_t n = ::send(fd.get(), line.data() + off, line.size() - off, MSG_NOSIGNAL);
    if (n > 0) {
      off += static_cast<size_t>(n);
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && errno == EAGAIN) {
      pollfd p{fd.get(), POLLOUT, 0};
      int r = ::poll(&p, 1, left_ms());
      if (r < 0 && errno == EINTR) continue;
      if (r <= 0) {
        res.error = fmt::format("ftd at {} did not take the request within {} ms", cfg.control, cfg.timeout_ms);
        return res;
      }
      continue;
    }
    res.error = fmt::format("send to ftd at {}: {}", cfg.control, n < 0 ? std::strerror(errno) : "connection closed");
    return res;
  }
  res.sent = true;

  std::string buf;
  char tmp[4096];
  while (buf.find('\n') == std::string::npos) {
    int left = left_ms();
    if (left <= 0) {
      res.error = fmt::format("ftd at {} did not answer within {} ms", cfg.control, cfg.timeout_ms);
      return res;
    }
    pollfd p{fd.get(), POLLIN, 0};
    int r = ::poll(&p, 1, left);
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) {
      res.error = fmt::format("poll: {}", std::strerror(errno));
      return res;
    }
    if (r == 0) continue;
    ssize_t n = ::recv(fd.get(), tmp, sizeof tmp, 0);
    if (n < 0 && (errno == EINTR || errno == EAGAIN)) continue;
    if (n <= 0) {
      res.error = fmt::format("ftd at {} closed the connection without an answer{}", cfg.control,
                              n < 0 ? fmt::format(" ({})", std::strerror(errno)) : "");
      return res;
    }
    buf.append(tmp, static_cast<size_t>(n));
    if (buf.size() > kMaxReply) {
      res.error = fmt::format("ftd at {} sent an oversized answer", cfg.control);
      return res;
    }
  }
  res.reply = buf.substr(0, buf.find('\n'));
  return res;
}

void notify_ftd(const Config& cfg, const std::string& phase, const nlohmann::ordered_json& req) {
  std::string line = req.dump(-1, ' ', false, nlohmann::ordered_json::error_handler_t::replace) + "\n";
  g_log.debug("sending ftd: " + clean(line.substr(0, line.size() - 1), 2000));
  auto t0 = Clock::now();
  CallResult r = call_ftd(cfg, line);
  double ms = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
  bool starting = phase == "started" || phase == "reconnect";
  if (!r.sent) {
    g_log.info(fmt::format("ftd not reachable at {} ({}); {}", cfg.control, r.error,
                           starting ? "domain runs unprotected; ftd protects it when it starts"
                                    : "nothing to tell (a running ftd also sees the guest's QEMU exit by itself)"));
    return;
  }
  if (r.reply.empty() && !r.error.empty()) {
    g_log.info(fmt::format("sent {} to ftd; {}; ftd acts on the request asynchronously if it got it", phase,
                           r.error));
    return;
  }
  auto j = nlohmann::json::parse(r.reply, nullptr, false);
  if (j.is_discarded() || !j.is_object()) {
    g_log.info(fmt::format("sent {} to ftd; it answered with malformed JSON: {}", phase, clean(r.reply, 500)));
    return;
  }
  bool ok = j.contains("ok") && j["ok"].is_boolean() && j["ok"].get<bool>();
  std::string detail;
  if (j.contains("error") && j["error"].is_string()) detail = j["error"].get<std::string>();
  else if (j.contains("message") && j["message"].is_string()) detail = j["message"].get<std::string>();
  if (ok)
    g_log.info(fmt::format("sent {} to ftd ({:.1f} ms); ftd accepted{}{}", phase, ms, detail.empty() ? "" : ": ",
                           clean(detail, 500)));
  else
    g_log.info(fmt::format("sent {} to ftd ({:.1f} ms); ftd refused{}: {} (reply {})", phase, ms,
                           j.contains("code") && j["code"].is_string()
                               ? fmt::format(" ({})", clean(j["code"].get<std::string>(), 64))
                               : "",
                           clean(detail.empty() ? "no reason given" : detail, 500), clean(r.reply, 500)));
}

// ---------------------------------------------------------------------------------------------

bool known_phase(std::string_view p) {
  for (const char* k : {"prepare", "start", "started", "stopped", "release", "migrate", "restore", "reconnect",
                        "attach"})
    if (p == k) return true;
  return false;
}

int run(int argc, char** argv) {
  std::vector<std::string> warnings;
  const char* conf_env = std::getenv("FTVM_HOOK_CONF");
  Config cfg = read_config(conf_env && *conf_env ? conf_env : kDefaultConf, warnings);
  g_log.open(cfg);
  std::string argv_domain = argc > 1 ? argv[1] : "";
  std::string phase = argc > 2 ? argv[2] : "";
  std::string subphase = argc > 3 ? argv[3] : "";
  g_log.set_context(argv_domain, phase);
  for (const auto& w : warnings) g_log.info(w);

  if (argc < 3) {
    g_log.info(fmt::format("called with {} argument(s), expected DOMAIN PHASE SUBPHASE EXTRA; ignored", argc - 1));
    return 0;
  }

  const bool notify_full = phase == "started" || phase == "reconnect";
  const bool notify_short = phase == "stopped" || phase == "release";
  const bool check_marker = phase == "prepare" && subphase == "begin";
  if (!notify_full && !notify_short && !check_marker) {
    // libvirt does not need us to read stdin (it ignores EPIPE when a hook exits early).
    if (known_phase(phase))
      g_log.debug(fmt::format("phase {} {}: nothing to do", phase, clean(subphase, 64)));
    else
      g_log.info(fmt::format("unknown phase '{}' (sub-phase '{}'); ignored", clean(phase, 64), clean(subphase, 64)));
    return 0;
  }

  std::string why;
  auto xml = read_stdin(why);
  if (!xml) {
    g_log.info(fmt::format("cannot read the domain XML ({}); ignored", why));
    return 0;
  }
  auto dom = parse_domain(*xml, why);
  if (!dom) {
    g_log.info(why + "; ignored");
    return 0;
  }
  std::string name = dom->name.empty() ? argv_domain : dom->name;
  if (!dom->name.empty() && dom->name != argv_domain)
    g_log.debug(fmt::format("domain XML names '{}' while argv names '{}'; using the XML's", clean(dom->name),
                            clean(argv_domain)));
  g_log.set_context(name, phase);

  if (check_marker) {
    // Checked for every domain, carrying the element or not: the marker is about this UUID having
    // failed over, and removing the element afterwards must not let a second copy start.
    auto uuid = canonical_uuid(dom->uuid);
    if (!uuid) {
      if (dom->has_element)
        g_log.info(fmt::format("domain XML has no usable <uuid> ('{}'); failed-over marker not checked",
                               clean(dom->uuid, 64)));
      return 0;
    }
    // failed-over/UUID: ftd saw the twin take over. protected/UUID: the domain was protected
    // (a committed checkpoint on the standby) when it stopped without ftd ending protection —
    // ftd or the whole host died, and the standby has most likely resumed the twin.
    const struct {
      const char* dir;
      const char* why;
    } markers[] = {
        {"failed-over", "it failed over to its standby while this host was its primary"},
        {"protected", "it was protected when it stopped and ftd did not end that protection (ftd or this host "
                      "died), so the standby has most likely resumed its twin"},
    };
    for (const auto& m : markers) {
      std::string marker = cfg.state_dir + "/" + m.dir + "/" + *uuid;
      struct stat st{};
      int stat_rc = ::lstat(marker.c_str(), &st);  // any entry counts, even a dangling link
      int stat_errno = errno;
      if (stat_rc == 0) {
        std::string reason = fmt::format(
            "ftvm: refusing to start domain '{}': {} (marker {}), so a copy may already run there and starting it "
            "here would run two copies. Check the standby, then clear the marker with `ftctl release {}` (or delete "
            "{}) and start the domain again.",
            clean(name), m.why, marker, clean(name), marker);
        std::fprintf(stderr, "%s\n", reason.c_str());
        g_log.info(fmt::format("start refused (exit 1): marker {} exists; clear it with `ftctl release {}` "
                               "after checking the standby, or delete the file",
                               marker, clean(name)));
        return 1;
      }
      if (stat_errno != ENOENT) {
        // Fail closed: a marker that cannot be checked may exist, and a wrong "allowed" runs
        // two copies of the VM, while a wrong refusal only delays a start until it is fixed.
        std::string reason = fmt::format(
            "ftvm: refusing to start domain '{}': cannot check the failover marker {} ({}), so it cannot be ruled "
            "out that a copy already runs on the standby. Fix the state directory {} (ftd's --state-dir, hook.conf "
            "state_dir=) so that the hook can read it, then start the domain again.",
            clean(name), marker, std::strerror(stat_errno), cfg.state_dir);
        std::fprintf(stderr, "%s\n", reason.c_str());
        g_log.info(fmt::format("start refused (exit 1): cannot check marker {} ({})", marker,
                               std::strerror(stat_errno)));
        return 1;
      }
      if (dom->has_element)
        g_log.debug(fmt::format("no marker {}; start allowed", marker));
    }
    return 0;
  }

  if (!dom->has_element) {
    g_log.debug("no ftvm protection element in the domain metadata; nothing to do");
    return 0;
  }
  if (dom->uuid.empty()) {
    g_log.info("domain XML carries the protection element but no <uuid>; ignored");
    return 0;
  }

  nlohmann::ordered_json req;
  req["cmd"] = "hook";
  req["phase"] = phase;
  req["domain"] = name;
  req["uuid"] = dom->uuid;
  if (notify_full) {
    if (!dom->protection) {
      g_log.info(fmt::format("invalid ftvm protection element ({}); domain runs unprotected; fix the metadata "
                             "(virsh metadata / ftctl enable) and restart the domain",
                             dom->invalid));
      return 0;
    }
    const Protection& p = *dom->protection;
    req["protection"] = {{"peer", p.peer}, {"transport", p.transport}, {"epoch_ms", p.epoch_ms},
                         {"failover", p.failover}};
    if (!p.arbiter.empty()) req["protection"]["arbiter"] = p.arbiter;  // the VM's own arbiter choice
    if (!p.peer_alt.empty()) req["protection"]["peer_alt"] = p.peer_alt;
  }
  notify_ftd(cfg, phase, req);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  ::signal(SIGPIPE, SIG_IGN);
  try {
    int rc = run(argc, argv);
    xmlCleanupParser();
    return rc;
  } catch (const std::exception& e) {
    try {
      g_log.info(fmt::format("internal error ({}); ignored", e.what()));
    } catch (...) {
    }
  } catch (...) {
    try {
      g_log.info("internal error (unknown exception); ignored");
    } catch (...) {
    }
  }
  return 0;
}
