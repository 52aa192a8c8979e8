#include "checkpoint/failover.h"

#include <algorithm>

namespace ftvm::checkpoint::failover {

ms suspect_after(ms heartbeat_timeout) { return heartbeat_timeout / 2; }

ms guard_watchdog(ms heartbeat_timeout, ms heartbeat_interval) {
  const auto w = std::min(heartbeat_timeout * 8 / 10, heartbeat_timeout - 2 * heartbeat_interval);
  return std::max(w, ms(20));
}

const char* to_string(Fate f) {
  switch (f) {
    case Fate::Open: return "open";
    case Fate::Dropped: return "dropped";
    case Fate::Activating: return "activating";
  }
  return "?";
}

bool FateCell::settle(Fate f) {
  std::lock_guard<std::mutex> g(mu_);
  if (fate_ == Fate::Open) {
    fate_ = f;
    return true;
  }
  return fate_ == f;
}

Fate FateCell::get() const {
  std::lock_guard<std::mutex> g(mu_);
  return fate_;
}

Verdict FateCell::resolve(bool& dropped_now) {
  std::lock_guard<std::mutex> g(mu_);
  dropped_now = false;
  if (fate_ == Fate::Open) {
    fate_ = Fate::Dropped;
    dropped_now = true;
  }
  return fate_ == Fate::Activating ? Verdict::Active : Verdict::Dropped;
}

void FateCell::activation_failed() {
  std::lock_guard<std::mutex> g(mu_);
  fate_ = Fate::Dropped;
}

const char* to_string(StandbyAction a) {
  switch (a) {
    case StandbyAction::Listen: return "listen";
    case StandbyAction::SendSuspect: return "send-suspect";
    case StandbyAction::AskArbiter: return "ask-arbiter";
    case StandbyAction::NothingToResume: return "nothing-to-resume";
    case StandbyAction::DropPrimaryAlive: return "drop-primary-alive";
    case StandbyAction::DropUnwatched: return "drop-unwatched";
  }
  return "?";
}

StandbyAction standby_next(const StandbyView& v, ms heartbeat_timeout) {
  const ms T = heartbeat_timeout;
  if (!v.data_path_up) {
    if (v.second_path_idle && *v.second_path_idle <= T)
      return v.since_data_path_lost > 10 * T ? StandbyAction::DropPrimaryAlive : StandbyAction::Listen;
    if (v.silence < T) return StandbyAction::Listen;
    if (!v.has_checkpoint) return StandbyAction::NothingToResume;
    return v.watched ? StandbyAction::AskArbiter : StandbyAction::DropUnwatched;
  }
  if (v.silence >= suspect_after(T) && !v.suspect_sent && v.session_open)
    return StandbyAction::SendSuspect;
  if (v.silence > T) {
    if (!v.has_checkpoint) return StandbyAction::NothingToResume;
    return v.watched ? StandbyAction::AskArbiter : StandbyAction::DropUnwatched;
  }
  return StandbyAction::Listen;
}

OnSilence standby_on_arbiter(ArbiterAnswer a) {
  switch (a) {
    case ArbiterAnswer::Yes: return OnSilence::DeclareLost;
    case ArbiterAnswer::Fence: return OnSilence::DropThisSide;
    default: return OnSilence::Listen;  // Wait, and an invalid answer: never Yes by default
  }
}

Resume standby_resume(bool has_checkpoint, bool failover_manual, bool operator_forced, FateCell& fate) {
  if (!has_checkpoint) return Resume::NothingToResume;
  if (failover_manual && !operator_forced) return Resume::WaitForOperator;
  return fate.settle(Fate::Activating) ? Resume::Activate : Resume::Drop;
}

bool must_settle(bool commit_sent, bool activate_sent) { return commit_sent || activate_sent; }

bool standby_presumed_lost(ms standby_silence, ms heartbeat_timeout, bool commit_sent) {
  return commit_sent && standby_silence > suspect_after(heartbeat_timeout);
}

const char* to_string(Settle s) {
  switch (s) {
    case Settle::Retry: return "retry";
    case Settle::RunAlone: return "run-alone";
    case Settle::Fence: return "fence";
  }
  return "?";
}

Settle primary_on_resolution(Verdict v) {
  switch (v) {
    case Verdict::Active: return Settle::Fence;
    case Verdict::Dropped:
    case Verdict::Unknown: return Settle::RunAlone;
    default: return Settle::Retry;  // an invalid verdict decides nothing
  }
}

bool primary_asks_arbiter(ms silent, ms heartbeat_timeout, bool activate_sent) {
  return !activate_sent && silent >= suspect_after(heartbeat_timeout);
}

Settle primary_on_arbiter(ArbiterAnswer a) {
  switch (a) {
    case ArbiterAnswer::Yes: return Settle::RunAlone;
    case ArbiterAnswer::Fence: return Settle::Fence;
    default: return Settle::Retry;
  }
}

bool may_release_output(uint64_t epoch, uint64_t acked_epoch, bool running_alone) {
  return running_alone || epoch <= acked_epoch;
}

}  // namespace ftvm::checkpoint::failover
