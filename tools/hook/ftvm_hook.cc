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
//                              failover="auto" [arbiter=".."] [peer-alt=".."]
//                              [reprotect="auto|manual"]/></metadata>
// (read by the one protection-element parser, vmm-glue/protection_xml.h: the same rules ftd's
// start-up scan and `ftctl enable` apply) it sends ftd one JSON line on its control socket
// (tools/control/control.h, HookRequest) and logs ftd's one-line answer:
//   started, reconnect: {"cmd":"hook","phase":P,"domain":NAME,"uuid":UUID,
//                        "protection":{"peer":..,"transport":..,"epoch_ms":N,"failover":"auto|manual"
//                                      [,"arbiter":..][,"peer_alt":..][,"reprotect":"manual"]}}
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
#include <vector>

#include <fmt/format.h>
#include <libxml/parser.h>
#include <nlohmann/json.hpp>

#include "common/fd.h"
#include "tools/control/control.h"
#include "vmm-glue/protection_xml.h"
#include "vmm-glue/xml_doc.h"

namespace {

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

using DomainInfo = ftvm::vmm::DomainDeclaration;

// Parses the domain XML (ftvm::vmm::read_domain_declaration: the one protection-element
// parser). Returns nullopt with `why` when it is not a well-formed <domain>. An invalid
// protection element is not an error here: DomainInfo::invalid says why.
std::optional<DomainInfo> parse_domain(const std::string& xml, std::string& why) {
  if (trim(xml).empty()) {
    why = "empty domain XML on stdin";
    return std::nullopt;
  }
  try {
    DomainInfo info = ftvm::vmm::read_domain_declaration(xml);
    if (!info.is_domain) {
      why = fmt::format("domain XML on stdin has root element <{}>, not <domain>", clean(info.root, 64));
      return std::nullopt;
    }
    return info;
  } catch (const ftvm::vmm::xml::MalformedXml& e) {
    why = fmt::format("malformed domain XML on stdin (libxml2: {}{})",
                      clean(e.detail().empty() ? std::string(e.what()) : e.detail(), 300),
                      e.line() > 0 ? fmt::format(" at line {}", e.line()) : "");
    return std::nullopt;
  }
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
// Talking to ftd: ftvm::control::call_line (non-blocking connect, send one line, wait for one
// line, all within timeout_ms).

void notify_ftd(const Config& cfg, const std::string& phase, const ftvm::control::HookRequest& hr) {
  std::string line = ftvm::control::frame(ftvm::control::encode_hook_request(hr));
  g_log.debug("sending ftd: " + clean(line.substr(0, line.size() - 1), 2000));
  auto t0 = Clock::now();
  ftvm::control::CallResult r = ftvm::control::call_line(cfg.control, line, cfg.timeout_ms, kMaxReply);
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

  ftvm::control::HookRequest req{phase, name, dom->uuid, std::nullopt};
  if (notify_full) {
    if (!dom->protection) {
      g_log.info(fmt::format("invalid ftvm protection element ({}); domain runs unprotected; fix the metadata "
                             "(virsh metadata / ftctl enable) and restart the domain",
                             clean(dom->invalid, 500)));
      return 0;
    }
    req.protection = dom->protection;
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
