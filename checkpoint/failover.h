// The failover decision: which copy of a protected VM may run, decided from what each side can
// observe (frames heard on either path, the primary's own reports, a Resolve, the arbiter's
// answer). This file holds every rule that decides between "the primary runs", "the twin runs"
// and "wait"; the sessions (tools/ftd/primary.cc, standby.cc) do the I/O around it and the
// deterministic simulation (tests/simulation/) runs these same rules under a simulated network,
// clock and arbiter. Nothing here blocks, reads a clock or does I/O: time comes in as durations.
//
// The invariant these rules keep (docs/ARCHITECTURE.md, "Split brain"): at any moment at most
// one copy of a VM executes, and no output leaves the primary unless the copy that survives
// reflects it. The argument, with T = the standby's heartbeat timeout:
//  * The standby resumes its twin only (a) from a committed checkpoint, and (b) when the primary
//    said its copy is gone (PrimaryLost, planned Activate) or has been silent on every path for
//    T and the arbiter said Yes, and (c) only if its fate was still Open: a Resolve from the
//    primary settles the fate first-come (FateCell), so the two can never both win.
//  * The primary stops its guest (pause, output held) once the standby has been silent for T/2
//    after a checkpoint could have reached it (or at the standby's Suspect, or on any link
//    error), and resumes it only after a Resolution "dropped"/"unknown" or the arbiter's Yes to
//    may_run_alone; "active" or a Takeover or the arbiter's Fence kill it.
//  * Between the primary's last ping and the standby's decision lie T: the guard kills a primary
//    QEMU whose ftd stopped pinging it for guard_watchdog() < T.
#pragma once

#include <chrono>
#include <mutex>
#include <optional>
#include <string>

#include "checkpoint/arbiter.h"
#include "checkpoint/protocol.h"

namespace ftvm::checkpoint::failover {

using ms = std::chrono::milliseconds;

// ---------------------------------------------------------------------------------------------
// Timing rules shared by both sides (T = the standby's heartbeat timeout).

// The standby asks a silent primary to settle (Suspect) after T/2; a primary that has sent a
// checkpoint treats T/2 without a frame from the standby as a broken link (it pauses and
// settles); the primary consults its arbiter only after T/2 of silence (a reset or a restarting
// standby is answered by Resolve long before).
ms suspect_after(ms heartbeat_timeout);

// What the guard's watchdog is armed with once a checkpoint may be on the standby: at most
// 0.8 T and at most T - 2 heartbeat periods (the standby acts no earlier than T after the last
// frame, which left at most one period before the last ping), at least 20 ms.
ms guard_watchdog(ms heartbeat_timeout, ms heartbeat_interval);

// ---------------------------------------------------------------------------------------------
// The standby

// A session's fate is settled exactly once: the twin is either resumed (Activating) or dropped
// for good (Dropped), whichever comes first of the session's own decision and the primary's
// Resolve. Thread-safe (the session thread decides, a listener thread answers Resolve).
enum class Fate { Open, Dropped, Activating };
const char* to_string(Fate f);

class FateCell {
 public:
  // Moves Open to `f` and returns true, or returns whether the fate already is `f`.
  bool settle(Fate f);
  Fate get() const;
  // The primary's Resolve: an Open fate becomes Dropped (`dropped_now` set: the caller ends the
  // session and destroys the twin). Returns Active for Activating, else Dropped.
  Verdict resolve(bool& dropped_now);
  // The activation failed and the twin was killed: Activating becomes Dropped, so that a later
  // Resolve lets the primary (if it lives) run on.
  void activation_failed();

 private:
  mutable std::mutex mu_;
  Fate fate_ = Fate::Open;
};

// What the standby's session thread sees at one poll.
struct StandbyView {
  ms silence{0};             // since the last frame on any path (ms::max() when none is open)
  bool data_path_up = true;  // false once the data connection failed
  ms since_data_path_lost{0};  // valid when !data_path_up
  // The second path's idle time, when there is one.
  std::optional<ms> second_path_idle;
  bool has_checkpoint = false;  // a Commit was applied: the twin holds a resumable replica
  bool suspect_sent = false;    // a Suspect went out for the current silence
  bool session_open = false;    // OpenSession handled (there is a twin and a session id)
  // False while this standby cannot vouch that it watched the primary: its session thread did
  // not poll for T or longer (SIGSTOP, a frozen or starved host), and no Commit has arrived yet
  // from at least T after it ran again (frames read right after the gap may be old ones that
  // waited in the socket). Meanwhile the primary may have settled without it and run on alone
  // (its arbiter said Yes while this side could not answer); a twin resumed now could be older
  // than output the primary released (found by the simulation: a standby ftd stopped while the
  // primary ran alone and then died resumed a stale twin).
  bool watched = true;
};

enum class StandbyAction {
  Listen,             // keep polling
  SendSuspect,        // silent for T/2: ask the primary to settle (a one-way cut reaches it)
  AskArbiter,         // silent for T with a checkpoint: may_activate(), then on_arbiter()
  NothingToResume,    // silent for T without a checkpoint: close (the twin goes)
  DropPrimaryAlive,   // the data path is gone but the primary lives on the second path, for 10 T
  DropUnwatched,      // silent for T, but this side was not watching (StandbyView::watched)
};
const char* to_string(StandbyAction a);

// The rule at one poll. Data path up: Suspect at T/2, ask at T (after the Suspect: a caller that
// gets SendSuspect sends it, sets suspect_sent and asks again in the same poll). Data path
// lost: life on the second path (idle <= T) means the primary lives: listen, and after 10 T of
// that drop the twin (the primary will settle with Resolve); otherwise silence counts from the
// last frame on any path, and at T the arbiter is asked (or, without a checkpoint, the session
// closes). A standby that was not watching never asks: it drops the twin.
StandbyAction standby_next(const StandbyView& v, ms heartbeat_timeout);

// What the standby does with the arbiter's answer to may_activate on silence.
enum class OnSilence {
  Listen,         // Wait: keep polling the paths (and ask again)
  DeclareLost,    // Yes: the primary is gone; resume the twin (failover=manual: wait for the operator)
  DropThisSide,   // Fence: this side lost; drop the twin and end the session
};
OnSilence standby_on_arbiter(ArbiterAnswer a);

// After the primary was declared lost (silence + Yes, PrimaryLost, or an operator's force):
// resume the twin only if its fate moves to Activating; a Resolve that came first wins.
enum class Resume { Activate, WaitForOperator, Drop, NothingToResume };
Resume standby_resume(bool has_checkpoint, bool failover_manual, bool operator_forced, FateCell& fate);

// ---------------------------------------------------------------------------------------------
// The primary

// A broken session must be settled (guest paused, output held, Resolve, arbiter) before the
// guest runs on alone when the standby may hold a checkpoint (a Commit went out in this
// session) or may be resuming the twin (a planned Activate went out). Otherwise the twin can
// never run and the primary runs on at once.
bool must_settle(bool commit_sent, bool activate_sent);

// Steady state: the link is treated as broken (settle) once a checkpoint was sent and the
// standby has been silent for suspect_after(T).
bool standby_presumed_lost(ms standby_silence, ms heartbeat_timeout, bool commit_sent);

enum class Settle {
  Retry,     // ask again (Resolve, then maybe the arbiter) after a backoff
  RunAlone,  // this guest is the only copy: resume it, release its output (pass-through)
  Fence,     // the twin runs or this side lost: kill this guest; its held output dies with it
};
const char* to_string(Settle s);

// The standby answered Resolve.
Settle primary_on_resolution(Verdict v);
// Whether to ask the arbiter after Resolve failed: never after a planned Activate went out
// (only the standby's answer may release that guest), else once silent for suspect_after(T).
bool primary_asks_arbiter(ms silent, ms heartbeat_timeout, bool activate_sent);
Settle primary_on_arbiter(ArbiterAnswer a);

// Output of epoch `epoch` may leave the primary when the standby acknowledged that epoch (its
// twin then reflects it) or when this copy runs alone (the twin can never run).
bool may_release_output(uint64_t epoch, uint64_t acked_epoch, bool running_alone);

}  // namespace ftvm::checkpoint::failover
