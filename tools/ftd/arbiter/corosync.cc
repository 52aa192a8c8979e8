#include "tools/ftd/arbiter/corosync.h"

#include <arpa/inet.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>

#include <corosync/cmap.h>
#include <corosync/corotypes.h>
#include <corosync/quorum.h>
#include <corosync/votequorum.h>

#include "common/error.h"
#include "common/log.h"

namespace ftvm::ftd {

namespace cp = ftvm::checkpoint;
using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

namespace {

double now_wall_ms() {
  return std::chrono::duration<double, std::milli>(std::chrono::system_clock::now().time_since_epoch()).count();
}

std::string cs_err(cs_error_t e) { return fmt::format("{} ({})", cs_strerror(e), static_cast<int>(e)); }

// Both parse as the same IPv4/IPv6 address, or equal strings.
bool same_host(std::string a, std::string b) {
  auto strip = [](std::string& s) {
    if (s.size() >= 2 && s.front() == '[' && s.back() == ']') s = s.substr(1, s.size() - 2);
  };
  strip(a);
  strip(b);
  if (a == b) return true;
  unsigned char x[16], y[16];
  if (::inet_pton(AF_INET, a.c_str(), x) == 1 && ::inet_pton(AF_INET, b.c_str(), y) == 1) return !std::memcmp(x, y, 4);
  if (::inet_pton(AF_INET6, a.c_str(), x) == 1 && ::inet_pton(AF_INET6, b.c_str(), y) == 1) return !std::memcmp(x, y, 16);
  // An IPv4-mapped IPv6 peer address ("::ffff:10.0.0.1") against a plain IPv4 ring address.
  auto mapped = [](const std::string& v6, const std::string& v4) {
    unsigned char m[16], four[4];
    return ::inet_pton(AF_INET6, v6.c_str(), m) == 1 && ::inet_pton(AF_INET, v4.c_str(), four) == 1 &&
           std::all_of(m, m + 10, [](unsigned char c) { return c == 0; }) && m[10] == 0xff && m[11] == 0xff &&
           !std::memcmp(m + 12, four, 4);
  };
  return mapped(a, b) || mapped(b, a);
}

std::string join_ids(const std::vector<uint32_t>& ids) {
  std::string s;
  for (auto id : ids) s += (s.empty() ? "" : " ") + std::to_string(id);
  return s.empty() ? "none" : s;
}

void on_quorum_notify(quorum_handle_t h, uint32_t quorate, uint64_t /*ring_seq*/, uint32_t n, uint32_t* ids) {
  const void* ctx = nullptr;
  if (quorum_context_get(h, &ctx) != CS_OK || !ctx) return;
  static_cast<CorosyncArbiter*>(const_cast<void*>(ctx))->on_membership(quorate != 0, ids, n);
}

// Reads this node's id and the nodelist through cmap. Throws Error on a failure.
void read_cmap(uint32_t& this_nodeid, std::vector<CorosyncView::Node>& nodes) {
  cmap_handle_t c;
  cs_error_t e = cmap_initialize(&c);
  if (e != CS_OK) fail("cmap_initialize: {} (is corosync running in this network namespace?)", cs_err(e));
  struct Fin {
    cmap_handle_t c;
    ~Fin() { cmap_finalize(c); }
  } fin{c};
  this_nodeid = 0;
  e = cmap_get_uint32(c, "runtime.votequorum.this_node_id", &this_nodeid);
  if (e != CS_OK) this_nodeid = 0;  // older corosync or not yet set: status shows "?"
  nodes.clear();
  for (unsigned i = 0; i < 1024; ++i) {
    CorosyncView::Node n;
    e = cmap_get_uint32(c, fmt::format("nodelist.node.{}.nodeid", i).c_str(), &n.nodeid);
    if (e == CS_ERR_NOT_EXIST) break;
    if (e != CS_OK) fail("cmap_get_uint32 nodelist.node.{}.nodeid: {}", i, cs_err(e));
    char* s = nullptr;
    if (cmap_get_string(c, fmt::format("nodelist.node.{}.name", i).c_str(), &s) == CS_OK && s) {
      n.name = s;
      std::free(s);
    }
    for (int r = 0; r < 8; ++r) {
      s = nullptr;
      if (cmap_get_string(c, fmt::format("nodelist.node.{}.ring{}_addr", i, r).c_str(), &s) == CS_OK && s) {
        n.addrs.emplace_back(s);
        std::free(s);
      }
    }
    nodes.push_back(std::move(n));
  }
}

}  // namespace

uint32_t corosync_find_node(const std::vector<CorosyncView::Node>& nodes, const std::string& host) {
  for (const auto& n : nodes) {
    if (!n.name.empty() && n.name == host) return n.nodeid;
    for (const auto& a : n.addrs)
      if (same_host(a, host)) return n.nodeid;
  }
  return 0;
}

cp::ArbiterAnswer corosync_answer(CorosyncQuestion q, const CorosyncView& v, uint32_t peer, Clock::time_point now,
                                  milliseconds settle, milliseconds stale_after) {
  if (!v.connected || now - v.confirmed > stale_after) return cp::ArbiterAnswer::Wait;
  const bool settled = now - v.since >= settle;
  if (!v.quorate) {
    // Lost: only a primary acts on it (a standby's twin waits for the partition to heal).
    return q == CorosyncQuestion::RunAlone && settled ? cp::ArbiterAnswer::Fence : cp::ArbiterAnswer::Wait;
  }
  if (!v.members_known || peer == 0 || peer == v.this_nodeid) return cp::ArbiterAnswer::Wait;
  const bool peer_member = std::find(v.members.begin(), v.members.end(), peer) != v.members.end();
  return !peer_member && settled ? cp::ArbiterAnswer::Yes : cp::ArbiterAnswer::Wait;
}

CorosyncArbiter::CorosyncArbiter(uint32_t peer_nodeid, milliseconds settle, milliseconds confirm_period)
    : peer_nodeid_(peer_nodeid),
      settle_(settle),
      confirm_period_(confirm_period),
      stale_after_(std::max(milliseconds(1000), 5 * confirm_period)) {
  if (settle_.count() < 0) fail("corosync arbiter: the settle margin must not be negative");
  wake_fd_ = check_sys(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK), "eventfd for the corosync arbiter thread");
  view_.error = "not connected yet";
  view_.since = Clock::now();
  // The thread must not take process signals (ftd reads SIGTERM/SIGINT from a signalfd, which
  // needs them blocked in every thread): it starts with every signal blocked.
  sigset_t all, old;
  sigfillset(&all);
  if (int e = pthread_sigmask(SIG_SETMASK, &all, &old); e != 0) {
    ::close(wake_fd_);
    throw SysError(e, "pthread_sigmask before starting the corosync arbiter thread");
  }
  try {
    thread_ = std::thread([this] { run(); });
  } catch (...) {
    pthread_sigmask(SIG_SETMASK, &old, nullptr);
    ::close(wake_fd_);
    throw;
  }
  pthread_sigmask(SIG_SETMASK, &old, nullptr);
}

CorosyncArbiter::~CorosyncArbiter() {
  {
    std::lock_guard<std::mutex> g(mu_);
    stop_ = true;
  }
  uint64_t one = 1;
  if (::write(wake_fd_, &one, sizeof one) < 0) {
    // The eventfd cannot be full here (one write); the thread still sees stop_ within a period.
  }
  if (thread_.joinable()) thread_.join();
  ::close(wake_fd_);
}

void CorosyncArbiter::sleep_or_stop(milliseconds d) {
  struct pollfd p{wake_fd_, POLLIN, 0};
  ::poll(&p, 1, static_cast<int>(d.count()));
}

void CorosyncArbiter::set_disconnected(const std::string& why) {
  std::lock_guard<std::mutex> g(mu_);
  if (view_.connected) view_.since = Clock::now();
  view_.connected = false;
  view_.members_known = false;
  view_.quorate = false;
  view_.members.clear();
  view_.error = why;
}

void CorosyncArbiter::on_membership(bool quorate, const uint32_t* ids, size_t n) {
  std::vector<uint32_t> m(ids, ids + n);
  std::sort(m.begin(), m.end());
  std::lock_guard<std::mutex> g(mu_);
  if (!view_.members_known || view_.quorate != quorate || view_.members != m) view_.since = Clock::now();
  view_.members_known = true;
  view_.quorate = quorate;
  view_.members = std::move(m);
  view_.confirmed = Clock::now();
  view_.confirmed_wall_ms = now_wall_ms();
}

void CorosyncArbiter::set_quorate(bool q) {
  std::lock_guard<std::mutex> g(mu_);
  if (view_.quorate != q) view_.since = Clock::now();
  view_.quorate = q;
  view_.confirmed = Clock::now();
  view_.confirmed_wall_ms = now_wall_ms();
}

void CorosyncArbiter::run() {
  for (;;) {
    {
      std::lock_guard<std::mutex> g(mu_);
      if (stop_) return;
    }
    bool go_on = true;
    try {
      go_on = track_once();
    } catch (const std::exception& e) {
      set_disconnected(e.what());
    }
    {
      std::lock_guard<std::mutex> g(mu_);
      const std::string line = view_.error;
      if (line != last_logged_) {
        log::warn("arbiter", "corosync: {}; answering Wait until it is back (retrying every {} ms)", line,
                  confirm_period_.count());
        last_logged_ = line;
      }
    }
    if (!go_on) return;
    sleep_or_stop(confirm_period_);
  }
}

bool CorosyncArbiter::track_once() {
  quorum_handle_t qh;
  uint32_t qtype = 0;
  quorum_callbacks_t cb{};
  cb.quorum_notify_fn = on_quorum_notify;
  cs_error_t e = quorum_initialize(&qh, &cb, &qtype);
  if (e != CS_OK) {
    set_disconnected(fmt::format("quorum_initialize: {} (corosync not running or still starting in this network "
                                 "namespace; start corosync)", cs_err(e)));
    return true;
  }
  struct QFin {
    quorum_handle_t h;
    ~QFin() {
      quorum_trackstop(h);
      quorum_finalize(h);
    }
  } qfin{qh};
  if (qtype != QUORUM_SET) {
    set_disconnected("corosync has no quorum provider (set quorum { provider: corosync_votequorum } in corosync.conf)");
    return true;
  }
  if ((e = quorum_context_set(qh, this)) != CS_OK) fail("quorum_context_set: {}", cs_err(e));
  uint32_t this_id = 0;
  std::vector<CorosyncView::Node> nodes;
  read_cmap(this_id, nodes);
  votequorum_handle_t vh;
  votequorum_callbacks_t vcb{};
  const bool have_vq = votequorum_initialize(&vh, &vcb) == CS_OK;
  struct VFin {
    bool on;
    votequorum_handle_t h;
    ~VFin() {
      if (on) votequorum_finalize(h);
    }
  } vfin{have_vq, vh};
  {
    std::lock_guard<std::mutex> g(mu_);
    view_.this_nodeid = this_id;
    view_.nodelist = nodes;
    view_.connected = true;
    view_.members_known = false;
    view_.members.clear();
    view_.since = Clock::now();
    view_.error.clear();
  }
  int q = 0;
  if ((e = quorum_getquorate(qh, &q)) != CS_OK) fail("quorum_getquorate: {} (corosync went away)", cs_err(e));
  set_quorate(q != 0);
  if ((e = quorum_trackstart(qh, CS_TRACK_CURRENT | CS_TRACK_CHANGES)) != CS_OK)
    fail("quorum_trackstart: {}", cs_err(e));
  int fd = -1;
  if ((e = quorum_fd_get(qh, &fd)) != CS_OK) fail("quorum_fd_get: {}", cs_err(e));
  log::info("arbiter", "corosync: connected (this node {}, {} nodes in the nodelist)", this_id, nodes.size());
  {
    std::lock_guard<std::mutex> g(mu_);
    last_logged_.clear();
  }
  auto next_confirm = Clock::now();
  for (;;) {
    {
      std::lock_guard<std::mutex> g(mu_);
      if (stop_) return false;
    }
    const auto now = Clock::now();
    if (now >= next_confirm) {
      if ((e = quorum_getquorate(qh, &q)) != CS_OK) {
        set_disconnected(fmt::format("quorum_getquorate: {} (corosync stopped or restarted)", cs_err(e)));
        return true;
      }
      set_quorate(q != 0);
      if (have_vq) {
        struct votequorum_info info{};
        if (votequorum_getinfo(vh, this_id, &info) == CS_OK) {
          std::lock_guard<std::mutex> g(mu_);
          view_.total_votes = info.total_votes;
          view_.expected_votes = info.node_expected_votes;
          view_.quorum = info.quorum;
        }
      }
      next_confirm = now + confirm_period_;
    }
    struct pollfd p[2] = {{fd, POLLIN, 0}, {wake_fd_, POLLIN, 0}};
    const auto wait = std::chrono::duration_cast<milliseconds>(next_confirm - Clock::now()).count();
    int r = ::poll(p, 2, static_cast<int>(std::max<long long>(0, wait)));
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) fail("poll on the corosync quorum fd: {}", std::strerror(errno));
    if (p[1].revents) return false;
    if (p[0].revents) {
      if ((e = quorum_dispatch(qh, CS_DISPATCH_ALL)) != CS_OK) {
        set_disconnected(fmt::format("quorum_dispatch: {} (corosync stopped or restarted)", cs_err(e)));
        return true;
      }
    }
  }
}

CorosyncView CorosyncArbiter::view() const {
  std::lock_guard<std::mutex> g(mu_);
  return view_;
}

uint32_t CorosyncArbiter::peer_of(const std::string& peer_host) const {
  if (peer_nodeid_) return peer_nodeid_;
  std::lock_guard<std::mutex> g(mu_);
  return corosync_find_node(view_.nodelist, peer_host);
}

cp::ArbiterAnswer CorosyncArbiter::ask(CorosyncQuestion q, const cp::ArbiterSubject& s) {
  const uint32_t peer = peer_of(s.peer_host);
  std::lock_guard<std::mutex> g(mu_);
  if ((peer == 0 || peer == view_.this_nodeid) && view_.connected && view_.quorate) {
    const std::string line =
        peer == 0 ? fmt::format("the peer '{}' of VM '{}' is no node of the corosync nodelist (no name or ringN_addr "
                                "matches); answering Wait: list it in corosync.conf or pass --corosync-peer-nodeid",
                                s.peer_host, s.vm)
                  : fmt::format("the peer '{}' of VM '{}' is this node ({}) by {}; answering Wait: fix "
                                "--corosync-peer-nodeid or the nodelist", s.peer_host, s.vm, peer,
                                peer_nodeid_ ? "--corosync-peer-nodeid" : "the nodelist");
    if (line != last_logged_) {
      log::error("arbiter", "corosync: {}", line);
      last_logged_ = line;
    }
  }
  return corosync_answer(q, view_, peer, Clock::now(), settle_, stale_after_);
}

cp::ArbiterAnswer CorosyncArbiter::may_activate(const cp::ArbiterSubject& s, milliseconds) {
  return ask(CorosyncQuestion::Activate, s);
}

cp::ArbiterAnswer CorosyncArbiter::may_run_alone(const cp::ArbiterSubject& s, milliseconds) {
  return ask(CorosyncQuestion::RunAlone, s);
}

cp::ArbiterStatus CorosyncArbiter::status() const {
  std::lock_guard<std::mutex> g(mu_);
  cp::ArbiterStatus st;
  st.kind = "corosync";
  st.last_confirmed_wall_ms = view_.confirmed_wall_ms;
  const bool fresh = view_.connected && Clock::now() - view_.confirmed <= stale_after_;
  const std::string me = view_.this_nodeid ? std::to_string(view_.this_nodeid) : "?";
  const std::string votes = view_.total_votes ? fmt::format("{} votes of {}, ", view_.total_votes, view_.expected_votes) : "";
  const std::string members = view_.members_known ? join_ids(view_.members) : "unknown";
  if (!view_.connected)
    st.holds = fmt::format("corosync unreachable: {}", view_.error);
  else if (!fresh)
    st.holds = fmt::format("corosync not confirmed for {} ms (hung?)",
                           std::chrono::duration_cast<milliseconds>(Clock::now() - view_.confirmed).count());
  else
    st.holds = fmt::format("{} ({}members {}; this node {}; peer {}; settle {} ms)",
                           view_.quorate ? "quorate" : "NOT quorate", votes, members, me,
                           peer_nodeid_ ? std::to_string(peer_nodeid_) : "from the nodelist", settle_.count());
  st.healthy = fresh && view_.quorate;
  return st;
}

}  // namespace ftvm::ftd
