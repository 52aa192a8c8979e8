// ftctl: command-line control of the local ftd.
//
// Exit codes (stable; for scripts and cluster resource agents; ftvm::control::Exit):
//   0 success   1 operation failed   2 usage error / bad request   3 ftd unreachable
//   4 no such VM   5 refused (VM cannot be protected, or wrong state)
//   6 not now: the arbiter cannot tell yet (`failover --force`); retry
//
// Talks to ftd through the control library (tools/control/control.h) only; it does not link
// the daemon.
#include <unistd.h>

#include <chrono>
#include <ctime>
#include <cstdlib>
#include <iostream>
#include <thread>

#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "checkpoint/digest.h"
#include "transport/auth.h"
#include "common/error.h"
#include "tools/control/control.h"
#include "vmm-glue/libvirt.h"
#include "vmm-glue/libvirt_xml.h"

namespace {

namespace control = ftvm::control;
enum Exit {
  kOk = control::kExitOk,
  kFailed = control::kExitFailed,
  kUsage = control::kExitUsage,
  kUnreachable = control::kExitUnreachable,
  kNotFound = control::kExitNotFound,
  kRefused = control::kExitRefused,
  kWait = control::kExitWait,
};

int code_for(const nlohmann::json& r) { return control::exit_code(r); }

struct Ctl {
  std::string path;
  nlohmann::json call(const nlohmann::json& req, int timeout_ms = 120000) {
    return control::call(path, req, timeout_ms);
  }
};

std::string fmt_ms(const nlohmann::json& v) { return v.is_number() ? fmt::format("{:.2f}", v.get<double>()) : "-"; }

// The VM's history (tools/ftd/history.h), oldest first: the last 10 events (all in --json).
void print_history(const nlohmann::json& v) {
  if (!v.contains("history") || !v["history"].is_array() || v["history"].empty()) return;
  const auto& h = v["history"];
  const size_t from = h.size() > 10 ? h.size() - 10 : 0;
  fmt::print("  history ({} events{}):\n", h.size(), from ? ", the last 10" : "");
  for (size_t i = from; i < h.size(); i++) {
    const auto& e = h[i];
    const auto ms = static_cast<time_t>(e.value("wall_ms", 0.0) / 1000);
    char when[32] = "?";
    struct tm tmv {};
    if (::gmtime_r(&ms, &tmv)) std::strftime(when, sizeof when, "%Y-%m-%d %H:%M:%SZ", &tmv);
    const std::string ev = e.value("event", "?");
    std::string what;
    if (ev == "protected")
      what = fmt::format("protected: {} -> {} (failover={})", e.value("primary", "?"), e.value("standby", "?"),
                         e.value("failover", "auto"));
    else if (ev == "failover")
      what = fmt::format("FAILOVER {} -> {} at epoch {}: {}", e.value("from", "?"), e.value("to", "?"),
                         e.value("epoch", 0), e.value("reason", ""));
    else if (ev == "failover-planned")
      what = fmt::format("planned failover to {} at epoch {}", e.value("to", "?"), e.value("epoch", 0));
    else if (ev == "primary-lost")
      what = fmt::format("primary lost (on {}): {}", e.value("host", "?"), e.value("reason", ""));
    else
      what = fmt::format("{} (on {})", ev, e.value("host", "?"));
    fmt::print("    {}  {}\n", when, what);
  }
}

void print_human(const nlohmann::json& vms) {
  if (vms.empty()) {
    fmt::print("no protected VMs on this host\n");
    return;
  }
  for (const auto& v : vms) {
    std::string reason = v.value("reason", "");
    fmt::print("{}  role={}  state={}{}\n", v.value("name", "?"), v.value("role", "?"), v.value("state", "?"),
               reason.empty() ? "" : "  (" + reason + ")");
    if (v.contains("pair") && v["pair"].is_object())
      fmt::print("  pair: primary {} -> standby {}  failover={}{}\n", v["pair"].value("primary", "?"),
                 v["pair"].value("standby", "?"), v.value("failover", "auto"),
                 v.contains("reprotect") ? "  reprotect=" + v.value("reprotect", "auto") : "");
    if (v.value("role", "") == "primary") {
      const auto& p = v["pause_ms"];
      const auto& l = v["link"];
      fmt::print("  epoch {} (cut {}, every {} ms)  pause last {} ms  p50 {} ms  p99 {} ms  max {} ms\n",
                 v.value("epoch", 0), v.value("epochs_cut", 0), v.value("epoch_ms", 0), fmt_ms(p["last"]),
                 fmt_ms(p["p50"]), fmt_ms(p["p99"]), fmt_ms(p["max"]));
      fmt::print("  dirty pages/epoch last {:.0f} mean {:.1f}  checkpoint mean {:.1f} KiB  throughput {:.2f} MiB/s"
                 "  standby lag {} ms\n",
                 v["dirty_pages"].value("last", 0.0), v["dirty_pages"].value("mean", 0.0),
                 v["checkpoint_bytes"].value("mean", 0.0) / 1024, v.value("throughput_mib_s", 0.0),
                 fmt_ms(v["standby_lag_ms"]));
      fmt::print("  link {} via {} ({})  {}  idle {} ms   tracker {}  QEMU pid {}  RAM {} MiB\n", l.value("peer", "?"),
                 l.value("transport", "?"), l.value("security", "?"), l.value("healthy", false) ? "healthy" : "DOWN",
                 fmt_ms(l["idle_ms"]), v.value("tracker", "?"), v.value("qemu_pid", 0), v.value("ram_mib", 0));
      if (l.contains("second_path") && l["second_path"].is_object() && !l["second_path"].value("peer", "").empty())
        fmt::print("  second path {}  {}\n", l["second_path"].value("peer", "?"), l["second_path"].value("state", "?"));
      if (v.contains("arbiter") && v["arbiter"].is_object()) {
        const auto& a = v["arbiter"];
        const double at = a.value("last_confirmed_wall_ms", 0.0);
        fmt::print("  arbiter {}: {}{}\n", a.value("kind", "?"), a.value("holds", ""),
                   at > 0 ? fmt::format(" (last confirmed {:.1f} s ago)",
                                        (std::chrono::duration<double, std::milli>(
                                             std::chrono::system_clock::now().time_since_epoch()).count() - at) / 1000)
                          : "");
      }
      if (v.contains("disk") && v["disk"].is_object()) {
        const auto& d = v["disk"];
        for (const auto& x : d["disks"])
          fmt::print("  disk {} ({}, {} MiB)  {}  copied {}/{} MiB\n", x.value("id", "?"), x.value("source", "?"),
                     x.value("size", uint64_t{0}) >> 20,
                     !d.value("running", false) ? "not mirrored" : x.value("ready", false) ? "mirrored" : "initial copy",
                     x.value("copied", uint64_t{0}) >> 20, x.value("total", uint64_t{0}) >> 20);
        fmt::print("  disk writes forwarded {} ({:.1f} MiB), queued {} KiB{}{}\n", d.value("forwarded_ops", 0),
                   d.value("forwarded_bytes", uint64_t{0}) / 1048576.0, d.value("queued_bytes", uint64_t{0}) >> 10,
                   d.value("failure", "").empty() ? "" : "  FAILED: ", d.value("failure", ""));
      }
    } else {
      fmt::print("  committed epoch {}  twin pid {}  last commit {} ms ago\n", v.value("epoch", 0),
                 v.value("twin_pid", 0), fmt_ms(v["last_commit_age_ms"]));
      if (v.contains("peer"))
        fmt::print("  primary {} ({})\n", v.value("peer", "?"), v.value("security", "?"));
      if (v.contains("disk") && v["disk"].is_object()) {
        const auto& d = v["disk"];
        for (const auto& img : d["images"]) fmt::print("  disk replica {}\n", img.get<std::string>());
        fmt::print("  disk writes buffered {} ({} KiB, {} KiB spilled), applied {}\n", d.value("buffered_ops", 0),
                   d.value("buffered_bytes", uint64_t{0}) >> 10, d.value("spilled_bytes", uint64_t{0}) >> 10,
                   d.value("applied_ops", 0));
      }
      if (v.contains("activation") && !v["activation"].is_null()) {
        const auto& a = v["activation"];
        fmt::print("  activated at epoch {}: {} ms (load {} ms, verify {} ms), status {}\n", a.value("epoch", 0),
                   fmt_ms(a["activation_ms"]), fmt_ms(a["load_ms"]), fmt_ms(a["verify_ms"]),
                   a.value("status_after", "?"));
      }
    }
    print_history(v);
  }
}

// Runs a subcommand that works on libvirt directly (no ftd): errors become messages and exit
// codes (no such domain: 4; anything else: 1).
template <typename F>
int local_command(F f) {
  try {
    return f();
  } catch (const ftvm::vmm::lv::NoSuchDomain& e) {
    fmt::print(stderr, "ftctl: {}\n", e.what());
    return kNotFound;
  } catch (const std::exception& e) {
    fmt::print(stderr, "ftctl: {}\n", e.what());
    return kFailed;
  }
}

// `ftctl prepare`: what the running domain lacks (takes effect only after a restart) and what
// the persistent definition lacks (fixed there with confirmation).
int prepare_domain(const std::string& domain, const std::string& uri, bool yes, bool json) {
  namespace lv = ftvm::vmm::lv;
  return local_command([&] {
    auto conn = lv::Connection::open(uri);
    auto dom = lv::Domain::lookup(conn, domain);
    const bool active = dom.active(), persistent = dom.persistent();
    const auto live_issues = active ? ftvm::vmm::prepare_check(dom.xml(false)) : std::vector<ftvm::vmm::PrepareIssue>{};
    const auto def_xml = persistent ? dom.xml(true) : std::string();
    const auto def_issues = persistent ? ftvm::vmm::prepare_check(def_xml) : live_issues;
    auto to_json = [](const std::vector<ftvm::vmm::PrepareIssue>& v) {
      auto a = nlohmann::json::array();
      for (const auto& i : v)
        a.push_back({{"what", i.what}, {"fix", i.fix}, {"needs_restart", i.needs_restart}, {"fixable", i.fixable}});
      return a;
    };
    bool unfixable = false;
    for (const auto& i : def_issues) unfixable |= !i.fixable;
    bool fixed = false;
    if (!def_issues.empty() && persistent && !json) {
      fmt::print("domain '{}': the persistent definition needs {} change(s):\n", dom.name(), def_issues.size());
      for (const auto& i : def_issues)
        fmt::print("  - {}\n    fix: {}{}\n", i.what, i.fix, i.fixable ? "" : "  (not automatic: change it yourself)");
    }
    bool any_fixable = false;
    for (const auto& i : def_issues) any_fixable |= i.fixable;
    if (any_fixable && persistent) {
      bool go = yes;
      if (!go && !json && isatty(0)) {
        fmt::print("apply the automatic fixes to the persistent definition of '{}'? [y/N] ", dom.name());
        std::fflush(stdout);
        std::string a;
        std::getline(std::cin, a);
        go = a == "y" || a == "Y" || a == "yes";
      }
      if (go) {
        lv::define(conn, ftvm::vmm::prepare_fix(def_xml));
        fixed = true;
        if (!json) fmt::print("domain '{}': persistent definition updated\n", dom.name());
      }
    }
    const bool restart = active && !live_issues.empty();
    if (json) {
      fmt::print("{}\n", nlohmann::json{{"domain", dom.name()}, {"uuid", dom.uuid()}, {"running", active},
                                        {"running_config_issues", to_json(live_issues)},
                                        {"definition_issues", to_json(def_issues)}, {"fixed", fixed},
                                        {"restart_needed", restart}}.dump(2));
    } else if (def_issues.empty() && live_issues.empty()) {
      fmt::print("domain '{}' is ready for protection (ftctl enable {} --peer STANDBY)\n", dom.name(), dom.name());
    } else if (restart) {
      fmt::print("domain '{}' runs with {} setting(s) protection cannot work with; they take effect after a restart: "
                 "virsh shutdown {} && virsh start {}\n", dom.name(), live_issues.size(), dom.name(), dom.name());
    }
    if (unfixable) return kRefused;
    if (!def_issues.empty() && !fixed) return kRefused;
    return kOk;
  });
}

int release_domain(const std::string& domain, const std::string& uri, const std::string& state_dir) {
  return local_command([&] {
    std::string uuid = domain;
    try {
      auto conn = ftvm::vmm::lv::Connection::open(uri);
      uuid = ftvm::vmm::lv::Domain::lookup(conn, domain).uuid();
    } catch (const std::exception&) {
      if (!ftvm::vmm::looks_like_uuid(domain)) throw;  // a UUID works without libvirt
    }
    std::vector<std::string> removed;
    for (const char* kind : {"failed-over", "protected"}) {
      const auto path = state_dir + "/" + kind + "/" + uuid;
      if (::unlink(path.c_str()) == 0) removed.push_back(path);
      else if (errno != ENOENT) throw ftvm::SysError(errno, "unlink " + path);
    }
    if (removed.empty()) {
      fmt::print("domain {} is not marked as failed over or protected (nothing in {}/{{failed-over,protected}})\n",
                 domain, state_dir);
      return kOk;
    }
    for (const auto& p : removed)
      fmt::print("domain {} released: libvirt may start it on this host again ({} removed)\n", domain, p);
    return kOk;
  });
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"ftctl - control ftvm fault tolerance for QEMU guests (talks to the local ftd)"};
  app.set_version_flag("--version", FTVM_VERSION);
  app.require_subcommand(1);
  Ctl ctl;
  const char* env = std::getenv("FTVM_CONTROL");
  ctl.path = env ? env : control::kDefaultSocket;
  app.add_option("--control", ctl.path, "ftd control socket (env FTVM_CONTROL)")->capture_default_str();
  bool json = false;

  auto* en = app.add_subcommand("enable", "Protect a running guest: a libvirt DOMAIN (name or UUID), or a plain QEMU "
                                          "by its --qmp socket; creates its twin on the standby and replicates");
  std::string qmp, peer, name, domain, uri;
  unsigned epoch_ms = 25, passes = 8, timeout_s = 600;
  bool no_wait = false;
  en->add_option("DOMAIN", domain, "libvirt domain name or UUID (writes the ftvm element into its XML, live and "
                                   "persistent, so the libvirt hook protects it whenever it starts)");
  en->add_option("--connect,-c", uri, "libvirt URI (default: ftd's --libvirt-uri, qemu:///system)");
  en->add_option("--qmp", qmp, "Plain QEMU: the guest's QMP unix socket (ftd takes that connection)");
  en->add_option("--peer", peer, "Standby ftd address HOST[:PORT] (port 7410 by default)")->required();
  std::string peer_alt;
  en->add_option("--peer-alt", peer_alt,
                 "The standby ftd's address on a second network, HOST[:PORT] (its --listen-also): the second "
                 "heartbeat path goes there, so the standby takes over only when both networks are silent");
  en->add_option("--name", name, "VM name (default: QEMU's -name, else the QMP socket's file name)");
  en->add_option("--epoch-ms", epoch_ms, "Guest run time between checkpoints")->capture_default_str()->check(
      CLI::Range(1u, 10000u));
  unsigned output_min_ms = 2;
  en->add_option("--output-epoch-min-ms", output_min_ms,
                 "When the guest's network output waits, cut the epoch once the guest ran this long (and at least as "
                 "long as the last pause) instead of waiting for the --epoch-ms boundary; 0 = always wait")
      ->capture_default_str()
      ->check(CLI::Range(0u, 10000u));
  en->add_option("--max-sync-passes", passes, "Pre-copy passes before the first checkpoint")
      ->capture_default_str()
      ->check(CLI::Range(1u, 100u));
  std::string transport = "auto";
  std::string reprotect = "auto";
  std::string failover = "auto";
  std::string arbiter;
  en->add_option("--arbiter", arbiter,
                 "Split-brain arbitration for this VM: default the hosts' (ftd --arbiter); none = opt out (a partition "
                 "between two live hosts then runs two copies); libvirt domains keep it in the metadata element")
      ->check(CLI::IsMember({"none", "fence-command", "corosync", "sanlock"}));
  en->add_option("--reprotect", reprotect,
                 "After a failover: auto = the standby protects the VM again towards this host as soon as it can "
                 "(needs this ftd to listen for replication); manual = only `ftctl enable` on the new host does; libvirt "
                 "domains keep it in the metadata element (reprotect=)")
      ->capture_default_str()
      ->check(CLI::IsMember({"auto", "manual"}));
  en->add_option("--failover", failover,
                 "When the primary is lost (its QEMU died, or it went silent and the arbiter agrees): auto = the "
                 "standby resumes the twin at once; manual = the twin stays paused until `ftctl failover --force VM` "
                 "on the standby host (for a cluster manager); libvirt domains keep it in the metadata element")
      ->capture_default_str()
      ->check(CLI::IsMember({"auto", "manual"}));
  en->add_option("--transport", transport, "rdma, tcp, or auto (RDMA when the peer is reachable over an RDMA device)")
      ->capture_default_str()
      ->check(CLI::IsMember({"rdma", "tcp", "auto"}));
  bool shared_disk = false;
  en->add_flag("--shared-disk", shared_disk,
               "The standby sees the same disks (shared storage) instead of getting replicas: refused, with the "
               "reason (the twin would see writes made after the checkpoint it resumes)");
  en->add_flag("--no-wait", no_wait, "Return once syncing started instead of waiting for 'protected'");
  en->add_option("--timeout", timeout_s, "Seconds to wait for 'protected'")->capture_default_str();

  auto* pr = app.add_subcommand("prepare", "Check (and with confirmation fix) what protecting a libvirt domain needs: "
                                           "shared memfd memory, no balloon, no vhost; says what needs a restart");
  std::string pr_domain, pr_uri = "qemu:///system";
  bool pr_yes = false;
  pr->add_option("DOMAIN", pr_domain, "libvirt domain name or UUID")->required();
  pr->add_option("--connect,-c", pr_uri, "libvirt URI")->capture_default_str();
  pr->add_flag("--yes,-y", pr_yes, "Apply the fixes to the persistent definition without asking");
  pr->add_flag("--json", json, "Machine-readable output");

  auto* rl = app.add_subcommand("release", "Allow a libvirt domain that failed over away from this host to start here "
                                           "again (check first that its twin does not run on the standby)");
  std::string rl_domain, rl_uri = "qemu:///system", state_dir = "/var/lib/ftvm";
  rl->add_option("DOMAIN", rl_domain, "libvirt domain name or UUID")->required();
  rl->add_option("--connect,-c", rl_uri, "libvirt URI")->capture_default_str();
  rl->add_option("--state-dir", state_dir, "ftd's --state-dir")->capture_default_str();

  auto* st = app.add_subcommand("status", "Show protected VMs on this host");
  std::string st_name;
  st->add_option("VM", st_name, "Only this VM");
  st->add_flag("--json", json, "Machine-readable output");

  auto* fo = app.add_subcommand(
      "failover",
      "On the primary: planned switchover (final checkpoint, twin resumes, primary stops). With --force on the "
      "standby: resume the paused twin of a lost primary (failover=manual) from its last committed checkpoint. Exit "
      "codes: 0 done (or already running here), 1 failed (the twin could not be resumed; it was killed), 2 usage, "
      "3 ftd unreachable, 4 no such VM on this host, 5 refused (the primary is still heard on some path, nothing "
      "committed, the arbiter says this side lost, or the wrong host), 6 the arbiter cannot tell yet: retry");
  std::string fo_name;
  bool fo_force = false;
  unsigned fo_timeout_s = 60;
  fo->add_option("VM", fo_name, "VM name")->required();
  fo->add_flag("--force", fo_force,
               "Standby host: the operator decides the VM runs here now. Overrides only failover=manual's hold (and "
               "accepts losing the work since the last committed checkpoint); never resumes a twin whose primary is "
               "heard on any path (unless it reported its QEMU dead), nor one the arbiter refuses");
  fo->add_option("--timeout", fo_timeout_s, "Seconds to wait for the decision")->capture_default_str();

  auto* di = app.add_subcommand("disable", "End protection: destroy the twin, leave the guest running here");
  std::string di_name;
  di->add_option("VM", di_name, "VM name")->required();

  auto* fa = app.add_subcommand("fault", "Inject a fault (tests; ftd needs --enable-fault-injection)");
  fa->group("");  // hidden from --help
  std::string fa_name, fa_kind;
  fa->add_option("VM", fa_name)->required();
  fa->add_option("KIND", fa_kind, "crash-mid-epoch | corrupt-then-crash | corrupt-once | nbd-drop | lose-activate-done")->required();

  auto* kg = app.add_subcommand("keygen", "Create a replication key FILE (32 random bytes, mode 0600) for a host pair: "
                                          "copy it to both hosts and start both ftd with --key-file FILE");
  std::string kg_file;
  kg->add_option("FILE", kg_file, "Key file to create (never overwritten)")->required();

  auto* dg = app.add_subcommand("digest", "Print the XXH3-64 digest of files (compare a disk replica with its source; "
                                          "`status --json` shows the standby's digests at activation)");
  std::vector<std::string> dg_files;
  dg->add_option("FILE", dg_files, "Files to digest")->required();

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    int rc = app.exit(e);
    return rc == 0 ? 0 : kUsage;
  }

  auto fail_with = [&](const nlohmann::json& r) {
    fmt::print(stderr, "ftctl: {}\n", r.value("error", "unknown error"));
    return code_for(r);
  };

  if (*kg) {
    try {
      ftvm::transport::auth::generate_key(kg_file);
      fmt::print("wrote a new replication key to {} (mode 0600, key id {}); copy it to the peer host over a secure "
                 "channel and start both ftd with --key-file {}\n",
                 kg_file, ftvm::transport::auth::load_key(kg_file)->id_hex(), kg_file);
      return kOk;
    } catch (const std::exception& e) {
      fmt::print(stderr, "ftctl: keygen: {}\n", e.what());
      return kFailed;
    }
  }
  if (*dg) {
    int rc = kOk;
    for (const auto& f : dg_files) {
      try {
        fmt::print("{:016x}  {}\n", ftvm::checkpoint::digest_file(f), f);
      } catch (const std::exception& e) {
        fmt::print(stderr, "ftctl: {}\n", e.what());
        rc = kFailed;
      }
    }
    return rc;
  }

  if (*pr) return prepare_domain(pr_domain, pr_uri, pr_yes, json);
  if (*rl) return release_domain(rl_domain, rl_uri, state_dir);

  try {
    if (*en) {
      if (domain.empty() == qmp.empty()) {
        fmt::print(stderr, "ftctl enable: give either a libvirt DOMAIN or --qmp SOCKET (plain QEMU), not {}\n",
                   domain.empty() ? "neither" : "both");
        return kUsage;
      }
      nlohmann::json req = {{"cmd", "enable"}, {"peer", peer}, {"name", name}, {"epoch_ms", epoch_ms},
                            {"max_sync_passes", passes}, {"transport", transport}, {"shared_disk", shared_disk},
                            {"reprotect", reprotect}, {"failover", failover}, {"arbiter", arbiter}};
      if (!peer_alt.empty()) req["peer_alt"] = peer_alt;
      req["output_epoch_min_ms"] = output_min_ms;
      if (!domain.empty()) {
        req["domain"] = domain;
        if (!uri.empty()) req["uri"] = uri;
      } else {
        req["qmp"] = qmp;
      }
      auto r = ctl.call(req);
      if (!r.value("ok", false)) return fail_with(r);
      const std::string vm = r.value("name", name);
      fmt::print("{}\n", r.value("message", ""));
      if (no_wait) return kOk;
      auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(timeout_s);
      std::string last;
      for (;;) {
        auto s = ctl.call({{"cmd", "status"}, {"name", vm}});
        if (!s.value("ok", false)) return fail_with(s);
        nlohmann::json v;
        for (const auto& x : s["vms"])
          if (x.value("role", "") == "primary") v = x;
        std::string state = v.value("state", "?");
        if (state != last) {
          fmt::print("{}: {}{}\n", vm, state, v.value("reason", "").empty() ? "" : " (" + v.value("reason", "") + ")");
          last = state;
        }
        if (state == "protected") {
          fmt::print("{}: protected; epoch {}, sync {} pages in {} passes ({:.0f} ms)\n", vm, v.value("epoch", 0),
                     v["sync"].value("pages", 0), v["sync"].value("passes", 0), v["sync"].value("ms", 0.0));
          if (v.contains("arbiter") && v["arbiter"].value("kind", "none") == "none")
            fmt::print(stderr,
                       "ftctl: warning: no arbiter: split-brain unprotected. A partition between two live hosts "
                       "runs two copies of {}; configure one on both hosts (ftd --arbiter fence-command ...)\n",
                       vm);
          return kOk;
        }
        if (state == "primary-lost" || state == "disabled" || state == "failed-over") return kFailed;
        if (state == "degraded" && v.value("reason", "").find("standby refused the session") != std::string::npos) {
          // The standby's own decision (its policy, its memory, another owner): waiting changes
          // nothing soon. ftd retries every reconnect interval; `ftctl disable` stops that.
          fmt::print(stderr, "ftctl: {}: {}\nftctl: the guest runs on unprotected; ftd retries on its own (`ftctl "
                             "disable {}` stops it)\n", vm, v.value("reason", ""), vm);
          return kRefused;
        }
        if (state == "degraded" && !v.value("reason", "").empty() && std::chrono::steady_clock::now() > deadline) {
          fmt::print(stderr, "ftctl: {} is degraded: {}\n", vm, v.value("reason", ""));
          return kFailed;
        }
        if (std::chrono::steady_clock::now() > deadline) {
          fmt::print(stderr, "ftctl: {} not protected after {} s (state {})\n", vm, timeout_s, state);
          return kFailed;
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(100));
      }
    }
    if (*st) {
      nlohmann::json req = {{"cmd", "status"}};
      if (!st_name.empty()) req["name"] = st_name;
      auto r = ctl.call(req);
      if (!r.value("ok", false)) return fail_with(r);
      if (r.value("insecure", false))
        fmt::print(stderr, "ftctl: WARNING: this ftd runs with --insecure: replication connections are NOT "
                           "authenticated (start it with --key-file)\n");
      if (json) {
        fmt::print("{}\n", r["vms"].dump(2));
      } else {
        fmt::print("replication: {}\n", r.value("security", "?"));
        print_human(r["vms"]);
      }
      return kOk;
    }
    if (*fo || *di || *fa) {
      nlohmann::json req = *fo ? nlohmann::json{{"cmd", "failover"}, {"name", fo_name}, {"force", fo_force},
                                                {"timeout_ms", fo_timeout_s * 1000}}
                         : *di ? nlohmann::json{{"cmd", "disable"}, {"name", di_name}}
                               : nlohmann::json{{"cmd", "fault"}, {"name", fa_name}, {"fault", fa_kind}};
      auto r = ctl.call(req, *fo ? static_cast<int>(fo_timeout_s * 1000 + 10000) : 120000);
      if (!r.value("ok", false)) return fail_with(r);
      fmt::print("{}\n", r.value("message", "ok"));
      return kOk;
    }
  } catch (const ftvm::SysError& e) {
    fmt::print(stderr, "ftctl: {}\n", e.what());
    return kUnreachable;
  } catch (const std::exception& e) {
    fmt::print(stderr, "ftctl: {}\n", e.what());
    return kFailed;
  }
  return kUsage;
}
