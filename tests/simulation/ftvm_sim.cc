// ftvm_sim: deterministic simulation of ftvm's failover decision (checkpoint/failover.h) in the
// style of FoundationDB's simulator and TigerBeetle's VOPR: the real decision rules and the real
// no-arbiter policy (checkpoint/arbiter.h) run under a simulated clock, network and scheduler;
// every run is a function of its seed, and a failing seed replays exactly (`--seed N`).
//
// What is simulated (one protected VM, one step = 1 ms of simulated time):
//  * host P: the primary QEMU (running / paused / dead; it produces output tagged with the open
//    epoch), the primary ftd session (epochs, Commit/Ack, heartbeats, Suspect/Takeover/Resolve
//    handling, settling with the arbiter) and its guard (kills QEMU when ftd stops pinging it
//    for guard_watchdog(), or when ftd dies);
//  * host S: the standby ftd session (replica, twin paused / running / destroyed, silence rules,
//    Resolve answered from the FateCell, arbiter on silence);
//  * two networks, A (data path) and B (second path), each direction cut independently; frames
//    are delayed (FIFO per connection), dropped while a direction is cut; connections reset;
//  * arbiters: "none" (the real make_no_arbiter), "fence" (a fence device that powers off the
//    other host after a delay; reachable or not per host) and "quorum" (corosync + qnetd: a
//    witness, membership that settles after a delay, ffsplit tie-break to the lower node id).
// Faults, drawn per seed: partitions (both ways, one way, per network or all), resets, delay
// spikes, drop bursts, stalls of either ftd (SIGSTOP), kill of the primary QEMU, of either ftd
// (the standby ftd restarts), of either host, arbiter links cut.
//
// Invariants, checked after every step:
//  I1 at most one copy executes (the primary QEMU running and not fenced, the twin running);
//  I2 no output of an epoch the running twin does not reflect ever left the primary;
//  I3 the twin resumes only from a committed checkpoint, and from the newest acknowledged one
//     (no acknowledged epoch lost).
// `--legacy` replaces the rules with the behaviour before the split-brain work (the primary
// runs on alone at any link error, the standby resumes on silence without Resolve or arbiter):
// the simulation must find violations there (the CTest `simulation_finds_legacy_split_brain`).
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "checkpoint/arbiter.h"
#include "checkpoint/failover.h"

namespace {

namespace cp = ftvm::checkpoint;
namespace fo = ftvm::checkpoint::failover;
using ms = std::chrono::milliseconds;
using Time = int64_t;  // simulated milliseconds

// xoshiro256** seeded by splitmix64: the whole run is a function of the seed.
class Rng {
 public:
  explicit Rng(uint64_t seed) {
    for (auto& x : s_) {
      seed += 0x9e3779b97f4a7c15ULL;
      uint64_t z = seed;
      z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
      z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
      x = z ^ (z >> 31);
    }
  }
  uint64_t next() {
    const uint64_t r = rotl(s_[1] * 5, 7) * 9, t = s_[1] << 17;
    s_[2] ^= s_[0];
    s_[3] ^= s_[1];
    s_[1] ^= s_[2];
    s_[0] ^= s_[3];
    s_[2] ^= t;
    s_[3] = rotl(s_[3], 45);
    return r;
  }
  int64_t range(int64_t lo, int64_t hi) { return lo + static_cast<int64_t>(next() % static_cast<uint64_t>(hi - lo + 1)); }
  bool chance(double p) { return static_cast<double>(next() >> 11) * 0x1.0p-53 < p; }

 private:
  static uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }
  uint64_t s_[4];
};

enum class Net { A = 0, B = 1 };
enum Dir { ToS = 0, ToP = 1 };  // P -> S, S -> P
enum class MsgType { Commit, Ack, Heartbeat, Suspect, Takeover, PrimaryLost, Disable, Error };
const char* name(MsgType t) {
  switch (t) {
    case MsgType::Commit: return "Commit";
    case MsgType::Ack: return "Ack";
    case MsgType::Heartbeat: return "Heartbeat";
    case MsgType::Suspect: return "Suspect";
    case MsgType::Takeover: return "Takeover";
    case MsgType::PrimaryLost: return "PrimaryLost";
    case MsgType::Disable: return "Disable";
    case MsgType::Error: return "Error";
  }
  return "?";
}
struct Msg {
  MsgType type;
  uint64_t epoch = 0;
  Time at = 0;  // delivery time
};

enum class ArbiterKind { None, Fence, Quorum, Lease };
const char* name(ArbiterKind k) {
  switch (k) {
    case ArbiterKind::None: return "none";
    case ArbiterKind::Fence: return "fence";
    case ArbiterKind::Quorum: return "quorum";
    case ArbiterKind::Lease: return "lease";
  }
  return "?";
}

struct Options {
  uint64_t first_seed = 1, seeds = 1000;
  bool legacy = false, verbose = false, expect_violation = false;
  bool old_no_arbiter = false;  // the no-arbiter standby as it was: Yes on any silence
  bool old_watch = false;       // the standby as it was: no StandbyView::watched rule
  std::optional<ArbiterKind> arbiter;  // default: drawn per seed from `draw_from`
  std::vector<ArbiterKind> draw_from{ArbiterKind::None, ArbiterKind::Fence, ArbiterKind::Quorum, ArbiterKind::Lease};
  Time duration = 12000;
};

class World;

// A connection: one per path, both ends in one object. `open[end]` is false once that end saw
// it fail (reset, or closed by its owner); frames on a cut direction are lost.
struct Conn {
  Net net;
  uint64_t sid = 0;
  bool open = true;
  std::deque<Msg> q[2];
  Time last_at[2] = {0, 0};       // FIFO: the last scheduled delivery per direction
  Time heard[2] = {0, 0};         // per receiving direction: when the last frame arrived
  Time last_sent[2] = {0, 0};
};

// ---------------------------------------------------------------------------------------------

class World {
 public:
  World(uint64_t seed, const Options& o) : rng_(seed), seed_(seed), o_(o) {
    T_ = ms(rng_.range(0, 1) ? 400 : 1000);
    hb_ = ms(50);
    epoch_ms_ = rng_.range(5, 50);
    kind_ = o.arbiter ? *o.arbiter : o.draw_from[static_cast<size_t>(rng_.range(0, static_cast<int64_t>(o.draw_from.size()) - 1))];
    manual_ = !o.legacy && rng_.chance(0.25);
    if (kind_ == ArbiterKind::None) none_ = cp::make_no_arbiter(2 * T_);
    draw_faults();
  }

  // Runs the seed; returns the first violation ("" = none).
  std::string run() {
    lease_holder_ = 0;  // the primary takes the VM's lease when protection starts
    open_session();
    for (now_ = 1; now_ <= o_.duration && violation_.empty(); now_++) {
      apply_faults();
      arbiter_tick();
      step_guard();
      if (p_ftd_alive_ && now_ >= p_stalled_until_) step_primary();
      if (s_ftd_alive_ && now_ >= s_stalled_until_) step_standby();
      step_twins();
      check();
    }
    return violation_;
  }
  const std::vector<std::string>& trace() const { return trace_; }
  std::string describe() const {
    return fmt::format("seed {}: arbiter {}, failover={}, T {} ms, epoch {} ms{}; {} sessions, {} failovers; faults: {}",
                       seed_, name(kind_), manual_ ? "manual" : "auto", T_.count(), epoch_ms_,
                       o_.legacy ? ", legacy rules" : "", sessions_opened_, activations_, fault_text_);
  }
  uint64_t activations() const { return activations_; }
  uint64_t sessions() const { return sessions_opened_; }

 private:
  // ----- faults ------------------------------------------------------------------------------
  struct Fault {
    Time at = 0, until = 0;
    std::string what;
    std::function<void(World&)> begin, end;
  };
  void add(Time at, Time len, std::string what, std::function<void(World&)> b, std::function<void(World&)> e = {}) {
    faults_.push_back({at, at + len, what, std::move(b), std::move(e)});
    fault_text_ += fmt::format("{}{}@{}ms/{}ms", fault_text_.empty() ? "" : ", ", what, at, len);
  }
  // Fault lengths around the timeouts that matter: below T/2, T/2..T, T..3T, beyond.
  Time draw_len() {
    const Time t = T_.count();
    switch (rng_.range(0, 3)) {
      case 0: return rng_.range(5, t / 2);
      case 1: return rng_.range(t / 2, t);
      case 2: return rng_.range(t, 3 * t);
      default: return rng_.range(3 * t, 5000);
    }
  }
  void draw_faults() {
    const int n = static_cast<int>(rng_.range(1, 4));
    bool network_fault_drawn = false;
    for (int i = 0; i < n; i++) {
      const Time at = rng_.range(300, o_.duration - 4000);
      const Time len = draw_len();
      int f = static_cast<int>(rng_.range(0, 17));
      // Without an arbiter a partition between two live hosts (both ways or one way, on every
      // network) runs two copies by design (documented: "split-brain unprotected"): those
      // faults are drawn only with an arbiter. Two network-down faults may overlap into the
      // same partition: one per seed without an arbiter.
      while (kind_ == ArbiterKind::None && !o_.legacy && (f <= 3 || (f == 6 && network_fault_drawn)))
        f = 4 + static_cast<int>(rng_.range(0, 13));
      if (f == 6) network_fault_drawn = true;
      switch (f) {
        case 0: add(at, len, "partition-all-both", [](World& w) { w.cut_all(true, true); }, [](World& w) { w.cut_all(false, true); }); break;
        case 1: add(at, len, "partition-all-to-standby", [](World& w) { w.cut_all(true, false, ToS); }, [](World& w) { w.cut_all(false, false, ToS); }); break;
        case 2: add(at, len, "partition-all-to-primary", [](World& w) { w.cut_all(true, false, ToP); }, [](World& w) { w.cut_all(false, false, ToP); }); break;
        case 3: {
          // Both networks cut, and one side also loses the arbiter (witness, fence device, storage).
          const bool p_side = rng_.chance(0.5);
          add(at, len, p_side ? "partition-all-both+primary-isolated" : "partition-all-both+standby-isolated",
              [p_side](World& w) { w.cut_all(true, true); w.arb_up_[p_side ? 0 : 1] = false; w.membership_changed(); },
              [p_side](World& w) { w.cut_all(false, true); w.arb_up_[p_side ? 0 : 1] = true; w.membership_changed(); });
          break;
        }
        case 4: add(at, 0, "reset-data", [](World& w) { w.reset(Net::A); }); break;
        case 5: add(at, 0, "reset-both-paths", [](World& w) { w.reset(Net::A); w.reset(Net::B); }); break;
        case 6: {
          const Net net = rng_.chance(0.5) ? Net::A : Net::B;
          add(at, len, net == Net::A ? "network-A-down" : "network-B-down", [net](World& w) { w.cut(net, true, true); },
              [net](World& w) { w.cut(net, false, true); });
          break;
        }
        case 7: add(at, len, "delay-spike", [](World& w) { w.max_delay_ = 300; }, [](World& w) { w.max_delay_ = 3; }); break;
        case 8: add(at, len, "drop-burst", [](World& w) { w.drop_p_ = 0.3; }, [](World& w) { w.drop_p_ = 0; }); break;
        case 9: add(at, len, "stop-primary-ftd", [len](World& w) { w.p_stalled_until_ = std::max(w.p_stalled_until_, w.now_ + len); }); break;
        case 10: add(at, len, "stop-standby-ftd", [len](World& w) { w.s_stalled_until_ = std::max(w.s_stalled_until_, w.now_ + len); }); break;
        case 11: add(at, 0, "kill-primary-qemu", [](World& w) { w.kill_qemu("kill -9 of the primary QEMU"); }); break;
        case 12: add(at, len, "restart-primary-ftd", [](World& w) { w.kill_primary_ftd(); }, [](World& w) { w.restart_primary_ftd(); }); break;
        case 13: add(at, 0, "kill-primary-host", [](World& w) { w.kill_primary_host("host P powered off"); }); break;
        case 14: add(at, len, "restart-standby-ftd", [](World& w) { w.kill_standby_ftd(); }, [](World& w) { w.restart_standby_ftd(); }); break;
        case 15: add(at, 0, "kill-standby-host", [](World& w) { w.kill_standby_host("host S powered off"); }); break;
        case 16: add(at, 0, "kill-twin", [](World& w) { w.kill_paused_twin(); }); break;
        case 17: {
          const bool p_side = rng_.chance(0.5);
          add(at, len, p_side ? "arbiter-lost-by-primary" : "arbiter-lost-by-standby",
              [p_side](World& w) { w.arb_up_[p_side ? 0 : 1] = false; w.membership_changed(); },
              [p_side](World& w) { w.arb_up_[p_side ? 0 : 1] = true; w.membership_changed(); });
          break;
        }
      }
    }
    // failover=manual: an operator runs `ftctl failover --force` on the standby now and then.
    if (manual_)
      for (int i = 0; i < 3; i++) {
        const Time at = rng_.range(500, o_.duration - 500);
        add(at, 0, "operator-force", [](World& w) { w.operator_force(); });
      }
    std::sort(faults_.begin(), faults_.end(), [](const Fault& a, const Fault& b) { return a.at < b.at; });
  }
  void apply_faults() {
    for (auto& f : faults_) {
      if (f.at == now_) {
        log("FAULT {} ({} ms)", f.what, f.until - f.at);
        f.begin(*this);
      }
      if (f.until == now_ && f.end && f.until > f.at) {
        log("HEAL {}", f.what);
        f.end(*this);
      }
    }
  }

  // ----- network -----------------------------------------------------------------------------
  bool up_[2][2] = {{true, true}, {true, true}};  // [net][dir]
  int max_delay_ = 3;
  double drop_p_ = 0;
  void cut(Net n, bool down, bool both, Dir d = ToS) {
    auto& u = up_[static_cast<int>(n)];
    if (both) u[ToS] = u[ToP] = !down;
    else u[d] = !down;
    membership_changed();
  }
  void cut_all(bool down, bool both, Dir d = ToS) {
    cut(Net::A, down, both, d);
    cut(Net::B, down, both, d);
  }
  void reset(Net n) {
    for (auto& c : conns_)
      if (c->net == n && c->open) {
        c->open = false;
        log("reset of session {:x}'s connection on network {}", c->sid, n == Net::A ? "A" : "B");
      }
  }
  std::shared_ptr<Conn> connect(Net n, uint64_t sid) {
    auto c = std::make_shared<Conn>();
    c->net = n;
    c->sid = sid;
    c->heard[ToS] = c->heard[ToP] = now_;
    conns_.push_back(c);
    return c;
  }
  void send(const std::shared_ptr<Conn>& c, Dir d, MsgType t, uint64_t epoch = 0) {
    if (!c || !c->open) return;
    c->last_sent[d] = now_;
    if (!up_[static_cast<int>(c->net)][d] || rng_.chance(drop_p_)) return;  // lost on the wire
    Time at = std::max(c->last_at[d], now_ + rng_.range(1, max_delay_));
    c->last_at[d] = at;
    c->q[d].push_back({t, epoch, at});
  }
  std::optional<Msg> recv(const std::shared_ptr<Conn>& c, Dir d) {
    if (!c || !c->open || c->q[d].empty() || c->q[d].front().at > now_) return std::nullopt;
    Msg m = c->q[d].front();
    c->q[d].pop_front();
    c->heard[d] = now_;
    if (m.type != MsgType::Heartbeat && m.type != MsgType::Commit && m.type != MsgType::Ack)
      log("session {:x}: {} -> {}: {}", c->sid, d == ToS ? "P" : "S", d == ToS ? "S" : "P", name(m.type));
    return m;
  }
  // Whether a fresh connection from P reaches S on network n (a Resolve, an OpenSession).
  bool reachable(Net n) const { return up_[static_cast<int>(n)][ToS] && up_[static_cast<int>(n)][ToP]; }
  bool s_answers() const { return s_host_alive_ && s_ftd_alive_ && now_ >= s_stalled_until_; }

  // ----- host P: QEMU, guard, primary ftd ----------------------------------------------------
  enum class Guest { Running, Paused, Dead };
  Guest qemu_ = Guest::Running;
  bool p_host_alive_ = true, p_ftd_alive_ = true;
  Time p_stalled_until_ = 0;
  bool guard_armed_ = false;
  Time guard_watchdog_ = 0;  // 0: fences only on ftd death
  Time last_ping_ = 0;

  // One replication session of the primary.
  struct PSess {
    uint64_t sid = 0;
    std::shared_ptr<Conn> data, second;
    enum class Phase { Syncing, Protected, Settling } phase = Phase::Syncing;
    Time sync_done = 0;
    uint64_t inflight = 0;
    bool commit_sent = false;
    Time last_cut = 0;
    Time heard_at = 0, backoff = 10, next_try = 0, resolve_due = 0;
    bool resolve_pending = false, resolve_reached = false;
    Net resolve_net = Net::A;
  };
  std::unique_ptr<PSess> ps_;
  enum class PMode { Session, Alone, Fenced, Lost };  // Alone: unprotected, output passes through
  PMode pmode_ = PMode::Session;
  Time next_connect_ = 0;
  uint64_t next_sid_ = 1;
  uint64_t epoch_ = 0, acked_ = 0;  // epochs count on across sessions (outputs are tagged with them)
  uint64_t released_max_ = 0;       // newest epoch whose output left the primary
  uint64_t sessions_opened_ = 0, activations_ = 0;

  void kill_qemu(const std::string& why) {
    if (qemu_ == Guest::Dead) return;
    qemu_ = Guest::Dead;
    log("primary QEMU dies: {}", why);
    if (lease_holder_ == 0) lease_holder_ = -1;  // sanlock: the lease of a dead pid is free at once
  }
  void close_primary_conns() {
    if (!ps_) return;
    if (ps_->data) ps_->data->open = false;
    if (ps_->second) ps_->second->open = false;
  }
  void kill_primary_ftd() {
    if (!p_ftd_alive_) return;
    p_ftd_alive_ = false;
    log("primary ftd dies");
    if (guard_armed_) kill_qemu("the guard fences: its ftd died");  // pipe EOF
    guard_armed_ = false;
    close_primary_conns();
    ps_.reset();
  }
  void restart_primary_ftd() {
    if (!p_host_alive_ || p_ftd_alive_) return;
    p_ftd_alive_ = true;
    // The restarted ftd re-attaches to a QEMU that still runs (issue 11) and protects it again.
    pmode_ = qemu_ == Guest::Dead ? PMode::Lost : PMode::Alone;
    next_connect_ = now_;
    log("primary ftd restarted ({})", qemu_ == Guest::Dead ? "its QEMU is gone" : "re-attaches to its running QEMU");
  }
  void kill_primary_host(const std::string& why) {
    kill_qemu(why);
    p_ftd_alive_ = false;
    guard_armed_ = false;
    close_primary_conns();
    ps_.reset();
    p_host_alive_ = false;
    membership_changed();
  }
  void step_guard() {
    if (!p_host_alive_ || !guard_armed_ || guard_watchdog_ == 0 || qemu_ == Guest::Dead) return;
    if (now_ - last_ping_ > guard_watchdog_)
      kill_qemu(fmt::format("the guard's watchdog ({} ms without a ping)", guard_watchdog_));
  }

  // A new session: OpenSession over network A (the standby ftd must answer; claim refuses it
  // while a twin of the VM runs or resumes there), then a full sync while the guest runs.
  void open_session() {
    const uint64_t sid = next_sid_++;
    if (!(reachable(Net::A) && s_answers())) return;
    if (twin_live()) {
      log("OpenSession {:x} refused: the VM already failed over to S", sid);
      return;
    }
    // claim: a new session from the same primary replaces the old ones (paused twins dropped).
    for (auto& ss : ss_)
      if (ss->open) close_standby_session(*ss, "replaced by a new session from the same primary");
    auto p = std::make_unique<PSess>();
    p->sid = sid;
    p->data = connect(Net::A, sid);
    p->second = connect(Net::B, sid);
    p->sync_done = now_ + rng_.range(50, 1500);
    p->phase = PSess::Phase::Syncing;
    auto s = std::make_unique<SSess>();
    s->sid = sid;
    s->data = p->data;
    s->second = p->second;
    s->last_poll = now_;
    ss_.push_back(std::move(s));
    ps_ = std::move(p);
    pmode_ = PMode::Session;
    sessions_opened_++;
    log("session {:x} opened: full sync until {}", sid, ps_->sync_done);
  }

  void release_up_to(uint64_t e) {
    if (e <= released_max_) return;
    released_max_ = e;
    for (auto& ss : ss_)
      if (ss->twin == Twin::Running && e > ss->twin_epoch)
        violate(fmt::format("I2: output of epoch {} left the primary while the twin of session {:x} runs from epoch {}", e,
                            ss->sid, ss->twin_epoch));
  }

  void step_primary() {
    last_ping_ = now_;
    switch (pmode_) {
      case PMode::Session: primary_session(); break;
      case PMode::Alone:
        if (qemu_ == Guest::Dead) {
          pmode_ = PMode::Lost;
          break;
        }
        if (qemu_ == Guest::Running) release_up_to(epoch_ + 1);  // pass-through: the open epoch's output
        if (!o_.legacy && now_ >= next_connect_ && qemu_ == Guest::Running) {
          next_connect_ = now_ + 1000;  // --reconnect-interval-ms
          open_session();
        }
        break;
      default: break;
    }
  }

  Time standby_silence() const {
    Time s = INT64_MAX;
    if (ps_->data && ps_->data->open) s = std::min(s, now_ - ps_->data->heard[ToP]);
    if (ps_->second && ps_->second->open) s = std::min(s, now_ - ps_->second->heard[ToP]);
    return s;
  }

  void primary_session() {
    auto& p = *ps_;
    if (p.phase == PSess::Phase::Settling) return primary_settling();
    if (qemu_ == Guest::Dead) {  // pidfd: QEMU exited
      send(p.data, ToS, MsgType::PrimaryLost);
      send(p.second, ToS, MsgType::PrimaryLost);
      pmode_ = PMode::Lost;
      guard_armed_ = false;
      log("primary: QEMU died: PrimaryLost sent");
      return;
    }
    for (auto* c : {&p.data, &p.second}) {
      while (auto m = recv(*c, ToP)) {
        switch (m->type) {
          case MsgType::Ack:
            if (m->epoch == p.inflight) {
              p.inflight = 0;
              acked_ = std::max(acked_, m->epoch);
              release_up_to(m->epoch);
            }
            break;
          case MsgType::Suspect: return link_failed("Suspect from the standby");
          case MsgType::Error: return link_failed("Error from the standby");
          case MsgType::Takeover:
            kill_qemu("Takeover from the standby");
            pmode_ = PMode::Fenced;
            return;
          default: break;
        }
      }
    }
    if (!p.data->open) return link_failed("data connection failed");
    if (p.second && !p.second->open) p.second.reset();
    const Time silent = standby_silence();
    if (o_.legacy ? (silent > 3 * T_.count()) : fo::standby_presumed_lost(ms(silent), T_, p.commit_sent))
      return link_failed(fmt::format("standby silent for {} ms", silent));
    if (p.phase == PSess::Phase::Syncing) {
      if (qemu_ == Guest::Running) release_up_to(epoch_ + 1);  // no checkpoint there yet: the twin cannot run
      if (silent > T_.count()) return link_failed("standby silent during the sync");
      if (now_ >= p.sync_done) p.phase = PSess::Phase::Protected;
    } else if (p.inflight == 0 && now_ - p.last_cut >= epoch_ms_ && qemu_ == Guest::Running) {
      epoch_++;  // the cut: output from now on belongs to epoch_ + 1
      p.inflight = epoch_;
      p.last_cut = now_;
      send(p.data, ToS, MsgType::Commit, epoch_);
      if (!p.commit_sent) {
        p.commit_sent = true;
        guard_armed_ = true;
        guard_watchdog_ = fo::guard_watchdog(T_, hb_).count();
      }
    }
    for (auto* c : {&p.data, &p.second})
      if (*c && now_ - (*c)->last_sent[ToS] >= hb_.count()) send(*c, ToS, MsgType::Heartbeat);
  }

  void go_alone(const std::string& why) {
    log("primary: runs alone ({})", why);
    close_primary_conns();
    ps_.reset();
    pmode_ = PMode::Alone;
    guard_armed_ = false;
    if (qemu_ == Guest::Paused) qemu_ = Guest::Running;
    release_up_to(epoch_ + 1);
    next_connect_ = now_ + 1000;
  }

  void link_failed(const std::string& why) {
    auto& p = *ps_;
    log("primary: session {:x} broken ({})", p.sid, why);
    if (o_.legacy || !fo::must_settle(p.commit_sent, false)) {
      // Legacy: the guest ran on alone at any link error. Otherwise: no checkpoint can be there.
      send(p.data, ToS, MsgType::Disable);
      send(p.second, ToS, MsgType::Disable);
      return go_alone(o_.legacy ? "legacy: at once" : "nothing was committed in this session");
    }
    const Time silent = std::min<Time>(standby_silence(), 3600 * 1000);
    p.heard_at = now_ - silent;
    if (qemu_ == Guest::Running) qemu_ = Guest::Paused;  // output stays held
    guard_watchdog_ = 0;  // armed without a watchdog: fences only on ftd death
    close_primary_conns();
    p.phase = PSess::Phase::Settling;
    p.backoff = 10;
    p.next_try = now_;
    p.resolve_pending = false;
  }

  // Resolve over A, then B. A stopped standby ftd accepts in the kernel but answers only when it
  // runs again (within max(1 s, 2 T)); a dead one refuses at once; a cut network times out.
  void primary_settling() {
    auto& p = *ps_;
    if (qemu_ == Guest::Dead) {
      pmode_ = PMode::Lost;
      return;
    }
    if (!p.resolve_pending) {
      if (now_ < p.next_try) return;
      const Time connect_timeout = std::max<Time>(30, std::min<Time>(T_.count() / 2, fo::guard_watchdog(T_, hb_).count() / 3));
      p.resolve_pending = true;
      p.resolve_reached = false;
      for (Net n : {Net::A, Net::B})
        if (reachable(n) && s_host_alive_ && s_ftd_alive_) {
          p.resolve_net = n;
          p.resolve_reached = true;
          break;
        }
      p.resolve_due = p.resolve_reached ? now_ + 2 : now_ + connect_timeout;
      return;
    }
    if (now_ < p.resolve_due) return;
    if (p.resolve_reached) {
      const Time answer_wait = std::max<Time>(1000, 2 * T_.count());
      if (!s_answers() && now_ < p.resolve_due + answer_wait && s_host_alive_ && s_ftd_alive_) return;  // waiting
      if (s_answers() && reachable(p.resolve_net)) {
        p.resolve_pending = false;
        const cp::Verdict v = standby_resolve(p.sid);
        log("primary: Resolve {:x} answered {}", p.sid, cp::to_string(v));
        return settled(fo::primary_on_resolution(v), "Resolution");
      }
    }
    p.resolve_pending = false;
    const Time silent = now_ - p.heard_at;
    if (fo::primary_asks_arbiter(ms(silent), T_, false)) {
      const auto a = ask(true, ms(silent));
      const auto s = fo::primary_on_arbiter(a);
      if (s != fo::Settle::Retry) return settled(s, fmt::format("arbiter {}", cp::to_string(a)));
    }
    p.next_try = now_ + p.backoff;
    p.backoff = std::min<Time>(p.backoff * 2, 250);
  }

  void settled(fo::Settle s, const std::string& why) {
    if (s == fo::Settle::Fence) {
      kill_qemu("fenced while settling: " + why);
      pmode_ = PMode::Fenced;
      ps_.reset();
    } else if (s == fo::Settle::RunAlone) {
      go_alone(why);
    }
  }

  // ----- host S: standby ftd, sessions, twins ------------------------------------------------
  enum class Twin { Paused, Activating, Running, Destroyed };
  struct SSess {
    uint64_t sid = 0;
    std::shared_ptr<Conn> data, second;
    bool open = true;  // the session object lives (it let go of an activated twin)
    fo::FateCell fate;
    uint64_t committed = 0;
    Twin twin = Twin::Paused;
    uint64_t twin_epoch = 0;
    Time cont_at = 0;
    bool suspect_sent = false, data_lost = false, reported_dead = false, waiting = false;
    Time data_lost_at = 0, last_poll = 0, unwatched_since = -1;
  };
  std::vector<std::unique_ptr<SSess>> ss_;
  bool s_host_alive_ = true, s_ftd_alive_ = true;
  Time s_stalled_until_ = 0;

  bool twin_live() const {
    for (auto& ss : ss_)
      if (ss->twin == Twin::Running || ss->twin == Twin::Activating) return true;
    return false;
  }
  void close_standby_session(SSess& ss, const std::string& why) {
    if (!ss.open) return;
    ss.fate.settle(fo::Fate::Dropped);
    if (ss.twin == Twin::Paused) {
      ss.twin = Twin::Destroyed;
      log("standby: session {:x}: twin destroyed ({})", ss.sid, why);
    }
    ss.open = false;
    if (ss.data) ss.data->open = false;  // the primary sees a connection error
    if (ss.second) ss.second->open = false;
  }
  void kill_standby_ftd() {
    if (!s_ftd_alive_) return;
    s_ftd_alive_ = false;
    log("standby ftd dies");
    // Paused twins die with their ftd's sessions (a restarted ftd removes what is left); an
    // activated twin is an ordinary VM and runs on.
    for (auto& ss : ss_) close_standby_session(*ss, "standby ftd died");
  }
  void restart_standby_ftd() {
    if (!s_host_alive_) return;
    s_ftd_alive_ = true;
    log("standby ftd restarted");
  }
  void kill_standby_host(const std::string& why) {
    log("{}", why);
    kill_standby_ftd();
    s_host_alive_ = false;
    for (auto& ss : ss_)
      if (ss->twin != Twin::Destroyed) ss->twin = Twin::Destroyed;
    if (lease_holder_ == 1) lease_holder_ = -2;  // held by a dead host: frees at expiry
    membership_changed();
  }
  void kill_paused_twin() {
    for (auto& ss : ss_)
      if (ss->open && ss->twin == Twin::Paused) {
        ss->twin = Twin::Destroyed;
        log("standby: session {:x}: its paused twin was killed", ss->sid);
        // The session notices (pidfd) and ends with Error: the primary settles.
        send(ss->data, ToP, MsgType::Error);
        close_standby_session(*ss, "twin died");
      }
  }

  // The primary's Resolve, answered by the standby ftd's listener.
  cp::Verdict standby_resolve(uint64_t sid) {
    for (auto& ss : ss_)
      if (ss->sid == sid) {
        if (!ss->open) {
          if (ss->twin == Twin::Running || ss->twin == Twin::Activating) return cp::Verdict::Active;
          return cp::Verdict::Dropped;
        }
        bool dropped_now = false;
        const auto v = ss->fate.resolve(dropped_now);
        if (dropped_now) close_standby_session(*ss, "Resolve: the primary runs on alone");
        return v;
      }
    return twin_live() ? cp::Verdict::Active : cp::Verdict::Unknown;
  }

  Time primary_silence(const SSess& ss) const {
    Time s = INT64_MAX;
    if (ss.data && ss.data->open) s = std::min(s, now_ - ss.data->heard[ToS]);
    if (ss.second && ss.second->open) s = std::min(s, now_ - ss.second->heard[ToS]);
    return s;
  }

  void step_standby() {
    for (size_t i = 0; i < ss_.size(); i++)
      if (ss_[i]->open) step_standby_session(*ss_[i]);
  }

  void step_standby_session(SSess& ss) {
    if (now_ - ss.last_poll >= T_.count() && !o_.old_watch) ss.unwatched_since = now_;
    ss.last_poll = now_;
    for (auto* c : {&ss.data, &ss.second}) {
      while (auto m = recv(*c, ToS)) {
        switch (m->type) {
          case MsgType::Commit:
            if (ss.committed && m->epoch != ss.committed + 1)
              violate(fmt::format("I4: session {:x} applies epoch {} after epoch {}", ss.sid, m->epoch, ss.committed));
            ss.committed = m->epoch;
            if (ss.unwatched_since >= 0 && now_ >= ss.unwatched_since + T_.count()) ss.unwatched_since = -1;
            send(ss.data, ToP, MsgType::Ack, m->epoch);
            break;
          case MsgType::PrimaryLost:
            ss.reported_dead = true;
            if (!ss.waiting) declare_lost(ss, "PrimaryLost");
            break;
          case MsgType::Disable: close_standby_session(ss, "Disable"); break;
          default: break;
        }
        if (!ss.open) return;
      }
    }
    if (!ss.open || ss.waiting) return;
    if (ss.data && !ss.data->open && !ss.data_lost) {
      ss.data_lost = true;
      ss.data_lost_at = now_;
    }
    if (o_.legacy) {
      if (ss.data_lost || primary_silence(ss) > T_.count()) {
        if (ss.committed > 0) return declare_lost(ss, "silence (legacy: no arbiter, no Resolve)");
        return close_standby_session(ss, "nothing to resume");
      }
      return;
    }
    fo::StandbyView v;
    const Time last = std::max(ss.data ? ss.data->heard[ToS] : 0, ss.second ? ss.second->heard[ToS] : 0);
    v.silence = ms(ss.data_lost ? now_ - last : primary_silence(ss));
    v.data_path_up = !ss.data_lost;
    v.since_data_path_lost = ms(now_ - ss.data_lost_at);
    if (ss.second && ss.second->open) v.second_path_idle = ms(now_ - ss.second->heard[ToS]);
    v.has_checkpoint = ss.committed > 0;
    v.suspect_sent = ss.suspect_sent;
    v.session_open = true;
    v.watched = ss.unwatched_since < 0;
    if (v.silence < fo::suspect_after(T_)) {
      ss.suspect_sent = false;
    }
    auto a = fo::standby_next(v, T_);
    if (a == fo::StandbyAction::SendSuspect) {
      ss.suspect_sent = v.suspect_sent = true;
      send(ss.data, ToP, MsgType::Suspect);
      a = fo::standby_next(v, T_);
    }
    switch (a) {
      case fo::StandbyAction::Listen:
      case fo::StandbyAction::SendSuspect: break;
      case fo::StandbyAction::NothingToResume: return close_standby_session(ss, "silent, nothing to resume");
      case fo::StandbyAction::DropPrimaryAlive: return close_standby_session(ss, "data path lost, primary alive on the second");
      case fo::StandbyAction::DropUnwatched: return close_standby_session(ss, "silent, and this side was not watching");
      case fo::StandbyAction::AskArbiter: {
        if (ss.fate.get() != fo::Fate::Open) return;
        const auto ans = ask(false, v.silence);
        switch (fo::standby_on_arbiter(ans)) {
          case fo::OnSilence::Listen: break;
          case fo::OnSilence::DeclareLost: return declare_lost(ss, fmt::format("silent {} ms, arbiter yes", v.silence.count()));
          case fo::OnSilence::DropThisSide: return close_standby_session(ss, "arbiter: this side lost");
        }
        break;
      }
    }
  }

  void declare_lost(SSess& ss, const std::string& why, bool forced = false) {
    const auto r = o_.legacy ? (ss.committed > 0 && ss.fate.settle(fo::Fate::Activating) ? fo::Resume::Activate
                                                                                        : fo::Resume::NothingToResume)
                             : fo::standby_resume(ss.committed > 0, manual_, forced, ss.fate);
    switch (r) {
      case fo::Resume::Activate: return activate(ss, why);
      case fo::Resume::WaitForOperator:
        ss.waiting = true;
        log("standby: session {:x}: primary lost ({}); failover=manual: waiting for the operator", ss.sid, why);
        return;
      case fo::Resume::Drop:
      case fo::Resume::NothingToResume: return close_standby_session(ss, "not resuming: " + why);
    }
  }

  void activate(SSess& ss, const std::string& why) {
    send(ss.data, ToP, MsgType::Takeover);
    send(ss.second, ToP, MsgType::Takeover);
    ss.twin = Twin::Activating;
    ss.twin_epoch = ss.committed;
    ss.cont_at = now_ + rng_.range(20, 500);  // load device state, verify, cont
    activations_++;
    log("standby: session {:x}: activating the twin from epoch {} ({})", ss.sid, ss.committed, why);
    if (acked_ > ss.twin_epoch)
      violate(fmt::format("I3: the twin of session {:x} resumes epoch {} but the primary had epoch {} acknowledged",
                          ss.sid, ss.twin_epoch, acked_));
    ss.open = false;  // the session let go of the twin
    if (ss.data) ss.data->open = false;
    if (ss.second) ss.second->open = false;
    if (kind_ == ArbiterKind::Lease && lease_holder_ == -1) {  // runs_here: takes the free lease
      lease_holder_ = 1;
      lease_renewed_ = now_;
    }
  }

  // `ftctl failover --force` on the standby, for every session waiting for it. Without an
  // arbiter the operator is the arbiter: the simulated operator forces only a VM whose primary
  // copy is really gone (a person who checked); with one, at any time (the arbiter decides).
  void operator_force() {
    if (!s_answers()) return;
    for (auto& ssp : ss_) {
      auto& ss = *ssp;
      if (!ss.open || !ss.waiting) continue;
      if (!ss.reported_dead && primary_silence(ss) < T_.count()) {
        log("operator: force refused: the primary of session {:x} is heard", ss.sid);
        continue;
      }
      if (kind_ == ArbiterKind::None && qemu_ != Guest::Dead) continue;
      if (!ss.reported_dead) {
        if (ss.unwatched_since >= 0) {
          close_standby_session(ss, "force: this side was not watching");
          continue;
        }
        const auto a = ask(false, ms(std::min<Time>(primary_silence(ss), 3600 * 1000)), true);
        if (a == cp::ArbiterAnswer::Fence) {
          close_standby_session(ss, "force: the arbiter says this side lost");
          continue;
        }
        if (a != cp::ArbiterAnswer::Yes) continue;  // Wait: the operator retries later
      }
      ss.waiting = false;
      declare_lost(ss, "ftctl failover --force", true);
    }
  }

  void step_twins() {
    for (auto& ssp : ss_) {
      auto& ss = *ssp;
      if (ss.twin == Twin::Activating && now_ >= ss.cont_at && s_host_alive_) {
        ss.twin = Twin::Running;
        log("standby: twin of session {:x} runs (epoch {})", ss.sid, ss.twin_epoch);
        if (released_max_ > ss.twin_epoch)
          violate(fmt::format("I2: the twin of session {:x} runs from epoch {} but output of epoch {} already left the "
                              "primary", ss.sid, ss.twin_epoch, released_max_));
      }
    }
  }

  // ----- arbiters ----------------------------------------------------------------------------
  std::unique_ptr<cp::Arbiter> none_;
  bool arb_up_[2] = {true, true};  // P, S reach the witness / fence device / shared storage
  Time fence_lands_[2] = {0, 0};   // fence: [target] when the shot lands (0 = none issued)
  Time membership_settles_ = 0;    // quorum: membership settles this long after a change
  int lease_holder_ = 0;           // lease: 0 = P, 1 = S, -1 = free, -2 = held by a dead host
  Time lease_renewed_ = 0;
  static constexpr Time kLeaseExpiry = 4000, kLeaseRenew = 500, kLeaseKillMargin = 1000;

  void membership_changed() {
    if (kind_ == ArbiterKind::Quorum) membership_settles_ = now_ + rng_.range(1000, 3000);
  }
  void arbiter_tick() {
    for (int t = 0; t < 2; t++)
      if (fence_lands_[t] && now_ >= fence_lands_[t]) {
        fence_lands_[t] = 0;
        if (t == 0 && p_host_alive_) kill_primary_host("fenced: host P powered off by the standby's arbiter");
        else if (t == 1 && s_host_alive_) kill_standby_host("fenced: host S powered off by the primary's arbiter");
      }
    if (kind_ != ArbiterKind::Lease) return;
    // sanlock: the holder's host renews while it reaches the storage; a holder that cannot renew
    // has its VM copy killed before the lease expires (sanlock's kill + the host watchdog).
    if (lease_holder_ == 0 || lease_holder_ == 1) {
      const bool host_ok = lease_holder_ == 0 ? p_host_alive_ : s_host_alive_;
      if (host_ok && arb_up_[lease_holder_]) {
        if (now_ - lease_renewed_ >= kLeaseRenew) lease_renewed_ = now_;
      } else if (host_ok && now_ - lease_renewed_ >= kLeaseExpiry - kLeaseKillMargin) {
        if (lease_holder_ == 0) kill_qemu("sanlock: lease renewal failed");
        else
          for (auto& ss : ss_)
            if (ss->twin == Twin::Running || ss->twin == Twin::Activating) {
              ss->twin = Twin::Destroyed;
              log("sanlock: the twin is killed: lease renewal failed");
            }
        lease_holder_ = -2;
      }
    }
  }
  bool lease_free() const { return lease_holder_ == -1 || (lease_holder_ != 1 && now_ - lease_renewed_ >= kLeaseExpiry); }

  // `primary`: may_run_alone from P, else may_activate from S.
  cp::ArbiterAnswer ask(bool primary, ms silent, bool forced = false) {
    const int self = primary ? 0 : 1, other = 1 - self;
    switch (kind_) {
      case ArbiterKind::None: {
        cp::ArbiterSubject s{"vm", "peer", silent, T_};
        s.heartbeat_timeout = T_;
        s.forced = forced;
        if (o_.old_no_arbiter && !primary) return cp::ArbiterAnswer::Yes;  // before the 1.5 T bound
        return primary ? none_->may_run_alone(s, ms(0)) : none_->may_activate(s, ms(0));
      }
      case ArbiterKind::Fence: {
        const bool other_dead = other == 0 ? !p_host_alive_ : !s_host_alive_;
        if (other_dead) return cp::ArbiterAnswer::Yes;
        if (!arb_up_[self]) return cp::ArbiterAnswer::Wait;  // fence device unreachable
        if (!fence_lands_[other]) {
          fence_lands_[other] = now_ + rng_.range(100, 2000);
          log("fence: {} fences host {} (lands at {})", primary ? "P" : "S", other == 0 ? "P" : "S", fence_lands_[other]);
        }
        return cp::ArbiterAnswer::Wait;
      }
      case ArbiterKind::Quorum: {
        if (now_ < membership_settles_) return cp::ArbiterAnswer::Wait;
        const bool alive[2] = {p_host_alive_, s_host_alive_};
        const bool together = alive[0] && alive[1] && reachable(Net::A);  // the ring runs on network A
        const bool w[2] = {alive[0] && arb_up_[0], alive[1] && arb_up_[1]};
        bool quorate;
        if (together) quorate = w[self] || w[other];
        else if (w[self] && w[other]) quorate = self == 0;  // ffsplit: the lower node id wins
        else quorate = w[self];
        if (!quorate) return cp::ArbiterAnswer::Fence;
        return together ? cp::ArbiterAnswer::Wait : cp::ArbiterAnswer::Yes;
      }
      case ArbiterKind::Lease: {
        if (!arb_up_[self]) return cp::ArbiterAnswer::Wait;  // storage unreachable
        if (lease_holder_ == self) {
          return cp::ArbiterAnswer::Yes;
        }
        if (lease_free()) {
          lease_holder_ = self;
          lease_renewed_ = now_;
          log("lease: {} acquires the VM's lease", primary ? "P" : "S");
          return cp::ArbiterAnswer::Yes;
        }
        return primary ? cp::ArbiterAnswer::Fence : cp::ArbiterAnswer::Wait;  // the other side holds it
      }
    }
    return cp::ArbiterAnswer::Wait;
  }

  // ----- invariants --------------------------------------------------------------------------
  void check() {
    int running = p_host_alive_ && qemu_ == Guest::Running ? 1 : 0;
    if (s_host_alive_)
      for (auto& ss : ss_) running += ss->twin == Twin::Running ? 1 : 0;
    if (running > 1) violate(fmt::format("I1: {} copies run", running));
  }
  void violate(const std::string& what) {
    if (violation_.empty()) {
      violation_ = fmt::format("t={} ms: {}", now_, what);
      log("VIOLATION {}", what);
    }
  }
  template <typename... A>
  void log(fmt::format_string<A...> f, A&&... a) {
    if (o_.verbose) trace_.push_back(fmt::format("{:>6} ms  {}", now_, fmt::format(f, std::forward<A>(a)...)));
  }

  Rng rng_;
  uint64_t seed_;
  Options o_;
  Time now_ = 0;
  ms T_, hb_;
  Time epoch_ms_;
  ArbiterKind kind_;
  bool manual_;
  std::vector<std::shared_ptr<Conn>> conns_;
  std::vector<Fault> faults_;
  std::string fault_text_;
  std::string violation_;
  std::vector<std::string> trace_;
};

}  // namespace

namespace {

int usage(const char* why) {
  if (why) std::fprintf(stderr, "ftvm_sim: %s\n", why);
  std::fprintf(stderr,
               "usage: ftvm_sim [--seeds COUNT] [--first-seed N] [--seed N] [--arbiter none|fence|quorum|lease | --arbiters LIST]\n"
               "                [--duration-ms MS] [--legacy | --old-no-arbiter | --old-watch] [--expect-violation] [-v]\n"
               "Runs COUNT seeds (default 1000) from N (default 1) of the deterministic failover simulation and\n"
               "checks its invariants after every simulated millisecond. --seed N replays one seed with a trace.\n"
               "--legacy uses the rules from before the split-brain work, --old-no-arbiter the no-arbiter standby\n"
               "before the simulation found its stall bug (Yes on any silence), --old-watch the standby without the\n"
               "'watched' rule (StandbyView::watched); with --expect-violation the run passes\n"
               "only if the simulation finds a violation (proof that it can). Exit: 0 ok, 1 violation, 2 usage.\n");
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  bool single = false;
  try {
    for (int i = 1; i < argc; i++) {
      const std::string a = argv[i];
      auto value = [&]() -> std::string {
        if (i + 1 >= argc) throw std::invalid_argument(a + " needs a value");
        return argv[++i];
      };
      if (a == "--seeds") o.seeds = std::stoull(value());
      else if (a == "--first-seed") o.first_seed = std::stoull(value());
      else if (a == "--seed") {
        o.first_seed = std::stoull(value());
        o.seeds = 1;
        single = true;
        o.verbose = true;
      } else if (a == "--arbiter") {
        const auto v = value();
        if (v == "none") o.arbiter = ArbiterKind::None;
        else if (v == "fence") o.arbiter = ArbiterKind::Fence;
        else if (v == "quorum") o.arbiter = ArbiterKind::Quorum;
        else if (v == "lease") o.arbiter = ArbiterKind::Lease;
        else throw std::invalid_argument("--arbiter '" + v + "' is not one of none, fence, quorum, lease");
      } else if (a == "--arbiters") {
        o.draw_from.clear();
        std::string v = value() + ",";
        for (size_t at = 0, c; (c = v.find(',', at)) != std::string::npos; at = c + 1) {
          const auto k = v.substr(at, c - at);
          if (k == "none") o.draw_from.push_back(ArbiterKind::None);
          else if (k == "fence") o.draw_from.push_back(ArbiterKind::Fence);
          else if (k == "quorum") o.draw_from.push_back(ArbiterKind::Quorum);
          else if (k == "lease") o.draw_from.push_back(ArbiterKind::Lease);
          else throw std::invalid_argument("--arbiters: '" + k + "' is not one of none, fence, quorum, lease");
        }
      } else if (a == "--duration-ms") o.duration = std::stoll(value());
      else if (a == "--legacy") o.legacy = true;
      else if (a == "--old-no-arbiter") o.old_no_arbiter = true;
      else if (a == "--old-watch") o.old_watch = true;
      else if (a == "--expect-violation") o.expect_violation = true;
      else if (a == "-v") o.verbose = true;
      else if (a == "-h" || a == "--help") return usage(nullptr), 0;
      else throw std::invalid_argument("unknown argument '" + a + "'");
    }
  } catch (const std::exception& e) {
    return usage(e.what());
  }
  if (o.duration < 6000) return usage("--duration-ms must be at least 6000 (faults are drawn up to 4 s before the end)");
  if (o.draw_from.empty()) return usage("--arbiters needs at least one arbiter");
  const auto t0 = std::chrono::steady_clock::now();
  uint64_t bad = 0, shown = 0, first_bad = 0, failovers = 0, sessions = 0;
  for (uint64_t seed = o.first_seed; seed < o.first_seed + o.seeds; seed++) {
    World w(seed, o);
    const auto v = w.run();
    failovers += w.activations();
    sessions += w.sessions();
    if (single || (!v.empty() && o.verbose)) {
      for (const auto& l : w.trace()) std::printf("%s\n", l.c_str());
    }
    if (v.empty()) {
      if (single) std::printf("%s\nno violation\n", w.describe().c_str());
      continue;
    }
    if (!bad) first_bad = seed;
    bad++;
    if (shown++ < 10)
      std::printf("VIOLATION %s\n  %s\n  replay: ftvm_sim --seed %llu%s%s\n", v.c_str(), w.describe().c_str(),
                  static_cast<unsigned long long>(seed), o.legacy ? " --legacy" : "",
                  o.arbiter ? (std::string(" --arbiter ") + name(*o.arbiter)).c_str() : "");
  }
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("%llu seeds (%llu..%llu), %s rules, arbiter %s: %llu with a violation; %llu sessions, %llu "
              "failovers; %.1f s\n",
              static_cast<unsigned long long>(o.seeds), static_cast<unsigned long long>(o.first_seed),
              static_cast<unsigned long long>(o.first_seed + o.seeds - 1), o.legacy ? "legacy" : "current",
              o.arbiter ? name(*o.arbiter) : "drawn per seed", static_cast<unsigned long long>(bad),
              static_cast<unsigned long long>(sessions), static_cast<unsigned long long>(failovers), secs);
  if (o.expect_violation) {
    if (bad) {
      std::printf("expected: the simulation finds violations of these rules (first seed %llu)\n",
                  static_cast<unsigned long long>(first_bad));
      return 0;
    }
    std::printf("FAIL: no violation found although one was expected\n");
    return 1;
  }
  return bad ? 1 : 0;
}
