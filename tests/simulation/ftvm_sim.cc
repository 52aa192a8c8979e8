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
enum class MsgType { Commit, Ack, Heartbeat, Suspect, Takeover, PrimaryLost, Disable };
const char* name(MsgType t) {
  switch (t) {
    case MsgType::Commit: return "Commit";
    case MsgType::Ack: return "Ack";
    case MsgType::Heartbeat: return "Heartbeat";
    case MsgType::Suspect: return "Suspect";
    case MsgType::Takeover: return "Takeover";
    case MsgType::PrimaryLost: return "PrimaryLost";
    case MsgType::Disable: return "Disable";
  }
  return "?";
}
struct Msg {
  MsgType type;
  uint64_t epoch = 0;
  Time at = 0;  // delivery time
};

enum class ArbiterKind { None, Fence, Quorum };
const char* name(ArbiterKind k) {
  switch (k) {
    case ArbiterKind::None: return "none";
    case ArbiterKind::Fence: return "fence";
    case ArbiterKind::Quorum: return "quorum";
  }
  return "?";
}

struct Options {
  uint64_t first_seed = 1, seeds = 1000;
  bool legacy = false, verbose = false, expect_violation = false;
  bool old_no_arbiter = false;  // the no-arbiter standby as it was: Yes on any silence
  bool old_watch = false;       // the standby as it was: no StandbyView::watched rule
  std::optional<ArbiterKind> arbiter;  // default: drawn per seed
  Time duration = 12000;
};

class World;

// A connection: one per path, both ends in one object. `open[end]` is false once that end saw
// it fail (reset, or closed by its owner); frames on a cut direction are lost.
struct Conn {
  Net net;
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
    kind_ = o.arbiter ? *o.arbiter : static_cast<ArbiterKind>(rng_.range(0, 2));
    manual_ = false;
    if (kind_ == ArbiterKind::None) none_ = cp::make_no_arbiter(2 * T_);
    draw_faults();
  }

  // Runs the seed; returns the first violation ("" = none).
  std::string run() {
    open_session();
    for (now_ = 1; now_ <= o_.duration && violation_.empty(); now_++) {
      apply_faults();
      arbiter_tick();
      step_guard();
      if (p_ftd_alive_ && now_ >= p_stalled_until_) step_primary();
      if (s_ftd_alive_ && now_ >= s_stalled_until_) step_standby();
      step_twin();
      check();
    }
    return violation_;
  }
  const std::vector<std::string>& trace() const { return trace_; }
  std::string describe() const {
    return fmt::format("seed {}: arbiter {}, T {} ms, epoch {} ms{}; faults: {}", seed_, name(kind_), T_.count(),
                       epoch_ms_, o_.legacy ? ", legacy rules" : "", fault_text_);
  }

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
  void draw_faults() {
    const int n = static_cast<int>(rng_.range(1, 3));
    bool network_fault_drawn = false;
    for (int i = 0; i < n; i++) {
      const Time at = rng_.range(300, o_.duration - 4000);
      const Time len = draw_len();
      int f = static_cast<int>(rng_.range(0, 15));
      // Without an arbiter a partition between two live hosts (both ways or one way, on every
      // network) runs two copies by design (documented: "split-brain unprotected"): those
      // faults are drawn only with an arbiter.
      // Two network-down faults may overlap into the same partition: one per seed without one.
      while (kind_ == ArbiterKind::None && !o_.legacy && (f <= 3 || (f == 6 && network_fault_drawn)))
        f = 4 + static_cast<int>(rng_.range(0, 11));
      if (f == 6) network_fault_drawn = true;
      switch (f) {
        case 0: add(at, len, "partition-all-both", [](World& w) { w.cut_all(true, true); }, [](World& w) { w.cut_all(false, true); }); break;
        case 1: add(at, len, "partition-all-to-standby", [](World& w) { w.cut_all(true, false, ToS); }, [](World& w) { w.cut_all(false, false, ToS); }); break;
        case 2: add(at, len, "partition-all-to-primary", [](World& w) { w.cut_all(true, false, ToP); }, [](World& w) { w.cut_all(false, false, ToP); }); break;
        case 3: {
          // Both networks cut, with the arbiter's links cut differently (the minority side).
          const bool p_side = rng_.chance(0.5);
          add(at, len, p_side ? "partition-all-both+primary-isolated" : "partition-all-both+standby-isolated",
              [p_side](World& w) { w.cut_all(true, true); w.arb_up_[p_side ? 0 : 1] = false; },
              [p_side](World& w) { w.cut_all(false, true); w.arb_up_[p_side ? 0 : 1] = true; });
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
        case 12: add(at, 0, "kill-primary-ftd", [](World& w) { w.kill_primary_ftd(); }); break;
        case 13: add(at, 0, "kill-primary-host", [](World& w) { w.kill_primary_host("host P powered off"); }); break;
        case 14: add(at, len, "restart-standby-ftd", [](World& w) { w.kill_standby_ftd(); }, [](World& w) { w.s_ftd_alive_ = true; }); break;
        case 15: add(at, 0, "kill-standby-host", [](World& w) { w.kill_standby_host("host S powered off"); }); break;
      }
    }
    std::sort(faults_.begin(), faults_.end(), [](const Fault& a, const Fault& b) { return a.at < b.at; });
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
    for (auto* c : {data_.get(), second_.get()})
      if (c && c->net == n && c->open) {
        c->open = false;
        log("reset of the connection on network {}", n == Net::A ? "A" : "B");
      }
  }
  void send(Conn* c, Dir d, MsgType t, uint64_t epoch = 0) {
    if (!c || !c->open) return;
    c->last_sent[d] = now_;
    if (!up_[static_cast<int>(c->net)][d] || rng_.chance(drop_p_)) return;  // lost on the wire
    Time at = std::max(c->last_at[d], now_ + rng_.range(1, max_delay_));
    c->last_at[d] = at;
    c->q[d].push_back({t, epoch, at});
  }
  // Frames due for the end that receives direction `d`.
  std::optional<Msg> recv(Conn* c, Dir d) {
    if (!c || !c->open || c->q[d].empty() || c->q[d].front().at > now_) return std::nullopt;
    Msg m = c->q[d].front();
    c->q[d].pop_front();
    c->heard[d] = now_;
    if (m.type != MsgType::Heartbeat && (m.type != MsgType::Commit && m.type != MsgType::Ack))
      log("{} -> {}: {}", d == ToS ? "P" : "S", d == ToS ? "S" : "P", name(m.type));
    return m;
  }
  // Whether a fresh connection from P reaches S on network n (a Resolve) right now.
  bool reachable(Net n) const { return up_[static_cast<int>(n)][ToS] && up_[static_cast<int>(n)][ToP]; }

  // ----- host P: QEMU, guard, primary session ------------------------------------------------
  enum class Guest { Running, Paused, Dead };
  Guest qemu_ = Guest::Running;
  bool p_ftd_alive_ = true;
  Time p_stalled_until_ = 0;
  bool guard_armed_ = false;
  Time guard_watchdog_ = 0;  // 0: fences only on ftd death
  Time last_ping_ = 0;
  enum class PState { Protected, Settling, Alone, Fenced, Lost };
  PState ps_ = PState::Protected;
  std::unique_ptr<Conn> data_, second_;
  uint64_t epoch_ = 0, inflight_ = 0, acked_ = 0;
  Time last_cut_ = 0;
  bool commit_sent_ = false;
  bool running_alone_ = false;
  uint64_t released_max_ = 0;       // newest epoch whose output left the primary
  bool released_alone_ = false;      // output left in pass-through (the twin must never run)
  // Settling
  Time heard_at_ = 0, backoff_ = 10, next_try_ = 0;
  Time resolve_done_ = 0;  // a Resolve in flight answers at this time (0 = none)
  Net resolve_net_ = Net::A;

  void kill_qemu(const std::string& why) {
    if (qemu_ == Guest::Dead) return;
    qemu_ = Guest::Dead;
    log("primary QEMU dies: {}", why);
  }
  void kill_primary_ftd() {
    if (!p_ftd_alive_) return;
    p_ftd_alive_ = false;
    log("primary ftd dies");
    if (guard_armed_) kill_qemu("the guard fences: its ftd died");  // pipe EOF
    if (data_) data_->open = false;
    if (second_) second_->open = false;
  }
  void kill_primary_host(const std::string& why) {
    kill_qemu(why);
    p_ftd_alive_ = false;
    guard_armed_ = false;
    if (data_) data_->open = false;
    if (second_) second_->open = false;
    p_host_alive_ = false;
    membership_changed();
  }
  bool p_host_alive_ = true, s_host_alive_ = true;

  void step_guard() {
    if (!p_host_alive_ || !guard_armed_ || guard_watchdog_ == 0 || qemu_ == Guest::Dead) return;
    if (now_ - last_ping_ > guard_watchdog_) kill_qemu(fmt::format("the guard's watchdog ({} ms without a ping)", guard_watchdog_));
  }

  void open_session() {
    data_ = std::make_unique<Conn>();
    data_->net = Net::A;
    second_ = std::make_unique<Conn>();
    second_->net = Net::B;
    last_ping_ = 0;
  }

  // Output: a running guest writes a frame most milliseconds, tagged with the open epoch. Held
  // frames leave as soon as the rules allow; each release is checked against the twin.
  uint64_t held_from_ = 0;  // frames of epochs >= this are held (the open epoch and unacked ones)
  void release_up_to(uint64_t e, bool alone) {
    if (e > released_max_ || alone) {
      if (alone) released_alone_ = true;
      released_max_ = std::max(released_max_, e);
      if (twin_ == Twin::Running && (alone || e > twin_epoch_))
        violate(fmt::format("I2: output of epoch {} left the primary{} while the twin runs from epoch {}", e,
                            alone ? " (running alone)" : "", twin_epoch_));
    }
  }

  void ping() { last_ping_ = now_; }

  void step_primary() {
    ping();
    switch (ps_) {
      case PState::Protected: primary_protected(); break;
      case PState::Settling: primary_settling(); break;
      case PState::Alone:
        if (qemu_ == Guest::Running) release_up_to(epoch_ + 1, true);
        break;
      default: break;
    }
  }

  Time standby_silence() const {
    Time s = INT64_MAX;
    if (data_ && data_->open) s = std::min(s, now_ - data_->heard[ToP]);
    if (second_ && second_->open) s = std::min(s, now_ - second_->heard[ToP]);
    return s;
  }

  void primary_protected() {
    if (qemu_ == Guest::Dead) {  // pidfd: QEMU exited
      send(data_.get(), ToS, MsgType::PrimaryLost);
      send(second_.get(), ToS, MsgType::PrimaryLost);
      ps_ = PState::Lost;
      guard_armed_ = false;
      log("primary: QEMU died: PrimaryLost sent");
      return;
    }
    // Inbound frames.
    for (Conn* c : {data_.get(), second_.get()}) {
      while (auto m = recv(c, ToP)) {
        switch (m->type) {
          case MsgType::Ack:
            if (m->epoch == inflight_) {
              inflight_ = 0;
              acked_ = m->epoch;
              release_up_to(acked_, false);
            }
            break;
          case MsgType::Suspect: return settle("Suspect from the standby");
          case MsgType::Takeover:
            kill_qemu("Takeover from the standby");
            ps_ = PState::Fenced;
            return;
          default: break;
        }
      }
    }
    if (!data_->open) return settle("data connection reset");
    if (second_ && !second_->open) second_.reset();
    const Time silent = standby_silence();
    if (o_.legacy ? (silent > 3 * T_.count()) : fo::standby_presumed_lost(ms(silent), T_, commit_sent_))
      return settle(fmt::format("standby silent for {} ms", silent));
    // Epoch cut: one epoch in flight at most.
    if (inflight_ == 0 && now_ - last_cut_ >= epoch_ms_ && qemu_ == Guest::Running) {
      epoch_++;
      inflight_ = epoch_;
      last_cut_ = now_;
      send(data_.get(), ToS, MsgType::Commit, epoch_);
      if (!commit_sent_) {
        commit_sent_ = true;
        guard_armed_ = true;
        guard_watchdog_ = fo::guard_watchdog(T_, hb_).count();
      }
    }
    for (Conn* c : {data_.get(), second_.get()})
      if (c && now_ - c->last_sent[ToS] >= hb_.count()) send(c, ToS, MsgType::Heartbeat);
  }

  void settle(const std::string& why) {
    log("primary: link broken ({})", why);
    if (o_.legacy) {  // before the split-brain work: the guest runs on alone at once
      ps_ = PState::Alone;
      running_alone_ = true;
      guard_armed_ = false;
      release_up_to(epoch_ + 1, true);
      return;
    }
    if (!fo::must_settle(commit_sent_, false)) {
      ps_ = PState::Alone;
      running_alone_ = true;
      release_up_to(epoch_ + 1, true);
      return;
    }
    const Time silent = std::min<Time>(standby_silence(), 3600 * 1000);
    heard_at_ = now_ - silent;
    if (qemu_ == Guest::Running) qemu_ = Guest::Paused;  // output stays held
    guard_watchdog_ = 0;  // armed without a watchdog: fences only on ftd death
    if (data_) data_->open = false;
    second_.reset();
    ps_ = PState::Settling;
    backoff_ = 10;
    next_try_ = now_;
    resolve_done_ = 0;
  }

  // The Resolve of a settling primary: a fresh connection over A, then B. A stopped standby ftd
  // accepts in the kernel but answers only when it runs again (within max(1 s, 2 T)).
  void primary_settling() {
    if (qemu_ == Guest::Dead) {
      ps_ = PState::Lost;
      return;
    }
    if (resolve_done_ == 0) {
      if (now_ < next_try_) return;
      const Time connect_timeout = std::max<Time>(30, std::min<Time>(T_.count() / 2, fo::guard_watchdog(T_, hb_).count() / 3));
      const Time answer_wait = std::max<Time>(1000, 2 * T_.count());
      std::optional<Net> via;
      for (Net n : {Net::A, Net::B})
        if (reachable(n) && s_host_alive_ && s_ftd_alive_) {
          via = n;
          break;
        }
      if (!via) {
        resolve_done_ = -(now_ + connect_timeout);  // fails after the connect timeout
      } else {
        resolve_net_ = *via;
        const Time ready = std::max(now_ + 2, s_stalled_until_ + 1);
        resolve_done_ = ready <= now_ + answer_wait ? ready : -(now_ + answer_wait);
      }
      return;
    }
    const Time due = resolve_done_ < 0 ? -resolve_done_ : resolve_done_;
    if (now_ < due) return;
    const bool answered = resolve_done_ > 0 && reachable(resolve_net_) && s_ftd_alive_ && now_ >= s_stalled_until_;
    resolve_done_ = 0;
    if (answered) {
      const cp::Verdict v = standby_resolve();
      log("primary: Resolve answered {}", cp::to_string(v));
      return settled(fo::primary_on_resolution(v), "Resolution");
    }
    const Time silent = now_ - heard_at_;
    if (fo::primary_asks_arbiter(ms(silent), T_, false)) {
      const auto a = ask(true, ms(silent));
      const auto s = fo::primary_on_arbiter(a);
      if (s != fo::Settle::Retry) return settled(s, fmt::format("arbiter {}", cp::to_string(a)));
    }
    next_try_ = now_ + backoff_;
    backoff_ = std::min<Time>(backoff_ * 2, 250);
  }

  void settled(fo::Settle s, const std::string& why) {
    if (s == fo::Settle::Fence) {
      kill_qemu("fenced while settling: " + why);
      ps_ = PState::Fenced;
    } else if (s == fo::Settle::RunAlone) {
      log("primary: runs alone ({})", why);
      ps_ = PState::Alone;
      running_alone_ = true;
      guard_armed_ = false;
      if (qemu_ == Guest::Paused) qemu_ = Guest::Running;
      release_up_to(epoch_ + 1, true);
    }
  }

  // ----- host S: standby session and twin ----------------------------------------------------
  enum class Twin { Paused, Activating, Running, Destroyed };
  Twin twin_ = Twin::Paused;
  uint64_t committed_ = 0, twin_epoch_ = 0;
  Time twin_cont_at_ = 0;
  bool s_ftd_alive_ = true;
  Time s_stalled_until_ = 0;
  bool s_session_ = true;  // the session object exists (a restarted ftd has none)
  fo::FateCell fate_;
  bool suspect_sent_ = false;
  bool data_lost_ = false;
  Time data_lost_at_ = 0;
  bool reported_dead_ = false;

  void kill_standby_ftd() {
    if (!s_ftd_alive_) return;
    s_ftd_alive_ = false;
    log("standby ftd dies");
    end_standby_session("standby ftd died");  // a restarted ftd removes the paused twin
  }
  void kill_standby_host(const std::string& why) {
    log("{}", why);
    s_host_alive_ = false;
    kill_standby_ftd();
    if (twin_ == Twin::Running || twin_ == Twin::Activating) twin_ = Twin::Destroyed;
    membership_changed();
  }
  void end_standby_session(const std::string& why) {
    if (twin_ == Twin::Paused) {
      twin_ = Twin::Destroyed;
      log("standby: twin destroyed ({})", why);
    }
    s_session_ = false;
    if (data_) data_->open = false;  // the standby closes its end: the primary sees an error
    if (second_) second_->open = false;
  }

  // The primary's Resolve, answered by the standby ftd (listener thread).
  cp::Verdict standby_resolve() {
    if (!s_session_) return twin_ == Twin::Running || twin_ == Twin::Activating ? cp::Verdict::Active : cp::Verdict::Unknown;
    bool dropped_now = false;
    const auto v = fate_.resolve(dropped_now);
    if (dropped_now) end_standby_session("Resolve: the primary runs on alone");
    return v;
  }

  Time primary_silence() const {
    Time s = INT64_MAX;
    if (data_ && data_->open) s = std::min(s, now_ - data_->heard[ToS]);
    if (second_ && second_->open) s = std::min(s, now_ - second_->heard[ToS]);
    return s;
  }

  Time last_poll_ = 0, unwatched_since_ = -1;  // see StandbyView::watched
  void step_standby() {
    if (!s_session_) return;
    if (now_ - last_poll_ >= T_.count() && !o_.old_watch) unwatched_since_ = now_;
    last_poll_ = now_;
    // Frames from the primary.
    for (Conn* c : {data_.get(), second_.get()}) {
      while (auto m = recv(c, ToS)) {
        switch (m->type) {
          case MsgType::Commit:
            committed_ = m->epoch;
            if (unwatched_since_ >= 0 && now_ >= unwatched_since_ + T_.count()) unwatched_since_ = -1;
            send(data_.get(), ToP, MsgType::Ack, m->epoch);
            break;
          case MsgType::PrimaryLost:
            reported_dead_ = true;
            return declare_lost("PrimaryLost");
          case MsgType::Disable: return end_standby_session("Disable");
          default: break;
        }
        if (!s_session_) return;
      }
    }
    if (data_ && !data_->open && !data_lost_) {
      data_lost_ = true;
      data_lost_at_ = now_;
      // Silence counts from the last frame on any path.
    }
    if (o_.legacy) {
      if (data_lost_ || primary_silence() > T_.count()) {
        if (committed_ > 0) return declare_lost("silence (legacy: no arbiter, no Resolve)");
        return end_standby_session("nothing to resume");
      }
      return;
    }
    fo::StandbyView v;
    const Time last = std::max(data_ ? data_->heard[ToS] : 0, second_ ? second_->heard[ToS] : 0);
    v.silence = ms(data_lost_ ? now_ - last : primary_silence());
    v.data_path_up = !data_lost_;
    v.since_data_path_lost = ms(now_ - data_lost_at_);
    if (second_ && second_->open) v.second_path_idle = ms(now_ - second_->heard[ToS]);
    v.has_checkpoint = committed_ > 0;
    v.suspect_sent = suspect_sent_;
    v.session_open = true;
    v.watched = unwatched_since_ < 0;
    if (v.silence < fo::suspect_after(T_)) suspect_sent_ = false;
    auto a = fo::standby_next(v, T_);
    if (a == fo::StandbyAction::SendSuspect) {
      suspect_sent_ = v.suspect_sent = true;
      send(data_.get(), ToP, MsgType::Suspect);
      a = fo::standby_next(v, T_);
    }
    switch (a) {
      case fo::StandbyAction::Listen:
      case fo::StandbyAction::SendSuspect: break;
      case fo::StandbyAction::NothingToResume: return end_standby_session("silent, nothing to resume");
      case fo::StandbyAction::DropPrimaryAlive: return end_standby_session("data path lost, primary alive on the second");
      case fo::StandbyAction::DropUnwatched: return end_standby_session("silent, and this side was not watching");
      case fo::StandbyAction::AskArbiter: {
        if (fate_.get() != fo::Fate::Open) return;
        const auto ans = ask(false, v.silence);
        switch (fo::standby_on_arbiter(ans)) {
          case fo::OnSilence::Listen: break;
          case fo::OnSilence::DeclareLost: return declare_lost(fmt::format("silent {} ms, arbiter yes", v.silence.count()));
          case fo::OnSilence::DropThisSide: return end_standby_session("arbiter: this side lost");
        }
        break;
      }
    }
  }

  void declare_lost(const std::string& why) {
    const auto r = o_.legacy ? (committed_ > 0 && fate_.settle(fo::Fate::Activating) ? fo::Resume::Activate
                                                                                    : fo::Resume::NothingToResume)
                             : fo::standby_resume(committed_ > 0, manual_, false, fate_);
    switch (r) {
      case fo::Resume::Activate:
        send(data_.get(), ToP, MsgType::Takeover);
        send(second_.get(), ToP, MsgType::Takeover);
        twin_ = Twin::Activating;
        twin_epoch_ = committed_;
        twin_cont_at_ = now_ + rng_.range(20, 500);  // load device state, verify, cont
        log("standby: activating the twin from epoch {} ({})", committed_, why);
        if (acked_ > twin_epoch_) violate(fmt::format("I3: the twin resumes epoch {} but the primary had epoch {} acknowledged", twin_epoch_, acked_));
        s_session_ = false;  // the session let go of the twin
        if (data_) data_->open = false;
        break;
      case fo::Resume::WaitForOperator: break;
      case fo::Resume::Drop:
      case fo::Resume::NothingToResume: end_standby_session("not resuming: " + why); break;
    }
  }

  void step_twin() {
    if (twin_ == Twin::Activating && now_ >= twin_cont_at_ && s_host_alive_) {
      twin_ = Twin::Running;
      log("standby: twin runs (epoch {})", twin_epoch_);
      if (released_alone_) violate("I2: the twin runs although the primary released output running alone");
      else if (released_max_ > twin_epoch_)
        violate(fmt::format("I2: the twin runs from epoch {} but output of epoch {} already left the primary", twin_epoch_,
                            released_max_));
    }
  }

  // ----- arbiters ----------------------------------------------------------------------------
  std::unique_ptr<cp::Arbiter> none_;
  bool arb_up_[2] = {true, true};  // P, S reach the witness / fence device
  // fence
  Time fence_lands_[2] = {0, 0};  // [target]: when the fence of that host lands (0 = none issued)
  // quorum: membership settles this long after the topology changed
  Time membership_settles_ = 0;
  void membership_changed() {
    if (kind_ == ArbiterKind::Quorum) membership_settles_ = now_ + rng_.range(1000, 3000);
  }
  void arbiter_tick() {
    for (int t = 0; t < 2; t++)
      if (fence_lands_[t] && now_ >= fence_lands_[t]) {
        fence_lands_[t] = 0;
        if (t == 0 && p_host_alive_) {
          log("fence: host P powered off");
          kill_primary_host("fenced by the standby's arbiter");
        } else if (t == 1 && s_host_alive_) {
          log("fence: host S powered off");
          kill_standby_host("fenced by the primary's arbiter");
        }
      }
  }
  bool fenced_done_[2] = {false, false};
  // `primary`: may_run_alone from P, else may_activate from S.
  cp::ArbiterAnswer ask(bool primary, ms silent) {
    const int self = primary ? 0 : 1, other = 1 - self;
    switch (kind_) {
      case ArbiterKind::None: {
        cp::ArbiterSubject s{"vm", "peer", silent, T_};
        s.heartbeat_timeout = T_;
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
        // The cluster ring runs on network A (both directions needed).
        const bool together = alive[0] && alive[1] && reachable(Net::A);
        const bool w[2] = {alive[0] && arb_up_[0], alive[1] && arb_up_[1]};
        bool quorate;
        if (together) quorate = w[self] || w[other];
        else if (w[self] && w[other]) quorate = self == 0;  // ffsplit: the lower node id wins
        else quorate = w[self];
        if (!quorate) return cp::ArbiterAnswer::Fence;
        return together ? cp::ArbiterAnswer::Wait : cp::ArbiterAnswer::Yes;
      }
    }
    return cp::ArbiterAnswer::Wait;
  }

  // ----- invariants --------------------------------------------------------------------------
  void check() {
    const bool p_runs = p_host_alive_ && qemu_ == Guest::Running;
    const bool s_runs = s_host_alive_ && twin_ == Twin::Running;
    if (p_runs && s_runs) violate("I1: two copies run (the primary QEMU and the twin)");
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
               "usage: ftvm_sim [--seeds COUNT] [--first-seed N] [--seed N] [--arbiter none|fence|quorum]\n"
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
        else throw std::invalid_argument("--arbiter '" + v + "' is not one of none, fence, quorum");
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
  const auto t0 = std::chrono::steady_clock::now();
  uint64_t bad = 0, shown = 0, first_bad = 0;
  for (uint64_t seed = o.first_seed; seed < o.first_seed + o.seeds; seed++) {
    World w(seed, o);
    const auto v = w.run();
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
  std::printf("%llu seeds (%llu..%llu), %s rules, arbiter %s: %llu with a violation; %.1f s\n",
              static_cast<unsigned long long>(o.seeds), static_cast<unsigned long long>(o.first_seed),
              static_cast<unsigned long long>(o.first_seed + o.seeds - 1), o.legacy ? "legacy" : "current",
              o.arbiter ? name(*o.arbiter) : "drawn per seed", static_cast<unsigned long long>(bad), secs);
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
